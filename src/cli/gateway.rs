//! `trellis gateway`: run a zone's east-west gateway.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use tokio_util::sync::CancellationToken;
use trellis_gateway::Gateway;
use trellis_gateway::config::GatewayConfig;

use crate::cli::{UsageError, shutdown_on_signals};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub(crate) struct GatewayArgs {
    /// The gateway's configuration file (TOML); see configs/gateway.toml.
    #[arg(long, env = "TRELLIS_GATEWAY_CONFIG", required = true)]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Option<GatewayCommand>,
}

#[derive(Debug, Subcommand)]
enum GatewayCommand {
    /// Set this host up as a zone gateway in one command: write
    /// /etc/trellis/gateway.toml, install its credentials under
    /// /var/lib/trellis/gateway, and enable and start trellis-gateway.
    /// Rerunning it changes only what changed, and says so.
    Setup(crate::cli::setup::GatewaySetupArgs),
}

impl GatewayArgs {
    pub(crate) fn run(self) -> Result<()> {
        match (self.command, self.config) {
            (Some(GatewayCommand::Setup(args)), _) => args.run(),
            (None, Some(config)) => run_gateway(config),
            // clap requires --config unless a subcommand is given.
            (None, None) => Err(UsageError("--config is required".into()).into()),
        }
    }
}

fn run_gateway(config: PathBuf) -> Result<()> {
    let text = std::fs::read_to_string(&config)
        .with_context(|| format!("could not read {}", config.display()))?;
    // Parse and validate everything before binding any port.
    let cfg = GatewayConfig::from_toml(&text)
        .map_err(|e| UsageError(format!("{}: {e}", config.display())))?;
    tracing::info!(config = %config.display(), zone = %cfg.zone, name = %cfg.name, "starting gateway");
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("trellis-gateway")
        .build()
        .context("could not start the async runtime")?
        .block_on(async move {
            let (zone, name) = (cfg.zone.clone(), cfg.name.clone());
            let spans = crate::telemetry::start("trellis-gateway", &name, &zone, None)?;
            let gw = Gateway::from_config(cfg).await?;
            let a = gw.addrs()?;
            let zone_port = a.zone.map(|z| format!(", zone {z}")).unwrap_or_default();
            noteln!(
                "gateway {zone}/{name} listening: tcp {}, quic {}, admin {}{zone_port}",
                a.tcp,
                a.quic,
                a.admin
            );
            let shutdown = CancellationToken::new();
            shutdown_on_signals(shutdown.clone())?;
            let reload = gw.reloader();
            let path = config.clone();
            crate::cli::reload_on_sighup(path, GatewayConfig::from_toml, reload)?;
            crate::systemd::ready();
            let supervisor = crate::systemd::supervise(shutdown.clone());
            let result = gw.run(shutdown.clone()).await;
            shutdown.cancel();
            let _ = supervisor.await;
            spans.shutdown().await;
            result?;
            Ok(())
        })
}
