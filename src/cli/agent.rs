//! `trellis agent`: run the host agent's sidecar proxy.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use tokio_util::sync::CancellationToken;
use trellis_agent::{Agent, AgentConfig};

use crate::cli::{UsageError, shutdown_on_signals};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub(crate) struct AgentArgs {
    /// The agent's configuration file (TOML); see configs/agent.toml.
    #[arg(
        long,
        env = "TRELLIS_AGENT_CONFIG",
        required_unless_present = "kubernetes"
    )]
    config: Option<PathBuf>,
    /// Run as a pod's sidecar: the configuration comes from the pod's
    /// environment (TRELLIS_POD_NAME, TRELLIS_ZONE, TRELLIS_TOKEN_EXCHANGE,
    /// …) and its first identity from the zone controller's token exchange.
    #[arg(long, conflicts_with = "config")]
    kubernetes: bool,

    #[command(subcommand)]
    command: Option<AgentCommand>,
}

#[derive(Debug, Subcommand)]
enum AgentCommand {
    /// Set this host up as an agent in one command: write
    /// /etc/trellis/agent.toml and the join token, turn on the
    /// systemd-resolved drop-in, and enable and start trellis-agent.
    /// Rerunning it changes only what changed, and says so.
    Setup(crate::cli::setup::AgentSetupArgs),
}

impl AgentArgs {
    pub(crate) fn run(self) -> Result<()> {
        match (self.command, self.config, self.kubernetes) {
            (Some(AgentCommand::Setup(args)), _, _) => args.run(),
            (None, Some(config), _) => run_agent(Some(config)),
            (None, None, true) => run_agent(None),
            // clap requires --config unless --kubernetes or a subcommand.
            (None, None, false) => {
                Err(UsageError("--config is required (or --kubernetes in a pod)".into()).into())
            }
        }
    }
}

/// Runs the agent on the file at `config`, or, without one, on the
/// configuration a pod's environment gives (`--kubernetes`).
fn run_agent(config: Option<PathBuf>) -> Result<()> {
    let cfg = match &config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("could not read {}", path.display()))?;
            AgentConfig::from_toml(&text)
                .map_err(|e| UsageError(format!("{}: {e}", path.display())))?
        }
        None => crate::cli::kube::pod_agent_config()?,
    };
    let mut rt = if cfg.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(cfg.threads);
        b
    };
    rt.enable_all()
        .thread_name("trellis-agent")
        .build()
        .context("could not start the async runtime")?
        .block_on(async move {
            let name = cfg.name.clone();
            let spans =
                crate::telemetry::start("trellis-agent", &name, &cfg.zone, cfg.tracing.sampling)?;
            let agent = Agent::bind(cfg).await?;
            let outbound: Vec<String> = agent
                .outbound_addrs()
                .iter()
                .map(|(s, a)| format!("{s} {a}"))
                .collect();
            noteln!(
                "agent {name} listening: inbound {}, dns {}, admin {}, outbound [{}]",
                agent.inbound_addr()?,
                agent.dns_addr()?,
                agent.admin_addr()?,
                outbound.join(", ")
            );
            let shutdown = CancellationToken::new();
            shutdown_on_signals(shutdown.clone())?;
            // A pod's configuration is its spec: it changes by a new pod.
            if let Some(path) = config.clone() {
                let reloader = agent.reloader();
                crate::cli::reload_on_sighup(path, AgentConfig::from_toml, move |c| {
                    reloader.apply(c)
                })?;
            }
            crate::systemd::ready();
            let supervisor = crate::systemd::supervise(shutdown.clone());
            agent.run(shutdown.clone()).await;
            shutdown.cancel();
            let _ = supervisor.await;
            spans.shutdown().await;
            Ok(())
        })
}
