//! Trust bundles: the set of roots a trust domain accepts.
//!
//! A bundle holds several roots so that a root can be replaced without
//! downtime: add the new root everywhere, move issuing to it, wait for old
//! leaves to expire, then drop the old root.

use std::path::Path;

use rustls_pki_types::{CertificateDer, TrustAnchor};

use crate::cert::{CertInfo, certs_from_pem, certs_to_pem};
use crate::error::CaError;
use crate::files;
use crate::spiffe::TrustDomain;

/// The roots of one trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    roots: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    /// A bundle with the given roots; each must be a CA certificate.
    pub fn new(
        trust_domain: TrustDomain,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, CaError> {
        if roots.is_empty() {
            return Err(CaError::BadCertificate {
                what: format!("trust bundle for {trust_domain}"),
                reason: "holds no root".into(),
            });
        }
        let mut bundle = Self {
            trust_domain,
            roots: Vec::with_capacity(roots.len()),
        };
        for r in roots {
            bundle.add_root(r)?;
        }
        Ok(bundle)
    }

    /// Parses a PEM bundle.
    pub fn from_pem(trust_domain: TrustDomain, pem: &[u8], what: &str) -> Result<Self, CaError> {
        Self::new(trust_domain, certs_from_pem(pem, what)?)
    }

    /// Loads a PEM bundle file.
    pub fn load(trust_domain: TrustDomain, path: &Path) -> Result<Self, CaError> {
        Self::from_pem(
            trust_domain,
            &files::read(path)?,
            &path.display().to_string(),
        )
    }

    /// Writes the bundle as PEM (public, mode 0644).
    pub fn save(&self, path: &Path) -> Result<(), CaError> {
        files::write_public(path, self.to_pem().as_bytes())
    }

    /// The bundle as PEM, one block per root.
    pub fn to_pem(&self) -> String {
        certs_to_pem(&self.roots)
    }

    /// Adds a root; adding one already present is a no-op.
    pub fn add_root(&mut self, root: CertificateDer<'static>) -> Result<(), CaError> {
        let info = CertInfo::parse(&root)?;
        if !info.is_ca {
            return Err(CaError::BadCertificate {
                what: info.subject,
                reason: "is not a CA certificate and cannot be a trust root".into(),
            });
        }
        // Parse it the way the verifier will, so a bad root fails here, not mid-handshake.
        webpki::anchor_from_trusted_cert(&root).map_err(|e| CaError::BadCertificate {
            what: info.subject,
            reason: format!("is not usable as a trust anchor: {e}"),
        })?;
        if !self.roots.contains(&root) {
            self.roots.push(root);
        }
        Ok(())
    }

    /// Removes a root; the last root cannot be removed.
    pub fn remove_root(&mut self, root: &CertificateDer<'_>) -> Result<bool, CaError> {
        let before = self.roots.len();
        let keep: Vec<_> = self
            .roots
            .iter()
            .filter(|r| r.as_ref() != root.as_ref())
            .cloned()
            .collect();
        if keep.is_empty() {
            return Err(CaError::BadCertificate {
                what: format!("trust bundle for {}", self.trust_domain),
                reason: "removing this root would leave the bundle empty".into(),
            });
        }
        self.roots = keep;
        Ok(self.roots.len() != before)
    }

    /// The roots, in the order added.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// Whether `next` may replace this bundle: it must still hold a root
    /// trusted now. A rotation adds the new root beside the old one first
    /// and retires the old one later, so an honest change always keeps
    /// one; a bundle of strangers' roots (a compromised or impersonated
    /// server) is refused rather than trusted.
    pub fn continued_by(&self, next: &TrustBundle) -> bool {
        next.roots.iter().any(|r| self.roots.contains(r))
    }

    /// The trust domain these roots speak for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The roots as webpki trust anchors.
    pub(crate) fn anchors(&self) -> Vec<TrustAnchor<'static>> {
        self.roots
            .iter()
            // `add_root` already parsed each one, so none is skipped here.
            .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok())
            .map(|a| a.to_owned())
            .collect()
    }
}
