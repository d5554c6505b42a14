//! systemd integration for `Type=notify` units: READY=1 once the ports are
//! bound, STOPPING=1 when the drain starts, and watchdog pings while the
//! runtime is alive. Outside systemd (no NOTIFY_SOCKET) every call is a no-op.

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

/// Tells systemd the service is up.
pub(crate) fn ready() {
    notify(&[NotifyState::Ready]);
}

/// Pings the watchdog at half its interval until `shutdown`, and says
/// STOPPING=1 when `shutdown` fires. Await the handle before exiting, so the
/// STOPPING message is not lost to a fast exit.
pub(crate) fn supervise(shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
    let watchdog = sd_notify::watchdog_enabled();
    tokio::spawn(async move {
        match watchdog {
            Some(every) => {
                // Pinged from the runtime itself: a wedged runtime stops the
                // pings and systemd restarts the service.
                let mut tick = tokio::time::interval(every / 2);
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        _ = tick.tick() => notify(&[NotifyState::Watchdog]),
                    }
                }
            }
            None => shutdown.cancelled().await,
        }
        notify(&[NotifyState::Stopping]);
    })
}

fn notify(state: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "could not notify systemd");
    }
}
