//! Request and TCP metrics of a proxy, under Istio's standard label names
//! (plus `source_zone` and `destination_zone`), so dashboards and alerts
//! written for Istio read them with the prefix changed.
//!
//! Both ends report: the caller's sidecar as `reporter="source"`, the
//! destination's as `reporter="destination"`. Workload names come from the
//! SPIFFE IDs (`spiffe://<td>/ns/<namespace>/sa/<account>`): the account is
//! the workload, the namespace its namespace.

use std::collections::HashMap;
use std::sync::Arc;

use crate::forward;
use crate::trace::{self, Hop};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Who talks to whom: the labels a connection's requests share.
#[derive(Debug, Clone, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Peers {
    /// `source` (the caller's sidecar) or `destination`.
    pub reporter: &'static str,
    /// The caller's workload (its identity's account).
    pub source_workload: String,
    /// The caller's namespace.
    pub source_workload_namespace: String,
    /// The caller's SPIFFE ID.
    pub source_principal: String,
    /// The caller's zone.
    pub source_zone: String,
    /// `<service>.<namespace>.<suffix>`.
    pub destination_service: String,
    /// The service's name.
    pub destination_service_name: String,
    /// The service's namespace.
    pub destination_service_namespace: String,
    /// The answering workload (its identity's account); `unknown` when no
    /// peer answered.
    pub destination_workload: String,
    /// The answering workload's namespace.
    pub destination_workload_namespace: String,
    /// The answering workload's SPIFFE ID.
    pub destination_principal: String,
    /// The zone that answered.
    pub destination_zone: String,
    /// `mutual_tls` on the mesh path; `none` where there was no TLS.
    pub connection_security_policy: &'static str,
}

impl Peers {
    /// Fills the workload fields of the source from its SPIFFE ID.
    pub fn with_source(mut self, id: &str) -> Self {
        let (ns, account) = workload_of(id);
        self.source_workload = account;
        self.source_workload_namespace = ns;
        self.source_principal = id.to_owned();
        self
    }

    /// Fills the workload fields of the destination from its SPIFFE ID.
    pub fn with_destination(mut self, id: &str) -> Self {
        let (ns, account) = workload_of(id);
        self.destination_workload = account;
        self.destination_workload_namespace = ns;
        self.destination_principal = id.to_owned();
        self
    }
}

/// `(namespace, account)` of a workload SPIFFE ID; `unknown` otherwise.
fn workload_of(id: &str) -> (String, String) {
    let path = id
        .strip_prefix("spiffe://")
        .and_then(|r| r.split_once('/'))
        .map_or("", |(_, p)| p);
    let mut parts = path.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("ns"), Some(ns), Some("sa"), Some(sa)) => (ns.to_owned(), sa.to_owned()),
        _ => ("unknown".to_owned(), "unknown".to_owned()),
    }
}

/// One request's labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    peers: PeersLabels,
    /// `http` or `grpc`.
    pub request_protocol: &'static str,
    /// The HTTP status (`0` when no response came).
    pub response_code: u16,
    /// gRPC status, `-` for plain HTTP.
    pub grpc_response_status: String,
    /// Istio's short flags: `-`, `UF` (upstream connection failure), `NR`
    /// (no route), `URX`… kept to the ones a sidecar can tell.
    pub response_flags: &'static str,
}

/// [`Peers`], shared between the labels of one connection's requests.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct PeersLabels(Arc<Peers>);

impl EncodeLabelSet for PeersLabels {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelSetEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }
}

type HistFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // Istio's default buckets, in milliseconds.
    Histogram::new([
        0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
        30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
    ])
}

fn size_histogram() -> Histogram {
    // 1 B to 1 GB by powers of ten, as Istio.
    Histogram::new((0..10).map(|i| 10f64.powi(i)))
}

/// The request and TCP metrics of one proxy.
pub struct TrafficMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: HistFamily<RequestLabels>,
    request_bytes: HistFamily<RequestLabels>,
    response_bytes: HistFamily<RequestLabels>,
    tcp_opened: Family<Peers, Counter>,
    tcp_closed: Family<Peers, Counter>,
    tcp_sent: Family<Peers, Counter>,
    tcp_received: Family<Peers, Counter>,
    /// Pooled connections to other proxies open now.
    pub pool_connections: Gauge,
    /// Streams open on them.
    pub pool_streams: Gauge,
    /// TLS handshakes the pool made.
    pub pool_handshakes: Counter,
    /// Who else hears of every request and connection (access logs,
    /// golden-signal summaries).
    observers: std::sync::RwLock<Vec<Arc<dyn Observer>>>,
}

/// Hears of every request and opaque connection a proxy finishes, after
/// its metrics are recorded. Called on the data path: it must not block.
pub trait Observer: Send + Sync {
    /// A request ended.
    fn request(&self, peers: &Peers, record: &RequestRecord, detail: &Detail);
    /// An opaque TCP connection closed.
    fn connection(&self, peers: &Peers, record: &ConnRecord);
}

/// What a request was and how it went, beyond its metric labels: for
/// access logs and per-route summaries.
#[derive(Debug, Clone, Default)]
pub struct Detail {
    /// The request method.
    pub method: http::Method,
    /// The `:authority` (or `Host`) the app sent.
    pub authority: String,
    /// The request target (a shared copy, not a new string); logs take
    /// its path, never the query (which may carry secrets).
    pub uri: http::Uri,
    /// The route rule that matched, by name (or its position).
    pub route: Option<Arc<str>>,
    /// Where the last attempt went: the peer's address or the gateway.
    pub upstream: Option<String>,
    /// Attempts after the first.
    pub retries: u32,
    /// The trace the request belongs to, when it has one.
    pub trace_id: Option<String>,
}

/// An opaque TCP connection's outcome.
#[derive(Debug, Clone)]
pub struct ConnRecord {
    /// Bytes sent to the destination.
    pub sent: u64,
    /// Bytes received from it.
    pub received: u64,
    /// From accept to close.
    pub duration: std::time::Duration,
    /// Where it went.
    pub upstream: Option<String>,
}

impl Default for TrafficMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            request_bytes: Family::new_with_constructor(size_histogram),
            response_bytes: Family::new_with_constructor(size_histogram),
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_sent: Family::default(),
            tcp_received: Family::default(),
            pool_connections: Gauge::default(),
            pool_streams: Gauge::default(),
            pool_handshakes: Counter::default(),
            observers: std::sync::RwLock::default(),
        }
    }
}

/// One request's outcome, to record.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    /// `http` or `grpc`.
    pub protocol: &'static str,
    /// The status sent to the client (0 if none).
    pub code: u16,
    /// gRPC status, if the response carried one.
    pub grpc_status: Option<String>,
    /// See [`RequestLabels::response_flags`].
    pub flags: &'static str,
    /// From the request's arrival to the response's last byte.
    pub duration: std::time::Duration,
    /// Request body bytes.
    pub request_bytes: u64,
    /// Response body bytes.
    pub response_bytes: u64,
}

/// The labels of who talks to whom, made once and shared by their
/// requests, with the metric handles of each outcome seen so far: a request
/// then costs a lookup by status, not a hash of every label in four families.
#[derive(Clone)]
pub struct Reporter(Arc<ReporterInner>);

struct ReporterInner {
    peers: PeersLabels,
    handles: std::sync::Mutex<HashMap<OutcomeKey, Arc<Handles>>>,
    /// The span attributes of who talks to whom, made at the first traced
    /// request and shared (reference-counted strings) by the rest.
    span_attributes: std::sync::OnceLock<Vec<trace::Attribute>>,
}

type OutcomeKey = (&'static str, u16, Option<String>, &'static str);

struct Handles {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

/// Distinct outcomes one reporter keeps handles for; past it, the cache
/// starts over (labels stay bounded by status codes in practice).
const MAX_OUTCOMES: usize = 256;

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Reporter").field(&self.0.peers).finish()
    }
}

impl Reporter {
    /// The labels of `peers`.
    pub fn new(peers: Peers) -> Self {
        Self(Arc::new(ReporterInner {
            peers: PeersLabels(Arc::new(peers)),
            handles: std::sync::Mutex::new(HashMap::new()),
            span_attributes: std::sync::OnceLock::new(),
        }))
    }

    /// The mesh's span attributes for these peers.
    fn span_attributes(&self) -> &[trace::Attribute] {
        self.0.span_attributes.get_or_init(|| {
            let p = self.peers();
            let s = |v: &str| opentelemetry::Value::from(Arc::<str>::from(v));
            [
                ("trellis.source.workload", &p.source_workload),
                ("trellis.source.namespace", &p.source_workload_namespace),
                ("trellis.source.principal", &p.source_principal),
                ("trellis.source.zone", &p.source_zone),
                ("trellis.destination.service", &p.destination_service),
                ("trellis.destination.workload", &p.destination_workload),
                ("trellis.destination.principal", &p.destination_principal),
                ("trellis.destination.zone", &p.destination_zone),
            ]
            .into_iter()
            .map(|(k, v)| trace::Attribute::new(k, s(v)))
            .collect()
        })
    }

    /// The labels.
    pub fn peers(&self) -> &Peers {
        &self.0.peers.0
    }
}

/// One request's accounting, from its arrival to its response's last byte:
/// the request body counted, the response passed on (hop-by-hop headers
/// stripped, its body counted, `grpc-status` read) and recorded when it
/// ends. Dropped unanswered (the client went away first), it is recorded
/// with status 0 and Istio's flag `DC` (downstream connection termination).
pub struct Exchange {
    traffic: Arc<TrafficMetrics>,
    who: Reporter,
    start: std::time::Instant,
    protocol: &'static str,
    request_bytes: Arc<std::sync::atomic::AtomicU64>,
    armed: bool,
    detail: Detail,
    span: Option<Hop>,
}

impl Exchange {
    /// A request of `protocol` (`http` or `grpc`) that arrived at `start`.
    pub fn new(
        traffic: Arc<TrafficMetrics>,
        who: Reporter,
        start: std::time::Instant,
        protocol: &'static str,
    ) -> Self {
        Self {
            traffic,
            who,
            start,
            protocol,
            request_bytes: Arc::default(),
            armed: true,
            detail: Detail::default(),
            span: None,
        }
    }

    /// What the request is, for access logs and spans.
    pub fn describe(&mut self, parts: &http::request::Parts, authority: &str) {
        self.detail.method = parts.method.clone();
        self.detail.authority = authority.to_owned();
        self.detail.uri = parts.uri.clone();
    }

    /// How the request is being served: route, upstream, retries.
    pub fn detail_mut(&mut self) -> &mut Detail {
        &mut self.detail
    }

    /// Writes the trace context naming this request's span as the parent
    /// into `headers` (the request as it is passed on); without a span,
    /// leaves them as they are.
    pub fn inject_trace(&self, headers: &mut http::HeaderMap) {
        if let Some(s) = &self.span {
            s.inject(headers);
        }
    }

    /// The `traceparent` naming this request's span, if it has one.
    pub fn traceparent(&self) -> Option<String> {
        self.span.as_ref().and_then(Hop::traceparent)
    }

    /// The request's span, ended with the response.
    pub fn trace(&mut self, span: Hop) {
        self.detail.trace_id = span.trace_id();
        self.span = Some(span);
    }

    /// The request body to pass on, counted and held to `limits`; over
    /// its declared limit, the `413` to answer instead (recorded).
    pub fn request_body(
        &mut self,
        headers: &http::HeaderMap,
        body: hyper::body::Incoming,
        limits: &forward::Limits,
    ) -> Result<forward::Body, Box<http::Response<forward::Body>>> {
        match forward::limit_body(headers, body, limits) {
            Ok(b) => {
                let n = self.request_bytes.clone();
                Ok(forward::boxed(forward::Observed::new(b, move |t| {
                    n.store(t.bytes, std::sync::atomic::Ordering::Relaxed)
                })))
            }
            Err(refusal) => Err(Box::new(self.local(*refusal, "-"))),
        }
    }

    /// Labels the request with `who` instead: the destination that answered
    /// is known only once an attempt has.
    pub fn set_reporter(&mut self, who: Reporter) {
        self.who = who;
    }

    /// A response the proxy makes itself (`refusal`), recorded with `flags`.
    pub fn local(
        &mut self,
        r: http::Response<forward::Body>,
        flags: &'static str,
    ) -> http::Response<forward::Body> {
        self.armed = false;
        let rec = self.record(r.status().as_u16(), flags, None, 0);
        self.finish(&rec);
        r
    }

    /// The response from upstream, passed on; recorded when its body ends.
    /// `keep` (the stream it came on) lives as long as the body. A response
    /// a proxy made (it carries [`crate::hbone::ERROR_HEADER`]) is flagged
    /// `UF`.
    pub fn respond<K: Send + Sync + 'static>(
        mut self,
        resp: http::Response<hyper::body::Incoming>,
        keep: K,
    ) -> http::Response<forward::Body> {
        self.armed = false;
        let (mut parts, body) = resp.into_parts();
        forward::strip_hop_by_hop(&mut parts.headers);
        let flags = if parts.headers.contains_key(crate::hbone::ERROR_HEADER) {
            "UF"
        } else {
            "-"
        };
        let code = parts.status.as_u16();
        let head_grpc = forward::grpc_status(&parts.headers);
        let body = forward::Observed::new(body, move |t| {
            let _keep = keep;
            let rec = self.record(code, flags, t.grpc_status, t.bytes);
            self.finish(&rec);
        })
        .with_grpc_status(head_grpc);
        http::Response::from_parts(parts, forward::boxed(body))
    }

    /// Answered elsewhere (an upgrade, whose bytes the TCP metrics count).
    pub fn hand_off(mut self) {
        self.armed = false;
        if let Some(s) = self.span.take() {
            s.end();
        }
    }

    /// Records `rec` in the metrics and with the observers, and ends the
    /// span with it.
    fn finish(&mut self, rec: &RequestRecord) {
        self.traffic.request(&self.who, rec);
        self.traffic.observe(self.who.peers(), rec, &self.detail);
        if let Some(span) = self.span.take() {
            let p = self.who.peers();
            let kind = if p.reporter == "source" {
                trace::Kind::Client
            } else {
                trace::Kind::Server
            };
            if span.recording() {
                let d = &self.detail;
                let mut attrs = vec![
                    trace::Attribute::new("http.response.status_code", i64::from(rec.code)),
                    trace::Attribute::new("trellis.response_flags", rec.flags),
                    trace::Attribute::new("trellis.retries", i64::from(d.retries)),
                    trace::Attribute::new("http.request.body.size", rec.request_bytes as i64),
                    trace::Attribute::new("http.response.body.size", rec.response_bytes as i64),
                ];
                attrs.extend_from_slice(self.who.span_attributes());
                if let Some(g) = rec
                    .grpc_status
                    .as_deref()
                    .and_then(|g| g.parse::<i64>().ok())
                {
                    attrs.push(trace::Attribute::new("rpc.grpc.status_code", g));
                }
                if let Some(r) = &d.route {
                    attrs.push(trace::Attribute::new("trellis.route", r.to_string()));
                }
                if let Some(u) = &d.upstream {
                    attrs.push(trace::Attribute::new("trellis.upstream", u.clone()));
                }
                span.set(attrs);
            }
            if trace::is_error(&kind, rec.code, rec.grpc_status.as_deref()) {
                span.fail(if rec.code == 0 {
                    "no response".to_string()
                } else {
                    format!("status {} ({})", rec.code, rec.flags)
                });
            } else {
                span.end();
            }
        }
    }

    fn record(
        &self,
        code: u16,
        flags: &'static str,
        grpc_status: Option<String>,
        response_bytes: u64,
    ) -> RequestRecord {
        RequestRecord {
            protocol: self.protocol,
            code,
            grpc_status,
            flags,
            duration: self.start.elapsed(),
            request_bytes: self
                .request_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            response_bytes,
        }
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if self.armed {
            self.armed = false;
            let rec = self.record(0, "DC", None, 0);
            self.finish(&rec);
        }
    }
}

/// Reporters by a key of the caller's choosing (who talks to whom), so a
/// connection or request finds its labels, and their metric handles, made.
#[derive(Default)]
pub struct Reporters(std::sync::Mutex<HashMap<String, Reporter>>);

/// Pairs of peers kept; past it, the cache starts over.
const MAX_REPORTERS: usize = 4096;

impl Reporters {
    /// The reporter for `key`, made by `peers` the first time.
    pub fn get(&self, key: &str, peers: impl FnOnce() -> Peers) -> Reporter {
        let mut m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(r) = m.get(key) {
            return r.clone();
        }
        if m.len() >= MAX_REPORTERS {
            m.clear();
        }
        let r = Reporter::new(peers());
        m.insert(key.to_owned(), r.clone());
        r
    }
}

impl TrafficMetrics {
    /// Registers every metric under `trellis_`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("trellis");
        r.register(
            "requests",
            "HTTP and gRPC requests, by source, destination and response",
            self.requests.clone(),
        );
        r.register(
            "request_duration_milliseconds",
            "Request duration, from the request's arrival to the response's last byte",
            self.duration.clone(),
        );
        r.register(
            "request_bytes",
            "Request body sizes",
            self.request_bytes.clone(),
        );
        r.register(
            "response_bytes",
            "Response body sizes",
            self.response_bytes.clone(),
        );
        r.register(
            "tcp_connections_opened",
            "Opaque TCP connections opened through the mesh",
            self.tcp_opened.clone(),
        );
        r.register(
            "tcp_connections_closed",
            "Opaque TCP connections closed",
            self.tcp_closed.clone(),
        );
        r.register(
            "tcp_sent_bytes",
            "Bytes sent to the destination on opaque TCP connections",
            self.tcp_sent.clone(),
        );
        r.register(
            "tcp_received_bytes",
            "Bytes received from the destination on opaque TCP connections",
            self.tcp_received.clone(),
        );
        r.register(
            "pool_connections",
            "Pooled mTLS HTTP/2 connections to other proxies open now",
            self.pool_connections.clone(),
        );
        r.register(
            "pool_streams",
            "Streams open on pooled connections",
            self.pool_streams.clone(),
        );
        r.register(
            "pool_handshakes",
            "TLS handshakes made to other proxies",
            self.pool_handshakes.clone(),
        );
    }

    /// Records one request.
    pub fn request(&self, who: &Reporter, r: &RequestRecord) {
        let key: OutcomeKey = (r.protocol, r.code, r.grpc_status.clone(), r.flags);
        let h = {
            let mut cache = who
                .0
                .handles
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(h) = cache.get(&key) {
                h.clone()
            } else {
                if cache.len() >= MAX_OUTCOMES {
                    cache.clear();
                }
                let labels = RequestLabels {
                    peers: who.0.peers.clone(),
                    request_protocol: r.protocol,
                    response_code: r.code,
                    grpc_response_status: r.grpc_status.clone().unwrap_or_else(|| "-".into()),
                    response_flags: r.flags,
                };
                let h = Arc::new(Handles {
                    requests: self.requests.get_or_create(&labels).clone(),
                    duration: self.duration.get_or_create(&labels).clone(),
                    request_bytes: self.request_bytes.get_or_create(&labels).clone(),
                    response_bytes: self.response_bytes.get_or_create(&labels).clone(),
                });
                cache.insert(key, h.clone());
                h
            }
        };
        h.duration.observe(r.duration.as_secs_f64() * 1000.0);
        h.request_bytes.observe(r.request_bytes as f64);
        h.response_bytes.observe(r.response_bytes as f64);
        h.requests.inc();
    }

    /// An opaque TCP connection opened; the time to give
    /// [`TrafficMetrics::tcp_closed`].
    pub fn tcp_opened(&self, who: &Reporter) -> std::time::Instant {
        self.tcp_opened.get_or_create(who.peers()).inc();
        std::time::Instant::now()
    }

    /// An opaque TCP connection opened at `opened` closed, after `sent`
    /// bytes to the destination (`upstream`, where known) and `received`
    /// from it.
    pub fn tcp_closed(
        &self,
        who: &Reporter,
        opened: std::time::Instant,
        sent: u64,
        received: u64,
        upstream: Option<&str>,
    ) {
        let r = &ConnRecord {
            sent,
            received,
            duration: opened.elapsed(),
            upstream: upstream.map(str::to_owned),
        };
        let p = who.peers();
        self.tcp_closed.get_or_create(p).inc();
        self.tcp_sent.get_or_create(p).inc_by(r.sent);
        self.tcp_received.get_or_create(p).inc_by(r.received);
        for o in self.observers().iter() {
            o.connection(p, r);
        }
    }

    /// Tells `o` of every request and connection from now on.
    pub fn add_observer(&self, o: Arc<dyn Observer>) {
        self.observers
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(o);
    }

    fn observers(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<dyn Observer>>> {
        self.observers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn observe(&self, peers: &Peers, r: &RequestRecord, d: &Detail) {
        for o in self.observers().iter() {
            o.request(peers, r, d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_istio_names_and_count_requests() {
        let m = TrafficMetrics::default();
        let mut reg = Registry::default();
        m.register(&mut reg);
        let who = Reporter::new(
            Peers {
                reporter: "source",
                source_zone: "east".into(),
                destination_zone: "west".into(),
                destination_service: "catalog.shop.mesh".into(),
                destination_service_name: "catalog".into(),
                destination_service_namespace: "shop".into(),
                connection_security_policy: "mutual_tls",
                ..Peers::default()
            }
            .with_source("spiffe://td/ns/web/sa/front")
            .with_destination("spiffe://td/ns/shop/sa/catalog"),
        );
        let rec = RequestRecord {
            protocol: "grpc",
            code: 200,
            grpc_status: Some("0".into()),
            flags: "-",
            duration: std::time::Duration::from_millis(3),
            request_bytes: 10,
            response_bytes: 20,
        };
        m.request(&who, &rec);
        m.request(&who, &rec);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        let line = out
            .lines()
            .find(|l| l.starts_with("trellis_requests_total{"))
            .unwrap();
        for want in [
            "reporter=\"source\"",
            "source_workload=\"front\"",
            "source_workload_namespace=\"web\"",
            "destination_workload=\"catalog\"",
            "destination_service=\"catalog.shop.mesh\"",
            "source_zone=\"east\"",
            "destination_zone=\"west\"",
            "response_code=\"200\"",
            "grpc_response_status=\"0\"",
            "connection_security_policy=\"mutual_tls\"",
        ] {
            assert!(line.contains(want), "{want} missing in {line}");
        }
        assert!(line.ends_with(" 2"), "{line}");
        assert!(out.contains("trellis_request_duration_milliseconds_bucket{"));
    }

    #[test]
    fn an_exchange_is_recorded_once_and_an_abandoned_one_as_dc() {
        let m = Arc::new(TrafficMetrics::default());
        let mut reg = Registry::default();
        m.register(&mut reg);
        let who = Reporter::new(Peers {
            reporter: "source",
            ..Peers::default()
        });
        let now = std::time::Instant::now();
        // Answered by the proxy itself: one sample, none more on drop.
        let mut e = Exchange::new(m.clone(), who.clone(), now, "http");
        let r = e.local(
            forward::refusal(http::StatusCode::SERVICE_UNAVAILABLE, "down"),
            "UF",
        );
        assert_eq!(r.status(), 503);
        drop(e);
        // The client went away before an answer.
        drop(Exchange::new(m.clone(), who.clone(), now, "http"));
        // Handed off to an upgrade: nothing here.
        Exchange::new(m.clone(), who, now, "http").hand_off();
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        let count = |code: &str, flags: &str| {
            out.lines()
                .filter(|l| l.starts_with("trellis_requests_total{"))
                .filter(|l| l.contains(code) && l.contains(flags))
                .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
                .sum::<u64>()
        };
        assert_eq!(
            count("response_code=\"503\"", "response_flags=\"UF\""),
            1,
            "{out}"
        );
        assert_eq!(
            count("response_code=\"0\"", "response_flags=\"DC\""),
            1,
            "{out}"
        );
        assert_eq!(count("", ""), 2, "{out}");
    }

    #[test]
    fn non_workload_ids_are_unknown() {
        assert_eq!(workload_of("spiffe://td/zone/a/gateway/g").1, "unknown");
        assert_eq!(workload_of("spiffe://td/ns/a/sa/b").0, "a");
    }
}
