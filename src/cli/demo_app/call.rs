//! The downstream side of `trellis demo-app --call`: one plain HTTP/1.1 GET
//! per call, so a chain of demo apps shows every hop a request took.
//!
//! The client is hyper's HTTP/1 connection, not a hand-rolled one: the
//! downstream may be any HTTP server, and hyper gets the framing
//! (content-length, chunked, early close) right. The mesh adds mTLS on the
//! way, so only `http://` URLs are taken.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use http::{StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpStream, UdpSocket};

/// Downstream bodies are short text; a larger one is cut off here rather
/// than held in memory.
const MAX_BODY: usize = 64 * 1024;

/// A downstream to call: `http://HOST[:PORT][/PATH]`.
#[derive(Debug, Clone)]
pub(crate) struct CallUrl {
    uri: Uri,
    /// The host without IPv6 brackets, for resolving.
    host: String,
    port: u16,
}

/// How host names in `--call` URLs become addresses.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Resolver {
    /// The system resolver (getaddrinfo: /etc/hosts, systemd-resolved, …).
    System,
    /// A DNS server asked directly over UDP, such as the agent's mesh DNS.
    Dns(SocketAddr),
}

/// Calls downstreams, each call bounded by `timeout` from resolving to the
/// last body byte.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Client {
    pub(crate) resolver: Resolver,
    pub(crate) timeout: Duration,
}

// === impl CallUrl ===

impl FromStr for CallUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let uri: Uri = s
            .parse()
            .map_err(|e| format!("not a URL ({e}); write it as http://HOST:PORT/"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => {
                return Err(format!(
                    "scheme {other:?} is not supported: write http:// (the mesh adds mTLS)"
                ));
            }
            None => return Err("no scheme: write it as http://HOST:PORT/".into()),
        }
        let authority = uri
            .authority()
            .ok_or("no host: write it as http://HOST:PORT/")?;
        if authority.as_str().contains('@') {
            return Err("user info (user@host) is not supported".into());
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err("no host: write it as http://HOST:PORT/".into());
        }
        let port = authority.port_u16().unwrap_or(80);
        Ok(Self { uri, host, port })
    }
}

impl fmt::Display for CallUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.uri, f)
    }
}

// === impl Client ===

impl Client {
    /// GETs `url` with `headers` added and returns the status and the body
    /// as text.
    pub(crate) async fn get(
        &self,
        url: &CallUrl,
        headers: &[(&'static str, String)],
    ) -> Result<(StatusCode, String)> {
        tokio::time::timeout(self.timeout, self.get_unbounded(url, headers))
            .await
            .map_err(|_| anyhow!("no answer within {:?}", self.timeout))?
    }

    async fn get_unbounded(
        &self,
        url: &CallUrl,
        headers: &[(&'static str, String)],
    ) -> Result<(StatusCode, String)> {
        let addrs = self.resolve(url).await?;
        let stream = connect(&addrs).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake failed")?;
        let path = url.uri.path_and_query().map_or("/", |p| p.as_str());
        let authority = url.uri.authority().map_or("", |a| a.as_str());
        let mut req = http::Request::get(path)
            .header(http::header::HOST, authority)
            // One call, one connection: nothing is pooled between requests.
            .header(http::header::CONNECTION, "close");
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .context("could not build the request")?;
        let exchange = async move {
            let resp = sender
                .send_request(req)
                .await
                .context("the request failed")?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| anyhow!("reading the body failed: {e}"))?
                .to_bytes();
            // `sender` drops here, which lets `conn` finish.
            anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
        };
        // The connection future does the I/O; it must run alongside the
        // exchange (not spawned) so the timeout above cancels both.
        let (answer, _) = tokio::join!(exchange, conn);
        answer
    }

    async fn resolve(&self, url: &CallUrl) -> Result<Vec<SocketAddr>> {
        if let Ok(ip) = url.host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, url.port)]);
        }
        let addrs: Vec<SocketAddr> = match self.resolver {
            Resolver::System => tokio::net::lookup_host((url.host.as_str(), url.port))
                .await
                .with_context(|| format!("could not resolve {}", url.host))?
                .collect(),
            Resolver::Dns(server) => ask_dns(server, &url.host)
                .await
                .with_context(|| {
                    format!("could not resolve {} with DNS server {server}", url.host)
                })?
                .into_iter()
                .map(|ip| SocketAddr::new(ip, url.port))
                .collect(),
        };
        if addrs.is_empty() {
            bail!("{} resolved to no address", url.host);
        }
        Ok(addrs)
    }
}

/// Connects to the first address that accepts, as getaddrinfo users do.
async fn connect(addrs: &[SocketAddr]) -> Result<TcpStream> {
    let mut last = None;
    for a in addrs {
        match TcpStream::connect(a).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(anyhow!(e).context(format!("could not connect to {a}"))),
        }
    }
    Err(last.unwrap_or_else(|| anyhow!("no address to connect to")))
}

/// The A records of `host` from `server`, else its AAAA records.
async fn ask_dns(server: SocketAddr, host: &str) -> Result<Vec<IpAddr>> {
    let fqdn = if host.ends_with('.') {
        host.to_owned()
    } else {
        format!("{host}.")
    };
    let name = Name::from_ascii(&fqdn).map_err(|e| anyhow!("not a DNS name: {e}"))?;
    for rtype in [RecordType::A, RecordType::AAAA] {
        let reply = query_udp(server, &name, rtype).await?;
        match reply.metadata.response_code {
            ResponseCode::NoError => {}
            ResponseCode::NXDomain => bail!("no such name (NXDOMAIN)"),
            code => bail!("the server answered {code}"),
        }
        let ips: Vec<IpAddr> = reply
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .collect();
        if !ips.is_empty() {
            return Ok(ips);
        }
    }
    bail!("the name has no A or AAAA record")
}

/// One query over UDP. There is no retry: the caller's timeout bounds a
/// lost datagram, and the mesh DNS is on the same host.
async fn query_udp(server: SocketAddr, name: &Name, rtype: RecordType) -> Result<Message> {
    let id = fastrand::u16(..);
    let mut query = Message::new(id, MessageType::Query, OpCode::Query);
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(name.clone(), rtype));
    let bytes = query.to_vec().context("could not encode the DNS query")?;
    let bind: SocketAddr = if server.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(bind).await.context("no UDP socket")?;
    // Connected, so an ICMP "port unreachable" comes back as an error
    // instead of a wait for the timeout.
    sock.connect(server)
        .await
        .context("no route to the server")?;
    sock.send(&bytes)
        .await
        .context("could not send the query")?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = sock.recv(&mut buf).await.context("no answer")?;
        // Anything that is not the reply to this query is ignored: a late
        // or spoofed datagram must not decide the address.
        let Ok(reply) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        if reply.metadata.id == id && reply.metadata.message_type == MessageType::Response {
            return Ok(reply);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_default_port_and_path() {
        let u: CallUrl = "http://auth.shop.mesh:8080/".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("auth.shop.mesh", 8080));
        let u: CallUrl = "http://catalog.shop.mesh".parse().unwrap();
        assert_eq!(u.port, 80);
        assert_eq!(u.uri.path_and_query().map(|p| p.as_str()), Some("/"));
        let u: CallUrl = "http://[::1]:9000/x?y=1".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 9000));
    }

    #[test]
    fn bad_urls_say_what_to_write() {
        let err = |s: &str| s.parse::<CallUrl>().unwrap_err();
        assert!(
            err("https://a:1/").contains("write http://"),
            "{}",
            err("https://a:1/")
        );
        assert!(err("auth.shop.mesh:8080").contains("http://HOST:PORT/"));
        assert!(err("http://u@a:1/").contains("user info"));
        assert!(err("not a url").contains("not a URL"));
    }
}
