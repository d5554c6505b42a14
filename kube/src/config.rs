//! `trellis kube controller`'s configuration file (TOML).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use trellis_federation::api::MAX_CONTROLLER_TOKEN_SECONDS;
use trellis_proxy::config::{ConfigError, check_store, duration};

/// Everything the zone controller needs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// This controller's name: its identity is
    /// `spiffe://TD/zone/ZONE/controller/NAME`. Required.
    pub name: String,
    /// The zone the cluster is. Required.
    pub zone: String,
    /// Trust domain. Default `trellis.local`.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// Federation servers (host:port), nearest first. Required.
    pub servers: Vec<String>,
    /// Path prefix of the controller's credentials (`PREFIX.crt`, `.key`,
    /// `.bundle`), issued with `trellis ca issue --zone ZONE --id
    /// spiffe://TD/zone/ZONE/controller/NAME`; renewed through the servers
    /// and written back. Required.
    pub credentials: PathBuf,
    /// Where the token exchange listens (HTTPS, the controller's mesh
    /// certificate). Default `0.0.0.0:15012`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// A kubeconfig file; unset: the in-cluster service account (then
    /// `$KUBECONFIG` and `~/.kube/config`).
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// The audience pods' projected tokens must carry. Default `trellis`.
    #[serde(default = "default_audience")]
    pub audience: String,
    /// How long a join token minted for a pod lives: the pod's agent spends
    /// it at once. Default `60s`, at most 300s.
    #[serde(default = "default_token_ttl", with = "duration")]
    pub token_ttl: Duration,
    /// The lease of the endpoints the controller registers, renewed every
    /// third: if the controller is gone for longer, they leave the
    /// registry. Default `60s`.
    #[serde(default = "default_lease", with = "duration")]
    pub lease: Duration,
    /// Changes seen within this window are written together. Default `50ms`.
    #[serde(default = "default_debounce", with = "duration")]
    pub debounce: Duration,
    /// Sync Services and EndpointSlices into the registry. Default true.
    #[serde(default = "default_true")]
    pub sync: bool,
}

fn default_trust_domain() -> String {
    "trellis.local".into()
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 15012))
}
fn default_audience() -> String {
    crate::AUDIENCE.into()
}
fn default_token_ttl() -> Duration {
    Duration::from_secs(60)
}
fn default_lease() -> Duration {
    Duration::from_secs(60)
}
fn default_debounce() -> Duration {
    Duration::from_millis(50)
}
fn default_true() -> bool {
    true
}

fn bad(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        reason: reason.into(),
    }
}

impl ControllerConfig {
    /// Parses and validates a configuration file's text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let cfg: Self = ConfigError::parse_toml(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Every rule across fields, checked before anything binds.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let td: trellis_ca::TrustDomain = self
            .trust_domain
            .parse()
            .map_err(|e| bad("trust_domain", format!("{e}")))?;
        td.role(trellis_ca::RoleKind::Controller, &self.zone, &self.name)
            .map_err(|e| {
                bad(
                    "name",
                    format!("{e} (zone and name become SPIFFE path segments)"),
                )
            })?;
        if self.zone.is_empty() {
            return Err(bad("zone", "must not be empty"));
        }
        if self.servers.is_empty() {
            return Err(bad(
                "servers",
                "name at least one federation server (host:port)",
            ));
        }
        check_store(&self.servers, self.lease)?;
        if self.audience.is_empty() {
            return Err(bad("audience", "must not be empty"));
        }
        let ttl = self.token_ttl.as_secs();
        if !(10..=MAX_CONTROLLER_TOKEN_SECONDS).contains(&ttl) {
            return Err(bad(
                "token_ttl",
                format!("must be between 10s and {MAX_CONTROLLER_TOKEN_SECONDS}s"),
            ));
        }
        if self.debounce > Duration::from_millis(500) {
            return Err(bad(
                "debounce",
                "at most 500ms: changes must reach the store within a second",
            ));
        }
        Ok(())
    }

    /// This controller's SPIFFE ID.
    pub fn id(&self) -> trellis_ca::SpiffeId {
        let td: trellis_ca::TrustDomain = self
            .trust_domain
            .parse()
            .expect("validate() checked the trust domain");
        td.role(trellis_ca::RoleKind::Controller, &self.zone, &self.name)
            .expect("validate() checked zone and name")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
        name = "kube"
        zone = "k8s"
        servers = ["10.0.0.1:7400"]
        credentials = "/var/lib/trellis/controller/id"
    "#;

    #[test]
    fn defaults_and_refusals() {
        let c = ControllerConfig::from_toml(MIN).unwrap();
        assert_eq!(c.listen.port(), 15012);
        assert_eq!(c.audience, "trellis");
        assert_eq!(
            c.id().as_str(),
            "spiffe://trellis.local/zone/k8s/controller/kube"
        );
        let e = ControllerConfig::from_toml(&format!("{MIN}\nbogus = 1")).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = ControllerConfig::from_toml(&format!("{MIN}\ntoken_ttl = \"1h\"")).unwrap_err();
        assert_eq!(e.field, "token_ttl");
        let e = ControllerConfig::from_toml(&MIN.replace("\"kube\"", "\"a/b\"")).unwrap_err();
        assert_eq!(e.field, "name");
    }

    #[test]
    fn the_example_loads_and_a_misspelt_key_is_refused() {
        let text = include_str!("../../configs/kube-controller.toml");
        let c = ControllerConfig::from_toml(text).unwrap();
        assert_eq!(c.zone, "k8s");
        assert!(c.sync);
        let bad = text.replace("token_ttl", "token_tll");
        let e = ControllerConfig::from_toml(&bad).unwrap_err();
        assert!(e.to_string().contains("token_tll"), "{e}");
    }
}
