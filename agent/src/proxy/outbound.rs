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
//!
//! Traffic policy applies here, at the caller: a request is matched against
//! the service's `Route` rules, may be redirected, rate limited, delayed or
//! failed on purpose, goes to a weighted backend (a subset of the service's
//! endpoints, or another service), is admitted under the `Backend`'s
//! connection limits, and is retried within its timeout and the retry
//! budget. Endpoints are chosen by the `Backend`'s balancer among those not
//! ejected by outlier detection, this zone first, then the other zones in
//! failover order (see [`super::balance`] for the state this keeps).

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
use trellis_proxy::trace::{self, Hop};

use trellis_federation::policy::traffic::{
    FaultAbort, LbPolicy, Outlier, Retries, RetryOn, RouteRule, Scheme,
};
use trellis_proxy::replay::Replay;

use crate::directory::{Directory, Entry};
use crate::metrics::Metrics;
use crate::traffic::ServicePolicy;

use super::balance::{self, Outcome};
use super::relay;

/// The route kind of a connection through this zone's gateway.
const GATEWAY: &str = "gateway";

/// The most of a request body kept for retries and mirrors.
const REPLAY_LIMIT: usize = 64 * 1024;

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
    /// Load, latency, failures, budgets and buckets between requests.
    pub(crate) state: balance::State,
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

impl Route {
    /// Where its connections go, for access logs and spans: the peer's or
    /// gateway's address, or the edge link.
    fn upstream(&self) -> String {
        match self.via {
            Via::Tcp(a) => a.to_string(),
            Via::Edge => format!("edge link to {}", self.zone),
        }
    }
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

/// A target an attempt may go to (an endpoint of this zone, or another
/// zone), with the ways to reach it.
struct Candidate {
    routes: Vec<Route>,
    state: Arc<balance::Target>,
}

/// Where a request goes once its rule is chosen.
struct Dest<'a> {
    entry: &'a Entry,
    policy: Arc<ServicePolicy>,
    subset: Option<String>,
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
    /// `label`) lists for a route to `zone`, and those identities as one
    /// pool key part: its workloads', or where `zone` serves it only
    /// through plain endpoints, that zone's gateways' (which terminate for
    /// it there, and nowhere else).
    fn connector(
        &self,
        e: &Entry,
        label: &str,
        zone: &str,
    ) -> Result<(TlsConnector, Arc<str>), String> {
        // A key of its own only for the rare plain route: the common one
        // looks its connector up without allocating.
        let (identities, key): (_, std::borrow::Cow<'_, str>) = match e.plain.get(zone) {
            Some(gateways) => (gateways, format!("{label} plain {zone}").into()),
            None => (&e.identities, label.into()),
        };
        let mut cache = self
            .connectors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = cache.get(&*key)
            && c.identities == *identities
        {
            return Ok((c.tls.clone(), c.peers.clone()));
        }
        let ids: Vec<SpiffeId> = identities.iter().filter_map(|i| i.parse().ok()).collect();
        let mut client = tls::client_config(
            self.certs.clone(),
            self.trust.clone(),
            PeerPolicy::AllowList(ids),
        )
        .map_err(|err| err.to_string())?;
        client.alpn_protocols = vec![hbone::ALPN.to_vec()];
        let c = Connector {
            identities: identities.clone(),
            tls: TlsConnector::from(Arc::new(client)),
            peers: identities
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(",")
                .into(),
        };
        let out = (c.tls.clone(), c.peers.clone());
        cache.insert(key.into_owned(), c);
        Ok(out)
    }

    /// The targets to try for `dest`, best first: the endpoints of this zone
    /// (in the `Backend`'s balancing order), then each other zone that
    /// serves it, in failover order, each through this zone's gateways in
    /// random order. A weighted spill-over for this zone moves its pick to
    /// the front; ejected targets go to the back, tried only when nothing
    /// else is left. `hash` is the consistent-hash header's value.
    fn plan(
        &self,
        dest: &Dest<'_>,
        port: u16,
        hash: Option<&[u8]>,
    ) -> Result<Vec<Candidate>, String> {
        let e = dest.entry;
        let labels = match &dest.subset {
            None => None,
            Some(s) => Some(dest.policy.subset(s).ok_or_else(|| {
                format!("subset {s} of {} is not defined by a Backend", e.label())
            })?),
        };
        let fits = |m: &crate::directory::Member| labels.is_none_or(|l| m.has(l));
        let label = e.label();
        let sub = dest.subset.as_deref().unwrap_or("");
        let sni = |zone: &str| {
            MeshName {
                subset: dest.subset.clone(),
                port,
                service: e.name.clone(),
                namespace: e.namespace.clone(),
                zone: zone.to_owned(),
            }
            .to_sni(&self.suffix)
        };
        let mut local: Vec<Candidate> = e
            .members
            .iter()
            .filter(|m| fits(m))
            .filter_map(|m| m.local)
            .map(|a| Candidate {
                routes: vec![Route {
                    via: Via::Tcp(a),
                    sni: sni(&self.zone),
                    zone: self.zone.clone(),
                    kind: "local",
                }],
                state: self.state.target(&format!("{label} {a}")),
            })
            .collect();
        let backend = dest.policy.backend.as_ref();
        let lb = backend.map(|b| &b.load_balancer);
        order(
            &mut local,
            lb.map_or(LbPolicy::P2c, |l| l.policy),
            hash,
            || self.state.service(&label).next_rr(),
        );
        let mut zones: Vec<&String> = e
            .zones
            .iter()
            .filter(|z| e.members.iter().any(|m| &m.zone == *z && fits(m)))
            .collect();
        let locality = backend.and_then(|b| b.locality.as_ref());
        if let Some(l) = locality.filter(|l| !l.failover.is_empty()) {
            // Stable: zones the list leaves out keep their order, after it.
            zones.sort_by_key(|z| {
                l.failover
                    .iter()
                    .position(|f| f == *z)
                    .unwrap_or(usize::MAX)
            });
        }
        let mut gws = self.directory.load().gateways.clone();
        fastrand::shuffle(&mut gws);
        let mut tiers: Vec<(String, Vec<Candidate>)> = vec![(self.zone.clone(), local)];
        let over_edge = self.edge.is_some() && gws.is_empty();
        // The edge link's stream header names no subset: a subset there
        // would quietly become the whole service, so it is not offered.
        let zones = if over_edge && dest.subset.is_some() {
            Vec::new()
        } else {
            zones
        };
        for z in zones {
            let routes = if over_edge {
                vec![Route {
                    via: Via::Edge,
                    sni: sni(z),
                    zone: z.clone(),
                    kind: "edge",
                }]
            } else {
                gws.iter()
                    .map(|g| Route {
                        via: Via::Tcp(*g),
                        sni: sni(z),
                        zone: z.clone(),
                        kind: GATEWAY,
                    })
                    .collect()
            };
            let state = self.state.target(&format!("{label} zone {z} {sub}"));
            tiers.push((z.clone(), vec![Candidate { routes, state }]));
        }
        if let Some(d) = locality.and_then(|l| l.distribute.iter().find(|d| d.from == self.zone)) {
            let weights: Vec<u32> = tiers
                .iter()
                .map(|(z, c)| {
                    if c.is_empty() {
                        0
                    } else {
                        d.to.get(z).copied().unwrap_or(0)
                    }
                })
                .collect();
            if let Some(i) = weighted(&weights) {
                let t = tiers.remove(i);
                tiers.insert(0, t);
            }
        }
        let mut all: Vec<Candidate> = tiers.into_iter().flat_map(|(_, c)| c).collect();
        let now = Instant::now();
        all.sort_by_key(|c| c.state.ejected(now));
        if all.is_empty() {
            return Err(match &dest.subset {
                Some(s) if over_edge => format!(
                    "no healthy endpoint of subset {s} on this host's zone; subsets are not carried over the edge link"
                ),
                Some(s) => format!("no healthy endpoint of subset {s} in any reachable zone"),
                None => "no healthy endpoint in any reachable zone".into(),
            });
        }
        Ok(all)
    }

    /// The entry listening on `to`, now: its label and declared protocol.
    fn entry(&self, to: SocketAddr) -> Result<(String, Declared), NoRoute> {
        let dir = self.directory.load();
        dir.at(to)
            .map(|e| (e.label(), e.protocol_of(to.port())))
            .ok_or_else(|| NoRoute {
                label: to.to_string(),
                reason: "no mesh service listens here any more".into(),
            })
    }

    /// A stream to `c`: the first of its routes that yields one. A target
    /// that cannot be reached counts as failing for outlier detection.
    async fn open(
        &self,
        e: &Entry,
        c: &Candidate,
        port: u16,
        outlier: Option<&Outlier>,
        plan: &[Candidate],
        trace: Option<&str>,
    ) -> Result<Link, String> {
        let label = e.label();
        let source: Arc<str> = self.certs.id().as_str().into();
        let mut last = String::from("no route");
        for route in &c.routes {
            let (connector, peers) = self.connector(e, &label, &route.zone)?;
            let key = Key {
                via: match route.via {
                    Via::Tcp(a) => Some(a),
                    Via::Edge => None,
                },
                sni: route.sni.clone(),
                source: (source.clone(), self.certs.generation()),
                peers: (peers.clone(), self.trust.generation()),
            };
            let dial = || self.dial(route, e, port, &connector, trace);
            let attempt = self.pool.checkout(&key, dial);
            let route = Route {
                via: route.via,
                sni: route.sni.clone(),
                zone: route.zone.clone(),
                kind: route.kind,
            };
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
        self.record(
            &label,
            &c.state,
            Outcome::GatewayError,
            Duration::ZERO,
            outlier,
            plan,
        );
        Err(last)
    }

    /// A stream to the service listening on `to`, for an opaque connection:
    /// the first target of the plan that yields one.
    async fn link(&self, to: SocketAddr) -> Result<Link, NoRoute> {
        let dir = self.directory.load_full();
        let e = dir.at(to).ok_or_else(|| NoRoute {
            label: to.to_string(),
            reason: "no mesh service listens here any more".into(),
        })?;
        let label = e.label();
        let dest = Dest {
            entry: e,
            policy: dir.traffic.of(&e.name, &e.namespace),
            subset: None,
        };
        let plan = self
            .plan(&dest, to.port(), None)
            .map_err(|reason| NoRoute {
                label: label.clone(),
                reason,
            })?;
        let outlier = dest.policy.outlier.as_ref();
        let mut last = String::new();
        for c in &plan {
            match self.open(e, c, to.port(), outlier, &plan, None).await {
                Ok(link) => return Ok(link),
                Err(why) => last = why,
            }
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
        trace: Option<&str>,
    ) -> Result<Tls, String> {
        let name = ServerName::try_from(route.sni.clone()).map_err(|e| e.to_string())?;
        let stream: BoxStream = match route.via {
            Via::Tcp(addr) => {
                let mut tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
                let _ = tcp.set_nodelay(true);
                // A gateway's span for this connection joins the trace of
                // the request that opened it.
                if let (GATEWAY, Some(tp)) = (route.kind, trace) {
                    use tokio::io::AsyncWriteExt;
                    tcp.write_all(&trellis_gateway::preamble::encode(tp))
                        .await
                        .map_err(|e| e.to_string())?;
                }
                Box::new(tcp)
            }
            Via::Edge => {
                let edge = self.edge.as_ref().ok_or("no edge link")?;
                edge.open(&e.name, &e.namespace, port, &route.zone, trace)
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
        // Counted against the Backend's maxConnections while it lasts.
        let _slot = {
            let dir = self.directory.load();
            let Some(e) = dir.at(to) else { return };
            let label = e.label();
            let policy = dir.traffic.of(&e.name, &e.namespace);
            let limits = policy
                .backend
                .as_ref()
                .and_then(|b| b.connection_pool.as_ref());
            match self.state.service(&label).open_tcp(limits) {
                Ok(s) => s,
                Err(balance::Overflow(why)) => {
                    self.metrics.outbound(&label, "overflow");
                    tracing::warn!(service = %label, reason = %why, "connection refused at the limit");
                    Duplex::abort(&mut app);
                    return;
                }
            }
        };
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
                    let opened = self.traffic.tcp_opened(&who);
                    let (up, down) = relay(&mut app, &mut *tls).await;
                    let via = link.route.upstream();
                    self.traffic.tcp_closed(&who, opened, up, down, Some(&via));
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
                    let opened = self.traffic.tcp_opened(&who);
                    let (up, down) = relay(&mut app, &mut stream).await;
                    let via = link.route.upstream();
                    self.traffic.tcp_closed(&who, opened, up, down, Some(&via));
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
            let why = error_reason(resp.headers(), "refused");
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

    /// One request from the app, forwarded under the service's traffic
    /// policy; or the response that says why not.
    async fn request(
        self: &Arc<Self>,
        req: Request<Incoming>,
        to: SocketAddr,
        grpc: bool,
    ) -> Response<Body> {
        let start = Instant::now();
        let grpc = grpc || forward::is_grpc(req.headers());
        let proto_label = if grpc { "grpc" } else { "http" };
        let upgrade =
            req.method() == Method::CONNECT || req.headers().contains_key(header::UPGRADE);
        let dir = self.directory.load_full();
        let Some(e) = dir.at(to) else {
            let label = to.to_string();
            self.metrics.outbound(&label, "no_route");
            return forward::refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("no route to {label}: no mesh service listens here any more"),
            );
        };
        let policy = dir.traffic.of(&e.name, &e.namespace);
        let (mut parts, body) = req.into_parts();
        let caller = self.certs.id();
        let selected = policy.select(to.port(), &parts, &caller);
        if let Some(r) = selected {
            tracing::trace!(rule = %r.id, "route rule matched");
        }
        let rule = selected.map(|r| &r.rule);
        let mut exchange = Exchange::new(
            self.traffic.clone(),
            self.service_reporter(e),
            start,
            proto_label,
        );
        let app_authority = authority_of(&parts).unwrap_or_else(|| e.label());
        exchange.describe(&parts, &app_authority);
        exchange.detail_mut().route = selected.map(|r| r.label.clone());
        if trace::enabled() {
            let parent = trace::extract(&parts.headers);
            let name = trace::request_name(&parts, grpc);
            let attrs = || trace::request_attributes(&parts, grpc, &app_authority);
            if let Some(span) = Hop::start(trace::Kind::Client, name, &parent, attrs) {
                exchange.trace(span);
            }
        }
        if let Some(r) = rule.and_then(|r| r.redirect.as_ref()) {
            return exchange.local(redirect(r, &parts), "-");
        }
        if let Some(wait) = self.rate_limited(e, &policy, rule, &caller) {
            self.metrics.outbound(&e.label(), "rate_limited");
            let secs = wait.as_secs_f64().ceil().max(1.0).to_string();
            let mut r = if grpc {
                forward::grpc_refusal(8, "rate limited by the caller's sidecar (RateLimit)")
            } else {
                forward::refusal(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate limited by the caller's sidecar (RateLimit)",
                )
            };
            if let Ok(v) = HeaderValue::from_str(&secs) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return exchange.local(r, "RL");
        }
        if let Some(f) = rule.and_then(|r| r.fault.as_ref()) {
            if let Some(d) = &f.delay
                && chance(d.percent.fraction())
            {
                tokio::time::sleep(d.fixed.0).await;
            }
            if let Some(a) = &f.abort
                && chance(a.percent.fraction())
            {
                return exchange.local(fault_abort(a), "FI");
            }
        }
        // The backend: by weight among the rule's, or the service itself.
        let (entry, subset) = match rule.map(|r| r.backends.as_slice()).unwrap_or_default() {
            [] => (e, None),
            backends => {
                let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
                let b = &backends[weighted(&weights).unwrap_or(0)];
                let entry = match &b.service {
                    None => e,
                    Some(s) => match dir.named(s.name(), s.namespace(), None) {
                        Some(other) => other,
                        None => {
                            let r = forward::refusal(
                                StatusCode::SERVICE_UNAVAILABLE,
                                &format!(
                                    "no route to {s}: no healthy endpoint in any reachable zone"
                                ),
                            );
                            return exchange.local(r, "UH");
                        }
                    },
                };
                (entry, b.subset.clone())
            }
        };
        let dest = Dest {
            entry,
            policy: if std::ptr::eq(entry, e) {
                policy.clone()
            } else {
                dir.traffic.of(&entry.name, &entry.namespace)
            },
            subset,
        };
        let label = entry.label();
        let svc = self.state.service(&label);
        let limits = dest
            .policy
            .backend
            .as_ref()
            .and_then(|b| b.connection_pool.as_ref());
        let _admitted = match svc.admit(limits).await {
            Ok(a) => a,
            Err(balance::Overflow(why)) => {
                self.metrics.outbound(&label, "overflow");
                let r = forward::refusal(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("{label} is at its limit: {why}"),
                );
                return exchange.local(r, "UO");
            }
        };
        let hash = dest
            .policy
            .backend
            .as_ref()
            .and_then(|b| b.load_balancer.hash_header.as_ref())
            .and_then(|h| parts.headers.get(h.as_str()))
            .map(|v| v.as_bytes().to_vec());
        let plan = match self.plan(&dest, to.port(), hash.as_deref()) {
            Ok(p) => p,
            Err(why) => {
                self.metrics.outbound(&label, "no_route");
                tracing::warn!(service = %label, port = to.port(), error = %why, "no route to the service");
                let r = forward::refusal(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("no route to {label}: {why}"),
                );
                return exchange.local(r, "UH");
            }
        };
        if upgrade && parts.version != Version::HTTP_2 {
            let outlier = dest.policy.outlier.as_ref();
            let mut last = String::new();
            for c in &plan {
                let trace = exchange.traceparent();
                match self
                    .open(entry, c, to.port(), outlier, &plan, trace.as_deref())
                    .await
                {
                    Ok(link) => {
                        self.metrics.outbound(&label, link.route.kind);
                        let who = self.reporter(to, &link.route, &link.peer);
                        exchange.hand_off();
                        let req = Request::from_parts(parts, body);
                        return self.upgrade(req, link, to, who).await;
                    }
                    Err(why) => last = why,
                }
            }
            return forward::refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("no route to {label}: {last}"),
            );
        }
        let app_protocol = if parts.version == Version::HTTP_2 {
            AppProtocol::Http2
        } else {
            AppProtocol::Http1
        };
        let body = match exchange.request_body(&parts.headers, body, &self.limits) {
            Ok(b) => b,
            Err(refusal) => return *refusal,
        };
        // The request as the destination's sidecar gets it: an absolute
        // URI keeps the app's authority (`Host`) as `:authority`.
        let mut authority = authority_of(&parts).unwrap_or_else(|| label.clone());
        let mut path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        forward::strip_hop_by_hop(&mut parts.headers);
        if let Some(r) = rule {
            rewrite(r, &mut path, &mut authority);
            edit_headers(&r.request_headers, &mut parts.headers);
        }
        // The destination continues the trace from this sidecar's span.
        exchange.inject_trace(&mut parts.headers);
        let traceparent = exchange.traceparent();
        let retries = rule.and_then(|r| r.retries.as_ref());
        // A mirror's copy must never outrun the request and take its body
        // past the retry buffer: only bodies known to fit are mirrored.
        let fits = body_fits(&parts.headers, &body);
        let mirror = rule
            .and_then(|r| r.mirror.as_ref())
            .filter(|_| fits)
            .filter(|m| chance(m.percent.fraction()));
        let body = if retries.is_some() || mirror.is_some() {
            ReqBody::Replay(Replay::new(body, REPLAY_LIMIT))
        } else {
            ReqBody::Once(Some(body))
        };
        let Ok(uri) = Uri::builder()
            .scheme("http")
            .authority(authority.as_str())
            .path_and_query(path.as_str())
            .build()
        else {
            let r = forward::refusal(StatusCode::BAD_REQUEST, "request target is not a valid URI");
            return exchange.local(r, "-");
        };
        let head = Head {
            parts,
            uri,
            authority,
            path,
            app_protocol,
            traceparent,
        };
        if let (Some(m), ReqBody::Replay(r)) = (mirror, &body)
            && let Some(copy) = r.try_clone()
        {
            self.mirror(&dir, e, m, &head, copy, to.port());
        }
        let deadline = rule.and_then(|r| r.timeout).map(|t| t.0);
        let now_ms = self.state.now_ms();
        svc.deposit(now_ms);
        let tries = std::sync::atomic::AtomicU32::new(0);
        let attempts = self.attempts(&dest, &plan, &head, retries, body, &svc, to.port(), &tries);
        let outcome = match deadline {
            Some(t) => tokio::time::timeout(t, attempts).await.unwrap_or_else(|_| {
                Err((
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "no answer within the route's timeout of {}",
                        humantime::format_duration(t)
                    ),
                    "UT",
                ))
            }),
            None => attempts.await,
        };
        let tried = tries.load(std::sync::atomic::Ordering::Relaxed);
        exchange.detail_mut().retries = tried.saturating_sub(1);
        match outcome {
            Ok((mut resp, lease, route, peer)) => {
                self.metrics.outbound(&label, route.kind);
                exchange.detail_mut().upstream = Some(route.upstream());
                exchange.set_reporter(self.reporter(to, &route, &peer));
                if let Some(r) = rule {
                    edit_headers(&r.response_headers, resp.headers_mut());
                }
                exchange.respond(resp, lease)
            }
            Err((status, why, flags)) => {
                if flags == "UH" || flags == "UF" {
                    self.metrics.outbound(&label, "no_route");
                }
                tracing::debug!(service = %label, %status, reason = %why, "request failed");
                let r = if grpc && status == StatusCode::GATEWAY_TIMEOUT {
                    forward::grpc_refusal(4, &why)
                } else {
                    forward::refusal(status, &format!("upstream {label}: {why}"))
                };
                exchange.local(r, flags)
            }
        }
    }

    /// Attempts `head` on the plan's targets in order until one answers
    /// with something the retry policy keeps, the attempts or the budget run
    /// out, or the body cannot be sent again.
    #[allow(clippy::too_many_arguments)]
    async fn attempts(
        &self,
        dest: &Dest<'_>,
        plan: &[Candidate],
        head: &Head,
        retries: Option<&Retries>,
        mut body: ReqBody,
        svc: &balance::Service,
        port: u16,
        tries: &std::sync::atomic::AtomicU32,
    ) -> Result<(Response<Incoming>, Option<Lease>, Route, String), Failure> {
        let outlier = dest.policy.outlier.as_ref();
        let max = 1 + retries.map_or(0, |r| r.attempts);
        let per_try = retries.and_then(|r| r.per_try_timeout).map(|d| d.0);
        let mut tried = 0;
        let mut next = 0;
        let mut last: Failure = (
            StatusCode::SERVICE_UNAVAILABLE,
            "no target could be reached".into(),
            "UF",
        );
        loop {
            // A target that cannot be reached was never sent the request:
            // the next is tried at once, whatever the retry policy says.
            let mut opened = None;
            for _ in 0..plan.len() {
                let c = &plan[next % plan.len()];
                next += 1;
                let trace = head.traceparent.as_deref();
                match self.open(dest.entry, c, port, outlier, plan, trace).await {
                    Ok(link) => {
                        opened = Some((link, c));
                        break;
                    }
                    Err(why) => last = (StatusCode::SERVICE_UNAVAILABLE, why, "UF"),
                }
            }
            let Some((link, c)) = opened else {
                return Err(last);
            };
            let Some(b) = body.next() else {
                // The body outgrew the retry buffer: the last answer stands.
                return Err(last);
            };
            tried += 1;
            tries.store(tried, std::sync::atomic::Ordering::Relaxed);
            let Link {
                opened,
                route,
                peer,
            } = link;
            let inflight = c.state.start();
            let began = Instant::now();
            let sent = self.send(opened, head, b);
            let result = match per_try {
                Some(t) => tokio::time::timeout(t, sent)
                    .await
                    .unwrap_or_else(|_| Err(Sent::TimedOut(t))),
                None => sent.await,
            };
            drop(inflight);
            let (outcome, wanted, failure) = match &result {
                Ok((resp, _)) => {
                    let s = resp.status();
                    let outcome = match s.as_u16() {
                        502..=504 => Outcome::GatewayError,
                        500..=599 => Outcome::ServerError,
                        _ => Outcome::Ok,
                    };
                    let grpc = resp
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u8>().ok());
                    let wanted = retries.is_some_and(|r| retry_status(r, s.as_u16(), grpc));
                    let why = error_reason(resp.headers(), "answered");
                    (outcome, wanted, (s, format!("{s} ({why})"), "URX"))
                }
                Err(Sent::Failed(e)) => (
                    Outcome::GatewayError,
                    retries.is_some_and(|r| r.on.contains(&RetryOn::Reset)),
                    (StatusCode::SERVICE_UNAVAILABLE, e.clone(), "UF"),
                ),
                Err(Sent::TimedOut(t)) => (
                    Outcome::GatewayError,
                    retries.is_some_and(|r| retry_status(r, 504, None)),
                    (
                        StatusCode::GATEWAY_TIMEOUT,
                        format!(
                            "no answer within the per-try timeout of {}",
                            humantime::format_duration(*t)
                        ),
                        "UT",
                    ),
                ),
            };
            self.record(
                &dest.entry.label(),
                &c.state,
                outcome,
                began.elapsed(),
                outlier,
                plan,
            );
            let again = wanted
                && tried < max
                && retries.is_some_and(|r| svc.withdraw(self.state.now_ms(), &r.budget));
            if !again {
                return match result {
                    Ok((resp, lease)) => Ok((resp, lease, route, peer)),
                    Err(_) => Err(failure),
                };
            }
            self.metrics.retry(&dest.entry.label());
            tracing::debug!(service = %dest.entry.label(), attempt = tried, reason = %failure.1, "retrying");
            last = failure;
        }
    }

    /// Sends one attempt of `head` on `opened`.
    async fn send(
        &self,
        opened: Opened,
        head: &Head,
        body: Body,
    ) -> Result<(Response<Incoming>, Option<Lease>), Sent> {
        let p = &head.parts;
        let mut headers = p.headers.clone();
        match opened {
            Opened::Pooled(lease) => {
                headers.remove(header::HOST);
                headers.insert(
                    hbone::APP_PROTOCOL_HEADER,
                    HeaderValue::from_static(head.app_protocol.as_str()),
                );
                if let Ok(z) = HeaderValue::from_str(&self.zone) {
                    headers.insert(hbone::SOURCE_ZONE_HEADER, z);
                }
                let mut req = Request::new(body);
                *req.method_mut() = p.method.clone();
                *req.uri_mut() = head.uri.clone();
                *req.version_mut() = Version::HTTP_2;
                *req.headers_mut() = headers;
                lease
                    .send(req)
                    .await
                    .map(|r| (r, Some(lease)))
                    .map_err(|e| Sent::Failed(e.to_string()))
            }
            Opened::Single(tls) => {
                // An older destination: HTTP/1.1 on this connection alone.
                if let Ok(h) = HeaderValue::from_str(&head.authority) {
                    headers.insert(header::HOST, h);
                }
                let mut req = Request::new(body);
                *req.method_mut() = p.method.clone();
                if let Ok(uri) = head.path.parse() {
                    *req.uri_mut() = uri;
                }
                *req.version_mut() = Version::HTTP_11;
                *req.headers_mut() = headers;
                let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                    .await
                    .map_err(|e| Sent::Failed(e.to_string()))?;
                tokio::spawn(conn);
                send.send_request(req)
                    .await
                    .map(|r| (r, None))
                    .map_err(|e| Sent::Failed(e.to_string()))
            }
        }
    }

    /// Sends a copy of `head` to the mirror's destination, in the
    /// background; its answer is dropped. The copy's authority gets
    /// `-shadow`, so the mirror's own metrics and logs can tell copies.
    fn mirror(
        self: &Arc<Self>,
        dir: &Arc<Directory>,
        e: &Entry,
        m: &trellis_federation::policy::traffic::Mirror,
        head: &Head,
        body: Replay,
        port: u16,
    ) {
        let me = self.clone();
        let dir = dir.clone();
        let (name, namespace) = match &m.service {
            Some(s) => (s.name().to_owned(), s.namespace().to_owned()),
            None => (e.name.clone(), e.namespace.clone()),
        };
        let subset = m.subset.clone();
        let authority = format!("{}-shadow", head.authority);
        let Ok(uri) = Uri::builder()
            .scheme("http")
            .authority(authority.as_str())
            .path_and_query(head.path.as_str())
            .build()
        else {
            return;
        };
        let mut parts = Request::new(()).into_parts().0;
        parts.method = head.parts.method.clone();
        parts.headers = head.parts.headers.clone();
        parts.uri = uri.clone();
        let copy = Head {
            parts,
            uri,
            authority,
            path: head.path.clone(),
            app_protocol: head.app_protocol,
            traceparent: head.traceparent.clone(),
        };
        tokio::spawn(async move {
            let Some(entry) = dir.named(&name, &namespace, None) else {
                return;
            };
            let dest = Dest {
                entry,
                policy: dir.traffic.of(&name, &namespace),
                subset,
            };
            let Ok(plan) = me.plan(&dest, port, None) else {
                return;
            };
            for c in &plan {
                if let Ok(link) = me.open(entry, c, port, None, &plan, None).await {
                    match me.send(link.opened, &copy, body.boxed()).await {
                        Ok(_) => {}
                        Err(Sent::Failed(e)) => {
                            tracing::debug!(error = %e, "mirrored request failed")
                        }
                        Err(Sent::TimedOut(_)) => {}
                    }
                    return;
                }
            }
        });
    }

    /// Records an attempt on its target; with outlier detection, a run of
    /// failures ejects it unless the plan's share of ejected targets is
    /// used up (at least one may always be ejected).
    fn record(
        &self,
        label: &str,
        t: &balance::Target,
        outcome: Outcome,
        latency: Duration,
        outlier: Option<&Outlier>,
        plan: &[Candidate],
    ) {
        let may = || {
            let Some(o) = outlier else { return false };
            let now = Instant::now();
            let ejected = plan.iter().filter(|c| c.state.ejected(now)).count();
            #[allow(
                clippy::cast_precision_loss,
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss
            )]
            let cap = ((plan.len() as f64) * o.max_ejection_percent.fraction()).floor() as usize;
            ejected < cap.max(1)
        };
        if t.record(outcome, latency, outlier, may) {
            self.metrics.ejected(label);
            tracing::info!(service = %label, outcome = ?outcome, "a target was ejected by outlier detection");
        }
    }

    /// The labels of a request answered before any destination did.
    fn service_reporter(&self, e: &Entry) -> Reporter {
        let key = format!("{} -", e.label());
        self.reporters.get(&key, || {
            Peers {
                reporter: "source",
                source_zone: self.zone.clone(),
                destination_service: format!("{}.{}.{}", e.name, e.namespace, self.suffix),
                destination_service_name: e.name.clone(),
                destination_service_namespace: e.namespace.clone(),
                destination_zone: "unknown".into(),
                connection_security_policy: "mutual_tls",
                ..Peers::default()
            }
            .with_source(self.certs.id().as_str())
            .with_destination("")
        })
    }

    /// How long until a token, if one of the service's rate limits that
    /// applies to this request (its rule, its caller) has none now.
    fn rate_limited(
        &self,
        e: &Entry,
        policy: &ServicePolicy,
        rule: Option<&RouteRule>,
        caller: &SpiffeId,
    ) -> Option<Duration> {
        if policy.limits.is_empty() {
            return None;
        }
        let svc = self.state.service(&e.label());
        let rule_name = rule.and_then(|r| r.name.as_deref());
        policy
            .limits
            .iter()
            .filter(|l| l.spec.route.is_none() || l.spec.route.as_deref() == rule_name)
            .filter(|l| l.spec.from.is_empty() || l.spec.from.iter().any(|p| p.matches(caller)))
            .find_map(|l| {
                svc.take(&l.key, l.spec.requests_per_second, l.spec.bucket())
                    .err()
            })
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
        let via = link.route.upstream();
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
                    let opened = traffic.tcp_opened(&who);
                    let (up, down) = relay(&mut TokioIo::new(a), &mut TokioIo::new(b)).await;
                    traffic.tcp_closed(&who, opened, up, down, Some(&via));
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

/// A request's head as every attempt sends it.
struct Head {
    parts: http::request::Parts,
    /// For a pooled stream: `http://authority/path`.
    uri: Uri,
    authority: String,
    path: String,
    app_protocol: AppProtocol,
    /// The request's trace context as this sidecar passes it on: what a
    /// new connection tells the zone's gateway.
    traceparent: Option<String>,
}

/// The request body: sent once, or kept for retries and mirrors.
enum ReqBody {
    Once(Option<Body>),
    Replay(Replay),
}

impl ReqBody {
    /// The body for the next attempt, if it can be sent (again).
    fn next(&mut self) -> Option<Body> {
        match self {
            ReqBody::Once(b) => b.take(),
            ReqBody::Replay(r) => r.try_clone().map(Replay::boxed),
        }
    }
}

/// Why an attempt that was sent has no answer.
enum Sent {
    Failed(String),
    TimedOut(Duration),
}

/// The status, reason and flags of a request that got no answer to pass on.
type Failure = (StatusCode, String, &'static str);

/// Whether a request body is known to fit the replay buffer: empty, or
/// with a `content-length` within it.
fn body_fits(h: &http::HeaderMap, body: &Body) -> bool {
    use hyper::body::Body as _;
    body.is_end_stream()
        || h.get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .is_some_and(|n| n <= REPLAY_LIMIT)
}

/// Why a proxy on the way refused (its `trellis-error`), or `default`.
fn error_reason(h: &http::HeaderMap, default: &str) -> String {
    h.get(hbone::ERROR_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or(default)
        .to_owned()
}

/// Whether an answer with `status` (and `grpc-status`) is retried.
fn retry_status(r: &Retries, status: u16, grpc: Option<u8>) -> bool {
    r.status_codes.contains(&status)
        || (status >= 500 && r.on.contains(&RetryOn::ServerError))
        || (matches!(status, 502..=504) && r.on.contains(&RetryOn::GatewayError))
        || grpc.is_some_and(|g| g != 0 && r.grpc_statuses.iter().any(|c| c.0 == g))
}

/// Orders the endpoints of one zone by the balancer: P2C puts the cheaper
/// of two random ones first, round robin turns the list, consistent hashing
/// ranks by the hash of the header's value and the endpoint (rendezvous
/// hashing: only the keys of a removed endpoint move).
fn order(c: &mut [Candidate], policy: LbPolicy, hash: Option<&[u8]>, rr: impl FnOnce() -> usize) {
    if c.len() < 2 {
        return;
    }
    match (policy, hash) {
        (LbPolicy::ConsistentHash, Some(h)) => {
            c.sort_by_cached_key(|x| std::cmp::Reverse(rendezvous(h, &x.routes[0].via)));
        }
        (LbPolicy::RoundRobin, _) => {
            c.sort_by_key(|x| format!("{:?}", x.routes[0].via));
            let n = c.len();
            c.rotate_left(rr() % n);
        }
        _ => {
            fastrand::shuffle(c);
            if c[1].state.cost() < c[0].state.cost() {
                c.swap(0, 1);
            }
        }
    }
}

fn rendezvous(key: &[u8], via: &Via) -> u64 {
    use std::hash::{Hash, Hasher};
    // Fixed keys: every caller must rank endpoints alike.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    format!("{via:?}").hash(&mut h);
    h.finish()
}

/// An index by weight; `None` when every weight is 0.
fn weighted(weights: &[u32]) -> Option<usize> {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    if total == 0 {
        return None;
    }
    let mut pick = fastrand::u64(..total);
    for (i, w) in weights.iter().enumerate() {
        let w = u64::from(*w);
        if pick < w {
            return Some(i);
        }
        pick -= w;
    }
    None
}

/// True with probability `p` (0 to 1).
fn chance(p: f64) -> bool {
    p >= 1.0 || (p > 0.0 && fastrand::f64() < p)
}

/// The authority the app asked for: the URI's (absolute form, HTTP/2), or
/// its `Host`.
fn authority_of(parts: &http::request::Parts) -> Option<String> {
    parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
}

/// The redirect a rule answers with.
fn redirect(
    r: &trellis_federation::policy::traffic::Redirect,
    parts: &http::request::Parts,
) -> Response<Body> {
    let host_header = authority_of(parts).unwrap_or_default();
    let (host, port) = match host_header.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => (h.to_owned(), Some(p.to_owned())),
        _ => (host_header.clone(), None),
    };
    let scheme = match r.scheme {
        Some(Scheme::Https) => "https",
        _ => "http",
    };
    let host = r.host.clone().unwrap_or(host);
    let port = r.port.map(|p| p.to_string()).or(port);
    let path = r
        .path
        .clone()
        .unwrap_or_else(|| parts.uri.path().to_owned());
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let location = match port {
        Some(p) => format!("{scheme}://{host}:{p}{path}{query}"),
        None => format!("{scheme}://{host}{path}{query}"),
    };
    let mut resp = Response::new(forward::empty());
    *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::MOVED_PERMANENTLY);
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// The failure a fault injects.
fn fault_abort(a: &FaultAbort) -> Response<Body> {
    match (a.status, a.grpc_status) {
        (_, Some(code)) => forward::grpc_refusal(
            code.0,
            "fault injected by the caller's sidecar (Route fault)",
        ),
        (Some(s), None) => forward::refusal(
            StatusCode::from_u16(s).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            "fault injected by the caller's sidecar (Route fault)",
        ),
        (None, None) => forward::refusal(StatusCode::SERVICE_UNAVAILABLE, "fault injected"),
    }
}

/// Applies a rule's rewrite to the path (with its query) and authority.
fn rewrite(r: &RouteRule, path: &mut String, authority: &mut String) {
    let Some(w) = &r.rewrite else { return };
    if let Some(a) = &w.authority {
        authority.clone_from(a);
    }
    let (p, q) = match path.split_once('?') {
        Some((p, q)) => (p.to_owned(), format!("?{q}")),
        None => (path.clone(), String::new()),
    };
    if let Some(full) = &w.path {
        *path = format!("{full}{q}");
    } else if let Some(prefix) = &w.prefix {
        // The longest prefix of the rule's matches that this path has.
        let matched = r
            .matches
            .iter()
            .filter_map(|m| match &m.path {
                Some(trellis_federation::policy::traffic::PathMatch::Prefix(x)) => {
                    Some(x.trim_end_matches('/'))
                }
                _ => None,
            })
            .filter(|x| p.starts_with(x))
            .max_by_key(|x| x.len());
        if let Some(m) = matched {
            let rest = &p[m.len()..];
            let joined = if prefix.ends_with('/') && rest.starts_with('/') {
                format!("{}{rest}", prefix.trim_end_matches('/'))
            } else if rest.is_empty() || rest.starts_with('/') || prefix.ends_with('/') {
                format!("{prefix}{rest}")
            } else {
                format!("{prefix}/{rest}")
            };
            let joined = if joined.is_empty() {
                "/".to_owned()
            } else {
                joined
            };
            *path = format!("{joined}{q}");
        }
    }
}

/// Applies header changes: remove, then set, then add.
fn edit_headers(edit: &trellis_federation::policy::traffic::HeaderEdit, h: &mut http::HeaderMap) {
    if edit.is_empty() {
        return;
    }
    for k in &edit.remove {
        h.remove(k.as_str());
    }
    for (k, v) in &edit.set {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_str().as_bytes()),
            HeaderValue::from_str(v.as_str()),
        ) {
            h.insert(k, v);
        }
    }
    for (k, v) in &edit.add {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_str().as_bytes()),
            HeaderValue::from_str(v.as_str()),
        ) {
            h.append(k, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn rule(v: serde_json::Value) -> RouteRule {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_prefix_rewrite_replaces_the_matched_prefix_and_keeps_the_query() {
        let r = rule(
            json!({"match": [{"path": {"prefix": "/api"}}, {"path": {"prefix": "/api/v1/"}}], "rewrite": {"prefix": "/v2", "authority": "catalog-v2"}}),
        );
        let cases = [
            ("/api/items?x=1", "/v2/items?x=1"),
            ("/api", "/v2"),
            ("/api/v1/items", "/v2/items"),
        ];
        for (from, to) in cases {
            let (mut path, mut authority) = (from.to_owned(), "catalog".to_owned());
            rewrite(&r, &mut path, &mut authority);
            assert_eq!(
                (path.as_str(), authority.as_str()),
                (to, "catalog-v2"),
                "{from}"
            );
        }
        let r = rule(json!({"match": [{"path": {"prefix": "/old"}}], "rewrite": {"prefix": "/"}}));
        let (mut path, mut authority) = ("/old/x".to_owned(), String::new());
        rewrite(&r, &mut path, &mut authority);
        assert_eq!(path, "/x");
        let r = rule(json!({"rewrite": {"path": "/fixed"}}));
        let mut path = "/any/thing?q".to_owned();
        rewrite(&r, &mut path, &mut authority);
        assert_eq!(path, "/fixed?q");
    }

    #[test]
    fn a_redirect_keeps_what_it_does_not_replace() {
        let parts = |uri: &str, host: &str| {
            Request::builder()
                .uri(uri)
                .header("host", host)
                .body(())
                .unwrap()
                .into_parts()
                .0
        };
        let r: trellis_federation::policy::traffic::Redirect =
            serde_json::from_value(json!({"path": "/new", "status": 308})).unwrap();
        let resp = redirect(&r, &parts("/old?a=1", "catalog.shop.mesh:8080"));
        assert_eq!(resp.status(), 308);
        assert_eq!(
            resp.headers()["location"],
            "http://catalog.shop.mesh:8080/new?a=1"
        );
        let r: trellis_federation::policy::traffic::Redirect =
            serde_json::from_value(json!({"scheme": "https", "host": "shop.example", "port": 443}))
                .unwrap();
        let resp = redirect(&r, &parts("/x", "catalog"));
        assert_eq!(resp.status(), 301);
        assert_eq!(resp.headers()["location"], "https://shop.example:443/x");
    }

    #[test]
    fn header_edits_remove_then_set_then_add() {
        let e: trellis_federation::policy::traffic::HeaderEdit = serde_json::from_value(
            json!({"remove": ["x-debug"], "set": {"x-canary": "1"}, "add": {"x-trail": "b"}}),
        )
        .unwrap();
        let mut h = http::HeaderMap::new();
        h.insert("x-debug", "1".parse().unwrap());
        h.insert("x-canary", "0".parse().unwrap());
        h.insert("x-trail", "a".parse().unwrap());
        edit_headers(&e, &mut h);
        assert!(!h.contains_key("x-debug"));
        assert_eq!(h["x-canary"], "1");
        let trail: Vec<_> = h.get_all("x-trail").iter().collect();
        assert_eq!(trail, ["a", "b"]);
    }

    #[test]
    fn weights_pick_in_proportion_and_retries_follow_the_policy() {
        let mut n = [0; 3];
        for _ in 0..10_000 {
            n[weighted(&[1, 0, 3]).unwrap()] += 1;
        }
        assert_eq!(n[1], 0);
        assert!((2200..2800).contains(&n[0]), "{n:?}");
        assert_eq!(weighted(&[0, 0]), None);
        let r: Retries = serde_json::from_value(
            json!({"attempts": 1, "on": ["gateway-error"], "statusCodes": [429], "grpcStatuses": ["unavailable"]}),
        )
        .unwrap();
        assert!(retry_status(&r, 503, None));
        assert!(!retry_status(&r, 500, None));
        assert!(retry_status(&r, 429, None));
        assert!(retry_status(&r, 200, Some(14)));
        assert!(!retry_status(&r, 200, Some(0)));
    }
}
