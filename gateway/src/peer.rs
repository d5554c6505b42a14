//! Links to peer gateways: one long-lived QUIC connection per peer zone,
//! reused by every stream, re-dialled when it dies, and an HTTP/2 CONNECT
//! connection over TLS/TCP for when QUIC cannot get through.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_rustls::TlsConnector;

use crate::config::{QuicSettings, Transport};
use crate::metrics::{Metrics, PeerLabels};
use crate::relay::{BoxStream, QuicStream, ReadError, read_reply, write_all_flush};
use crate::tunnel::{Header, Reply, ReplyCode};

/// After QUIC to a peer fails in `auto` mode, streams use the TCP fallback
/// for this long before QUIC is tried again.
const QUIC_RETRY_AFTER: Duration = Duration::from_secs(15);
/// First and largest wait before re-dialling a peer that could not be reached.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// A duration in milliseconds, to the microsecond.
pub(crate) fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Which transport carried a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// A QUIC stream.
    Quic,
    /// An HTTP/2 CONNECT stream over TLS/TCP.
    Tcp,
}

/// Why a stream to a peer could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The peer could not be reached on any allowed transport.
    #[error("peer gateway of zone {zone} at {addr} unreachable: {reason}")]
    Unreachable {
        /// Peer zone.
        zone: String,
        /// Peer address.
        addr: SocketAddr,
        /// What failed last.
        reason: String,
    },
    /// The link is up but this stream got no answer in time.
    #[error("peer gateway of zone {zone} did not answer the stream: {reason}")]
    NoReply {
        /// Peer zone.
        zone: String,
        /// What timed out.
        reason: String,
    },
    /// The peer answered with a refusal.
    #[error("refused by zone {zone}: {} ({})", .reply.code, .reply.reason)]
    Refused {
        /// Peer zone.
        zone: String,
        /// The peer's reply.
        reply: Reply,
    },
}

/// The link to one peer zone's gateway.
pub(crate) struct PeerLink {
    zone: String,
    addr: SocketAddr,
    transport: Transport,
    sni: String,
    endpoint: quinn::Endpoint,
    quic_cfg: quinn::ClientConfig,
    h2_tls: TlsConnector,
    settings: QuicSettings,
    timeout: Duration,
    metrics: Arc<Metrics>,
    state: Mutex<LinkState>,
}

/// One link as the admin endpoint's `/links` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LinkReport {
    /// The peer zone.
    pub zone: String,
    /// The peer gateway's address.
    pub address: String,
    /// `quic`, `tcp` or `auto`, as configured.
    pub configured: &'static str,
    /// `quic` or `tcp`: the transport a new stream takes now; absent when
    /// neither could be dialled.
    pub transport: Option<&'static str>,
    /// True when `auto` runs on TCP because QUIC failed (UDP blocked?).
    pub fallback: bool,
    /// Round trip in milliseconds: QUIC's smoothed RTT, or for TCP the
    /// time the TLS handshake took when the link was dialled (one round
    /// trip plus the handshake's work, so an upper bound).
    pub rtt_ms: Option<f64>,
    /// Why the link is down, or why QUIC was given up for TCP.
    pub error: Option<String>,
}

#[derive(Default)]
struct LinkState {
    quic: Option<quinn::Connection>,
    h2: Option<http2::SendRequest<Empty<Bytes>>>,
    /// How long the TLS handshake of the current h2 connection took.
    h2_handshake: Option<Duration>,
    /// Why QUIC was last given up.
    quic_error: Option<String>,
    quic_down_until: Option<Instant>,
    backoff: Option<(Instant, Duration)>,
}

/// Arguments of [`PeerLink::new`].
pub(crate) struct LinkParams {
    /// Peer zone.
    pub(crate) zone: String,
    /// Peer address (UDP for QUIC, TCP for the fallback).
    pub(crate) addr: SocketAddr,
    /// Allowed transports.
    pub(crate) transport: Transport,
    /// SNI naming the peer gateway.
    pub(crate) sni: String,
    /// Our QUIC endpoint, shared with the server side.
    pub(crate) endpoint: quinn::Endpoint,
    /// QUIC client config verifying this peer.
    pub(crate) quic_cfg: quinn::ClientConfig,
    /// TLS client config (ALPN h2) verifying this peer.
    pub(crate) h2_tls: Arc<rustls::ClientConfig>,
    /// Flow-control settings, reused for HTTP/2.
    pub(crate) settings: QuicSettings,
    /// Connect and reply timeout.
    pub(crate) timeout: Duration,
    /// Shared metrics.
    pub(crate) metrics: Arc<Metrics>,
}

impl PeerLink {
    /// The peer's address.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The peer's zone.
    pub(crate) fn zone(&self) -> &str {
        &self.zone
    }

    /// A link that dials lazily, on the first stream.
    pub(crate) fn new(p: LinkParams) -> Self {
        Self {
            zone: p.zone,
            addr: p.addr,
            transport: p.transport,
            sni: p.sni,
            endpoint: p.endpoint,
            quic_cfg: p.quic_cfg,
            h2_tls: TlsConnector::from(p.h2_tls),
            settings: p.settings,
            timeout: p.timeout,
            metrics: p.metrics,
            state: Mutex::new(LinkState::default()),
        }
    }

    /// Opens a stream for `header` and waits for the peer's reply. A dead
    /// connection is replaced and the stream tried once more; in `auto` mode
    /// a failing QUIC path falls back to TCP within the same call.
    pub(crate) async fn open(&self, header: &Header) -> Result<(BoxStream, Via), LinkError> {
        let mut last = String::from("no transport allowed");
        for _attempt in 0..2 {
            let via = self.pick_transport().await?;
            let res = match via {
                Via::Quic => self.open_quic(header).await,
                Via::Tcp => self.open_tcp(header).await,
            };
            match res {
                Ok(s) => {
                    self.state.lock().await.backoff = None;
                    self.metrics
                        .peer_streams
                        .get_or_create(&self.labels(via))
                        .inc();
                    return Ok((s, via));
                }
                Err(Attempt::Slow(reason)) => {
                    // The connection is alive (it received packets while we
                    // waited), so it serves other streams on; only this one fails.
                    return Err(LinkError::NoReply {
                        zone: self.zone.clone(),
                        reason,
                    });
                }
                Err(Attempt::Refused(reply)) => {
                    return Err(LinkError::Refused {
                        zone: self.zone.clone(),
                        reply,
                    });
                }
                Err(Attempt::Failed(reason)) => {
                    tracing::debug!(peer_zone = %self.zone, ?via, %reason, "stream to peer failed; retrying");
                    self.metrics
                        .handshake_failures
                        .get_or_create(&self.labels(via))
                        .inc();
                    self.mark_failed(via).await;
                    if via == Via::Quic {
                        self.state.lock().await.quic_error = Some(reason.clone());
                    }
                    last = reason;
                }
            }
        }
        let mut st = self.state.lock().await;
        let wait = st
            .backoff
            .map_or(BACKOFF_MIN, |(_, d)| (d * 2).min(BACKOFF_MAX));
        st.backoff = Some((Instant::now() + wait, wait));
        Err(self.unreachable(last))
    }

    fn labels(&self, via: Via) -> PeerLabels {
        PeerLabels {
            peer_zone: self.zone.clone(),
            transport: match via {
                Via::Quic => "quic",
                Via::Tcp => "tcp",
            },
        }
    }

    fn unreachable(&self, reason: String) -> LinkError {
        LinkError::Unreachable {
            zone: self.zone.clone(),
            addr: self.addr,
            reason,
        }
    }

    async fn pick_transport(&self) -> Result<Via, LinkError> {
        let st = self.state.lock().await;
        let now = Instant::now();
        // Recently failed on every path: fail fast instead of stacking up
        // callers behind connect timeouts.
        if let Some((until, _)) = st.backoff
            && now < until
            && st.quic.is_none()
            && st.h2.is_none()
        {
            return Err(self.unreachable(format!(
                "retrying in {:?}",
                until.saturating_duration_since(now)
            )));
        }
        Ok(match self.transport {
            Transport::Quic => Via::Quic,
            Transport::Tcp => Via::Tcp,
            Transport::Auto => match st.quic_down_until {
                Some(t) if now < t => Via::Tcp,
                _ => Via::Quic,
            },
        })
    }

    async fn mark_failed(&self, via: Via) {
        let mut st = self.state.lock().await;
        match via {
            Via::Quic => {
                if let Some(c) = st.quic.take() {
                    c.close(0u32.into(), b"stream failed");
                }
                if self.transport == Transport::Auto {
                    st.quic_down_until = Some(Instant::now() + QUIC_RETRY_AFTER);
                }
            }
            Via::Tcp => st.h2 = None,
        }
    }

    async fn quic_conn(&self) -> Result<quinn::Connection, String> {
        let mut st = self.state.lock().await;
        if let Some(c) = &st.quic {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
            st.quic = None;
        }
        // The lock is held while dialling so that concurrent streams share
        // one new connection instead of racing to open several.
        let connecting = self
            .endpoint
            .connect_with(self.quic_cfg.clone(), self.addr, &self.sni)
            .map_err(|e| format!("QUIC connect: {e}"))?;
        let conn = tokio::time::timeout(self.timeout, connecting)
            .await
            .map_err(|_| format!("QUIC handshake timed out after {:?}", self.timeout))?
            .map_err(|e| format!("QUIC handshake: {e}"))?;
        tracing::info!(peer_zone = %self.zone, addr = %self.addr, "QUIC link up");
        st.quic = Some(conn.clone());
        Ok(conn)
    }

    async fn open_quic(&self, header: &Header) -> Result<BoxStream, Attempt> {
        let conn = self.quic_conn().await.map_err(Attempt::Failed)?;
        let (send, recv) = tokio::time::timeout(self.timeout, conn.open_bi())
            .await
            .map_err(|_| Attempt::Failed("no stream credit from peer in time".into()))?
            .map_err(|e| Attempt::Failed(format!("open stream: {e}")))?;
        let mut stream: BoxStream = Box::new(QuicStream::new(send, recv));
        let rx_before = conn.stats().udp_rx.datagrams;
        match self.handshake(&mut stream, header).await {
            Err(Attempt::Failed(reason))
                if conn.close_reason().is_none() && conn.stats().udp_rx.datagrams > rx_before =>
            {
                Err(Attempt::Slow(reason))
            }
            other => other.map(|()| stream),
        }
    }

    async fn h2_conn(&self) -> Result<http2::SendRequest<Empty<Bytes>>, String> {
        let mut st = self.state.lock().await;
        if let Some(s) = &st.h2 {
            if !s.is_closed() {
                return Ok(s.clone());
            }
            st.h2 = None;
        }
        let tcp = tokio::time::timeout(self.timeout, TcpStream::connect(self.addr))
            .await
            .map_err(|_| format!("TCP connect timed out after {:?}", self.timeout))?
            .map_err(|e| format!("TCP connect: {e}"))?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let name = ServerName::try_from(self.sni.clone()).map_err(|e| e.to_string())?;
        let started = Instant::now();
        let tls = tokio::time::timeout(self.timeout, self.h2_tls.connect(name, tcp))
            .await
            .map_err(|_| "TLS handshake timed out".to_string())?
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let tls_took = started.elapsed();
        let mut b = http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .initial_stream_window_size(self.settings.stream_receive_window)
            .initial_connection_window_size(self.settings.receive_window)
            .keep_alive_interval(self.settings.keep_alive)
            .keep_alive_timeout(self.settings.idle_timeout);
        let (send, conn) = b
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        let zone = self.zone.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(peer_zone = %zone, error = %e, "HTTP/2 link closed");
            }
        });
        tracing::info!(peer_zone = %self.zone, addr = %self.addr, "TCP fallback link up");
        st.h2 = Some(send.clone());
        st.h2_handshake = Some(tls_took);
        Ok(send)
    }

    async fn open_tcp(&self, header: &Header) -> Result<BoxStream, Attempt> {
        let mut send = self.h2_conn().await.map_err(Attempt::Failed)?;
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(format!(
                "{}.{}:{}",
                header.service, header.namespace, header.port
            ))
            .body(Empty::new())
            .map_err(|e| Attempt::Failed(e.to_string()))?;
        let exchange = async {
            send.ready().await?;
            send.send_request(req).await
        };
        let resp = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| Attempt::Failed("CONNECT timed out".into()))?
            .map_err(|e| Attempt::Failed(format!("CONNECT: {e}")))?;
        if resp.status() != StatusCode::OK {
            return Err(Attempt::Failed(format!(
                "CONNECT answered {}",
                resp.status()
            )));
        }
        let upgraded = hyper::upgrade::on(resp)
            .await
            .map_err(|e| Attempt::Failed(format!("CONNECT upgrade: {e}")))?;
        let mut stream: BoxStream = Box::new(TokioIo::new(upgraded));
        self.handshake(&mut stream, header).await?;
        Ok(stream)
    }

    async fn handshake(&self, stream: &mut BoxStream, header: &Header) -> Result<(), Attempt> {
        handshake(stream, header, self.timeout).await
    }

    /// The report of a link not yet probed.
    pub(crate) fn blank_report(&self) -> LinkReport {
        LinkReport {
            zone: self.zone.clone(),
            address: self.addr.to_string(),
            configured: match self.transport {
                Transport::Quic => "quic",
                Transport::Tcp => "tcp",
                Transport::Auto => "auto",
            },
            transport: None,
            fallback: false,
            rtt_ms: None,
            error: None,
        }
    }

    /// Makes sure the link is up, dialling as a stream would (QUIC first in
    /// `auto`, then the TCP fallback), and says how it stands. No stream is
    /// opened, so the peer sees a connection and nothing else.
    pub(crate) async fn probe(&self) -> LinkReport {
        let mut report = self.blank_report();
        let mut via = match self.pick_transport().await {
            Ok(v) => v,
            Err(e) => {
                report.error = Some(e.to_string());
                return report;
            }
        };
        if via == Via::Quic {
            match self.quic_conn().await {
                Ok(c) => {
                    report.transport = Some("quic");
                    report.rtt_ms = Some(millis(c.rtt()));
                    return report;
                }
                Err(e) if self.transport == Transport::Auto => {
                    self.mark_failed(Via::Quic).await;
                    self.state.lock().await.quic_error = Some(e);
                    via = Via::Tcp;
                }
                Err(e) => {
                    report.error = Some(e);
                    return report;
                }
            }
        }
        debug_assert_eq!(via, Via::Tcp);
        match self.h2_conn().await {
            Ok(_) => {
                let st = self.state.lock().await;
                report.transport = Some("tcp");
                report.fallback = self.transport == Transport::Auto;
                report.rtt_ms = st.h2_handshake.map(millis);
                if report.fallback {
                    report.error = st.quic_error.clone();
                }
            }
            Err(e) => report.error = Some(e),
        }
        report
    }

    /// Closes the QUIC connection, if any, for a clean shutdown.
    pub(crate) async fn close(&self) {
        let mut st = self.state.lock().await;
        if let Some(c) = st.quic.take() {
            c.close(0u32.into(), b"gateway shutting down");
        }
        st.h2 = None;
    }
}

/// Sends `header` and waits for the reply. The peer may spend up to two
/// connect timeouts trying endpoints before it answers; wait a little longer.
async fn handshake(
    stream: &mut BoxStream,
    header: &Header,
    timeout: Duration,
) -> Result<(), Attempt> {
    let bytes = header
        .encode()
        .map_err(|e| Attempt::Refused(Reply::refused(ReplyCode::ProtocolError, e.to_string())))?;
    write_all_flush(stream, &bytes)
        .await
        .map_err(|e| Attempt::Failed(format!("send header: {e}")))?;
    match read_reply(stream, timeout * 2 + timeout / 2).await {
        Ok(r) if r.code == ReplyCode::Accepted => Ok(()),
        Ok(r) => Err(Attempt::Refused(r)),
        Err(ReadError::Protocol(e)) => Err(Attempt::Refused(Reply::refused(
            ReplyCode::ProtocolError,
            format!("peer sent a malformed reply: {e}"),
        ))),
        Err(e) => Err(Attempt::Failed(format!("reply: {e}"))),
    }
}

/// Opens a stream for `header` on an existing QUIC connection (an edge
/// agent's, which dialled us) and waits for the reply.
pub(crate) async fn open_on(
    conn: &quinn::Connection,
    zone: &str,
    header: &Header,
    timeout: Duration,
) -> Result<BoxStream, LinkError> {
    let fail = |reason: String| LinkError::Unreachable {
        zone: zone.to_owned(),
        addr: conn.remote_address(),
        reason,
    };
    let (send, recv) = tokio::time::timeout(timeout, conn.open_bi())
        .await
        .map_err(|_| fail("no stream credit in time".into()))?
        .map_err(|e| fail(format!("open stream: {e}")))?;
    let mut stream: BoxStream = Box::new(QuicStream::new(send, recv));
    match handshake(&mut stream, header, timeout).await {
        Ok(()) => Ok(stream),
        Err(Attempt::Refused(reply)) => Err(LinkError::Refused {
            zone: zone.to_owned(),
            reply,
        }),
        Err(Attempt::Failed(reason) | Attempt::Slow(reason)) => Err(fail(reason)),
    }
}

enum Attempt {
    /// The connection is unusable: replace it (and maybe the transport).
    Failed(String),
    /// The connection is fine; this stream got no answer.
    Slow(String),
    Refused(Reply),
}
