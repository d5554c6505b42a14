//! `trellis kube …`: the Kubernetes zone controller, and the pod side of
//! `trellis agent --kubernetes`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use tokio_util::sync::CancellationToken;
use trellis_agent::AgentConfig;
use trellis_kube::controller::Controller;
use trellis_kube::pod::PodEnv;
use trellis_kube::{ControllerConfig, KubeError};

use crate::cli::{UsageError, shutdown_on_signals};

#[derive(Debug, Subcommand)]
pub(crate) enum KubeCommand {
    /// Run a cluster zone's controller: the token exchange that gives pods
    /// their identities (TokenReview), and Services and EndpointSlices of
    /// opted-in namespaces kept in the registry.
    Controller(ControllerArgs),
}

#[derive(Debug, Args)]
pub(crate) struct ControllerArgs {
    /// The controller's configuration file (TOML); see configs/kube-controller.toml.
    #[arg(long, env = "TRELLIS_CONTROLLER_CONFIG")]
    config: PathBuf,
}

impl KubeCommand {
    pub(crate) fn run(self) -> Result<()> {
        match self {
            KubeCommand::Controller(args) => args.run(),
        }
    }
}

impl ControllerArgs {
    fn run(self) -> Result<()> {
        let text = std::fs::read_to_string(&self.config)
            .with_context(|| format!("could not read {}", self.config.display()))?;
        let cfg = ControllerConfig::from_toml(&text)
            .map_err(|e| UsageError(format!("{}: {e}", self.config.display())))?;
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("trellis-kube")
            .build()
            .context("could not start the async runtime")?
            .block_on(async move {
                let id = cfg.id();
                let controller = Controller::bind(cfg).await.map_err(usage)?;
                noteln!(
                    "controller {id} listening: exchange https://{}{}",
                    controller.exchange_addr()?,
                    trellis_kube::EXCHANGE_PATH
                );
                let shutdown = CancellationToken::new();
                shutdown_on_signals(shutdown.clone())?;
                crate::systemd::ready();
                controller.run(shutdown).await?;
                Ok(())
            })
    }
}

/// Bad configuration is a usage error (exit 64); the rest is a failure.
fn usage(e: KubeError) -> anyhow::Error {
    match e {
        KubeError::Config { .. } => UsageError(e.to_string()).into(),
        e => e.into(),
    }
}

/// The pod agent's configuration from its environment, after the token
/// exchange when it has no credentials yet.
pub(crate) fn pod_agent_config() -> Result<AgentConfig> {
    let env = PodEnv::from_lookup(|k| std::env::var(k).ok()).map_err(usage)?;
    tracing::info!(pod = %format!("{}/{}", env.namespace, env.pod), zone = %env.zone, exchange = %env.exchange, "agent in a Kubernetes pod");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("could not start the async runtime")?
        .block_on(trellis_kube::pod::prepare(&env))
        .map_err(usage)
}
