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
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trellis_ca::tls::{CertSource, TrustStore};
use trellis_ca::{Credentials, Role, TrustBundle, TrustDomain};

use crate::config::GatewayConfig;
use crate::error::GatewayError;
use crate::metrics::{Metrics, PeerLabels};
use crate::peer::{LinkError, LinkParams, PeerLink};
use crate::quic;
use crate::relay::{BoxStream, ReadError, Rewind, read_header, splice, write_all_flush};
use crate::routes::Routes;
use crate::sni::{MAX_CLIENT_HELLO, MeshName, client_hello_sni};
use crate::tunnel::{Decoded, Header, Reply, ReplyCode};

/// How long a new TCP client may take to send its ClientHello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// A gateway with its sockets bound, ready to [`Gateway::run`].
pub struct Gateway {
    shared: Arc<Shared>,
    tcp: TcpListener,
    admin: TcpListener,
    endpoint: quinn::Endpoint,
}

struct Shared {
    cfg: GatewayConfig,
    certs: Arc<CertSource>,
    trust: Arc<TrustStore>,
    /// Reload credentials from `cfg.credentials` when the files change.
    watch_credentials: bool,
    routes: ArcSwap<Routes>,
    peers: HashMap<String, Arc<PeerLink>>,
    metrics: Arc<Metrics>,
    registry: Registry,
    streams: Arc<Semaphore>,
    fallback_tls: TlsAcceptor,
    tunnel_sni: String,
    draining: AtomicBool,
    tracker: TaskTracker,
    /// Fires when the drain starts: connections stop taking new streams.
    stopping: CancellationToken,
    /// Fires after the drain deadline: cuts streams still running.
    force: CancellationToken,
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

        let (tcp, udp) = bind_pair(cfg.listen)?;
        let admin = TcpListener::bind(cfg.admin)
            .await
            .map_err(|source| GatewayError::Bind {
                what: "admin",
                addr: cfg.admin,
                source,
            })?;
        let server = quic::server_config(certs.clone(), trust.clone(), &cfg.quic)?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            udp,
            Arc::new(quinn::TokioRuntime),
        )?;

        let metrics = Arc::new(Metrics::default());
        let mut registry = Registry::default();
        metrics.register(&mut registry);

        let mut peers = HashMap::new();
        for p in &cfg.peers {
            let policy = quic::peer_policy(&td, &p.zone, p.name.as_deref());
            let (quic_cfg, h2_tls) =
                quic::client_configs(certs.clone(), trust.clone(), policy, &cfg.quic)?;
            let link = PeerLink::new(LinkParams {
                zone: p.zone.clone(),
                addr: p.address,
                transport: p.transport,
                sni: GatewayConfig::tunnel_sni(&p.zone, &cfg.dns_suffix),
                endpoint: endpoint.clone(),
                quic_cfg,
                h2_tls,
                settings: cfg.quic.clone(),
                timeout: cfg.connect_timeout,
                metrics: metrics.clone(),
            });
            peers.insert(p.zone.clone(), Arc::new(link));
        }

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
            peers,
            metrics,
            registry,
            draining: AtomicBool::new(false),
            tracker: TaskTracker::new(),
            stopping: CancellationToken::new(),
            force: CancellationToken::new(),
            cfg,
        });
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
            tokio::spawn(crate::reload::watch(
                shared.cfg.credentials.clone(),
                shared.cfg.zone.clone(),
                shared.certs.clone(),
                shared.trust.clone(),
                shared.cfg.credentials_poll,
                shutdown.clone(),
            ));
        }
        let admin_loop = serve_admin(shared.clone(), admin, shutdown.clone());
        let admin_task = tokio::spawn(admin_loop);
        tokio::join!(tcp_loop, quic_loop);

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
        for p in shared.peers.values() {
            p.close().await;
        }
        endpoint.close(0u32.into(), b"gateway shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        admin_task.abort();
        tracing::info!("gateway stopped");
        Ok(())
    }
}

/// Pending TCP connections the kernel may queue: bursts of new workload
/// connections must not be dropped at the door (the std default is 128).
const TCP_BACKLOG: u32 = 4096;

/// TCP and UDP on the same port; with port 0, retries until both get one.
fn bind_pair(addr: SocketAddr) -> Result<(TcpListener, std::net::UdpSocket), GatewayError> {
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
    /// A TCP connection: a workload's ClientHello to route by SNI, or a peer
    /// gateway's fallback link, told apart by the SNI.
    async fn handle_tcp(self: Arc<Self>, mut sock: TcpStream, from: SocketAddr) {
        let _ = sock.set_nodelay(true);
        let mut buf = Vec::with_capacity(2048);
        let sni = tokio::time::timeout(HELLO_TIMEOUT, async {
            loop {
                match client_hello_sni(&buf) {
                    Ok(Decoded::Incomplete { needed }) => {
                        let at = buf.len();
                        buf.resize((at + needed).min(MAX_CLIENT_HELLO), 0);
                        let n = sock.read(&mut buf[at..]).await.map_err(|e| e.to_string())?;
                        buf.truncate(at + n);
                        if n == 0 {
                            return Err("closed before a complete ClientHello".to_string());
                        }
                    }
                    Ok(Decoded::Complete { value, .. }) => {
                        return value.ok_or_else(|| "ClientHello without SNI".to_string());
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
        })
        .await
        .unwrap_or_else(|_| Err("no ClientHello within 10s".into()));
        let sni = match sni {
            Ok(s) => s,
            Err(reason) => {
                self.metrics.protocol_errors.inc();
                tracing::info!(%from, %reason, "TCP connection refused");
                return;
            }
        };
        if sni == self.tunnel_sni {
            self.serve_fallback(Rewind::new(buf, sock), from).await;
            return;
        }
        let dest = match MeshName::parse(&sni, &self.cfg.dns_suffix) {
            Ok(d) => d,
            Err(reason) => {
                self.metrics.protocol_errors.inc();
                tracing::info!(%from, %reason, "TCP connection refused: SNI is not a mesh name");
                return;
            }
        };
        self.ingress(sock, buf, dest, from).await;
    }

    /// Routes a workload connection from our zone to the zone its SNI names.
    async fn ingress(&self, mut sock: TcpStream, hello: Vec<u8>, dest: MeshName, from: SocketAddr) {
        let service = format!("{}.{}", dest.service, dest.namespace);
        let Ok(_permit) = self.streams.clone().try_acquire_owned() else {
            self.metrics.stream(
                "outbound",
                &dest.zone,
                &service,
                ReplyCode::Overloaded.as_str(),
            );
            tracing::warn!(%from, %service, "refused: stream limit reached");
            return;
        };
        let header = Header {
            service: dest.service.clone(),
            namespace: dest.namespace.clone(),
            port: dest.port,
            source_zone: self.cfg.zone.clone(),
            traceparent: None,
        };
        if dest.zone == self.cfg.zone {
            // A name in our own zone: serve it like a stream from a peer.
            let mut prefixed: BoxStream = Box::new(Rewind::new(hello, sock));
            self.route_local(&mut prefixed, &header, "outbound", &dest.zone)
                .await;
            return;
        }
        let Some(link) = self.peers.get(&dest.zone) else {
            self.metrics.stream(
                "outbound",
                &dest.zone,
                &service,
                ReplyCode::UnknownService.as_str(),
            );
            tracing::info!(%from, zone = %dest.zone, %service, "refused: no gateway known for zone");
            return;
        };
        let (mut stream, via) = match link.open(&header).await {
            Ok(s) => s,
            Err(e) => {
                let outcome = match &e {
                    LinkError::Refused { reply, .. } => reply.code.as_str(),
                    LinkError::Unreachable { .. } => "peer_unreachable",
                    LinkError::NoReply { .. } => "peer_no_reply",
                };
                self.metrics
                    .stream("outbound", &dest.zone, &service, outcome);
                tracing::info!(%from, %service, error = %e, "outbound stream refused");
                return;
            }
        };
        self.metrics.stream(
            "outbound",
            &dest.zone,
            &service,
            ReplyCode::Accepted.as_str(),
        );
        if let Err(e) = write_all_flush(&mut stream, &hello).await {
            tracing::debug!(error = %e, "peer stream failed before the ClientHello was sent");
            return;
        }
        tracing::debug!(%from, %service, zone = %dest.zone, ?via, "outbound stream open");
        self.splice_counted(&mut sock, &mut stream, "outbound")
            .await;
    }

    /// A QUIC connection from a peer gateway: authenticate, then serve its streams.
    async fn handle_quic(self: Arc<Self>, incoming: quinn::Incoming) {
        let remote = incoming.remote_address();
        let conn = match incoming.await {
            Ok(c) => c,
            Err(e) => {
                self.metrics
                    .handshake_failures
                    .get_or_create(&PeerLabels {
                        peer_zone: "unknown".into(),
                        transport: "quic",
                    })
                    .inc();
                tracing::warn!(%remote, error = %e, "QUIC handshake with a peer failed");
                return;
            }
        };
        let certs = conn.peer_identity().and_then(|a| {
            a.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
                .ok()
        });
        let Some(zone) = certs.and_then(|c| peer_zone(&c)) else {
            conn.close(1u32.into(), b"not a gateway");
            return;
        };
        tracing::info!(%remote, peer_zone = %zone, "QUIC peer connected");
        loop {
            // Open streams hold their own references to the connection, so
            // leaving this loop on drain stops new streams but not theirs.
            let next = tokio::select! {
                () = self.stopping.cancelled() => break,
                s = conn.accept_bi() => s,
            };
            match next {
                Ok((send, recv)) => {
                    let s = self.clone();
                    let zone = zone.clone();
                    self.tracker.spawn(async move {
                        let mut stream: BoxStream = Box::new(tokio::io::join(recv, send));
                        s.accept_stream(&mut stream, &zone).await;
                    });
                }
                Err(e) => {
                    tracing::info!(%remote, peer_zone = %zone, reason = %e, "QUIC peer disconnected");
                    break;
                }
            }
        }
    }

    /// A peer gateway's fallback link: TLS, then HTTP/2 CONNECT streams.
    async fn serve_fallback(self: Arc<Self>, sock: Rewind<TcpStream>, from: SocketAddr) {
        let tls = match self.fallback_tls.accept(sock).await {
            Ok(t) => t,
            Err(e) => {
                self.metrics
                    .handshake_failures
                    .get_or_create(&PeerLabels {
                        peer_zone: "unknown".into(),
                        transport: "tcp",
                    })
                    .inc();
                tracing::warn!(%from, error = %e, "TLS handshake with a fallback peer failed");
                return;
            }
        };
        let Some(zone) = tls.get_ref().1.peer_certificates().and_then(peer_zone) else {
            return;
        };
        tracing::info!(%from, peer_zone = %zone, "TCP fallback peer connected");
        let s = self.clone();
        let svc = service_fn(move |req: Request<Incoming>| {
            let s = s.clone();
            let zone = zone.clone();
            async move { Ok::<_, std::convert::Infallible>(s.fallback_request(req, zone)) }
        });
        let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .initial_stream_window_size(self.cfg.quic.stream_receive_window)
            .initial_connection_window_size(self.cfg.quic.receive_window)
            .max_concurrent_streams(self.cfg.quic.max_concurrent_streams)
            .keep_alive_interval(self.cfg.quic.keep_alive)
            .keep_alive_timeout(self.cfg.quic.idle_timeout);
        let conn = b.serve_connection(TokioIo::new(tls), svc);
        tokio::pin!(conn);
        let result = tokio::select! {
            r = conn.as_mut() => Some(r),
            () = self.stopping.cancelled() => None,
        };
        let result = match result {
            Some(r) => r,
            None => {
                // GOAWAY: no new streams; the open ones run to their end.
                conn.as_mut().graceful_shutdown();
                tokio::select! {
                    r = conn.as_mut() => r,
                    () = self.force.cancelled() => Ok(()),
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(%from, error = %e, "fallback link closed");
        }
    }

    fn fallback_request(
        self: &Arc<Self>,
        req: Request<Incoming>,
        zone: String,
    ) -> Response<Empty<Bytes>> {
        if req.method() != Method::CONNECT {
            return status(StatusCode::METHOD_NOT_ALLOWED);
        }
        let s = self.clone();
        self.tracker.spawn(async move {
            match hyper::upgrade::on(req).await {
                Ok(up) => {
                    let mut stream: BoxStream = Box::new(TokioIo::new(up));
                    s.accept_stream(&mut stream, &zone).await;
                }
                Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
            }
        });
        status(StatusCode::OK)
    }

    /// A stream from a peer gateway: read the header, check it, route it.
    async fn accept_stream(&self, stream: &mut BoxStream, peer_zone: &str) {
        let header = match read_header(stream, self.cfg.connect_timeout).await {
            Ok(h) => h,
            Err(e) => {
                if matches!(e, ReadError::Protocol(_)) {
                    self.metrics.protocol_errors.inc();
                    let reply = Reply::refused(ReplyCode::ProtocolError, e.to_string());
                    let _ = write_all_flush(stream, &reply.encode()).await;
                }
                tracing::info!(%peer_zone, error = %e, "bad stream header from peer");
                return;
            }
        };
        let service = format!("{}.{}", header.service, header.namespace);
        let refuse = |code: ReplyCode, reason: String| Reply::refused(code, reason);
        let refusal = if header.source_zone != peer_zone {
            // The zone in the header decides exports; only the authenticated
            // identity may vouch for it.
            Some(refuse(
                ReplyCode::Forbidden,
                format!(
                    "header claims zone {} but the peer is a gateway of zone {peer_zone}",
                    header.source_zone
                ),
            ))
        } else if self.draining.load(Ordering::SeqCst) {
            Some(refuse(ReplyCode::Overloaded, "gateway is draining".into()))
        } else {
            None
        };
        if let Some(reply) = refusal {
            self.refuse(stream, reply, "inbound", peer_zone, &service)
                .await;
            return;
        }
        let Ok(_permit) = self.streams.clone().try_acquire_owned() else {
            let reply = refuse(ReplyCode::Overloaded, "stream limit reached".into());
            self.refuse(stream, reply, "inbound", peer_zone, &service)
                .await;
            return;
        };
        self.route_local(stream, &header, "inbound", peer_zone)
            .await;
    }

    /// Connects a stream to a local endpoint of `header`'s service, replying
    /// first when the stream came from a peer.
    async fn route_local(
        &self,
        stream: &mut BoxStream,
        header: &Header,
        direction: &'static str,
        zone: &str,
    ) {
        let service = format!("{}.{}", header.service, header.namespace);
        let candidates = match self.routes.load().pick(
            &header.namespace,
            &header.service,
            &header.source_zone,
            2,
        ) {
            Ok(c) => c,
            Err(reply) => {
                self.refuse(stream, reply, direction, zone, &service).await;
                return;
            }
        };
        let mut last_err = String::new();
        for ep in candidates {
            let guard = ep.track();
            match tokio::time::timeout(self.cfg.connect_timeout, TcpStream::connect(ep.addr)).await
            {
                Ok(Ok(mut up)) => {
                    let _ = up.set_nodelay(true);
                    if direction == "inbound" {
                        let ok = Reply::accepted().encode();
                        if write_all_flush(stream, &ok).await.is_err() {
                            return;
                        }
                    }
                    self.metrics
                        .stream(direction, zone, &service, ReplyCode::Accepted.as_str());
                    self.splice_counted(&mut up, stream, direction).await;
                    drop(guard);
                    return;
                }
                Ok(Err(e)) => last_err = format!("{}: {e}", ep.addr),
                Err(_) => last_err = format!("{}: connect timed out", ep.addr),
            }
        }
        let reply = Reply::refused(
            ReplyCode::UpstreamFailed,
            format!("endpoint unreachable ({last_err})"),
        );
        self.refuse(stream, reply, direction, zone, &service).await;
    }

    async fn refuse(
        &self,
        stream: &mut BoxStream,
        reply: Reply,
        direction: &'static str,
        zone: &str,
        service: &str,
    ) {
        self.metrics
            .stream(direction, zone, service, reply.code.as_str());
        tracing::info!(
            direction,
            peer_zone = %zone,
            %service,
            code = %reply.code,
            reason = %reply.reason,
            "stream refused"
        );
        if direction == "inbound" {
            let _ = write_all_flush(stream, &reply.encode()).await;
            let _ = tokio::io::AsyncWriteExt::shutdown(stream).await;
        }
    }

    /// Splices until both sides end or the drain deadline cuts it.
    async fn splice_counted<A, B>(
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
                Ok((from_zone, to_zone)) => self.metrics.spliced(direction, to_zone, from_zone),
                Err(e) => tracing::debug!(error = %e, "stream ended with an error"),
            },
            () = self.force.cancelled() => {}
        }
        self.metrics.active_streams.dec();
    }
}

fn peer_zone(certs: &[rustls_pki_types::CertificateDer<'_>]) -> Option<String> {
    match trellis_ca::tls::peer_id(Some(certs))?.role()? {
        Role::Gateway { zone, .. } => Some(zone),
        _ => None,
    }
}

fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    let mut r = Response::new(Empty::new());
    *r.status_mut() = code;
    r
}

/// `/metrics`, `/ready` (503 while draining), `/healthz`, `/config_dump`.
async fn serve_admin(shared: Arc<Shared>, listener: TcpListener, shutdown: CancellationToken) {
    loop {
        let (sock, _) = tokio::select! {
            () = shutdown.cancelled() => return,
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
        };
        let s = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let s = s.clone();
                async move { Ok::<_, std::convert::Infallible>(admin_response(&s, req.uri().path())) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(sock), svc)
                .await;
        });
    }
}

fn admin_response(s: &Shared, path: &str) -> Response<Full<Bytes>> {
    let (code, ctype, body) = match path {
        "/metrics" => {
            let mut out = String::new();
            match prometheus_client::encoding::text::encode(&mut out, &s.registry) {
                Ok(()) => (
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    out,
                ),
                Err(e) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    e.to_string(),
                ),
            }
        }
        "/ready" if s.draining.load(Ordering::SeqCst) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "draining\n".into(),
        ),
        "/ready" | "/healthz" => (StatusCode::OK, "text/plain", "ok\n".into()),
        "/config_dump" => match toml::to_string_pretty(&s.cfg) {
            Ok(t) => (StatusCode::OK, "application/toml", t),
            Err(e) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                e.to_string(),
            ),
        },
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    if let Ok(v) = http::HeaderValue::from_str(ctype) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}
