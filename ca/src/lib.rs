//! Identities for Trellis: SPIFFE IDs, the mesh CA and its zone
//! intermediates, certificate rotation, and the rustls configurations that
//! authenticate both ends of every connection by SPIFFE ID.
//!
//! This crate knows nothing of the network: it makes and checks certificates
//! and hands rustls configs to the crates that open sockets. Distributing
//! bundles and signing CSRs for remote callers belong to `trellis-federation`.
//!
//! The pieces, from the bottom up:
//! - [`SpiffeId`] and [`TrustDomain`]: parsing by the SPIFFE rules, and the
//!   Trellis naming scheme ([`Role`]).
//! - [`Authority`]: a root or zone intermediate that signs CSRs; keys are
//!   ECDSA P-256, leaves carry one URI SAN and both TLS usages.
//! - [`TrustBundle`]: several roots at once, for root rotation.
//! - [`tls`]: [`tls::server_config`] and [`tls::client_config`] over a
//!   [`tls::CertSource`] that can be swapped in place and a
//!   [`tls::TrustStore`] that can be updated.
//! - [`rotate::Rotator`]: renews at half-life with jitter.
//! - [`CaDir`]: the CA's files on disk, keys 0600 in 0700 directories.

// The workspace denies unsafe code; no library of ours needs it at all.
#![forbid(unsafe_code)]

mod authority;
mod bundle;
mod cert;
mod error;
pub mod files;
pub mod reload;
pub mod rotate;
mod spiffe;
mod store;
pub mod tls;

pub use authority::{
    Authority, AuthorityKind, BACKDATE, Credentials, DEFAULT_LEAF_TTL, DEFAULT_ROOT_TTL,
    DEFAULT_ZONE_TTL, IssueOptions, new_key_and_csr,
};
pub use bundle::TrustBundle;
pub use cert::{CertInfo, certs_from_pem, certs_to_pem, key_from_pem};
pub use error::CaError;
pub use spiffe::{Role, RoleKind, SpiffeId, SpiffeIdError, TrustDomain};
pub use store::{CaDir, credential_paths, load_credentials, write_credentials};
