//! The gateway process: listeners, per-stream handling and drain.
//!
//! ```text
//!  zone (TCP, SNI passthrough) ─▶ ingress ─▶ PeerLink ══QUIC or h2══▶ peer's accept_stream ─▶ endpoint
//!  peer (QUIC)                 ─▶ accept_stream ─▶ endpoint (sidecar inbound)
//!  peer (TLS+h2 on the TCP port, SNI gateway.<zone>.<suffix>) ─▶ accept_stream
//! ```
//!
//! With `zone_listen` set, the zone's workloads have a TCP port of their
//! own and `listen` takes peers only: the zone a stream is attributed to is
//! then always the one a certificate proved on that port, or the zone's own
//! network for the zone port.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trellis_ca::tls::{CertSource, TrustStore};
use trellis_ca::{Credentials, Role, TrustBundle, TrustDomain};

use crate::config::GatewayConfig;
use crate::error::GatewayError;
use crate::metrics::{Metrics, TransportLabels};
use crate::outbound::Listener;
use crate::peer::{LinkParams, PeerLink};
use crate::quic;
use crate::relay::splice;
use crate::routes::Routes;

/// A gateway with its sockets bound, ready to [`Gateway::run`].
pub struct Gateway {
    shared: Arc<Shared>,
    tcp: TcpListener,
    /// `zone_listen`: this zone's workloads, when they have a port of their own.
    zone_tcp: Option<TcpListener>,
    admin: TcpListener,
    endpoint: quinn::Endpoint,
}

pub(crate) struct Shared {
    pub(crate) cfg: GatewayConfig,
    pub(crate) certs: Arc<CertSource>,
    pub(crate) trust: Arc<TrustStore>,
    /// Reload credentials from `cfg.credentials` when the files change.
    pub(crate) watch_credentials: bool,
    pub(crate) routes: Arc<ArcSwap<Routes>>,
    /// Terminating for this zone's plain services.
    pub(crate) terminating: Arc<crate::terminate::Terminating>,
    /// Links to other zones' gateways, by zone; several when a zone runs
    /// several gateways (a stream tries the next when one is unreachable).
    pub(crate) peers: ArcSwap<HashMap<String, Vec<Arc<PeerLink>>>>,
    /// Edge zones other gateways carry: those gateways, by edge zone (from
    /// the store's gateway records).
    pub(crate) carriers: ArcSwap<HashMap<String, Vec<Carrier>>>,
    /// The store's `Export` policies: zones (or `*`) by (namespace,
    /// service), checked here for the services of the edge zones this
    /// gateway carries (their agents do not check a caller's zone).
    pub(crate) exports: ArcSwap<trellis_federation::policy::Exports>,
    pub(crate) trust_domain: TrustDomain,
    /// Our QUIC endpoint, which links to peers dial from.
    pub(crate) quic: quinn::Endpoint,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) admin: Arc<crate::admin::Admin>,
    pub(crate) streams: Arc<Semaphore>,
    /// Connections still in their handshake (`max_handshakes`).
    pub(crate) handshakes: Arc<Semaphore>,
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

/// A gateway of another zone that carries an edge zone: its agents dial
/// it, and it relays their streams.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Carrier {
    /// The gateway's zone.
    pub(crate) zone: String,
    /// Its registered address, as its peer link dials it.
    pub(crate) addr: SocketAddr,
}

/// Addresses a running gateway listens on (with port 0 resolved).
#[derive(Debug, Clone, Copy)]
pub struct BoundAddrs {
    /// TCP: the peers' fallback, and zone ingress unless `zone` is set.
    pub tcp: SocketAddr,
    /// TCP: zone ingress, when `zone_listen` gives it a port of its own.
    pub zone: Option<SocketAddr>,
    /// UDP: QUIC from peers.
    pub quic: SocketAddr,
    /// Admin HTTP.
    pub admin: SocketAddr,
}

impl Gateway {
    /// Loads credentials from `cfg.credentials` and binds.
    pub async fn from_config(cfg: GatewayConfig) -> Result<Self, GatewayError> {
        let (creds, bundle) = trellis_ca::load_credentials(&cfg.credentials)?;
        Self::bind_watching(cfg, creds, bundle, true).await
    }

    /// Binds the TCP, QUIC and admin sockets. With port 0 in `listen`, TCP
    /// and UDP get the same free port number, as peers expect.
    pub async fn bind(
        cfg: GatewayConfig,
        creds: Credentials,
        bundle: TrustBundle,
    ) -> Result<Self, GatewayError> {
        Self::bind_watching(cfg, creds, bundle, false).await
    }

    /// [`Gateway::bind`]; with `watch_credentials`, the files at
    /// `cfg.credentials` are reloaded when they change. Decided here, not
    /// set afterwards: the admin's `/links` holds a weak reference to the
    /// shared state from the start, so it can no longer be changed in place.
    async fn bind_watching(
        mut cfg: GatewayConfig,
        creds: Credentials,
        bundle: TrustBundle,
        watch_credentials: bool,
    ) -> Result<Self, GatewayError> {
        cfg.validate()?;
        cfg.admit_own_zone();
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
        let zone_tcp = match cfg.zone_listen {
            Some(addr) => Some(bind_tcp(addr).map_err(|source| GatewayError::Bind {
                what: "zone TCP",
                addr,
                source,
            })?),
            None => {
                // Said at every start: with one port for both, anyone who can
                // reach it counts as this zone (issue 10).
                tracing::warn!(
                    listen = %cfg.listen,
                    "zone_listen is not set: workloads and peer gateways share the tunnel port, so a client that reaches it from outside the zone is taken for this zone and Export policies can be bypassed; give workloads a port of their own with zone_listen"
                );
                None
            }
        };
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
        let terminating = Arc::new(crate::terminate::Terminating::new(
            certs.clone(),
            trust.clone(),
            cfg.connect_timeout,
        )?);
        let fallback_tls =
            TlsAcceptor::from(quic::fallback_server_tls(certs.clone(), trust.clone())?);
        // The admin's `/links` report reads the links of the gateway that
        // owns the admin: a weak reference, so neither keeps the other alive.
        let shared = Arc::new_cyclic(|me: &std::sync::Weak<Shared>| Shared {
            routes: Arc::new(ArcSwap::from_pointee(Routes::from_config(&cfg.services))),
            terminating,
            fallback_tls,
            trust,
            watch_credentials,
            tunnel_sni: GatewayConfig::tunnel_sni(&cfg.zone, &cfg.dns_suffix),
            streams: Arc::new(Semaphore::new(cfg.max_streams)),
            handshakes: Arc::new(Semaphore::new(cfg.max_handshakes)),
            certs,
            peers: ArcSwap::from_pointee(HashMap::new()),
            carriers: ArcSwap::from_pointee(HashMap::new()),
            exports: ArcSwap::from_pointee(Default::default()),
            trust_domain: td,
            quic: endpoint.clone(),
            metrics,
            admin: Arc::new(crate::admin::Admin {
                registry,
                draining: draining.clone(),
                config: toml::to_string_pretty(&cfg).unwrap_or_default(),
                reports: vec![("/links", links_report(me.clone()))],
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
            zone_tcp,
            admin,
            endpoint,
        })
    }

    /// Where the gateway listens.
    pub fn addrs(&self) -> Result<BoundAddrs, GatewayError> {
        Ok(BoundAddrs {
            tcp: self.tcp.local_addr()?,
            zone: self
                .zone_tcp
                .as_ref()
                .map(TcpListener::local_addr)
                .transpose()?,
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
                ("zone_listen", d(&cur.zone_listen) != d(&new.zone_listen)),
                (
                    "handshake_timeout",
                    cur.handshake_timeout != new.handshake_timeout,
                ),
                ("max_handshakes", cur.max_handshakes != new.max_handshakes),
                (
                    "default_deny_exports",
                    cur.default_deny_exports != new.default_deny_exports,
                ),
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
            zone_tcp,
            admin,
            endpoint,
        } = self;
        let s = shared.clone();
        let peer_role = if zone_tcp.is_some() {
            Listener::Peers
        } else {
            Listener::Shared
        };
        let tcp_loop = s.clone().accept_tcp(&tcp, peer_role, &shutdown);
        let zone_loop = async {
            if let Some(z) = &zone_tcp {
                s.clone().accept_tcp(z, Listener::Zone, &shutdown).await;
            }
        };
        let quic_loop = async {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    inc = endpoint.accept() => match inc {
                        Some(inc) => s.clone().admit_quic(inc),
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
            let zone = zone_tcp.as_ref().map(TcpListener::local_addr).transpose()?;
            crate::store::start(
                &shared,
                tcp.local_addr()?.port(),
                zone,
                admin.local_addr()?,
                shutdown.clone(),
            )?
        };
        // The admin port outlives the drain, so /ready can say 503 meanwhile.
        let admin_loop = shared.admin.clone().serve(admin, CancellationToken::new());
        let admin_task = tokio::spawn(admin_loop);
        tokio::join!(tcp_loop, zone_loop, quic_loop);
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
    /// Accepts on a TCP listener until `shutdown`: each connection gets a
    /// handshake permit or is closed at once.
    async fn accept_tcp(
        self: Arc<Self>,
        l: &TcpListener,
        role: Listener,
        shutdown: &CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                r = l.accept() => match r {
                    Ok((sock, from)) => {
                        let Some(permit) = self.handshake_permit("tcp") else {
                            // Dropping the socket closes it: no task, no buffer.
                            tracing::debug!(%from, "TCP connection closed: too many handshakes in progress");
                            continue;
                        };
                        let s = self.clone();
                        self.tracker.spawn(async move { s.handle_tcp(sock, from, role, permit).await });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "TCP accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    }

    /// Admits a QUIC connection attempt: a Retry for an unvalidated address,
    /// a refusal past `max_handshakes`, otherwise a task for the handshake.
    fn admit_quic(self: Arc<Self>, inc: quinn::Incoming) {
        // A Retry costs one packet and no state, and the client has to show
        // it receives at its address before we spend a TLS handshake on it
        // (RFC 9000 §8.1): spoofed Initials cannot make us work or amplify.
        // Links are long-lived, so the extra round trip is paid once per link.
        if !inc.remote_address_validated() {
            self.metrics.quic_retries.inc();
            // Not validated implies `may_retry`, so this cannot fail; if it
            // did, refusing is the safe answer.
            if let Err(e) = inc.retry() {
                e.into_incoming().refuse();
            }
            return;
        }
        let Some(permit) = self.handshake_permit("quic") else {
            tracing::debug!(remote = %inc.remote_address(), "QUIC connection refused: too many handshakes in progress");
            inc.refuse();
            return;
        };
        let s = self.clone();
        self.tracker
            .spawn(async move { s.handle_quic(inc, permit).await });
    }

    /// A slot for one connection's handshake, or `None` (counted) when
    /// `max_handshakes` are in progress.
    pub(crate) fn handshake_permit(&self, transport: &'static str) -> Option<OwnedSemaphorePermit> {
        let permit = self.handshakes.clone().try_acquire_owned().ok();
        if permit.is_none() {
            self.metrics
                .handshakes_refused
                .get_or_create(&TransportLabels { transport })
                .inc();
        }
        permit
    }

    /// Counts a connection dropped for a slow handshake.
    pub(crate) fn handshake_timed_out(&self, transport: &'static str) {
        self.metrics
            .handshake_timeouts
            .get_or_create(&TransportLabels { transport })
            .inc();
    }

    /// Every peer link, probed at once (an idle one is dialled, as the next
    /// stream would dial it), and the edge agents' links to this gateway,
    /// as JSON.
    async fn links(&self) -> String {
        let limit = probe_limit(self.cfg.connect_timeout);
        let peers = self.peers.load_full();
        let probes = peers.values().flatten().map(|l| async move {
            match tokio::time::timeout(limit, l.probe()).await {
                Ok(r) => r,
                Err(_) => {
                    let mut r = l.blank_report();
                    r.error = Some(format!("no answer within {limit:?}"));
                    r
                }
            }
        });
        let mut links = futures_util::future::join_all(probes).await;
        links.sort_by(|a, b| (&a.zone, &a.address).cmp(&(&b.zone, &b.address)));
        let edges: Vec<serde_json::Value> = self
            .edges
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .flat_map(|(zone, conns)| {
                conns
                    .iter()
                    .filter(|c| c.close_reason().is_none())
                    .map(move |c| {
                        serde_json::json!({
                            "zone": zone,
                            "address": c.remote_address().to_string(),
                            "transport": "quic",
                            "rtt_ms": crate::peer::millis(c.rtt()),
                        })
                    })
            })
            .collect();
        serde_json::json!({
            "zone": self.cfg.zone,
            "name": self.cfg.name,
            "links": links,
            "edges": edges,
        })
        .to_string()
    }

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

/// How long `/links` waits for the slowest probe: a QUIC handshake that
/// times out, then the TCP fallback's dial, each bounded by `connect_timeout`.
fn probe_limit(connect_timeout: Duration) -> Duration {
    connect_timeout * 2 + Duration::from_secs(1)
}

/// The `/links` report of the gateway behind `shared`.
fn links_report(shared: std::sync::Weak<Shared>) -> crate::admin::Report {
    Arc::new(move || {
        let shared = shared.clone();
        Box::pin(async move {
            match shared.upgrade() {
                Some(s) => s.links().await,
                None => "{}".to_owned(),
            }
        })
    })
}

/// Pending TCP connections the kernel may queue: bursts of new workload
/// connections must not be dropped at the door (the std default is 128).
const TCP_BACKLOG: u32 = 4096;

/// A TCP socket for `addr`'s family that may bind a port in TIME_WAIT: a
/// restarted gateway must get its port back while old connections linger.
fn tcp_socket(addr: SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }?;
    sock.set_reuseaddr(true)?;
    Ok(sock)
}

/// A TCP listener with the gateway's backlog, reusing a port in TIME_WAIT.
fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = tcp_socket(addr)?;
    sock.bind(addr)?;
    sock.listen(TCP_BACKLOG)
}

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
        let sock = tcp_socket(addr)?;
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
