//! The gateway's unauthenticated surface, over real sockets: how long a
//! connection may take to say who it is, how many may be doing so at once,
//! QUIC address validation, and which port the zone's workloads may use.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use trellis_ca::tls;
use trellis_gateway::config::Transport;
use trellis_gateway::testing::{
    Pki, Running, client_hello, config, peer, raw_connect, service, tcp_echo,
};

/// Reads until the gateway closes the connection; how long that took, or
/// `None` if it was still open after `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = vec![0u8; 16 * 1024];
    let read_to_end = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, read_to_end)
        .await
        .ok()
        .map(|()| start.elapsed())
}

/// Whether the gateway closed `s` without a byte (within 5 s).
async fn refused(s: &mut TcpStream) -> bool {
    let mut back = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut back)).await;
    ended.is_ok() && back.is_empty()
}

/// A gateway of zone west with a 1 s handshake timeout and room for
/// `max_handshakes` handshakes at once.
async fn west(pki: &Pki, max_handshakes: usize) -> Running {
    let mut w = config("west", "127.0.0.1:0".parse().unwrap());
    w.handshake_timeout = Duration::from_secs(1);
    w.max_handshakes = max_handshakes;
    Running::start(w, pki.gateway("west", "gw1"), pki.bundle()).await
}

#[tokio::test]
async fn a_client_that_sends_nothing_is_dropped_after_the_handshake_timeout() {
    let pki = Pki::new("trellis.local");
    let west = west(&pki, 16).await;
    let mut s = TcpStream::connect(west.addrs.tcp).await.unwrap();
    let took = closed_within(&mut s, Duration::from_secs(5))
        .await
        .expect("a silent client was still connected after 5 s");
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");
    let m = west.metrics().await;
    assert!(
        m.contains(r#"trellis_gateway_handshake_timeouts_total{transport="tcp"} 1"#),
        "{m}"
    );
    west.stop().await;
}

#[tokio::test]
async fn a_fallback_peer_that_stalls_mid_handshake_is_dropped() {
    let pki = Pki::new("trellis.local");
    let west = west(&pki, 16).await;
    // A ClientHello for the peers' fallback (the gateway answers it with its
    // own flight and waits for ours), then nothing: the TLS accept itself
    // must give up, not only the read of the ClientHello.
    let mut s = TcpStream::connect(west.addrs.tcp).await.unwrap();
    s.write_all(&client_hello("gateway.west.mesh"))
        .await
        .unwrap();
    let took = closed_within(&mut s, Duration::from_secs(5))
        .await
        .expect("a stalled fallback handshake was still open after 5 s");
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");
    let m = west.metrics().await;
    assert!(
        m.contains(r#"trellis_gateway_handshake_timeouts_total{transport="tcp"} 1"#),
        "{m}"
    );
    west.stop().await;
}

#[tokio::test]
async fn past_max_handshakes_new_connections_are_closed_at_once() {
    let pki = Pki::new("trellis.local");
    let mut w = config("west", "127.0.0.1:0".parse().unwrap());
    w.max_handshakes = 2;
    let west = Running::start(w, pki.gateway("west", "gw1"), pki.bundle()).await;

    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(TcpStream::connect(west.addrs.tcp).await.unwrap());
    }
    // Let the gateway accept both before the third arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = TcpStream::connect(west.addrs.tcp).await.unwrap();
    let took = closed_within(&mut third, Duration::from_secs(2))
        .await
        .expect("the connection past max_handshakes was not closed");
    assert!(took < Duration::from_millis(500), "closed after {took:?}");
    for s in &mut held {
        assert_eq!(
            closed_within(s, Duration::from_millis(200)).await,
            None,
            "a connection within the cap was closed"
        );
    }
    let m = west.metrics().await;
    assert!(
        m.contains(r#"trellis_gateway_handshakes_refused_total{transport="tcp"} 1"#),
        "{m}"
    );

    // Slots come back when handshakes end (here: the clients leave).
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = TcpStream::connect(west.addrs.tcp).await.unwrap();
    assert_eq!(
        closed_within(&mut again, Duration::from_millis(300)).await,
        None
    );
    west.stop().await;
}

/// Relays UDP between one client and `to`, noting whether any datagram from
/// `to` was a QUIC Retry (long header, type 3: first byte `0b1111_xxxx`).
async fn retry_spy(to: SocketAddr) -> (SocketAddr, Arc<AtomicBool>) {
    let front = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let back = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    back.connect(to).await.unwrap();
    let addr = front.local_addr().unwrap();
    let saw_retry = Arc::new(AtomicBool::new(false));
    let seen = saw_retry.clone();
    tokio::spawn(async move {
        let mut client = None;
        let (mut a, mut b) = (vec![0u8; 65536], vec![0u8; 65536]);
        loop {
            tokio::select! {
                r = front.recv_from(&mut a) => {
                    let Ok((n, from)) = r else { return };
                    client = Some(from);
                    let _ = back.send(&a[..n]).await;
                }
                r = back.recv(&mut b) => {
                    let Ok(n) = r else { return };
                    if n > 0 && b[0] & 0xf0 == 0xf0 {
                        seen.store(true, Ordering::SeqCst);
                    }
                    if let Some(c) = client {
                        let _ = front.send_to(&b[..n], c).await;
                    }
                }
            }
        }
    });
    (addr, saw_retry)
}

#[tokio::test]
async fn quic_clients_prove_their_address_with_a_retry_first() {
    let pki = Pki::new("trellis.local");
    let west = west(&pki, 16).await;
    let (spy, saw_retry) = retry_spy(west.addrs.quic).await;

    let ep = trellis_gateway::testing::peer_endpoint(&pki, "east");
    let conn = tokio::time::timeout(
        Duration::from_secs(5),
        ep.connect(spy, "gateway.west.mesh").unwrap(),
    )
    .await
    .expect("QUIC handshake through the spy timed out")
    .expect("a validated client completes its handshake");

    assert!(
        saw_retry.load(Ordering::SeqCst),
        "the gateway did handshake work for an unvalidated address"
    );
    let m = west.metrics().await;
    assert!(m.contains("trellis_gateway_quic_retries_total 1"), "{m}");
    conn.close(0u32.into(), b"done");
    west.stop().await;
}

/// A client-side certificate check that takes `0` to answer: the client's
/// half of the handshake stalls after the server's flight, as a slow or
/// hostile client's would.
#[derive(Debug)]
struct SlowVerifier(Duration, Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for SlowVerifier {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        // Blocks this client's own runtime thread, not the gateway's.
        std::thread::sleep(self.0);
        Err(rustls::Error::General("gave up".into()))
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used by QUIC".into()))
    }

    fn verify_tls13_signature(
        &self,
        msg: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            msg,
            cert,
            dss,
            &self.1.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.1.signature_verification_algorithms.supported_schemes()
    }
}

#[tokio::test]
async fn a_quic_handshake_that_stalls_is_dropped_after_the_timeout() {
    let pki = Pki::new("trellis.local");
    let west = west(&pki, 16).await;
    let to = west.addrs.quic;
    // The client runs on a runtime of its own: its verifier blocks a thread
    // for 4 s, past the gateway's 1 s handshake timeout.
    let client = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let provider = tls::provider();
            let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(SlowVerifier(
                    Duration::from_secs(4),
                    provider,
                )))
                .with_no_client_auth();
            cfg.alpn_protocols = vec![trellis_gateway::ALPN_TUNNEL.to_vec()];
            let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(cfg)).unwrap();
            let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
            let _ = ep.connect(to, "gateway.west.mesh").unwrap().await;
        });
    });
    let start = Instant::now();
    let want = r#"trellis_gateway_handshake_timeouts_total{transport="quic"} 1"#;
    loop {
        let m = west.metrics().await;
        if m.contains(want) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "no QUIC handshake timeout within 3 s: {m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::task::spawn_blocking(move || client.join().unwrap())
        .await
        .unwrap();
    west.stop().await;
}

#[tokio::test]
async fn with_zone_listen_workload_names_on_the_peer_port_are_refused() {
    let pki = Pki::new("trellis.local");
    // West serves `internal` (exported to west only) and `open` (to all).
    let mut w = config("west", "127.0.0.1:0".parse().unwrap());
    w.zone_listen = Some("127.0.0.1:0".parse().unwrap());
    let backend = tcp_echo().await;
    w.services = vec![
        service("internal", &["west"], vec![backend]),
        service("open", &["*"], vec![backend]),
    ];
    let west = Running::start(w, pki.gateway("west", "gw1"), pki.bundle()).await;
    let zone_port = west.addrs.zone.expect("zone_listen is bound");
    // East reaches west over the TCP fallback, on west's peer port.
    let mut e = config("east", "127.0.0.1:0".parse().unwrap());
    e.peers = vec![peer("west", west.addrs.tcp, Transport::Tcp)];
    let east = Running::start(e, pki.gateway("east", "gw1"), pki.bundle()).await;

    // Anyone reaching west's peer-facing port used to be taken for west:
    // `internal` (west only) and, through west, other zones' exports to west.
    for sni in ["80.internal.shop.west.mesh", "80.secret.shop.east.mesh"] {
        let (mut s, _) = raw_connect(west.addrs.tcp, sni).await;
        assert!(refused(&mut s).await, "{sni} got through the peer port");
    }
    let m = west.metrics().await;
    assert!(m.contains("trellis_gateway_misdirected_total 2"), "{m}");

    // The zone port serves the zone's workloads...
    let (mut s, hello) = raw_connect(zone_port, "80.internal.shop.west.mesh").await;
    s.write_all(b"from west").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    assert_eq!(&back[hello.len()..], b"from west");

    // ...and the peer port still serves peers, whose zone a certificate proves.
    let (mut s, hello) = raw_connect(east.addrs.tcp, "80.open.shop.west.mesh").await;
    s.write_all(b"from east").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    assert_eq!(&back[hello.len()..], b"from east");
    let (mut s, _) = raw_connect(east.addrs.tcp, "80.internal.shop.west.mesh").await;
    assert!(
        refused(&mut s).await,
        "east reached a service exported to west only"
    );
    east.stop().await;
    west.stop().await;
}
