//! The server's configuration file (`trellis server --config FILE`).
//!
//! Strict TOML: unknown keys are refused, every field has a default stated
//! in its doc, and cross-field rules live in [`ServerConfig::validate`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use trellis_ca::TrustDomain;

use crate::node::NodeConfig;

/// An invalid configuration: which field, and why.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {field}: {reason}")]
pub struct ConfigError {
    /// The offending field (dotted path).
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

/// `trellis server` configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Set by `trellis zone join`, never read from a file: the Raft ids of
    /// the members when this server joined. Until its first snapshot brings
    /// the configuration, it takes Raft messages only from them.
    #[serde(skip)]
    pub join_members: Vec<u64>,
    /// Server name, unique in its zone. Required.
    #[serde(default)]
    pub name: String,
    /// Zone this server belongs to. Required.
    #[serde(default)]
    pub zone: String,
    /// Trust domain of the mesh. Default `trellis.local`.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// Data directory (Raft log and state). Default `/var/lib/trellis/server`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// gRPC listen address (API and Raft). Default `0.0.0.0:7400`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Address peers and clients reach this server on. Default: `listen`.
    #[serde(default)]
    pub advertise: Option<String>,
    /// A CA directory (`trellis ca init`): lets this server sign CSRs and
    /// issue its own certificate. Default: none.
    #[serde(default)]
    pub ca_dir: Option<PathBuf>,
    /// Answer mesh DNS here (UDP and TCP) from this server's replica:
    /// `svc.ns.<suffix>` with the addresses of the healthy endpoints of the
    /// nearest zone that has any, `svc.ns.zone.<suffix>` pinned to a zone,
    /// SRV records with the ports. Other names are refused. Default: off.
    #[serde(default)]
    pub dns: Option<SocketAddr>,
    /// DNS suffix of mesh names. Default `mesh`.
    #[serde(default = "default_dns_suffix")]
    pub dns_suffix: String,
    /// Credentials prefix (`PREFIX.crt`, `.key`, `.bundle`) for this server's
    /// identity. Default: issued from `ca_dir` at start.
    #[serde(default)]
    pub credentials: Option<PathBuf>,
    /// Make an empty data directory the first configuration of a cluster,
    /// whose voters are this server and `peers`. Default false.
    #[serde(default)]
    pub bootstrap: bool,
    /// The other voters of the first configuration (with `bootstrap`), and
    /// where to reach them. Default none.
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    /// Raft timing and log compaction.
    #[serde(default)]
    pub raft: RaftConfig,
    /// Hand freed heap back to the kernel (glibc builds; other allocators
    /// return it on their own) when at least this many MiB sit free in the
    /// allocator and a quarter of that was freed since the last time (or
    /// made resident while free heap held). 0 keeps it. Default 32.
    #[serde(default = "default_release_free_heap_mib")]
    pub release_free_heap_mib: u64,
}

/// A voter of the initial configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Its server name.
    pub name: String,
    /// Its zone. Default: this server's zone.
    #[serde(default)]
    pub zone: Option<String>,
    /// host:port of its gRPC listener.
    pub address: String,
}

/// Raft knobs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaftConfig {
    /// Milliseconds per tick. Default 100.
    #[serde(default = "default_tick_ms")]
    pub tick_ms: u64,
    /// Ticks without a leader before an election. Default 10 (1 s).
    #[serde(default = "default_election_ticks")]
    pub election_ticks: usize,
    /// Ticks between heartbeats; less than `election_ticks`. Default 2.
    #[serde(default = "default_heartbeat_ticks")]
    pub heartbeat_ticks: usize,
    /// Applied entries between log compactions. Default 10000.
    #[serde(default = "default_compact_after")]
    pub compact_after: u64,
    /// Milliseconds a write may wait to commit. Default 5000.
    #[serde(default = "default_proposal_timeout_ms")]
    pub proposal_timeout_ms: u64,
}

fn default_dns_suffix() -> String {
    "mesh".into()
}

fn default_trust_domain() -> String {
    "trellis.local".into()
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/trellis/server")
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 7400))
}
fn default_release_free_heap_mib() -> u64 {
    32
}
fn default_tick_ms() -> u64 {
    100
}
fn default_election_ticks() -> usize {
    10
}
fn default_heartbeat_ticks() -> usize {
    2
}
fn default_compact_after() -> u64 {
    10_000
}
fn default_proposal_timeout_ms() -> u64 {
    5_000
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            tick_ms: default_tick_ms(),
            election_ticks: default_election_ticks(),
            heartbeat_ticks: default_heartbeat_ticks(),
            compact_after: default_compact_after(),
            proposal_timeout_ms: default_proposal_timeout_ms(),
        }
    }
}

fn err(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        reason: reason.into(),
    }
}

impl ServerConfig {
    /// Parses TOML text; unknown keys and bad values are refused by name.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let field = e
                .span()
                .and_then(|s| text.get(s))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|| "file".into());
            err(&field, e.message().to_string())
        })
    }

    /// Every cross-field rule, in one place.
    pub fn validate(&self) -> Result<(), ConfigError> {
        crate::state::key_field("name", &self.name).map_err(|e| err("name", strip(&e)))?;
        crate::state::name_field("zone", &self.zone).map_err(|e| err("zone", strip(&e)))?;
        self.trust_domain()?;
        if self.ca_dir.is_none() && self.credentials.is_none() {
            return Err(err(
                "credentials",
                "set credentials (a prefix from `trellis ca issue`) or ca_dir",
            ));
        }
        if !self.peers.is_empty() && !self.bootstrap {
            return Err(err("peers", "only used with bootstrap = true"));
        }
        for (i, p) in self.peers.iter().enumerate() {
            crate::state::key_field("name", &p.name)
                .map_err(|e| err(&format!("peers[{i}].name"), strip(&e)))?;
            if p.address.is_empty() || !p.address.contains(':') {
                return Err(err(&format!("peers[{i}].address"), "write it as host:port"));
            }
        }
        if self.release_free_heap_mib > 1 << 20 {
            return Err(err(
                "release_free_heap_mib",
                "at most 1048576 (1 TiB); 0 keeps freed heap",
            ));
        }
        let r = &self.raft;
        if r.tick_ms == 0 {
            return Err(err("raft.tick_ms", "must be at least 1"));
        }
        if r.heartbeat_ticks == 0 || r.heartbeat_ticks >= r.election_ticks {
            return Err(err(
                "raft.heartbeat_ticks",
                format!(
                    "must be at least 1 and less than raft.election_ticks ({})",
                    r.election_ticks
                ),
            ));
        }
        if r.compact_after < 100 {
            return Err(err("raft.compact_after", "must be at least 100"));
        }
        Ok(())
    }

    /// The trust domain, parsed.
    pub fn trust_domain(&self) -> Result<TrustDomain, ConfigError> {
        self.trust_domain
            .parse()
            .map_err(|e: trellis_ca::SpiffeIdError| err("trust_domain", e.to_string()))
    }

    /// The advertised address.
    pub fn advertise(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }

    /// This server's Raft id (derived from zone and name).
    pub fn node_id(&self) -> u64 {
        crate::api::member_id(&self.zone, &self.name)
    }

    /// The node settings.
    pub fn node_config(&self) -> NodeConfig {
        NodeConfig {
            id: self.node_id(),
            tick: Duration::from_millis(self.raft.tick_ms),
            election_ticks: self.raft.election_ticks,
            heartbeat_ticks: self.raft.heartbeat_ticks,
            compact_after: self.raft.compact_after,
            proposal_timeout: Duration::from_millis(self.raft.proposal_timeout_ms),
            ..NodeConfig::default()
        }
    }
}

fn strip(e: &crate::FedError) -> String {
    let s = e.to_string();
    s.split_once(": ").map(|(_, r)| r.to_string()).unwrap_or(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_loads_and_validates() {
        let text = include_str!("../../configs/server.toml");
        let cfg = ServerConfig::from_toml(text).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.listen.port(), 7400);
    }

    #[test]
    fn an_unknown_key_is_refused_by_name() {
        let example = include_str!("../../configs/server.toml");
        // A misspelt top-level key, and one inside [raft].
        let e = ServerConfig::from_toml(&format!("electon = 1\n{example}")).unwrap_err();
        assert!(e.to_string().contains("electon"), "{e}");
        let e = ServerConfig::from_toml(&format!("{example}\nelection_timeout = 3\n")).unwrap_err();
        assert!(e.to_string().contains("election_timeout"), "{e}");
    }

    #[test]
    fn cross_field_rules_name_the_field() {
        let mut cfg = ServerConfig::from_toml(include_str!("../../configs/server.toml")).unwrap();
        cfg.raft.heartbeat_ticks = 20;
        assert_eq!(cfg.validate().unwrap_err().field, "raft.heartbeat_ticks");
        let mut cfg = ServerConfig::from_toml(include_str!("../../configs/server.toml")).unwrap();
        cfg.name = "Bad Name".into();
        assert_eq!(cfg.validate().unwrap_err().field, "name");
        let mut cfg = ServerConfig::from_toml(include_str!("../../configs/server.toml")).unwrap();
        cfg.release_free_heap_mib = 1 << 20;
        cfg.validate().unwrap();
        cfg.release_free_heap_mib = (1 << 20) + 1;
        assert_eq!(cfg.validate().unwrap_err().field, "release_free_heap_mib");
        let unset = ServerConfig::from_toml("").unwrap();
        assert_eq!(unset.release_free_heap_mib, 32);
    }
}
