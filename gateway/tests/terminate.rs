//! A gateway terminating for a plain service (no sidecar at the app), on
//! loopback with real TLS, QUIC and HTTP/2: what a caller's sidecar sees,
//! and what a peer that names one service and asks the handshake for
//! another gets.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use trellis_ca::SpiffeId;
use trellis_ca::tls::{self, CertSource, PeerPolicy, TrustStore};
use trellis_gateway::testing::{Pki, Running, config, peer_endpoint, service, tcp_echo};
use trellis_gateway::tunnel::{Decoded, Header, Reply, ReplyCode};
use trellis_proxy::hbone;

/// West's gateway, terminating for `ledger.shop` (the TCP echo `app`).
async fn west(pki: &Pki, app: SocketAddr) -> Running {
    let mut cfg = config("west", "127.0.0.1:0".parse().unwrap());
    let mut ledger = service("ledger", &["east"], vec![SocketAddr::new(app.ip(), 0)]);
    ledger.plain_ports = vec![app.port()];
    cfg.services = vec![ledger];
    Running::start(cfg, pki.gateway("west", "gw1"), pki.bundle()).await
}

/// A client TLS config for east's frontend that admits only `peer`,
/// offering the pooled protocol.
fn frontend(pki: &Pki, peer: SpiffeId) -> TlsConnector {
    let mut cfg = tls::client_config(
        CertSource::new(pki.workload("east", "shop", "frontend")).unwrap(),
        TrustStore::new(pki.bundle()),
        PeerPolicy::AllowList(vec![peer]),
    )
    .unwrap();
    cfg.alpn_protocols = vec![hbone::ALPN.to_vec()];
    TlsConnector::from(Arc::new(cfg))
}

#[tokio::test]
async fn a_plain_service_is_answered_by_its_gateway_over_the_pooled_protocol() {
    let pki = Pki::new("trellis.local");
    let app = tcp_echo().await;
    let gw = west(&pki, app).await;
    let sni = format!("{}.ledger.shop.west.mesh", app.port());
    let gateway_id: SpiffeId = "spiffe://trellis.local/zone/west/gateway/gw1"
        .parse()
        .unwrap();

    // The caller admits the gateway's identity, and the gateway answers
    // with it (a sidecar's identity is not there to answer).
    let tcp = TcpStream::connect(gw.addrs.tcp).await.unwrap();
    let tls = frontend(&pki, gateway_id.clone())
        .connect(ServerName::try_from(sni.clone()).unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(
        tls::peer_id(tls.get_ref().1.peer_certificates()),
        Some(gateway_id)
    );
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(hbone::ALPN));
    let (mut send, conn) = hbone::client_builder()
        .handshake::<_, Empty<Bytes>>(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);

    // Two CONNECT streams on the one connection, each spliced to the app.
    for msg in [&b"first"[..], &[7u8; 70_000][..]] {
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(hbone::connect_authority(&sni, app.port()))
            .body(Empty::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut io = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
        io.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        io.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg);
    }
    // A stream that names another authority than the connection's is refused.
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(format!(
            "{}.other.shop.west.mesh:{}",
            app.port(),
            app.port()
        ))
        .body(Empty::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

    // A caller that admits only the service's workload identity fails the
    // handshake: the gateway answers for a plain service, never as it.
    let tcp = TcpStream::connect(gw.addrs.tcp).await.unwrap();
    let workload = pki.td.workload("shop", "ledger").unwrap();
    assert!(
        frontend(&pki, workload)
            .connect(ServerName::try_from(sni.clone()).unwrap(), tcp)
            .await
            .is_err()
    );

    // A port that is not one of the service's is refused before any TLS.
    let other = format!("{}.ledger.shop.west.mesh", app.port().wrapping_add(1));
    let tcp = TcpStream::connect(gw.addrs.tcp).await.unwrap();
    assert!(
        frontend(
            &pki,
            "spiffe://trellis.local/zone/west/gateway/gw1"
                .parse()
                .unwrap()
        )
        .connect(ServerName::try_from(other).unwrap(), tcp)
        .await
        .is_err()
    );

    let m = gw.metrics().await;
    assert!(
        m.contains(r#"trellis_gateway_streams_total{direction="terminated",peer_zone="west",service="ledger.shop",outcome="accepted"} 2"#),
        "{m}"
    );
    assert!(
        m.contains(r#"trellis_gateway_streams_total{direction="terminated",peer_zone="west",service="ledger.shop",outcome="not_served"} 1"#),
        "{m}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_peer_that_names_one_service_and_asks_the_handshake_for_another_is_cut_off() {
    let pki = Pki::new("trellis.local");
    let app = tcp_echo().await;
    let gw = west(&pki, app).await;

    // East's gateway opens a stream for ledger, as for a caller of east...
    let conn = peer_endpoint(&pki, "east")
        .connect(gw.addrs.quic, "gateway.west.mesh")
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let header = Header {
        service: "ledger".into(),
        namespace: "shop".into(),
        port: app.port(),
        source_zone: "east".into(),
        traceparent: None,
        subset: None,
        zone: None,
    };
    send.write_all(&header.encode().unwrap()).await.unwrap();
    let mut buf = Vec::new();
    let reply = loop {
        let mut b = [0u8; 1];
        recv.read_exact(&mut b).await.unwrap();
        buf.push(b[0]);
        if let Decoded::Complete { value, .. } = Reply::decode(&buf).unwrap() {
            break value;
        }
    };
    assert_eq!(reply.code, ReplyCode::Accepted, "{}", reply.reason);

    // ...but the caller's handshake inside it names another service: the
    // gateway ends the connection without serving a byte.
    let gateway_id = "spiffe://trellis.local/zone/west/gateway/gw1"
        .parse()
        .unwrap();
    let stream = tokio::io::join(recv, send);
    let sni = format!("{}.billing.shop.west.mesh", app.port());
    let tls = frontend(&pki, gateway_id)
        .connect(ServerName::try_from(sni).unwrap(), stream)
        .await;
    if let Ok(mut tls) = tls {
        let _ = tls.write_all(b"anything").await;
        let mut back = [0u8; 8];
        assert!(
            !matches!(tls.read(&mut back).await, Ok(n) if n > 0),
            "served a stream whose handshake named another service"
        );
    }
    let m = gw.metrics().await;
    assert!(
        m.contains(r#"trellis_gateway_streams_total{direction="terminated",peer_zone="east",service="ledger.shop",outcome="not_served"} 1"#),
        "{m}"
    );
    conn.close(0u32.into(), b"done");
    gw.stop().await;
}
