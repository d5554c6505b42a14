//! Reading the server name of a TLS ClientHello without terminating TLS, and
//! the mesh names it carries.
//!
//! A gateway routes workload TLS by its SNI and passes the bytes through
//! unchanged, so it only parses as far as the `server_name` extension
//! (RFC 8446 4.1.2 and RFC 6066 3). A ClientHello may span several TLS
//! records; the parser gathers their fragments up to [`MAX_CLIENT_HELLO`].

use crate::Decoded;

fn check_label(field: &str, v: &str) -> Result<(), String> {
    trellis_federation::policy::check_label(v).map_err(|e| format!("field {field}: {e}"))
}

/// Upper bound on the ClientHello bytes buffered before routing.
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;

const RECORD_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST: u8 = 0;

/// Why the first bytes of a connection are not a usable ClientHello.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SniError {
    /// The first record is not a TLS handshake record.
    #[error("not TLS: the first byte is {0:#04x}, a TLS handshake record starts with 0x16")]
    NotTls(u8),
    /// The handshake message is not a ClientHello.
    #[error("the first handshake message is type {0}, not a ClientHello")]
    NotClientHello(u8),
    /// The ClientHello is larger than the gateway buffers.
    #[error("the ClientHello is larger than {MAX_CLIENT_HELLO} bytes")]
    TooLarge,
    /// A length field points past its container.
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    /// The server name is not valid ASCII.
    #[error("the server name is not ASCII")]
    BadName,
}

/// A destination read from an SNI of the form
/// `[<subset>.]<port>.<service>.<namespace>.<zone>.<suffix>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshName {
    /// A subset of the service's endpoints (a `Backend` subset), chosen by
    /// the caller; the destination zone's gateway picks among them.
    pub subset: Option<String>,
    /// Application port.
    pub port: u16,
    /// Service name.
    pub service: String,
    /// Namespace.
    pub namespace: String,
    /// Zone the destination runs in.
    pub zone: String,
}

/// Finds the SNI in the ClientHello at the front of `buf`. `Complete` carries
/// `None` when the ClientHello has no server name; `consumed` is the number of
/// bytes holding the whole ClientHello.
pub fn client_hello_sni(buf: &[u8]) -> Result<Decoded<Option<String>>, SniError> {
    // Gather the handshake message from as many records as it spans.
    let mut handshake = Vec::new();
    let mut at = 0;
    loop {
        if buf.len() < at + 5 {
            return Ok(Decoded::Incomplete {
                needed: at + 5 - buf.len(),
            });
        }
        if buf[at] != RECORD_HANDSHAKE {
            return Err(SniError::NotTls(buf[at]));
        }
        let len = usize::from(u16::from_be_bytes([buf[at + 3], buf[at + 4]]));
        if len == 0 {
            return Err(SniError::Malformed("empty handshake record"));
        }
        if at + 5 + len > MAX_CLIENT_HELLO {
            return Err(SniError::TooLarge);
        }
        if buf.len() < at + 5 + len {
            return Ok(Decoded::Incomplete {
                needed: at + 5 + len - buf.len(),
            });
        }
        handshake.extend_from_slice(&buf[at + 5..at + 5 + len]);
        at += 5 + len;
        if handshake.len() >= 4 {
            if handshake[0] != HANDSHAKE_CLIENT_HELLO {
                return Err(SniError::NotClientHello(handshake[0]));
            }
            let body_len = (usize::from(handshake[1]) << 16)
                | (usize::from(handshake[2]) << 8)
                | usize::from(handshake[3]);
            if 4 + body_len > MAX_CLIENT_HELLO {
                return Err(SniError::TooLarge);
            }
            if handshake.len() >= 4 + body_len {
                let sni = parse_client_hello(&handshake[4..4 + body_len])?;
                return Ok(Decoded::Complete {
                    value: sni,
                    consumed: at,
                });
            }
        }
    }
}

fn parse_client_hello(body: &[u8]) -> Result<Option<String>, SniError> {
    let mut r = Cursor(body);
    r.skip(2, "legacy_version")?;
    r.skip(32, "random")?;
    let n = r.u8("session_id")?;
    r.skip(usize::from(n), "session_id")?;
    let n = r.u16("cipher_suites")?;
    r.skip(usize::from(n), "cipher_suites")?;
    let n = r.u8("compression_methods")?;
    r.skip(usize::from(n), "compression_methods")?;
    if r.0.is_empty() {
        // No extensions at all (legal before TLS 1.3): no SNI.
        return Ok(None);
    }
    let n = r.u16("extensions")?;
    let mut exts = Cursor(r.take(usize::from(n), "extensions")?);
    while !exts.0.is_empty() {
        let ty = exts.u16("extension type")?;
        let len = exts.u16("extension length")?;
        let data = exts.take(usize::from(len), "extension data")?;
        if ty != EXT_SERVER_NAME {
            continue;
        }
        let mut list = Cursor(data);
        let n = list.u16("server_name_list")?;
        let mut names = Cursor(list.take(usize::from(n), "server_name_list")?);
        while !names.0.is_empty() {
            let kind = names.u8("name_type")?;
            let n = names.u16("host_name")?;
            let name = names.take(usize::from(n), "host_name")?;
            if kind == NAME_TYPE_HOST {
                let name = std::str::from_utf8(name).map_err(|_| SniError::BadName)?;
                if !name.is_ascii() {
                    return Err(SniError::BadName);
                }
                return Ok(Some(name.to_ascii_lowercase()));
            }
        }
        return Ok(None);
    }
    Ok(None)
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], SniError> {
        if self.0.len() < n {
            return Err(SniError::Malformed(what));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn skip(&mut self, n: usize, what: &'static str) -> Result<(), SniError> {
        self.take(n, what).map(|_| ())
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, SniError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, SniError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
}

// === impl MeshName ===

impl MeshName {
    /// Parses `<port>.<service>.<namespace>.<zone>.<suffix>`; `None` if `sni`
    /// is not a mesh name under `suffix`, with the reason.
    pub fn parse(sni: &str, suffix: &str) -> Result<Self, String> {
        let head = sni
            .strip_suffix(suffix)
            .and_then(|h| h.strip_suffix('.'))
            .ok_or_else(|| format!("{sni:?} is not under the mesh suffix {suffix:?}"))?;
        let parts: Vec<&str> = head.split('.').collect();
        let (subset, rest) = match parts.as_slice() {
            [subset, rest @ ..] if rest.len() == 4 => (Some(*subset), rest),
            all => (None, all),
        };
        let [port, service, namespace, zone] = rest else {
            return Err(format!(
                "{sni:?} has {} labels before the suffix; expected [<subset>.]<port>.<service>.<namespace>.<zone>",
                parts.len()
            ));
        };
        if let Some(s) = subset {
            check_label("subset", s).map_err(|e| format!("{sni:?}: {e}"))?;
        }
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{sni:?}: {port:?} is not a port number"))?;
        for (field, v) in [
            ("service", service),
            ("namespace", namespace),
            ("zone", zone),
        ] {
            check_label(field, v).map_err(|e| format!("{sni:?}: {e}"))?;
        }
        Ok(Self {
            subset: subset.map(str::to_owned),
            port,
            service: (*service).to_owned(),
            namespace: (*namespace).to_owned(),
            zone: (*zone).to_owned(),
        })
    }

    /// The SNI for this name under `suffix`.
    pub fn to_sni(&self, suffix: &str) -> String {
        let subset = self
            .subset
            .as_ref()
            .map(|s| format!("{s}."))
            .unwrap_or_default();
        format!(
            "{subset}{}.{}.{}.{}.{suffix}",
            self.port, self.service, self.namespace, self.zone
        )
    }
}
