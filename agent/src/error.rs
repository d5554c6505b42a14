use trellis_proxy::config::ConfigError;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The configuration was refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Credentials or TLS setup failed.
    #[error("identity: {0}")]
    Identity(#[from] trellis_ca::CaError),
    /// The data directory is in a format this build does not read.
    #[error(transparent)]
    DataDir(#[from] trellis_federation::datadir::DataDirError),
    /// Joining or talking to the federation store failed.
    #[error("federation store: {0}")]
    Store(String),
    /// A listener could not be bound.
    #[error("could not listen on {addr} ({what}): {source}")]
    Bind {
        /// Which listener.
        what: String,
        /// The address.
        addr: std::net::SocketAddr,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
}
