//! `trellis check`: tests the real path from the host it runs on and says
//! what is wrong in words. It reads the agent's configuration (the same file
//! and default path the agent uses), so it knows the credentials, servers,
//! DNS address, zone and suffix; flags override each, so that a pod (or a
//! test) can point it elsewhere.
//!
//! Each check is a named item with a status (ok, warn, fail, skip), one line
//! saying what is wrong and what to do, and details. A check whose input
//! another check could not provide is skipped with that reason instead of
//! failing again. The exit status is 1 when any check fails.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use serde::Serialize;
use trellis_agent::AgentConfig;

use crate::cli::parse_duration;

mod local;
mod path;
mod store;

/// The drop-in `systemd/trellis-mesh.conf` is installed as.
const RESOLVED_DROPIN: &str = "/etc/systemd/resolved.conf.d/trellis-mesh.conf";

/// `trellis check`.
#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    /// The agent's configuration file: the one `trellis agent --config`
    /// runs with. In `trellis dev`: STATE_DIR/HOST.toml.
    #[arg(
        long,
        env = "TRELLIS_AGENT_CONFIG",
        default_value = "/etc/trellis/agent.toml"
    )]
    config: PathBuf,
    /// Credentials prefix (PREFIX.crt/.key/.bundle) to check and to call
    /// the servers with, instead of the agent's node identity.
    #[arg(long, env = "TRELLIS_CHECK_CREDENTIALS")]
    credentials: Option<PathBuf>,
    /// A server to check (host:port), instead of the configuration's
    /// `servers`; repeat for several.
    #[arg(long = "server")]
    servers: Vec<String>,
    /// The agent's DNS address, instead of the configuration's `dns`.
    #[arg(long)]
    dns: Option<SocketAddr>,
    /// The systemd-resolved drop-in that routes `~mesh` to the agent. Given
    /// explicitly, a missing file fails even where resolved does not run.
    #[arg(long, env = "TRELLIS_RESOLVED_DROPIN")]
    resolved_dropin: Option<PathBuf>,
    /// A mesh service to call through the agent, as NAME.NAMESPACE
    /// (e.g. catalog.shop): resolved by the agent's DNS, then one HTTP GET.
    #[arg(long)]
    service: Option<String>,
    /// The service's port (default: the first its endpoints register).
    #[arg(long, requires = "service")]
    port: Option<u16>,
    /// How long any one probe may take.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    /// One line per check, then a summary.
    Text,
    /// One JSON document.
    Json,
}

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Status {
    /// Nothing to report.
    Ok,
    /// Not checked: an input it needs is missing (the finding says which).
    Skip,
    /// Works, but needs attention.
    Warn,
    /// Broken.
    Fail,
}

/// One named check.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Check {
    pub(crate) name: &'static str,
    pub(crate) status: Status,
    /// One line: what is wrong and what to do (or what was found).
    pub(crate) finding: String,
    pub(crate) details: serde_json::Value,
}

impl Check {
    pub(crate) fn new(
        name: &'static str,
        status: Status,
        finding: impl Into<String>,
        details: serde_json::Value,
    ) -> Self {
        Self {
            name,
            status,
            finding: finding.into(),
            details,
        }
    }

    pub(crate) fn skip(name: &'static str, why: impl Into<String>) -> Self {
        Self::new(name, Status::Skip, why, serde_json::Value::Null)
    }
}

/// What the checks share: the configuration and the overrides in force.
pub(crate) struct Ctx {
    pub(crate) cfg: AgentConfig,
    pub(crate) config_path: PathBuf,
    /// The identity checked first and used to call the servers.
    pub(crate) node: PathBuf,
    pub(crate) servers: Vec<String>,
    pub(crate) dns: SocketAddr,
    pub(crate) dropin: PathBuf,
    pub(crate) dropin_explicit: bool,
    pub(crate) service: Option<String>,
    pub(crate) port: Option<u16>,
    pub(crate) timeout: Duration,
}

/// The JSON document's version: bumped when a field changes meaning or
/// goes away (new fields and checks may be added without a bump).
const FORMAT_VERSION: u32 = 1;

#[derive(Serialize)]
struct Report<'a> {
    format_version: u32,
    host: &'a str,
    zone: &'a str,
    config: String,
    ok: bool,
    summary: Summary,
    checks: &'a [Check],
}

#[derive(Serialize, Default)]
struct Summary {
    ok: usize,
    warn: usize,
    fail: usize,
    skip: usize,
}

impl CheckArgs {
    pub(crate) fn run(self) -> Result<()> {
        let text = std::fs::read_to_string(&self.config).with_context(|| {
            format!(
                "could not read the agent configuration {} (give another with --config or TRELLIS_AGENT_CONFIG)",
                self.config.display()
            )
        })?;
        let cfg = AgentConfig::from_toml(&text)
            .map_err(|e| crate::cli::UsageError(format!("{}: {e}", self.config.display())))?;
        let ctx = Ctx {
            node: self
                .credentials
                .clone()
                .unwrap_or_else(|| cfg.node_credentials()),
            servers: if self.servers.is_empty() {
                cfg.servers.clone()
            } else {
                self.servers.clone()
            },
            dns: self.dns.unwrap_or(cfg.dns),
            dropin_explicit: self.resolved_dropin.is_some(),
            dropin: self
                .resolved_dropin
                .clone()
                .unwrap_or_else(|| RESOLVED_DROPIN.into()),
            service: self.service.clone(),
            port: self.port,
            timeout: self.timeout,
            config_path: self.config.clone(),
            cfg,
        };
        let checks = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?
            .block_on(run_all(&ctx));
        let mut summary = Summary::default();
        for c in &checks {
            match c.status {
                Status::Ok => summary.ok += 1,
                Status::Warn => summary.warn += 1,
                Status::Fail => summary.fail += 1,
                Status::Skip => summary.skip += 1,
            }
        }
        let failed = summary.fail;
        match self.output {
            Output::Json => {
                let report = Report {
                    format_version: FORMAT_VERSION,
                    host: &ctx.cfg.name,
                    zone: &ctx.cfg.zone,
                    config: ctx.config_path.display().to_string(),
                    ok: failed == 0,
                    summary,
                    checks: &checks,
                };
                outln!("{}", serde_json::to_string_pretty(&report)?);
            }
            Output::Text => print_text(&ctx, &checks, &summary),
        }
        if failed > 0 {
            bail!("{failed} of {} checks failed", checks.len());
        }
        Ok(())
    }
}

/// Every check, in the order a request needs them: identity, store, clock,
/// names, gateways, then the request itself.
async fn run_all(ctx: &Ctx) -> Vec<Check> {
    let mut out = Vec::new();
    let creds = local::Credentials::read(ctx);
    let store = store::Store::probe(ctx, &creds).await;
    out.push(creds.check(store.bundle.as_ref(), store.bundle_unverified));
    out.push(store.servers_check(&creds));
    out.push(store.quorum_check());
    out.push(store.clock_check());
    let dns = path::dns_check(ctx).await;
    let dns_ok = dns.status != Status::Fail;
    out.push(dns);
    out.push(local::resolved_check(ctx).await);
    out.push(store.gateways_check(ctx).await);
    out.push(path::service_check(ctx, &store, dns_ok).await);
    out
}

fn print_text(ctx: &Ctx, checks: &[Check], s: &Summary) {
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    outln!(
        "trellis check: host {} in zone {} ({})",
        ctx.cfg.name,
        ctx.cfg.zone,
        ctx.config_path.display()
    );
    for c in checks {
        let mark = match (c.status, tty) {
            (Status::Ok, true) => "✔",
            (Status::Warn, true) => "‼",
            (Status::Fail, true) => "✘",
            (Status::Skip, true) => "-",
            (Status::Ok, false) => "ok  ",
            (Status::Warn, false) => "warn",
            (Status::Fail, false) => "FAIL",
            (Status::Skip, false) => "skip",
        };
        outln!("{mark} {:<12} {}", c.name, c.finding);
    }
    outln!(
        "{} ok, {} warnings, {} failed, {} skipped",
        s.ok,
        s.warn,
        s.fail,
        s.skip
    );
}

/// `3m`, `2h 5m`, `12s`: a duration to the second, for findings.
pub(crate) fn human(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}
