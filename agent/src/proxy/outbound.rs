//! Outbound: each mesh service this host can call has a loopback address on
//! which the agent listens for its ports. What arrives there is read first:
//! HTTP (HTTP/1.1 request line or HTTP/2 preface) is served by the agent,
//! each request forwarded on its own stream; anything else (or silence, for
//! protocols where the server speaks first) is opaque TCP, carried whole on
//! one stream. A port's declared protocol skips the reading.
//!
//! Streams ride pooled mutual-TLS HTTP/2 connections ([`trellis_proxy::pool`])
//! with the local workload's identity: straight to an endpoint's sidecar in
//! this zone, or when there is none, through this zone's gateway to the
//! nearest zone that serves it (the SNI names the destination; the gateways
//! pass the TLS through), or over the edge link on a host without a gateway.
//!
//! Where a stream goes is decided when it starts, from the directory current
//! at that moment, so registry changes apply to the next connection or
//! request.

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trellis_ca::SpiffeId;
use trellis_ca::tls::{self, CertSource, PeerPolicy, TrustStore};
use trellis_gateway::edge::EdgeLink;
use trellis_proxy::forward::{self, Body, Limits};
use trellis_proxy::hbone::{self, AppProtocol};
use trellis_proxy::io::{BoxStream, Duplex, H2Stream, Rewind};
use trellis_proxy::metrics::{Exchange, Peers, Reporter, Reporters, TrafficMetrics};
use trellis_proxy::pool::{Checkout, Key, Lease, Pool, Tls};
use trellis_proxy::protocol::{self, Declared, Detected};
use trellis_proxy::sni::MeshName;

use crate::directory::{Directory, Entry};
use crate::metrics::Metrics;

use super::relay;

/// The outbound side, shared by every outbound listener.
pub(crate) struct Outbound {
    pub(crate) directory: Arc<ArcSwap<Directory>>,
    pub(crate) zone: String,
    pub(crate) suffix: String,
    pub(crate) certs: Arc<CertSource>,
    pub(crate) trust: Arc<TrustStore>,
    pub(crate) timeout: Duration,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) traffic: Arc<TrafficMetrics>,
    pub(crate) reporters: Reporters,
    /// In a zone without a gateway: the link to another zone's gateway.
    pub(crate) edge: Option<Arc<EdgeLink>>,
    /// TLS connectors by entry, rebuilt when its allowed identities change.
    pub(crate) connectors: Mutex<HashMap<String, Connector>>,
    pub(crate) pool: Arc<Pool>,
    /// How long a client may stay silent before its connection is taken
    /// for a protocol in which the server speaks first.
    pub(crate) detect_timeout: Duration,
    pub(crate) limits: Limits,
}

/// A TLS connector for one entry, with the identities it admits.
pub(crate) struct Connector {
    identities: BTreeSet<String>,
    tls: TlsConnector,
    /// `identities`, joined: the pool key part.
    peers: Arc<str>,
}

/// Where one attempt goes.
#[derive(Debug, Clone, Copy)]
enum Via {
    /// TCP to this address (an endpoint's sidecar, or the zone's gateway).
    Tcp(SocketAddr),
    /// A stream over the edge link.
    Edge,
}

/// One way to the destination.
struct Route {
    via: Via,
    sni: String,
    zone: String,
    /// `local`, `gateway` or `edge`, for the connection metrics.
    kind: &'static str,
}

/// A stream to the destination, or the one TLS connection of an older peer.
enum Opened {
    Pooled(Lease),
    Single(Box<Tls>),
}

/// A stream made, with what the metrics need.
struct Link {
    opened: Opened,
    route: Route,
    /// The identity that answered.
    peer: String,
}

/// Why a `CONNECT` stream did not open.
enum Tunnel {
    /// The destination answered, with this status and reason.
    Refused(StatusCode, String),
    /// The stream failed before an answer; another route may do.
    Failed(String),
}

/// Why no stream could be made.
struct NoRoute {
    label: String,
    reason: String,
}

impl Outbound {
    /// The connector that admits exactly the identities `e` (labelled
    /// `label`) lists, and those identities as one pool key part.
    fn connector(&self, e: &Entry, label: &str) -> Result<(TlsConnector, Arc<str>), String> {
        let mut cache = self
            .connectors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = cache.get(label)
            && c.identities == e.identities
        {
            return Ok((c.tls.clone(), c.peers.clone()));
        }
        let ids: Vec<SpiffeId> = e.identities.iter().filter_map(|i| i.parse().ok()).collect();
        let mut client = tls::client_config(
            self.certs.clone(),
            self.trust.clone(),
            PeerPolicy::AllowList(ids),
        )
        .map_err(|err| err.to_string())?;
        client.alpn_protocols = vec![hbone::ALPN.to_vec()];
        let c = Connector {
            identities: e.identities.clone(),
            tls: TlsConnector::from(Arc::new(client)),
            peers: e
                .identities
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(",")
                .into(),
        };
        let out = (c.tls.clone(), c.peers.clone());
        cache.insert(label.to_owned(), c);
        Ok(out)
    }

    /// The routes to try, in order: local endpoints (in random order, so load
    /// spreads), then each zone that serves the service, nearest first,
    /// through each of this zone's gateways in random order.
    fn routes(&self, e: &Entry, gateways: &[SocketAddr], port: u16) -> Vec<Route> {
        let name = |zone: &str| {
            MeshName {
                subset: None,
                port,
                service: e.name.clone(),
                namespace: e.namespace.clone(),
                zone: zone.to_owned(),
            }
            .to_sni(&self.suffix)
        };
        let mut out: Vec<Route> = e
            .local
            .iter()
            .map(|a| Route {
                via: Via::Tcp(*a),
                sni: name(&self.zone),
                zone: self.zone.clone(),
                kind: "local",
            })
            .collect();
        fastrand::shuffle(&mut out);
        let mut gws = gateways.to_vec();
        fastrand::shuffle(&mut gws);
        for z in &e.zones {
            if self.edge.is_some() && gws.is_empty() {
                out.push(Route {
                    via: Via::Edge,
                    sni: name(z),
                    zone: z.clone(),
                    kind: "edge",
                });
            } else {
                out.extend(gws.iter().map(|g| Route {
                    via: Via::Tcp(*g),
                    sni: name(z),
                    zone: z.clone(),
                    kind: "gateway",
                }));
            }
        }
        out
    }

    /// The entry listening on `to`, now: its label and declared protocol.
    fn entry(&self, to: SocketAddr) -> Result<(String, Declared), NoRoute> {
        let dir = self.directory.load();
        dir.at(to.ip())
            .filter(|e| e.ports.contains(&to.port()))
            .map(|e| (e.label(), e.protocol_of(to.port())))
            .ok_or_else(|| NoRoute {
                label: to.to_string(),
                reason: "no mesh service listens here any more".into(),
            })
    }

    /// A stream to the service listening on `to`: the first route that
    /// yields one. `open` turns a pooled lease into the stream's first
    /// response; an error there tries the next route too.
    async fn link(&self, to: SocketAddr) -> Result<Link, NoRoute> {
        let dir = self.directory.load_full();
        let e = dir
            .at(to.ip())
            .filter(|e| e.ports.contains(&to.port()))
            .ok_or_else(|| NoRoute {
                label: to.to_string(),
                reason: "no mesh service listens here any more".into(),
            })?;
        let label = e.label();
        let (connector, peers) = self.connector(e, &label).map_err(|reason| NoRoute {
            label: label.clone(),
            reason,
        })?;
        let source: Arc<str> = self.certs.id().as_str().into();
        let mut last = String::from("no healthy endpoint in any reachable zone");
        for route in self.routes(e, &dir.gateways, to.port()) {
            let key = Key {
                via: match route.via {
                    Via::Tcp(a) => Some(a),
                    Via::Edge => None,
                },
                sni: route.sni.clone(),
                source: (source.clone(), self.certs.generation()),
                peers: (peers.clone(), self.trust.generation()),
            };
            let dial = || self.dial(&route, e, to.port(), &connector);
            let attempt = self.pool.checkout(&key, dial);
            match tokio::time::timeout(self.timeout, attempt).await {
                Ok(Ok(Checkout::Pooled(lease))) => {
                    let peer = lease.peer().to_owned();
                    return Ok(Link {
                        opened: Opened::Pooled(lease),
                        route,
                        peer,
                    });
                }
                Ok(Ok(Checkout::Single(tls))) => {
                    let peer = tls::peer_id(tls.get_ref().1.peer_certificates())
                        .map(|id| id.to_string())
                        .unwrap_or_default();
                    return Ok(Link {
                        opened: Opened::Single(tls),
                        route,
                        peer,
                    });
                }
                Ok(Err(err)) => last = format!("{} via {:?}: {err}", route.sni, route.via),
                Err(_) => last = format!("{} via {:?}: timed out", route.sni, route.via),
            }
            tracing::debug!(%last, "route failed; trying the next");
        }
        Err(NoRoute {
            label,
            reason: last,
        })
    }

    /// A new TLS connection for `route`.
    async fn dial(
        &self,
        route: &Route,
        e: &Entry,
        port: u16,
        connector: &TlsConnector,
    ) -> Result<Tls, String> {
        let name = ServerName::try_from(route.sni.clone()).map_err(|e| e.to_string())?;
        let stream: BoxStream = match route.via {
            Via::Tcp(addr) => {
                let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
                let _ = tcp.set_nodelay(true);
                Box::new(tcp)
            }
            Via::Edge => {
                let edge = self.edge.as_ref().ok_or("no edge link")?;
                edge.open(&e.name, &e.namespace, port)
                    .await
                    .map_err(|e| e.to_string())?
            }
        };
        // The workload TLS runs inside whichever stream carries it.
        connector
            .connect(name, stream)
            .await
            .map_err(|e| e.to_string())
    }

    /// The labels of requests and connections to `route`.
    fn reporter(&self, to: SocketAddr, route: &Route, peer: &str) -> Reporter {
        let key = format!("{} {} {peer}", route.sni, route.zone);
        self.reporters.get(&key, || self.peers(to, route, peer))
    }

    fn peers(&self, to: SocketAddr, route: &Route, peer: &str) -> Peers {
        let (service, namespace) = MeshName::parse(&route.sni, &self.suffix)
            .map(|n| (n.service, n.namespace))
            .unwrap_or_else(|_| (to.to_string(), String::new()));
        Peers {
            reporter: "source",
            source_zone: self.zone.clone(),
            destination_service: format!("{service}.{namespace}.{}", self.suffix),
            destination_service_name: service,
            destination_service_namespace: namespace,
            destination_zone: route.zone.clone(),
            connection_security_policy: "mutual_tls",
            ..Peers::default()
        }
        .with_source(self.certs.id().as_str())
        .with_destination(peer)
    }

    /// Accepts on one outbound listener until `stop`.
    pub(crate) async fn serve(
        self: Arc<Self>,
        l: TcpListener,
        tracker: TaskTracker,
        stop: CancellationToken,
    ) {
        let Ok(to) = l.local_addr() else { return };
        loop {
            let (app, _) = tokio::select! {
                () = stop.cancelled() => return,
                r = l.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "outbound accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let me = self.clone();
            let stop = stop.clone();
            tracker.spawn(async move { me.handle(app, to, stop).await });
        }
    }

    async fn handle(self: Arc<Self>, mut app: TcpStream, to: SocketAddr, stop: CancellationToken) {
        let _ = app.set_nodelay(true);
        let declared = match self.entry(to) {
            Ok((_, declared)) => declared,
            Err(e) => {
                self.metrics.outbound(&e.label, "no_route");
                Duplex::abort(&mut app);
                return;
            }
        };
        let (detected, prefix) = match protocol::declared(declared) {
            Some(d) => (d, Vec::new()),
            None => match protocol::detect(&mut app, self.detect_timeout).await {
                Ok(x) => x,
                Err(_) => return,
            },
        };
        let app = Rewind::new(prefix, app);
        match detected {
            Detected::Tcp => self.tcp(app, to).await,
            Detected::Http1 | Detected::Http2 => {
                self.http(app, to, declared == Declared::Grpc, stop).await
            }
        }
    }

    /// Opaque TCP: one `CONNECT` stream, spliced.
    async fn tcp(&self, mut app: Rewind<TcpStream>, to: SocketAddr) {
        let mut failed = String::new();
        // A refused stream (the route's endpoint went away, a pooled
        // connection that just closed) tries the next link: nothing of the
        // app's has been sent yet.
        for _ in 0..3 {
            let link = match self.link(to).await {
                Ok(l) => l,
                Err(e) => {
                    self.metrics.outbound(&e.label, "no_route");
                    tracing::warn!(service = %e.label, port = to.port(), error = %e.reason, "no route to the service");
                    Duplex::abort(&mut app);
                    return;
                }
            };
            let label = service_label(&link.route.sni, &self.suffix);
            let who = self.reporter(to, &link.route, &link.peer);
            match link.opened {
                Opened::Single(mut tls) => {
                    self.metrics.outbound(&label, link.route.kind);
                    self.traffic.tcp_opened(&who);
                    let (up, down) = relay(&mut app, &mut *tls).await;
                    self.traffic.tcp_closed(&who, up, down);
                    return;
                }
                Opened::Pooled(lease) => {
                    let mut stream = match self.tunnel(&lease, &link.route.sni, to.port()).await {
                        Ok(s) => s,
                        Err(Tunnel::Refused(status, why)) => {
                            self.metrics.outbound(&label, "refused");
                            tracing::warn!(service = %label, %status, reason = %why, "the destination refused the connection");
                            Duplex::abort(&mut app);
                            return;
                        }
                        Err(Tunnel::Failed(e)) => {
                            failed = format!("stream to {}: {e}", link.route.sni);
                            continue;
                        }
                    };
                    self.metrics.outbound(&label, link.route.kind);
                    self.traffic.tcp_opened(&who);
                    let (up, down) = relay(&mut app, &mut stream).await;
                    self.traffic.tcp_closed(&who, up, down);
                    drop(lease);
                    return;
                }
            }
        }
        tracing::warn!(port = to.port(), error = %failed, "no stream to the service");
        Duplex::abort(&mut app);
    }

    /// A `CONNECT` stream to the app's port behind `sni`, opened.
    async fn tunnel(&self, lease: &Lease, sni: &str, port: u16) -> Result<H2Stream, Tunnel> {
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(hbone::connect_authority(sni, port))
            .version(Version::HTTP_2)
            .header(hbone::SOURCE_ZONE_HEADER, &self.zone)
            .body(forward::empty())
            .map_err(|e| Tunnel::Failed(e.to_string()))?;
        let resp = lease
            .send(req)
            .await
            .map_err(|e| Tunnel::Failed(e.to_string()))?;
        if resp.status() != StatusCode::OK {
            let why = resp
                .headers()
                .get(hbone::ERROR_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("refused")
                .to_owned();
            return Err(Tunnel::Refused(resp.status(), why));
        }
        hyper::upgrade::on(resp)
            .await
            .map(TokioIo::new)
            .map_err(|e| Tunnel::Failed(e.to_string()))
    }

    /// HTTP: the agent serves the app's connection, one stream per request.
    async fn http(
        self: Arc<Self>,
        app: Rewind<TcpStream>,
        to: SocketAddr,
        grpc: bool,
        stop: CancellationToken,
    ) {
        let me = self.clone();
        let svc = service_fn(move |req: Request<Incoming>| {
            let me = me.clone();
            async move { Ok::<_, Infallible>(me.request(req, to, grpc).await) }
        });
        let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        b.http1()
            .auto_date_header(false)
            .preserve_header_case(true)
            .max_buf_size(self.limits.max_header_bytes.max(8192))
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30));
        b.http2()
            .auto_date_header(false)
            .max_header_list_size(u32::try_from(self.limits.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(hbone::DEFAULT_MAX_STREAMS);
        let conn = b.serve_connection_with_upgrades(TokioIo::new(app), svc);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "app HTTP connection ended");
                }
            }
            () = stop.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
    }

    /// One request from the app, forwarded; or the response that says why not.
    async fn request(&self, req: Request<Incoming>, to: SocketAddr, grpc: bool) -> Response<Body> {
        let start = Instant::now();
        let grpc = grpc || forward::is_grpc(req.headers());
        let proto_label = if grpc { "grpc" } else { "http" };
        let upgrade =
            req.method() == Method::CONNECT || req.headers().contains_key(header::UPGRADE);
        let link = match self.link(to).await {
            Ok(l) => l,
            Err(e) => {
                self.metrics.outbound(&e.label, "no_route");
                tracing::warn!(service = %e.label, port = to.port(), error = %e.reason, "no route to the service");
                return forward::refusal(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("no route to {}: {}", e.label, e.reason),
                );
            }
        };
        let label = service_label(&link.route.sni, &self.suffix);
        self.metrics.outbound(&label, link.route.kind);
        let who = self.reporter(to, &link.route, &link.peer);
        let mut exchange = Exchange::new(self.traffic.clone(), who.clone(), start, proto_label);
        if upgrade && req.version() != Version::HTTP_2 {
            exchange.hand_off();
            return self.upgrade(req, link, to, who).await;
        }
        let app_protocol = if req.version() == Version::HTTP_2 {
            AppProtocol::Http2
        } else {
            AppProtocol::Http1
        };
        let (mut parts, body) = req.into_parts();
        let body = match exchange.request_body(&parts.headers, body, &self.limits) {
            Ok(b) => b,
            Err(refusal) => return *refusal,
        };
        // The request as the destination's sidecar gets it: an absolute
        // URI keeps the app's authority (`Host`) as `:authority`.
        let authority = parts
            .uri
            .authority()
            .map(|a| a.to_string())
            .or_else(|| {
                parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| label.clone());
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        forward::strip_hop_by_hop(&mut parts.headers);
        let sent = match link.opened {
            Opened::Pooled(lease) => {
                let Ok(uri) = Uri::builder()
                    .scheme("http")
                    .authority(authority.as_str())
                    .path_and_query(path.as_str())
                    .build()
                else {
                    let r = forward::refusal(
                        StatusCode::BAD_REQUEST,
                        "request target is not a valid URI",
                    );
                    return exchange.local(r, "-");
                };
                parts.uri = uri;
                parts.version = Version::HTTP_2;
                parts.headers.remove(header::HOST);
                parts.headers.insert(
                    hbone::APP_PROTOCOL_HEADER,
                    HeaderValue::from_static(app_protocol.as_str()),
                );
                if let Ok(z) = HeaderValue::from_str(&self.zone) {
                    parts.headers.insert(hbone::SOURCE_ZONE_HEADER, z);
                }
                lease
                    .send(Request::from_parts(parts, body))
                    .await
                    .map(|r| (r, Some(lease)))
            }
            Opened::Single(tls) => {
                // An older destination: HTTP/1.1 on this connection alone.
                parts.version = Version::HTTP_11;
                if let Ok(p) = path.parse() {
                    parts.uri = p;
                }
                if !parts.headers.contains_key(header::HOST)
                    && let Ok(h) = HeaderValue::from_str(&authority)
                {
                    parts.headers.insert(header::HOST, h);
                }
                match hyper::client::conn::http1::handshake(TokioIo::new(tls)).await {
                    Ok((mut send, conn)) => {
                        tokio::spawn(conn);
                        send.send_request(Request::from_parts(parts, body))
                            .await
                            .map(|r| (r, None))
                    }
                    Err(e) => Err(e),
                }
            }
        };
        match sent {
            Ok((resp, lease)) => exchange.respond(resp, lease),
            Err(e) => {
                let r = forward::refusal(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("upstream {label} failed: {e}"),
                );
                exchange.local(r, "UF")
            }
        }
    }

    /// An HTTP/1.1 `Upgrade` (WebSocket) or `CONNECT` from the app: the
    /// request goes on an opaque stream to the app's port, and after a
    /// `101` (or a `2xx` to `CONNECT`) both ends are spliced.
    async fn upgrade(
        &self,
        mut req: Request<Incoming>,
        link: Link,
        to: SocketAddr,
        who: Reporter,
    ) -> Response<Body> {
        let (stream, lease): (BoxStream, Option<Lease>) = match link.opened {
            Opened::Single(tls) => (Box::new(*tls), None),
            Opened::Pooled(lease) => match self.tunnel(&lease, &link.route.sni, to.port()).await {
                Ok(s) => (Box::new(s), Some(lease)),
                Err(Tunnel::Refused(status, why)) => return forward::refusal(status, &why),
                Err(Tunnel::Failed(e)) => {
                    return forward::refusal(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &format!("stream failed: {e}"),
                    );
                }
            },
        };
        let (mut send, conn) =
            match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
                Ok(x) => x,
                Err(e) => {
                    return forward::refusal(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &format!("upstream: {e}"),
                    );
                }
            };
        tokio::spawn(conn.with_upgrades());
        let from_app = hyper::upgrade::on(&mut req);
        let (parts, body) = req.into_parts();
        let mut resp = match send
            .send_request(Request::from_parts(parts, forward::incoming(body)))
            .await
        {
            Ok(r) => r,
            Err(e) => {
                return forward::refusal(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("upstream: {e}"),
                );
            }
        };
        let switched =
            resp.status() == StatusCode::SWITCHING_PROTOCOLS || resp.status().is_success();
        if switched {
            let to_app = hyper::upgrade::on(&mut resp);
            let traffic = self.traffic.clone();
            tokio::spawn(async move {
                let _keep_stream = lease;
                if let (Ok(a), Ok(b)) = (from_app.await, to_app.await) {
                    traffic.tcp_opened(&who);
                    let (up, down) = relay(&mut TokioIo::new(a), &mut TokioIo::new(b)).await;
                    traffic.tcp_closed(&who, up, down);
                }
            });
        }
        let (parts, body) = resp.into_parts();
        Response::from_parts(parts, forward::incoming(body))
    }
}

/// `service.namespace` of an SNI name (the SNI itself if it is not one).
fn service_label(sni: &str, suffix: &str) -> String {
    MeshName::parse(sni, suffix)
        .map(|n| format!("{}.{}", n.service, n.namespace))
        .unwrap_or_else(|_| sni.to_owned())
}
