//! The gateway's configuration file (TOML), with defaults and validation in
//! one place. See `configs/gateway.toml` for an annotated example.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::tunnel::check_label;

pub use trellis_proxy::config::{ConfigError, check_store, duration};

/// Everything `trellis gateway` needs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// This gateway's name, unique within its zone. Required.
    pub name: String,
    /// The zone this gateway serves. Required.
    pub zone: String,
    /// Trust domain of the mesh. Default `trellis.local`.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// DNS suffix of mesh names in SNI. Default `mesh`.
    #[serde(default = "default_suffix")]
    pub dns_suffix: String,
    /// Address for QUIC (UDP) from peer gateways and TCP from the zone
    /// (SNI passthrough) and from peers on the fallback. Default `0.0.0.0:15443`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// TCP address for this zone's workloads (SNI passthrough). Set: `listen`
    /// serves peers only (QUIC, and the TLS fallback with a gateway
    /// certificate) and closes any workload connection, so that a client
    /// reaching the peer-facing port cannot pass for this zone and slip
    /// past another zone's `Export` policy; bind this one where only the
    /// zone reaches it. Registered with the store for the zone's agents.
    /// Default: none (workloads and peers share `listen`, and anyone who
    /// reaches it is taken for this zone).
    #[serde(default)]
    pub zone_listen: Option<SocketAddr>,
    /// Admin address: `/metrics`, `/ready`, `/healthz`, `/config_dump`.
    /// Default `127.0.0.1:15021`.
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
    /// Path prefix of this gateway's credentials: `PREFIX.crt`, `PREFIX.key`,
    /// `PREFIX.bundle` (as `trellis ca issue --out PREFIX` writes them). Required.
    pub credentials: PathBuf,
    /// How often the credential files are checked for a renewed certificate
    /// or bundle, which is then used for new handshakes. Default `5s`.
    #[serde(default = "default_credentials_poll", with = "duration")]
    pub credentials_poll: Duration,
    /// How long in-flight streams may run after SIGTERM before they are cut.
    /// Default `5s`.
    #[serde(default = "default_drain", with = "duration")]
    pub drain_deadline: Duration,
    /// Concurrent tunnelled streams (both directions) before new ones are
    /// refused as overloaded. Default 10000.
    #[serde(default = "default_max_streams")]
    pub max_streams: usize,
    /// Timeout for connecting to a peer gateway or a local endpoint. Default `5s`.
    #[serde(default = "default_connect_timeout", with = "duration")]
    pub connect_timeout: Duration,
    /// How long a new connection may take to finish its handshake: a
    /// workload's ClientHello, a peer's TLS handshake on the TCP fallback, a
    /// QUIC handshake. A client that sends nothing, or stalls part way, is
    /// dropped after this. Default `10s`.
    #[serde(default = "default_handshake_timeout", with = "duration")]
    pub handshake_timeout: Duration,
    /// Connections (TCP and QUIC together) allowed to be in their handshake
    /// at once. Past it, new ones are closed at once and counted in
    /// `trellis_gateway_handshakes_refused_total`, so unauthenticated
    /// clients cannot hold more than this many tasks and buffers.
    /// Default 1024.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: usize,
    /// Exports deny by default: with the store, a service with no `Export`
    /// policy is reachable from this zone only, not from other zones.
    /// Default false (such a service is exported to every zone).
    #[serde(default)]
    pub default_deny_exports: bool,
    /// QUIC transport settings.
    #[serde(default)]
    pub quic: QuicSettings,
    /// Federation servers (host:port). Set: the gateway registers itself as
    /// a gateway of its zone, learns the other zones' gateways and its
    /// zone's endpoints from the store, and renews its certificate there.
    #[serde(default)]
    pub servers: Vec<String>,
    /// The address other zones' gateways and this zone's sidecars reach
    /// this gateway on (registered in the store). Default: `listen`, when it
    /// is not a wildcard address. Required with `servers` otherwise.
    #[serde(default)]
    pub advertise: Option<SocketAddr>,
    /// How long the registration lives without renewal: a gateway that dies
    /// leaves routing after this long. Default `5s`.
    #[serde(default = "default_lease", with = "duration")]
    pub lease: Duration,
    /// Gateways of other zones (in addition to those in the store).
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    /// Zones without a gateway of their own (edge sites) whose agents dial
    /// this gateway over QUIC and are reached back over that connection.
    /// Default: none.
    #[serde(default)]
    pub edge_zones: Vec<String>,
    /// Services of this zone that peers may reach.
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
}

/// QUIC flow control and liveness. The defaults size windows for about
/// 1 Gbit/s at 50 ms round trip (bandwidth × delay ≈ 6 MB per stream).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QuicSettings {
    /// Keep-alive ping interval, so NAT bindings and idle peers stay up. Default `5s`.
    #[serde(default = "default_keep_alive", with = "duration")]
    pub keep_alive: Duration,
    /// Connection closed after this long without any packet. Default `30s`.
    #[serde(default = "default_idle", with = "duration")]
    pub idle_timeout: Duration,
    /// Bytes a peer may send on one stream before we read them. Default 8 MiB.
    #[serde(default = "default_stream_window")]
    pub stream_receive_window: u32,
    /// Bytes a peer may send across all streams before we read them. Default 64 MiB.
    #[serde(default = "default_conn_window")]
    pub receive_window: u32,
    /// Bytes we buffer for sending across all streams. Default 64 MiB.
    #[serde(default = "default_conn_window")]
    pub send_window: u32,
    /// Concurrent streams a peer may open on one connection. Default 4096.
    #[serde(default = "default_quic_streams")]
    pub max_concurrent_streams: u32,
    /// Generic segmentation offload for UDP sends, where the kernel has it. Default true.
    #[serde(default = "default_true")]
    pub gso: bool,
}

/// How to reach a peer zone's gateway.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The peer's zone. Required, unique, not our own.
    pub zone: String,
    /// The peer gateway's address (UDP for QUIC, TCP for the fallback). Required.
    pub address: SocketAddr,
    /// The peer gateway's name, if only that one gateway identity is to be
    /// accepted; otherwise any gateway identity of the peer's zone.
    #[serde(default)]
    pub name: Option<String>,
    /// `auto` (QUIC, falling back to TCP when QUIC fails), `quic` or `tcp`.
    /// Default `auto`.
    #[serde(default)]
    pub transport: Transport,
}

/// Which transport to use towards a peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// QUIC, with the HTTP/2 fallback while QUIC fails.
    #[default]
    Auto,
    /// QUIC only.
    Quic,
    /// HTTP/2 CONNECT over TLS/TCP only.
    Tcp,
}

/// A local service peers may reach through this gateway.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Service name. Required.
    pub name: String,
    /// Namespace. Required.
    pub namespace: String,
    /// Zones that may reach it; `*` for all. Default: none (not exported).
    #[serde(default)]
    pub export_to: Vec<String>,
    /// Sidecar inbound addresses of its healthy endpoints.
    #[serde(default)]
    pub endpoints: Vec<SocketAddr>,
    /// A plain service (no sidecar at its endpoints: an app on a VM, a
    /// database, a cluster Service a zone controller exported): its ports.
    /// Set, this gateway terminates the callers' mutual TLS for it with its
    /// own identity, enforces the store's `Authorization` documents for it
    /// (without `servers` there are none, and every identity of the trust
    /// domain is admitted), and connects to an endpoint's address at the
    /// port the caller named, which must be one of these; the endpoints are
    /// the apps' own addresses and their ports are not used. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plain_ports: Vec<u16>,
}

// === impl GatewayConfig ===

impl GatewayConfig {
    /// The address registered for this gateway.
    pub fn advertised(&self) -> Option<SocketAddr> {
        self.advertise
            .or_else(|| Some(self.listen).filter(|a| !a.ip().is_unspecified()))
    }

    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let mut cfg: Self = ConfigError::parse_toml(text)?;
        cfg.validate()?;
        cfg.admit_own_zone();
        Ok(cfg)
    }

    /// Lets this zone's callers reach its plain services (see
    /// [`ServiceConfig::admit_zone`]).
    pub fn admit_own_zone(&mut self) {
        let zone = self.zone.clone();
        for s in &mut self.services {
            s.admit_zone(&zone);
        }
    }

    /// Cross-field rules; every refusal names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field: String, reason: String| Err(ConfigError { field, reason });
        label("name", &self.name)?;
        label("zone", &self.zone)?;
        if let Err(e) = self.trust_domain.parse::<trellis_ca::TrustDomain>() {
            return err("trust_domain".into(), e.to_string());
        }
        if self.dns_suffix.is_empty()
            || self
                .dns_suffix
                .split('.')
                .any(|l| check_label("dns_suffix", l).is_err())
        {
            return err(
                "dns_suffix".into(),
                "must be one or more DNS labels separated by '.'".into(),
            );
        }
        if !self.servers.is_empty() {
            if self.advertised().is_none() {
                return err(
                    "advertise".into(),
                    "listen is a wildcard address; set the address peers reach this gateway on"
                        .into(),
                );
            }
            check_store(&self.servers, self.lease)?;
        }
        if self.credentials.as_os_str().is_empty() {
            return err("credentials".into(), "must name a path prefix".into());
        }
        if self.max_streams == 0 {
            return err("max_streams".into(), "must be at least 1".into());
        }
        if self.max_handshakes == 0 {
            return err("max_handshakes".into(), "must be at least 1".into());
        }
        if let Some(z) = self.zone_listen
            && z == self.listen
            && z.port() != 0
        {
            return err(
                "zone_listen".into(),
                format!("{z} is `listen` too; give the zone's workloads a port of their own"),
            );
        }
        for (field, d) in [
            ("drain_deadline", self.drain_deadline),
            ("connect_timeout", self.connect_timeout),
            ("handshake_timeout", self.handshake_timeout),
            ("credentials_poll", self.credentials_poll),
            ("quic.keep_alive", self.quic.keep_alive),
            ("quic.idle_timeout", self.quic.idle_timeout),
        ] {
            if d.is_zero() {
                return err(field.into(), "must be more than zero".into());
            }
        }
        if self.quic.keep_alive >= self.quic.idle_timeout {
            return err(
                "quic.keep_alive".into(),
                format!(
                    "must be shorter than quic.idle_timeout ({:?}), or idle peers are dropped",
                    self.quic.idle_timeout
                ),
            );
        }
        if self.quic.stream_receive_window < 16 * 1024 {
            return err(
                "quic.stream_receive_window".into(),
                "must be at least 16384 bytes".into(),
            );
        }
        if self.quic.receive_window < self.quic.stream_receive_window {
            return err(
                "quic.receive_window".into(),
                "must be at least quic.stream_receive_window".into(),
            );
        }
        if self.quic.max_concurrent_streams == 0 {
            return err(
                "quic.max_concurrent_streams".into(),
                "must be at least 1".into(),
            );
        }
        let mut zones = HashSet::new();
        for (i, p) in self.peers.iter().enumerate() {
            label(&format!("peers[{i}].zone"), &p.zone)?;
            if p.zone == self.zone {
                return err(
                    format!("peers[{i}].zone"),
                    format!("{:?} is this gateway's own zone", p.zone),
                );
            }
            if !zones.insert(&p.zone) {
                return err(
                    format!("peers[{i}].zone"),
                    format!("zone {:?} is listed twice", p.zone),
                );
            }
            if let Some(n) = &p.name {
                label(&format!("peers[{i}].name"), n)?;
            }
            if p.address.port() == 0 {
                return err(format!("peers[{i}].address"), "port must not be 0".into());
            }
        }
        for (i, z) in self.edge_zones.iter().enumerate() {
            label(&format!("edge_zones[{i}]"), z)?;
            if z == &self.zone || zones.contains(z) {
                return err(
                    format!("edge_zones[{i}]"),
                    format!(
                        "{z:?} is this gateway's zone or a peer's; an edge zone has no gateway"
                    ),
                );
            }
        }
        let mut services = HashSet::new();
        for (i, s) in self.services.iter().enumerate() {
            label(&format!("services[{i}].name"), &s.name)?;
            label(&format!("services[{i}].namespace"), &s.namespace)?;
            if !services.insert((&s.namespace, &s.name)) {
                return err(
                    format!("services[{i}]"),
                    format!("{}.{} is listed twice", s.name, s.namespace),
                );
            }
            for (j, z) in s.export_to.iter().enumerate() {
                if z != "*" {
                    label(&format!("services[{i}].export_to[{j}]"), z)?;
                }
            }
            if let Some(j) = s.plain_ports.iter().position(|p| *p == 0) {
                return err(
                    format!("services[{i}].plain_ports[{j}]"),
                    "port must not be 0".into(),
                );
            }
            for (j, e) in s.endpoints.iter().enumerate() {
                // A plain service's endpoints are addresses; callers name the port.
                if e.port() == 0 && s.plain_ports.is_empty() {
                    return err(
                        format!("services[{i}].endpoints[{j}]"),
                        "port must not be 0".into(),
                    );
                }
            }
        }
        Ok(())
    }

    /// The TLS server name a peer gateway's fallback connection carries: it
    /// tells the TCP listener to terminate TLS instead of passing it through.
    pub fn tunnel_sni(zone: &str, suffix: &str) -> String {
        format!("gateway.{zone}.{suffix}")
    }
}

fn label(field: &str, v: &str) -> Result<(), ConfigError> {
    check_label("name", v).map_err(|e| ConfigError {
        field: field.to_owned(),
        reason: match e {
            crate::tunnel::ProtocolError::BadName { reason, .. } => format!("{v:?} {reason}"),
            other => other.to_string(),
        },
    })
}

// === impl ServiceConfig ===

impl ServiceConfig {
    /// For a plain service, adds `zone` (the gateway's own) to the zones
    /// that may reach it. Its zone's callers reach a plain service through
    /// the gateway too, where a service with sidecars is reached directly:
    /// `export_to` governs other zones in both cases.
    pub fn admit_zone(&mut self, zone: &str) {
        if !self.plain_ports.is_empty() && !self.exported_to(zone) {
            self.export_to.push(zone.to_owned());
        }
    }

    /// Whether `zone` may reach this service.
    pub fn exported_to(&self, zone: &str) -> bool {
        trellis_federation::policy::Exports::admits(&self.export_to, zone)
    }
}

impl Default for QuicSettings {
    fn default() -> Self {
        Self {
            keep_alive: default_keep_alive(),
            idle_timeout: default_idle(),
            stream_receive_window: default_stream_window(),
            receive_window: default_conn_window(),
            send_window: default_conn_window(),
            max_concurrent_streams: default_quic_streams(),
            gso: true,
        }
    }
}

fn default_lease() -> Duration {
    Duration::from_secs(5)
}

fn default_trust_domain() -> String {
    "trellis.local".into()
}
fn default_suffix() -> String {
    "mesh".into()
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 15443))
}
fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15021))
}
fn default_drain() -> Duration {
    Duration::from_secs(5)
}
fn default_credentials_poll() -> Duration {
    Duration::from_secs(5)
}
fn default_max_streams() -> usize {
    10_000
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_handshakes() -> usize {
    1024
}
fn default_keep_alive() -> Duration {
    Duration::from_secs(5)
}
fn default_idle() -> Duration {
    Duration::from_secs(30)
}
fn default_stream_window() -> u32 {
    8 * 1024 * 1024
}
fn default_conn_window() -> u32 {
    64 * 1024 * 1024
}
fn default_quic_streams() -> u32 {
    4096
}
fn default_true() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        name = "gw1"
        zone = "east"
        credentials = "/var/lib/trellis/gw1"
    "#;

    #[test]
    fn minimal_config_gets_the_documented_defaults() {
        let c = GatewayConfig::from_toml(MINIMAL).unwrap();
        assert_eq!(c.listen, "0.0.0.0:15443".parse().unwrap());
        assert_eq!(c.admin, "127.0.0.1:15021".parse().unwrap());
        assert_eq!(c.drain_deadline, Duration::from_secs(5));
        assert_eq!(c.quic.stream_receive_window, 8 << 20);
        assert_eq!(c.dns_suffix, "mesh");
        assert_eq!(c.trust_domain, "trellis.local");
        assert_eq!(c.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.max_handshakes, 1024);
        assert_eq!(c.zone_listen, None);
        assert!(!c.default_deny_exports);
    }

    #[test]
    fn bad_values_name_their_field() {
        let upper = GatewayConfig::from_toml(&MINIMAL.replace("gw1", "GW")).unwrap_err();
        assert_eq!(upper.field, "name");
        let cases = [
            ("bogus = 1", "unknown field `bogus`"),
            ("drain_deadline = \"soon\"", "e.g. 250ms"),
            ("handshake_timeout = \"0s\"", "handshake_timeout"),
            ("max_handshakes = 0", "max_handshakes"),
            (
                "listen = \"0.0.0.0:15443\"\nzone_listen = \"0.0.0.0:15443\"",
                "zone_listen",
            ),
            ("[quic]\nkeep_alive = \"60s\"", "quic.keep_alive"),
            (
                "[[peers]]\nzone = \"east\"\naddress = \"127.0.0.1:1\"",
                "peers[0].zone",
            ),
            (
                "[[peers]]\nzone = \"west\"\naddress = \"nowhere\"",
                "invalid socket address",
            ),
            (
                "[[services]]\nname = \"a\"\nnamespace = \"b\"\nexport_to = [\"We st\"]",
                "services[0].export_to[0]",
            ),
        ];
        for (extra, needle) in cases {
            let text = if extra.starts_with('[') {
                format!("{MINIMAL}\n{extra}")
            } else {
                format!("{extra}\n{MINIMAL}")
            };
            let err = GatewayConfig::from_toml(&text).unwrap_err().to_string();
            assert!(err.contains(needle), "{extra:?} gave {err:?}");
        }
    }
}
