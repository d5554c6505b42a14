//! The admin endpoint's `/links`: each peer link with the transport a new
//! stream takes and its round trip, dialled on demand. Real gateways on
//! loopback, real QUIC and TLS.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use trellis_gateway::config::Transport;
use trellis_gateway::testing::{Pki, Running, config, pair, peer};

/// GET `/links` from `admin`: the JSON body.
async fn links(admin: SocketAddr) -> serde_json::Value {
    let mut s = TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET /links HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("application/json"), "{head}");
    serde_json::from_str(body).unwrap()
}

#[tokio::test]
async fn an_idle_quic_link_is_dialled_and_reports_its_rtt() {
    let pki = Pki::new("trellis.local");
    let (east, west) = pair(&pki, vec![], Transport::Quic).await;
    let v = links(east.addrs.admin).await;
    assert_eq!(v["zone"], "east");
    let l = &v["links"][0];
    assert_eq!(l["zone"], "west", "{v:#}");
    assert_eq!(l["address"], west.addrs.tcp.to_string(), "{v:#}");
    assert_eq!(l["configured"], "quic", "{v:#}");
    assert_eq!(l["transport"], "quic", "{v:#}");
    assert_eq!(l["fallback"], false, "{v:#}");
    let rtt = l["rtt_ms"].as_f64().unwrap();
    assert!(rtt > 0.0 && rtt < 1000.0, "{v:#}");
    east.stop().await;
    west.stop().await;
}

#[tokio::test]
async fn a_tcp_link_reports_tcp_without_calling_it_a_fallback() {
    let pki = Pki::new("trellis.local");
    let (east, west) = pair(&pki, vec![], Transport::Tcp).await;
    let v = links(east.addrs.admin).await;
    let l = &v["links"][0];
    assert_eq!(l["transport"], "tcp", "{v:#}");
    assert_eq!(l["fallback"], false, "{v:#}");
    assert!(l["rtt_ms"].as_f64().is_some(), "{v:#}");
    east.stop().await;
    west.stop().await;
}

/// A UDP socket that never answers and a TCP listener on the same port.
async fn silent_pair() -> (UdpSocket, tokio::net::TcpListener) {
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = udp.local_addr().unwrap().port();
        if let Ok(tcp) = tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            return (udp, tcp);
        }
    }
    panic!("no port free for both UDP and TCP in 50 tries");
}

/// `auto` towards a peer whose UDP port swallows everything (a socket
/// that never answers, as a firewall dropping UDP would): QUIC times out
/// and the link runs on the TCP fallback, which `/links` says, with the
/// reason QUIC was given up.
#[tokio::test]
async fn auto_with_udp_silent_reports_the_tcp_fallback() {
    let pki = Pki::new("trellis.local");
    let west = Running::start(
        config("west", "127.0.0.1:0".parse().unwrap()),
        pki.gateway("west", "gw1"),
        pki.bundle(),
    )
    .await;
    // A TCP relay on a port whose UDP side is a silent socket; another
    // test may hold the TCP side of a free UDP port, so try a few.
    let (black_hole, relay) = silent_pair().await;
    let port = relay.local_addr().unwrap().port();
    let to = west.addrs.tcp;
    tokio::spawn(async move {
        while let Ok((mut a, _)) = relay.accept().await {
            tokio::spawn(async move {
                if let Ok(mut b) = TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                }
            });
        }
    });
    let mut e = config("east", "127.0.0.1:0".parse().unwrap());
    e.peers = vec![peer(
        "west",
        SocketAddr::from(([127, 0, 0, 1], port)),
        Transport::Auto,
    )];
    let east = Running::start(e, pki.gateway("east", "gw1"), pki.bundle()).await;
    let v = links(east.addrs.admin).await;
    let l = &v["links"][0];
    assert_eq!(l["configured"], "auto", "{v:#}");
    assert_eq!(l["transport"], "tcp", "{v:#}");
    assert_eq!(l["fallback"], true, "{v:#}");
    assert!(
        l["error"].as_str().unwrap().contains("QUIC handshake"),
        "{v:#}"
    );
    drop(black_hole);
    east.stop().await;
    west.stop().await;
}
