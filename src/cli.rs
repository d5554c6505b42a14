//! The command line: one subcommand per role and per operator verb.

use clap::{Parser, Subcommand, ValueEnum};

mod agent;
mod ca;
mod check;
pub(crate) mod dashboard;
mod demo_app;
mod gateway;
mod generate;
pub(crate) mod inject;
mod kube;
mod load;
mod load_mesh;
mod ops;
mod relay;
mod server;
mod setup;
pub(crate) mod top;
mod translate;
pub(crate) mod webhook;

/// Trellis: a light service mesh for Kubernetes clusters, VMs and edge sites.
///
/// Every call between workloads is mutual TLS between SPIFFE identities issued
/// by the mesh CA. Start with `trellis dev` to see the parts that exist run on
/// this machine, or `trellis ca init --dir ./ca` to make a CA of your own.
#[derive(Debug, Parser)]
#[command(name = "trellis", version = crate::version::VERSION, propagate_version = true)]
pub(crate) struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "TRELLIS_LOG_FORMAT")]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a whole multi-zone mesh on this machine, on an embedded default.
    Dev(crate::dev::DevArgs),
    /// Manage the mesh CA: roots, zone intermediates, identities.
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// Run a zone's east-west gateway (QUIC tunnels to other zones).
    Gateway(gateway::GatewayArgs),
    /// Run the host agent: identities, registration, health checks, sidecar proxy, mesh DNS.
    Agent(agent::AgentArgs),
    /// Kubernetes: the zone controller of a cluster.
    #[command(subcommand)]
    Kube(kube::KubeCommand),
    /// Run a small HTTP service that says who it is and who called (demos, tests).
    DemoApp(demo_app::DemoAppArgs),
    /// Run a federation server (Raft member and gRPC API).
    Server(server::ServerArgs),
    /// Zones: join tokens, joining a server, listing.
    #[command(subcommand)]
    Zone(ops::ZoneCommand),
    /// Policy documents: apply, list, get, delete.
    #[command(subcommand)]
    Policy(ops::PolicyCommand),
    /// The federation cluster: members and Raft state.
    #[command(subcommand)]
    Cluster(ops::ClusterCommand),
    /// Registered services and their endpoints.
    #[command(subcommand)]
    Service(ops::ServiceCommand),
    /// The state of the mesh: the cluster, and every proxy's drift (the
    /// revision it applied, or rejected, against the store's).
    Status(ops::Conn),
    /// Who changed policy, join tokens, zones and membership, and when.
    Audit(ops::AuditArgs),
    /// Live golden signals per service edge: requests/s, success rate, p50
    /// and p99 (or one service's routes and endpoints with --service).
    Top(top::TopArgs),
    /// Serve a read-only web dashboard of the mesh on 127.0.0.1, read with
    /// the operator's credentials; the first line printed is its URL, with
    /// the token that opens it.
    Dashboard(dashboard::DashboardArgs),
    /// Test the mesh from this host and say what is wrong: credentials,
    /// servers and quorum, clock skew, DNS and systemd-resolved, the zone's
    /// gateways and their links, and (with --service) a request through the
    /// mesh. Exits 1 when a check fails.
    Check(check::CheckArgs),
    /// Add the agent to Kubernetes workloads (YAML in, YAML out).
    Inject(inject::InjectArgs),
    /// Serve the mutating admission webhook that injects the agent into
    /// opted-in pods as they are created (HTTPS, AdmissionReview v1).
    Webhook(webhook::WebhookArgs),
    /// Forward TCP and UDP with an added delay each way (testbed only: the
    /// stand-in for `tc netem` where the kernel has none).
    #[command(hide = true)]
    Relay(relay::RelayArgs),
    /// Load generators: GETs at a steady rate, each outcome logged (the
    /// testbed's scenarios), or `load mesh`: many simulated proxies against
    /// the servers, with the time a change takes to reach them all.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Load(load::LoadArgs),
    /// Write man pages and shell completions (the packages ship them).
    #[command(hide = true)]
    Generate(generate::GenerateArgs),
}

impl Cli {
    /// Logs to stderr; `RUST_LOG` filters (default `info`).
    pub(crate) fn init_logging(&self) {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr);
        match self.log_format {
            LogFormat::Text => builder.init(),
            LogFormat::Json => builder.json().init(),
        }
    }

    pub(crate) fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Dev(args) => crate::dev::run(args),
            Command::Ca(cmd) => cmd.run(),
            Command::Gateway(args) => args.run(),
            Command::DemoApp(args) => args.run(),
            Command::Agent(args) => args.run(),
            Command::Kube(cmd) => cmd.run(),
            Command::Server(args) => args.run(),
            Command::Zone(cmd) => cmd.run(),
            Command::Policy(cmd) => cmd.run(),
            Command::Cluster(cmd) => cmd.run(),
            Command::Service(cmd) => cmd.run(),
            Command::Status(conn) => ops::mesh_status(conn),
            Command::Audit(args) => ops::audit(args),
            Command::Top(args) => args.run(),
            Command::Dashboard(args) => args.run(),
            Command::Check(args) => args.run(),
            Command::Inject(args) => args.run(),
            Command::Webhook(args) => args.run(),
            Command::Relay(args) => args.run(),
            Command::Load(args) => args.run(),
            Command::Generate(args) => args.run(),
        }
    }
}

/// A bad command line or configuration value: exits 64 (EX_USAGE), not 1.
#[derive(Debug)]
pub(crate) struct UsageError(pub(crate) String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Parses durations such as `90s`, `24h`, `30d` or `10y` for clap.
pub(crate) fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{e} (write a number and a unit, e.g. 90s, 24h, 30d, 10y)"))?;
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(d)
}

/// SIGTERM or a first SIGINT starts a graceful drain; a second SIGINT exits
/// at once.
/// Calls `reload` on every SIGHUP, for as long as the runtime runs.
pub(crate) fn on_sighup(reload: impl Fn() + Send + 'static) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the configuration");
            reload();
        }
    });
    Ok(())
}

/// On every SIGHUP, rereads `path`, parses it with `parse` and hands the
/// result to `apply`, which returns the changed keys that wait for a restart;
/// the outcome is logged, and a refused file leaves the running one in force.
pub(crate) fn reload_on_sighup<C, E1: std::fmt::Display, E2: std::fmt::Display>(
    path: std::path::PathBuf,
    parse: impl Fn(&str) -> Result<C, E1> + Send + 'static,
    apply: impl Fn(C) -> Result<Vec<&'static str>, E2> + Send + 'static,
) -> std::io::Result<()> {
    on_sighup(move || {
        let r = std::fs::read_to_string(&path)
            .map_err(|e| format!("could not read {}: {e}", path.display()))
            .and_then(|t| parse(&t).map_err(|e| e.to_string()))
            .and_then(|c| apply(c).map_err(|e| e.to_string()));
        match r {
            Ok(later) if later.is_empty() => tracing::info!("configuration reloaded"),
            Ok(later) => tracing::warn!(
                restart_needed = %later.join(", "),
                "configuration reloaded; these changes take effect at the next start"
            ),
            Err(e) => {
                tracing::error!(error = %e, "reload refused; the running configuration stays")
            }
        }
    })
}

pub(crate) fn shutdown_on_signals(
    token: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = int.recv() => tracing::info!("SIGINT: draining (again to stop at once)"),
        }
        token.cancel();
        int.recv().await;
        tracing::warn!("second SIGINT: stopping now");
        std::process::exit(130);
    });
    Ok(())
}
