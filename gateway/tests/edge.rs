//! Edge sites: an agent with no gateway of its own dials a gateway, and is
//! reached back over that one QUIC connection, even when its address changes.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use trellis_gateway::config::QuicSettings;
use trellis_gateway::edge::{EdgeConfig, EdgeLink};
use trellis_gateway::testing::{Pki, Running, config, raw_connect, service, tcp_echo};

async fn east_with_edge(pki: &Pki) -> Running {
    let mut e = config("east", "127.0.0.1:0".parse().unwrap());
    e.edge_zones = vec!["edge".into()];
    e.services = vec![service("catalog", &["edge"], vec![tcp_echo().await])];
    Running::start(e, pki.gateway("east", "gw1"), pki.bundle()).await
}

async fn edge_link(pki: &Pki, east: &Running, agent_zone: &str) -> Arc<EdgeLink> {
    let cfg = EdgeConfig {
        zone: agent_zone.into(),
        gateway_zone: "east".into(),
        gateway: east.addrs.quic,
        dns_suffix: "mesh".into(),
        bind: "127.0.0.1:0".parse().unwrap(),
        services: vec![service("inventory", &["east"], vec![tcp_echo().await])],
        timeout: Duration::from_secs(2),
        quic: QuicSettings::default(),
    };
    Arc::new(EdgeLink::new(cfg, pki.agent(agent_zone, "shop-1"), pki.bundle()).unwrap())
}

async fn echo_via(gw: std::net::SocketAddr, sni: &str, msg: &[u8]) -> Vec<u8> {
    let (mut s, hello) = raw_connect(gw, sni).await;
    s.write_all(msg).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut back))
        .await
        .expect("no answer")
        .unwrap();
    back.split_off(hello.len().min(back.len()))
}

#[tokio::test]
async fn an_edge_agent_serves_over_its_own_connection_and_survives_an_address_change() {
    let pki = Pki::new("trellis.local");
    let east = east_with_edge(&pki).await;
    let link = edge_link(&pki, &east, "edge").await;
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (link, stop) = (link.clone(), stop.clone());
        async move { link.run(stop).await }
    });
    let conn = link.connected().await;

    // East's workloads reach the edge's inventory through east's gateway;
    // the edge has no listening socket, only the connection it dialled.
    assert_eq!(
        echo_via(east.addrs.tcp, "7.inventory.shop.edge.mesh", b"one").await,
        b"one"
    );

    // The edge's address changes (a new UDP socket, as after a NAT rebinding):
    // the same connection carries on, no redial.
    let before = link.endpoint().local_addr().unwrap();
    link.endpoint()
        .rebind(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
        .unwrap();
    assert_ne!(link.endpoint().local_addr().unwrap(), before);
    assert_eq!(
        echo_via(east.addrs.tcp, "7.inventory.shop.edge.mesh", b"two").await,
        b"two"
    );
    assert_eq!(link.connection().unwrap().stable_id(), conn.stable_id());

    // And the edge calls into east over the same link.
    let mut s = link
        .open("catalog", "shop", 80, "east", None)
        .await
        .unwrap();
    s.write_all(b"from the edge").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"from the edge");

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .unwrap()
        .unwrap();
    east.stop().await;
}

#[tokio::test]
async fn an_agent_of_a_zone_that_is_not_an_edge_zone_is_refused() {
    let pki = Pki::new("trellis.local");
    let east = east_with_edge(&pki).await;
    let link = edge_link(&pki, &east, "west").await;
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (link, stop) = (link.clone(), stop.clone());
        async move { link.run(stop).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The handshake fails on the gateway side; nothing reaches west's agent.
    let (mut s, _) = raw_connect(east.addrs.tcp, "7.inventory.shop.west.mesh").await;
    let mut back = Vec::new();
    let _ = s.read_to_end(&mut back).await;
    assert!(back.is_empty());
    let m = east.metrics().await;
    assert!(
        m.contains(
            r#"trellis_gateway_handshake_failures_total{peer_zone="unknown",transport="quic"}"#
        ),
        "{m}"
    );
    stop.cancel();
    run.await.unwrap();
    east.stop().await;
}

#[tokio::test]
async fn the_edge_link_redials_after_the_gateway_restarts() {
    let pki = Pki::new("trellis.local");
    let east = east_with_edge(&pki).await;
    let addr = east.addrs.tcp;
    let link = edge_link(&pki, &east, "edge").await;
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (link, stop) = (link.clone(), stop.clone());
        async move { link.run(stop).await }
    });
    let first = link.connected().await.stable_id();
    east.stop().await;
    // Same address, new process state.
    let mut e = config("east", addr);
    e.edge_zones = vec!["edge".into()];
    let east = Running::start(e, pki.gateway("east", "gw1"), pki.bundle()).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(c) = link.connection()
            && c.stable_id() != first
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "edge never redialled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        echo_via(east.addrs.tcp, "7.inventory.shop.edge.mesh", b"back").await,
        b"back"
    );
    stop.cancel();
    run.await.unwrap();
    east.stop().await;
}
