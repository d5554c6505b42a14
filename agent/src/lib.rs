//! The host agent: what turns a process on a VM (or in a pod) into a mesh
//! workload. This crate holds the sidecar proxy: inbound mutual TLS in front
//! of the local apps, with L4 authorization by caller identity, and outbound
//! loopback listeners that carry the apps' calls by mutual TLS to the
//! nearest healthy endpoint, directly in the zone or through its gateway.
//!
//! It also answers mesh DNS for the host (service names to the
//! loopback addresses it listens on, SRV records, NXDOMAIN for unknown mesh
//! names, everything else forwarded to the host's resolver).
//!
//! With federation servers configured, the agent bootstraps its identities
//! from a join token (keys made here, CSRs to the store), renews them at
//! half-life, registers its services with their health under a lease, and
//! follows the store's watch: every service in the mesh gets a loopback
//! address, and every change is acknowledged (or rejected with a reason).
//! Without servers it runs on its configuration file alone.

// The workspace denies unsafe code; no library of ours needs it at all.
#![forbid(unsafe_code)]

mod access_log;
mod config;
mod directory;
pub mod dns;
mod error;
mod health;
mod metrics;
mod proxy;
mod signals;
mod store;
mod traffic;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trellis_ca::tls::{CertSource, TrustStore};

pub use config::{
    AccessLogMode, AccessLogSettings, AgentConfig, AuthzRule, EdgeSettings, HealthCheck,
    HealthKind, LocalService, ProxySettings, TracingSettings, Upstream,
};
pub use error::AgentError;
pub use trellis_proxy::protocol::Declared as Protocol;

/// An agent with its listeners bound.
pub struct Agent {
    /// Credential files to watch: prefix, namespace, where they are served.
    watches: Vec<(std::path::PathBuf, String, Arc<CertSource>)>,
    trust: Arc<TrustStore>,
    poll: std::time::Duration,
    drain: std::time::Duration,
    inbound: (TcpListener, Arc<proxy::inbound::Inbound>),
    dns: (tokio::net::UdpSocket, TcpListener, Arc<dns::MeshDns>),
    checks: Vec<(config::HealthCheck, String, SocketAddr, health::Health)>,
    edge: Option<Arc<trellis_gateway::edge::EdgeLink>>,
    admin: (TcpListener, Arc<trellis_proxy::admin::Admin>),
    directory: Arc<ArcSwap<directory::Directory>>,
    outbound: Arc<proxy::outbound::Outbound>,
    /// Outbound listeners bound at start (the static configuration's).
    listeners: Vec<TcpListener>,
    healths: HashMap<(String, String), health::Health>,
    cfg: AgentConfig,
    /// This host's own identity (with a store or an edge link).
    node: Option<(Arc<CertSource>, Arc<TrustStore>)>,
    /// The configuration in force; a reload replaces its live parts.
    config: Arc<tokio::sync::watch::Sender<AgentConfig>>,
    /// Golden-signal summaries, sent to the store (with one).
    signals: Option<Arc<signals::Signals>>,
    access_log: Arc<access_log::AccessLog>,
}

impl Agent {
    /// Loads every local service's credentials and binds the listeners.
    pub async fn bind(cfg: AgentConfig) -> Result<Self, AgentError> {
        cfg.validate()?;
        if cfg.uses_store() {
            store::bootstrap(&cfg).await?;
        }
        let mut certs = HashMap::new();
        let mut trust = None;
        for s in &cfg.services {
            let (creds, bundle) = trellis_ca::load_credentials(&cfg.credentials_of(s))?;
            let id = creds.id()?;
            let want = format!("/ns/{}/sa/", s.namespace);
            if !id.path().starts_with(&want) {
                return Err(AgentError::Config(trellis_proxy::config::ConfigError {
                    field: format!("services {}.{} credentials", s.name, s.namespace),
                    reason: format!(
                        "{id} is not a workload identity of namespace {}",
                        s.namespace
                    ),
                }));
            }
            trust.get_or_insert_with(|| TrustStore::new(bundle));
            certs.insert(
                (s.namespace.clone(), s.name.clone()),
                CertSource::new(creds)?,
            );
        }
        let trust = trust.ok_or_else(|| trellis_proxy::config::ConfigError {
            field: "services".into(),
            reason: "no local service".into(),
        })?;
        let outbound_id = match &cfg.outbound_identity {
            Some(o) => o.clone(),
            None => format!("{}.{}", cfg.services[0].name, cfg.services[0].namespace),
        };
        let out_certs = cfg
            .services
            .iter()
            .find(|s| format!("{}.{}", s.name, s.namespace) == outbound_id)
            .and_then(|s| certs.get(&(s.namespace.clone(), s.name.clone())))
            .cloned()
            .ok_or_else(|| trellis_proxy::config::ConfigError {
                field: "outbound_identity".into(),
                reason: format!("{outbound_id:?} is not a local service"),
            })?;

        let bind = |addr: SocketAddr, what: String| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| AgentError::Bind { what, addr, source })
        };
        let metrics = Arc::new(metrics::Metrics::default());
        let traffic = Arc::new(trellis_proxy::metrics::TrafficMetrics::default());
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        traffic.register(&mut registry);
        let access_log = access_log::AccessLog::start(&cfg.access_log).map_err(|e| {
            trellis_proxy::config::ConfigError {
                field: "access_log.path".into(),
                reason: e.to_string(),
            }
        })?;
        registry.sub_registry_with_prefix("trellis_agent").register(
            "access_log_dropped",
            "Access log lines dropped because the writer fell behind",
            access_log.dropped(),
        );
        traffic.add_observer(access_log.clone());
        let admin_listener = bind(cfg.admin, "admin".into()).await?;
        let admin = Arc::new(trellis_proxy::admin::Admin {
            registry,
            draining: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            config: toml::to_string_pretty(&cfg).unwrap_or_default(),
            reports: Vec::new(),
        });
        let inbound_listener = bind(cfg.inbound, "inbound".into()).await?;
        let healths: HashMap<(String, String), health::Health> = cfg
            .services
            .iter()
            .map(|s| ((s.namespace.clone(), s.name.clone()), health::Health::new()))
            .collect();
        let checks = cfg
            .services
            .iter()
            .filter_map(|s| {
                let check = s.health.clone()?;
                let h = healths[&(s.namespace.clone(), s.name.clone())].clone();
                let app = SocketAddr::new(s.address, s.ports[0]);
                Some((check, format!("{}.{}", s.name, s.namespace), app, h))
            })
            .collect();
        let dns_tcp = bind(cfg.dns, "DNS (TCP)".into()).await?;
        // With port 0, UDP takes the port TCP got, so one address serves both.
        let dns_addr = dns_tcp.local_addr().map_err(|source| AgentError::Bind {
            what: "DNS (TCP)".into(),
            addr: cfg.dns,
            source,
        })?;
        let dns_udp = tokio::net::UdpSocket::bind(dns_addr)
            .await
            .map_err(|source| AgentError::Bind {
                what: "DNS (UDP)".into(),
                addr: dns_addr,
                source,
            })?;
        let forward = cfg.dns_forward.or_else(|| dns::host_resolver(dns_addr));
        let directory = Arc::new(ArcSwap::from_pointee(directory::Directory::from_config(
            &cfg,
        )));
        let mesh_dns = dns::MeshDns::with_metrics(
            metrics.clone(),
            &cfg.dns_suffix,
            directory.clone(),
            forward,
        )
        .map_err(|reason| trellis_proxy::config::ConfigError {
            field: "dns_suffix".into(),
            reason,
        })?
        .with_limits(dns::Limits {
            max_forwarded: cfg.dns_max_forwarded,
            tcp_timeout: cfg.dns_tcp_timeout,
        });
        let healths_all = healths.clone();
        let inbound = Arc::new(proxy::inbound::Inbound::new(
            &cfg,
            &certs,
            trust.clone(),
            (metrics.clone(), traffic.clone()),
            healths.clone(),
            directory.clone(),
        )?);
        let node = if cfg.uses_store() || cfg.edge.is_some() {
            let (creds, bundle) = trellis_ca::load_credentials(&cfg.node_credentials())?;
            Some((CertSource::new(creds)?, TrustStore::new(bundle)))
        } else {
            None
        };
        let edge = match (&cfg.edge, &node) {
            (Some(e), Some((certs, trust))) => Some(Arc::new(edge_link(
                &cfg,
                e,
                &inbound_listener,
                certs.clone(),
                trust.clone(),
            )?)),
            _ => None,
        };
        // Golden signals go to the store's servers: without one, nobody
        // would read them, so nothing is summarised.
        let signals = match (&node, cfg.uses_store()) {
            (Some((certs, _)), true) => {
                let s = Arc::new(signals::Signals::new(
                    certs.id().to_string(),
                    std::time::Instant::now(),
                ));
                traffic.add_observer(s.clone());
                Some(s)
            }
            _ => None,
        };
        let outbound = Arc::new(proxy::outbound::Outbound {
            directory: directory.clone(),
            zone: cfg.zone.clone(),
            suffix: cfg.dns_suffix.clone(),
            certs: out_certs,
            trust: trust.clone(),
            timeout: cfg.connect_timeout,
            metrics: metrics.clone(),
            edge: edge.clone(),
            connectors: std::sync::Mutex::new(HashMap::new()),
            pool: Arc::new(trellis_proxy::pool::Pool::new(
                trellis_proxy::pool::Settings {
                    max_streams: cfg.proxy.pool_max_streams as usize,
                    idle_timeout: cfg.proxy.pool_idle_timeout,
                    max_age: cfg.proxy.pool_max_age,
                },
                traffic.pool_handshakes.clone(),
            )),
            traffic,
            reporters: trellis_proxy::metrics::Reporters::default(),
            detect_timeout: cfg.proxy.detect_timeout,
            limits: trellis_proxy::forward::Limits {
                max_header_bytes: cfg.proxy.max_header_bytes,
                max_body_bytes: cfg.proxy.max_body_bytes,
            },
            state: proxy::balance::State::new(),
        });
        let mut listeners = Vec::new();
        for addr in directory.load().listeners() {
            listeners.push(bind(addr, format!("outbound {addr}")).await?);
        }
        let watches = cfg
            .services
            .iter()
            .filter_map(|s| {
                let c = certs.get(&(s.namespace.clone(), s.name.clone()))?;
                Some((cfg.credentials_of(s), s.namespace.clone(), c.clone()))
            })
            .collect();
        Ok(Self {
            watches,
            trust,
            poll: cfg.credentials_poll,
            drain: cfg.drain_deadline,
            inbound: (inbound_listener, inbound),
            dns: (dns_udp, dns_tcp, Arc::new(mesh_dns)),
            checks,
            edge,
            admin: (admin_listener, admin),
            directory,
            outbound,
            listeners,
            healths: healths_all,
            config: Arc::new(tokio::sync::watch::Sender::new(cfg.clone())),
            access_log,
            node,
            signals,
            cfg,
        })
    }

    /// Where the outbound listeners are, as `service.namespace` and address.
    pub fn outbound_addrs(&self) -> Vec<(String, SocketAddr)> {
        let dir = self.directory.load();
        self.listeners
            .iter()
            .filter_map(|l| {
                let a = l.local_addr().ok()?;
                Some((dir.at(a)?.label(), a))
            })
            .collect()
    }

    /// A handle to apply a changed configuration while running.
    pub fn reloader(&self) -> Reloader {
        Reloader(self.config.clone())
    }

    /// The admin address.
    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        self.admin.0.local_addr()
    }

    /// The mesh DNS address (UDP and TCP).
    pub fn dns_addr(&self) -> std::io::Result<SocketAddr> {
        self.dns.1.local_addr()
    }

    /// The inbound listener's address.
    pub fn inbound_addr(&self) -> std::io::Result<SocketAddr> {
        self.inbound.0.local_addr()
    }

    /// Serves until `shutdown`, then lets open connections finish for up to
    /// the drain deadline.
    pub async fn run(self, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        for (prefix, ns, certs) in &self.watches {
            let want = format!("/ns/{ns}/sa/");
            tokio::spawn(trellis_ca::reload::watch(
                prefix.clone(),
                move |id| id.path().starts_with(&want),
                certs.clone(),
                self.trust.clone(),
                self.poll,
                shutdown.clone(),
            ));
        }
        // The node identity too (the edge link presents it): renewed files
        // without a store, renewals through the store with one.
        if let Some((certs, trust)) = &self.node {
            let zone = self.cfg.zone.clone();
            tokio::spawn(trellis_ca::reload::watch(
                self.cfg.node_credentials(),
                move |id| matches!(id.role(), Some(trellis_ca::Role::Agent { zone: z, .. }) if z == zone),
                certs.clone(),
                trust.clone(),
                self.poll,
                shutdown.clone(),
            ));
        }
        // Registrations end (deregister) when the drain starts, so callers
        // stop choosing this host while its open connections finish.
        let mut registrations = Vec::new();
        let state = if self.cfg.uses_store() {
            match self.start_store(&shutdown, &mut registrations) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "could not follow the federation store; serving on the static configuration");
                    None
                }
            }
        } else {
            None
        };
        self.spawn_directory_loop(state, &shutdown, &tracker);
        // A reload (SIGHUP) takes new access log settings and reopens the
        // file, which is how a rotated log is handed over.
        let mut changes = self.config.subscribe();
        let log = self.access_log.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    changed = changes.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let settings = changes.borrow_and_update().access_log.clone();
                        log.apply(&settings);
                    }
                }
            }
        });
        let (l, inbound) = self.inbound;
        let (udp, tcp, dns) = self.dns;
        // The edge link drains on its own: it lets its streams finish.
        let edge_task = self.edge.clone().map(|link| {
            let stop = shutdown.clone();
            tokio::spawn(async move { link.run(stop).await })
        });
        for (check, service, port, h) in self.checks {
            tokio::spawn(health::run(check, service, port, h, shutdown.clone()));
        }
        tokio::spawn(reap_pool(self.outbound.clone(), shutdown.clone()));
        let (admin_listener, admin) = self.admin;
        let draining = admin.draining.clone();
        // The admin port outlives the drain, so /ready can say 503 meanwhile.
        let admin_task = tokio::spawn(admin.serve(admin_listener, CancellationToken::new()));
        let mut tasks = vec![
            tokio::spawn(inbound.serve(l, tracker.clone(), shutdown.clone())),
            tokio::spawn(dns.serve(udp, tcp, shutdown.clone())),
        ];
        for l in self.listeners {
            tasks.push(tokio::spawn(self.outbound.clone().serve(
                l,
                tracker.clone(),
                shutdown.clone(),
            )));
        }
        for t in tasks {
            let _ = t.await;
        }
        draining.store(true, std::sync::atomic::Ordering::SeqCst);
        for r in registrations {
            let _ = r.await;
        }
        tracker.close();
        if tokio::time::timeout(self.drain, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = tracker.len(),
                "drain deadline passed; closing open connections"
            );
        }
        if let Some(t) = edge_task {
            let _ = tokio::time::timeout(self.drain, t).await;
        }
        admin_task.abort();
        // The requests of the drain are logged too.
        let log = self.access_log.clone();
        let _ = tokio::task::spawn_blocking(move || log.close()).await;
    }

    /// Renewal, registration and the watch, on the node identity.
    fn start_store(
        &self,
        shutdown: &CancellationToken,
        registrations: &mut Vec<tokio::task::JoinHandle<()>>,
    ) -> Result<Option<Followed>, AgentError> {
        let cfg = &self.cfg;
        let Some((node, node_trust)) = self.node.clone() else {
            return Ok(None);
        };
        store::spawn_renewal(
            cfg,
            cfg.node_credentials(),
            node.clone(),
            node_trust.clone(),
            shutdown.clone(),
        )?;
        for (prefix, _, certs) in &self.watches {
            store::spawn_renewal(
                cfg,
                prefix.clone(),
                certs.clone(),
                self.trust.clone(),
                shutdown.clone(),
            )?;
        }
        if let Some(signals) = self.signals.clone() {
            // Its own server list: a report stream moves between servers
            // on its own failures, not the watch's.
            tokio::spawn(trellis_federation::telemetry::report::run(
                store::servers(cfg, node.clone(), node_trust.clone())?,
                cfg.signals_interval,
                move |now| signals.take(now),
                shutdown.clone(),
            ));
        }
        let servers = store::servers(cfg, node, node_trust.clone())?;
        let mut prefixes: Vec<std::path::PathBuf> =
            self.watches.iter().map(|(p, _, _)| p.clone()).collect();
        prefixes.push(cfg.node_credentials());
        tokio::spawn(trellis_federation::view::follow_bundle(
            servers.clone(),
            vec![self.trust.clone(), node_trust],
            prefixes,
            shutdown.clone(),
        ));
        let inbound_port = self
            .inbound
            .0
            .local_addr()
            .map(|a| a.port())
            .unwrap_or(cfg.inbound.port());
        registrations.extend(store::spawn_registrations(
            cfg,
            &servers,
            inbound_port,
            &self.healths,
            shutdown.clone(),
        ));
        // The directory itself is built once per revision, by the loop; the
        // check (run again only when policies change) reports what of them
        // cannot be applied.
        let check: trellis_federation::view::Check = Arc::new(|state| {
            let mut skipped = trellis_federation::policy::Authorizations::from_state(state).skipped;
            skipped.extend(traffic::Policies::from_state(state).skipped);
            Ok(skipped)
        });
        let scope = cfg.scope()?;
        // Acknowledged once the directory loop applied it.
        Ok(Some(trellis_federation::view::follow_applied(
            servers,
            scope,
            check,
            shutdown.clone(),
        )))
    }

    /// Rebuilds the directory whenever the mesh view (with a store) or the
    /// configuration (on reload) changes, and opens and closes the outbound
    /// listeners to match.
    fn spawn_directory_loop(
        &self,
        state: Option<Followed>,
        shutdown: &CancellationToken,
        tracker: &TaskTracker,
    ) {
        let mut cfg_rx = self.config.subscribe();
        let (dir, outbound) = (self.directory.clone(), self.outbound.clone());
        let metrics = self.outbound.metrics.clone();
        let (stop, tracker) = (shutdown.clone(), tracker.clone());
        // Listeners bound at start stay for the agent's life.
        let fixed: std::collections::BTreeSet<SocketAddr> = dir.load().listeners();
        let (mut state, applied) = state.unzip();
        tokio::spawn(async move {
            let mut open: BTreeMap<SocketAddr, CancellationToken> = BTreeMap::new();
            // Listeners that could not be bound, tried again with each
            // revision and every few seconds.
            let mut failed: std::collections::BTreeSet<SocketAddr> = Default::default();
            // Follows the store for the current configuration; a reload
            // builds the next state whole, keeping the names' addresses.
            let mut builder: Option<directory::Builder> = None;
            loop {
                let state_changed = async {
                    match state.as_mut() {
                        Some(rx) => rx.changed().await.is_ok(),
                        None => std::future::pending().await,
                    }
                };
                let mut reloaded = false;
                tokio::select! {
                    () = stop.cancelled() => return,
                    ok = state_changed => if !ok { return },
                    r = cfg_rx.changed() => {
                        if r.is_err() { return }
                        reloaded = true;
                    }
                    () = tokio::time::sleep(std::time::Duration::from_secs(5)), if !failed.is_empty() => {}
                }
                let cfg = cfg_rx.borrow_and_update().clone();
                if reloaded {
                    builder = builder.take().map(|b| b.reconfigure(&cfg));
                }
                let (next, revision) = match state.as_mut() {
                    Some(rx) => {
                        let st = rx.borrow_and_update().clone();
                        if !st.synced {
                            continue;
                        }
                        // Documents the check reported are left out.
                        let b = builder.get_or_insert_with(|| {
                            directory::Builder::new(&cfg, &cfg.trust_domain)
                        });
                        (b.update(&st), st.revision)
                    }
                    None => (directory::Directory::from_config(&cfg), 0),
                };
                let (opened, closed) = next.listener_changes(&dir.load());
                metrics.mesh_names.set(next.len() as i64);
                metrics.mesh_revision.set(revision as i64);
                let want = |a: &SocketAddr| next.at(*a).is_some();
                for addr in closed {
                    if let Some(token) = open.remove(&addr) {
                        token.cancel();
                    }
                }
                let retry: Vec<SocketAddr> = failed.iter().copied().filter(want).collect();
                let failing = std::mem::take(&mut failed);
                dir.store(Arc::new(next));
                let todo: std::collections::BTreeSet<SocketAddr> =
                    opened.into_iter().chain(retry).collect();
                for addr in todo {
                    if open.contains_key(&addr) || fixed.contains(&addr) {
                        continue;
                    }
                    match std::net::TcpListener::bind(addr).and_then(|l| {
                        l.set_nonblocking(true)?;
                        TcpListener::from_std(l)
                    }) {
                        Ok(l) => {
                            let token = stop.child_token();
                            tokio::spawn(outbound.clone().serve(l, tracker.clone(), token.clone()));
                            open.insert(addr, token);
                        }
                        Err(e) => {
                            // Said once; retried quietly while it fails.
                            if !failing.contains(&addr) {
                                tracing::warn!(%addr, error = %e, "could not listen for a mesh service");
                            }
                            failed.insert(addr);
                        }
                    }
                }
                if let Some(applied) = &applied {
                    applied.done(revision);
                }
                tracing::debug!(revision, listeners = open.len(), "mesh view applied");
            }
        });
    }
}

/// Closes idle and aged pooled connections, keeps the pool's gauges, and
/// forgets balancing state nothing has used for a while.
async fn reap_pool(out: Arc<proxy::outbound::Outbound>, stop: CancellationToken) {
    let every = (out.pool.settings().idle_timeout / 4).clamp(
        std::time::Duration::from_millis(100),
        std::time::Duration::from_secs(5),
    );
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let stats = out.pool.reap();
        out.traffic.pool_connections.set(stats.connections as i64);
        out.traffic.pool_streams.set(stats.streams as i64);
        out.state.forget_idle();
    }
}

/// The store's view as the agent follows it, and where it says a revision
/// is applied (which is when the revision is acknowledged).
type Followed = (
    tokio::sync::watch::Receiver<Arc<trellis_federation::view::MeshState>>,
    trellis_federation::view::Applied,
);

/// Applies a changed configuration file to a running agent (SIGHUP).
#[derive(Clone)]
pub struct Reloader(Arc<tokio::sync::watch::Sender<AgentConfig>>);

impl Reloader {
    /// Validates `new` and applies what can change while running (who may
    /// call the local services, the upstreams, the zone gateway, the zone
    /// priority). Returns the changed keys that take effect only at the next
    /// start.
    pub fn apply(
        &self,
        new: AgentConfig,
    ) -> Result<Vec<&'static str>, trellis_proxy::config::ConfigError> {
        new.validate()?;
        let cur = self.0.borrow().clone();
        let ser = |v: &dyn std::fmt::Debug| format!("{v:?}");
        let mut later = Vec::new();
        for (key, a, b) in [
            ("name", ser(&cur.name), ser(&new.name)),
            ("zone", ser(&cur.zone), ser(&new.zone)),
            (
                "trust_domain",
                ser(&cur.trust_domain),
                ser(&new.trust_domain),
            ),
            ("servers", ser(&cur.servers), ser(&new.servers)),
            ("data_dir", ser(&cur.data_dir), ser(&new.data_dir)),
            ("inbound", ser(&cur.inbound), ser(&new.inbound)),
            ("dns", ser(&cur.dns), ser(&new.dns)),
            ("admin", ser(&cur.admin), ser(&new.admin)),
            ("services", ser(&cur.services), ser(&new.services)),
            ("edge", ser(&cur.edge), ser(&new.edge)),
            (
                "outbound_network",
                ser(&cur.outbound_network),
                ser(&new.outbound_network),
            ),
            (
                "lease",
                ser(&cur.lease.as_secs()),
                ser(&new.lease.as_secs()),
            ),
            ("tracing", ser(&cur.tracing), ser(&new.tracing)),
            (
                "signals_interval",
                ser(&cur.signals_interval),
                ser(&new.signals_interval),
            ),
        ] {
            if a != b {
                later.push(key);
            }
        }
        self.0.send_modify(|c| {
            c.authorization = new.authorization;
            c.upstreams = new.upstreams;
            c.gateway = new.gateway;
            c.zone_priority = new.zone_priority;
            c.access_log = new.access_log;
        });
        Ok(later)
    }
}

/// The link of an edge host to another zone's gateway: the gateway's streams
/// for this host's services go to its own inbound listener, so workload TLS
/// stays end to end.
fn edge_link(
    cfg: &AgentConfig,
    e: &config::EdgeSettings,
    inbound: &TcpListener,
    certs: Arc<CertSource>,
    trust: Arc<TrustStore>,
) -> Result<trellis_gateway::edge::EdgeLink, AgentError> {
    let mut local = inbound.local_addr().map_err(|source| AgentError::Bind {
        what: "inbound".into(),
        addr: cfg.inbound,
        source,
    })?;
    if local.ip().is_unspecified() {
        local.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let services = cfg
        .services
        .iter()
        .map(|s| trellis_gateway::config::ServiceConfig {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            // The gateway checked the caller's zone; the inbound side checks
            // the caller's identity against this host's rules.
            export_to: vec!["*".into()],
            endpoints: vec![local],
            plain_ports: Vec::new(),
        })
        .collect();
    let link = trellis_gateway::edge::EdgeLink::with_sources(
        trellis_gateway::edge::EdgeConfig {
            zone: cfg.zone.clone(),
            gateway_zone: e.gateway_zone.clone(),
            gateway: e.gateway,
            dns_suffix: cfg.dns_suffix.clone(),
            bind: e.bind,
            services,
            timeout: cfg.connect_timeout,
            quic: trellis_gateway::config::QuicSettings::default(),
        },
        certs,
        trust,
    )
    .map_err(|err| trellis_proxy::config::ConfigError {
        field: "edge.credentials".into(),
        reason: err.to_string(),
    })?;
    Ok(link)
}
