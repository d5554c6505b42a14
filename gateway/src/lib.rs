//! The east-west gateway: QUIC tunnels between zones (ALPN `trellis/1`, one
//! stream per tunnelled connection), SNI passthrough of workload TLS, and
//! the HTTP/2 CONNECT fallback over TLS/TCP.
//!
//! Not built yet (issue 4): an empty member of the workspace for now.
