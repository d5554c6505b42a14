//! Telemetry through the real gRPC API over mutual TLS: proxies' reports
//! are kept in the memory of the server they reach (never a Raft write),
//! a query merges every server's data and names the servers that did not
//! answer, and each side may do only its part.

use tonic::Code;
use trellis_federation::client;
use trellis_federation::proto::telemetry_client::TelemetryClient;
use trellis_federation::proto::*;
use trellis_federation::telemetry::Sketch;

#[path = "support/mesh.rs"]
mod mesh;
use mesh::{Mesh, leader};

fn edge(reporter: &str, src_zone: &str, dst_zone: &str, requests: u64, errors: u64) -> EdgeSignals {
    let mut latency = Sketch::default();
    (0..requests).for_each(|i| latency.insert(1_000 + i));
    EdgeSignals {
        key: Some(EdgeKey {
            reporter: reporter.into(),
            source_workload: "auth".into(),
            source_namespace: "shop".into(),
            source_zone: src_zone.into(),
            destination_service: "catalog".into(),
            destination_namespace: "shop".into(),
            destination_zone: dst_zone.into(),
            destination_workload: "catalog".into(),
            route: "default".into(),
        }),
        requests,
        errors,
        connections: 0,
        latency: Some(latency.to_proto()),
    }
}

fn report(proxy: &str, edges: Vec<EdgeSignals>) -> SignalReport {
    SignalReport {
        proxy: proxy.into(),
        interval_ms: 2000,
        edges,
        dropped: 0,
    }
}

async fn send(
    addr: &str,
    creds: &std::path::Path,
    reports: Vec<SignalReport>,
) -> Result<(), tonic::Status> {
    let ch = client::connect(addr, creds).unwrap();
    TelemetryClient::new(ch)
        .report(tokio_stream::iter(reports))
        .await
        .map(|_| ())
}

async fn query(addr: &str, creds: &std::path::Path) -> Result<SignalTable, tonic::Status> {
    let ch = client::connect(addr, creds).unwrap();
    trellis_federation::telemetry::query(
        ch,
        SignalQuery {
            window_seconds: 10,
            ..Default::default()
        },
    )
    .await
}

async fn revision(addr: &str, op: &std::path::Path) -> u64 {
    let ch = client::connect(addr, op).unwrap();
    cluster_client::ClusterClient::new(ch)
        .status(Empty {})
        .await
        .unwrap()
        .into_inner()
        .revision
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_stay_in_memory_and_a_query_merges_every_server() {
    let mesh = Mesh::new();
    let servers = mesh.cluster(3).await;
    leader(&servers.iter().collect::<Vec<_>>()).await;
    let addr: Vec<String> = servers.iter().map(|s| s.addr.to_string()).collect();
    let op = mesh.creds("operator/alice");
    let a1 = mesh.creds("zone/east/agent/a1");
    let a2 = mesh.creds("zone/east/agent/a2");
    // The store's own start-up writes (member records) settle first.
    let mut before = revision(&addr[0], &op).await;
    for _ in 0..20 {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let now = revision(&addr[0], &op).await;
        if now == before {
            break;
        }
        before = now;
    }

    // Two hosts report the same edge to two different servers; a1 in two
    // messages of one stream, naming itself or no one.
    let id1 = "spiffe://test.local/zone/east/agent/a1";
    send(
        &addr[0],
        &a1,
        vec![
            report(id1, vec![edge("source", "east", "west", 30, 3)]),
            report("", vec![edge("source", "east", "west", 10, 1)]),
        ],
    )
    .await
    .unwrap();
    send(
        &addr[1],
        &a2,
        vec![report("", vec![edge("source", "east", "west", 60, 0)])],
    )
    .await
    .unwrap();

    // Asked of the third server, which holds none of it.
    let t = query(&addr[2], &op).await.unwrap();
    assert_eq!(t.missing, Vec::<String>::new());
    assert_eq!(t.servers.len(), 3, "{:?}", t.servers);
    assert_eq!(t.rows.len(), 1, "{t:?}");
    let r = &t.rows[0];
    assert_eq!((r.requests, r.errors), (100, 4));
    assert!((r.success_rate - 0.96).abs() < 1e-9);
    assert!(
        (r.rps - 10.0).abs() < 1e-9,
        "100 requests over 10 s: {}",
        r.rps
    );
    assert!(r.p50_ms > 0.98 && r.p50_ms < 1.1, "{}", r.p50_ms);
    // A server's own data only, when asked so.
    let ch = client::connect(&addr[1], &op).unwrap();
    let local = trellis_federation::telemetry::query(
        ch,
        SignalQuery {
            window_seconds: 10,
            local_only: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(local.rows[0].requests, 60);
    // None of it went through Raft.
    assert_eq!(revision(&addr[0], &op).await, before);

    // A server that does not answer is named, not silently left out.
    let mut servers = servers;
    let gone = servers.remove(1);
    gone.kill().await;
    let t = query(&addr[0], &op).await.unwrap();
    assert_eq!(t.missing.len(), 1, "{t:?}");
    // Named as its record says, or by its address before it has one.
    let named = t.missing[0].starts_with("east/s1: ")
        || t.missing[0].starts_with(&format!("{}: ", addr[1]));
    assert!(named, "{:?}", t.missing);
    assert_eq!(t.rows[0].requests, 40, "what s0 holds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_report_only_for_themselves_and_only_operators_query() {
    let mesh = Mesh::new();
    let servers = mesh.cluster(1).await;
    let addr = servers[0].addr.to_string();
    let op = mesh.creds("operator/alice");
    let a1 = mesh.creds("zone/east/agent/a1");
    let workload = mesh.creds("ns/shop/sa/auth");
    let ok = || vec![edge("source", "east", "west", 1, 0)];

    let denied = |r: Result<(), tonic::Status>, want: &str| {
        let s = r.expect_err("refused");
        assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
        assert!(
            s.message().contains(want),
            "{want} not in {:?}",
            s.message()
        );
    };
    // Another proxy's name.
    denied(
        send(
            &addr,
            &a1,
            vec![report("spiffe://test.local/zone/east/agent/a2", ok())],
        )
        .await,
        "may not report for spiffe://test.local/zone/east/agent/a2",
    );
    // Another zone's side of an edge: a destination in west.
    denied(
        send(
            &addr,
            &a1,
            vec![report("", vec![edge("destination", "east", "west", 1, 0)])],
        )
        .await,
        "may not report destination edges of zone west",
    );
    // Operators and workloads do not report.
    denied(
        send(&addr, &op, vec![report("", ok())]).await,
        "Telemetry.Report",
    );
    denied(
        send(&addr, &workload, vec![report("", ok())]).await,
        "Telemetry.Report",
    );
    // Proxies do not read.
    let s = query(&addr, &a1).await.expect_err("refused");
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    // A malformed key is refused whole, naming the field.
    let mut bad = edge("source", "east", "west", 1, 0);
    bad.key.as_mut().unwrap().route = "r".repeat(300);
    let s = send(&addr, &a1, vec![report("", vec![bad])])
        .await
        .expect_err("refused");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("route"), "{s:?}");
    // None of the refused reports was kept.
    let t = query(&addr, &op).await.unwrap();
    assert!(t.rows.is_empty(), "{t:?}");
    // A window longer than servers keep is refused with the bound.
    let ch = client::connect(&addr, &op).unwrap();
    let s = trellis_federation::telemetry::query(
        ch,
        SignalQuery {
            window_seconds: 600,
            ..Default::default()
        },
    )
    .await
    .expect_err("refused");
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("60 s"), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_moves_past_a_dead_server_and_its_summaries_arrive() {
    let mesh = Mesh::new();
    let servers = mesh.cluster(1).await;
    let addr = servers[0].addr.to_string();
    let op = mesh.creds("operator/alice");
    let a1 = mesh.creds("zone/east/agent/a1");
    let (creds, bundle) = trellis_ca::load_credentials(&a1).unwrap();
    // A port nothing listens on, first in the list.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let list = client::Servers::new(
        &[dead, addr.clone()],
        trellis_ca::tls::CertSource::new(creds).unwrap(),
        trellis_ca::tls::TrustStore::new(bundle),
    )
    .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(trellis_federation::telemetry::report::run(
        list,
        std::time::Duration::from_millis(100),
        |_| Some(report("", vec![edge("source", "east", "west", 1, 0)])),
        stop.clone(),
    ));
    let mut seen = 0;
    for _ in 0..100 {
        let t = query(&addr, &op).await.unwrap();
        seen = t.rows.first().map_or(0, |r| r.requests);
        if seen >= 5 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(seen >= 5, "only {seen} reports arrived");
    stop.cancel();
    tokio::time::timeout(std::time::Duration::from_secs(5), task)
        .await
        .expect("the report task stops when told")
        .unwrap();
}
