//! Renewing a server's own certificate through the cluster: a joined server
//! holds no CA, so it sends a CSR to `Certificates.Sign` on a member that
//! does, authenticated by the certificate it is about to replace.

use std::sync::Arc;

use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use trellis_ca::rotate::CsrSigner;
use trellis_ca::{CaError, SpiffeId};

use crate::proto::SignRequest;
use crate::proto::certificates_client::CertificatesClient;
use crate::transport::{Dialer, RaftTransport};

/// Signs CSRs via the `Certificates` API of the cluster's members.
pub struct ClusterSigner {
    /// Dials with this server's current credentials.
    pub dialer: Dialer,
    /// Where the members are.
    pub transport: Arc<RaftTransport>,
}

impl CsrSigner for ClusterSigner {
    async fn sign(
        &self,
        id: &SpiffeId,
        csr: CertificateSigningRequestDer<'static>,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let mut last = String::from("no member address is known");
        for addr in self.transport.addresses() {
            let channel = match self.dialer.channel(&addr) {
                Ok(c) => c,
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            let req = SignRequest {
                csr: csr.as_ref().to_vec(),
                ttl_seconds: 0,
            };
            match CertificatesClient::new(channel).sign(req).await {
                Ok(r) => {
                    return trellis_ca::certs_from_pem(r.into_inner().chain_pem.as_bytes(), &addr);
                }
                // A member without a CA answers FailedPrecondition: try the next.
                Err(s) => last = format!("{addr}: {}", s.message()),
            }
        }
        Err(CaError::Issuer(format!(
            "no member signed a renewal for {id}: {last}"
        )))
    }
}

/// Signs CSRs through `Certificates.Sign` on the servers a proxy (agent,
/// gateway) knows, authenticated by the very identity being renewed: the
/// server signs only the caller's own identity.
pub struct StoreSigner {
    /// Channels presenting the identity to renew.
    pub servers: crate::client::Servers,
    /// Lifetime to ask for; `None`: the server's default.
    pub ttl: Option<std::time::Duration>,
}

impl CsrSigner for StoreSigner {
    async fn sign(
        &self,
        id: &SpiffeId,
        csr: CertificateSigningRequestDer<'static>,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let mut last = String::new();
        // Each server once: a server without the CA refuses, the next may sign.
        for _ in 0..self.servers.len() {
            let req = SignRequest {
                csr: csr.as_ref().to_vec(),
                ttl_seconds: self.ttl.map(|t| t.as_secs()).unwrap_or(0),
            };
            let (_, addr) = self.servers.current();
            let addr = addr.to_string();
            match self
                .servers
                .call(|ch| async move { CertificatesClient::new(ch).sign(req).await })
                .await
            {
                Ok(r) => return trellis_ca::certs_from_pem(r.chain_pem.as_bytes(), &addr),
                Err(s) => {
                    last = s.message().to_string();
                    self.servers.next(&addr);
                }
            }
        }
        Err(CaError::Issuer(format!(
            "no server signed a renewal for {id}: {last}"
        )))
    }
}
