//! What a sidecar may send its zone's gateway before the ClientHello: the
//! trace context of the request that opens the connection, so the gateways'
//! spans join the request's trace. The workload TLS that follows is end to
//! end and opaque to the gateway; this is the one thing it is told.
//!
//! The format is a PROXY protocol version 2 header (the HAProxy spec) with
//! command `LOCAL` and no addresses (the gateway uses the real connection's
//! endpoints), carrying one TLV of the application-specific type
//! [`TRACEPARENT_TLV`] whose value is the W3C `traceparent`:
//!
//! ```text
//! signature (12) | 0x20 (v2, LOCAL) | 0x00 (AF_UNSPEC) | len:u16be | TLV…
//! TLV = type:u8 | len:u16be | value
//! ```
//!
//! A connection without it starts with a TLS record (`0x16`), so a gateway
//! tells the two apart by the first byte. Gateways older than this do not
//! read it: upgrade a zone's gateways before its agents.

use trellis_proxy::Decoded;

/// The PROXY protocol v2 signature.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// TLV type of the `traceparent` (in the range the spec leaves to
/// applications, 0xE0–0xEF).
pub const TRACEPARENT_TLV: u8 = 0xE0;

/// The most a preamble may take: a gateway reads no further before giving up.
pub const MAX_LEN: usize = 16 + 512;

/// Why a preamble was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PreambleError {
    /// Not PROXY protocol v2.
    #[error("field signature: not a PROXY protocol v2 header")]
    Signature,
    /// Another version or command than v2 `LOCAL`.
    #[error("field version/command: {0:#04x} is not v2 LOCAL (0x20)")]
    Command(u8),
    /// Addresses were sent (a sidecar sends none).
    #[error("field family: {0:#04x}, but a sidecar's preamble carries no addresses (0x00)")]
    Family(u8),
    /// Longer than [`MAX_LEN`].
    #[error("field length: {0} bytes is more than the {MAX_LEN} a gateway reads")]
    TooLong(usize),
    /// A TLV runs past the header's end.
    #[error("field tlv: a TLV of type {0:#04x} runs past the header")]
    Truncated(u8),
    /// The trace context is not printable ASCII.
    #[error("field traceparent: only printable ASCII is allowed")]
    Trace,
}

/// Whether `first` (a connection's first byte) starts a preamble rather
/// than a TLS record.
pub fn starts_preamble(first: u8) -> bool {
    first == SIGNATURE[0]
}

/// The preamble carrying `traceparent`.
pub fn encode(traceparent: &str) -> Vec<u8> {
    let tp = traceparent.as_bytes();
    let tlv_len = 3 + tp.len();
    let mut out = Vec::with_capacity(16 + tlv_len);
    out.extend_from_slice(&SIGNATURE);
    out.push(0x20);
    out.push(0x00);
    out.extend_from_slice(&(tlv_len as u16).to_be_bytes());
    out.push(TRACEPARENT_TLV);
    out.extend_from_slice(&(tp.len() as u16).to_be_bytes());
    out.extend_from_slice(tp);
    out
}

/// Reads a preamble at the start of `buf`: the `traceparent` it carries
/// (if any) and its length, or how many more bytes are needed.
/// Unknown TLVs are skipped, as the spec asks.
pub fn decode(buf: &[u8]) -> Result<Decoded<Option<String>>, PreambleError> {
    if buf.len() < 16 {
        let have = buf.len().min(12);
        if buf[..have] != SIGNATURE[..have] {
            return Err(PreambleError::Signature);
        }
        return Ok(Decoded::Incomplete {
            needed: 16 - buf.len(),
        });
    }
    if buf[..12] != SIGNATURE {
        return Err(PreambleError::Signature);
    }
    if buf[12] != 0x20 {
        return Err(PreambleError::Command(buf[12]));
    }
    if buf[13] != 0x00 {
        return Err(PreambleError::Family(buf[13]));
    }
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if 16 + len > MAX_LEN {
        return Err(PreambleError::TooLong(16 + len));
    }
    if buf.len() < 16 + len {
        return Ok(Decoded::Incomplete {
            needed: 16 + len - buf.len(),
        });
    }
    let mut tlvs = &buf[16..16 + len];
    let mut trace = None;
    while !tlvs.is_empty() {
        let kind = tlvs[0];
        if tlvs.len() < 3 {
            return Err(PreambleError::Truncated(kind));
        }
        let n = usize::from(u16::from_be_bytes([tlvs[1], tlvs[2]]));
        let Some(value) = tlvs.get(3..3 + n) else {
            return Err(PreambleError::Truncated(kind));
        };
        if kind == TRACEPARENT_TLV {
            if !value.iter().all(|b| b.is_ascii_graphic()) {
                return Err(PreambleError::Trace);
            }
            trace = Some(String::from_utf8_lossy(value).into_owned());
        }
        tlvs = &tlvs[3 + n..];
    }
    Ok(Decoded::Complete {
        value: trace,
        consumed: 16 + len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn round_trips_byte_by_byte() {
        let wire = encode(TP);
        assert!(starts_preamble(wire[0]) && !starts_preamble(0x16));
        for cut in 0..wire.len() {
            assert!(
                matches!(decode(&wire[..cut]), Ok(Decoded::Incomplete { .. })),
                "cut at {cut}"
            );
        }
        let mut with_hello = wire.clone();
        with_hello.extend_from_slice(&[0x16, 3, 1]);
        assert_eq!(
            decode(&with_hello),
            Ok(Decoded::Complete {
                value: Some(TP.to_owned()),
                consumed: wire.len()
            })
        );
    }

    #[test]
    fn refuses_what_a_sidecar_never_sends() {
        let mut w = encode(TP);
        w[12] = 0x21;
        assert_eq!(decode(&w), Err(PreambleError::Command(0x21)));
        let mut w = encode(TP);
        w[13] = 0x11;
        assert_eq!(decode(&w), Err(PreambleError::Family(0x11)));
        let mut w = encode(TP);
        w[18] = 0xff; // the TLV claims more than the header holds
        assert_eq!(decode(&w), Err(PreambleError::Truncated(TRACEPARENT_TLV)));
        let mut w = encode(TP);
        w[14..16].copy_from_slice(&4000u16.to_be_bytes());
        assert_eq!(decode(&w), Err(PreambleError::TooLong(4016)));
        assert_eq!(decode(b"GET / HTTP/1.1\r\n"), Err(PreambleError::Signature));
        let w = encode("00-a b");
        assert_eq!(decode(&w), Err(PreambleError::Trace));
    }
}
