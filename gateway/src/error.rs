use std::io;

use crate::config::ConfigError;

/// Why the gateway could not start or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// The configuration was refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Credentials or TLS setup failed.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// A listener could not be bound.
    #[error("could not bind {what} on {addr}: {source} (is another process using the port?)")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: std::net::SocketAddr,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// Another I/O failure while starting.
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl GatewayError {
    pub(crate) fn config(field: &str, reason: &str) -> Self {
        Self::Config(ConfigError {
            field: field.to_owned(),
            reason: reason.to_owned(),
        })
    }
}

impl From<trellis_ca::CaError> for GatewayError {
    fn from(e: trellis_ca::CaError) -> Self {
        Self::Tls(e.to_string())
    }
}
