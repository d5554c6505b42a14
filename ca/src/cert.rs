//! Reading certificates: PEM decoding and the fields Trellis cares about.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::CaError;
use crate::spiffe::SpiffeId;

/// The facts about one certificate that Trellis reads and shows.
#[derive(Debug, Clone)]
pub struct CertInfo {
    /// The SPIFFE ID from the single URI SAN, if there is exactly one and it parses.
    pub spiffe_id: Option<SpiffeId>,
    /// Every URI SAN, as text.
    pub uri_sans: Vec<String>,
    /// Subject distinguished name, RFC 4514 text.
    pub subject: String,
    /// Issuer distinguished name, RFC 4514 text.
    pub issuer: String,
    /// Serial number, colon-separated hex.
    pub serial: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Whether basicConstraints says this is a CA.
    pub is_ca: bool,
    /// The CA's path length constraint, if any.
    pub path_len: Option<u32>,
    /// DER of the SubjectPublicKeyInfo, to match a certificate to its key.
    pub spki_der: Vec<u8>,
}

impl CertInfo {
    /// Parses the fields of a DER certificate.
    pub fn parse(der: &[u8]) -> Result<Self, CaError> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| CaError::BadCertificate {
            what: "(DER)".into(),
            reason: format!("not a valid X.509 certificate: {e}"),
        })?;
        let bad = |reason: String| CaError::BadCertificate {
            what: cert.subject().to_string(),
            reason,
        };
        let mut uri_sans = Vec::new();
        if let Some(san) = cert
            .subject_alternative_name()
            .map_err(|e| bad(format!("bad subjectAltName: {e}")))?
        {
            for name in &san.value.general_names {
                if let GeneralName::URI(uri) = name {
                    uri_sans.push((*uri).to_owned());
                }
            }
        }
        let spiffe_id = match uri_sans.as_slice() {
            [one] => one.parse().ok(),
            _ => None,
        };
        let (is_ca, path_len) = match cert
            .basic_constraints()
            .map_err(|e| bad(format!("bad basicConstraints: {e}")))?
        {
            Some(bc) => (bc.value.ca, bc.value.path_len_constraint),
            None => (false, None),
        };
        let v = cert.validity();
        Ok(Self {
            spiffe_id,
            uri_sans,
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            serial: cert.raw_serial_as_string(),
            not_before: unix(v.not_before.timestamp()),
            not_after: unix(v.not_after.timestamp()),
            is_ca,
            path_len,
            spki_der: cert.public_key().raw.to_vec(),
        })
    }

    /// The certificate's one SPIFFE ID, or why it has none.
    pub fn require_spiffe_id(&self) -> Result<SpiffeId, String> {
        match self.uri_sans.as_slice() {
            [] => Err("has no URI SAN (a SPIFFE ID is required)".into()),
            [one] => one
                .parse::<SpiffeId>()
                .map_err(|e| format!("URI SAN {one:?} is not a SPIFFE ID: {e}")),
            many => Err(format!(
                "has {} URI SANs; an SVID has exactly one",
                many.len()
            )),
        }
    }

    /// Lifetime left at `now` (zero once expired).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or_default()
    }

    /// The moment half of the lifetime has passed: when renewal is due.
    pub fn half_life(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life / 2
    }
}

fn unix(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// Decodes every `CERTIFICATE` block of a PEM text; `what` names the source in errors.
pub fn certs_from_pem(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::Pem {
            what: what.to_owned(),
            reason: format!("bad PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(CaError::Pem {
            what: what.to_owned(),
            reason: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

/// Decodes the first private key of a PEM text (PKCS#8, SEC1 or PKCS#1).
pub fn key_from_pem(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, CaError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| CaError::Pem {
        what: what.to_owned(),
        reason: format!("no usable private key: {e}"),
    })
}

/// Encodes certificates as PEM, in order.
pub fn certs_to_pem<'a>(certs: impl IntoIterator<Item = &'a CertificateDer<'a>>) -> String {
    let mut out = String::new();
    for c in certs {
        out.push_str(&pem_block("CERTIFICATE", c.as_ref()));
    }
    out
}

/// One PEM block, as every Trellis file writes it (64 columns, LF).
pub(crate) fn pem_block(label: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(label, der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trips() {
        let der = CertificateDer::from((0u8..200).collect::<Vec<u8>>());
        let pem = certs_to_pem([&der]);
        let back = CertificateDer::pem_slice_iter(pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(back.as_ref(), der.as_ref());
    }

    #[test]
    fn empty_pem_is_refused_with_the_source_named() {
        let err = certs_from_pem(b"hello", "bundle.pem").unwrap_err();
        assert!(err.to_string().contains("bundle.pem"), "{err}");
    }
}
