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
    #[arg(long, env = "TRELLIS_AGENT_CONFIG", required = true)]
    config: Option<PathBuf>,

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
        match (self.command, self.config) {
            (Some(AgentCommand::Setup(args)), _) => args.run(),
            (None, Some(config)) => run_agent(config),
            // clap requires --config unless a subcommand is given.
            (None, None) => Err(UsageError("--config is required".into()).into()),
        }
    }
}

fn run_agent(config: PathBuf) -> Result<()> {
    let text = std::fs::read_to_string(&config)
        .with_context(|| format!("could not read {}", config.display()))?;
    let cfg = AgentConfig::from_toml(&text)
        .map_err(|e| UsageError(format!("{}: {e}", config.display())))?;
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
            let reloader = agent.reloader();
            let path = config.clone();
            crate::cli::reload_on_sighup(path, AgentConfig::from_toml, move |c| reloader.apply(c))?;
            crate::systemd::ready();
            let supervisor = crate::systemd::supervise(shutdown.clone());
            agent.run(shutdown.clone()).await;
            shutdown.cancel();
            let _ = supervisor.await;
            spans.shutdown().await;
            Ok(())
        })
}
