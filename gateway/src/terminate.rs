//! Terminating for plain services: a zone's services without a sidecar at
//! their endpoints (a cluster Service a zone controller exported, marked
//! `trellis.plain`) are reached through this zone's gateway, which ends the
//! caller's mutual TLS in place of the sidecar that is not there.
//!
//! ```text
//! caller's sidecar ══mTLS (SNI names the service; the gateway's identity answers)══▶ gateway ──TCP──▶ app
//! ```
//!
//! The gateway does what the callee's sidecar would: it presents its own
//! certificate (callers admit this zone's gateways for a plain service, and
//! only for one), checks the caller's certificate, enforces the store's
//! `Authorization` documents for the service (the same evaluation as a
//! sidecar, [`Authorizations`]) on every stream, and speaks the pooled
//! protocol (`CONNECT` for opaque TCP, forwarded requests for HTTP). The last
//! hop to the app is plain TCP inside the zone, as the `trellis.plain` label
//! tells callers; nothing leaves the zone in plaintext.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trellis_ca::SpiffeId;
use trellis_ca::tls::{self, CertSource, PeerPolicy, TrustStore};
use trellis_federation::policy::{Authorizations, RequestFacts};
use trellis_proxy::app::{AppError, Apps};
use trellis_proxy::forward::{self, Body};
use trellis_proxy::hbone::{self, AppProtocol};
use trellis_proxy::sni::MeshName;

use crate::error::GatewayError;
use crate::gateway::Shared;
use crate::metrics::Metrics;
use crate::relay::{BoxStream, splice};
use crate::routes::{Routes, Target};
use crate::tunnel::Header;

/// What terminating needs beyond the gateway's routes.
pub(crate) struct Terminating {
    /// Our certificate, any caller of the trust domain, ALPN of the pooled
    /// protocol.
    acceptor: TlsAcceptor,
    /// The store's `Authorization` documents, as of the last revision.
    pub(crate) authz: ArcSwap<Authorizations>,
    apps: Apps,
}

impl Terminating {
    pub(crate) fn new(
        certs: Arc<CertSource>,
        trust: Arc<TrustStore>,
        connect_timeout: std::time::Duration,
    ) -> Result<Self, GatewayError> {
        let mut server = tls::server_config(certs, trust, PeerPolicy::TrustDomain)?;
        // Callers offer the pooled protocol; one that offers nothing gets
        // its one connection spliced to the app.
        server.alpn_protocols = vec![hbone::ALPN.to_vec()];
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            authz: ArcSwap::from_pointee(Authorizations::default()),
            apps: Apps::new(connect_timeout),
        })
    }
}

/// One terminated connection: who called, for what, and what its streams
/// share with the gateway.
struct Conn {
    term: Arc<Terminating>,
    routes: Arc<ArcSwap<Routes>>,
    metrics: Arc<Metrics>,
    tracker: TaskTracker,
    force: CancellationToken,
    header: Header,
    /// `name.namespace`.
    service: String,
    /// `hbone::connect_authority` of the connection's name.
    authority: String,
    caller: SpiffeId,
    /// The zone the stream came from, for the metrics.
    zone: String,
    expires: Option<SystemTime>,
    timeout: std::time::Duration,
}

impl Shared {
    /// Ends the caller's TLS on `stream` (the tunnel stream or zone
    /// connection that named the plain service of `header`) and serves it.
    /// Any refusal after the handshake is an HTTP status with the reason,
    /// or, on a one-connection splice, the connection closed.
    pub(crate) async fn terminate(&self, stream: &mut BoxStream, header: &Header, zone: &str) {
        let service = format!("{}.{}", header.service, header.namespace);
        // This handshake is ours: it counts against `max_handshakes` like
        // the gateway's own.
        let Some(permit) = self.handshake_permit("terminated") else {
            self.metrics
                .stream("terminated", zone, &service, "handshake_failed");
            return;
        };
        let accept = self.terminating.acceptor.accept(stream);
        let tls = match tokio::time::timeout(self.cfg.handshake_timeout, accept).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                self.metrics
                    .stream("terminated", zone, &service, "handshake_failed");
                tracing::info!(%service, peer_zone = %zone, error = %e, "TLS handshake of a plain service's caller failed");
                return;
            }
            Err(_) => {
                self.metrics
                    .stream("terminated", zone, &service, "handshake_failed");
                return;
            }
        };
        drop(permit);
        let c = tls.get_ref().1;
        // The name the caller asked for must be the one the stream was
        // routed by: a caller admitted for one service may not reach another
        // through the same handshake.
        let want = MeshName {
            subset: header.subset.clone(),
            port: header.port,
            service: header.service.clone(),
            namespace: header.namespace.clone(),
            zone: self.cfg.zone.clone(),
        }
        .to_sni(&self.cfg.dns_suffix);
        if c.server_name() != Some(want.as_str()) {
            self.metrics
                .stream("terminated", zone, &service, "not_served");
            tracing::info!(%service, sni = ?c.server_name(), %want, "plain service's caller named another service in its handshake");
            return;
        }
        let Some(caller) = tls::peer_id(c.peer_certificates()) else {
            // The verifier requires an identity; no identity, no stream.
            return;
        };
        let expires = c
            .peer_certificates()
            .and_then(|v| v.first())
            .and_then(|leaf| trellis_ca::CertInfo::parse(leaf).ok())
            .map(|i| i.not_after);
        let pooled = c.alpn_protocol() == Some(hbone::ALPN);
        let conn = Arc::new(Conn {
            term: self.terminating.clone(),
            routes: self.routes.clone(),
            metrics: self.metrics.clone(),
            tracker: self.tracker.clone(),
            force: self.force.clone(),
            header: header.clone(),
            authority: hbone::connect_authority(&want, header.port),
            service,
            caller,
            zone: zone.to_owned(),
            expires,
            timeout: self.cfg.connect_timeout,
        });
        if !pooled {
            let mut tls = tls;
            if let Err(why) = conn.admit(None) {
                tracing::warn!(service = %conn.service, caller = %conn.caller, %why, "plain service's caller denied");
                return;
            }
            // The guard is let go before connecting: nothing holds the
            // routes across an await.
            let targets = conn.routes.load().targets(header, 2);
            let connected = match targets {
                Ok(t) => crate::routes::connect_to(t.endpoints, conn.timeout).await,
                Err(reply) => Err(reply),
            };
            match connected {
                Ok((mut up, _guard)) => {
                    conn.count("accepted");
                    conn.metrics.active_streams.inc();
                    tokio::select! {
                        r = tokio::io::copy_bidirectional(&mut tls, &mut up) => {
                            if let Ok((to, from)) = r {
                                conn.metrics.spliced("terminated", to, from);
                            }
                        }
                        () = self.force.cancelled() => {}
                    }
                    conn.metrics.active_streams.dec();
                }
                Err(reply) => {
                    conn.count("upstream_failed");
                    tracing::info!(service = %conn.service, reason = %reply.reason, "plain service unreachable");
                }
            }
            return;
        }
        let svc = service_fn(move |req: Request<Incoming>| {
            let conn = conn.clone();
            async move { Ok::<_, Infallible>(conn.stream(req).await) }
        });
        let server = hbone::server_builder(hbone::DEFAULT_MAX_STREAMS, 64 * 1024)
            .serve_connection(TokioIo::new(tls), svc);
        tokio::pin!(server);
        tokio::select! {
            r = server.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "terminated connection ended");
                }
            }
            () = self.stopping.cancelled() => {
                // GOAWAY: the caller opens new streams elsewhere; open ones finish.
                server.as_mut().graceful_shutdown();
                tokio::select! {
                    _ = server.as_mut() => {}
                    () = self.force.cancelled() => {}
                }
            }
        }
    }
}

impl Conn {
    fn count(&self, outcome: &'static str) {
        self.metrics
            .stream("terminated", &self.zone, &self.service, outcome);
    }

    /// Whether the caller may make this stream, now.
    fn admit(&self, request: Option<RequestFacts<'_>>) -> Result<(), String> {
        if self.expires.is_none_or(|t| t <= SystemTime::now()) {
            self.count("denied");
            return Err("the certificate this connection was opened with has expired".into());
        }
        self.term
            .authz
            .load()
            .check(&self.service, &self.caller, request)
            .map_err(|rule| {
                self.count("denied");
                format!("{} may not call {} ({rule})", self.caller, self.service)
            })
    }

    /// One stream of a pooled connection.
    async fn stream(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let grpc = forward::is_grpc(req.headers());
        let facts = (req.method() != Method::CONNECT).then(|| RequestFacts {
            method: req.method().as_str(),
            path: req.uri().path(),
            headers: req.headers(),
        });
        if let Err(why) = self.admit(facts) {
            tracing::warn!(service = %self.service, method = %req.method(), path = req.uri().path(), %why, "plain service's caller denied");
            if grpc {
                return forward::grpc_refusal(7, &why);
            }
            return forward::refusal(StatusCode::FORBIDDEN, &why);
        }
        let connect = req.method() == Method::CONNECT;
        // Two to try for a connection; a request goes to the first.
        let targets = match self.targets(if connect { 2 } else { 1 }) {
            Ok(t) => t,
            Err(refusal) => return *refusal,
        };
        if connect {
            return self.connect(req, targets).await;
        }
        let Some((app, endpoint)) = targets.into_iter().next() else {
            self.count("upstream_failed");
            return forward::refusal(StatusCode::SERVICE_UNAVAILABLE, "no endpoint");
        };
        let _guard = endpoint.track();
        let (mut parts, body) = req.into_parts();
        let protocol = parts
            .headers
            .remove(hbone::APP_PROTOCOL_HEADER)
            .and_then(|v| AppProtocol::parse(v.as_bytes()))
            .unwrap_or(AppProtocol::Http1);
        parts.headers.remove(hbone::SOURCE_ZONE_HEADER);
        // Only a proxy that checked the certificate may say who called, and
        // this one does not: a caller's own copy would be believed.
        parts.headers.remove("x-forwarded-client-cert");
        forward::strip_hop_by_hop(&mut parts.headers);
        match self
            .term
            .apps
            .send(app, protocol, parts, forward::incoming(body))
            .await
        {
            Ok(resp) => {
                self.count("accepted");
                let (mut parts, body) = resp.into_parts();
                forward::strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, forward::incoming(body))
            }
            Err(AppError::BadTarget) => {
                self.count("not_served");
                forward::refusal(StatusCode::BAD_REQUEST, "bad request target")
            }
            Err(AppError::Unreachable(e)) => {
                self.count("upstream_failed");
                tracing::warn!(service = %self.service, %app, error = %e, "plain service's app did not answer");
                forward::refusal(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("{}: the app did not answer: {e}", self.service),
                )
            }
        }
    }

    /// Where this connection's streams go now, from one lookup, or the
    /// response refusing the stream. A pooled connection outlives the
    /// revision it was opened under: once a sidecar serves the service
    /// here, this gateway no longer answers for it (`421`), and the
    /// caller's sidecar goes end to end.
    fn targets(&self, n: usize) -> Result<Vec<Target>, Box<Response<Body>>> {
        match self.routes.load().targets(&self.header, n) {
            Ok(t) if t.plain => Ok(t.endpoints),
            Ok(_) => {
                self.count("not_served");
                Err(Box::new(forward::refusal(
                    StatusCode::MISDIRECTED_REQUEST,
                    &format!("{} is no longer a plain service of this zone", self.service),
                )))
            }
            Err(reply) => {
                self.count("upstream_failed");
                Err(Box::new(forward::refusal(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &reply.reason,
                )))
            }
        }
    }

    /// A `CONNECT` stream: an opaque connection to one of `targets`.
    async fn connect(
        self: Arc<Self>,
        req: Request<Incoming>,
        targets: Vec<Target>,
    ) -> Response<Body> {
        let got = req.uri().authority().map(|a| a.as_str());
        if got != Some(self.authority.as_str()) {
            self.count("not_served");
            return forward::refusal(
                StatusCode::BAD_REQUEST,
                &format!("CONNECT authority {got:?} does not match the connection's name"),
            );
        }
        let connected = crate::routes::connect_to(targets, self.timeout).await;
        let (mut up, guard): (TcpStream, _) = match connected {
            Ok(c) => c,
            Err(reply) => {
                self.count("upstream_failed");
                tracing::info!(service = %self.service, reason = %reply.reason, "plain service unreachable");
                return forward::refusal(StatusCode::SERVICE_UNAVAILABLE, &reply.reason);
            }
        };
        self.count("accepted");
        let me = self.clone();
        self.tracker.spawn(async move {
            let _guard = guard;
            let upgraded = tokio::select! {
                u = hyper::upgrade::on(req) => u,
                () = me.force.cancelled() => return,
            };
            match upgraded {
                Ok(u) => {
                    let mut down = TokioIo::new(u);
                    tokio::select! {
                        r = splice(&mut down, &mut up) => if let Ok((to, from)) = r {
                            me.metrics.spliced("terminated", to, from);
                        },
                        () = me.force.cancelled() => {}
                    }
                }
                Err(e) => tracing::debug!(error = %e, "CONNECT stream ended before it opened"),
            }
        });
        Response::new(forward::empty())
    }
}
