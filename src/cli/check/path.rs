//! The path an application takes: a mesh name asked of the agent's DNS,
//! then an HTTP request to the address it gave, through the agent's
//! outbound sidecar.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_federation::proto;

use super::store::{Store, ms};

/// The header a sidecar names its own refusals' reason in
/// (`trellis_proxy::hbone::ERROR_HEADER`; the binary does not link that crate).
const ERROR_HEADER: &str = "trellis-error";
use super::{Check, Ctx, Status};

/// What the agent's DNS said about one name.
enum Answer {
    Addrs(Vec<IpAddr>),
    /// The response code, when no address came back (NXDOMAIN, REFUSED).
    Code(String),
}

/// Asks the agent's DNS for `name` (A), as an application's resolver would.
async fn resolve(
    dns: SocketAddr,
    name: &str,
    timeout: Duration,
) -> Result<(Answer, Duration), String> {
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RData, RecordType};
    let mut m = Message::new(fastrand::u16(..), MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    let qname = Name::from_ascii(format!("{name}.")).map_err(|e| format!("{name}: {e}"))?;
    m.add_query(Query::query(qname, RecordType::A));
    let bind: SocketAddr = if dns.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = tokio::net::UdpSocket::bind(bind)
        .await
        .map_err(|e| e.to_string())?;
    let bytes = m.to_vec().map_err(|e| e.to_string())?;
    let started = Instant::now();
    sock.send_to(&bytes, dns).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 4096];
    let id = m.metadata.id;
    loop {
        let (n, from) = tokio::time::timeout(
            timeout.saturating_sub(started.elapsed()),
            sock.recv_from(&mut buf),
        )
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
        .map_err(|e| e.to_string())?;
        let took = started.elapsed();
        let Ok(reply) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        // Only the answer to our question from the server we asked.
        if from != dns || reply.metadata.id != id {
            continue;
        }
        let addrs: Vec<IpAddr> = reply
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                _ => None,
            })
            .collect();
        return Ok(if addrs.is_empty() {
            // NXDOMAIN, REFUSED, SERVFAIL: the names operators know from dig.
            (
                Answer::Code(format!("{:?}", reply.metadata.response_code).to_uppercase()),
                took,
            )
        } else {
            (Answer::Addrs(addrs), took)
        });
    }
}

/// `dns`: the agent's DNS answers a mesh name of this host's own zone (its
/// first local service, which it registered itself).
pub(crate) async fn dns_check(ctx: &Ctx) -> Check {
    let suffix = ctx.cfg.dns_suffix.trim_end_matches('.');
    let Some(s) = ctx.cfg.services.first() else {
        return Check::skip("dns", "no local service to ask for");
    };
    let name = format!("{}.{}.{}.{suffix}", s.name, s.namespace, ctx.cfg.zone);
    let mut d = json!({"server": ctx.dns.to_string(), "name": name});
    match resolve(ctx.dns, &name, ctx.timeout).await {
        Err(e) => {
            d["error"] = json!(e);
            Check::new(
                "dns",
                Status::Fail,
                format!(
                    "the agent's DNS {} does not answer ({e}): is the agent running? `systemctl status trellis-agent`",
                    ctx.dns
                ),
                d,
            )
        }
        Ok((Answer::Code(code), took)) => {
            d["rcode"] = json!(code);
            d["rtt_ms"] = json!(ms(took));
            Check::new(
                "dns",
                Status::Fail,
                format!(
                    "the agent's DNS {} answers {code} for {name}, this host's own service: the agent has not registered it or does not follow the store (`trellis service list`)",
                    ctx.dns
                ),
                d,
            )
        }
        Ok((Answer::Addrs(a), took)) => {
            d["addresses"] = json!(a.iter().map(ToString::to_string).collect::<Vec<_>>());
            d["rtt_ms"] = json!(ms(took));
            Check::new(
                "dns",
                Status::Ok,
                format!(
                    "{} answers {name} -> {} in {:.1} ms",
                    ctx.dns,
                    a[0],
                    ms(took)
                ),
                d,
            )
        }
    }
}

/// `service`: one GET to `--service NAME.NS` through the mesh, as an app
/// on this host would send it.
pub(crate) async fn service_check(ctx: &Ctx, store: &Store, dns_ok: bool) -> Check {
    let Some(svc) = &ctx.service else {
        return Check::skip("service", "no --service NAME.NAMESPACE given");
    };
    let Some((name, ns)) = svc
        .split_once('.')
        .filter(|(n, s)| !n.is_empty() && !s.is_empty())
    else {
        return Check::new(
            "service",
            Status::Fail,
            format!("--service {svc:?}: write it as NAME.NAMESPACE, e.g. catalog.shop"),
            serde_json::Value::Null,
        );
    };
    let suffix = ctx.cfg.dns_suffix.trim_end_matches('.');
    let host = format!("{name}.{ns}.{suffix}");
    if !dns_ok {
        return Check::skip("service", "the agent's DNS does not answer (see dns)");
    }
    let mut d = json!({"name": host});
    let ip = match resolve(ctx.dns, &host, ctx.timeout).await {
        Ok((Answer::Addrs(a), _)) => a[0],
        Ok((Answer::Code(code), _)) => {
            d["rcode"] = json!(code);
            return Check::new(
                "service",
                Status::Fail,
                format!(
                    "{host}: the agent's DNS answers {code}: no such service in the mesh, or no zone exports it to {}; `trellis service list`",
                    ctx.cfg.zone
                ),
                d,
            );
        }
        Err(e) => {
            return Check::new(
                "service",
                Status::Fail,
                format!("{host}: the agent's DNS did not answer ({e})"),
                d,
            );
        }
    };
    let port = ctx.port.or_else(|| port_of(store, name, ns));
    let Some(port) = port else {
        return Check::skip(
            "service",
            format!(
                "{host}: its port is unknown (the registry lists no endpoint, or could not be read); give --port"
            ),
        );
    };
    let to = SocketAddr::new(ip, port);
    d["address"] = json!(to.to_string());
    let started = Instant::now();
    let r = tokio::time::timeout(ctx.timeout * 2, http_get(&to.to_string(), "/", &host)).await;
    let took = started.elapsed();
    d["latency_ms"] = json!(ms(took));
    let r = match r {
        Err(_) => {
            return Check::new(
                "service",
                Status::Fail,
                format!(
                    "{host} via {to}: no answer within {:?}: the endpoint or the path to its zone is stalled (see gateways)",
                    ctx.timeout * 2
                ),
                d,
            );
        }
        Ok(Err(e)) => {
            d["error"] = json!(e);
            return Check::new(
                "service",
                Status::Fail,
                format!("{host} via {to}: {e}: does the agent listen there? is it running?"),
                d,
            );
        }
        Ok(Ok(r)) => r,
    };
    d["status"] = json!(r.status);
    let zone = r
        .body
        .lines()
        .next()
        .and_then(|l| l.split(" in zone ").nth(1))
        .and_then(|z| z.split_whitespace().next())
        .map(str::to_owned);
    d["zone"] = json!(zone);
    d["trellis_error"] = json!(r.trellis_error);
    let why = r
        .trellis_error
        .clone()
        .unwrap_or_else(|| r.body.lines().next().unwrap_or_default().to_owned());
    let (status, finding) = match r.status {
        200..=399 => (
            Status::Ok,
            format!(
                "{host} answered {} in {:.1} ms{}",
                r.status,
                ms(took),
                zone.map(|z| format!(" from zone {z}")).unwrap_or_default()
            ),
        ),
        403 => (
            Status::Fail,
            format!(
                "{host}: refused by policy (403: {why}): an Authorization policy does not allow this host's identity; `trellis policy list`"
            ),
        ),
        503 => (
            Status::Fail,
            format!(
                "{host}: 503 from the sidecar ({why}): no healthy endpoint reachable; `trellis service list`, and see gateways"
            ),
        ),
        504 => (
            Status::Fail,
            format!("{host}: 504 ({why}): the endpoint did not answer in time"),
        ),
        s => (Status::Fail, format!("{host}: answered {s} ({why})")),
    };
    Check::new("service", status, finding, d)
}

/// The first port the registry lists for `name.ns`.
fn port_of(store: &Store, name: &str, ns: &str) -> Option<u16> {
    store
        .endpoints
        .as_ref()?
        .iter()
        .filter(|e: &&proto::Endpoint| {
            e.key
                .as_ref()
                .is_some_and(|k| k.service == name && k.namespace == ns)
        })
        .find_map(|e| e.ports.first().and_then(|&p| u16::try_from(p).ok()))
}

/// An HTTP/1.1 answer, read whole.
pub(crate) struct HttpAnswer {
    pub(crate) status: u16,
    pub(crate) body: String,
    /// The `trellis-error` header of a response a proxy made itself.
    pub(crate) trellis_error: Option<String>,
}

/// One `GET path` on a new connection to `addr`, read to the end.
pub(crate) async fn http_get(addr: &str, path: &str, host: &str) -> Result<HttpAnswer, String> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nuser-agent: trellis-check\r\nconnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{addr} closed without an HTTP answer"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{addr} sent no HTTP status line"))?;
    let trellis_error = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(ERROR_HEADER))
        .map(|(_, v)| v.trim().to_owned());
    // A chunked body keeps its chunk sizes; only the first line is read.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body.split_once("\r\n").map_or(body, |(_, rest)| rest)
    } else {
        body
    };
    Ok(HttpAnswer {
        status,
        body: body.to_owned(),
        trellis_error,
    })
}
