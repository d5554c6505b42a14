//! Certificate authorities: the mesh root, one intermediate per zone, and
//! signing of workload and role certificates from CSRs.
//!
//! Keys never travel: a workload makes its key pair and sends a CSR; the CA
//! takes only the public key from it and decides the identity itself.

use std::fmt;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, PrivatePkcs8KeyDer};

use crate::cert::{CertInfo, certs_to_pem, pem_block};
use crate::error::CaError;
use crate::spiffe::{SpiffeId, TrustDomain};

/// How far back a new certificate's validity starts, to absorb clock skew
/// between hosts.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);
/// Default lifetime of workload and role certificates.
pub const DEFAULT_LEAF_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default lifetime of a root CA.
pub const DEFAULT_ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Default lifetime of a zone intermediate CA.
pub const DEFAULT_ZONE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Which authority this is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthorityKind {
    /// The mesh root (self-signed).
    Root,
    /// A zone's intermediate, signed by the root, path length 0.
    Zone(String),
}

/// A CA certificate with its signing key, able to sign CSRs.
pub struct Authority {
    kind: AuthorityKind,
    trust_domain: TrustDomain,
    cert: CertificateDer<'static>,
    info: CertInfo,
    key: KeyPair,
    /// Certificates above this one, up to but excluding the root.
    chain_above: Vec<CertificateDer<'static>>,
}

/// Validity of a certificate to issue.
#[derive(Debug, Clone, Copy)]
pub struct IssueOptions {
    /// Lifetime from the start of validity.
    pub ttl: Duration,
    /// Start of validity; `None` means now minus [`BACKDATE`] (at most a
    /// quarter of the lifetime), with the lifetime counted from now.
    pub not_before: Option<SystemTime>,
}

/// A certificate chain (leaf first, root excluded) and its private key.
pub struct Credentials {
    /// Leaf first, then intermediates; the root stays in the trust bundle.
    pub chain: Vec<CertificateDer<'static>>,
    /// PKCS#8 DER of the leaf's private key.
    pub key: PrivatePkcs8KeyDer<'static>,
}

// === impl Authority ===

impl Authority {
    /// Makes a new self-signed root for `trust_domain`.
    pub fn new_root(trust_domain: &TrustDomain, ttl: Duration) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = ca_params(
            &format!("Trellis root CA {}", short_serial()?),
            trust_domain,
            IsCa::Ca(BasicConstraints::Unconstrained),
            validity(None, ttl)?,
        )?;
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key)?;
        Self::from_parts(
            AuthorityKind::Root,
            trust_domain.clone(),
            cert.der().clone(),
            key,
            Vec::new(),
        )
    }

    /// Makes a zone intermediate (path length 0) signed by this root.
    ///
    /// Its lifetime is clipped to the root's.
    pub fn new_zone(&self, zone: &str, ttl: Duration) -> Result<Self, CaError> {
        if self.kind != AuthorityKind::Root {
            return Err(CaError::Validity(
                "zone intermediates are signed by the root, not by another intermediate".into(),
            ));
        }
        // A zone name becomes a SPIFFE path segment in role identities.
        self.trust_domain.id(["zone", zone])?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let (nb, na) = self.clip(validity(None, ttl)?);
        let mut params = ca_params(
            &format!("Trellis zone {zone} CA"),
            &self.trust_domain,
            IsCa::Ca(BasicConstraints::Constrained(0)),
            (nb, na),
        )?;
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer()?)?;
        Self::from_parts(
            AuthorityKind::Zone(zone.to_owned()),
            self.trust_domain.clone(),
            cert.der().clone(),
            key,
            Vec::new(),
        )
    }

    /// Loads an authority from its certificate and PKCS#8 key (PEM), and the
    /// certificates above it (PEM, may be empty for the root).
    pub fn from_pem(
        kind: AuthorityKind,
        trust_domain: TrustDomain,
        cert_pem: &str,
        key_pem: &str,
        chain_above: Vec<CertificateDer<'static>>,
    ) -> Result<Self, CaError> {
        let cert =
            crate::cert::certs_from_pem(cert_pem.as_bytes(), "CA certificate")?.swap_remove(0);
        let key = KeyPair::from_pem(key_pem)?;
        Self::from_parts(kind, trust_domain, cert, key, chain_above)
    }

    fn from_parts(
        kind: AuthorityKind,
        trust_domain: TrustDomain,
        cert: CertificateDer<'static>,
        key: KeyPair,
        chain_above: Vec<CertificateDer<'static>>,
    ) -> Result<Self, CaError> {
        let info = CertInfo::parse(&cert)?;
        if !info.is_ca {
            return Err(CaError::BadCertificate {
                what: info.subject.clone(),
                reason: "is not a CA (basicConstraints CA:FALSE or missing)".into(),
            });
        }
        if info.spki_der != key.subject_public_key_info() {
            return Err(CaError::BadCertificate {
                what: info.subject.clone(),
                reason: "does not match its private key".into(),
            });
        }
        Ok(Self {
            kind,
            trust_domain,
            cert,
            info,
            key,
            chain_above,
        })
    }

    /// Signs a CSR for `id`.
    ///
    /// The CSR proves possession of the key (its signature is checked); the
    /// identity is the caller's decision, so the CSR's own SANs may only repeat
    /// `id`. The certificate carries exactly one URI SAN, serverAuth and
    /// clientAuth, and a lifetime clipped to this CA's.
    pub fn sign_csr(
        &self,
        csr: &CertificateSigningRequestDer<'_>,
        id: &SpiffeId,
        opts: IssueOptions,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        self.sign_csr_with_dns_names(csr, id, &[], opts)
    }

    /// Like [`Authority::sign_csr`], with DNS names beside the identity, for
    /// a server reached by a name rather than by its SPIFFE ID (the
    /// Kubernetes admission webhook, which the API server checks by its
    /// Service's DNS name). The CSR may ask for exactly these names.
    pub fn sign_csr_with_dns_names(
        &self,
        csr: &CertificateSigningRequestDer<'_>,
        id: &SpiffeId,
        dns_names: &[String],
        opts: IssueOptions,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        self.check_may_sign(id)?;
        let req = CertificateSigningRequestParams::from_der(csr)
            .map_err(|e| CaError::BadCsr(csr_reason(&e)))?;
        let alg = req.public_key.algorithm();
        if alg != &rcgen::PKCS_ECDSA_P256_SHA256
            && alg != &rcgen::PKCS_ECDSA_P384_SHA384
            && alg != &rcgen::PKCS_ED25519
        {
            return Err(CaError::BadCsr(
                "the key must be ECDSA P-256, ECDSA P-384 or Ed25519".into(),
            ));
        }
        for san in &req.params.subject_alt_names {
            match san {
                SanType::URI(uri) if uri.as_str() == id.as_str() => {}
                SanType::DnsName(n) if dns_names.iter().any(|d| d == n.as_str()) => {}
                other => {
                    return Err(CaError::BadCsr(format!(
                        "it asks for {other:?}, but the caller is entitled only to {id}"
                    )));
                }
            }
        }
        if req.params.is_ca != IsCa::NoCa && req.params.is_ca != IsCa::ExplicitNoCa {
            return Err(CaError::BadCsr("it asks for a CA certificate".into()));
        }

        let (nb, na) = self.clip(validity(opts.not_before, opts.ttl)?);
        let mut params = CertificateParams::default();
        params.not_before = nb;
        params.not_after = na;
        params.serial_number = Some(random_serial()?);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, self.trust_domain.as_str());
        // RFC 5280's upper bound for a CN is 64 characters; longer IDs live in the SAN only.
        if id.as_str().len() <= 64 {
            dn.push(DnType::CommonName, id.as_str());
        }
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
        for name in dns_names {
            params
                .subject_alt_names
                .push(SanType::DnsName(name.as_str().try_into()?));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyAgreement,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let leaf = params.signed_by(&req.public_key, &self.issuer()?)?;
        let mut chain = vec![leaf.der().clone()];
        if self.kind != AuthorityKind::Root {
            chain.push(self.cert.clone());
        }
        chain.extend(self.chain_above.iter().cloned());
        Ok(chain)
    }

    /// Makes a key pair here and signs a certificate for it: for operators,
    /// tests and the CLI. Workloads send CSRs instead, so keys stay on their host.
    pub fn issue(&self, id: &SpiffeId, opts: IssueOptions) -> Result<Credentials, CaError> {
        self.issue_with_dns_names(id, &[], opts)
    }

    /// Like [`Authority::issue`], with DNS names beside the identity (see
    /// [`Authority::sign_csr_with_dns_names`]).
    pub fn issue_with_dns_names(
        &self,
        id: &SpiffeId,
        dns_names: &[String],
        opts: IssueOptions,
    ) -> Result<Credentials, CaError> {
        let (key, csr) = new_key_and_csr(id)?;
        let chain = self.sign_csr_with_dns_names(&csr, id, dns_names, opts)?;
        Ok(Credentials { chain, key })
    }

    /// This CA's certificate.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// This CA's certificate as PEM.
    pub fn cert_pem(&self) -> String {
        pem_block("CERTIFICATE", &self.cert)
    }

    /// This CA's private key as PKCS#8 PEM. Write it with
    /// [`crate::files::write_private`]; never log it.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Parsed fields of this CA's certificate.
    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    /// Root or which zone.
    pub fn kind(&self) -> &AuthorityKind {
        &self.kind
    }

    /// The trust domain this CA signs for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, CaError> {
        Ok(Issuer::from_ca_cert_der(&self.cert, &self.key)?)
    }

    fn check_may_sign(&self, id: &SpiffeId) -> Result<(), CaError> {
        let refuse = |reason: String| CaError::NotAllowed {
            id: id.clone(),
            reason,
        };
        if id.trust_domain_str() != self.trust_domain.as_str() {
            return Err(refuse(format!(
                "this CA signs only for trust domain {}",
                self.trust_domain
            )));
        }
        if id.path().is_empty() {
            return Err(refuse(
                "a workload or role identity needs a path; the bare trust domain is not one".into(),
            ));
        }
        if let (AuthorityKind::Zone(mine), Some(role)) = (&self.kind, id.role())
            && let Some(zone) = role.zone()
            && zone != mine
        {
            return Err(refuse(format!(
                "the identity belongs to zone {zone:?}; this is the CA of zone {mine:?}"
            )));
        }
        Ok(())
    }

    /// Clips a validity period so that it ends no later than this CA.
    fn clip(
        &self,
        (nb, na): (time::OffsetDateTime, time::OffsetDateTime),
    ) -> (time::OffsetDateTime, time::OffsetDateTime) {
        let ca_end = time::OffsetDateTime::from(self.info.not_after);
        (nb, na.min(ca_end))
    }
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key is deliberately left out.
        f.debug_struct("Authority")
            .field("kind", &self.kind)
            .field("trust_domain", &self.trust_domain)
            .field("subject", &self.info.subject)
            .finish_non_exhaustive()
    }
}

fn ca_params(
    cn: &str,
    trust_domain: &TrustDomain,
    is_ca: IsCa,
    (nb, na): (time::OffsetDateTime, time::OffsetDateTime),
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain.as_str());
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.is_ca = is_ca;
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = nb;
    params.not_after = na;
    Ok(params)
}

fn validity(
    not_before: Option<SystemTime>,
    ttl: Duration,
) -> Result<(time::OffsetDateTime, time::OffsetDateTime), CaError> {
    if ttl.is_zero() {
        return Err(CaError::Validity(
            "the lifetime must be more than zero".into(),
        ));
    }
    // The lifetime counts from now; only the start moves back, by at most a
    // quarter of the lifetime so a short-lived certificate is not mostly
    // spent (or already expired) when it is issued.
    let (start, from) = match not_before {
        Some(nb) => (nb, nb),
        None => {
            let now = SystemTime::now();
            (now - BACKDATE.min(ttl / 4), now)
        }
    };
    let end = from
        .checked_add(ttl)
        .ok_or_else(|| CaError::Validity(format!("a lifetime of {ttl:?} overflows the clock")))?;
    // X.509 GeneralizedTime stops at year 9999.
    let to_odt = |t: SystemTime| {
        let odt = time::OffsetDateTime::from(t);
        if odt.year() > 9999 {
            Err(CaError::Validity("validity ends after year 9999".into()))
        } else {
            Ok(odt.replace_nanosecond(0).unwrap_or(odt))
        }
    };
    Ok((to_odt(start)?, to_odt(end)?))
}

fn random_bytes<const N: usize>() -> Result<[u8; N], CaError> {
    let mut b = [0u8; N];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| CaError::Validity("the system random generator failed".into()))?;
    Ok(b)
}

/// 128 random bits, positive as RFC 5280 requires.
fn random_serial() -> Result<SerialNumber, CaError> {
    let mut b = random_bytes::<16>()?;
    b[0] &= 0x7f;
    // A leading zero byte would be dropped by DER; keep 16 bytes of entropy-carrying length.
    b[0] |= 0x01;
    Ok(SerialNumber::from_slice(&b))
}

/// A short random tag so that two roots of one trust domain are told apart by name.
fn short_serial() -> Result<String, CaError> {
    let b = random_bytes::<4>()?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn csr_reason(e: &rcgen::Error) -> String {
    match e {
        rcgen::Error::InvalidCertificationRequestSignature => {
            "its signature does not verify (the requester must sign it with the key it asks a certificate for)".into()
        }
        rcgen::Error::UnsupportedExtension => "it carries an extension Trellis does not sign".into(),
        other => format!("it does not parse: {other}"),
    }
}

/// Makes a fresh ECDSA P-256 key pair and a CSR for `id` signed with it.
pub fn new_key_and_csr(
    id: &SpiffeId,
) -> Result<
    (
        PrivatePkcs8KeyDer<'static>,
        CertificateSigningRequestDer<'static>,
    ),
    CaError,
> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
    let csr = params.serialize_request(&key)?;
    let key_der = PrivatePkcs8KeyDer::from(key.serialize_der());
    Ok((key_der, csr.der().clone()))
}

// === impl IssueOptions ===

impl Default for IssueOptions {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_LEAF_TTL,
            not_before: None,
        }
    }
}

impl IssueOptions {
    /// Default start (now, backdated), the given lifetime.
    pub fn ttl(ttl: Duration) -> Self {
        Self {
            ttl,
            not_before: None,
        }
    }
}

// === impl Credentials ===

impl Credentials {
    /// Parsed fields of the leaf certificate.
    pub fn leaf_info(&self) -> Result<CertInfo, CaError> {
        let leaf = self.chain.first().ok_or_else(|| CaError::BadCertificate {
            what: "credentials".into(),
            reason: "the chain is empty".into(),
        })?;
        CertInfo::parse(leaf)
    }

    /// The SPIFFE ID of the leaf.
    pub fn id(&self) -> Result<SpiffeId, CaError> {
        let info = self.leaf_info()?;
        info.require_spiffe_id()
            .map_err(|reason| CaError::BadCertificate {
                what: info.subject.clone(),
                reason,
            })
    }

    /// The chain as PEM, leaf first.
    pub fn chain_pem(&self) -> String {
        certs_to_pem(&self.chain)
    }

    /// The private key as PKCS#8 PEM. Never log it.
    pub fn key_pem(&self) -> String {
        pem_block("PRIVATE KEY", self.key.secret_pkcs8_der())
    }

    /// Checks that the leaf certificate belongs to the private key.
    pub fn check_key_matches(&self) -> Result<(), CaError> {
        let info = self.leaf_info()?;
        let kp = KeyPair::try_from(&self.key)?;
        if info.spki_der != kp.subject_public_key_info() {
            return Err(CaError::BadCertificate {
                what: info.subject,
                reason: "does not match the private key beside it".into(),
            });
        }
        Ok(())
    }
}

impl Clone for Credentials {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let id = self.id().map(|i| i.to_string()).unwrap_or_default();
        f.debug_struct("Credentials")
            .field("id", &id)
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
