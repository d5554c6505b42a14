//! The data-plane core: what the sidecar (agent) and the east-west gateway
//! both use to move traffic.
//!
//! - [`io`]: byte streams ([`io::Duplex`]), splicing with half-close, a
//!   stream with bytes put back in front ([`io::Rewind`]).
//! - [`hbone`]: the wire contract between two sidecars: mutual TLS with
//!   ALPN [`hbone::ALPN`], HTTP/2 inside, one stream per app connection
//!   (`CONNECT`) or per forwarded HTTP request.
//! - [`pool`]: long-lived, multiplexed connections to other proxies, pooled
//!   by source identity, admitted peer identities and destination.
//! - [`protocol`]: what an app speaks on a port, declared or detected from
//!   its first bytes.
//! - [`app`]: the last hop of a forwarded request, to the app, in the
//!   HTTP version it speaks.
//! - [`forward`]: the HTTP rules of a proxy (hop-by-hop headers, bodies
//!   with limits, the responses a proxy makes itself).
//! - [`replay`]: a request body kept for a retry or a mirror while it
//!   streams to the first attempt.
//! - [`metrics`]: request and TCP metrics with Istio's standard labels.
//! - [`sni`]: the server name of a TLS ClientHello, read without
//!   terminating it, and the mesh names it carries.
//! - [`trace`]: W3C trace context through the mesh, one span per hop.
//! - [`admin`]: the admin port (metrics, health, readiness, config).
//! - [`config`]: what every proxy's configuration shares.

// The workspace denies unsafe code; no library of ours needs it at all.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod config;
pub mod forward;
pub mod hbone;
pub mod io;
pub mod metrics;
pub mod pool;
pub mod protocol;
pub mod replay;
pub mod sni;
pub mod trace;

/// A decode step's outcome: a value, or how many more bytes are needed at least.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<T> {
    /// Not enough bytes yet; read at least this many more and call again.
    Incomplete {
        /// Minimum number of additional bytes.
        needed: usize,
    },
    /// A value and the number of bytes it took.
    Complete {
        /// The decoded value.
        value: T,
        /// Bytes consumed from the front of the buffer.
        consumed: usize,
    },
}
