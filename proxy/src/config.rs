//! What every proxy's configuration shares: the error that names the field,
//! durations written as text, and the keys of a proxy on the store.

use std::time::Duration;

/// Why a configuration was refused: the field and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {field}: {reason}")]
pub struct ConfigError {
    /// Dotted path of the offending field (`peers[1].address`).
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

/// The keys every proxy on the store shares: `servers` as host:port, and a
/// `lease` long enough to be renewed at a third of it.
pub fn check_store(servers: &[String], lease: Duration) -> Result<(), ConfigError> {
    for (i, a) in servers.iter().enumerate() {
        if a.rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .is_none()
        {
            return Err(ConfigError {
                field: format!("servers[{i}]"),
                reason: format!("{a:?} is not host:port"),
            });
        }
    }
    // The store refuses a proxy's lease outside these bounds.
    use trellis_federation::api::{MAX_LEASE_SECONDS, MIN_LEASE_SECONDS};
    if !(MIN_LEASE_SECONDS..=MAX_LEASE_SECONDS).contains(&lease.as_secs())
        || lease.subsec_nanos() != 0 && lease.as_secs() == MAX_LEASE_SECONDS
    {
        return Err(ConfigError {
            field: "lease".into(),
            reason: format!("must be between {MIN_LEASE_SECONDS}s and {MAX_LEASE_SECONDS}s"),
        });
    }
    Ok(())
}

impl ConfigError {
    /// Parses `text` as TOML into `T`; a refusal names the field by its
    /// path (`access_log.mode (line 46)`) and says why.
    pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, Self> {
        let de = toml::Deserializer::parse(text).map_err(|e| Self::toml(text, &e))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let mut err = Self::toml(text, e.inner());
            if path != "." {
                err.field = format!("{path} ({})", err.field);
            }
            err
        })
    }

    /// A TOML parse error of `text`: toml names the offending key in its
    /// message; the field points at its line.
    pub fn toml(text: &str, e: &toml::de::Error) -> Self {
        Self {
            field: e
                .span()
                .map(|s| {
                    format!(
                        "line {}",
                        text[..s.start.min(text.len())].matches('\n').count() + 1
                    )
                })
                .unwrap_or_else(|| "(file)".into()),
            reason: e.message().to_owned(),
        }
    }
}

/// Serde helpers for durations written as text (`5s`, `250ms`, `1h`), for
/// `#[serde(with = "trellis_proxy::config::duration")]`.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Parses a duration from text.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map_err(|e| serde::de::Error::custom(format!("{s:?}: {e} (e.g. 250ms, 5s, 1h)")))
    }

    /// Writes a duration as text.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}
