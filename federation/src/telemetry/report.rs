//! The proxy side of `Telemetry.Report`: one long-lived client stream to a
//! server of the proxy's zone, a summary sent on it every interval.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::client::Servers;
use crate::proto;

/// First wait before reconnecting after a stream failed; doubled on each
/// failure up to [`BACKOFF_MAX`], reset by a stream that lived a minute.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long the last report may take to leave at shutdown.
const FLUSH: Duration = Duration::from_secs(1);

/// Sends `take(now)` every `every` over a `Telemetry.Report` stream to the
/// current server of `servers`, until `stop` (then sends a last one).
///
/// `take` hands over what accumulated since it last returned a report, so
/// while no stream is open nothing is taken and the proxy keeps
/// aggregating (bounded by the proxy; a backlog older than the servers
/// keep is the proxy's to drop and count). A stream that breaks moves to
/// the next server and is reopened with backoff. At most one report is in
/// flight on a stream (the channel holds one): if the stream breaks under
/// it, that one interval is lost.
pub async fn run(
    servers: Servers,
    every: Duration,
    mut take: impl FnMut(Instant) -> Option<proto::SignalReport> + Send,
    stop: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let (channel, addr) = servers.current();
        let addr = addr.to_string();
        let (tx, rx) = mpsc::channel::<proto::SignalReport>(1);
        let mut call = Box::pin(async move {
            proto::telemetry_client::TelemetryClient::new(channel)
                .report(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        let opened = Instant::now();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let ended = loop {
            tokio::select! {
                () = stop.cancelled() => {
                    if let Some(r) = take(Instant::now()) {
                        let _ = tx.try_send(r);
                    }
                    drop(tx);
                    let _ = tokio::time::timeout(FLUSH, call).await;
                    return;
                }
                r = &mut call => break r,
                _ = tick.tick() => {
                    // Take only what the stream can carry now: a report
                    // still queued means the server is slow, and what
                    // happens meanwhile stays with the proxy.
                    if let Ok(permit) = tx.try_reserve()
                        && let Some(r) = take(Instant::now())
                    {
                        permit.send(r);
                    }
                }
            }
        };
        let clean = ended.is_ok();
        match ended {
            Ok(_) => {
                // A server ends report streams when it stops: move on, as
                // the watch does.
                tracing::info!(server = %addr, "telemetry stream ended by the server; reopening");
                servers.next(&addr);
            }
            Err(s) => {
                tracing::warn!(server = %addr, code = ?s.code(), error = %s.message(), "telemetry stream failed; summaries wait for the next one");
                if Servers::is_unreachable(&s) {
                    servers.next(&addr);
                }
            }
        }
        // A server stopping ends the stream cleanly: the next one is not
        // to be waited for.
        if clean || opened.elapsed() > Duration::from_secs(60) {
            backoff = BACKOFF_MIN;
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}
