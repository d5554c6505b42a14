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

use std::convert::Infallible;
use std::time::Instant;

use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trellis_ca::SpiffeId;
use trellis_ca::tls::{self, CertSource, PeerPolicy, TrustStore};
use trellis_federation::policy::RequestFacts;
use trellis_proxy::app::{AppError, Apps};
use trellis_proxy::forward::{self, Body, Limits};
use trellis_proxy::hbone::{self, AppProtocol};
use trellis_proxy::metrics::{Exchange, Peers, Reporter, Reporters, TrafficMetrics};
use trellis_proxy::sni::MeshName;
use trellis_proxy::trace::{self, Hop};

use arc_swap::ArcSwap;

use crate::config::{AgentConfig, ProxySettings};
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
    zone: String,
    zones_seen: std::sync::Mutex<std::collections::HashSet<String>>,
    traffic: Arc<TrafficMetrics>,
    reporters: Reporters,
    settings: ProxySettings,
    /// Connections to the local apps.
    apps_http: Apps,
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
        metrics: (Arc<Metrics>, Arc<TrafficMetrics>),
        health: HashMap<(String, String), Health>,
        directory: Arc<ArcSwap<Directory>>,
    ) -> Result<Self, AgentError> {
        let (metrics, traffic) = metrics;
        let resolver = Arc::new(SniCerts::new(cfg, certs));
        let mut server =
            tls::server_config_with_resolver(resolver, trust, PeerPolicy::TrustDomain)?;
        // Callers that offer the pooled protocol get it; older callers offer
        // nothing and get the one-connection splice.
        server.alpn_protocols = vec![hbone::ALPN.to_vec()];
        Ok(Self {
            zone: cfg.zone.clone(),
            zones_seen: Default::default(),
            traffic,
            reporters: Reporters::default(),
            settings: cfg.proxy.clone(),
            apps_http: Apps::new(cfg.connect_timeout),
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
            let stop = shutdown.clone();
            tracker.spawn(async move { me.handle(sock, from, stop).await });
        }
    }

    async fn handle(self: Arc<Self>, sock: TcpStream, from: SocketAddr, stop: CancellationToken) {
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
        if tls.get_ref().1.alpn_protocol() == Some(hbone::ALPN) {
            // A pooled connection outlives handshakes: each stream checks
            // that the certificate the caller proved is still valid.
            let expires = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|leaf| trellis_ca::CertInfo::parse(leaf).ok())
                .map(|i| i.not_after);
            let conn = Arc::new(PooledConn {
                sni: conn_sni,
                peer,
                from,
                expires,
            });
            self.serve_pooled(tls, conn, stop).await;
            return;
        }
        let service = conn_sni
            .as_deref()
            .and_then(|s| MeshName::parse(s, &self.suffix).ok())
            .map_or_else(
                || "unknown".to_owned(),
                |n| format!("{}.{}", n.service, n.namespace),
            );
        let target = match self.admit(conn_sni.as_deref(), peer.as_ref(), None) {
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
                trellis_proxy::io::Duplex::abort(&mut tls);
                return;
            }
            Err(_) => {
                self.metrics.inbound(&service, "app_unreachable");
                return;
            }
        };
        self.metrics.inbound(&service, "accepted");
        let _ = up.set_nodelay(true);
        let who = self.reporter(conn_sni.as_deref(), peer.as_ref(), None);
        let opened = self.traffic.tcp_opened(&who);
        // Bytes to the app were sent by the caller: the caller's "sent".
        let (down, up_bytes) = super::relay(&mut tls, &mut up).await;
        let to = app.to_string();
        self.traffic
            .tcp_closed(&who, opened, down, up_bytes, Some(&to));
    }

    /// The app address to connect to, or why not.
    fn admit(
        &self,
        sni: Option<&str>,
        peer: Option<&SpiffeId>,
        request: Option<RequestFacts<'_>>,
    ) -> Result<SocketAddr, Refusal> {
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
            .authorize(&service, caller, request)
            .map_err(|rule| Refusal::Denied {
                caller: caller.clone(),
                callee: callee.clone(),
                rule,
            })?;
        Ok(SocketAddr::new(*ip, name.port))
    }

    /// The labels of a caller's requests and connections.
    fn reporter(
        &self,
        sni: Option<&str>,
        caller: Option<&SpiffeId>,
        source_zone: Option<&str>,
    ) -> Reporter {
        let key = format!(
            "{} {} {}",
            sni.unwrap_or(""),
            caller.map(SpiffeId::as_str).unwrap_or(""),
            source_zone.unwrap_or("")
        );
        self.reporters
            .get(&key, || self.peers(sni, caller, source_zone))
    }

    /// The `source_zone` label for what a caller said. Telemetry only, and
    /// a caller could send anything: past [`MAX_SOURCE_ZONES`] distinct
    /// names, new ones are `unknown`, so label sets stay bounded.
    fn zone_label(&self, said: Option<&str>) -> String {
        let Some(z) = said else {
            return "unknown".into();
        };
        let mut seen = self
            .zones_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.contains(z) || seen.len() < MAX_SOURCE_ZONES && seen.insert(z.to_owned()) {
            z.to_owned()
        } else {
            "unknown".into()
        }
    }

    fn peers(
        &self,
        sni: Option<&str>,
        caller: Option<&SpiffeId>,
        source_zone: Option<&str>,
    ) -> Peers {
        let name = sni.and_then(|s| MeshName::parse(s, &self.suffix).ok());
        let (service, namespace) = name.as_ref().map_or(("unknown", "unknown"), |n| {
            (&n.service[..], &n.namespace[..])
        });
        let callee = name
            .as_ref()
            .and_then(|n| self.ids.get(&(n.namespace.clone(), n.service.clone())))
            .map(|id| id.to_string())
            .unwrap_or_default();
        Peers {
            reporter: "destination",
            source_zone: self.zone_label(source_zone),
            destination_service: format!("{service}.{namespace}.{}", self.suffix),
            destination_service_name: service.to_owned(),
            destination_service_namespace: namespace.to_owned(),
            destination_zone: self.zone.clone(),
            connection_security_policy: "mutual_tls",
            ..Peers::default()
        }
        .with_source(caller.map(SpiffeId::as_str).unwrap_or(""))
        .with_destination(&callee)
    }

    /// A pooled connection from another sidecar: HTTP/2, one stream per
    /// app connection or request, each admitted on its own.
    async fn serve_pooled(
        self: Arc<Self>,
        tls: tokio_rustls::server::TlsStream<TcpStream>,
        conn: Arc<PooledConn>,
        stop: CancellationToken,
    ) {
        let me = self.clone();
        let svc = service_fn(move |req: Request<Incoming>| {
            let (me, conn) = (me.clone(), conn.clone());
            async move { Ok::<_, Infallible>(me.stream(req, &conn).await) }
        });
        let max_header = u32::try_from(self.settings.max_header_bytes).unwrap_or(u32::MAX);
        let server = hbone::server_builder(self.settings.pool_max_streams, max_header)
            .serve_connection(TokioIo::new(tls), svc);
        tokio::pin!(server);
        tokio::select! {
            r = server.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "pooled connection ended");
                }
            }
            () = stop.cancelled() => {
                // GOAWAY: the caller opens new streams elsewhere; open ones finish.
                server.as_mut().graceful_shutdown();
                let _ = server.await;
            }
        }
    }

    /// One stream of a pooled connection.
    async fn stream(&self, req: Request<Incoming>, conn: &PooledConn) -> Response<Body> {
        let start = Instant::now();
        let source_zone = req
            .headers()
            .get(hbone::SOURCE_ZONE_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|z| trellis_federation::policy::check_label(z).is_ok())
            .map(str::to_owned);
        let who = self.reporter(
            conn.sni.as_deref(),
            conn.peer.as_ref(),
            source_zone.as_deref(),
        );
        let service = format!(
            "{}.{}",
            who.peers().destination_service_name,
            who.peers().destination_service_namespace
        );
        if conn
            .expires
            .is_none_or(|t| t <= std::time::SystemTime::now())
        {
            self.metrics.inbound(&service, "denied");
            return forward::refusal(
                StatusCode::FORBIDDEN,
                "the certificate this connection was opened with has expired",
            );
        }
        let facts = (req.method() != Method::CONNECT).then(|| RequestFacts {
            method: req.method().as_str(),
            path: req.uri().path(),
            headers: req.headers(),
        });
        let grpc = forward::is_grpc(req.headers());
        let app = match self.admit(conn.sni.as_deref(), conn.peer.as_ref(), facts) {
            Ok(a) => a,
            Err(r) => {
                let (outcome, status) = match r {
                    Refusal::Denied { .. } => ("denied", StatusCode::FORBIDDEN),
                    Refusal::Unhealthy(_) => ("unhealthy", StatusCode::SERVICE_UNAVAILABLE),
                    Refusal::NoSni | Refusal::NotServed(_) => {
                        ("not_served", StatusCode::MISDIRECTED_REQUEST)
                    }
                };
                self.metrics.inbound(&service, outcome);
                match &r {
                    Refusal::Denied {
                        caller,
                        callee,
                        rule,
                    } => {
                        tracing::warn!(
                            from = %conn.from, %caller, %callee, %rule,
                            method = %req.method(), path = req.uri().path(),
                            "inbound request denied by policy"
                        );
                    }
                    other => {
                        tracing::info!(from = %conn.from, refusal = %other, "inbound stream refused")
                    }
                }
                if grpc && status == StatusCode::FORBIDDEN {
                    return forward::grpc_refusal(7, &r.to_string());
                }
                return forward::refusal(status, &r.to_string());
            }
        };
        if req.method() == Method::CONNECT {
            return self.connect(req, conn, app, who, &service).await;
        }
        self.metrics.inbound(&service, "accepted");
        let protocol = if grpc { "grpc" } else { "http" };
        let mut exchange = Exchange::new(self.traffic.clone(), who.clone(), start, protocol);
        let (mut parts, body) = req.into_parts();
        let app_protocol = parts
            .headers
            .remove(hbone::APP_PROTOCOL_HEADER)
            .and_then(|v| AppProtocol::parse(v.as_bytes()))
            .unwrap_or(AppProtocol::Http1);
        parts.headers.remove(hbone::SOURCE_ZONE_HEADER);
        forward::strip_hop_by_hop(&mut parts.headers);
        let app_authority = parts
            .uri
            .authority()
            .map_or_else(|| service.clone(), |a| a.to_string());
        exchange.describe(&parts, &app_authority);
        exchange.detail_mut().upstream = Some(app.to_string());
        if trace::enabled() {
            let parent = trace::extract(&parts.headers);
            let name = trace::request_name(&parts, grpc);
            let attrs = || trace::request_attributes(&parts, grpc, &app_authority);
            if let Some(span) = Hop::start(trace::Kind::Server, name, &parent, attrs) {
                exchange.trace(span);
                // The app's own calls continue the trace from this span.
                exchange.inject_trace(&mut parts.headers);
            }
        }
        if self.settings.forward_client_cert {
            let callee = &who.peers().destination_principal;
            let caller = &who.peers().source_principal;
            if let Ok(v) = HeaderValue::from_str(&format!("By={callee};URI={caller}")) {
                parts.headers.insert("x-forwarded-client-cert", v);
            }
        }
        let body = match exchange.request_body(&parts.headers, body, &self.limits()) {
            Ok(b) => b,
            Err(refusal) => return *refusal,
        };
        let sent = self.apps_http.send(app, app_protocol, parts, body).await;
        match sent {
            Ok(resp) => exchange.respond(resp, ()),
            Err(AppError::BadTarget) => {
                let r = forward::refusal(StatusCode::BAD_REQUEST, "bad request target");
                exchange.local(r, "-")
            }
            Err(AppError::Unreachable(e)) => {
                self.metrics.inbound(&service, "app_unreachable");
                tracing::warn!(%app, error = %e, "local app did not answer");
                let r = forward::refusal(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("{service}: the app did not answer: {e}"),
                );
                exchange.local(r, "UF")
            }
        }
    }

    /// A `CONNECT` stream: an opaque connection to the app's port.
    async fn connect(
        &self,
        req: Request<Incoming>,
        conn: &PooledConn,
        app: SocketAddr,
        who: Reporter,
        service: &str,
    ) -> Response<Body> {
        let want = conn
            .sni
            .as_deref()
            .map(|s| hbone::connect_authority(s, app.port()));
        let got = req.uri().authority().map(|a| a.as_str().to_owned());
        if want.is_none() || got != want {
            self.metrics.inbound(service, "not_served");
            return forward::refusal(
                StatusCode::BAD_REQUEST,
                &format!("CONNECT authority {got:?} does not match the connection's name"),
            );
        }
        let mut up = match tokio::time::timeout(self.timeout, TcpStream::connect(app)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.metrics.inbound(service, "app_unreachable");
                tracing::warn!(%app, error = %e, "local app refused the connection");
                return forward::refusal(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("{service}: the app refused the connection: {e}"),
                );
            }
            Err(_) => {
                self.metrics.inbound(service, "app_unreachable");
                return forward::refusal(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("{service}: the app did not accept in time"),
                );
            }
        };
        let _ = up.set_nodelay(true);
        self.metrics.inbound(service, "accepted");
        let traffic = self.traffic.clone();
        let app = app.to_string();
        tokio::spawn(async move {
            match hyper::upgrade::on(req).await {
                Ok(u) => {
                    let opened = traffic.tcp_opened(&who);
                    let (down, back) = super::relay(&mut TokioIo::new(u), &mut up).await;
                    traffic.tcp_closed(&who, opened, down, back, Some(&app));
                }
                Err(e) => tracing::debug!(error = %e, "CONNECT stream ended before it opened"),
            }
        });
        Response::new(forward::empty())
    }

    fn limits(&self) -> Limits {
        Limits {
            max_header_bytes: self.settings.max_header_bytes,
            max_body_bytes: self.settings.max_body_bytes,
        }
    }
}

/// Distinct source zones the metrics label before others become `unknown`.
const MAX_SOURCE_ZONES: usize = 256;

/// What a pooled connection's streams share.
pub(crate) struct PooledConn {
    sni: Option<String>,
    peer: Option<SpiffeId>,
    from: SocketAddr,
    /// When the caller's certificate expires.
    expires: Option<std::time::SystemTime>,
}
