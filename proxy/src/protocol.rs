//! What an app speaks on a port: declared in configuration, or detected
//! from the first bytes the client sends.
//!
//! Detection reads until the bytes decide: the HTTP/2 connection preface,
//! or an HTTP/1.x request line (a method token, a target, `HTTP/1.0` or
//! `HTTP/1.1`). Anything else is opaque TCP, and so is silence: a protocol
//! in which the server speaks first (a database greeting, SMTP) sends
//! nothing, so after the detection timeout the connection is spliced as TCP
//! with nothing lost. The bytes read are handed back, to be replayed.

use std::fmt;
use std::io;
use std::str::FromStr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// What a connection turned out to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// HTTP/1.0 or HTTP/1.1.
    Http1,
    /// HTTP/2 with prior knowledge (h2c), which gRPC clients use in plain text.
    Http2,
    /// Anything else: spliced as bytes.
    Tcp,
}

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The longest HTTP/1 request line detection reads before deciding: a line
/// longer than this is taken for HTTP if it started like one (the HTTP
/// server then applies its own limits and answers 414 or 400).
const MAX_LINE: usize = 8 * 1024;

/// The longest method token accepted as HTTP (`PROPPATCH`, `MKCALENDAR`…).
const MAX_METHOD: usize = 24;

/// Decides from the bytes so far; `None` while more bytes could change it.
pub fn classify(buf: &[u8]) -> Option<Detected> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Some(Detected::Http2)
        } else {
            None
        };
    }
    // method SP request-target SP HTTP-version CRLF (RFC 9112 §3)
    let method_len = buf.iter().take_while(|b| is_tchar(**b)).count();
    if method_len == buf.len() {
        return (method_len > MAX_METHOD).then_some(Detected::Tcp);
    }
    if method_len == 0 || method_len > MAX_METHOD || buf[method_len] != b' ' {
        return Some(Detected::Tcp);
    }
    let rest = &buf[method_len + 1..];
    let Some(eol) = rest.iter().position(|b| *b == b'\n') else {
        // The request target: visible ASCII only.
        if rest
            .iter()
            .any(|b| !(b.is_ascii_graphic() || *b == b' ' || *b == b'\r'))
        {
            return Some(Detected::Tcp);
        }
        return (buf.len() >= MAX_LINE).then_some(Detected::Http1);
    };
    let line = rest[..eol].strip_suffix(b"\r").unwrap_or(&rest[..eol]);
    let http = line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0");
    Some(if http { Detected::Http1 } else { Detected::Tcp })
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Reads from `s` until [`classify`] decides, the client pauses for
/// `timeout` (taken as TCP), or the stream ends (TCP). Returns what was read.
pub async fn detect<S: AsyncRead + Unpin>(
    s: &mut S,
    timeout: Duration,
) -> io::Result<(Detected, Vec<u8>)> {
    let mut buf = Vec::with_capacity(512);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let mut chunk = [0u8; 1024];
        let want = chunk.len().min(MAX_LINE + 1 - buf.len().min(MAX_LINE));
        match tokio::time::timeout_at(deadline, s.read(&mut chunk[..want])).await {
            Err(_) => return Ok((Detected::Tcp, buf)),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(0)) => return Ok((Detected::Tcp, buf)),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
        if let Some(d) = classify(&buf) {
            return Ok((d, buf));
        }
    }
}

/// A port's protocol as configured.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Declared {
    /// Look at the first bytes (the default).
    #[default]
    Detect,
    /// HTTP/1.1 (an HTTP/2 preface is still recognised and served).
    Http,
    /// HTTP/2 with prior knowledge.
    Http2,
    /// gRPC: HTTP/2, with gRPC status in the metrics.
    Grpc,
    /// Opaque TCP: never parsed, never delayed.
    Tcp,
}

impl Declared {
    /// The configuration name.
    pub fn as_str(self) -> &'static str {
        match self {
            Declared::Detect => "detect",
            Declared::Http => "http",
            Declared::Http2 => "http2",
            Declared::Grpc => "grpc",
            Declared::Tcp => "tcp",
        }
    }
}

impl fmt::Display for Declared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Declared {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "detect" => Declared::Detect,
            "http" => Declared::Http,
            "http2" => Declared::Http2,
            "grpc" => Declared::Grpc,
            "tcp" => Declared::Tcp,
            other => {
                return Err(format!(
                    "unknown protocol {other:?}; one of detect, http, http2, grpc, tcp"
                ));
            }
        })
    }
}

/// What a declared protocol means before any byte is read: `Some` when the
/// declaration decides alone. A declared HTTP port is never read for
/// detection: a client slow to send its request must not be taken for a
/// server-first protocol (the HTTP server tells HTTP/1.1 from the HTTP/2
/// preface itself).
pub fn declared(d: Declared) -> Option<Detected> {
    match d {
        Declared::Tcp => Some(Detected::Tcp),
        Declared::Http => Some(Detected::Http1),
        Declared::Http2 | Declared::Grpc => Some(Detected::Http2),
        Declared::Detect => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_and_prefaces_decide() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"POST /x?y=1 HTTP/1.0\n"), Some(Detected::Http1));
        assert_eq!(
            classify(b"CONNECT db.shop:5432 HTTP/1.1\r\n"),
            Some(Detected::Http1)
        );
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
        // Prefixes wait for more.
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"GET /index"), None);
        assert_eq!(classify(&H2_PREFACE[..10]), None);
        // Other protocols are TCP as soon as they cannot be HTTP.
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Some(Detected::Tcp));
        assert_eq!(classify(b"SSH-2.0-OpenSSH_9.2\r\n"), Some(Detected::Tcp));
        assert_eq!(classify(b"PING\r\n"), Some(Detected::Tcp));
        assert_eq!(classify(b"GET / SPDY/3\r\n"), Some(Detected::Tcp));
        assert_eq!(classify(b"GET /\x01"), Some(Detected::Tcp));
        assert_eq!(classify(&[b'A'; 40]), Some(Detected::Tcp));
    }

    #[tokio::test]
    async fn silence_is_tcp_after_the_timeout_and_nothing_is_lost() {
        let (_client, mut server) = tokio::io::duplex(64);
        let (d, read) = detect(&mut server, Duration::from_millis(30))
            .await
            .unwrap();
        assert_eq!((d, read.len()), (Detected::Tcp, 0));

        let (mut client, mut server) = tokio::io::duplex(64);
        use tokio::io::AsyncWriteExt;
        client.write_all(b"GET / HT").await.unwrap();
        let t = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            client.write_all(b"TP/1.1\r\nhost: a\r\n").await.unwrap();
            client
        });
        let (d, read) = detect(&mut server, Duration::from_secs(5)).await.unwrap();
        assert_eq!(d, Detected::Http1);
        assert!(read.starts_with(b"GET / HTTP/1.1\r\n"), "{read:?}");
        drop(t.await);
    }

    #[test]
    fn only_detect_waits_for_bytes() {
        assert_eq!(declared(Declared::Detect), None);
        assert_eq!(declared(Declared::Http), Some(Detected::Http1));
        assert_eq!(declared(Declared::Grpc), Some(Detected::Http2));
        assert_eq!(declared(Declared::Tcp), Some(Detected::Tcp));
    }

    #[test]
    fn declared_names_parse_and_refuse_others() {
        for d in ["detect", "http", "http2", "grpc", "tcp"] {
            assert_eq!(d.parse::<Declared>().unwrap().as_str(), d);
        }
        let e = "mongo".parse::<Declared>().unwrap_err();
        assert!(e.contains("mongo") && e.contains("grpc"), "{e}");
    }
}
