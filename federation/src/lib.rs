//! The federation store: a Raft-replicated registry of zones, services,
//! endpoints, policies and join tokens, served over gRPC with mutual TLS.

// The workspace denies unsafe code; no library of ours needs it at all.
#![forbid(unsafe_code)]
// raft-rs's protobuf 2 messages are built field by field throughout, the way
// its own examples do; struct-update syntax would only add noise.
#![allow(clippy::field_reassign_with_default)]

/// Generated gRPC types and services for `proto/mesh.proto`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod proto {
    tonic::include_proto!("trellis.v1");
}

pub mod acks;
pub mod api;
pub mod client;
pub mod codec;
pub mod config;
pub mod datadir;
mod error;
pub mod join;
pub mod lease;
pub mod leases;
pub mod node;
pub mod policy;
pub mod scope;
pub mod server;
pub mod signer;
pub mod spans;
pub mod state;
pub mod storage;
pub mod telemetry;
pub mod token;
pub mod transport;
pub mod view;
mod wal;

pub use error::FedError;
