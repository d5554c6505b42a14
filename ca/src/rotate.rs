//! Keeping a certificate fresh: renew at half-life (with jitter, so a fleet
//! issued at once does not renew at once), swap it into the [`CertSource`] in
//! place, and retry with backoff when the signer is unreachable.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use tokio_util::sync::CancellationToken;

use crate::authority::{Authority, Credentials, IssueOptions, new_key_and_csr};
use crate::cert::CertInfo;
use crate::error::CaError;
use crate::spiffe::SpiffeId;
use crate::tls::CertSource;

/// Signs CSRs for a [`Rotator`]: a local [`Authority`] in a server or a test,
/// the federation store's certificate API in an agent.
pub trait CsrSigner: Send + Sync + 'static {
    /// Returns the chain (leaf first) for `csr`, which requests `id`.
    fn sign(
        &self,
        id: &SpiffeId,
        csr: CertificateSigningRequestDer<'static>,
    ) -> impl Future<Output = Result<Vec<CertificateDer<'static>>, CaError>> + Send;
}

/// A signer backed by an authority held in this process.
#[derive(Debug, Clone)]
pub struct LocalSigner {
    /// The authority that signs.
    pub authority: Arc<Authority>,
    /// Lifetime and start of the certificates it signs.
    pub options: IssueOptions,
}

impl CsrSigner for LocalSigner {
    async fn sign(
        &self,
        id: &SpiffeId,
        csr: CertificateSigningRequestDer<'static>,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        self.authority.sign_csr(&csr, id, self.options)
    }
}

type RenewHook = Box<dyn Fn(&Credentials) -> Result<(), CaError> + Send + Sync>;

/// Renews the certificate of one [`CertSource`] for as long as it runs.
pub struct Rotator<S> {
    source: Arc<CertSource>,
    signer: S,
    jitter: f64,
    min_backoff: Duration,
    max_backoff: Duration,
    on_renewed: Option<RenewHook>,
}

impl<S: CsrSigner> Rotator<S> {
    /// A rotator for `source`'s identity with default timing: renew at half-life
    /// ±5 % of the lifetime, retry after 1 s doubling up to 60 s.
    pub fn new(source: Arc<CertSource>, signer: S) -> Self {
        Self {
            source,
            signer,
            jitter: 0.05,
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            on_renewed: None,
        }
    }

    /// Sets the jitter, as a fraction of the lifetime (clamped to 0..=0.25).
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.jitter = fraction.clamp(0.0, 0.25);
        self
    }

    /// Sets the retry backoff bounds.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_backoff = min;
        self.max_backoff = max.max(min);
        self
    }

    /// Runs `hook` with each new certificate before it is swapped in, e.g. to
    /// persist it. A failing hook is logged; the certificate is still used.
    pub fn on_renewed(
        mut self,
        hook: impl Fn(&Credentials) -> Result<(), CaError> + Send + Sync + 'static,
    ) -> Self {
        self.on_renewed = Some(Box::new(hook));
        self
    }

    /// When the current certificate is due for renewal.
    pub fn due(&self) -> Result<SystemTime, CaError> {
        let info = self.source.credentials().leaf_info()?;
        Ok(renew_at(&info, self.jitter, random_unit()))
    }

    /// Makes a new key, has it signed, checks the result and swaps it in.
    pub async fn renew_once(&self) -> Result<Credentials, CaError> {
        let id = self.source.id();
        let (key, csr) = new_key_and_csr(&id)?;
        let chain = self.signer.sign(&id, csr).await?;
        let creds = Credentials { chain, key };
        // A signer that returned someone else's certificate must not be trusted blindly.
        creds.check_key_matches()?;
        let got = creds.id()?;
        if got != id {
            return Err(CaError::Issuer(format!(
                "asked for {id}, the signer returned a certificate for {got}"
            )));
        }
        if let Some(hook) = &self.on_renewed
            && let Err(e) = hook(&creds)
        {
            tracing::warn!(%id, error = %e, "renewed certificate could not be persisted");
        }
        self.source.swap(creds.clone())?;
        Ok(creds)
    }

    /// Renews until `shutdown` fires.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let wait = match self.due() {
                Ok(at) => at
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO),
                Err(e) => {
                    tracing::error!(error = %e, "current certificate unreadable; renewing now");
                    Duration::ZERO
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            let mut backoff = self.min_backoff;
            loop {
                match self.renew_once().await {
                    Ok(creds) => {
                        if let Ok(info) = creds.leaf_info() {
                            tracing::info!(
                                id = %self.source.id(),
                                serial = %info.serial,
                                valid_for = ?info.remaining(SystemTime::now()),
                                "certificate renewed"
                            );
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(id = %self.source.id(), error = %e, retry_in = ?backoff, "certificate renewal failed");
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(self.max_backoff);
                    }
                }
            }
        }
    }
}

/// Half-life, moved by up to ±`jitter` of the lifetime; `unit` is in [0, 1).
pub fn renew_at(info: &CertInfo, jitter: f64, unit: f64) -> SystemTime {
    let life = info
        .not_after
        .duration_since(info.not_before)
        .unwrap_or_default();
    let offset = life.mul_f64(jitter * (2.0 * unit - 1.0).abs());
    let half = info.half_life();
    if unit < 0.5 {
        half.checked_sub(offset).unwrap_or(half)
    } else {
        half + offset
    }
}

fn random_unit() -> f64 {
    let mut b = [0u8; 4];
    // If the system RNG fails, renewing exactly at half-life is still correct.
    if SystemRandom::new().fill(&mut b).is_err() {
        return 0.5;
    }
    f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_lands_within_jitter_of_half_life() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let info = CertInfo {
            spiffe_id: None,
            uri_sans: vec![],
            subject: String::new(),
            issuer: String::new(),
            serial: String::new(),
            not_before: start,
            not_after: start + Duration::from_secs(1000),
            is_ca: false,
            path_len: None,
            spki_der: vec![],
        };
        let half = start + Duration::from_secs(500);
        assert_eq!(renew_at(&info, 0.05, 0.5), half);
        assert_eq!(renew_at(&info, 0.05, 0.0), half - Duration::from_secs(50));
        let late = renew_at(&info, 0.05, 0.999_999);
        assert!(late > half && late <= half + Duration::from_secs(50));
        assert_eq!(renew_at(&info, 0.0, 0.9), half);
    }
}
