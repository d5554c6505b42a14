//! Sidecars in front of plain apps: an app in east calls a loopback address,
//! its agent carries the call by mTLS (directly, or through the gateways to
//! west), and west's agent hands it to the app there after checking policy.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use trellis_agent::{Agent, AgentConfig, AuthzRule, HealthCheck, HealthKind, Upstream};
use trellis_gateway::config::Transport;
use trellis_gateway::testing::{Pki, Running, config, peer, service, tcp_echo};

mod support;
use support::{agent_config, local, metrics};

/// A loopback address of its own per test, so parallel tests never collide.
fn loopback() -> IpAddr {
    IpAddr::from([127, 77, fastrand::u8(1..255), fastrand::u8(1..255)])
}

async fn start(cfg: AgentConfig) -> (SocketAddr, CancellationToken) {
    start_with_admin(cfg).await.0
}

/// Starts an agent; returns (inbound, stop) and its admin address.
async fn start_with_admin(cfg: AgentConfig) -> ((SocketAddr, CancellationToken), SocketAddr) {
    let agent = Agent::bind(cfg).await.unwrap();
    let admin = agent.admin_addr().unwrap();
    let addr = agent.inbound_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(agent.run(stop.clone()));
    ((addr, stop), admin)
}

async fn call(addr: SocketAddr, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(msg).await?;
    s.shutdown().await?;
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut back))
        .await
        .map_err(|_| std::io::Error::other("no answer"))??;
    Ok(back)
}

#[tokio::test]
async fn a_plain_app_in_east_reaches_a_plain_app_in_west_through_sidecars_and_gateways() {
    let pki = Pki::new("trellis.local");
    let tmp = tempfile::tempdir().unwrap();
    let app = tcp_echo().await;

    // West host: catalog's app and its sidecar; west's gateway routes to the sidecar.
    let (w_inbound, w_stop) = start(agent_config(
        "west",
        vec![local(&pki, tmp.path(), "west", "catalog", app.port())],
    ))
    .await;
    let mut w = config("west", "127.0.0.1:0".parse().unwrap());
    w.services = vec![service("catalog", &["east"], vec![w_inbound])];
    let west = Running::start(w, pki.gateway("west", "gw1"), pki.bundle()).await;
    let mut e = config("east", "127.0.0.1:0".parse().unwrap());
    e.peers = vec![peer("west", west.addrs.tcp, Transport::Quic)];
    let east = Running::start(e, pki.gateway("east", "gw1"), pki.bundle()).await;

    // East host: frontend's sidecar with catalog on a loopback address.
    let addr = loopback();
    let mut cfg = agent_config(
        "east",
        vec![local(&pki, tmp.path(), "east", "frontend", 18000)],
    );
    cfg.gateway = Some(east.addrs.tcp);
    cfg.upstreams = vec![Upstream {
        name: "catalog".into(),
        namespace: "shop".into(),
        address: addr,
        ports: vec![app.port()],
        identities: vec!["spiffe://trellis.local/ns/shop/sa/catalog".into()],
        endpoints: vec![],
        zones: vec!["west".into()],
        protocol: Default::default(),
        port_protocols: Default::default(),
    }];
    let (_, e_stop) = start(cfg).await;

    let back = call(SocketAddr::new(addr, app.port()), b"plain in, plain out")
        .await
        .unwrap();
    assert_eq!(back, b"plain in, plain out");
    let m = east.metrics().await;
    assert!(
        m.contains(r#"service="catalog.shop",outcome="accepted"} 1"#),
        "{m}"
    );
    e_stop.cancel();
    w_stop.cancel();
    east.stop().await;
    west.stop().await;
}

#[tokio::test]
async fn in_zone_calls_go_straight_to_the_endpoint_and_policy_is_enforced() {
    let pki = Pki::new("trellis.local");
    let tmp = tempfile::tempdir().unwrap();
    let app = tcp_echo().await;
    let mut server = agent_config(
        "east",
        vec![local(&pki, tmp.path(), "east", "catalog", app.port())],
    );
    server.authorization = vec![AuthzRule {
        service: "catalog.shop".into(),
        allow: vec!["ns:shop".into()],
        deny: vec!["spiffe://trellis.local/ns/shop/sa/intruder".into()],
    }];
    let ((inbound, s_stop), s_admin) = start_with_admin(server).await;

    let client = |account: &'static str| {
        let (pki, dir) = (&pki, tmp.path());
        async move {
            let addr = loopback();
            let mut cfg = agent_config("east", vec![local(pki, dir, "east", account, 18000)]);
            cfg.upstreams = vec![Upstream {
                name: "catalog".into(),
                namespace: "shop".into(),
                address: addr,
                ports: vec![app.port()],
                identities: vec!["spiffe://trellis.local/ns/shop/sa/catalog".into()],
                endpoints: vec![inbound],
                zones: vec![],
                protocol: Default::default(),
                port_protocols: Default::default(),
            }];
            let (_, stop) = start(cfg).await;
            (SocketAddr::new(addr, app.port()), stop)
        }
    };
    let (ok_addr, a) = client("frontend").await;
    assert_eq!(call(ok_addr, b"allowed").await.unwrap(), b"allowed");

    // Denied by name: the sidecar refuses, the app never sees the bytes.
    let (bad_addr, b) = client("intruder").await;
    let back = call(bad_addr, b"denied").await;
    assert!(
        matches!(&back, Ok(v) if v.is_empty()) || back.is_err(),
        "{back:?}"
    );
    let m = metrics(s_admin).await;
    for outcome in ["accepted", "denied"] {
        let line = format!(
            r#"trellis_agent_inbound_connections_total{{service="catalog.shop",outcome="{outcome}"}} 1"#
        );
        assert!(m.contains(&line), "{line} not in {m}");
    }
    for t in [a, b, s_stop] {
        t.cancel();
    }
}

#[test]
fn the_example_configs_load() {
    for (file, store) in [("agent.toml", true), ("agent-static.toml", false)] {
        let path = format!("{}/../configs/{file}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap();
        let cfg = AgentConfig::from_toml(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(cfg.zone, "east");
        assert_eq!(cfg.uses_store(), store, "{file}");
        let err = AgentConfig::from_toml(&text.replacen("connect_timeout", "connect_timout", 1))
            .unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{file}: {err}");
    }
    let path = format!("{}/../configs/agent.toml", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    let cfg = AgentConfig::from_toml(&text).unwrap();
    assert_eq!(cfg.tracing.sampling, Some(0.05));
    assert_eq!(cfg.access_log.mode, trellis_agent::AccessLogMode::Sampled);
    // `calls` scopes the watch: the host's own namespace, the services and
    // the namespace it names.
    let scope = cfg.scope().unwrap();
    assert_eq!(scope.namespaces().collect::<Vec<_>>(), ["billing", "shop"]);
    assert_eq!(
        scope.services().collect::<Vec<_>>(),
        ["shop/auth", "shop/catalog"]
    );
    // Telemetry settings out of range are refused with the field.
    for (from, to, field) in [
        ("sampling = 0.05", "sampling = 1.5", "tracing.sampling"),
        ("sample = 0.01", "sample = -1", "access_log.sample"),
        ("\"*.billing\"", "\"billing\"", "calls[2]"),
        ("\"*.billing\"", "\"*.Billing\"", "calls[2]"),
        (
            "mode = \"sampled\"",
            "mode = \"verbose\"",
            "access_log.mode",
        ),
    ] {
        let err = AgentConfig::from_toml(&text.replacen(from, to, 1)).unwrap_err();
        assert!(err.to_string().contains(field), "{to}: {err}");
    }
}

/// An echo app on `port` that stops when the returned token is cancelled.
async fn app_on(port: u16) -> CancellationToken {
    let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        loop {
            let (mut c, _) = tokio::select! {
                () = s.cancelled() => return,
                r = l.accept() => r.unwrap(),
            };
            tokio::spawn(async move {
                let (mut r, mut w) = c.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    stop
}

#[tokio::test]
async fn an_app_failing_its_health_check_gets_no_callers_until_it_recovers() {
    let pki = Pki::new("trellis.local");
    let tmp = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let app = app_on(port).await;
    let mut svc = local(&pki, tmp.path(), "east", "catalog", port);
    svc.health = Some(HealthCheck {
        kind: HealthKind::Tcp,
        path: "/".into(),
        command: vec![],
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(50),
        unhealthy_threshold: 2,
        healthy_threshold: 1,
    });
    let ((inbound, s_stop), admin) = start_with_admin(agent_config("east", vec![svc])).await;
    let addr = loopback();
    let mut cfg = agent_config(
        "east",
        vec![local(&pki, tmp.path(), "east", "frontend", 18000)],
    );
    cfg.upstreams = vec![Upstream {
        name: "catalog".into(),
        namespace: "shop".into(),
        address: addr,
        ports: vec![port],
        identities: vec!["spiffe://trellis.local/ns/shop/sa/catalog".into()],
        endpoints: vec![inbound],
        zones: vec![],
        protocol: Default::default(),
        port_protocols: Default::default(),
    }];
    let (_, c_stop) = start(cfg).await;
    let via = SocketAddr::new(addr, port);
    assert_eq!(call(via, b"up").await.unwrap(), b"up");

    // The app goes away: after two failed checks the sidecar refuses callers.
    app.cancel();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let m = metrics(admin).await;
        if m.contains(r#"outcome="unhealthy""#) {
            break;
        }
        let _ = call(via, b"?").await;
        assert!(
            tokio::time::Instant::now() < deadline,
            "never marked unhealthy: {m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // It comes back: one good check and callers get through again.
    let _app = app_on(port).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while call(via, b"back").await.ok().as_deref() != Some(&b"back"[..]) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never healthy again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s_stop.cancel();
    c_stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_a_continuous_request_stream_with_no_failures() {
    let pki = Pki::new("trellis.local");
    let tmp = tempfile::tempdir().unwrap();
    let app = tcp_echo().await;
    let mut server = agent_config(
        "east",
        vec![local(&pki, tmp.path(), "east", "catalog", app.port())],
    );
    server.credentials_poll = Duration::from_millis(50);
    let (inbound, s_stop) = start(server).await;
    let addr = loopback();
    let mut client = agent_config(
        "east",
        vec![local(&pki, tmp.path(), "east", "frontend", 18000)],
    );
    client.credentials_poll = Duration::from_millis(50);
    client.upstreams = vec![Upstream {
        name: "catalog".into(),
        namespace: "shop".into(),
        address: addr,
        ports: vec![app.port()],
        identities: vec!["spiffe://trellis.local/ns/shop/sa/catalog".into()],
        endpoints: vec![inbound],
        zones: vec![],
        protocol: Default::default(),
        port_protocols: Default::default(),
    }];
    let (_, c_stop) = start(client).await;
    let via = SocketAddr::new(addr, app.port());

    // Requests run back to back while both sides' certificates are replaced
    // five times (each rewrite is a new key and serial).
    let stop = CancellationToken::new();
    let load = tokio::spawn({
        let stop = stop.clone();
        async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.is_cancelled() {
                match call(via, b"ping").await {
                    Ok(v) if v == b"ping" => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
            }
            (ok, failed)
        }
    });
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        local(&pki, tmp.path(), "east", "catalog", app.port());
        local(&pki, tmp.path(), "east", "frontend", 18000);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.cancel();
    let (ok, failed) = load.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        failed.first()
    );
    assert!(ok > 50, "only {ok} requests ran");

    // And the rotation really happened: the server now presents the last
    // certificate written.
    let (latest, bundle) = trellis_ca::load_credentials(&tmp.path().join("east-catalog")).unwrap();
    let want = latest.leaf_info().unwrap().serial;
    let cfg = trellis_ca::tls::client_config(
        trellis_ca::tls::CertSource::new(pki.workload("east", "shop", "probe")).unwrap(),
        trellis_ca::tls::TrustStore::new(bundle),
        trellis_ca::tls::PeerPolicy::TrustDomain,
    )
    .unwrap();
    let tcp = TcpStream::connect(inbound).await.unwrap();
    let sni = format!("{}.catalog.shop.east.mesh", app.port());
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(rustls_pki_types::ServerName::try_from(sni).unwrap(), tcp)
        .await
        .unwrap();
    let served = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(trellis_ca::CertInfo::parse(&served).unwrap().serial, want);
    s_stop.cancel();
    c_stop.cancel();
}
