//! The wire contract between two sidecars.
//!
//! A caller's sidecar opens mutual TLS to the destination's sidecar (its
//! inbound port, directly or through both zones' gateways, which pass the
//! TLS through by its SNI `<port>.<service>.<namespace>.<zone>.<suffix>`),
//! offering ALPN [`ALPN`]. When the destination agrees, the connection
//! carries HTTP/2, and each unit of work is one stream:
//!
//! - an opaque TCP connection: `CONNECT` with `:authority` = the SNI name
//!   and port (`8080.catalog.shop.west.mesh:8080`); `200` means the
//!   destination connected to its app and bytes flow both ways; any other
//!   status refuses, with the reason in [`ERROR_HEADER`];
//! - an HTTP request: the request itself, forwarded, with
//!   [`APP_PROTOCOL_HEADER`] saying which HTTP version the destination's
//!   app expects (`http1` or `http2`); the destination strips the header.
//!
//! The caller's identity is the TLS client certificate; the destination
//! checks it, and its authorization, for every stream. A destination that
//! does not agree on the ALPN (an older agent) gets the connection as
//! before: one app connection spliced through the TLS.

use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};

/// ALPN of a pooled sidecar-to-sidecar connection (HTTP/2 inside).
pub const ALPN: &[u8] = b"trellis-hbone/1";

/// On a forwarded request: the HTTP version the destination's app speaks.
pub const APP_PROTOCOL_HEADER: &str = "trellis-app-protocol";

/// On a response a proxy made itself (refusal, no route, timeout): why.
pub const ERROR_HEADER: &str = "trellis-error";

/// HTTP/2 windows of a pooled connection: 4 MiB per stream, 16 MiB per
/// connection, enough for about 300 Mbit/s per stream at 100 ms round trip
/// while bounding what one connection can make its peer buffer.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// See [`STREAM_WINDOW`].
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// Pings on an idle pooled connection, so a dead peer (or a gateway that
/// lost the path) is noticed before the next request is sent into it.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a ping may go unanswered before the connection is closed.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// On every stream from a caller's sidecar: the caller's zone, for the
/// destination's metrics (`source_zone`). Telemetry only: authorization
/// never reads it. The destination strips it.
pub const SOURCE_ZONE_HEADER: &str = "trellis-source-zone";

/// Streams one pooled connection carries at once, unless configured.
pub const DEFAULT_MAX_STREAMS: u32 = 100;

/// The HTTP/2 client side of a pooled connection.
pub fn client_builder() -> hyper::client::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    b
}

/// The HTTP/2 server side of a pooled connection: at most `max_streams` at
/// once and `max_header_bytes` of headers per request, so what one caller
/// can make the destination hold is bounded.
pub fn server_builder(
    max_streams: u32,
    max_header_bytes: u32,
) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(max_streams)
        // The peer is an authenticated sidecar passing on its clients'
        // cancellations; h2's default of 20 pending resets would close the
        // connection every client of that sidecar shares. Still bounded, so
        // a rapid-reset flood costs the peer its connection.
        .max_pending_accept_reset_streams(max_streams as usize * 10)
        .max_header_list_size(max_header_bytes)
        // The response is the app's: no header it did not send.
        .auto_date_header(false)
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    b
}

/// The `:authority` of a `CONNECT` for the connection named `sni`.
pub fn connect_authority(sni: &str, port: u16) -> String {
    format!("{sni}:{port}")
}

/// The values [`APP_PROTOCOL_HEADER`] takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppProtocol {
    /// HTTP/1.1 (and 1.0) to the app.
    Http1,
    /// HTTP/2 with prior knowledge (h2c) to the app; gRPC too.
    Http2,
}

impl AppProtocol {
    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            AppProtocol::Http1 => "http1",
            AppProtocol::Http2 => "http2",
        }
    }

    /// Parses a header value.
    pub fn parse(s: &[u8]) -> Option<Self> {
        match s {
            b"http1" => Some(AppProtocol::Http1),
            b"http2" => Some(AppProtocol::Http2),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_protocol_round_trips_and_refuses_others() {
        for p in [AppProtocol::Http1, AppProtocol::Http2] {
            assert_eq!(AppProtocol::parse(p.as_str().as_bytes()), Some(p));
        }
        assert_eq!(AppProtocol::parse(b"h3"), None);
        assert_eq!(
            connect_authority("8080.catalog.shop.west.mesh", 8080),
            "8080.catalog.shop.west.mesh:8080"
        );
    }
}
