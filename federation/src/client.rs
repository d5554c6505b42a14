//! Connecting to a server as an operator, agent or gateway.

use std::path::Path;

use tonic::transport::Channel;
use trellis_ca::tls::{CertSource, TrustStore};

use crate::error::FedError;
use crate::transport::{Dialer, client_tls};

/// A channel to `server` (host:port) authenticated with the credentials at
/// `prefix` (`PREFIX.crt`, `PREFIX.key`, `PREFIX.bundle`).
pub fn connect(server: &str, prefix: &Path) -> Result<Channel, FedError> {
    let (creds, bundle) =
        trellis_ca::load_credentials(prefix).map_err(|e| FedError::Tls(e.to_string()))?;
    connect_with(server, creds, bundle)
}

/// A channel to `server` presenting `creds` and trusting `bundle`.
pub fn connect_with(
    server: &str,
    creds: trellis_ca::Credentials,
    bundle: trellis_ca::TrustBundle,
) -> Result<Channel, FedError> {
    let certs = CertSource::new(creds).map_err(|e| FedError::Tls(e.to_string()))?;
    let tls = client_tls(certs, TrustStore::new(bundle))?;
    Dialer::new(tls).channel(server)
}
