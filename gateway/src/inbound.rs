//! Streams from peer gateways, over QUIC or the HTTP/2 fallback: check the
//! header against the peer's identity and our exports, then connect the
//! stream to a local endpoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use trellis_ca::Role;
use trellis_proxy::trace::{self, Attribute, Hop};

use crate::gateway::Shared;
use crate::metrics::PeerLabels;
use crate::peer::LinkError;
use crate::relay::{BoxStream, QuicStream, ReadError, Rewind, read_header, write_all_flush};
use crate::tunnel::{Header, Reply, ReplyCode};

impl Shared {
    /// A QUIC connection from a peer gateway: authenticate, then serve its streams.
    /// `permit` is held until the handshake ends, at most `handshake_timeout`.
    pub(crate) async fn handle_quic(
        self: Arc<Self>,
        incoming: quinn::Incoming,
        permit: OwnedSemaphorePermit,
    ) {
        let remote = incoming.remote_address();
        let limit = self.cfg.handshake_timeout;
        // Dropping the `Connecting` on timeout closes the connection.
        let handshake = tokio::time::timeout(limit, incoming);
        let conn = match handshake.await {
            Ok(Ok(c)) => c,
            Err(_) => {
                self.handshake_timed_out("quic");
                tracing::info!(%remote, ?limit, "QUIC handshake did not finish in time");
                return;
            }
            Ok(Err(e)) => {
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
        drop(permit);
        let Some((zone, edge)) = certs.and_then(|c| self.peer_zone(&c)) else {
            conn.close(1u32.into(), b"not a gateway or edge agent");
            return;
        };
        tracing::info!(%remote, peer_zone = %zone, edge, "QUIC peer connected");
        if edge {
            self.edges_of(&zone, |v| v.push(conn.clone()));
        }
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
                        let mut stream: BoxStream = Box::new(QuicStream::new(send, recv));
                        s.accept_stream(&mut stream, &zone, edge).await;
                    });
                }
                Err(e) => {
                    tracing::info!(%remote, peer_zone = %zone, reason = %e, "QUIC peer disconnected");
                    break;
                }
            }
        }
        if edge {
            let id = conn.stable_id();
            self.edges_of(&zone, |v| v.retain(|c| c.stable_id() != id));
        }
    }

    /// A peer gateway's fallback link: TLS (within `handshake_timeout`,
    /// holding `permit`), then HTTP/2 CONNECT streams.
    pub(crate) async fn serve_fallback(
        self: Arc<Self>,
        sock: Rewind<TcpStream>,
        from: SocketAddr,
        permit: OwnedSemaphorePermit,
    ) {
        let limit = self.cfg.handshake_timeout;
        let accepted = tokio::time::timeout(limit, self.fallback_tls.accept(sock)).await;
        drop(permit);
        let tls = match accepted {
            Ok(Ok(t)) => t,
            Err(_) => {
                self.handshake_timed_out("tcp");
                tracing::info!(%from, ?limit, "TLS handshake with a fallback peer did not finish in time");
                return;
            }
            Ok(Err(e)) => {
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
                    s.accept_stream(&mut stream, &zone, false).await;
                }
                Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
            }
        });
        status(StatusCode::OK)
    }

    /// A stream from a peer gateway or an edge agent (`edge`): read the
    /// header, check it, route it here or relay it.
    async fn accept_stream(&self, stream: &mut BoxStream, peer_zone: &str, edge: bool) {
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
        // The zone in the header decides exports; only the authenticated
        // identity may vouch for it: its own zone, or for a gateway, an edge
        // zone it carries (whose streams it relays).
        let vouched = header.source_zone == peer_zone
            || (!edge && self.carried_by(&header.source_zone, peer_zone));
        let relayed = header.zone.as_ref().filter(|z| **z != self.cfg.zone);
        let refusal = if !vouched {
            Some(refuse(
                ReplyCode::Forbidden,
                format!(
                    "header claims zone {} but the peer is a gateway of zone {peer_zone}",
                    header.source_zone
                ),
            ))
        } else if self.draining.load(Ordering::SeqCst) {
            Some(refuse(ReplyCode::Overloaded, "gateway is draining".into()))
        } else if let Some(z) = relayed
            && !(edge || self.cfg.edge_zones.contains(z))
        {
            // Relaying only where an edge needs it: otherwise a gateway
            // would be a way around another zone's gateways.
            Some(refuse(
                ReplyCode::Forbidden,
                format!(
                    "this gateway relays only to and from the edge zones it carries, not from zone {peer_zone} to zone {z}"
                ),
            ))
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
        if let Some(z) = relayed.cloned() {
            self.relay(stream, &header, &z, peer_zone).await;
            return;
        }
        self.route_local(stream, &header, "inbound", peer_zone)
            .await;
    }

    /// Relays a stream for zone `to` that an edge agent (or, towards an
    /// edge this gateway carries, a peer gateway) opened here: onward to
    /// that zone, replying with its answer, then bytes both ways.
    async fn relay(&self, stream: &mut BoxStream, header: &Header, to: &str, peer_zone: &str) {
        let service = format!("{}.{}", header.service, header.namespace);
        let onward = Header {
            zone: None,
            ..header.clone()
        };
        let mut up = match self.open_to(to, onward).await {
            Ok((s, _)) => s,
            Err(e) => {
                let reply = match e {
                    LinkError::Refused { reply, .. } => reply,
                    other => Reply::refused(ReplyCode::UpstreamFailed, other.to_string()),
                };
                self.refuse(stream, reply, "relayed", peer_zone, &service)
                    .await;
                return;
            }
        };
        if write_all_flush(stream, &Reply::accepted().encode())
            .await
            .is_err()
        {
            return;
        }
        self.metrics
            .stream("relayed", peer_zone, &service, ReplyCode::Accepted.as_str());
        self.splice_counted(stream, &mut up, "relayed").await;
        // The onward side's last bytes are waited for above; the opener's
        // too, so a drain does not cut what was relayed back to it.
        if let Some(done) = crate::relay::Duplex::delivered(&**stream) {
            tokio::select! {
                () = done => {}
                () = tokio::time::sleep(self.cfg.quic.idle_timeout) => {}
                () = self.force.cancelled() => {}
            }
        }
    }

    /// Connects a stream to a local endpoint of `header`'s service, replying
    /// first when the stream came from a peer.
    pub(crate) async fn route_local(
        &self,
        stream: &mut BoxStream,
        header: &Header,
        direction: &'static str,
        zone: &str,
    ) {
        let service = format!("{}.{}", header.service, header.namespace);
        // A stream from a peer's gateway continues the trace its header
        // names; the span covers finding and reaching the destination.
        let span = header.traceparent.as_deref().and_then(|tp| {
            Hop::start(
                if direction == "inbound" {
                    trace::Kind::Server
                } else {
                    trace::Kind::Internal
                },
                format!("tunnel {service}"),
                &trace::from_traceparent(tp),
                || {
                    vec![
                        Attribute::new("trellis.gateway.zone", self.cfg.zone.clone()),
                        Attribute::new("trellis.source.zone", header.source_zone.clone()),
                        Attribute::new("trellis.destination.service", service.clone()),
                        Attribute::new("server.port", i64::from(header.port)),
                    ]
                },
            )
        });
        // One lookup says where it goes and whether this gateway terminates
        // for it; the routes are let go before anything is awaited.
        let targets = self.routes.load().targets(header, 2);
        let targets = match targets {
            Ok(t) => t,
            Err(reply) => {
                if let Some(span) = span {
                    span.fail(format!("{}: {}", reply.code, reply.reason));
                }
                self.refuse(stream, reply, direction, zone, &service).await;
                return;
            }
        };
        if targets.plain {
            if let Some(span) = span {
                span.set([Attribute::new("trellis.gateway.terminated", true)]);
                span.end();
            }
            if self.accept(stream, direction, zone, &service).await {
                self.terminate(stream, header, zone).await;
            }
            return;
        }
        let connected =
            crate::routes::connect_to(targets.endpoints, self.cfg.connect_timeout).await;
        let (mut up, _guard) = match connected {
            Ok(c) => {
                if let Some(span) = span {
                    if let Ok(a) = c.0.peer_addr() {
                        span.set([Attribute::new("trellis.upstream", a.to_string())]);
                    }
                    span.end();
                }
                c
            }
            Err(reply) => {
                if let Some(span) = span {
                    span.fail(format!("{}: {}", reply.code, reply.reason));
                }
                self.refuse(stream, reply, direction, zone, &service).await;
                return;
            }
        };
        if self.accept(stream, direction, zone, &service).await {
            self.splice_counted(&mut up, stream, direction).await;
        }
    }

    /// Answers a peer's stream with an accepting reply (the zone's own
    /// connections get none) and counts it; false when the opener is gone.
    async fn accept(
        &self,
        stream: &mut BoxStream,
        direction: &'static str,
        zone: &str,
        service: &str,
    ) -> bool {
        if direction == "inbound"
            && write_all_flush(stream, &Reply::accepted().encode())
                .await
                .is_err()
        {
            return false;
        }
        self.metrics
            .stream(direction, zone, service, ReplyCode::Accepted.as_str());
        true
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
        if direction != "outbound" {
            let _ = write_all_flush(stream, &reply.encode()).await;
            let _ = tokio::io::AsyncWriteExt::shutdown(stream).await;
        }
    }
}

fn peer_zone(certs: &[rustls_pki_types::CertificateDer<'_>]) -> Option<String> {
    match trellis_ca::tls::peer_id(Some(certs))?.role()? {
        Role::Gateway { zone, .. } => Some(zone),
        _ => None,
    }
}

impl Shared {
    /// The zone a QUIC peer speaks for, and whether it is an edge agent.
    fn peer_zone(&self, certs: &[rustls_pki_types::CertificateDer<'_>]) -> Option<(String, bool)> {
        match trellis_ca::tls::peer_id(Some(certs))?.role()? {
            Role::Gateway { zone, .. } => Some((zone, false)),
            Role::Agent { zone, .. } if self.cfg.edge_zones.contains(&zone) => Some((zone, true)),
            _ => None,
        }
    }

    /// Runs `f` on the live edge connections of `zone`.
    pub(crate) fn edges_of<T>(
        &self,
        zone: &str,
        f: impl FnOnce(&mut Vec<quinn::Connection>) -> T,
    ) -> T {
        // A poisoned lock only means another task panicked mid-update of a
        // Vec of handles; the handles themselves are still valid.
        let mut edges = self.edges.lock().unwrap_or_else(|p| p.into_inner());
        let v = edges.entry(zone.to_owned()).or_default();
        v.retain(|c| c.close_reason().is_none());
        f(v)
    }
}

fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    let mut r = Response::new(Empty::new());
    *r.status_mut() = code;
    r
}
