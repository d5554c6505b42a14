//! `trellis gateway`: run a zone's east-west gateway.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use tokio_util::sync::CancellationToken;
use trellis_gateway::Gateway;
use trellis_gateway::config::GatewayConfig;

use crate::cli::{UsageError, shutdown_on_signals};

#[derive(Debug, Args)]
pub(crate) struct GatewayArgs {
    /// The gateway's configuration file (TOML); see configs/gateway.toml.
    #[arg(long, env = "TRELLIS_GATEWAY_CONFIG")]
    config: PathBuf,
}

impl GatewayArgs {
    pub(crate) fn run(self) -> Result<()> {
        let text = std::fs::read_to_string(&self.config)
            .with_context(|| format!("could not read {}", self.config.display()))?;
        // Parse and validate everything before binding any port.
        let cfg = GatewayConfig::from_toml(&text)
            .map_err(|e| UsageError(format!("{}: {e}", self.config.display())))?;
        tracing::info!(config = %self.config.display(), zone = %cfg.zone, name = %cfg.name, "starting gateway");
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
                let path = self.config.clone();
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
}
