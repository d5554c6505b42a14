//! Picking up renewed credentials from disk: whoever renews a certificate
//! (an operator with `trellis ca issue`, an agent's rotator) rewrites the
//! files at the credentials prefix; the process holding them notices and
//! swaps them into its [`CertSource`] and [`TrustStore`]. New handshakes use
//! the new certificate and bundle; open connections go on.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::spiffe::SpiffeId;
use crate::store::{credential_paths, load_credentials};
use crate::tls::{CertSource, TrustStore};

type Stamp = Vec<Option<(SystemTime, u64)>>;

fn stamp(prefix: &Path) -> Stamp {
    let (crt, key, bundle) = credential_paths(prefix);
    [crt, key, bundle]
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

/// Reloads the credentials at `prefix` whenever its files change, until
/// `shutdown`. A set whose identity `accept` refuses, or a bad or
/// half-written set, is logged and the old one kept; the next change is
/// tried again.
pub async fn watch(
    prefix: PathBuf,
    accept: impl Fn(&SpiffeId) -> bool + Send,
    certs: Arc<CertSource>,
    trust: Arc<TrustStore>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut seen = stamp(&prefix);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let now = stamp(&prefix);
        if now == seen {
            continue;
        }
        seen = now;
        match load_credentials(&prefix) {
            Ok((creds, bundle)) => {
                let id = match creds.id() {
                    Ok(id) => id,
                    Err(e) => {
                        tracing::warn!(prefix = %prefix.display(), error = %e, "new credentials ignored");
                        continue;
                    }
                };
                // The files may be rewritten by hand: keep serving as what we are.
                if !accept(&id) {
                    tracing::warn!(%id, "new credentials ignored: not an identity this process may take");
                    continue;
                }
                let expiry = creds.leaf_info().map(|i| i.not_after).ok();
                match certs.swap(creds) {
                    Ok(()) => {
                        trust.update(bundle);
                        tracing::info!(
                            %id,
                            expires = ?expiry.map(humantime::format_rfc3339_seconds),
                            "credentials reloaded"
                        );
                    }
                    Err(e) => tracing::warn!(error = %e, "new credentials ignored"),
                }
            }
            // Often a write in progress; the next poll sees the finished files.
            Err(e) => {
                tracing::warn!(prefix = %prefix.display(), error = %e, "new credentials not loaded yet")
            }
        }
    }
}
