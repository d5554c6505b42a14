//! gRPC over mutual TLS: the listener that authenticates callers, the
//! dialer that clients and peers use, and the Raft message transport.
//!
//! tonic cannot take a custom rustls verifier through its own TLS settings,
//! so both ends do the TLS themselves: the server hands tonic a stream of
//! finished tokio-rustls connections (each carrying the caller's verified
//! SPIFFE ID as connect info), and clients dial through a connector that
//! performs the handshake with a Trellis `ClientConfig`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use protobuf::Message as _;
use raft::eraftpb::Message;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::transport::{Channel, Endpoint};
use trellis_ca::SpiffeId;
use trellis_ca::tls::{CertSource, PeerPolicy, TrustStore};

use crate::error::FedError;
use crate::node::{NodeHandle, Transport};
use crate::proto::RaftBatch;
use crate::proto::raft_client::RaftClient;

/// Largest gRPC message accepted: snapshots travel as one message.
pub const MAX_MESSAGE: usize = 256 * 1024 * 1024;
/// How long a client has to complete its TLS handshake on the API port.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most TLS handshakes in progress at once on the API port.
pub const MAX_HANDSHAKES: usize = 256;
/// Most connections open at once on the API port (every proxy holds one).
pub const MAX_CONNECTIONS: usize = 20_000;
/// Most concurrent HTTP/2 streams on one API connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// Who is on the other end of a server-side connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The verified SPIFFE ID, `None` when the client sent no certificate.
    pub id: Option<SpiffeId>,
    /// The client's socket address.
    pub addr: SocketAddr,
    /// Why the certificate the client sent was not trusted, if it was not.
    pub refused: Option<String>,
}

/// A server-side TLS connection that tells tonic who the peer is.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    peer: PeerInfo,
    /// Held for the connection's life: counts it against [`MAX_CONNECTIONS`].
    _open: tokio::sync::OwnedSemaphorePermit,
}

/// Dials peers over TLS with a Trellis client config.
#[derive(Clone)]
pub struct Dialer {
    tls: TlsConnector,
}

/// Sends Raft messages to peers over one client stream per peer.
pub struct RaftTransport {
    id: u64,
    advertise: String,
    dialer: Dialer,
    addresses: Arc<RwLock<HashMap<u64, String>>>,
    queues: RwLock<HashMap<u64, mpsc::Sender<Vec<Message>>>>,
    node: OnceLock<NodeHandle>,
}

/// The API's TLS config: a client certificate is optional (joiners and the
/// bundle need none) and, when sent, is checked after the handshake against
/// the live trust bundle by [`incoming`], so a rotated root is trusted from
/// the next connection and a refusal reaches the caller in words.
pub fn server_tls(
    certs: Arc<CertSource>,
    trust: Arc<TrustStore>,
) -> Result<ServerConfig, FedError> {
    let mut cfg = trellis_ca::tls::server_config_verify_after_handshake(certs, trust)
        .map_err(|e| FedError::Tls(e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// A client config that presents `certs` and admits only Trellis servers.
pub fn client_tls(
    certs: Arc<CertSource>,
    trust: Arc<TrustStore>,
) -> Result<ClientConfig, FedError> {
    let mut cfg = trellis_ca::tls::client_config(
        certs,
        trust,
        PeerPolicy::Roles(vec![trellis_ca::RoleKind::Server]),
    )
    .map_err(|e| FedError::Tls(e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// Accepts TCP connections on `listener`, completes TLS on each in its own
/// task, and yields the finished connections for `serve_with_incoming`.
///
/// At most [`MAX_HANDSHAKES`] handshakes run at once, so idle or slow
/// clients cannot hold the server's memory; beyond that the server takes
/// no connection until one finishes, and the rest wait in the listen
/// backlog. (Closing them instead, as it once did, sent every proxy of a
/// restarted server into its backoff together and left this server idle
/// between their waves.) Each handshake has [`HANDSHAKE_TIMEOUT`].
pub fn incoming(
    listener: TcpListener,
    tls: ServerConfig,
    trust: Arc<TrustStore>,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsConn, std::io::Error>> {
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let (tx, rx) = mpsc::channel(64);
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let open = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            // The listener goes as soon as the server stops taking
            // connections, not at the next connection after that: a server
            // restarted in the same process binds the same port again.
            let permit = tokio::select! {
                p = pending.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                () = tx.closed() => break,
            };
            let accepted = tokio::select! {
                r = listener.accept() => r,
                () = tx.closed() => break,
            };
            let (tcp, addr) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(open_permit) = open.clone().try_acquire_owned() else {
                tracing::warn!(%addr, limit = MAX_CONNECTIONS, "too many open connections; connection closed");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let conn_tx = tx.clone();
            let trust = trust.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%addr, error = %e, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%addr, "TLS handshake timed out");
                        return;
                    }
                };
                drop(permit);
                // The chain is checked here, against the bundle in force now
                // (see server_tls); an untrusted one leaves the caller
                // without identity, and the refusal says why.
                let (id, refused) = match tls.get_ref().1.peer_certificates() {
                    None => (None, None),
                    Some(chain) => match trust.verify_client_chain(chain) {
                        Ok(id) => (Some(id), None),
                        Err(e) => (None, Some(e.to_string())),
                    },
                };
                let conn = TlsConn {
                    inner: tls,
                    peer: PeerInfo { id, addr, refused },
                    _open: open_permit,
                };
                let _ = conn_tx.send(Ok(conn)).await;
            });
            if tx.is_closed() {
                break;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

// === impl TlsConn ===

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

// === impl Dialer ===

impl Dialer {
    /// A dialer using `tls`.
    pub fn new(tls: ClientConfig) -> Self {
        Self {
            tls: TlsConnector::from(Arc::new(tls)),
        }
    }

    /// A channel to `addr` (host:port) that connects on first use and
    /// reconnects after failures.
    pub fn channel(&self, addr: &str) -> Result<Channel, FedError> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| FedError::Refused(format!("server address {addr:?}: {e}")))?
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let tls = self.tls.clone();
        let connector = tower::service_fn(move |uri: http::Uri| {
            let tls = tls.clone();
            async move {
                let host = uri.host().unwrap_or("localhost").to_string();
                let port = uri.port_u16().unwrap_or(7400);
                let tcp = TcpStream::connect((host.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                // The name only routes; the server is authenticated by its
                // SPIFFE ID, not by this name.
                let name = ServerName::try_from(host.clone())
                    .unwrap_or_else(|_| ServerName::try_from("trellis").expect("static name"));
                let stream = tls.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        });
        Ok(endpoint.connect_with_connector_lazy(connector))
    }
}

// === impl RaftTransport ===

impl RaftTransport {
    /// A transport for node `id` (reachable at `advertise`) dialing with
    /// `dialer`; call [`RaftTransport::attach`] once the node exists.
    pub fn new(id: u64, advertise: String, dialer: Dialer) -> Arc<Self> {
        Arc::new(Self {
            id,
            advertise,
            dialer,
            addresses: Default::default(),
            queues: Default::default(),
            node: OnceLock::new(),
        })
    }

    /// Gives the transport the node to report unreachable peers to.
    pub fn attach(&self, node: NodeHandle) {
        let _ = self.node.set(node);
    }

    /// Records the address a peer announced, unless one is known already
    /// (configuration and the replicated member list take precedence).
    pub fn learn_address(&self, id: u64, address: &str) {
        let mut book = self
            .addresses
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        book.entry(id).or_insert_with(|| address.to_string());
    }

    /// Every known member address except our own.
    pub fn addresses(&self) -> Vec<String> {
        let book = self
            .addresses
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        book.iter()
            .filter(|(id, _)| **id != self.id)
            .map(|(_, a)| a.clone())
            .collect()
    }

    /// The address of peer `id`, if known.
    pub fn address(&self, id: u64) -> Option<String> {
        self.addresses
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
            .cloned()
    }

    /// A channel to peer `id` for forwarded writes.
    pub fn channel(&self, id: u64) -> Result<Channel, FedError> {
        let addr = self.address(id).ok_or(FedError::NoLeader)?;
        self.dialer.channel(&addr)
    }

    fn queue(self: &Arc<Self>, to: u64) -> mpsc::Sender<Vec<Message>> {
        if let Some(q) = self
            .queues
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&to)
        {
            return q.clone();
        }
        let mut queues = self
            .queues
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        queues
            .entry(to)
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(1024);
                tokio::spawn(self.clone().peer_loop(to, rx));
                tx
            })
            .clone()
    }

    /// One long-lived client stream to peer `to`; on any failure, report the
    /// peer unreachable to Raft (which slows its probes) and dial again.
    async fn peer_loop(self: Arc<Self>, to: u64, mut rx: mpsc::Receiver<Vec<Message>>) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let Some(addr) = self.address(to) else {
                // Unknown address: drop what is queued until a conf change
                // or the config teaches us where the peer is.
                if rx.recv().await.is_none() {
                    return;
                }
                continue;
            };
            let channel = match self.dialer.channel(&addr) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(peer = to, error = %e, "bad peer address");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let mut client = RaftClient::new(channel)
                .max_encoding_message_size(MAX_MESSAGE)
                .max_decoding_message_size(MAX_MESSAGE);
            let (tx, stream_rx) = mpsc::channel::<RaftBatch>(256);
            let call = tokio::spawn(async move {
                client
                    .send(tokio_stream::wrappers::ReceiverStream::new(stream_rx))
                    .await
            });
            let mut sent_any = false;
            loop {
                let Some(first) = rx.recv().await else {
                    return;
                };
                let mut messages: Vec<Vec<u8>> = first
                    .iter()
                    .filter_map(|m| m.write_to_bytes().ok())
                    .collect();
                while let Ok(more) = rx.try_recv() {
                    messages.extend(more.iter().filter_map(|m| m.write_to_bytes().ok()));
                }
                let batch = RaftBatch {
                    messages,
                    from: self.id,
                    from_address: self.advertise.clone(),
                };
                if tx.send(batch).await.is_err() {
                    break;
                }
                if !sent_any {
                    sent_any = true;
                    backoff = Duration::from_millis(50);
                }
            }
            let reason = match call.await {
                Ok(Err(status)) => status.message().to_string(),
                _ => "stream closed".into(),
            };
            tracing::debug!(peer = to, %addr, %reason, "raft stream to peer ended");
            if let Some(node) = self.node.get() {
                node.report_unreachable(to);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

impl Transport for Arc<RaftTransport> {
    fn send(&self, msgs: Vec<Message>) {
        let mut by_peer: HashMap<u64, Vec<Message>> = HashMap::new();
        for m in msgs {
            by_peer.entry(m.to).or_default().push(m);
        }
        for (to, msgs) in by_peer {
            // Full queue: the peer is slow or down; Raft will resend.
            let _ = self.queue(to).try_send(msgs);
        }
    }

    fn set_address(&self, id: u64, address: &str) {
        self.addresses
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id, address.to_string());
    }
}
