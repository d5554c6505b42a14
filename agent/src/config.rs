//! The agent's configuration file (TOML). Until the federation store feeds
//! the agent, the mesh services it calls are listed here too.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use trellis_gateway::config::ConfigError;
use trellis_gateway::tunnel::check_label;

/// Everything `trellis agent` needs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This host's name. Required.
    pub name: String,
    /// The zone this host is in. Required.
    pub zone: String,
    /// Trust domain. Default `trellis.local`.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// DNS suffix of mesh names. Default `mesh`.
    #[serde(default = "default_suffix")]
    pub dns_suffix: String,
    /// Sidecar inbound (mutual TLS from other workloads). Default `0.0.0.0:15006`.
    #[serde(default = "default_inbound")]
    pub inbound: SocketAddr,
    /// Admin address: `/metrics`, `/ready`, `/healthz`, `/config_dump`.
    /// Default `127.0.0.1:15020`.
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
    /// Mesh DNS (UDP and TCP). Default `127.0.0.1:8600`.
    #[serde(default = "default_dns")]
    pub dns: SocketAddr,
    /// Where names outside the mesh are forwarded. Default: the first
    /// nameserver of /etc/resolv.conf that is not `dns`.
    #[serde(default)]
    pub dns_forward: Option<SocketAddr>,
    /// This zone's gateway (TCP), through which other zones are reached.
    #[serde(default)]
    pub gateway: Option<SocketAddr>,
    /// For a zone without a gateway (an edge site): the link to another
    /// zone's gateway, over which this host is reached and reaches that zone.
    #[serde(default)]
    pub edge: Option<EdgeSettings>,
    /// Dial timeout towards endpoints and the gateway. Default `5s`.
    #[serde(
        default = "default_timeout",
        with = "trellis_gateway::config::duration"
    )]
    pub connect_timeout: Duration,
    /// After SIGTERM, how long open connections may run before the agent
    /// exits anyway. Default `5s`.
    #[serde(default = "default_drain", with = "trellis_gateway::config::duration")]
    pub drain_deadline: Duration,
    /// How often each service's credential files are checked for a renewed
    /// certificate, which new connections then use. Default `5s`.
    #[serde(default = "default_poll", with = "trellis_gateway::config::duration")]
    pub credentials_poll: Duration,
    /// The local service whose identity outbound calls carry
    /// (`name.namespace`). Default: the first service.
    #[serde(default)]
    pub outbound_identity: Option<String>,
    /// Workloads on this host.
    #[serde(default)]
    pub services: Vec<LocalService>,
    /// Mesh services this host calls.
    #[serde(default)]
    pub upstreams: Vec<Upstream>,
    /// Who may call the local services (L4). No rule for a service: allow.
    #[serde(default)]
    pub authorization: Vec<AuthzRule>,
}

/// How an agent of an edge zone reaches the mesh.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeSettings {
    /// The zone of the gateway it dials. Required.
    pub gateway_zone: String,
    /// That gateway's address (UDP, QUIC). Required.
    pub gateway: SocketAddr,
    /// Path prefix of this host's agent credentials
    /// (`spiffe://<td>/zone/<zone>/agent/<name>`). Required.
    pub credentials: PathBuf,
    /// Local UDP address of the link. Default `0.0.0.0:0`.
    #[serde(default = "default_edge_bind")]
    pub bind: SocketAddr,
}

/// A workload on this host.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LocalService {
    /// Service name. Required.
    pub name: String,
    /// Namespace. Required.
    pub namespace: String,
    /// Path prefix of its credentials (`.crt`, `.key`, `.bundle`). Required.
    pub credentials: PathBuf,
    /// Ports the app listens on, on 127.0.0.1. Required, at least one.
    pub ports: Vec<u16>,
    /// How to tell whether the app is healthy. Default: none (always healthy).
    #[serde(default)]
    pub health: Option<HealthCheck>,
}

/// A health check of a local app. An unhealthy app gets no inbound
/// connections: callers are refused at once instead of timing out.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// `tcp` (connect to the first port), `http` (GET `path` on the first
    /// port, any 2xx is healthy) or `command` (exit status 0 is healthy).
    pub kind: HealthKind,
    /// For `http`: the path. Default `/`.
    #[serde(default = "default_path")]
    pub path: String,
    /// For `command`: the program and its arguments.
    #[serde(default)]
    pub command: Vec<String>,
    /// Time between checks. Default `5s`.
    #[serde(
        default = "default_interval",
        with = "trellis_gateway::config::duration"
    )]
    pub interval: Duration,
    /// A check that takes longer fails. Default `2s`.
    #[serde(
        default = "default_check_timeout",
        with = "trellis_gateway::config::duration"
    )]
    pub timeout: Duration,
    /// Consecutive failures before the app is unhealthy. Default 2.
    #[serde(default = "default_threshold")]
    pub unhealthy_threshold: u32,
    /// Consecutive successes before it is healthy again. Default 1.
    #[serde(default = "default_one")]
    pub healthy_threshold: u32,
}

/// The kinds of health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    /// A TCP connect.
    Tcp,
    /// An HTTP/1.1 GET.
    Http,
    /// A program's exit status.
    Command,
}

/// A mesh service this host calls, and where it runs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// Service name. Required.
    pub name: String,
    /// Namespace. Required.
    pub namespace: String,
    /// Loopback address the agent listens on for it (e.g. 127.77.0.2).
    pub address: IpAddr,
    /// Its ports. Required, at least one.
    pub ports: Vec<u16>,
    /// SPIFFE IDs its workloads may present. Required, at least one.
    pub identities: Vec<String>,
    /// Sidecar inbound addresses of its endpoints in this zone.
    #[serde(default)]
    pub endpoints: Vec<SocketAddr>,
    /// Other zones that serve it, nearest first (reached through `gateway`).
    #[serde(default)]
    pub zones: Vec<String>,
}

/// Who may call one local service. Deny wins over allow; with any allow
/// entry, callers not allowed are refused.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzRule {
    /// The local service (`name.namespace`).
    pub service: String,
    /// SPIFFE IDs, or `ns:NAMESPACE` for every workload of a namespace.
    #[serde(default)]
    pub allow: Vec<String>,
    /// SPIFFE IDs, or `ns:NAMESPACE`.
    #[serde(default)]
    pub deny: Vec<String>,
}

impl AgentConfig {
    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(text).map_err(|e| ConfigError::toml(text, &e))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Cross-field rules; every refusal names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field: String, reason: String| Err(ConfigError { field, reason });
        label("name", &self.name)?;
        label("zone", &self.zone)?;
        if let Err(e) = self.trust_domain.parse::<trellis_ca::TrustDomain>() {
            return err("trust_domain".into(), e.to_string());
        }
        if self.services.is_empty() {
            return err(
                "services".into(),
                "at least one local service is needed (its identity is the agent's)".into(),
            );
        }
        let mut names = HashSet::new();
        for (i, s) in self.services.iter().enumerate() {
            label(&format!("services[{i}].name"), &s.name)?;
            label(&format!("services[{i}].namespace"), &s.namespace)?;
            if !names.insert(format!("{}.{}", s.name, s.namespace)) {
                return err(format!("services[{i}]"), "listed twice".into());
            }
            if let Some(h) = &s.health {
                let f = |k: &str| format!("services[{i}].health.{k}");
                if h.interval.is_zero() || h.timeout.is_zero() {
                    return err(
                        f("interval"),
                        "interval and timeout must be more than zero".into(),
                    );
                }
                if h.timeout > h.interval {
                    return err(f("timeout"), "must not be longer than the interval".into());
                }
                if h.unhealthy_threshold == 0 || h.healthy_threshold == 0 {
                    return err(
                        f("unhealthy_threshold"),
                        "thresholds must be at least 1".into(),
                    );
                }
                if h.kind == HealthKind::Command && h.command.is_empty() {
                    return err(
                        f("command"),
                        "a command check needs a program to run".into(),
                    );
                }
                if h.kind == HealthKind::Http && !h.path.starts_with('/') {
                    return err(f("path"), "must start with '/'".into());
                }
            }
            if s.ports.is_empty() || s.ports.contains(&0) {
                return err(
                    format!("services[{i}].ports"),
                    "needs at least one port, none of them 0".into(),
                );
            }
        }
        if let Some(o) = &self.outbound_identity
            && !names.contains(o)
        {
            return err(
                "outbound_identity".into(),
                format!("{o:?} is not one of the local services"),
            );
        }
        let mut listeners = HashSet::new();
        for (i, u) in self.upstreams.iter().enumerate() {
            label(&format!("upstreams[{i}].name"), &u.name)?;
            label(&format!("upstreams[{i}].namespace"), &u.namespace)?;
            if !u.address.is_loopback() {
                return err(
                    format!("upstreams[{i}].address"),
                    format!("{} is not a loopback address", u.address),
                );
            }
            if u.ports.is_empty() || u.ports.contains(&0) {
                return err(
                    format!("upstreams[{i}].ports"),
                    "needs at least one port, none of them 0".into(),
                );
            }
            for p in &u.ports {
                if !listeners.insert((u.address, *p)) {
                    return err(
                        format!("upstreams[{i}]"),
                        format!("{}:{p} is used twice", u.address),
                    );
                }
            }
            if u.identities.is_empty() {
                return err(
                    format!("upstreams[{i}].identities"),
                    "list at least one SPIFFE ID".into(),
                );
            }
            for (j, id) in u.identities.iter().enumerate() {
                if let Err(e) = id.parse::<trellis_ca::SpiffeId>() {
                    return err(format!("upstreams[{i}].identities[{j}]"), e.to_string());
                }
            }
            for (j, z) in u.zones.iter().enumerate() {
                label(&format!("upstreams[{i}].zones[{j}]"), z)?;
            }
            if let Some(e) = &self.edge
                && let Some(z) = u.zones.iter().find(|z| **z != e.gateway_zone)
            {
                return err(
                    format!("upstreams[{i}].zones"),
                    format!(
                        "an edge agent reaches only its gateway's zone {:?}, not {z:?}",
                        e.gateway_zone
                    ),
                );
            }
            if !u.zones.is_empty() && self.gateway.is_none() && self.edge.is_none() {
                return err(
                    "gateway".into(),
                    format!(
                        "upstreams[{i}] is served in other zones, which are reached through the zone's gateway"
                    ),
                );
            }
            if u.endpoints.is_empty() && u.zones.is_empty() {
                return err(
                    format!("upstreams[{i}]"),
                    "has neither endpoints nor zones".into(),
                );
            }
        }
        if let Some(e) = &self.edge {
            label("edge.gateway_zone", &e.gateway_zone)?;
            if e.gateway_zone == self.zone {
                return err(
                    "edge.gateway_zone".into(),
                    "must be another zone than this host's".into(),
                );
            }
            if self.gateway.is_some() {
                return err("edge".into(), "a host with a zone gateway does not need an edge link; set one of gateway and edge".into());
            }
        }
        for (i, r) in self.authorization.iter().enumerate() {
            if !names.contains(&r.service) {
                return err(
                    format!("authorization[{i}].service"),
                    format!("{:?} is not a local service", r.service),
                );
            }
            for (j, p) in r.allow.iter().chain(&r.deny).enumerate() {
                let ok = match p.strip_prefix("ns:") {
                    Some(ns) => check_label("namespace", ns).is_ok(),
                    None => p.parse::<trellis_ca::SpiffeId>().is_ok(),
                };
                if !ok {
                    return err(
                        format!("authorization[{i}] principal {j}"),
                        format!("{p:?} is neither a SPIFFE ID nor ns:NAMESPACE"),
                    );
                }
            }
        }
        Ok(())
    }
}

fn label(field: &str, v: &str) -> Result<(), ConfigError> {
    check_label("name", v).map_err(|e| ConfigError {
        field: field.to_owned(),
        reason: format!("{v:?}: {e}"),
    })
}

fn default_trust_domain() -> String {
    "trellis.local".into()
}
fn default_suffix() -> String {
    "mesh".into()
}
fn default_inbound() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 15006))
}
fn default_edge_bind() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}
fn default_path() -> String {
    "/".into()
}
fn default_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_check_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_threshold() -> u32 {
    2
}
fn default_one() -> u32 {
    1
}
fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15020))
}
fn default_dns() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8600))
}
fn default_drain() -> Duration {
    Duration::from_secs(5)
}
fn default_poll() -> Duration {
    Duration::from_secs(5)
}
fn default_timeout() -> Duration {
    Duration::from_secs(5)
}
