use std::path::PathBuf;

use crate::spiffe::{SpiffeId, SpiffeIdError};

/// Everything that can go wrong while making, loading or using certificates.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A CA already exists where a new one was to be made.
    #[error(
        "{0} already holds a CA; refusing to overwrite it (remove it first if you really mean to start a new root)"
    )]
    AlreadyExists(PathBuf),
    /// A CA directory is missing a file it needs.
    #[error("{path} is missing: {hint}")]
    Missing {
        /// The missing file.
        path: PathBuf,
        /// What to run to create it.
        hint: String,
    },
    /// PEM input had no usable object of the expected kind.
    #[error("{what}: {reason}")]
    Pem {
        /// What was being read (usually a path).
        what: String,
        /// Why it was refused.
        reason: String,
    },
    /// A certificate could not be parsed or lacks something Trellis requires.
    #[error("certificate {what}: {reason}")]
    BadCertificate {
        /// Which certificate (a path, or its role).
        what: String,
        /// Why it was refused.
        reason: String,
    },
    /// A certificate signing request was refused.
    #[error("certificate signing request refused: {0}")]
    BadCsr(String),
    /// An identity that the CA may not sign.
    #[error("refusing to sign {id}: {reason}")]
    NotAllowed {
        /// The requested identity.
        id: SpiffeId,
        /// Which rule refused it.
        reason: String,
    },
    /// A SPIFFE ID or trust domain did not parse.
    #[error(transparent)]
    SpiffeId(#[from] SpiffeIdError),
    /// rcgen could not build or sign a certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused a key or a configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// A validity period that cannot be represented or makes no sense.
    #[error("invalid validity: {0}")]
    Validity(String),
    /// The certificate issuer used for renewal failed.
    #[error("certificate issuer failed: {0}")]
    Issuer(String),
}

impl CaError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }
}
