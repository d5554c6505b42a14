//! TLS between a pod's agent and the zone controller, before the pod has
//! any credential of the mesh.
//!
//! The pod knows one thing: the SHA-256 fingerprint of the mesh's root
//! (`TRELLIS_TRUST_ROOT_FINGERPRINT`). The controller therefore presents its
//! chain *with* the root ([`WithRoots`]); the pod takes as its only trust
//! anchor the presented certificate whose fingerprint matches, verifies the
//! leaf up to it, and accepts only a controller identity of its zone
//! ([`PinnedController`]). Its service-account token leaves the pod only on
//! a connection that passed this check.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use trellis_ca::RoleKind;
use trellis_ca::tls::{CertSource, TrustStore};
use trellis_federation::token::sha256_hex;

use crate::error::KubeError;

/// Checks a server chain against a pinned root fingerprint and requires a
/// controller identity of `zone`.
#[derive(Debug)]
pub struct PinnedController {
    fingerprint: String,
    zone: String,
    algs: WebPkiSupportedAlgorithms,
}

/// The controller's certificate resolver: its current chain followed by the
/// roots of its current bundle, rebuilt when either changes.
pub struct WithRoots {
    certs: Arc<CertSource>,
    trust: Arc<TrustStore>,
    cached: ArcSwapOption<(u64, u64, Arc<CertifiedKey>)>,
}

/// A client config for the exchange: TLS 1.3, the pinned root, no client
/// certificate (the service-account token is the proof).
pub fn client_config(fingerprint: &str, zone: &str) -> Result<ClientConfig, KubeError> {
    let fp = fingerprint.trim().to_ascii_lowercase();
    if fp.len() != 64 || !fp.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(KubeError::config(
            "TRELLIS_TRUST_ROOT_FINGERPRINT",
            "not 64 hex digits (the SHA-256 of the mesh root certificate, DER)",
        ));
    }
    let provider = trellis_ca::tls::provider();
    let verifier = Arc::new(PinnedController {
        fingerprint: fp,
        zone: zone.into(),
        algs: provider.signature_verification_algorithms,
    });
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| KubeError::Tls(e.to_string()))?
        .dangerous() // not dangerous: PinnedController verifies the whole chain
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The exchange's server config: no client certificate (pods have none
/// yet), the controller's chain with the roots.
pub fn server_config(
    certs: Arc<CertSource>,
    trust: Arc<TrustStore>,
) -> Result<ServerConfig, KubeError> {
    let resolver = Arc::new(WithRoots {
        certs,
        trust,
        cached: ArcSwapOption::empty(),
    });
    let mut cfg = ServerConfig::builder_with_provider(trellis_ca::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| KubeError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

// === impl WithRoots ===

impl WithRoots {
    fn build(&self) -> Result<Arc<CertifiedKey>, KubeError> {
        let creds = self.certs.credentials();
        let mut chain = creds.chain.clone();
        chain.extend(self.trust.bundle().roots().iter().cloned());
        let key = trellis_ca::tls::provider()
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(creds.key.clone_key()))
            .map_err(|e| KubeError::Tls(e.to_string()))?;
        Ok(Arc::new(CertifiedKey::new(chain, key)))
    }
}

impl std::fmt::Debug for WithRoots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WithRoots")
            .field("certs", &self.certs)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for WithRoots {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let gens = (self.certs.generation(), self.trust.generation());
        if let Some(c) = self.cached.load().as_ref()
            && (c.0, c.1) == gens
        {
            return Some(c.2.clone());
        }
        match self.build() {
            Ok(k) => {
                self.cached
                    .store(Some(Arc::new((gens.0, gens.1, k.clone()))));
                Some(k)
            }
            Err(e) => {
                tracing::error!(error = %e, "exchange: cannot present the controller's certificate");
                None
            }
        }
    }
}

// === impl PinnedController ===

impl ServerCertVerifier for PinnedController {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let err = |m: String| rustls::Error::General(m);
        let root = intermediates
            .iter()
            .find(|c| sha256_hex(c.as_ref()) == self.fingerprint)
            .ok_or_else(|| {
                err(format!(
                    "the controller presents no root with fingerprint {} (is TRELLIS_TRUST_ROOT_FINGERPRINT this mesh's root?)",
                    self.fingerprint
                ))
            })?;
        let anchor =
            webpki::anchor_from_trusted_cert(root).map_err(|e| err(format!("pinned root: {e}")))?;
        trellis_ca::tls::verify_chain(
            end_entity,
            intermediates,
            &[anchor],
            now,
            webpki::KeyUsage::server_auth(),
            &self.algs,
        )
        .map_err(|e| err(format!("controller certificate: {e}")))?;
        let id = trellis_ca::tls::peer_id(Some(std::slice::from_ref(end_entity)))
            .ok_or_else(|| err("the controller certificate has no SPIFFE ID".into()))?;
        let zone_ok = id.role().is_some_and(|r| {
            r.kind() == RoleKind::Controller && r.zone() == Some(self.zone.as_str())
        });
        if !zone_ok {
            return Err(err(format!(
                "{id} is not a Trellis controller of zone {}",
                self.zone
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
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
