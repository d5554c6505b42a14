//! The agent's configuration file (TOML). With `servers` set, the agent
//! lives on the federation store: it bootstraps its identities with a join
//! token, registers its services and learns the mesh from the watch. Without,
//! the services it calls are listed here (`upstreams`), which also works
//! alongside the store for services outside it.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use trellis_federation::policy::{self, Authorization, SpecError};
use trellis_proxy::config::ConfigError;
use trellis_proxy::protocol::Declared;

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
    /// Mesh DNS (UDP and TCP). Default `127.0.0.1:8600`: loopback, so only
    /// this host's workloads can use it (and its forwarding); another address
    /// must be written here.
    #[serde(default = "default_dns")]
    pub dns: SocketAddr,
    /// Queries forwarded to `dns_forward` and awaiting its answer at once;
    /// past it, other names are answered REFUSED at once. Default 256.
    #[serde(default = "default_dns_max_forwarded")]
    pub dns_max_forwarded: usize,
    /// How long a DNS client on TCP may take to send a whole query, and may
    /// stay idle between queries, before it is disconnected. Default `10s`.
    #[serde(
        default = "default_dns_tcp_timeout",
        with = "trellis_proxy::config::duration"
    )]
    pub dns_tcp_timeout: Duration,
    /// Where names outside the mesh are forwarded. Default: the first
    /// nameserver of /etc/resolv.conf that is not `dns`.
    #[serde(default)]
    pub dns_forward: Option<SocketAddr>,
    /// Federation servers (host:port). Set: the agent registers its
    /// services and follows the store. Empty: static configuration only.
    #[serde(default)]
    pub servers: Vec<String>,
    /// Where the agent keeps its keys and certificates (0700, files 0600).
    /// Default `/var/lib/trellis/agent`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// A single-use agent join token (`trellis zone token create --agent`),
    /// needed on the first start only. Prefer `join_token_file`.
    #[serde(default, skip_serializing)]
    pub join_token: Option<String>,
    /// A file holding the join token.
    #[serde(default)]
    pub join_token_file: Option<PathBuf>,
    /// The address other hosts reach this host's inbound on (registered
    /// in the store). Default: the `inbound` address when it is not a
    /// wildcard. Required with `servers` otherwise.
    #[serde(default)]
    pub advertise: Option<IpAddr>,
    /// How long a registration lives without renewal: a host that dies
    /// leaves routing after this long. Renewed every third. Default `10s`.
    #[serde(default = "default_lease", with = "trellis_proxy::config::duration")]
    pub lease: Duration,
    /// Lifetime of the certificates the agent asks for; each is renewed at
    /// half-life. Default `24h`.
    #[serde(default = "default_cert_ttl", with = "trellis_proxy::config::duration")]
    pub certificate_ttl: Duration,
    /// Other zones in order of preference when this zone has no healthy
    /// endpoint (nearest first); zones not listed come after, by name.
    #[serde(default)]
    pub zone_priority: Vec<String>,
    /// The /16 of 127.0.0.0/8 from which mesh services get their loopback
    /// addresses. Default `127.77.0.0`.
    #[serde(default = "default_outbound_network")]
    pub outbound_network: Ipv4Addr,
    /// This zone's gateway (TCP), through which other zones are reached.
    /// With `servers`, the zone's registered gateways are used as well.
    #[serde(default)]
    pub gateway: Option<SocketAddr>,
    /// For a zone without a gateway (an edge site): the link to another
    /// zone's gateway, over which this host is reached and reaches that zone.
    #[serde(default)]
    pub edge: Option<EdgeSettings>,
    /// Dial timeout towards endpoints and the gateway. Default `5s`.
    #[serde(default = "default_timeout", with = "trellis_proxy::config::duration")]
    pub connect_timeout: Duration,
    /// After SIGTERM, how long open connections may run before the agent
    /// exits anyway. Default `5s`.
    #[serde(default = "default_drain", with = "trellis_proxy::config::duration")]
    pub drain_deadline: Duration,
    /// How often the sidecar sends its golden-signal summaries (requests,
    /// errors, latency per edge) to a server of its zone. Between 100ms
    /// and 30s. Default `2s`.
    #[serde(
        default = "default_signals_interval",
        with = "trellis_proxy::config::duration"
    )]
    pub signals_interval: Duration,
    /// How often each service's credential files are checked for a renewed
    /// certificate, which new connections then use. Default `5s`.
    #[serde(default = "default_poll", with = "trellis_proxy::config::duration")]
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
    /// With `servers`: what this host's workloads call, as `service.namespace`
    /// or `*.namespace`. The store then sends this host only those services'
    /// endpoints and policies (plus its own namespaces', the zones and the
    /// gateways), and mesh DNS knows only those names: the host's memory and
    /// the servers' work grow with what it calls, not with the mesh. A
    /// `Route` that sends requests to another service needs that service
    /// listed too. Empty (the default): the whole mesh. Either way, a
    /// service's endpoints in other zones come only if an `Export` lets
    /// this host's zone reach it (or it has none): the gateways would
    /// refuse the rest.
    #[serde(default)]
    pub calls: Vec<String>,
    /// Who may call the local services (L4). No rule for a service: allow.
    #[serde(default)]
    pub authorization: Vec<AuthzRule>,
    /// The HTTP-aware proxy and its pooled connections.
    #[serde(default)]
    pub proxy: ProxySettings,
    /// Threads the agent's runtime runs on. Default 1: a sidecar shares
    /// its host with the app, and one thread serves tens of thousands of
    /// requests a second without the cross-thread wake-ups that add latency
    /// to every hop; raise it for a host whose app calls out heavily.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Spans (`[tracing]`); where they are sent is the standard `OTEL_*`
    /// environment.
    #[serde(default)]
    pub tracing: TracingSettings,
    /// One JSON line per request or opaque connection (`[access_log]`).
    #[serde(default)]
    pub access_log: AccessLogSettings,
}

/// Spans of this agent (`[tracing]`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TracingSettings {
    /// The share of new traces to sample (0 to 1); a request that arrives
    /// with a trace context follows its `sampled` flag instead. Unset: the
    /// environment's `OTEL_TRACES_SAMPLER` decides (by default, every trace).
    #[serde(default)]
    pub sampling: Option<f64>,
}

/// Access logs (`[access_log]`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogSettings {
    /// `off` (the default), `sampled` or `full`.
    #[serde(default)]
    pub mode: AccessLogMode,
    /// With `sampled`: the share of requests and connections logged.
    #[serde(default = "default_access_sample")]
    pub sample: f64,
    /// A file to append to (reopened on reload, for rotation); unset:
    /// stdout, which systemd sends to the journal.
    #[serde(default)]
    pub path: Option<PathBuf>,
}

/// How much an agent logs of what it serves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogMode {
    /// Nothing.
    #[default]
    Off,
    /// A random share (`sample`).
    Sampled,
    /// Every request and connection.
    Full,
}

fn default_access_sample() -> f64 {
    0.01
}

/// How the sidecar carries traffic (`[proxy]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySettings {
    /// How long a new outbound connection may stay silent before it is
    /// taken for a protocol in which the server speaks first (and spliced
    /// as TCP). Default `100ms`.
    #[serde(
        default = "default_detect_timeout",
        with = "trellis_proxy::config::duration"
    )]
    pub detect_timeout: Duration,
    /// Streams one pooled connection to another sidecar carries at once;
    /// past it a second connection opens. Default 100.
    #[serde(default = "default_pool_streams")]
    pub pool_max_streams: u32,
    /// A pooled connection with no stream for this long closes. Default `60s`.
    #[serde(
        default = "default_pool_idle",
        with = "trellis_proxy::config::duration"
    )]
    pub pool_idle_timeout: Duration,
    /// A pooled connection this old takes no new streams. Default `30m`.
    #[serde(default = "default_pool_age", with = "trellis_proxy::config::duration")]
    pub pool_max_age: Duration,
    /// Request line and headers an HTTP client may send, in bytes
    /// (HTTP/1 buffer, HTTP/2 header list). Default 65536.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Largest request body, in bytes; over it the client gets 413. Default:
    /// no limit (bodies stream through in bounded memory).
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
    /// Inbound: add `x-forwarded-client-cert` (`By=<this service's ID>;
    /// URI=<the caller's ID>`) to requests for the local app, replacing any
    /// the caller sent. Default false: the app gets no header it did not
    /// ask for.
    #[serde(default)]
    pub forward_client_cert: bool,
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            detect_timeout: default_detect_timeout(),
            pool_max_streams: default_pool_streams(),
            pool_idle_timeout: default_pool_idle(),
            pool_max_age: default_pool_age(),
            max_header_bytes: default_max_header_bytes(),
            max_body_bytes: None,
            forward_client_cert: false,
        }
    }
}

/// `port_protocols` keys are ports of the service.
fn check_port_protocols(
    at: &str,
    map: &BTreeMap<String, Declared>,
    ports: &[u16],
) -> Result<(), ConfigError> {
    for k in map.keys() {
        if !k.parse::<u16>().is_ok_and(|p| ports.contains(&p)) {
            return Err(ConfigError {
                field: format!("{at}.port_protocols.{k}"),
                reason: format!("not one of the ports {ports:?}"),
            });
        }
    }
    Ok(())
}

impl LocalService {
    /// The `trellis.port-protocols` label value, if any port differs.
    pub fn port_protocols_label(&self) -> Option<String> {
        (!self.port_protocols.is_empty()).then(|| {
            self.port_protocols
                .iter()
                .map(|(p, d)| format!("{p}={d}"))
                .collect::<Vec<_>>()
                .join(",")
        })
    }
}

fn default_threads() -> usize {
    1
}
fn default_detect_timeout() -> Duration {
    Duration::from_millis(100)
}
fn default_pool_streams() -> u32 {
    trellis_proxy::hbone::DEFAULT_MAX_STREAMS
}
fn default_pool_idle() -> Duration {
    Duration::from_secs(60)
}
fn default_pool_age() -> Duration {
    Duration::from_secs(30 * 60)
}
fn default_max_header_bytes() -> usize {
    64 * 1024
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
    /// (`spiffe://<td>/zone/<zone>/agent/<name>`). Default with `servers`:
    /// the node identity from the join. Required otherwise.
    #[serde(default)]
    pub credentials: Option<PathBuf>,
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
    /// Service account of its identity (`spiffe://TD/ns/NS/sa/ACCOUNT`).
    /// Default: the service name.
    #[serde(default)]
    pub account: Option<String>,
    /// Path prefix of its credentials (`.crt`, `.key`, `.bundle`). Default
    /// with `servers`: `data_dir/NAMESPACE.ACCOUNT`, issued at the join.
    /// Required otherwise.
    #[serde(default)]
    pub credentials: Option<PathBuf>,
    /// Ports the app listens on (and that callers use). Required. Empty for
    /// an app that only calls (a Job, a batch task): it gets its identity
    /// for its calls, and registers nothing and takes no calls.
    pub ports: Vec<u16>,
    /// The address the app listens on. Default `127.0.0.1`.
    #[serde(default = "default_app_address")]
    pub address: IpAddr,
    /// What its ports speak, as callers' sidecars treat it: `detect`
    /// (the default: HTTP/1.1 and HTTP/2 are recognised by their first
    /// bytes, anything else is TCP), `http`, `http2`, `grpc` or `tcp`.
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// Single ports that speak something else (`{ 5432 = "tcp" }`).
    #[serde(default)]
    pub port_protocols: BTreeMap<String, Declared>,
    /// Labels registered with the endpoint (subsets, versions).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
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
    #[serde(default = "default_interval", with = "trellis_proxy::config::duration")]
    pub interval: Duration,
    /// A check that takes longer fails. Default `2s`.
    #[serde(
        default = "default_check_timeout",
        with = "trellis_proxy::config::duration"
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
    /// What its ports speak: `detect` (default), `http`, `http2`, `grpc`
    /// or `tcp`.
    #[serde(default)]
    pub protocol: Declared,
    /// Single ports that speak something else (`{ 5432 = "tcp" }`).
    #[serde(default)]
    pub port_protocols: BTreeMap<String, Declared>,
}

/// Who may call one local service, and with which requests: the store's
/// `Authorization` document, written in the file. Deny wins over allow;
/// with any allow entry, what no allow entry matches is refused.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzRule {
    /// The local service (`name.namespace`).
    pub service: String,
    /// SPIFFE IDs, `ns:NAMESPACE` for every workload of a namespace, or
    /// tables with `from`, `methods`, `paths` and `headers`.
    #[serde(default)]
    pub allow: Vec<serde_json::Value>,
    /// The same forms as `allow`.
    #[serde(default)]
    pub deny: Vec<serde_json::Value>,
}

impl LocalService {
    /// The service account of its identity.
    pub fn account(&self) -> &str {
        self.account.as_deref().unwrap_or(&self.name)
    }
}

impl AgentConfig {
    /// Whether the agent follows the federation store.
    pub fn uses_store(&self) -> bool {
        !self.servers.is_empty()
    }

    /// Where service `s`'s credentials live.
    pub fn credentials_of(&self, s: &LocalService) -> PathBuf {
        s.credentials.clone().unwrap_or_else(|| {
            self.data_dir
                .join(format!("{}.{}", s.namespace, s.account()))
        })
    }

    /// Where this host's own (node) credentials live.
    pub fn node_credentials(&self) -> PathBuf {
        match self.edge.as_ref().and_then(|e| e.credentials.clone()) {
            Some(p) => p,
            None => self.data_dir.join("node"),
        }
    }

    /// The address registered for this host's inbound.
    pub fn advertised(&self) -> Option<IpAddr> {
        self.advertise
            .or_else(|| Some(self.inbound.ip()).filter(|ip| !ip.is_unspecified()))
    }

    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let cfg: Self = ConfigError::parse_toml(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// What the store sends this host (see `calls`), as exported to its
    /// zone. A refusal names the entry (`calls[1]`) as written.
    pub fn scope(&self) -> Result<trellis_federation::scope::Scope, ConfigError> {
        let scope = self.calls_scope()?;
        // The zone is a checked label (`validate`).
        scope.with_zone(&self.zone).map_err(|reason| ConfigError {
            field: "zone".into(),
            reason,
        })
    }

    fn calls_scope(&self) -> Result<trellis_federation::scope::Scope, ConfigError> {
        use trellis_federation::scope::Scope;
        if self.calls.is_empty() {
            return Ok(Scope::all());
        }
        let mut namespaces: Vec<String> =
            self.services.iter().map(|s| s.namespace.clone()).collect();
        let mut services = Vec::new();
        for (i, c) in self.calls.iter().enumerate() {
            let field = format!("calls[{i}]");
            let entry = match c.split_once('.') {
                Some(("*", ns)) => Scope::new([ns.to_string()], []),
                Some((name, ns)) => Scope::new([], [format!("{ns}/{name}")]),
                None => Err(String::new()),
            };
            if entry.is_err() {
                return Err(ConfigError {
                    field,
                    reason: format!(
                        "{c:?} is neither service.namespace nor *.namespace (DNS labels: lowercase letters, digits and '-')"
                    ),
                });
            }
            match c.split_once('.') {
                Some(("*", ns)) => namespaces.push(ns.to_string()),
                Some((name, ns)) => services.push(format!("{ns}/{name}")),
                None => {}
            }
        }
        Scope::new(namespaces, services).map_err(|reason| ConfigError {
            field: "calls".into(),
            reason,
        })
    }

    /// Cross-field rules; every refusal names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field: String, reason: String| Err(ConfigError { field, reason });
        label("name", &self.name)?;
        label("zone", &self.zone)?;
        if !(1..=64).contains(&self.threads) {
            return err("threads".into(), "must be between 1 and 64".into());
        }
        if self.signals_interval < Duration::from_millis(100)
            || self.signals_interval > Duration::from_secs(30)
        {
            return err(
                "signals_interval".into(),
                "must be between 100ms and 30s (servers keep 60s of summaries)".into(),
            );
        }
        if let Some(r) = self.tracing.sampling
            && !(0.0..=1.0).contains(&r)
        {
            return err("tracing.sampling".into(), "must be between 0 and 1".into());
        }
        if !(0.0..=1.0).contains(&self.access_log.sample) {
            return err("access_log.sample".into(), "must be between 0 and 1".into());
        }
        if let Some(p) = &self.access_log.path
            && p.file_name().is_none()
        {
            return err(
                "access_log.path".into(),
                format!("{} does not name a file", p.display()),
            );
        }
        let p = &self.proxy;
        if p.detect_timeout.is_zero() || p.detect_timeout > Duration::from_secs(10) {
            return err(
                "proxy.detect_timeout".into(),
                "must be between 1ms and 10s (a server-first protocol waits this long)".into(),
            );
        }
        if !(1..=10_000).contains(&p.pool_max_streams) {
            return err(
                "proxy.pool_max_streams".into(),
                "must be between 1 and 10000".into(),
            );
        }
        if p.pool_idle_timeout.is_zero() || p.pool_max_age.is_zero() {
            return err(
                "proxy.pool_idle_timeout".into(),
                "idle timeout and max age must be above zero".into(),
            );
        }
        if !(1024..=1024 * 1024).contains(&p.max_header_bytes) {
            return err(
                "proxy.max_header_bytes".into(),
                "must be between 1024 and 1048576".into(),
            );
        }
        if p.max_body_bytes == Some(0) {
            return err(
                "proxy.max_body_bytes".into(),
                "0 would refuse every body; leave it out for no limit".into(),
            );
        }
        if let Err(e) = self.trust_domain.parse::<trellis_ca::TrustDomain>() {
            return err("trust_domain".into(), e.to_string());
        }
        if self.uses_store() {
            trellis_proxy::config::check_store(&self.servers, self.lease)?;
            if self.advertised().is_none() {
                return err(
                    "advertise".into(),
                    "the inbound listens on a wildcard address; set the address other hosts reach this one on".into(),
                );
            }
            if self.certificate_ttl < Duration::from_secs(10) {
                return err("certificate_ttl".into(), "must be at least 10s".into());
            }
            if self.join_token.is_some() && self.join_token_file.is_some() {
                return err(
                    "join_token".into(),
                    "set one of join_token and join_token_file".into(),
                );
            }
        } else {
            for (i, s) in self.services.iter().enumerate() {
                if s.credentials.is_none() {
                    return err(
                        format!("services[{i}].credentials"),
                        "required without servers (with servers, the join issues them)".into(),
                    );
                }
            }
            if self.edge.as_ref().is_some_and(|e| e.credentials.is_none()) {
                return err(
                    "edge.credentials".into(),
                    "required without servers (with servers, the join issues them)".into(),
                );
            }
        }
        if self.dns_max_forwarded == 0 {
            return err("dns_max_forwarded".into(), "must be at least 1".into());
        }
        if self.dns_tcp_timeout.is_zero() {
            return err("dns_tcp_timeout".into(), "must be more than zero".into());
        }
        if self.outbound_network.octets()[0] != 127 {
            return err(
                "outbound_network".into(),
                format!("{} is not in 127.0.0.0/8", self.outbound_network),
            );
        }
        for (i, z) in self.zone_priority.iter().enumerate() {
            label(&format!("zone_priority[{i}]"), z)?;
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
            label(&format!("services[{i}].account"), s.account())?;
            if s.protocol.parse::<Declared>().is_err() {
                return err(
                    format!("services[{i}].protocol"),
                    format!(
                        "{:?} is not one of detect, http, http2, grpc, tcp",
                        s.protocol
                    ),
                );
            }
            check_port_protocols(&format!("services[{i}]"), &s.port_protocols, &s.ports)?;
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
            if s.ports.contains(&0) {
                return err(format!("services[{i}].ports"), "0 is not a port".into());
            }
            if s.ports.is_empty() && s.health.is_some() {
                return err(
                    format!("services[{i}].health"),
                    "a service with no ports (a client: a Job, a batch task) has nothing to check"
                        .into(),
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
        if !self.calls.is_empty() {
            self.calls_scope()?;
        }
        let mut listeners = HashSet::new();
        for (i, u) in self.upstreams.iter().enumerate() {
            label(&format!("upstreams[{i}].name"), &u.name)?;
            check_port_protocols(&format!("upstreams[{i}]"), &u.port_protocols, &u.ports)?;
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
            check_authz_rule(r).map_err(|e| ConfigError {
                field: format!("authorization[{i}].{}", e.field),
                reason: e.reason,
            })?;
        }
        Ok(())
    }
}

/// Checks one rule of the file with the store's own `Authorization` parser,
/// so a rule here and a document in the store follow one definition.
pub(crate) fn check_authz_rule(r: &AuthzRule) -> Result<Authorization, SpecError> {
    let spec = serde_json::json!({"service": r.service, "allow": r.allow, "deny": r.deny});
    Authorization::from_spec(&spec)
}

/// Namespaces, services, zones and host names: DNS labels, the store's rule.
fn label(field: &str, v: &str) -> Result<(), ConfigError> {
    policy::check_label(v).map_err(|e| ConfigError {
        field: field.to_owned(),
        reason: format!("{v:?} {e}"),
    })
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/trellis/agent")
}
fn default_app_address() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}
fn default_cert_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_lease() -> Duration {
    Duration::from_secs(10)
}
fn default_outbound_network() -> Ipv4Addr {
    Ipv4Addr::new(127, 77, 0, 0)
}
fn default_protocol() -> String {
    "detect".into()
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
fn default_dns_max_forwarded() -> usize {
    crate::dns::Limits::default().max_forwarded
}
fn default_dns_tcp_timeout() -> Duration {
    crate::dns::Limits::default().tcp_timeout
}
fn default_signals_interval() -> Duration {
    crate::signals::DEFAULT_INTERVAL
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_interval_defaults_to_two_seconds_and_is_held_to_its_range() {
        let base = "name = \"h\"\nzone = \"east\"\nservers = [\"127.0.0.1:7400\"]\nadvertise = \"10.0.0.1\"\n\
                    [[services]]\nname = \"web\"\nnamespace = \"shop\"\nports = [8080]\n";
        let cfg = AgentConfig::from_toml(base).unwrap();
        assert_eq!(cfg.signals_interval, Duration::from_secs(2));
        for bad in ["10ms", "31s"] {
            let e = AgentConfig::from_toml(&base.replace(
                "zone = \"east\"\n",
                &format!("zone = \"east\"\nsignals_interval = \"{bad}\"\n"),
            ))
            .unwrap_err();
            assert_eq!(e.field, "signals_interval", "{bad}: {e:?}");
        }
    }

    #[test]
    fn a_service_without_ports_only_calls_and_has_nothing_to_health_check() {
        let base = "name = \"h\"\nzone = \"east\"\nservers = [\"127.0.0.1:7400\"]\nadvertise = \"10.0.0.1\"\n\
                    [[services]]\nname = \"report\"\nnamespace = \"shop\"\nports = []\n";
        let cfg = AgentConfig::from_toml(base).unwrap();
        assert!(cfg.services[0].ports.is_empty());
        let e =
            AgentConfig::from_toml(&format!("{base}health = {{ kind = \"tcp\" }}\n")).unwrap_err();
        assert_eq!(e.field, "services[0].health", "{e:?}");
        let e = AgentConfig::from_toml(&base.replace("ports = []", "ports = [0]")).unwrap_err();
        assert_eq!(e.field, "services[0].ports", "{e:?}");
    }
}
