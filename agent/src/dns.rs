//! Mesh DNS on the host: `<service>.<namespace>.<suffix>` answers with the
//! loopback address the agent listens on for that service,
//! `_<port>._tcp.<service>.<namespace>.<suffix>` with an SRV record, an
//! unknown mesh name with NXDOMAIN, and any other name is passed to the
//! host's resolver unchanged. UDP and TCP, on 127.0.0.1:8600 by default.
//!
//! `<service>.<namespace>.<zone>.<suffix>` names the service pinned to one
//! zone, with an address of its own.
//!
//! hickory-proto reads and writes the messages; the answers are computed
//! here from the agent's current directory, the same one its listeners
//! follow, so they are always addresses the agent listens on.
//!
//! What a client can make the server hold is bounded ([`Limits`]): forwarded
//! queries in flight, and the time a TCP client may take per query. A UDP
//! answer larger than the client can take (its EDNS payload size, or 512
//! bytes without EDNS, RFC 1035 §4.2.1 and RFC 6891 §6.2.5) goes out empty
//! with the TC bit, and the client asks again over TCP.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use arc_swap::ArcSwap;

use crate::directory::Directory;

use crate::metrics::Metrics;

/// Answers are short-lived: upstreams change with the registry.
const TTL: u32 = 5;
/// How long to wait for the host's resolver.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(3);
/// The UDP payload size we advertise in our own OPT record: the size that
/// avoids IP fragmentation on common paths (DNS flag day 2020).
const OUR_UDP_PAYLOAD: u16 = 1232;

/// Bounds on what clients can make a DNS server hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Queries forwarded to the host's resolver and awaiting its answer at
    /// once; past it, queries for other names are answered REFUSED at once
    /// (a stub resolver then tries its next server). Default 256.
    pub max_forwarded: usize,
    /// How long a TCP client may take to send a whole query, and may stay
    /// idle between queries, before it is disconnected. Default 10 s.
    pub tcp_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_forwarded: 256,
            tcp_timeout: Duration::from_secs(10),
        }
    }
}

/// Where answers come from: an agent's directory (one loopback address per
/// name) or a server's registry (the endpoints' own addresses).
pub trait Names: Send + Sync + 'static {
    /// The addresses and ports of `service.namespace` (pinned to `zone`
    /// when given), or `None` when the name does not exist.
    fn lookup(
        &self,
        service: &str,
        namespace: &str,
        zone: Option<&str>,
    ) -> Option<(Vec<IpAddr>, Vec<u16>)>;
}

impl Names for ArcSwap<Directory> {
    fn lookup(
        &self,
        service: &str,
        namespace: &str,
        zone: Option<&str>,
    ) -> Option<(Vec<IpAddr>, Vec<u16>)> {
        let dir = self.load();
        let e = dir.named(service, namespace, zone)?;
        Some((vec![e.address], e.ports.clone()))
    }
}

/// The names this host answers, and where everything else goes.
pub struct MeshDns {
    suffix: Name,
    names: Arc<dyn Names>,
    forward_to: Option<SocketAddr>,
    metrics: Arc<Metrics>,
    /// One permit per forwarded query in flight (`Limits::max_forwarded`).
    forwarding: Semaphore,
    tcp_timeout: Duration,
}

impl MeshDns {
    /// A server for mesh names under `suffix` from `names`; other names go
    /// to `forward_to`, or are refused without one.
    pub fn new(
        suffix: &str,
        names: Arc<dyn Names>,
        forward_to: Option<SocketAddr>,
    ) -> Result<Self, String> {
        Self::with_metrics(Arc::new(Metrics::default()), suffix, names, forward_to)
    }

    pub(crate) fn with_metrics(
        metrics: Arc<Metrics>,
        suffix: &str,
        names: Arc<dyn Names>,
        forward_to: Option<SocketAddr>,
    ) -> Result<Self, String> {
        let suffix = Name::from_ascii(format!("{suffix}."))
            .map_err(|e| format!("dns_suffix {suffix:?}: {e}"))?
            .to_lowercase();
        let limits = Limits::default();
        Ok(Self {
            suffix,
            names,
            forward_to,
            metrics,
            forwarding: Semaphore::new(limits.max_forwarded),
            tcp_timeout: limits.tcp_timeout,
        })
    }

    /// The same server with `limits` instead of the defaults.
    #[must_use]
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.forwarding = Semaphore::new(limits.max_forwarded);
        self.tcp_timeout = limits.tcp_timeout;
        self
    }

    /// The reply for a mesh name, or `None` when the name is not under the
    /// mesh suffix and goes to the host's resolver.
    pub(crate) fn answer(&self, req: &Message) -> Option<Message> {
        let q = req.queries.first()?;
        let name = q.name().to_lowercase();
        if !self.suffix.zone_of(&name) {
            return None;
        }
        let mut resp = Message::new(req.metadata.id, MessageType::Response, OpCode::Query);
        resp.metadata.authoritative = true;
        resp.metadata.recursion_desired = req.metadata.recursion_desired;
        resp.add_query(q.clone());
        if req.edns.is_some() {
            // An EDNS query gets an OPT record back (RFC 6891 §7).
            let mut edns = Edns::new();
            edns.set_max_payload(OUR_UDP_PAYLOAD);
            resp.set_edns(edns);
        }
        let labels: Vec<String> = name
            .iter()
            .take(usize::from(name.num_labels() - self.suffix.num_labels()))
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect();
        let srv_port = match labels.as_slice() {
            [port, proto, ..] if proto == "_tcp" => {
                Some(port.strip_prefix('_').and_then(|p| p.parse::<u16>().ok()))
            }
            _ => None,
        };
        let rest = if srv_port.is_some() {
            &labels[2..]
        } else {
            &labels[..]
        };
        let entry = match rest {
            [svc, ns] => self.names.lookup(svc, ns, None),
            [svc, ns, zone] => self.names.lookup(svc, ns, Some(zone)),
            _ => None,
        };
        let record = |name: Name, ip: IpAddr| match ip {
            IpAddr::V4(v4) => Record::from_rdata(name, TTL, RData::A(A(v4))),
            IpAddr::V6(v6) => Record::from_rdata(name, TTL, RData::AAAA(AAAA(v6))),
        };
        let found = match (entry, srv_port) {
            (Some((addrs, _)), None) => {
                for ip in addrs {
                    let wanted = match ip {
                        IpAddr::V4(_) => matches!(q.query_type(), RecordType::A | RecordType::ANY),
                        IpAddr::V6(_) => {
                            matches!(q.query_type(), RecordType::AAAA | RecordType::ANY)
                        }
                    };
                    // Otherwise the name exists with no record of this type: NODATA.
                    if wanted {
                        resp.add_answer(record(name.clone(), ip));
                    }
                }
                Some(())
            }
            (Some((addrs, ports)), Some(port)) => port.filter(|p| ports.contains(p)).map(|p| {
                if matches!(q.query_type(), RecordType::SRV | RecordType::ANY) {
                    let target = name.trim_to(rest.len() + usize::from(self.suffix.num_labels()));
                    resp.add_answer(Record::from_rdata(
                        name.clone(),
                        TTL,
                        RData::SRV(SRV::new(0, 0, p, target.clone())),
                    ));
                    for ip in addrs {
                        resp.add_additional(record(target.clone(), ip));
                    }
                }
            }),
            // The suffix itself and the namespace level exist as names.
            (None, None) if labels.len() <= 1 => Some(()),
            _ => None,
        };
        if found.is_none() {
            resp.metadata.response_code = ResponseCode::NXDomain;
        }
        Some(resp)
    }

    /// Serves UDP and TCP on `udp` and `tcp` until `shutdown`.
    pub async fn serve(
        self: Arc<Self>,
        udp: UdpSocket,
        tcp: TcpListener,
        shutdown: CancellationToken,
    ) {
        let udp = Arc::new(udp);
        let me = self.clone();
        let stop = shutdown.clone();
        let udp_loop = async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let (n, from) = tokio::select! {
                    () = stop.cancelled() => return,
                    r = udp.recv_from(&mut buf) => match r { Ok(x) => x, Err(_) => continue },
                };
                let (me, udp, query) = (me.clone(), udp.clone(), buf[..n].to_vec());
                tokio::spawn(async move {
                    if let Some(reply) = me.reply(&query, false).await {
                        let _ = udp.send_to(&reply, from).await;
                    }
                });
            }
        };
        let tcp_loop = async move {
            loop {
                let (s, _) = tokio::select! {
                    () = shutdown.cancelled() => return,
                    r = tcp.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                tokio::spawn(self.clone().serve_tcp(s));
            }
        };
        tokio::join!(udp_loop, tcp_loop);
    }

    async fn serve_tcp(self: Arc<Self>, mut s: TcpStream) {
        loop {
            // Each query must arrive whole within the timeout: a client that
            // sends nothing, or a length and then nothing, is disconnected.
            let read = async {
                let mut len = [0u8; 2];
                s.read_exact(&mut len).await?;
                let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
                s.read_exact(&mut query).await?;
                Ok::<_, std::io::Error>(query)
            };
            let Ok(Ok(query)) = tokio::time::timeout(self.tcp_timeout, read).await else {
                return;
            };
            let Some(reply) = self.reply(&query, true).await else {
                return;
            };
            let Ok(n) = u16::try_from(reply.len()) else {
                return;
            };
            if s.write_all(&n.to_be_bytes()).await.is_err() || s.write_all(&reply).await.is_err() {
                return;
            }
        }
    }

    /// The reply bytes for one query: ours for mesh names, the host
    /// resolver's for the rest, FORMERR for what does not parse.
    async fn reply(&self, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
        let Ok(req) = Message::from_vec(query) else {
            // Echo the ID if there is one, so the client can match the error.
            self.metrics.dns("malformed");
            let id = query
                .get(..2)
                .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
            return Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
                .to_vec()
                .ok();
        };
        if let Some(resp) = self.answer(&req) {
            self.metrics
                .dns(if resp.metadata.response_code == ResponseCode::NXDomain {
                    "nxdomain"
                } else {
                    "answered"
                });
            let bytes = resp.to_vec().ok()?;
            // What the client can take over UDP: its EDNS size, at least 512.
            let room = usize::from(req.max_payload());
            if tcp || bytes.len() <= room {
                return Some(bytes);
            }
            self.metrics.dns("truncated");
            return resp.truncate().to_vec().ok();
        }
        let refused = |req: Message, result: &'static str| {
            let mut no = Message::new(req.metadata.id, MessageType::Response, OpCode::Query);
            no.metadata.response_code = ResponseCode::Refused;
            no.metadata.recursion_desired = req.metadata.recursion_desired;
            for q in req.queries {
                no.add_query(q);
            }
            self.metrics.dns(result);
            no.to_vec().ok()
        };
        if self.forward_to.is_none() {
            // Authoritative for the mesh only, with nowhere to send the rest.
            return refused(req, "refused");
        }
        // Held until the resolver answers or times out: a flood of
        // queries for outside names cannot pile up sockets and tasks here.
        let Ok(_permit) = self.forwarding.try_acquire() else {
            return refused(req, "forward_shed");
        };
        match self.forward(query, tcp).await {
            Ok(r) => {
                self.metrics.dns("forwarded");
                Some(r)
            }
            Err(e) => {
                self.metrics.dns("forward_failed");
                tracing::debug!(error = %e, "forwarding a DNS query failed");
                let mut fail = Message::new(req.metadata.id, MessageType::Response, OpCode::Query);
                fail.metadata.response_code = ResponseCode::ServFail;
                fail.metadata.recursion_desired = req.metadata.recursion_desired;
                for q in req.queries {
                    fail.add_query(q);
                }
                fail.to_vec().ok()
            }
        }
    }

    /// Passes the query bytes to the host's resolver unchanged.
    async fn forward(&self, query: &[u8], tcp: bool) -> std::io::Result<Vec<u8>> {
        let to = self
            .forward_to
            .ok_or_else(|| std::io::Error::other("no resolver to forward to"))?;
        let work = async {
            if tcp {
                let mut s = TcpStream::connect(to).await?;
                let n = u16::try_from(query.len()).map_err(std::io::Error::other)?;
                s.write_all(&n.to_be_bytes()).await?;
                s.write_all(query).await?;
                let mut len = [0u8; 2];
                s.read_exact(&mut len).await?;
                let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
                s.read_exact(&mut reply).await?;
                Ok(reply)
            } else {
                let bind: SocketAddr = if to.is_ipv4() {
                    ([0, 0, 0, 0], 0).into()
                } else {
                    ([0u16; 8], 0).into()
                };
                let sock = UdpSocket::bind(bind).await?;
                sock.connect(to).await?;
                sock.send(query).await?;
                let mut buf = vec![0u8; 4096];
                let n = sock.recv(&mut buf).await?;
                buf.truncate(n);
                Ok(buf)
            }
        };
        tokio::time::timeout(FORWARD_TIMEOUT, work)
            .await
            .map_err(|_| std::io::Error::other("the host's resolver did not answer"))?
    }
}

/// The first `nameserver` of /etc/resolv.conf that is not `own` (so the
/// agent never forwards to itself when resolved sends it `~mesh` only).
pub(crate) fn host_resolver(own: SocketAddr) -> Option<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .find(|a| *a != own)
}
