//! Errors of the controller and the pod bootstrap.

/// What went wrong, with what to check.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KubeError {
    /// A configuration value is wrong.
    #[error("invalid configuration: {field}: {reason}")]
    Config {
        /// The field (or environment variable) at fault.
        field: String,
        /// Why it is refused.
        reason: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The Kubernetes API could not be reached or refused a call.
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    /// The Kubernetes client could not be configured.
    #[error(
        "Kubernetes client configuration: {0} (in a pod: is the service account token mounted? elsewhere: set kubeconfig)"
    )]
    ClientConfig(String),
    /// TLS could not be set up or the peer was not trusted.
    #[error("TLS: {0}")]
    Tls(String),
    /// The exchange endpoint could not be reached or answered nonsense.
    #[error("token exchange at {url}: {reason}")]
    Exchange {
        /// The endpoint.
        url: String,
        /// What happened.
        reason: String,
    },
    /// The controller refused the exchange; the reason says why.
    #[error("token exchange refused ({reason}): {message}")]
    Refused {
        /// Machine-readable reason, e.g. `pod-gone`.
        reason: String,
        /// The controller's words.
        message: String,
    },
    /// The federation store refused or failed a call.
    #[error("store: {0}")]
    Store(String),
}

impl KubeError {
    pub(crate) fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
