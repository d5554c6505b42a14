//! Connections from our zone's workloads: read the SNI of the ClientHello,
//! then open a stream to the zone it names (or serve it locally).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use crate::gateway::Shared;
use crate::peer::{LinkError, Via};
use crate::preamble;
use crate::relay::{BoxStream, Rewind, write_all_flush};
use crate::sni::{MAX_CLIENT_HELLO, MeshName, client_hello_sni};
use crate::tunnel::{Decoded, Header, Reply, ReplyCode};
use trellis_proxy::trace::{self, Attribute, Hop};

/// What a TCP listener of the gateway carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Listener {
    /// `listen` without `zone_listen`: the zone's workloads and the peers'
    /// fallback on one port.
    Shared,
    /// `listen` with `zone_listen` set: the peers' fallback only.
    Peers,
    /// `zone_listen`: the zone's workloads only.
    Zone,
}

impl Shared {
    /// A new TCP connection: read the ClientHello (within
    /// `handshake_timeout`, holding `permit`), then serve it as a peer's
    /// fallback link or route it as a workload's connection, as `role` allows.
    pub(crate) async fn handle_tcp(
        self: Arc<Self>,
        mut sock: TcpStream,
        from: SocketAddr,
        role: Listener,
        permit: OwnedSemaphorePermit,
    ) {
        let _ = sock.set_nodelay(true);
        let mut buf = Vec::with_capacity(2048);
        let limit = self.cfg.handshake_timeout;
        let mut trace = None;
        let sni = tokio::time::timeout(limit, async {
            if role != Listener::Peers {
                trace = read_preamble(&mut sock, &mut buf).await?;
            }
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
        .unwrap_or_else(|_| {
            self.handshake_timed_out("tcp");
            Err(format!("no complete ClientHello within {limit:?}"))
        });
        let sni = match sni {
            Ok(s) => s,
            Err(reason) => {
                self.metrics.protocol_errors.inc();
                tracing::info!(%from, %reason, "TCP connection refused");
                return;
            }
        };
        if sni == self.tunnel_sni && role != Listener::Zone {
            self.serve_fallback(Rewind::new(buf, sock), from, permit)
                .await;
            return;
        }
        if role == Listener::Peers {
            // Nothing on this port proves the client is in our zone; taking
            // it for our zone would let it past other zones' exports.
            self.metrics.misdirected.inc();
            tracing::info!(%from, %sni, "TCP connection refused: a workload name on the peer-facing port (use zone_listen)");
            return;
        }
        // The handshake slot covers reading the ClientHello; the rest of the
        // workload's handshake is end to end and counts as a stream (or, for
        // a plain service, is this gateway's and takes a slot again).
        drop(permit);
        let dest = match MeshName::parse(&sni, &self.cfg.dns_suffix) {
            Ok(d) => d,
            Err(reason) => {
                self.metrics.protocol_errors.inc();
                tracing::info!(%from, %reason, "TCP connection refused: SNI is not a mesh name");
                return;
            }
        };
        self.ingress(sock, buf, dest, from, trace.as_deref()).await;
    }

    /// Routes a workload connection from our zone to the zone its SNI names,
    /// in the trace of `trace` (the request that opened it) when there is one.
    async fn ingress(
        &self,
        mut sock: TcpStream,
        hello: Vec<u8>,
        dest: MeshName,
        from: SocketAddr,
        trace: Option<&str>,
    ) {
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
        let span = trace.and_then(|tp| {
            Hop::start(
                trace::Kind::Client,
                format!("tunnel {service}"),
                &trace::from_traceparent(tp),
                || {
                    vec![
                        Attribute::new("trellis.gateway.zone", self.cfg.zone.clone()),
                        Attribute::new("trellis.destination.service", service.clone()),
                        Attribute::new("trellis.destination.zone", dest.zone.clone()),
                        Attribute::new("server.port", i64::from(dest.port)),
                    ]
                },
            )
        });
        let header = Header {
            service: dest.service.clone(),
            namespace: dest.namespace.clone(),
            port: dest.port,
            source_zone: self.cfg.zone.clone(),
            // A gateway that makes no spans passes the context on as it came.
            traceparent: span
                .as_ref()
                .and_then(Hop::traceparent)
                .or_else(|| trace.map(str::to_owned)),
            subset: dest.subset.clone(),
            zone: None,
        };
        if dest.zone == self.cfg.zone {
            if let Some(s) = span {
                s.end();
            }
            // A name in our own zone: serve it like a stream from a peer.
            let mut prefixed: BoxStream = Box::new(Rewind::new(hello, sock));
            self.route_local(&mut prefixed, &header, "outbound", &dest.zone)
                .await;
            return;
        }
        let opened = if self.reaches(&dest.zone) {
            self.open_to(&dest.zone, header).await
        } else {
            if let Some(s) = span {
                s.fail("no gateway known for the zone");
            }
            self.metrics.stream(
                "outbound",
                &dest.zone,
                &service,
                ReplyCode::UnknownService.as_str(),
            );
            tracing::info!(%from, zone = %dest.zone, %service, "refused: no gateway known for zone");
            return;
        };
        let mut stream = match opened {
            Ok((s, transport)) => {
                if let Some(span) = span {
                    span.set([Attribute::new("trellis.gateway.transport", transport)]);
                    span.end();
                }
                s
            }
            Err(e) => {
                let outcome = match &e {
                    LinkError::Refused { reply, .. } => reply.code.as_str(),
                    LinkError::Unreachable { .. } => "peer_unreachable",
                    LinkError::NoReply { .. } => "peer_no_reply",
                };
                self.metrics
                    .stream("outbound", &dest.zone, &service, outcome);
                tracing::info!(%from, %service, error = %e, "outbound stream refused");
                if let Some(span) = span {
                    span.set([Attribute::new("trellis.gateway.outcome", outcome)]);
                    span.fail(e.to_string());
                }
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
        tracing::debug!(%from, %service, zone = %dest.zone, "outbound stream open");
        self.splice_counted(&mut sock, &mut stream, "outbound")
            .await;
    }

    /// Whether a stream for `zone` has a way there: an edge this gateway
    /// carries, a peer gateway of the zone, or one that carries it.
    fn reaches(&self, zone: &str) -> bool {
        self.cfg.edge_zones.iter().any(|z| z == zone)
            || self.peers.load().contains_key(zone)
            || !self.carriers_of(zone).is_empty()
    }

    /// Opens a stream for `zone` (see [`Shared::reaches`]), saying which
    /// transport carries it. An edge zone another gateway carries is
    /// reached through that gateway, which relays it (header version 3).
    pub(crate) async fn open_to(
        &self,
        zone: &str,
        header: Header,
    ) -> Result<(crate::relay::BoxStream, &'static str), LinkError> {
        if self.cfg.edge_zones.iter().any(|z| z == zone) {
            self.edge_exported(zone, &header)
                .map_err(|reply| LinkError::Refused {
                    zone: zone.to_owned(),
                    reply,
                })?;
            return self
                .open_edge(zone, &header)
                .await
                .map(|s| (s, "quic-edge"));
        }
        let peers = self.peers.load();
        if let Some(links) = peers.get(zone) {
            return open_any(links, zone, &header).await;
        }
        // Gateways of other zones carry it: the very gateways whose records
        // say so (another gateway of their zone may not), from a random one
        // on. One that cannot be reached, will not relay, or has none of the
        // edge's agents connected is passed over; any other refusal is the
        // edge's answer.
        let mut carriers = self.carriers_of(zone);
        fastrand::shuffle(&mut carriers);
        let relayed = Header {
            zone: Some(zone.to_owned()),
            ..header
        };
        let mut last = None;
        for c in carriers {
            let Some(link) = peers
                .get(&c.zone)
                .and_then(|links| links.iter().find(|l| l.addr() == c.addr))
            else {
                continue;
            };
            match link.open(&relayed).await {
                Ok((s, Via::Quic)) => return Ok((s, "quic")),
                Ok((s, Via::Tcp)) => return Ok((s, "tcp")),
                Err(LinkError::Refused { zone: z, reply })
                    if !matches!(reply.code, ReplyCode::Forbidden | ReplyCode::UpstreamFailed) =>
                {
                    return Err(LinkError::Refused { zone: z, reply });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| LinkError::Unreachable {
            zone: zone.to_owned(),
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            reason: "no gateway known for the zone".into(),
        }))
    }

    /// Whether the service `header` names, in the edge zone `zone` this
    /// gateway carries, is exported to the stream's source zone: its
    /// `Export`, or without one every zone (its own zone only with
    /// `default_deny_exports`). An edge agent serves any stream its link
    /// brings, so the carrier is where an edge service's Export holds.
    fn edge_exported(&self, zone: &str, header: &Header) -> Result<(), Reply> {
        if edge_admits(
            &self.exports.load(),
            self.cfg.default_deny_exports,
            zone,
            header,
        ) {
            return Ok(());
        }
        Err(Reply::refused(
            ReplyCode::NotExported,
            format!(
                "{}.{} is not exported to zone {}",
                header.service, header.namespace, header.source_zone
            ),
        ))
    }

    /// The gateways that carry the edge zone `zone`, as the store's gateway
    /// records say.
    pub(crate) fn carriers_of(&self, zone: &str) -> Vec<crate::gateway::Carrier> {
        self.carriers.load().get(zone).cloned().unwrap_or_default()
    }

    /// Whether a gateway of `gateway_zone` carries the edge zone `zone`, and
    /// so may vouch for streams from it.
    pub(crate) fn carried_by(&self, zone: &str, gateway_zone: &str) -> bool {
        self.carriers
            .load()
            .get(zone)
            .is_some_and(|v| v.iter().any(|c| c.zone == gateway_zone))
    }

    /// A stream to an edge zone, over a connection one of its agents dialled.
    async fn open_edge(
        &self,
        zone: &str,
        header: &Header,
    ) -> Result<crate::relay::BoxStream, LinkError> {
        let conns = self.edges_of(zone, |v| v.clone());
        if conns.is_empty() {
            return Err(LinkError::Unreachable {
                zone: zone.to_owned(),
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                reason: "no agent of this edge zone is connected".into(),
            });
        }
        // Spread streams over the zone's agents; each serves what it registered.
        let first = fastrand::usize(..conns.len());
        let mut last = None;
        for k in 0..conns.len() {
            let conn = &conns[(first + k) % conns.len()];
            match crate::peer::open_on(conn, zone, header, self.cfg.connect_timeout).await {
                Ok(s) => return Ok(s),
                // Another agent of the zone may serve what this one refused.
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(LinkError::Unreachable {
            zone: zone.to_owned(),
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            reason: "no agent answered".into(),
        }))
    }
}

/// Opens a stream on one of a zone's gateways: from a random one on, the
/// next when one cannot be reached. A refusal is that zone's answer and is
/// not retried elsewhere. Says which transport carries it.
async fn open_any(
    links: &[std::sync::Arc<crate::peer::PeerLink>],
    zone: &str,
    header: &Header,
) -> Result<(crate::relay::BoxStream, &'static str), LinkError> {
    let first = fastrand::usize(..links.len().max(1));
    let mut last = None;
    for k in 0..links.len() {
        match links[(first + k) % links.len()].open(header).await {
            Ok((s, Via::Quic)) => return Ok((s, "quic")),
            Ok((s, Via::Tcp)) => return Ok((s, "tcp")),
            Err(e @ LinkError::Refused { .. }) => return Err(e),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| LinkError::Unreachable {
        zone: zone.to_owned(),
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        reason: "no gateway known for the zone".into(),
    }))
}

/// Reads a sidecar's preamble, if the connection starts with one, leaving
/// `buf` holding whatever followed it (the start of the ClientHello).
async fn read_preamble(sock: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Option<String>, String> {
    let mut first = [0u8; 1];
    if sock.read(&mut first).await.map_err(|e| e.to_string())? == 0 {
        return Err("closed before a complete ClientHello".into());
    }
    buf.push(first[0]);
    if !preamble::starts_preamble(first[0]) {
        return Ok(None);
    }
    loop {
        match preamble::decode(buf).map_err(|e| e.to_string())? {
            Decoded::Complete { value, consumed } => {
                buf.drain(..consumed);
                return Ok(value);
            }
            Decoded::Incomplete { needed } => {
                let at = buf.len();
                buf.resize(at + needed, 0);
                sock.read_exact(&mut buf[at..])
                    .await
                    .map_err(|e| format!("preamble: {e}"))?;
            }
        }
    }
}

/// Whether the edge service `header` names, in the edge zone `zone`, is
/// exported to the stream's source zone under `exports` (see
/// [`Shared::edge_exported`]).
fn edge_admits(
    exports: &trellis_federation::policy::Exports,
    default_deny: bool,
    zone: &str,
    header: &Header,
) -> bool {
    match exports.targets(&header.namespace, &header.service) {
        Some(to) => trellis_federation::policy::Exports::admits(to, &header.source_zone),
        None => !default_deny || header.source_zone == zone,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The carrier's check of an edge service: the store scopes proxies by
    /// the same table, so only a caller with an older view (or a proxy
    /// that did not say its zone) reaches it, and it must still refuse.
    #[test]
    fn the_carrier_refuses_an_edge_service_to_zones_it_is_not_exported_to() {
        let export = |svc: &str, to: serde_json::Value| trellis_federation::state::PolicyRecord {
            kind: "Export".into(),
            name: svc.into(),
            spec: serde_json::json!({"service": format!("{svc}.shop"), "to": to}),
        };
        let inventory = export("inventory", serde_json::json!(["east", "west"]));
        let exports = trellis_federation::policy::Exports::from_records([&inventory]);
        let from = |source: &str, service: &str| Header {
            source_zone: source.into(),
            namespace: "shop".into(),
            service: service.into(),
            port: 8080,
            traceparent: None,
            subset: None,
            zone: Some("edge".into()),
        };
        assert!(edge_admits(
            &exports,
            false,
            "edge",
            &from("east", "inventory")
        ));
        assert!(!edge_admits(
            &exports,
            false,
            "edge",
            &from("k8s", "inventory")
        ));
        // No Export: every zone, or the edge itself with default deny.
        assert!(edge_admits(&exports, false, "edge", &from("k8s", "cart")));
        assert!(!edge_admits(&exports, true, "edge", &from("k8s", "cart")));
        assert!(edge_admits(&exports, true, "edge", &from("edge", "cart")));
        let cart = export("cart", serde_json::json!(["*"]));
        let exports = trellis_federation::policy::Exports::from_records([&inventory, &cart]);
        assert!(edge_admits(&exports, true, "edge", &from("k8s", "cart")));
    }
}
