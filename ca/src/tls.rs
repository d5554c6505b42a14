//! rustls configurations that authenticate both ends by SPIFFE ID.
//!
//! Verification has two steps, in this order: the peer's chain must lead to a
//! root of the trust bundle (webpki: signatures, validity, CA constraints,
//! extended key usage), and then the peer's single URI SAN must be a SPIFFE ID
//! of our trust domain that the [`PeerPolicy`] admits. DNS names play no part:
//! the SNI a client sends routes the connection, it does not name the peer.
//!
//! Trellis speaks TLS 1.3 only: QUIC requires it, and it keeps one code path.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, TrustAnchor, UnixTime};

use crate::authority::Credentials;
use crate::bundle::TrustBundle;
use crate::cert::CertInfo;
use crate::error::CaError;
use crate::spiffe::{RoleKind, SpiffeId};

/// Which authenticated peers a configuration admits, after the chain checks.
#[derive(Clone)]
#[non_exhaustive]
pub enum PeerPolicy {
    /// Any identity of our trust domain.
    TrustDomain,
    /// Only these exact identities.
    AllowList(Vec<SpiffeId>),
    /// Only identities of these Trellis roles (e.g. only gateways).
    Roles(Vec<RoleKind>),
    /// Any identity for which the predicate returns true.
    Predicate(Arc<dyn Fn(&SpiffeId) -> bool + Send + Sync>),
}

/// Why a peer was refused after its chain verified.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum PeerRejected {
    /// The certificate carries no usable SPIFFE ID.
    #[error("peer certificate {0}")]
    NoSpiffeId(String),
    /// The identity is from another trust domain.
    #[error("peer {peer} is not in trust domain {ours}")]
    WrongTrustDomain {
        /// The peer's identity.
        peer: SpiffeId,
        /// Our trust domain.
        ours: String,
    },
    /// The identity is not admitted by the policy.
    #[error("peer {peer} is not allowed here ({policy})")]
    NotAllowed {
        /// The peer's identity.
        peer: SpiffeId,
        /// The policy that refused it.
        policy: String,
    },
}

// rustls prints the cause of a refused certificate with `{:?}`; show the
// sentence an operator can act on rather than the struct.
impl fmt::Debug for PeerRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The current trust bundle, swappable at run time so that added or removed
/// roots apply to the next handshake without rebuilding configs.
pub struct TrustStore {
    anchors: ArcSwap<Anchors>,
    generation: std::sync::atomic::AtomicU64,
}

struct Anchors {
    bundle: TrustBundle,
    anchors: Vec<TrustAnchor<'static>>,
}

/// The certificate a config presents, swappable in place: new handshakes get
/// the new certificate, established connections keep theirs.
pub struct CertSource {
    provider: Arc<CryptoProvider>,
    current: ArcSwap<Current>,
    /// Bumped by every swap, so pooled connections can tell theirs is old.
    generation: std::sync::atomic::AtomicU64,
}

struct Current {
    creds: Credentials,
    key: Arc<CertifiedKey>,
    id: SpiffeId,
}

struct SpiffeVerifier {
    trust: Arc<TrustStore>,
    policy: PeerPolicy,
    algs: WebPkiSupportedAlgorithms,
    /// As a client verifier: the certificate is optional and its chain is
    /// left to the caller (see [`server_config_verify_after_handshake`]);
    /// the handshake still proves possession of the leaf's key.
    deferred: bool,
}

/// The ring crypto provider every Trellis config uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server config that requires a client certificate and checks it.
pub fn server_config(
    certs: Arc<CertSource>,
    trust: Arc<TrustStore>,
    peers: PeerPolicy,
) -> Result<ServerConfig, CaError> {
    server_config_with_resolver(certs, trust, peers)
}

/// A server config like [`server_config`] whose certificate is chosen per
/// handshake by `resolver`, e.g. by the SNI among several identities (a host
/// agent serving several local services). Returning `None` refuses the
/// handshake.
pub fn server_config_with_resolver(
    resolver: Arc<dyn ResolvesServerCert>,
    trust: Arc<TrustStore>,
    peers: PeerPolicy,
) -> Result<ServerConfig, CaError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeVerifier {
        trust,
        policy: peers,
        algs: provider.signature_verification_algorithms,
        deferred: false,
    });
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    // No resumption: a resumed session skips certificate verification, so a
    // rotated, expired or newly denied identity would live on for the ticket's
    // lifetime. A full P-256 handshake costs well under a millisecond.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// A server config for an API that also takes callers without a
/// certificate (join, the bundle): a client certificate is optional, and
/// the handshake proves only that the client holds the key of the leaf it
/// sent. The chain is checked afterwards by [`TrustStore::verify_client_chain`]
/// against the roots in force at that moment, so that a refusal can be told
/// to the caller in words ("not trusted by this server's bundle") rather
/// than as a failed handshake, and so that a rotated root is trusted from
/// the next connection on.
///
/// The caller must run that check on every connection and must never read
/// an identity from the peer certificates otherwise.
pub fn server_config_verify_after_handshake(
    certs: Arc<CertSource>,
    trust: Arc<TrustStore>,
) -> Result<ServerConfig, CaError> {
    let provider = certs.provider.clone();
    let verifier = Arc::new(SpiffeVerifier {
        trust,
        policy: PeerPolicy::TrustDomain,
        algs: provider.signature_verification_algorithms,
        deferred: true,
    });
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(certs);
    // As in server_config: no resumption, every connection is checked.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// A client config that presents our certificate and checks the server's.
pub fn client_config(
    certs: Arc<CertSource>,
    trust: Arc<TrustStore>,
    peers: PeerPolicy,
) -> Result<ClientConfig, CaError> {
    let provider = certs.provider.clone();
    let verifier = Arc::new(SpiffeVerifier {
        trust,
        policy: peers,
        algs: provider.signature_verification_algorithms,
        deferred: false,
    });
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous() // not dangerous: SpiffeVerifier does full chain verification
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(certs);
    // See server_config: every connection verifies the peer afresh.
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

/// The one chain check of every Trellis verifier: `end_entity` through
/// `intermediates` to one of `anchors`, for `usage`, at `now`, with the
/// signature algorithms of `algs`. Callers add what they require of the
/// identity (SPIFFE ID, trust domain, role) and word the error.
pub fn verify_chain(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    anchors: &[TrustAnchor<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
    algs: &WebPkiSupportedAlgorithms,
) -> Result<(), webpki::Error> {
    webpki::EndEntityCert::try_from(end_entity)?.verify_for_usage(
        algs.all,
        anchors,
        intermediates,
        now,
        usage,
        None,
        None,
    )?;
    Ok(())
}

/// The SPIFFE ID of a peer whose certificates a Trellis config verified.
pub fn peer_id(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    let leaf = certs?.first()?;
    CertInfo::parse(leaf).ok()?.spiffe_id
}

// === impl PeerPolicy ===

impl PeerPolicy {
    fn admits(&self, id: &SpiffeId) -> bool {
        match self {
            PeerPolicy::TrustDomain => true,
            PeerPolicy::AllowList(ids) => ids.contains(id),
            PeerPolicy::Roles(kinds) => id.role_kind().is_some_and(|k| kinds.contains(&k)),
            PeerPolicy::Predicate(f) => f(id),
        }
    }
}

impl fmt::Debug for PeerPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerPolicy::TrustDomain => f.write_str("any identity of the trust domain"),
            PeerPolicy::AllowList(ids) => {
                let ids: Vec<&str> = ids.iter().map(SpiffeId::as_str).collect();
                write!(f, "allow-list [{}]", ids.join(", "))
            }
            PeerPolicy::Roles(kinds) => {
                let kinds: Vec<String> = kinds.iter().map(ToString::to_string).collect();
                write!(f, "only roles [{}]", kinds.join(", "))
            }
            PeerPolicy::Predicate(_) => f.write_str("custom predicate"),
        }
    }
}

// === impl TrustStore ===

impl TrustStore {
    /// A store holding `bundle`.
    pub fn new(bundle: TrustBundle) -> Arc<Self> {
        Arc::new(Self {
            anchors: ArcSwap::from_pointee(Anchors::new(bundle)),
            generation: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Replaces the bundle; the next handshake uses the new roots.
    pub fn update(&self, bundle: TrustBundle) {
        if self.anchors.load().bundle == bundle {
            return;
        }
        self.anchors.store(Arc::new(Anchors::new(bundle)));
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// How many times the bundle was replaced: a connection verified under
    /// an older generation may rest on a root no longer trusted.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The bundle in force.
    pub fn bundle(&self) -> TrustBundle {
        self.anchors.load().bundle.clone()
    }

    /// Checks a client's chain (leaf first) against the roots in force now,
    /// as a handshake would: chain, validity, client-auth usage, then a
    /// SPIFFE ID of our trust domain.
    pub fn verify_client_chain(
        self: &Arc<Self>,
        chain: &[CertificateDer<'_>],
    ) -> Result<SpiffeId, rustls::Error> {
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or(rustls::Error::NoCertificatesPresented)?;
        let v = SpiffeVerifier {
            trust: self.clone(),
            policy: PeerPolicy::TrustDomain,
            algs: provider().signature_verification_algorithms,
            deferred: false,
        };
        v.verify(
            leaf,
            intermediates,
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
        )
    }
}

impl Anchors {
    fn new(bundle: TrustBundle) -> Self {
        Self {
            anchors: bundle.anchors(),
            bundle,
        }
    }
}

// === impl CertSource ===

impl CertSource {
    /// A source presenting `creds`, after checking that the key matches the leaf.
    pub fn new(creds: Credentials) -> Result<Arc<Self>, CaError> {
        let provider = provider();
        let current = Current::new(&provider, creds)?;
        Ok(Arc::new(Self {
            provider,
            current: ArcSwap::from_pointee(current),
            generation: std::sync::atomic::AtomicU64::new(0),
        }))
    }

    /// Presents `creds` from the next handshake on.
    pub fn swap(&self, creds: Credentials) -> Result<(), CaError> {
        let next = Current::new(&self.provider, creds)?;
        self.current.store(Arc::new(next));
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Ok(())
    }

    /// How many times the credentials were swapped: a connection made under
    /// an older generation presented an older certificate.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The credentials presented now.
    pub fn credentials(&self) -> Credentials {
        self.current.load().creds.clone()
    }

    /// The identity presented now.
    pub fn id(&self) -> SpiffeId {
        self.current.load().id.clone()
    }
}

impl Current {
    fn new(provider: &CryptoProvider, creds: Credentials) -> Result<Self, CaError> {
        creds.check_key_matches()?;
        let id = creds.id()?;
        let key = provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(creds.key.clone_key()))?;
        let key = Arc::new(CertifiedKey::new(creds.chain.clone(), key));
        Ok(Self { creds, key, id })
    }
}

impl fmt::Debug for CertSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertSource")
            .field("id", &self.current.load().id)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for CertSource {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().key.clone())
    }
}

impl ResolvesClientCert for CertSource {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let cur = self.current.load();
        cur.key
            .key
            .choose_scheme(sigschemes)
            .map(|_| cur.key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

// === impl SpiffeVerifier ===

impl SpiffeVerifier {
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<SpiffeId, rustls::Error> {
        let anchors = self.trust.anchors.load();
        verify_chain(
            end_entity,
            intermediates,
            &anchors.anchors,
            now,
            usage,
            &self.algs,
        )
        .map_err(pki_error)?;

        let info = CertInfo::parse(end_entity)
            .map_err(|e| reject(PeerRejected::NoSpiffeId(e.to_string())))?;
        let id = info
            .require_spiffe_id()
            .map_err(|r| reject(PeerRejected::NoSpiffeId(r)))?;
        let ours = anchors.bundle.trust_domain();
        if id.trust_domain_str() != ours.as_str() {
            return Err(reject(PeerRejected::WrongTrustDomain {
                peer: id,
                ours: ours.to_string(),
            }));
        }
        if !self.policy.admits(&id) {
            return Err(reject(PeerRejected::NotAllowed {
                peer: id,
                policy: format!("{:?}", self.policy),
            }));
        }
        Ok(id)
    }
}

fn reject(r: PeerRejected) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(r))))
}

fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let ce = match e {
        E::BadDer | E::BadDerTime => CertificateError::BadEncoding,
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(ce)
}

impl fmt::Debug for SpiffeVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeVerifier")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

impl ClientCertVerifier for SpiffeVerifier {
    fn client_auth_mandatory(&self) -> bool {
        !self.deferred
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Clients hold exactly one identity; hints would only leak our roots.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if self.deferred {
            // Checked by TrustStore::verify_client_chain, by contract.
            return Ok(ClientCertVerified::assertion());
        }
        self.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
