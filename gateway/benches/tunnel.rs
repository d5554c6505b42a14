//! Gateway pair against direct connections, in one run on this machine.
//!
//! `cargo bench -p trellis-gateway --bench tunnel` prints:
//! - single-stream throughput (one direction, 512 MiB) for direct TCP,
//!   direct mTLS over TCP, one raw quinn stream (the QUIC floor), and the
//!   same mTLS carried through an east→west gateway pair over QUIC and over
//!   the HTTP/2 fallback;
//! - request/response latency (1 KiB each way, one connection, a fixed rate)
//!   p50/p99/p99.9 for the same four paths. When a response comes back after
//!   the next request was due, that request's latency counts from when it was
//!   due, so a stall is not hidden (no coordinated omission); otherwise it
//!   counts from when it was sent, so the timer's millisecond granularity is
//!   not charged to the path.
//!
//! Everything shares this machine's cores: client, servers and both gateways.
//! `BENCH_MIB` and `BENCH_RATE`/`BENCH_SECS` override the sizes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use trellis_ca::tls::{self, CertSource, PeerPolicy, TrustStore};
use trellis_gateway::config::Transport;
use trellis_gateway::testing::{Pki, Running, config, fixed_rate_latency, peer, service};

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// What the backend does with a connection.
#[derive(Clone, Copy)]
enum Mode {
    /// Read to EOF, then answer with the byte count (8 bytes).
    Sink,
    /// Answer every 1 KiB with 1 KiB.
    Echo1k,
}

async fn serve(mut s: Box<dyn Io>, mode: Mode) {
    match mode {
        Mode::Sink => {
            let mut buf = vec![0u8; 256 * 1024];
            let mut n = 0u64;
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => n += k as u64,
                }
            }
            let _ = s.write_all(&n.to_be_bytes()).await;
            let _ = s.shutdown().await;
        }
        Mode::Echo1k => {
            let mut buf = [0u8; 1024];
            while s.read_exact(&mut buf).await.is_ok() {
                if s.write_all(&buf).await.is_err() {
                    break;
                }
            }
        }
    }
}

/// A backend on loopback, plain TCP or mTLS with a workload identity.
async fn backend(mode: Mode, tls: Option<TlsAcceptor>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            s.set_nodelay(true).unwrap();
            let tls = tls.clone();
            tokio::spawn(async move {
                let io: Box<dyn Io> = match tls {
                    Some(a) => match a.accept(s).await {
                        Ok(t) => Box::new(t),
                        Err(_) => return,
                    },
                    None => Box::new(s),
                };
                serve(io, mode).await;
            });
        }
    });
    addr
}

struct Path {
    name: &'static str,
    addr: SocketAddr,
    tls: Option<(TlsConnector, &'static str)>,
    /// Dial QUIC with this endpoint instead of TCP.
    quic: Option<quinn::Endpoint>,
}

/// The transport settings the gateway uses, for the raw QUIC baseline.
fn transport() -> Arc<quinn::TransportConfig> {
    let q = bench_config("x").quic;
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(q.stream_receive_window.into());
    t.receive_window(q.receive_window.into());
    t.send_window(q.send_window.into());
    t.enable_segmentation_offload(q.gso);
    Arc::new(t)
}

/// A raw quinn server (mutual TLS with our identities, no gateway): the
/// floor for what a QUIC tunnel can do on this machine.
fn quic_backend(pki: &Pki, mode: Mode) -> SocketAddr {
    let mut tls = tls::server_config(
        CertSource::new(pki.gateway("west", "raw")).unwrap(),
        TrustStore::new(pki.bundle()),
        PeerPolicy::TrustDomain,
    )
    .unwrap();
    tls.alpn_protocols = vec![b"bench".to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls)).unwrap();
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport());
    let ep = quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = ep.local_addr().unwrap();
    tokio::spawn(async move {
        while let Some(inc) = ep.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = inc.await else { return };
                while let Ok((send, recv)) = conn.accept_bi().await {
                    tokio::spawn(serve(Box::new(tokio::io::join(recv, send)), mode));
                }
            });
        }
    });
    addr
}

fn quic_client(pki: &Pki) -> quinn::Endpoint {
    let mut tls = tls::client_config(
        CertSource::new(pki.gateway("east", "raw")).unwrap(),
        TrustStore::new(pki.bundle()),
        PeerPolicy::TrustDomain,
    )
    .unwrap();
    tls.alpn_protocols = vec![b"bench".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).unwrap();
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport());
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(cfg);
    ep
}

async fn connect(p: &Path) -> Box<dyn Io> {
    if let Some(ep) = &p.quic {
        let conn = ep.connect(p.addr, "raw.mesh").unwrap().await.unwrap();
        let (send, recv) = conn.open_bi().await.unwrap();
        return Box::new(tokio::io::join(recv, send));
    }
    let s = TcpStream::connect(p.addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    match &p.tls {
        Some((c, sni)) => Box::new(
            c.connect(ServerName::try_from(*sni).unwrap(), s)
                .await
                .unwrap(),
        ),
        None => Box::new(s),
    }
}

async fn throughput(p: &Path, mib: usize) -> f64 {
    let mut s = connect(p).await;
    let chunk = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    for _ in 0..mib {
        s.write_all(&chunk).await.unwrap();
    }
    s.shutdown().await.unwrap();
    let mut n = [0u8; 8];
    s.read_exact(&mut n).await.unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(
        u64::from_be_bytes(n),
        (mib as u64) << 20,
        "{}: short count",
        p.name
    );
    mib as f64 / secs
}

async fn latency(p: &Path, rate: u32, secs: u32) -> (Duration, Duration, Duration) {
    let mut s = connect(p).await;
    fixed_rate_latency(&mut s, &[0x42u8; 1024], 1024, rate, secs).await
}

/// `a / b` as "1.23x", or "-" where there is no baseline yet.
fn ratio(a: f64, b: Option<f64>) -> String {
    b.map_or_else(|| "-".into(), |b| format!("{:.2}x", a / b))
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn env(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A gateway config with the benchmark's overrides (`BENCH_GSO=0`).
fn bench_config(zone: &str) -> trellis_gateway::config::GatewayConfig {
    let mut c = config(zone, "127.0.0.1:0".parse().unwrap());
    c.connect_timeout = Duration::from_secs(5);
    c.quic.gso = env("BENCH_GSO", 1) != 0;
    c
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let mib = env("BENCH_MIB", 512) as usize;
    // 5 ms apart: well above the timer's 1 ms granularity, so a late wake-up
    // is not mistaken for a slow response.
    let rate = env("BENCH_RATE", 200);
    let secs = env("BENCH_SECS", 10);

    let pki = Pki::new("trellis.local");
    let catalog = pki.td.workload("shop", "catalog").unwrap();
    let server_tls = TlsAcceptor::from(Arc::new(
        tls::server_config(
            CertSource::new(pki.workload("west", "shop", "catalog")).unwrap(),
            TrustStore::new(pki.bundle()),
            PeerPolicy::TrustDomain,
        )
        .unwrap(),
    ));
    let client_tls = TlsConnector::from(Arc::new(
        tls::client_config(
            CertSource::new(pki.workload("east", "shop", "frontend")).unwrap(),
            TrustStore::new(pki.bundle()),
            PeerPolicy::AllowList(vec![catalog]),
        )
        .unwrap(),
    ));

    let sink_quic = quic_backend(&pki, Mode::Sink);
    let echo_quic = quic_backend(&pki, Mode::Echo1k);
    let raw_client = quic_client(&pki);
    let sink_tcp = backend(Mode::Sink, None).await;
    let sink_tls = backend(Mode::Sink, Some(server_tls.clone())).await;
    let echo_tcp = backend(Mode::Echo1k, None).await;
    let echo_tls = backend(Mode::Echo1k, Some(server_tls)).await;

    // West serves the TLS backends; east has two links to west: QUIC and TCP.
    let mut w = bench_config("west");
    w.services = vec![
        service("sink", &["*"], vec![sink_tls]),
        service("echo", &["*"], vec![echo_tls]),
    ];
    let west = Running::start(w, pki.gateway("west", "gw1"), pki.bundle()).await;
    let mut gateways = Vec::new();
    for transport in [Transport::Quic, Transport::Tcp] {
        let mut e = bench_config("east");
        e.peers = vec![peer("west", west.addrs.tcp, transport)];
        let name = if transport == Transport::Quic {
            "gw-quic"
        } else {
            "gw-tcp"
        };
        gateways.push(Running::start(e, pki.gateway("east", name), pki.bundle()).await);
    }
    let q = &bench_config("x").quic;
    println!(
        "settings: QUIC stream window {} MiB, connection windows {} MiB, GSO {}; HTTP/2 fallback uses the same windows",
        q.stream_receive_window >> 20,
        q.receive_window >> 20,
        if q.gso {
            "on where the kernel offers it"
        } else {
            "off"
        }
    );
    println!(
        "all parts share this machine's {} cores\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let tls = |sni| Some((client_tls.clone(), sni));
    let paths = |sink: bool| {
        let (plain, direct_tls, raw_quic, sni) = if sink {
            (sink_tcp, sink_tls, sink_quic, "9000.sink.shop.west.mesh")
        } else {
            (echo_tcp, echo_tls, echo_quic, "9000.echo.shop.west.mesh")
        };
        let path = |name, addr, tls: Option<(TlsConnector, &'static str)>| Path {
            name,
            addr,
            tls,
            quic: None,
        };
        vec![
            path("direct TCP", plain, None),
            path("direct mTLS (TLS 1.3)", direct_tls, tls(sni)),
            Path {
                name: "raw QUIC stream (quinn, no gateway)",
                addr: raw_quic,
                tls: None,
                quic: Some(raw_client.clone()),
            },
            path("mTLS via gateways, QUIC", gateways[0].addrs.tcp, tls(sni)),
            path(
                "mTLS via gateways, HTTP/2 fallback",
                gateways[1].addrs.tcp,
                tls(sni),
            ),
        ]
    };

    println!("throughput, one stream, {mib} MiB one way");
    println!(
        "{:<38} {:>10} {:>14} {:>14}",
        "path", "MiB/s", "vs TCP", "vs mTLS"
    );
    let mut tput = Vec::new();
    for p in paths(true) {
        // Best of three: the machine is shared with everything else.
        let mut best = 0f64;
        for _ in 0..3 {
            best = best.max(throughput(&p, mib).await);
        }
        tput.push(best);
        println!(
            "{:<38} {:>10.0} {:>14} {:>14}",
            p.name,
            best,
            ratio(best, Some(tput[0])),
            ratio(best, tput.get(1).copied()),
        );
    }

    println!("\nrequest/response, 1 KiB each way, one connection, {rate}/s for {secs} s");
    println!(
        "{:<38} {:>9} {:>9} {:>9} {:>12} {:>12}",
        "path", "p50 us", "p99 us", "p99.9 us", "p50 vs mTLS", "p99 vs mTLS"
    );
    let mut base = None;
    for p in paths(false) {
        let (p50, p99, p999) = latency(&p, rate, secs).await;
        if p.name.starts_with("direct mTLS") {
            base = Some((p50, p99));
        }
        println!(
            "{:<38} {:>9.0} {:>9.0} {:>9.0} {:>12} {:>12}",
            p.name,
            us(p50),
            us(p99),
            us(p999),
            ratio(us(p50), base.map(|b| us(b.0))),
            ratio(us(p99), base.map(|b| us(b.1))),
        );
    }
    for g in gateways {
        g.stop().await;
    }
    west.stop().await;
}
