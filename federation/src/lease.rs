//! Keeping an endpoint registered for as long as the process that serves it
//! runs: register, renew the lease, re-register on change, deregister on a
//! clean stop. A process killed outright stops renewing, and the store drops
//! its endpoint when the lease runs out.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::api::endpoint_to;
use crate::client::Servers;
use crate::proto;
use crate::proto::registry_client::RegistryClient;
use crate::state::EndpointRecord;

const RETRY_MIN: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// How long a clean stop waits for the deregistration.
const DEREGISTER_WAIT: Duration = Duration::from_secs(2);

/// Keeps the endpoint `want` holds registered until `shutdown`, then
/// deregisters it. A change of `want` (say, health) is written at once.
/// Renewals come every third of the lease, so two may fail before it ends.
pub async fn keep_registered(
    servers: Servers,
    mut want: watch::Receiver<EndpointRecord>,
    shutdown: CancellationToken,
) {
    let mut registered: Option<EndpointRecord> = None;
    let mut retry = RETRY_MIN;
    loop {
        let ep = want.borrow_and_update().clone();
        let renew_every = Duration::from_secs(ep.lease_seconds.max(3)) / 3;
        let key = ep.key();
        let renewal = registered.as_ref() == Some(&ep);
        let r = if !renewal {
            servers
                .call(|ch| {
                    let req = endpoint_to(ep.clone());
                    async move { RegistryClient::new(ch).register(req).await }
                })
                .await
                .map(|_| {
                    tracing::info!(endpoint = %key, healthy = ep.healthy, "registered");
                    registered = Some(ep.clone());
                })
        } else {
            servers
                .call(|ch| {
                    let k = key_of(&ep);
                    async move { RegistryClient::new(ch).renew_lease(k).await }
                })
                .await
                .map(|_| ())
        };
        let wait = match r {
            Ok(()) => {
                retry = RETRY_MIN;
                renew_every
            }
            // The store forgot us (a lease that ran out, say during a
            // partition), yet it answered: register again at once rather
            // than leave the name out of routing for a back-off.
            Err(s) if renewal && s.code() == tonic::Code::InvalidArgument => {
                registered = None;
                tracing::info!(endpoint = %key, reason = %s.message(), "lease ended; registering again");
                Duration::ZERO
            }
            Err(s) => {
                tracing::warn!(endpoint = %key, error = %s.message(), "registration failed; retrying");
                let w = retry;
                retry = (retry * 2).min(RETRY_MAX);
                if registered.is_none() {
                    w
                } else {
                    w.min(renew_every)
                }
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => break,
            r = want.changed() => if r.is_err() { break },
            () = tokio::time::sleep(wait) => {}
        }
    }
    if let Some(ep) = registered {
        let key = ep.key();
        let r = tokio::time::timeout(
            DEREGISTER_WAIT,
            servers.call(|ch| {
                let k = key_of(&ep);
                async move { RegistryClient::new(ch).deregister(k).await }
            }),
        )
        .await;
        match r {
            Ok(Ok(_)) => tracing::info!(endpoint = %key, "deregistered"),
            Ok(Err(s)) => {
                tracing::warn!(endpoint = %key, error = %s.message(), "deregistration failed; the lease will expire")
            }
            Err(_) => {
                tracing::warn!(endpoint = %key, "deregistration timed out; the lease will expire")
            }
        }
    }
}

fn key_of(ep: &EndpointRecord) -> proto::EndpointKey {
    proto::EndpointKey {
        namespace: ep.namespace.clone(),
        service: ep.service.clone(),
        zone: ep.zone.clone(),
        id: ep.id.clone(),
    }
}
