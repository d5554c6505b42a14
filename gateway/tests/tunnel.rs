//! Gateways on loopback with real QUIC and real TLS: two zones, east and
//! west, and the traffic a zone's workloads send through them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rustls_pki_types::ServerName;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use trellis_ca::tls::{self, CertSource, PeerPolicy, TrustStore};
use trellis_ca::{Credentials, RoleKind, TrustBundle};
use trellis_gateway::Gateway;
use trellis_gateway::config::{GatewayConfig, Transport};
use trellis_gateway::testing::{
    Pki, Running, config, pair, peer, raw_connect, service, tcp_echo, tls_echo,
};
use trellis_gateway::tunnel::{Decoded, Header, Reply, ReplyCode};

/// A plain TCP server that reads to EOF, then answers with the SHA-256 of
/// everything it got followed by `extra` bytes, then closes.
async fn hash_server(extra: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut h = Sha256::new();
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => h.update(&buf[..n]),
                        Err(_) => return,
                    }
                }
                let digest = h.finalize();
                let _ = s.write_all(&digest).await;
                let _ = s.write_all(&vec![7u8; extra]).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn mtls_end_to_end_through_the_gateway_pair() {
    let pki = Pki::new("trellis.local");
    let backend = tls_echo(&pki, "west", "catalog").await;
    let (east, west) = pair(
        &pki,
        vec![service("catalog", &["*"], vec![backend])],
        Transport::Quic,
    )
    .await;

    // The workload client verifies that the far end is catalog's identity:
    // the gateways in between see only ciphertext.
    let catalog = pki.td.workload("shop", "catalog").unwrap();
    let cfg = tls::client_config(
        CertSource::new(pki.workload("east", "shop", "frontend")).unwrap(),
        TrustStore::new(pki.bundle()),
        PeerPolicy::AllowList(vec![catalog.clone()]),
    )
    .unwrap();
    let tcp = TcpStream::connect(east.addrs.tcp).await.unwrap();
    let mut t = TlsConnector::from(Arc::new(cfg))
        .connect(
            ServerName::try_from("8080.catalog.shop.west.mesh").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    assert_eq!(
        tls::peer_id(t.get_ref().1.peer_certificates()),
        Some(catalog)
    );
    for msg in [&b"hello"[..], &[42u8; 100_000][..]] {
        t.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        t.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg);
    }
    let m = east.metrics().await;
    assert!(
        m.contains(r#"trellis_gateway_streams_total{direction="outbound",peer_zone="west",service="catalog.shop",outcome="accepted"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"trellis_gateway_peer_streams_total{peer_zone="west",transport="quic"} 1"#),
        "{m}"
    );
    drop(t);
    east.stop().await;
    west.stop().await;
}

/// 1 GiB through one stream; SHA-256 computed at both ends.
async fn one_gib(transport: Transport) {
    let pki = Pki::new("trellis.local");
    let backend = hash_server(0).await;
    let (east, west) = pair(
        &pki,
        vec![service("bulk", &["east"], vec![backend])],
        transport,
    )
    .await;
    let (mut s, hello) = raw_connect(east.addrs.tcp, "9000.bulk.shop.west.mesh").await;
    let mut sent = Sha256::new();
    sent.update(&hello);
    let mut rng = fastrand::Rng::with_seed(1);
    let mut chunk = vec![0u8; 1 << 20];
    let (mut r, mut w) = s.split();
    let writer = async {
        for _ in 0..1024 {
            rng.fill(&mut chunk);
            sent.update(&chunk);
            w.write_all(&chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
        sent.finalize()
    };
    let reader = async {
        let mut digest = Vec::new();
        r.read_to_end(&mut digest).await.unwrap();
        digest
    };
    let (sent, got) = tokio::join!(writer, reader);
    assert_eq!(got, sent.to_vec(), "SHA-256 differs between the two ends");
    east.stop().await;
    west.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_through_one_quic_stream_arrives_intact() {
    one_gib(Transport::Quic).await;
}

#[tokio::test]
async fn half_close_still_gets_the_full_reply_on_both_transports() {
    for transport in [Transport::Quic, Transport::Tcp] {
        let pki = Pki::new("trellis.local");
        let backend = hash_server(300_000).await;
        let (east, west) = pair(
            &pki,
            vec![service("hash", &["*"], vec![backend])],
            transport,
        )
        .await;
        let (mut s, hello) = raw_connect(east.addrs.tcp, "80.hash.shop.west.mesh").await;
        s.write_all(b"request body").await.unwrap();
        s.shutdown().await.unwrap();
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).await.unwrap();
        let mut want = Sha256::new();
        want.update(&hello);
        want.update(b"request body");
        assert_eq!(reply.len(), 32 + 300_000, "{transport:?}");
        assert_eq!(&reply[..32], &want.finalize()[..], "{transport:?}");
        east.stop().await;
        west.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_streams_share_one_connection() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let pki = Pki::new("trellis.local");
    let backend = tcp_echo().await;
    // Pair with a connect timeout that two busy cores running 2,000 sockets can meet.
    let mut w = config("west", "127.0.0.1:0".parse().unwrap());
    w.services = vec![service("echo", &["*"], vec![backend])];
    w.connect_timeout = Duration::from_secs(5);
    let west = Running::start(w, pki.gateway("west", "gw1"), pki.bundle()).await;
    let mut e = config("east", "127.0.0.1:0".parse().unwrap());
    e.peers = vec![peer("west", west.addrs.tcp, Transport::Quic)];
    e.connect_timeout = Duration::from_secs(5);
    let east = Running::start(e, pki.gateway("east", "gw1"), pki.bundle()).await;
    let gw = east.addrs.tcp;
    let tasks: Vec<_> = (0..1000u32)
        .map(|i| {
            tokio::spawn(async move {
                let (mut s, hello) = raw_connect(gw, "7.echo.shop.west.mesh").await;
                let msg = format!("stream {i} says hello").repeat(50);
                s.write_all(msg.as_bytes()).await?;
                s.shutdown().await?;
                let mut back = Vec::new();
                s.read_to_end(&mut back).await?;
                let mut want = hello;
                want.extend_from_slice(msg.as_bytes());
                if back != want {
                    bail!(
                        "stream {i}: got {} bytes, wanted {}",
                        back.len(),
                        want.len()
                    );
                }
                Ok(())
            })
        })
        .collect();
    let mut failed = Vec::new();
    for t in tasks {
        if let Err(e) = t.await.unwrap() {
            failed.push(e.to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{} streams failed, e.g. {:?}\n{}",
        failed.len(),
        failed.first(),
        east.metrics().await
    );
    let m = east.metrics().await;
    assert!(
        m.contains(r#"trellis_gateway_peer_streams_total{peer_zone="west",transport="quic"} 1000"#),
        "{m}"
    );
    // One QUIC link carried them all: west saw one peer connection.
    let wm = west.metrics().await;
    assert!(wm.contains(r#"outcome="accepted"} 1000"#), "{wm}");
    east.stop().await;
    west.stop().await;
}

/// A raw QUIC client presenting `creds`, as a (possibly hostile) peer would.
async fn raw_quic(
    creds: Credentials,
    trust: TrustBundle,
    to: SocketAddr,
) -> Result<quinn::Connection> {
    let mut cfg = tls::client_config(
        CertSource::new(creds)?,
        TrustStore::new(trust),
        PeerPolicy::Roles(vec![RoleKind::Gateway]),
    )?;
    cfg.alpn_protocols = vec![trellis_gateway::ALPN_TUNNEL.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(cfg))?;
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = tokio::time::timeout(
        Duration::from_secs(5),
        ep.connect(to, "gateway.west.mesh")?.into_future(),
    )
    .await
    .context("handshake timed out")??;
    // The server judges our certificate after we finish: wait for its verdict.
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(
        &Header {
            service: "probe".into(),
            namespace: "shop".into(),
            port: 80,
            source_zone: "east".into(),
            traceparent: None,
            subset: None,
            zone: None,
        }
        .encode()?,
    )
    .await?;
    let mut b = [0u8; 3];
    tokio::time::timeout(Duration::from_secs(5), recv.read_exact(&mut b))
        .await
        .context("no reply")??;
    Ok(conn)
}

#[tokio::test]
async fn peers_with_the_wrong_identity_are_refused_at_the_handshake() {
    let pki = Pki::new("trellis.local");
    let west = Running::start(
        config("west", "127.0.0.1:0".parse().unwrap()),
        pki.gateway("west", "gw1"),
        pki.bundle(),
    )
    .await;
    let to = west.addrs.quic;

    // Control: a real east gateway identity gets through.
    raw_quic(pki.gateway("east", "gw1"), pki.bundle(), to)
        .await
        .unwrap();

    let other_ca = Pki::new("trellis.local");
    let err = raw_quic(other_ca.gateway("east", "gw1"), pki.bundle(), to)
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").to_lowercase().contains("certificate"),
        "{err:#}"
    );

    let other_td = Pki::new("other.example");
    let both = TrustBundle::new(
        pki.td.clone(),
        vec![pki.root.cert().clone(), other_td.root.cert().clone()],
    )
    .unwrap();
    let west2 = Running::start(
        config("west", "127.0.0.1:0".parse().unwrap()),
        pki.gateway("west", "gw2"),
        both.clone(),
    )
    .await;
    let err = raw_quic(other_td.gateway("east", "gw1"), both, west2.addrs.quic)
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").to_lowercase().contains("certificate"),
        "{err:#}"
    );

    let err = raw_quic(pki.workload("east", "shop", "frontend"), pki.bundle(), to)
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").to_lowercase().contains("certificate"),
        "{err:#}"
    );

    // And the other way: an east gateway dialling an impostor "west" refuses it.
    let impostor = Running::start(
        config("west", "127.0.0.1:0".parse().unwrap()),
        other_ca.gateway("west", "gw1"),
        other_ca.bundle(),
    )
    .await;
    let mut e = config("east", "127.0.0.1:0".parse().unwrap());
    e.peers = vec![peer("west", impostor.addrs.tcp, Transport::Quic)];
    let east = Running::start(e, pki.gateway("east", "gw1"), pki.bundle()).await;
    let (mut s, _) = raw_connect(east.addrs.tcp, "80.catalog.shop.west.mesh").await;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    assert!(buf.is_empty());
    let m = east.metrics().await;
    assert!(
        m.contains(
            r#"trellis_gateway_handshake_failures_total{peer_zone="west",transport="quic"}"#
        ),
        "{m}"
    );
    for g in [west, west2, impostor, east] {
        g.stop().await;
    }
}

async fn ask(conn: &quinn::Connection, header: &Header) -> Reply {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&header.encode().unwrap()).await.unwrap();
    let mut buf = Vec::new();
    loop {
        let mut b = [0u8; 1];
        recv.read_exact(&mut b).await.unwrap();
        buf.push(b[0]);
        if let Decoded::Complete { value, .. } = Reply::decode(&buf).unwrap() {
            return value;
        }
    }
}

#[tokio::test]
async fn refusals_come_back_with_their_reason_code() {
    let pki = Pki::new("trellis.local");
    let mut w = config("west", "127.0.0.1:0".parse().unwrap());
    w.services = vec![
        service("catalog", &["north"], vec![tcp_echo().await]),
        service("empty", &["*"], vec![]),
        service("dead", &["*"], vec!["127.0.0.1:9".parse().unwrap()]),
    ];
    let west = Running::start(w, pki.gateway("west", "gw1"), pki.bundle()).await;
    let conn = raw_quic(pki.gateway("east", "gw1"), pki.bundle(), west.addrs.quic)
        .await
        .unwrap();
    let h = |service: &str, zone: &str| Header {
        service: service.into(),
        namespace: "shop".into(),
        port: 80,
        source_zone: zone.into(),
        traceparent: None,
        subset: None,
        zone: None,
    };
    let cases = [
        (h("catalog", "east"), ReplyCode::NotExported),
        (h("nothing", "east"), ReplyCode::UnknownService),
        (h("empty", "east"), ReplyCode::NoHealthyEndpoint),
        (h("dead", "east"), ReplyCode::UpstreamFailed),
        // An east gateway may not speak for north.
        (h("catalog", "north"), ReplyCode::Forbidden),
        // Nor have west relay a stream to a zone that is no edge of west's:
        // relaying is for edge zones only, not a way around north's gateways.
        (
            Header {
                zone: Some("north".into()),
                ..h("catalog", "east")
            },
            ReplyCode::Forbidden,
        ),
    ];
    for (header, want) in cases {
        let reply = ask(&conn, &header).await;
        assert_eq!(reply.code, want, "{header}: {}", reply.reason);
        assert!(!reply.reason.is_empty());
        if header.zone.is_some() {
            assert!(reply.reason.contains("relays only"), "{}", reply.reason);
        }
    }
    // A malformed header is answered with a protocol error and counted.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[1, 0, 3, 0, 0, 0]).await.unwrap();
    let mut b = vec![];
    recv.read_to_end(1024).await.map(|v| b = v).unwrap();
    assert_eq!(b[1], 7, "protocol_error code");
    let m = west.metrics().await;
    assert!(m.contains("trellis_gateway_protocol_errors_total 1"), "{m}");
    assert!(
        m.contains(r#"service="catalog.shop",outcome="not_exported"} 1"#),
        "{m}"
    );
    west.stop().await;
}

/// Accepts TCP on an address whose UDP side swallows every datagram, and
/// relays TCP to `to`: QUIC to it fails, TCP gets through.
async fn udp_blackhole_tcp_relay(to: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let udp = UdpSocket::bind(addr).await.unwrap();
    tokio::spawn(async move {
        let mut b = [0u8; 2048];
        while udp.recv_from(&mut b).await.is_ok() {}
    });
    tokio::spawn(async move {
        while let Ok((mut a, _)) = l.accept().await {
            tokio::spawn(async move {
                if let Ok(mut b) = TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn with_quic_blocked_traffic_flows_over_the_tcp_fallback() {
    let pki = Pki::new("trellis.local");
    let mut w = config("west", "127.0.0.1:0".parse().unwrap());
    w.services = vec![service("echo", &["*"], vec![tcp_echo().await])];
    let west = Running::start(w, pki.gateway("west", "gw1"), pki.bundle()).await;
    let relay = udp_blackhole_tcp_relay(west.addrs.tcp).await;
    let mut e = config("east", "127.0.0.1:0".parse().unwrap());
    e.peers = vec![peer("west", relay, Transport::Auto)];
    let east = Running::start(e, pki.gateway("east", "gw1"), pki.bundle()).await;

    for i in 0..3 {
        let (mut s, hello) = raw_connect(east.addrs.tcp, "7.echo.shop.west.mesh").await;
        s.write_all(b"over tcp").await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.unwrap();
        assert_eq!(&back[hello.len()..], b"over tcp", "stream {i}");
    }
    let m = east.metrics().await;
    assert!(
        m.contains(r#"trellis_gateway_peer_streams_total{peer_zone="west",transport="tcp"} 3"#),
        "{m}"
    );
    assert!(
        m.contains(
            r#"trellis_gateway_handshake_failures_total{peer_zone="west",transport="quic"} 1"#
        ),
        "{m}"
    );
    east.stop().await;
    west.stop().await;
}

async fn echo_once(gw: SocketAddr) -> Result<()> {
    let (mut s, hello) = raw_connect(gw, "7.echo.shop.west.mesh").await;
    s.write_all(b"ping").await?;
    s.shutdown().await?;
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut back)).await??;
    if back.get(hello.len()..) != Some(&b"ping"[..]) {
        bail!("got {} bytes back", back.len());
    }
    Ok(())
}

/// Runs a gateway on a runtime of its own, so that dropping the runtime kills
/// it the way `kill -9` would: every task and socket gone at once.
fn start_on_own_runtime(
    cfg: GatewayConfig,
    creds: Credentials,
    bundle: TrustBundle,
) -> tokio::runtime::Runtime {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let gw = rt.block_on(Gateway::bind(cfg, creds, bundle)).unwrap();
    rt.spawn(async move { gw.run(CancellationToken::new()).await.unwrap() });
    rt
}

#[test]
fn a_restarted_peer_is_reconnected_without_operator_action() {
    let main = tokio::runtime::Runtime::new().unwrap();
    let pki = Pki::new("trellis.local");
    let backend = main.block_on(tcp_echo());
    // West restarts on its port, so that port must stay free while it is
    // down: take one below the ephemeral range, where no other test's
    // port-0 socket can land.
    let mut w = config("west", "127.0.0.1:0".parse().unwrap());
    w.services = vec![service("echo", &["*"], vec![backend])];
    let west = (0..50)
        .find_map(|_| {
            w.listen = SocketAddr::from(([127, 0, 0, 1], fastrand::u16(20_000..30_000)));
            let gw = main
                .block_on(Gateway::bind(
                    w.clone(),
                    pki.gateway("west", "gw1"),
                    pki.bundle(),
                ))
                .ok()?;
            let addrs = gw.addrs().unwrap();
            let stop = CancellationToken::new();
            let s = stop.clone();
            let task = main.spawn(async move { gw.run(s).await.unwrap() });
            Some(Running { addrs, stop, task })
        })
        .expect("no free port in 20000..30000");
    let west_addr = west.addrs.tcp;
    let mut e = config("east", "127.0.0.1:0".parse().unwrap());
    e.peers = vec![peer("west", west_addr, Transport::Quic)];
    let east = main.block_on(Running::start(e, pki.gateway("east", "gw1"), pki.bundle()));
    main.block_on(echo_once(east.addrs.tcp)).unwrap();

    // Graceful restart on the same port: west says goodbye, east re-dials.
    main.block_on(west.stop());
    let west = start_on_own_runtime(w.clone(), pki.gateway("west", "gw1"), pki.bundle());
    main.block_on(echo_once(east.addrs.tcp)).unwrap();

    // Abrupt death: no goodbye, so east only learns of it when its next
    // stream goes unanswered; it must replace the dead link by itself.
    drop(west);
    let west = start_on_own_runtime(w, pki.gateway("west", "gw1"), pki.bundle());
    main.block_on(echo_once(east.addrs.tcp)).unwrap();
    main.block_on(east.stop());
    drop(west);
}

#[tokio::test]
async fn drain_lets_open_streams_finish_and_refuses_new_ones() {
    let pki = Pki::new("trellis.local");
    let backend = tcp_echo().await;
    let (east, west) = pair(
        &pki,
        vec![service("echo", &["*"], vec![backend])],
        Transport::Quic,
    )
    .await;
    let (mut s, hello) = raw_connect(east.addrs.tcp, "7.echo.shop.west.mesh").await;
    let mut back = vec![0u8; hello.len()];
    s.read_exact(&mut back).await.unwrap();

    west.stop.cancel();
    // The stream opened before the drain keeps working within the deadline.
    s.write_all(b"still open").await.unwrap();
    let mut buf = [0u8; 10];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still open");
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), west.task)
        .await
        .unwrap()
        .unwrap();
    east.stop().await;
}

#[tokio::test]
async fn the_example_config_loads() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../configs/gateway.toml"
    ))
    .unwrap();
    let cfg = GatewayConfig::from_toml(&text).unwrap();
    assert_eq!(cfg.zone, "east");
    assert!(!cfg.peers.is_empty() && !cfg.services.is_empty());
    assert_ne!(cfg.zone_listen, Some(cfg.listen));
    let ledger = cfg.services.iter().find(|s| s.name == "ledger").unwrap();
    assert_eq!(ledger.plain_ports, [5432]);
    // Its own zone's callers come through the gateway too.
    assert_eq!(ledger.export_to, ["west", "east"]);
    // A plain service's port 0 endpoints are addresses; a sidecar's are not.
    let sidecar = text.replacen("10.1.0.11:15006", "10.1.0.11:0", 1);
    let err = GatewayConfig::from_toml(&sidecar).unwrap_err();
    assert!(
        err.to_string().contains("services[0].endpoints[0]"),
        "{err}"
    );
    // Strict keys: a typo in the example would be refused, not ignored.
    let typo = text.replacen("drain_deadline", "drain_dedline", 1);
    let err = GatewayConfig::from_toml(&typo).unwrap_err();
    assert!(err.to_string().contains("unknown field"), "{err}");
}

#[tokio::test]
async fn renewed_credentials_on_disk_are_served_to_new_peers() {
    let pki = Pki::new("trellis.local");
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("west-gw");
    trellis_ca::write_credentials(&prefix, &pki.gateway("west", "gw1"), &pki.bundle()).unwrap();
    let mut w = config("west", "127.0.0.1:0".parse().unwrap());
    w.credentials = prefix.clone();
    w.credentials_poll = Duration::from_millis(100);
    let gw = Gateway::from_config(w).await.unwrap();
    let quic = gw.addrs().unwrap().quic;
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { gw.run(stop).await.unwrap() }
    });
    let serial = |c: &quinn::Connection| {
        let certs = c
            .peer_identity()
            .unwrap()
            .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
            .unwrap();
        trellis_ca::CertInfo::parse(&certs[0]).unwrap().serial
    };
    let old = raw_quic(pki.gateway("east", "gw1"), pki.bundle(), quic)
        .await
        .unwrap();

    let renewed = pki.gateway("west", "gw1");
    let want = renewed.leaf_info().unwrap().serial;
    trellis_ca::write_credentials(&prefix, &renewed, &pki.bundle()).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let c = raw_quic(pki.gateway("east", "gw1"), pki.bundle(), quic)
            .await
            .unwrap();
        if serial(&c) == want {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "renewed certificate never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The connection made before the swap is still up.
    assert!(old.close_reason().is_none());
    assert_ne!(serial(&old), want);
    stop.cancel();
    task.await.unwrap();
}

/// A backend that reads a little, then resets the connection.
async fn resetting_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut b = [0u8; 16];
            let _ = s.read(&mut b).await;
            s.write_all(b"partial").await.unwrap();
            s.set_zero_linger().unwrap();
            drop(s);
        }
    });
    addr
}

#[tokio::test]
async fn a_backend_reset_reaches_the_caller_as_an_error_not_a_clean_end() {
    let pki = Pki::new("trellis.local");
    let backend = resetting_backend().await;
    let (east, west) = pair(
        &pki,
        vec![service("flaky", &["*"], vec![backend])],
        Transport::Quic,
    )
    .await;
    let (mut s, _) = raw_connect(east.addrs.tcp, "80.flaky.shop.west.mesh").await;
    let mut got = Vec::new();
    let res = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .expect("the caller was left hanging");
    let err = res.expect_err("a reset upstream was passed off as a complete response");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    east.stop().await;
    west.stop().await;
}
