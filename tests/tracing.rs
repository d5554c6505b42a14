//! Traces and access logs of a request through the whole dev chain
//! (frontend → auth in east, catalog → inventory in west, across both
//! gateways), received by an OTLP collector built on the OpenTelemetry
//! protocol definitions (`opentelemetry-proto`), over gRPC and over
//! HTTP/protobuf, as every part of `trellis dev` exports them by the
//! standard `OTEL_*` environment.

#[path = "support/dev.rs"]
mod dev;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dev::{Dev, exchange, wait_for};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

/// A span as received, with the resource of the process that made it.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    instance: String,
    zone: String,
    name: String,
    kind: i32,
    trace: String,
    id: String,
    parent: String,
    attrs: HashMap<String, String>,
}

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Got>>>);

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attrs(kv: &[KeyValue]) -> HashMap<String, String> {
    kv.iter().map(|a| (a.key.clone(), text(&a.value))).collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Collector {
    fn take(&self, req: ExportTraceServiceRequest) {
        let mut all = self.0.lock().unwrap();
        for rs in req.resource_spans {
            let res = attrs(&rs.resource.map(|r| r.attributes).unwrap_or_default());
            for ss in rs.scope_spans {
                for s in ss.spans {
                    all.push(Got {
                        service: res.get("service.name").cloned().unwrap_or_default(),
                        instance: res.get("service.instance.id").cloned().unwrap_or_default(),
                        zone: res.get("trellis.zone").cloned().unwrap_or_default(),
                        name: s.name,
                        kind: s.kind,
                        trace: hex(&s.trace_id),
                        id: hex(&s.span_id),
                        parent: hex(&s.parent_span_id),
                        attrs: attrs(&s.attributes),
                    });
                }
            }
        }
    }

    fn of(&self, trace: &str) -> Vec<Got> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace == trace)
            .cloned()
            .collect()
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.take(req.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC collector on a port of its own, in a thread of its own.
fn grpc_collector() -> (Collector, SocketAddr) {
    let c = Collector::default();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap();
    let svc = TraceServiceServer::new(c.clone());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l))
                .await
                .unwrap();
        });
    });
    (c, addr)
}

/// An OTLP/HTTP collector: `POST /v1/traces` with a protobuf body.
fn http_collector() -> (Collector, SocketAddr) {
    let c = Collector::default();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let keep = c.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let c = keep.clone();
            std::thread::spawn(move || {
                // One request per connection is enough for the exporter's
                // client, which reconnects; each answered with 200.
                let mut buf = Vec::new();
                let mut chunk = [0u8; 65536];
                let (head_end, len) = loop {
                    let n = s.read(&mut chunk).unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                        assert!(head.starts_with("post /v1/traces "), "{head}");
                        assert!(
                            head.contains("content-type: application/x-protobuf"),
                            "{head}"
                        );
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map(|v| v.trim().parse::<usize>().unwrap())
                            .expect("the exporter sends a content-length");
                        break (i + 4, len);
                    }
                };
                while buf.len() < head_end + len {
                    let n = s.read(&mut chunk).unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let req = <ExportTraceServiceRequest as prost::Message>::decode(
                    &buf[head_end..head_end + len],
                )
                .unwrap();
                c.take(req);
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
            });
        }
    });
    (c, addr)
}

/// GET / from the frontend host as a workload there, in trace `trace`.
fn traced_get(to: SocketAddr, trace: &str, state: &str) -> (u16, String) {
    let parent = format!("00-{trace}-00f067aa0ba902b7-01");
    let a = exchange(
        to,
        "GET",
        "/",
        &[
            ("host", "frontend.shop.mesh"),
            ("traceparent", &parent),
            ("tracestate", state),
        ],
        Duration::from_secs(10),
    );
    (a.status, a.body)
}

fn kind(k: i32) -> &'static str {
    match SpanKind::try_from(k) {
        Ok(SpanKind::Client) => "client",
        Ok(SpanKind::Server) => "server",
        Ok(SpanKind::Internal) => "internal",
        _ => "other",
    }
}

/// The one span of `instance` (a host or gateway name) of `kind` about
/// `service` (the destination it names).
fn find<'a>(spans: &'a [Got], instance: &str, k: &str, service: &str) -> &'a Got {
    let hits: Vec<&Got> = spans
        .iter()
        .filter(|s| s.instance == instance && kind(s.kind) == k)
        .filter(|s| {
            s.attrs
                .get("trellis.destination.service")
                .is_some_and(|d| d.starts_with(service))
        })
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "{instance} {k} spans for {service}: {hits:#?}\nall: {spans:#?}"
    );
    hits[0]
}

fn env(endpoint: &str, protocol: &'static str) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_owned()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.to_owned()),
        // Only requests that arrive sampled start spans: the dev loop's
        // own requests make none, so the test's trace stands alone.
        ("OTEL_TRACES_SAMPLER", "parentbased_always_off".to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
    ]
}

#[test]
fn one_trace_per_request_across_both_gateways_and_an_access_log_line_per_hop() {
    let (collector, addr) = grpc_collector();
    let env = env(&format!("http://{addr}"), "grpc");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let dev = Dev::start_with(29600, "1h", &["--access-log", "full"], &env);
    // Requests carrying the test's trace state go to catalog's v2 subset:
    // a server name no request used before, so this request opens a new
    // connection through both gateways and their spans join its trace.
    let path = dev.state_dir().join("traced.yaml");
    std::fs::write(
        &path,
        "kind: Route\nmetadata: {name: traced}\nspec:\n  service: catalog.shop\n  rules:\n  \
         - name: traced-to-v2\n    match: [{headers: {tracestate: {exact: \"trellis-test=1\"}}}]\n    \
         backends: [{subset: v2}]\n",
    )
    .unwrap();
    dev.op_ok(&["policy", "apply", "-f", path.to_str().unwrap()]);
    dev.in_sync();

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let (code, body) = traced_get(dev.frontend(), trace, "trellis-test=1");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("v2"), "the traced request went to v2: {body}");

    // Ten spans: the frontend host's sidecar (client, for the test's call),
    // then per hop a client and a server span, and the two gateways'.
    let mut spans = Vec::new();
    wait_for("every span of the trace", Duration::from_secs(15), || {
        spans = collector.of(trace);
        spans.len() >= 10
    });
    std::thread::sleep(Duration::from_millis(500));
    spans = collector.of(trace);
    for s in &spans {
        eprintln!(
            "{:<16} {:<8} {:<8} {:<36} id {} parent {}",
            s.service,
            s.instance,
            kind(s.kind),
            s.name,
            s.id,
            s.parent
        );
    }
    assert_eq!(spans.len(), 10, "{spans:#?}");
    let ids: HashMap<&str, &Got> = spans.iter().map(|s| (s.id.as_str(), s)).collect();
    for s in &spans {
        assert!(
            s.parent == "00f067aa0ba902b7" || ids.contains_key(s.parent.as_str()),
            "{} of {} has a parent outside the trace: {s:#?}",
            s.name,
            s.instance
        );
    }
    // Hop by hop: each callee's server span is the child of its caller's
    // client span, and each caller's client span the child of the server
    // span of the request its app was serving (the app passed it on).
    let test_call = find(&spans, "frontend-east", "client", "frontend.shop");
    assert_eq!(test_call.parent, "00f067aa0ba902b7");
    let front = find(&spans, "frontend-east", "server", "frontend.shop");
    assert_eq!(front.parent, test_call.id);
    let to_auth = find(&spans, "frontend-east", "client", "auth.shop");
    assert_eq!(to_auth.parent, front.id);
    let auth = find(&spans, "auth-east", "server", "auth.shop");
    assert_eq!(auth.parent, to_auth.id);
    let to_catalog = find(&spans, "auth-east", "client", "catalog.shop");
    assert_eq!(to_catalog.parent, auth.id);
    assert_eq!(to_catalog.attrs["trellis.route"], "traced-to-v2");
    assert_eq!(to_catalog.attrs["trellis.destination.zone"], "west");
    assert_eq!(to_catalog.attrs["http.response.status_code"], "200");
    // Across the zones: east's gateway is the child of the caller's span,
    // west's of east's, and the callee is still the caller's child (its
    // context travelled inside the end-to-end TLS).
    let gw_east = find(&spans, "gw1", "client", "catalog.shop");
    assert_eq!(gw_east.service, "trellis-gateway");
    assert_eq!(gw_east.zone, "east");
    assert_eq!(gw_east.parent, to_catalog.id);
    assert_eq!(gw_east.attrs["trellis.gateway.transport"], "quic");
    let gw_west = find(&spans, "gw1", "server", "catalog.shop");
    assert_eq!(gw_west.zone, "west");
    assert_eq!(gw_west.parent, gw_east.id);
    let catalog = find(&spans, "catalog-west-v2", "server", "catalog.shop");
    assert_eq!(catalog.parent, to_catalog.id);
    assert_eq!(catalog.attrs["trellis.source.zone"], "east");
    let to_inventory = find(&spans, "catalog-west-v2", "client", "inventory.shop");
    assert_eq!(to_inventory.parent, catalog.id);
    let inventory = spans
        .iter()
        .find(|s| {
            kind(s.kind) == "server"
                && s.attrs["trellis.destination.service"].starts_with("inventory.shop")
        })
        .expect("inventory's server span");
    assert_eq!(inventory.parent, to_inventory.id);
    for s in &spans {
        if s.service == "trellis-agent" {
            assert_eq!(s.name, "GET", "{s:#?}");
            assert_eq!(s.attrs["http.request.method"], "GET");
            assert!(
                s.attrs["trellis.source.principal"]
                    .starts_with("spiffe://trellis.local/ns/shop/sa/")
            );
        }
    }

    // A server's API calls join the trace their caller sent.
    let call_trace = "5b8efff798038103d269b633813fc60c";
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ch = trellis_federation::client::connect(
            &dev.s("/servers/0"),
            std::path::Path::new(&dev.s("/operator")),
        )
        .unwrap();
        let mut req = tonic::Request::new(trellis_federation::proto::Empty {});
        req.metadata_mut().insert(
            "traceparent",
            format!("00-{call_trace}-b7ad6b7169203331-01")
                .parse()
                .unwrap(),
        );
        trellis_federation::proto::cluster_client::ClusterClient::new(ch)
            .status(req)
            .await
            .unwrap();
    });
    let mut server_spans = Vec::new();
    wait_for("the server's span", Duration::from_secs(10), || {
        server_spans = collector.of(call_trace);
        !server_spans.is_empty()
    });
    let s = &server_spans[0];
    assert_eq!(s.service, "trellis-server");
    assert_eq!(s.name, "trellis.v1.Cluster/Status", "{s:#?}");
    assert_eq!(kind(s.kind), "server");
    assert_eq!(s.parent, "b7ad6b7169203331");
    assert_eq!(s.attrs["rpc.grpc.status_code"], "0");

    // An access log line per request on each side, with the trace's ID.
    let logs = dev.state_dir().join("logs");
    let lines_of = |host: &str| -> Vec<serde_json::Value> {
        std::fs::read_to_string(logs.join(format!("{host}.access.log")))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{host}: {e}: {l}")))
            .filter(|v: &serde_json::Value| v["trace_id"] == trace)
            .collect()
    };
    let mut auth_lines = Vec::new();
    wait_for("auth's access log lines", Duration::from_secs(5), || {
        auth_lines = lines_of("auth-east");
        auth_lines.len() == 2
    });
    let out = auth_lines
        .iter()
        .find(|l| l["reporter"] == "source")
        .expect("auth's outbound line");
    assert_eq!(out["destination_service"], "catalog.shop.mesh");
    assert_eq!(out["destination_zone"], "west");
    assert_eq!(out["route"], "traced-to-v2");
    assert_eq!(out["status"], 200);
    assert_eq!(out["method"], "GET");
    assert_eq!(out["retries"], 0);
    assert_eq!(
        out["source_principal"],
        "spiffe://trellis.local/ns/shop/sa/auth"
    );
    assert_eq!(
        out["destination_principal"],
        "spiffe://trellis.local/ns/shop/sa/catalog"
    );
    let gateway = dev.host("auth-east");
    eprintln!("auth's outbound line: {out}\n(host {gateway})");
    assert!(
        out["upstream"]
            .as_str()
            .is_some_and(|u| u.starts_with("127.0.0.1:"))
    );
    assert!(out["bytes_sent"].as_u64().unwrap() > 0);
    assert!(out["duration_ms"].as_f64().unwrap() > 0.0);
    let mut v2_lines = Vec::new();
    wait_for(
        "catalog v2's access log lines",
        Duration::from_secs(5),
        || {
            v2_lines = lines_of("catalog-west-v2");
            v2_lines.len() == 2
        },
    );
    let inb = v2_lines
        .iter()
        .find(|l| l["reporter"] == "destination")
        .expect("catalog's inbound line");
    assert_eq!(inb["source_zone"], "east");
    assert_eq!(inb["status"], 200);
    // The query string never reaches a log.
    assert!(
        !std::fs::read_to_string(logs.join("auth-east.access.log"))
            .unwrap()
            .contains('?')
    );
}

#[test]
fn spans_reach_an_otlp_http_collector_and_unsampled_requests_make_none() {
    let (collector, addr) = http_collector();
    let env = env(&format!("http://{addr}"), "http/protobuf");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let dev = Dev::start_with(29700, "1h", &["--access-log", "off"], &env);
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let (code, body) = traced_get(dev.frontend(), trace, "k=v");
    assert_eq!(code, 200, "{body}");
    let mut spans = Vec::new();
    // Through an existing connection: no gateway span, eight sidecar spans.
    wait_for("the sidecars' spans", Duration::from_secs(15), || {
        spans = collector.of(trace);
        spans
            .iter()
            .filter(|s| s.service == "trellis-agent")
            .count()
            >= 8
    });
    let servers: Vec<&str> = spans
        .iter()
        .filter(|s| kind(s.kind) == "server" && s.service == "trellis-agent")
        .map(|s| s.instance.as_str())
        .collect();
    for host in ["frontend-east", "auth-east", "inventory-west"] {
        assert!(servers.contains(&host), "{host}: {servers:?}");
    }
    // The dev loop's requests (20 a second, none sampled) made no span of
    // any other trace.
    std::thread::sleep(Duration::from_secs(1));
    let all = collector.0.lock().unwrap().clone();
    let others: Vec<&Got> = all.iter().filter(|s| s.trace != trace).collect();
    assert!(others.is_empty(), "unsampled spans exported: {others:#?}");
}
