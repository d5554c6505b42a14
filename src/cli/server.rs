//! `trellis server`: run a federation store member.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use tokio_util::sync::CancellationToken;
use trellis_federation::config::{PeerConfig, ServerConfig};
use trellis_federation::{join, token::JoinToken};

use crate::cli::{UsageError, shutdown_on_signals};

/// How long in-flight calls may finish after SIGTERM/SIGINT.
const DRAIN: Duration = Duration::from_secs(5);

/// Run a federation server (Raft member, gRPC API on one port).
///
/// Give a config file (see configs/server.toml), or flags, or both: flags
/// override the file. The first server of a new cluster needs --bootstrap.
#[derive(Debug, Args)]
pub(crate) struct ServerArgs {
    /// TOML config file.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Server name, unique in its zone.
    #[arg(long)]
    name: Option<String>,
    /// Zone of this server.
    #[arg(long)]
    zone: Option<String>,
    /// Trust domain of the mesh.
    #[arg(long)]
    trust_domain: Option<String>,
    /// Data directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// gRPC listen address.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Address peers and clients use to reach this server.
    #[arg(long)]
    advertise: Option<String>,
    /// CA directory (from `trellis ca init`): lets this server sign.
    #[arg(long)]
    ca_dir: Option<PathBuf>,
    /// Credentials prefix for this server's identity.
    #[arg(long)]
    credentials: Option<PathBuf>,
    /// Make an empty data directory the first configuration of a cluster.
    #[arg(long)]
    bootstrap: bool,
    /// Another voter of the first configuration, as NAME=HOST:PORT (repeat).
    #[arg(long = "peer", value_name = "NAME=ADDR")]
    peers: Vec<String>,
    /// Applied entries between log compactions.
    #[arg(long)]
    compact_after: Option<u64>,
    /// Join the federation with this single-use token (`trellis zone token
    /// create --zone ZONE`) on the first start, when the data directory
    /// holds no credentials yet; later starts reuse DATA_DIR/server.* and
    /// leave the token alone. For a server whose command line cannot change
    /// after its first start, such as a Kubernetes StatefulSet's.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["credentials", "ca_dir", "bootstrap"])]
    join_token_file: Option<PathBuf>,
}

impl ServerArgs {
    /// The effective configuration: file, then flags; validated.
    pub(crate) fn config(&self) -> Result<ServerConfig> {
        let cfg = self.merged()?;
        cfg.validate().map_err(|e| UsageError(e.to_string()))?;
        Ok(cfg)
    }

    /// The file, then the flags, not yet validated.
    fn merged(&self) -> Result<ServerConfig> {
        let mut cfg = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                ServerConfig::from_toml(&text).map_err(|e| UsageError(e.to_string()))?
            }
            None => ServerConfig::from_toml("").map_err(|e| UsageError(e.to_string()))?,
        };
        if let Some(v) = &self.name {
            cfg.name = v.clone();
        }
        if let Some(v) = &self.zone {
            cfg.zone = v.clone();
        }
        if let Some(v) = &self.trust_domain {
            cfg.trust_domain = v.clone();
        }
        if let Some(v) = &self.data_dir {
            cfg.data_dir = v.clone();
        }
        if let Some(v) = self.listen {
            cfg.listen = v;
        }
        if let Some(v) = &self.advertise {
            cfg.advertise = Some(v.clone());
        }
        if let Some(v) = &self.ca_dir {
            cfg.ca_dir = Some(v.clone());
        }
        if let Some(v) = &self.credentials {
            cfg.credentials = Some(v.clone());
        }
        if self.bootstrap {
            cfg.bootstrap = true;
        }
        for p in &self.peers {
            let (name, address) = p.split_once('=').ok_or_else(|| {
                UsageError(format!(
                    "invalid configuration: --peer {p}: write it as NAME=HOST:PORT"
                ))
            })?;
            cfg.peers.push(PeerConfig {
                name: name.into(),
                zone: None,
                address: address.into(),
            });
        }
        if let Some(v) = self.compact_after {
            cfg.raft.compact_after = v;
        }
        Ok(cfg)
    }

    pub(crate) fn run(self) -> Result<()> {
        let cfg = match &self.join_token_file {
            Some(file) => self.join_once(file)?,
            None => self.config()?,
        };
        run(cfg)
    }

    /// The configuration of a server that joins with a token the first
    /// time and restarts from the credentials it got then.
    fn join_once(&self, file: &Path) -> Result<ServerConfig> {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let token = JoinToken::parse(text.trim())
            .map_err(|e| UsageError(format!("--join-token-file {}: {e}", file.display())))?;
        if token.agent {
            return Err(UsageError(format!(
                "--join-token-file {}: an agent token; a server needs one from `trellis zone token create` without --agent",
                file.display()
            ))
            .into());
        }
        let mut cfg = self.merged()?;
        // The token says which mesh and zone this server joins.
        if self.zone.is_some() && cfg.zone != token.zone {
            return Err(UsageError(format!(
                "--zone {}: the join token is for zone {}",
                cfg.zone, token.zone
            ))
            .into());
        }
        cfg.zone = token.zone.clone();
        cfg.trust_domain = token.trust_domain.clone();
        let prefix = cfg.data_dir.join("server");
        let (crt, _, _) = trellis_ca::credential_paths(&prefix);
        if crt.exists() {
            tracing::info!(credentials = %prefix.display(), "joined before: restarting from the data directory; the token is not used");
        } else {
            let advertise = cfg
                .advertise
                .clone()
                .unwrap_or_else(|| cfg.listen.to_string());
            let joined = crate::cli::ops::runtime()?
                .block_on(join::join(&token, &cfg.name, &advertise))
                .context("joining")?;
            std::fs::create_dir_all(&cfg.data_dir)
                .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
            trellis_ca::write_credentials(&prefix, &joined.credentials, &joined.bundle)?;
            tracing::info!(zone = %joined.zone, node = joined.node_id, "joined the federation");
            cfg.zone = joined.zone;
            cfg.join_members = joined.members;
        }
        cfg.credentials = Some(prefix);
        cfg.validate().map_err(|e| UsageError(e.to_string()))?;
        Ok(cfg)
    }
}

/// Runs a server with `cfg` until SIGTERM or SIGINT (a second SIGINT exits
/// at once), speaking sd-notify under systemd as the gateway does.
pub(crate) fn run(cfg: ServerConfig) -> Result<()> {
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    rt.block_on(async move {
        tracing::info!(
            name = %cfg.name,
            zone = %cfg.zone,
            data_dir = %cfg.data_dir.display(),
            listen = %cfg.listen,
            id = cfg.node_id(),
            "starting server"
        );
        let spans = crate::telemetry::start("trellis-server", &cfg.name, &cfg.zone, None)?;
        let mut server = trellis_federation::server::start(&cfg)
            .await
            .context("starting the server")?;
        // Tests and scripts read this line to learn the bound address.
        noteln!("listening on {}", server.addr);
        let shutdown = CancellationToken::new();
        shutdown_on_signals(shutdown.clone())?;
        tokio::spawn(crate::heap::release_free(
            cfg.release_free_heap_mib << 20,
            shutdown.clone(),
        ));
        if let Some(addr) = cfg.dns {
            let names = Arc::new(StoreNames {
                db: server.node.db().clone(),
                zone: cfg.zone.clone(),
            });
            let dns = trellis_agent::dns::MeshDns::new(&cfg.dns_suffix, names, None)
                .map_err(|e| UsageError(format!("dns_suffix: {e}")))?;
            let tcp = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("DNS on {addr} (TCP)"))?;
            let bound = tcp.local_addr()?;
            let udp = tokio::net::UdpSocket::bind(bound)
                .await
                .with_context(|| format!("DNS on {bound} (UDP)"))?;
            tracing::info!(%bound, "answering mesh DNS");
            tokio::spawn(Arc::new(dns).serve(udp, tcp, shutdown.clone()));
        }
        // Nothing in a server's file can change under a running Raft node
        // (identity, addresses, data, timing); the trust bundle, the one
        // thing that does change, is followed on its own. SIGHUP must not
        // stop the server (its default action), so it is answered.
        crate::cli::on_sighup(|| {
            tracing::warn!("the server reads its configuration at start: restart it to apply changes (the trust bundle is followed live)")
        })?;
        // READY once the listener is bound and the API serves, not once Raft
        // has a leader: a quorum needs the other servers started too, and
        // an ordering between their units would deadlock a cold start.
        crate::systemd::ready();
        let supervisor = crate::systemd::supervise(shutdown.clone());
        let result = tokio::select! {
            r = server.wait() => r.context("server stopped"),
            () = shutdown.cancelled() => {
                server.shutdown(DRAIN).await;
                Ok(())
            }
        };
        // STOPPING=1 goes out when the drain starts (signal) or the server
        // failed on its own; wait for it so a fast exit does not lose it.
        shutdown.cancel();
        let _ = supervisor.await;
        spans.shutdown().await;
        result
    })
}

/// Mesh names from this server's replica of the registry: a server answers
/// with the endpoints' own addresses (callers with an agent get loopback
/// addresses from it instead).
struct StoreNames {
    db: trellis_federation::storage::Db,
    zone: String,
}

impl trellis_agent::dns::Names for StoreNames {
    fn lookup(
        &self,
        service: &str,
        namespace: &str,
        zone: Option<&str>,
    ) -> Option<(Vec<std::net::IpAddr>, Vec<u16>)> {
        // A query reads only this service's keys, not the whole registry.
        let of_service: Vec<_> =
            trellis_federation::state::endpoints_of(&self.db, namespace, service)
                .ok()?
                .into_iter()
                .filter(|e| zone.is_none_or(|z| e.zone == z))
                .collect();
        if of_service.is_empty() {
            return None;
        }
        let healthy: Vec<_> = of_service.iter().filter(|e| e.healthy).collect();
        // Nearest first: this server's zone when it has a healthy endpoint.
        let local: Vec<_> = healthy
            .iter()
            .filter(|e| e.zone == self.zone)
            .copied()
            .collect();
        let chosen = if local.is_empty() { healthy } else { local };
        let mut addrs: Vec<std::net::IpAddr> = chosen
            .iter()
            .filter_map(|e| e.address.parse().ok())
            .collect();
        addrs.sort();
        addrs.dedup();
        let mut ports: Vec<u16> = of_service
            .iter()
            .flat_map(|e| e.ports.iter().filter_map(|p| u16::try_from(*p).ok()))
            .collect();
        ports.sort_unstable();
        ports.dedup();
        Some((addrs, ports))
    }
}
