//! The gateway process: listeners, per-stream handling and drain.
//!
//! ```text
//!  zone (TCP, SNI passthrough) ─▶ ingress ─▶ PeerLink ══QUIC or h2══▶ peer's accept_stream ─▶ endpoint
//!  peer (QUIC)                 ─▶ accept_stream ─▶ endpoint (sidecar inbound)
//!  peer (TLS+h2 on the TCP port, SNI gateway.<zone>.<suffix>) ─▶ accept_stream
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trellis_ca::tls::{CertSource, TrustStore};
use trellis_ca::{Credentials, Role, TrustBundle, TrustDomain};

use crate::config::GatewayConfig;
use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::peer::{LinkParams, PeerLink};
use crate::quic;
use crate::relay::splice;
use crate::routes::Routes;

/// How long a new TCP client may take to send its ClientHello.
pub(crate) const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// A gateway with its sockets bound, ready to [`Gateway::run`].
pub struct Gateway {
    shared: Arc<Shared>,
    tcp: TcpListener,
    admin: TcpListener,
    endpoint: quinn::Endpoint,
}

pub(crate) struct Shared {
    pub(crate) cfg: GatewayConfig,
    pub(crate) certs: Arc<CertSource>,
    pub(crate) trust: Arc<TrustStore>,
    /// Reload credentials from `cfg.credentials` when the files change.
    pub(crate) watch_credentials: bool,
    pub(crate) routes: ArcSwap<Routes>,
    /// Links to other zones' gateways, by zone; several when a zone runs
    /// several gateways (a stream tries the next when one is unreachable).
    pub(crate) peers: ArcSwap<HashMap<String, Vec<Arc<PeerLink>>>>,
    pub(crate) trust_domain: TrustDomain,
    /// Our QUIC endpoint, which links to peers dial from.
    pub(crate) quic: quinn::Endpoint,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) admin: Arc<crate::admin::Admin>,
    pub(crate) streams: Arc<Semaphore>,
    pub(crate) fallback_tls: TlsAcceptor,
    pub(crate) tunnel_sni: String,
    pub(crate) draining: Arc<AtomicBool>,
    pub(crate) tracker: TaskTracker,
    /// QUIC connections of edge agents, by zone: the way back to edge sites.
    pub(crate) edges: std::sync::Mutex<HashMap<String, Vec<quinn::Connection>>>,
    /// Fires when the drain starts: connections stop taking new streams.
    pub(crate) stopping: CancellationToken,
    /// Fires after the drain deadline: cuts streams still running.
    pub(crate) force: CancellationToken,
}

/// Addresses a running gateway listens on (with port 0 resolved).
#[derive(Debug, Clone, Copy)]
pub struct BoundAddrs {
    /// TCP: zone ingress and the peers' fallback.
    pub tcp: SocketAddr,
    /// UDP: QUIC from peers.
    pub quic: SocketAddr,
    /// Admin HTTP.
    pub admin: SocketAddr,
}

impl Gateway {
    /// Loads credentials from `cfg.credentials` and binds.
    pub async fn from_config(cfg: GatewayConfig) -> Result<Self, GatewayError> {
        let (creds, bundle) = trellis_ca::load_credentials(&cfg.credentials)?;
        let mut gw = Self::bind(cfg, creds, bundle).await?;
        if let Some(s) = Arc::get_mut(&mut gw.shared) {
            s.watch_credentials = true;
        }
        Ok(gw)
    }

    /// Binds the TCP, QUIC and admin sockets. With port 0 in `listen`, TCP
    /// and UDP get the same free port number, as peers expect.
    pub async fn bind(
        cfg: GatewayConfig,
        creds: Credentials,
        bundle: TrustBundle,
    ) -> Result<Self, GatewayError> {
        cfg.validate()?;
        let td: TrustDomain =
            cfg.trust_domain
                .parse()
                .map_err(|e: trellis_ca::SpiffeIdError| {
                    GatewayError::config("trust_domain", &e.to_string())
                })?;
        let id = creds.id()?;
        match id.role() {
            Some(Role::Gateway { zone, .. }) if zone == cfg.zone => {}
            _ => {
                return Err(GatewayError::Tls(format!(
                    "the credentials at {} are for {id}, not a gateway of zone {}",
                    cfg.credentials.display(),
                    cfg.zone
                )));
            }
        }
        if bundle.trust_domain() != &td {
            return Err(GatewayError::config(
                "trust_domain",
                &format!(
                    "the credentials belong to trust domain {}",
                    bundle.trust_domain()
                ),
            ));
        }
        let certs = CertSource::new(creds)?;
        let trust = TrustStore::new(bundle);

        let (tcp, udp) = bind_pair(cfg.listen).await?;
        let admin = TcpListener::bind(cfg.admin)
            .await
            .map_err(|source| GatewayError::Bind {
                what: "admin",
                addr: cfg.admin,
                source,
            })?;
        let server = quic::server_config(certs.clone(), trust.clone(), &cfg.quic, &cfg.edge_zones)?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            udp,
            Arc::new(quinn::TokioRuntime),
        )?;

        let metrics = Arc::new(Metrics::default());
        let mut registry = Registry::default();
        metrics.register(&mut registry);

        let draining = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            routes: ArcSwap::from_pointee(Routes::from_config(&cfg.services)),
            fallback_tls: TlsAcceptor::from(quic::fallback_server_tls(
                certs.clone(),
                trust.clone(),
            )?),
            trust,
            watch_credentials: false,
            tunnel_sni: GatewayConfig::tunnel_sni(&cfg.zone, &cfg.dns_suffix),
            streams: Arc::new(Semaphore::new(cfg.max_streams)),
            certs,
            peers: ArcSwap::from_pointee(HashMap::new()),
            trust_domain: td,
            quic: endpoint.clone(),
            metrics,
            admin: Arc::new(crate::admin::Admin {
                registry,
                draining: draining.clone(),
                config: toml::to_string_pretty(&cfg).unwrap_or_default(),
            }),
            draining,
            tracker: TaskTracker::new(),
            edges: std::sync::Mutex::new(HashMap::new()),
            stopping: CancellationToken::new(),
            force: CancellationToken::new(),
            cfg,
        });
        let mut peers: HashMap<String, Vec<Arc<PeerLink>>> = HashMap::new();
        for p in &shared.cfg.peers {
            let link = shared.link(&p.zone, p.address, p.transport, p.name.as_deref())?;
            peers
                .entry(p.zone.clone())
                .or_default()
                .push(Arc::new(link));
        }
        shared.peers.store(Arc::new(peers));
        Ok(Self {
            shared,
            tcp,
            admin,
            endpoint,
        })
    }

    /// Where the gateway listens.
    pub fn addrs(&self) -> Result<BoundAddrs, GatewayError> {
        Ok(BoundAddrs {
            tcp: self.tcp.local_addr()?,
            quic: self.endpoint.local_addr()?,
            admin: self.admin.local_addr()?,
        })
    }

    /// Applies `new` from a changed configuration file (SIGHUP): without a
    /// store, its `services` replace the routes at once. Returns the changed
    /// keys that take effect only at the next start.
    pub fn reloader(
        &self,
    ) -> impl Fn(GatewayConfig) -> Result<Vec<&'static str>, GatewayError> + Send + Sync + 'static
    {
        let shared = self.shared.clone();
        move |new: GatewayConfig| {
            new.validate()?;
            let cur = &shared.cfg;
            let d = |v: &dyn std::fmt::Debug| format!("{v:?}");
            let mut later: Vec<&'static str> = [
                ("name", d(&cur.name) != d(&new.name)),
                ("zone", d(&cur.zone) != d(&new.zone)),
                ("listen", d(&cur.listen) != d(&new.listen)),
                ("admin", d(&cur.admin) != d(&new.admin)),
                ("credentials", d(&cur.credentials) != d(&new.credentials)),
                ("servers", d(&cur.servers) != d(&new.servers)),
                ("peers", d(&cur.peers) != d(&new.peers)),
                ("edge_zones", d(&cur.edge_zones) != d(&new.edge_zones)),
                ("quic", d(&cur.quic) != d(&new.quic)),
            ]
            .into_iter()
            .filter_map(|(k, changed)| changed.then_some(k))
            .collect();
            if cur.servers.is_empty() {
                shared
                    .routes
                    .store(Arc::new(Routes::from_config(&new.services)));
            } else if d(&cur.services) != d(&new.services) {
                // With a store, routes are rebuilt from the file's services
                // and the registry by the watch, which reads the start config.
                later.push("services");
            }
            Ok(later)
        }
    }

    /// The certificate this gateway presents, for rotation.
    pub fn cert_source(&self) -> Arc<CertSource> {
        self.shared.certs.clone()
    }

    /// Serves until `shutdown` fires, then drains: stops accepting, lets
    /// streams finish for `drain_deadline`, cuts the rest, closes QUIC.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), GatewayError> {
        let Gateway {
            shared,
            tcp,
            admin,
            endpoint,
        } = self;
        let s = shared.clone();
        let tcp_loop = async {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    r = tcp.accept() => match r {
                        Ok((sock, from)) => {
                            let s = s.clone();
                            s.tracker.clone().spawn(async move { s.handle_tcp(sock, from).await });
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "TCP accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
        };
        let quic_loop = async {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    inc = endpoint.accept() => match inc {
                        Some(inc) => {
                            let s = s.clone();
                            s.tracker.clone().spawn(async move { s.handle_quic(inc).await });
                        }
                        None => break,
                    }
                }
            }
        };
        if shared.watch_credentials {
            let zone = shared.cfg.zone.clone();
            tokio::spawn(trellis_ca::reload::watch(
                shared.cfg.credentials.clone(),
                move |id| matches!(id.role(), Some(Role::Gateway { zone: z, .. }) if z == zone),
                shared.certs.clone(),
                shared.trust.clone(),
                shared.cfg.credentials_poll,
                shutdown.clone(),
            ));
        }
        let registrations = if shared.cfg.servers.is_empty() {
            Vec::new()
        } else {
            crate::store::start(&shared, tcp.local_addr()?.port(), shutdown.clone())?
        };
        // The admin port outlives the drain, so /ready can say 503 meanwhile.
        let admin_loop = shared.admin.clone().serve(admin, CancellationToken::new());
        let admin_task = tokio::spawn(admin_loop);
        tokio::join!(tcp_loop, quic_loop);
        // Deregistered first, so peers stop choosing this gateway while its
        // streams drain.
        for r in registrations {
            let _ = r.await;
        }

        shared.draining.store(true, Ordering::SeqCst);
        shared.stopping.cancel();
        tracing::info!(deadline = ?shared.cfg.drain_deadline, "draining");
        shared.tracker.close();
        if tokio::time::timeout(shared.cfg.drain_deadline, shared.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = shared.tracker.len(),
                "drain deadline passed; closing the streams still open"
            );
            shared.force.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(1), shared.tracker.wait()).await;
        }
        for p in shared.peers.load().values().flatten() {
            p.close().await;
        }
        endpoint.close(0u32.into(), b"gateway shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        admin_task.abort();
        tracing::info!("gateway stopped");
        Ok(())
    }
}

impl Shared {
    /// A (lazily dialled) link to the gateway of `zone` at `addr`.
    pub(crate) fn link(
        &self,
        zone: &str,
        addr: SocketAddr,
        transport: crate::config::Transport,
        name: Option<&str>,
    ) -> Result<PeerLink, GatewayError> {
        let policy = quic::peer_policy(&self.trust_domain, zone, name);
        let (quic_cfg, h2_tls) = quic::client_configs(
            self.certs.clone(),
            self.trust.clone(),
            policy,
            &self.cfg.quic,
        )?;
        Ok(PeerLink::new(LinkParams {
            zone: zone.to_owned(),
            addr,
            transport,
            sni: GatewayConfig::tunnel_sni(zone, &self.cfg.dns_suffix),
            endpoint: self.quic.clone(),
            quic_cfg,
            h2_tls,
            settings: self.cfg.quic.clone(),
            timeout: self.cfg.connect_timeout,
            metrics: self.metrics.clone(),
        }))
    }
}

/// Pending TCP connections the kernel may queue: bursts of new workload
/// connections must not be dropped at the door (the std default is 128).
const TCP_BACKLOG: u32 = 4096;

/// TCP and UDP on the same port; with port 0, retries until both get one.
/// With a fixed port, waits up to 3 s for a previous instance (a restart
/// under a supervisor) to let go of the port.
async fn bind_pair(addr: SocketAddr) -> Result<(TcpListener, std::net::UdpSocket), GatewayError> {
    let bind_err = |what, source| GatewayError::Bind { what, addr, source };
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        match try_bind_pair(addr) {
            Err(GatewayError::Bind { source, .. })
                if addr.port() != 0
                    && source.kind() == std::io::ErrorKind::AddrInUse
                    && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(GatewayError::Bind { what, source, .. }) => return Err(bind_err(what, source)),
            other => return other,
        }
    }
}

fn try_bind_pair(addr: SocketAddr) -> Result<(TcpListener, std::net::UdpSocket), GatewayError> {
    let bind_err = |what, source| GatewayError::Bind { what, addr, source };
    for _ in 0..20 {
        let sock = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }?;
        // A restarted gateway must get its port back while old connections
        // sit in TIME_WAIT.
        sock.set_reuseaddr(true)?;
        sock.bind(addr).map_err(|e| bind_err("TCP", e))?;
        let port = sock.local_addr()?.port();
        match std::net::UdpSocket::bind(SocketAddr::new(addr.ip(), port)) {
            Ok(udp) => {
                let tcp = sock.listen(TCP_BACKLOG).map_err(|e| bind_err("TCP", e))?;
                return Ok((tcp, udp));
            }
            Err(e) if addr.port() != 0 => return Err(bind_err("QUIC (UDP)", e)),
            Err(_) => continue,
        }
    }
    Err(bind_err(
        "QUIC (UDP)",
        std::io::Error::other("no port free for both TCP and UDP after 20 tries"),
    ))
}
// === impl Shared ===

impl Shared {
    /// Splices until both sides end or the drain deadline cuts it.
    pub(crate) async fn splice_counted<A, B>(
        &self,
        zone_side: &mut A,
        peer_side: &mut B,
        direction: &'static str,
    ) where
        A: crate::relay::Duplex + ?Sized,
        B: crate::relay::Duplex + ?Sized,
    {
        self.metrics.active_streams.inc();
        tokio::select! {
            r = splice(zone_side, peer_side) => match r {
                Ok((from_zone, to_zone)) => {
                    self.metrics.spliced(direction, to_zone, from_zone);
                    // Hold the stream (and the drain) until the peer has our
                    // last bytes; bounded by the idle timeout and the drain deadline.
                    if let Some(done) = peer_side.delivered() {
                        tokio::select! {
                            () = done => {}
                            () = tokio::time::sleep(self.cfg.quic.idle_timeout) => {}
                            () = self.force.cancelled() => {}
                        }
                    }
                }
                Err(e) => {
                    // One side failed: make both ends see a failure, not a
                    // clean end that would pass a truncated transfer off as whole.
                    zone_side.abort();
                    peer_side.abort();
                    tracing::debug!(error = %e, "stream aborted");
                }
            },
            () = self.force.cancelled() => {
                zone_side.abort();
                peer_side.abort();
            }
        }
        self.metrics.active_streams.dec();
    }
}
