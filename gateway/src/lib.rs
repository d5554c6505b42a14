//! The east-west gateway: the only door between zones.
//!
//! Workloads in a zone reach other zones through their gateway. A sidecar
//! opens TCP to the gateway and starts its end-to-end TLS; the gateway reads
//! the SNI of that ClientHello (`<port>.<service>.<namespace>.<zone>.<suffix>`)
//! without terminating it, opens a stream to the destination zone's gateway
//! and splices bytes. Workload keys and plaintext never reach a gateway.
//!
//! Between gateways there is one long-lived QUIC connection per peer
//! (ALPN `trellis/1`, mutual TLS with gateway identities), and one
//! bidirectional stream per tunnelled connection, opened by a header and
//! answered by a reply ([`tunnel`]). Where UDP is blocked the same streams
//! ride HTTP/2 CONNECT over TLS on the same port number over TCP; the TCP
//! listener tells a peer's fallback link (SNI `gateway.<zone>.<suffix>`) from
//! workload traffic (SNI naming a service).
//!
//! Flow control (defaults in [`config::QuicSettings`]): 8 MiB per stream and
//! 64 MiB per connection in each direction, sized for about 1 Gbit/s at 50 ms
//! round trip; 4096 concurrent streams per connection; keep-alive 5 s, idle
//! timeout 30 s; UDP GSO on where the kernel offers it. The HTTP/2 fallback
//! uses the same windows.
//!
//! Peers and services come from the configuration file for now; the
//! federation store will feed the same [`routes::Routes`].

// The workspace denies unsafe code; no library of ours needs it at all.
#![forbid(unsafe_code)]

mod error;
mod gateway;
mod inbound;
mod outbound;
mod peer;
mod quic;
mod relay;

pub use trellis_proxy::admin;
pub mod config;
pub mod edge;
pub mod metrics;
pub mod preamble;
pub mod routes;
pub mod sni;
mod store;
mod terminate;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tunnel;

pub use error::GatewayError;
pub use gateway::{BoundAddrs, Gateway};
pub use peer::{LinkError, LinkReport, Via};
pub use quic::{ALPN_H2, ALPN_TUNNEL};
pub use relay::{
    BoxStream, Duplex, H2Stream, QuicStream, ReadError, Rewind, read_header, read_reply, splice,
    write_all_flush,
};
