//! Picking up renewed credentials: whoever renews the gateway's certificate
//! (an operator with `trellis ca issue`, later the agent) rewrites the files
//! at the credentials prefix; the gateway notices and swaps them in. New
//! handshakes use the new certificate and bundle, open connections go on.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use trellis_ca::tls::{CertSource, TrustStore};
use trellis_ca::{Role, credential_paths, load_credentials};

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
/// `shutdown`. A bad or half-written set is logged and the old one kept; the
/// next change is tried again.
pub(crate) async fn watch(
    prefix: PathBuf,
    zone: String,
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
                // The file may be rewritten by hand: keep serving as what we are.
                if !matches!(id.role(), Some(Role::Gateway { zone: z, .. }) if z == zone) {
                    tracing::warn!(%id, "new credentials ignored: not a gateway identity of this zone");
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
