//! `trellis load` (hidden): a steady stream of HTTP GETs for the testbed
//! scenarios, one line per request in a log, so a script can count requests
//! and failures and measure how long a fault made requests fail.
//!
//! Requests start on a fixed schedule, each on its own task: a request
//! stalled by a fault does not hold back the next ones, so the log shows
//! the failure window at the configured resolution instead of one long
//! gap. Each request resolves the name anew (through the agent's mesh DNS
//! when --dns is given) and opens a new connection, as the demo apps do,
//! so every request exercises routing.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Args;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cli::demo_app::call::{CallUrl, Client, Resolver};
use crate::cli::{parse_duration, shutdown_on_signals};

#[derive(Debug, Args)]
pub(crate) struct LoadArgs {
    #[command(subcommand)]
    kind: Option<LoadKind>,
    #[command(flatten)]
    http: HttpLoadArgs,
}

#[derive(Debug, clap::Subcommand)]
enum LoadKind {
    /// Simulate many proxies against real servers: each holds a scoped
    /// watch stream and acknowledges what it applies, while their endpoints
    /// are registered and renewed; measures how long one change takes to
    /// reach and be acknowledged by every proxy it concerns, and the
    /// servers' CPU and memory per proxy and per endpoint.
    Mesh(crate::cli::load_mesh::MeshLoadArgs),
}

impl LoadArgs {
    pub(crate) fn run(self) -> Result<()> {
        match self.kind {
            Some(LoadKind::Mesh(m)) => m.run(),
            None => self.http.run(),
        }
    }
}

/// `trellis load --url`: GETs at a steady rate.
#[derive(Debug, Args)]
struct HttpLoadArgs {
    /// The URL to GET (plain http://, as an app calls its agent).
    #[arg(long)]
    url: Option<CallUrl>,
    /// Resolve the URL's host with this DNS server (the agent's mesh DNS).
    #[arg(long, value_name = "ADDR")]
    dns: Option<SocketAddr>,
    /// Requests started per second.
    #[arg(long, default_value_t = 20)]
    rate: u32,
    /// How long one request may take before it counts as failed.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    timeout: Duration,
    /// Append one line per request here: `UNIX_MS ok|fail LATENCY_MS DETAIL`,
    /// where UNIX_MS is when the request started.
    #[arg(long)]
    log: Option<PathBuf>,
    /// Stop after this long (default: at SIGTERM or SIGINT).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
}

impl HttpLoadArgs {
    fn run(self) -> Result<()> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?
            .block_on(self.run_async())
    }

    async fn run_async(self) -> Result<()> {
        // Optional for clap only, so that `load mesh` needs neither.
        let (Some(url), Some(log_path)) = (self.url.clone(), self.log.clone()) else {
            anyhow::bail!("trellis load needs --url and --log (or the subcommand mesh)");
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let log = Arc::new(Mutex::new(file));
        let client = Client {
            resolver: self.dns.map_or(Resolver::System, Resolver::Dns),
            timeout: self.timeout,
        };
        let stop = CancellationToken::new();
        shutdown_on_signals(stop.clone())?;
        let started = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1) / self.rate.max(1));
        // A late tick (a busy machine) starts the missed requests later
        // rather than in a burst, so the rate seen by the mesh stays steady.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let tracker = TaskTracker::new();
        let counts = Arc::new(Mutex::new((0u64, 0u64)));
        // Scripts wait for this line before counting on the load running.
        noteln!("load running: {} req/s to {url}", self.rate);
        loop {
            if self.duration.is_some_and(|d| started.elapsed() >= d) {
                break;
            }
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let (client, url, log, counts) = (client, url.clone(), log.clone(), counts.clone());
            tracker.spawn(async move {
                let at = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis();
                let t0 = Instant::now();
                let outcome = match client.get(&url, &[]).await {
                    Ok((status, _)) if status.is_success() => Ok(()),
                    Ok((status, body)) => Err(format!("HTTP {status}: {}", body.trim())),
                    Err(e) => Err(format!("{e:#}")),
                };
                let ms = t0.elapsed().as_millis();
                // One line, no newlines inside, so scripts can split fields.
                let line = match &outcome {
                    Ok(()) => format!("{at} ok {ms} -\n"),
                    Err(e) => format!("{at} fail {ms} {}\n", e.replace('\n', " | ")),
                };
                if let Ok(mut c) = counts.lock() {
                    match outcome {
                        Ok(()) => c.0 += 1,
                        Err(_) => c.1 += 1,
                    }
                }
                if let Ok(mut f) = log.lock() {
                    let _ = f.write_all(line.as_bytes());
                }
            });
        }
        // Requests in flight finish (each is bounded by --timeout), so every
        // request started is in the log.
        tracker.close();
        tracker.wait().await;
        let (ok, failed) = counts.lock().map(|c| *c).unwrap_or_default();
        noteln!("load stopped: {} requests, {failed} failures", ok + failed);
        Ok(())
    }
}
