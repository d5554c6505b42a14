//! Inbound: terminate a caller's mutual TLS, check who it is, and hand the
//! bytes to the local app.
//!
//! The caller's SNI names the destination (`<port>.<service>.<namespace>.
//! <zone>.<suffix>`): the certificate of that local service answers, so the
//! caller can check it reached the service it meant; a name this host does
//! not serve gets no certificate and the handshake fails.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trellis_ca::SpiffeId;
use trellis_ca::tls::{self, CertSource, PeerPolicy, TrustStore};
use trellis_gateway::sni::MeshName;

use arc_swap::ArcSwap;

use crate::config::AgentConfig;
use crate::directory::Directory;
use crate::error::AgentError;
use crate::health::Health;
use crate::metrics::Metrics;

/// The local services' certificates, chosen by SNI.
pub(crate) struct SniCerts {
    suffix: String,
    zone: String,
    by_service: HashMap<(String, String), Arc<CertSource>>,
}

/// Everything the inbound side needs per connection.
pub(crate) struct Inbound {
    suffix: String,
    /// Each local service's app address and ports.
    apps: HashMap<(String, String), (std::net::IpAddr, Vec<u16>)>,
    ids: HashMap<(String, String), SpiffeId>,
    /// Authorization comes from here: configuration plus the store's policy.
    directory: Arc<ArcSwap<Directory>>,
    acceptor: TlsAcceptor,
    metrics: Arc<Metrics>,
    health: HashMap<(String, String), Health>,
    timeout: std::time::Duration,
}

/// Why a caller was turned away.
enum Refusal {
    NoSni,
    NotServed(String),
    Unhealthy(String),
    Denied {
        caller: SpiffeId,
        callee: SpiffeId,
        rule: String,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NoSni => f.write_str("no server name or no caller identity"),
            Refusal::NotServed(why) => write!(f, "not served here: {why}"),
            Refusal::Unhealthy(service) => write!(f, "{service} is failing its health check"),
            Refusal::Denied {
                caller,
                callee,
                rule,
            } => write!(f, "{caller} may not call {callee} ({rule})"),
        }
    }
}

impl SniCerts {
    pub(crate) fn new(
        cfg: &AgentConfig,
        certs: &HashMap<(String, String), Arc<CertSource>>,
    ) -> Self {
        Self {
            suffix: cfg.dns_suffix.clone(),
            zone: cfg.zone.clone(),
            by_service: certs.clone(),
        }
    }
}

impl fmt::Debug for SniCerts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SniCerts")
            .field("services", &self.by_service.len())
            .finish()
    }
}

impl ResolvesServerCert for SniCerts {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = MeshName::parse(hello.server_name()?, &self.suffix).ok()?;
        if name.zone != self.zone {
            return None;
        }
        let certs = self.by_service.get(&(name.namespace, name.service))?;
        ResolvesServerCert::resolve(&**certs, hello)
    }
}

impl Inbound {
    pub(crate) fn new(
        cfg: &AgentConfig,
        certs: &HashMap<(String, String), Arc<CertSource>>,
        trust: Arc<TrustStore>,
        metrics: Arc<Metrics>,
        health: HashMap<(String, String), Health>,
        directory: Arc<ArcSwap<Directory>>,
    ) -> Result<Self, AgentError> {
        let resolver = Arc::new(SniCerts::new(cfg, certs));
        let server = tls::server_config_with_resolver(resolver, trust, PeerPolicy::TrustDomain)?;
        Ok(Self {
            suffix: cfg.dns_suffix.clone(),
            apps: cfg
                .services
                .iter()
                .map(|s| {
                    (
                        (s.namespace.clone(), s.name.clone()),
                        (s.address, s.ports.clone()),
                    )
                })
                .collect(),
            ids: certs.iter().map(|(k, c)| (k.clone(), c.id())).collect(),
            directory,
            acceptor: TlsAcceptor::from(Arc::new(server)),
            metrics,
            health,
            timeout: cfg.connect_timeout,
        })
    }

    pub(crate) async fn serve(
        self: Arc<Self>,
        l: TcpListener,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) {
        loop {
            let (sock, from) = tokio::select! {
                () = shutdown.cancelled() => return,
                r = l.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "inbound accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let me = self.clone();
            tracker.spawn(async move { me.handle(sock, from).await });
        }
    }

    async fn handle(&self, sock: TcpStream, from: SocketAddr) {
        let _ = sock.set_nodelay(true);
        let mut tls = match tokio::time::timeout(self.timeout, self.acceptor.accept(sock)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                self.metrics.inbound("unknown", "handshake_failed");
                tracing::info!(%from, error = %e, "inbound TLS handshake failed");
                return;
            }
            Err(_) => {
                self.metrics.inbound("unknown", "handshake_failed");
                return;
            }
        };
        let (conn_sni, peer) = {
            let c = tls.get_ref().1;
            (
                c.server_name().map(str::to_owned),
                tls::peer_id(c.peer_certificates()),
            )
        };
        let service = conn_sni
            .as_deref()
            .and_then(|s| MeshName::parse(s, &self.suffix).ok())
            .map_or_else(
                || "unknown".to_owned(),
                |n| format!("{}.{}", n.service, n.namespace),
            );
        let target = match self.admit(conn_sni.as_deref(), peer.as_ref()) {
            Ok(port) => port,
            Err(r) => {
                let outcome = match r {
                    Refusal::Denied { .. } => "denied",
                    Refusal::Unhealthy(_) => "unhealthy",
                    Refusal::NoSni | Refusal::NotServed(_) => "not_served",
                };
                self.metrics.inbound(&service, outcome);
                match r {
                    Refusal::Denied {
                        caller,
                        callee,
                        rule,
                    } => {
                        tracing::warn!(%from, %caller, %callee, %rule, "inbound connection denied by policy");
                    }
                    other => tracing::info!(%from, refusal = %other, "inbound connection refused"),
                }
                return;
            }
        };
        let app = target;
        let mut up = match tokio::time::timeout(self.timeout, TcpStream::connect(app)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.metrics.inbound(&service, "app_unreachable");
                tracing::warn!(%app, error = %e, "local app refused the connection");
                trellis_gateway::Duplex::abort(&mut tls);
                return;
            }
            Err(_) => {
                self.metrics.inbound(&service, "app_unreachable");
                return;
            }
        };
        self.metrics.inbound(&service, "accepted");
        let _ = up.set_nodelay(true);
        super::relay(&mut tls, &mut up).await;
    }

    /// The app address to connect to, or why not.
    fn admit(&self, sni: Option<&str>, peer: Option<&SpiffeId>) -> Result<SocketAddr, Refusal> {
        let sni = sni.ok_or(Refusal::NoSni)?;
        let name = MeshName::parse(sni, &self.suffix).map_err(Refusal::NotServed)?;
        let key = (name.namespace.clone(), name.service.clone());
        let (ip, ports) = self
            .apps
            .get(&key)
            .ok_or_else(|| Refusal::NotServed(sni.to_owned()))?;
        if !ports.contains(&name.port) {
            return Err(Refusal::NotServed(format!(
                "{sni}: port {} is not one of the service's",
                name.port
            )));
        }
        if self.health.get(&key).is_some_and(|h| !h.is_healthy()) {
            return Err(Refusal::Unhealthy(format!(
                "{}.{}",
                name.service, name.namespace
            )));
        }
        // The verifier guarantees a SPIFFE ID; no ID means no connection.
        let caller = peer.ok_or(Refusal::NoSni)?;
        let callee = &self.ids[&key];
        let service = format!("{}.{}", name.service, name.namespace);
        self.directory
            .load()
            .authorize(&service, caller)
            .map_err(|rule| Refusal::Denied {
                caller: caller.clone(),
                callee: callee.clone(),
                rule,
            })?;
        Ok(SocketAddr::new(*ip, name.port))
    }
}
