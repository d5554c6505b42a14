//! Test helpers shared by the gateway's tests and benchmark: a throwaway
//! CA, gateways on loopback, echo backends and workload-like clients.
//! Compiled only for tests and with the `testing` feature.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use trellis_ca::tls::{self, CertSource, PeerPolicy, TrustStore};
use trellis_ca::{
    Authority, Credentials, DEFAULT_ROOT_TTL, DEFAULT_ZONE_TTL, IssueOptions, RoleKind,
    TrustBundle, TrustDomain,
};

use crate::config::{GatewayConfig, PeerConfig, ServiceConfig, Transport};
use crate::{BoundAddrs, Gateway};

/// A throwaway CA: a root and zone intermediates on demand.
pub struct Pki {
    /// Trust domain.
    pub td: TrustDomain,
    /// The root.
    pub root: Authority,
}

impl Pki {
    /// See the name.
    pub fn new(td: &str) -> Self {
        let td: TrustDomain = td.parse().unwrap();
        let root = Authority::new_root(&td, DEFAULT_ROOT_TTL).unwrap();
        Self { td, root }
    }
    /// See the name.
    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::new(self.td.clone(), vec![self.root.cert().clone()]).unwrap()
    }
    /// See the name.
    pub fn zone(&self, zone: &str) -> Authority {
        self.root.new_zone(zone, DEFAULT_ZONE_TTL).unwrap()
    }
    /// See the name.
    pub fn gateway(&self, zone: &str, name: &str) -> Credentials {
        self.zone(zone)
            .issue(
                &self.td.role(RoleKind::Gateway, zone, name).unwrap(),
                IssueOptions::default(),
            )
            .unwrap()
    }
    /// See the name.
    pub fn agent(&self, zone: &str, name: &str) -> Credentials {
        self.zone(zone)
            .issue(
                &self.td.role(RoleKind::Agent, zone, name).unwrap(),
                IssueOptions::default(),
            )
            .unwrap()
    }
    /// See the name.
    pub fn workload(&self, zone: &str, ns: &str, sa: &str) -> Credentials {
        self.zone(zone)
            .issue(&self.td.workload(ns, sa).unwrap(), IssueOptions::default())
            .unwrap()
    }
}

/// A loopback gateway config for `zone` (admin on port 0, 1 s timeouts).
pub fn config(zone: &str, listen: SocketAddr) -> GatewayConfig {
    let mut c = GatewayConfig::from_toml(&format!(
        "name = \"gw1\"\nzone = \"{zone}\"\ncredentials = \"/unused\"\nlisten = \"{listen}\"\nadmin = \"127.0.0.1:0\"\nconnect_timeout = \"1s\"\ndrain_deadline = \"2s\""
    ))
    .unwrap();
    c.quic.keep_alive = Duration::from_secs(1);
    c
}

/// A peer entry.
pub fn peer(zone: &str, addr: SocketAddr, transport: Transport) -> PeerConfig {
    PeerConfig {
        zone: zone.into(),
        address: addr,
        name: None,
        transport,
    }
}

/// A service in namespace `shop`.
pub fn service(name: &str, export_to: &[&str], endpoints: Vec<SocketAddr>) -> ServiceConfig {
    ServiceConfig {
        name: name.into(),
        namespace: "shop".into(),
        export_to: export_to.iter().map(|s| s.to_string()).collect(),
        endpoints,
        plain_ports: Vec::new(),
    }
}

/// A gateway running on the current runtime.
pub struct Running {
    /// Where it listens.
    pub addrs: BoundAddrs,
    /// Cancel to drain.
    pub stop: CancellationToken,
    /// The `run` task.
    pub task: JoinHandle<()>,
}

impl Running {
    /// Binds and runs.
    pub async fn start(cfg: GatewayConfig, creds: Credentials, bundle: TrustBundle) -> Self {
        let gw = Gateway::bind(cfg, creds, bundle).await.unwrap();
        let addrs = gw.addrs().unwrap();
        let stop = CancellationToken::new();
        let s = stop.clone();
        let task = tokio::spawn(async move { gw.run(s).await.unwrap() });
        Self { addrs, stop, task }
    }

    /// Drains and waits for the end.
    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("gateway did not stop")
            .unwrap();
    }

    /// The admin `/metrics` response, headers included.
    pub async fn metrics(&self) -> String {
        let mut s = TcpStream::connect(self.addrs.admin).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }
}

/// East and west gateways; west serves `services`.
pub async fn pair(
    pki: &Pki,
    services: Vec<ServiceConfig>,
    transport: Transport,
) -> (Running, Running) {
    let mut w = config("west", "127.0.0.1:0".parse().unwrap());
    w.services = services;
    let west = Running::start(w, pki.gateway("west", "gw1"), pki.bundle()).await;
    let mut e = config("east", "127.0.0.1:0".parse().unwrap());
    e.peers = vec![peer("west", west.addrs.tcp, transport)];
    let east = Running::start(e, pki.gateway("east", "gw1"), pki.bundle()).await;
    (east, west)
}

/// A workload's mTLS echo server, standing in for a sidecar's inbound port.
pub async fn tls_echo(pki: &Pki, zone: &str, account: &str) -> SocketAddr {
    let cfg = tls::server_config(
        CertSource::new(pki.workload(zone, "shop", account)).unwrap(),
        TrustStore::new(pki.bundle()),
        PeerPolicy::TrustDomain,
    )
    .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(cfg));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut t) = acceptor.accept(s).await else {
                    return;
                };
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = t.read(&mut buf).await {
                    if n == 0 || t.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = t.shutdown().await;
            });
        }
    });
    addr
}

/// A QUIC client endpoint that dials gateways as a gateway of `zone`
/// (`gw1`) would: its identity, gateways only at the far end, the tunnel
/// ALPN. For tests that speak the tunnel protocol by hand.
pub fn peer_endpoint(pki: &Pki, zone: &str) -> quinn::Endpoint {
    let mut cfg = tls::client_config(
        CertSource::new(pki.gateway(zone, "gw1")).unwrap(),
        TrustStore::new(pki.bundle()),
        PeerPolicy::Roles(vec![trellis_ca::RoleKind::Gateway]),
    )
    .unwrap();
    cfg.alpn_protocols = vec![crate::ALPN_TUNNEL.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(cfg)).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    ep
}

/// A plain TCP echo server.
pub async fn tcp_echo() -> SocketAddr {
    // A deep accept queue: tests open a thousand connections at once.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l = sock.listen(4096).unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// The bytes a TLS client sends first, naming `sni`: what the gateway routes on.
pub fn client_hello(sni: &str) -> Vec<u8> {
    let cfg = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let mut c =
        rustls::ClientConnection::new(Arc::new(cfg), ServerName::try_from(sni.to_owned()).unwrap())
            .unwrap();
    let mut out = Vec::new();
    c.write_tls(&mut out).unwrap();
    out
}

/// Connects to a gateway's TCP port as a workload would, opening with a ClientHello.
pub async fn raw_connect(gw: SocketAddr, sni: &str) -> (TcpStream, Vec<u8>) {
    let hello = client_hello(sni);
    let mut s = TcpStream::connect(gw).await.unwrap();
    s.write_all(&hello).await.unwrap();
    (s, hello)
}

/// Latency quantiles (p50, p99, p99.9) of request/response exchanges on one
/// stream at a fixed rate: `req` is written, `resp_len` bytes are read.
///
/// 200 exchanges first warm the path. When a response comes back after the
/// next request was due, that request counts from when it was due, so a
/// stall is not hidden (no coordinated omission); otherwise it counts from
/// when it was sent, so the timer's granularity is not charged to the path.
pub async fn fixed_rate_latency<S>(
    s: &mut S,
    req: &[u8],
    resp_len: usize,
    rate: u32,
    secs: u32,
) -> (Duration, Duration, Duration)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
{
    use std::time::Instant;
    let mut resp = vec![0u8; resp_len];
    for _ in 0..200 {
        s.write_all(req).await.unwrap();
        s.read_exact(&mut resp).await.unwrap();
    }
    let n = rate * secs;
    let interval = Duration::from_secs(1) / rate;
    let mut samples = Vec::with_capacity(n as usize);
    let start = Instant::now();
    let mut prev_done = start;
    for i in 0..n {
        let scheduled = start + interval * i;
        tokio::time::sleep_until(scheduled.into()).await;
        let sent = Instant::now();
        s.write_all(req).await.unwrap();
        s.read_exact(&mut resp).await.unwrap();
        let done = Instant::now();
        samples.push(
            done - if prev_done > scheduled {
                scheduled
            } else {
                sent
            },
        );
        prev_done = done;
    }
    samples.sort();
    let q = |f: f64| samples[((samples.len() as f64 * f) as usize).min(samples.len() - 1)];
    (q(0.50), q(0.99), q(0.999))
}
