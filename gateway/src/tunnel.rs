//! The tunnel stream protocol, sans-IO.
//!
//! Every tunnelled connection is one bidirectional stream (a QUIC stream, or
//! an HTTP/2 CONNECT stream on the fallback). The opener writes a [`Header`];
//! the acceptor answers with a [`Reply`]; after an accepting reply both
//! directions carry raw bytes, and each side's end of stream is a half-close.
//!
//! ```text
//! header  = version:u8 (1, 2 or 3) | body_len:u16be | body   body_len <= 1024
//! body    = name(service) | name(namespace) | port:u16be | name(source_zone) | text(traceparent)
//!           [ name(subset) ]                                   version 2 only
//!           [ text(subset) | name(zone) ]                      version 3 only (subset: 0 bytes for none)
//! name    = len:u8 | DNS label bytes (1..=63, [a-z0-9-], no leading/trailing '-')
//! text    = len:u8 | printable ASCII (0 bytes: no trace context)
//! reply   = version:u8 (1) | code:u8 | len:u8 | UTF-8 reason
//! ```
//!
//! Version 2 adds the subset of the service's endpoints the caller chose
//! (a `Backend` subset); an opener sends version 1 whenever it has no
//! subset, so a gateway of an earlier release still takes those streams.
//! Version 3 adds the zone the stream is for, when that is not the
//! receiving gateway's own: a stream to or from an edge zone, relayed by
//! the gateway that carries the edge (see `inbound`). Only such streams
//! use it.
//!
//! Decoding is strict: an unknown version, a bad name, a zero port, trailing
//! bytes or a length over the bound are protocol errors, never panics. The
//! functions here take bytes and return values; the drivers in `relay` own
//! the sockets and the timeouts.

use std::fmt;

/// The version of replies, and of headers without a subset.
pub const VERSION: u8 = 1;
/// The version of headers that name a subset.
pub const VERSION_SUBSET: u8 = 2;
/// The version of headers that name the zone the stream is for.
pub const VERSION_RELAY: u8 = 3;
/// Upper bound on a header body; bounds what a peer can make us buffer.
pub const MAX_HEADER_BODY: usize = 1024;
/// Upper bound on a whole encoded header.
pub const MAX_HEADER_LEN: usize = 3 + MAX_HEADER_BODY;
/// Upper bound on a whole encoded reply.
pub const MAX_REPLY_LEN: usize = 3 + 255;

/// What the opener of a stream asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Destination service name.
    pub service: String,
    /// Destination namespace.
    pub namespace: String,
    /// Destination port (the application's port, as in the SNI).
    pub port: u16,
    /// Zone the stream comes from; checked against exports.
    pub source_zone: String,
    /// W3C `traceparent`, if the opener has one.
    pub traceparent: Option<String>,
    /// Only endpoints of this subset of the service.
    pub subset: Option<String>,
    /// The zone the stream is for, when it is not the receiving gateway's:
    /// that gateway relays it (an edge zone's stream, through the gateway
    /// that carries the edge).
    pub zone: Option<String>,
}

/// The acceptor's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Accepted, or why not.
    pub code: ReplyCode,
    /// A short human-readable reason, for logs at the opener.
    pub reason: String,
}

/// Why a stream was refused (or that it was accepted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ReplyCode {
    /// Bytes may flow.
    Accepted,
    /// The zone has no such service.
    UnknownService,
    /// The service exists but is not exported to the source zone.
    NotExported,
    /// The service has no healthy endpoint in the zone.
    NoHealthyEndpoint,
    /// Policy forbids the source.
    Forbidden,
    /// The gateway is at its stream limit or draining.
    Overloaded,
    /// The endpoint was chosen but could not be reached.
    UpstreamFailed,
    /// The header was malformed.
    ProtocolError,
}

pub use trellis_proxy::Decoded;

/// Why a header or reply was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The version byte is not one we speak.
    #[error("unsupported tunnel version {0} (this gateway speaks {VERSION} and {VERSION_SUBSET})")]
    Version(u8),
    /// The declared length is over the bound.
    #[error("header body of {0} bytes exceeds the limit of {MAX_HEADER_BODY}")]
    TooLong(usize),
    /// A field ends past the declared body.
    #[error("field {0} runs past the end of the header")]
    Truncated(&'static str),
    /// Bytes left after the last field.
    #[error("{0} unexpected bytes after the last header field")]
    Trailing(usize),
    /// A name is not a DNS label.
    #[error("field {field}: {reason}")]
    BadName {
        /// Which field.
        field: &'static str,
        /// Which rule it broke.
        reason: String,
    },
    /// Port zero.
    #[error("field port: must not be 0")]
    ZeroPort,
    /// The trace context has bytes that are not printable ASCII.
    #[error("field traceparent: only printable ASCII is allowed")]
    BadTrace,
    /// An unknown reply code.
    #[error("unknown reply code {0}")]
    UnknownCode(u8),
    /// A reason that is not UTF-8.
    #[error("reply reason is not UTF-8")]
    BadReason,
}

// === impl Header ===

impl Header {
    /// Checks every field against the rules the decoder enforces, so that an
    /// opener never sends what an acceptor would refuse.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        check_label("service", &self.service)?;
        check_label("namespace", &self.namespace)?;
        check_label("source_zone", &self.source_zone)?;
        if let Some(s) = &self.subset {
            check_label("subset", s)?;
        }
        if let Some(z) = &self.zone {
            check_label("zone", z)?;
        }
        if self.port == 0 {
            return Err(ProtocolError::ZeroPort);
        }
        if let Some(t) = &self.traceparent {
            check_trace(t.as_bytes())?;
            if t.len() > 255 {
                return Err(ProtocolError::BadTrace);
            }
        }
        Ok(())
    }

    /// Encodes the header, after validating it.
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        self.validate()?;
        let trace = self.traceparent.as_deref().unwrap_or("");
        let body_len = 1
            + self.service.len()
            + 1
            + self.namespace.len()
            + 2
            + 1
            + self.source_zone.len()
            + 1
            + trace.len()
            + match (&self.subset, &self.zone) {
                (s, Some(z)) => 1 + s.as_ref().map_or(0, String::len) + 1 + z.len(),
                (Some(s), None) => 1 + s.len(),
                (None, None) => 0,
            };
        // Labels are at most 63 bytes and the trace 255, so this fits.
        let mut out = Vec::with_capacity(3 + body_len);
        out.push(match (&self.subset, &self.zone) {
            (_, Some(_)) => VERSION_RELAY,
            (Some(_), None) => VERSION_SUBSET,
            (None, None) => VERSION,
        });
        out.extend_from_slice(&(body_len as u16).to_be_bytes());
        push_short(&mut out, self.service.as_bytes());
        push_short(&mut out, self.namespace.as_bytes());
        out.extend_from_slice(&self.port.to_be_bytes());
        push_short(&mut out, self.source_zone.as_bytes());
        push_short(&mut out, trace.as_bytes());
        match (&self.subset, &self.zone) {
            (s, Some(z)) => {
                push_short(&mut out, s.as_deref().unwrap_or("").as_bytes());
                push_short(&mut out, z.as_bytes());
            }
            (Some(s), None) => push_short(&mut out, s.as_bytes()),
            (None, None) => {}
        }
        Ok(out)
    }

    /// Decodes a header from the front of `buf`.
    pub fn decode(buf: &[u8]) -> Result<Decoded<Header>, ProtocolError> {
        if buf.len() < 3 {
            return Ok(Decoded::Incomplete {
                needed: 3 - buf.len(),
            });
        }
        let version = buf[0];
        if !(VERSION..=VERSION_RELAY).contains(&version) {
            return Err(ProtocolError::Version(version));
        }
        let body_len = usize::from(u16::from_be_bytes([buf[1], buf[2]]));
        if body_len > MAX_HEADER_BODY {
            return Err(ProtocolError::TooLong(body_len));
        }
        if buf.len() < 3 + body_len {
            return Ok(Decoded::Incomplete {
                needed: 3 + body_len - buf.len(),
            });
        }
        let mut r = Reader(&buf[3..3 + body_len]);
        let service = r.label("service")?;
        let namespace = r.label("namespace")?;
        let port = r.u16("port")?;
        if port == 0 {
            return Err(ProtocolError::ZeroPort);
        }
        let source_zone = r.label("source_zone")?;
        let trace = r.short("traceparent")?;
        check_trace(trace)?;
        let (subset, zone) = match version {
            VERSION_SUBSET => (Some(r.label("subset")?), None),
            VERSION_RELAY => {
                let subset = r.short("subset")?;
                let subset = if subset.is_empty() {
                    None
                } else {
                    let s = String::from_utf8_lossy(subset).into_owned();
                    check_label("subset", &s)?;
                    Some(s)
                };
                (subset, Some(r.label("zone")?))
            }
            _ => (None, None),
        };
        if !r.0.is_empty() {
            return Err(ProtocolError::Trailing(r.0.len()));
        }
        let traceparent = (!trace.is_empty()).then(|| String::from_utf8_lossy(trace).into_owned());
        Ok(Decoded::Complete {
            value: Header {
                service,
                namespace,
                port,
                source_zone,
                traceparent,
                subset,
                zone,
            },
            consumed: 3 + body_len,
        })
    }
}

impl fmt::Display for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}:{} from zone {}",
            self.service, self.namespace, self.port, self.source_zone
        )?;
        match &self.zone {
            Some(z) => write!(f, " for zone {z}"),
            None => Ok(()),
        }
    }
}

// === impl Reply ===

impl Reply {
    /// An accepting reply.
    pub fn accepted() -> Self {
        Self {
            code: ReplyCode::Accepted,
            reason: String::new(),
        }
    }

    /// A refusal with a reason.
    pub fn refused(code: ReplyCode, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }

    /// Encodes the reply; a reason over 255 bytes is cut at a character boundary.
    pub fn encode(&self) -> Vec<u8> {
        let mut reason = self.reason.as_str();
        while reason.len() > 255 {
            let mut cut = 255;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason = &reason[..cut];
        }
        let mut out = Vec::with_capacity(3 + reason.len());
        out.push(VERSION);
        out.push(self.code.to_u8());
        push_short(&mut out, reason.as_bytes());
        out
    }

    /// Decodes a reply from the front of `buf`.
    pub fn decode(buf: &[u8]) -> Result<Decoded<Reply>, ProtocolError> {
        if buf.len() < 3 {
            return Ok(Decoded::Incomplete {
                needed: 3 - buf.len(),
            });
        }
        if buf[0] != VERSION {
            return Err(ProtocolError::Version(buf[0]));
        }
        let code = ReplyCode::from_u8(buf[1])?;
        let len = usize::from(buf[2]);
        if buf.len() < 3 + len {
            return Ok(Decoded::Incomplete {
                needed: 3 + len - buf.len(),
            });
        }
        let reason = std::str::from_utf8(&buf[3..3 + len])
            .map_err(|_| ProtocolError::BadReason)?
            .to_owned();
        Ok(Decoded::Complete {
            value: Reply { code, reason },
            consumed: 3 + len,
        })
    }
}

// === impl ReplyCode ===

impl ReplyCode {
    fn to_u8(self) -> u8 {
        match self {
            ReplyCode::Accepted => 0,
            ReplyCode::UnknownService => 1,
            ReplyCode::NotExported => 2,
            ReplyCode::NoHealthyEndpoint => 3,
            ReplyCode::Forbidden => 4,
            ReplyCode::Overloaded => 5,
            ReplyCode::UpstreamFailed => 6,
            ReplyCode::ProtocolError => 7,
        }
    }

    fn from_u8(b: u8) -> Result<Self, ProtocolError> {
        Ok(match b {
            0 => ReplyCode::Accepted,
            1 => ReplyCode::UnknownService,
            2 => ReplyCode::NotExported,
            3 => ReplyCode::NoHealthyEndpoint,
            4 => ReplyCode::Forbidden,
            5 => ReplyCode::Overloaded,
            6 => ReplyCode::UpstreamFailed,
            7 => ReplyCode::ProtocolError,
            other => return Err(ProtocolError::UnknownCode(other)),
        })
    }

    /// A stable snake_case name, for metrics labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplyCode::Accepted => "accepted",
            ReplyCode::UnknownService => "unknown_service",
            ReplyCode::NotExported => "not_exported",
            ReplyCode::NoHealthyEndpoint => "no_healthy_endpoint",
            ReplyCode::Forbidden => "forbidden",
            ReplyCode::Overloaded => "overloaded",
            ReplyCode::UpstreamFailed => "upstream_failed",
            ReplyCode::ProtocolError => "protocol_error",
        }
    }
}

impl fmt::Display for ReplyCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Checks that `s` is a DNS label as Trellis uses them for names: the
/// store's rule for namespaces, services and zones
/// ([`trellis_federation::policy::check_label`]), so a name the store
/// accepts always fits the tunnel header and SNI.
pub fn check_label(field: &'static str, s: &str) -> Result<(), ProtocolError> {
    trellis_federation::policy::check_label(s).map_err(|e| ProtocolError::BadName {
        field,
        reason: e.to_string(),
    })
}

fn check_trace(t: &[u8]) -> Result<(), ProtocolError> {
    if t.iter().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(ProtocolError::BadTrace)
    }
}

fn push_short(out: &mut Vec<u8>, bytes: &[u8]) {
    // Callers validated the length; the cast cannot truncate.
    out.push(bytes.len() as u8);
    out.extend_from_slice(bytes);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], ProtocolError> {
        if self.0.len() < n {
            return Err(ProtocolError::Truncated(field));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn short(&mut self, field: &'static str) -> Result<&'a [u8], ProtocolError> {
        let n = self.take(1, field)?[0];
        self.take(usize::from(n), field)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, ProtocolError> {
        let b = self.take(2, field)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn label(&mut self, field: &'static str) -> Result<String, ProtocolError> {
        let b = self.short(field)?;
        let s = std::str::from_utf8(b).map_err(|_| ProtocolError::BadName {
            field,
            reason: "is not UTF-8".into(),
        })?;
        check_label(field, s)?;
        Ok(s.to_owned())
    }
}

#[cfg(test)]
mod tests;
