//! The edge side of a gateway link, for agents in zones without a gateway.
//!
//! An edge agent dials a gateway of another zone over QUIC with its agent
//! identity and keeps that connection open. The gateway opens streams back
//! over it (same header and reply as between gateways), so an edge site
//! behind NAT serves traffic with no inbound port; and because it is QUIC,
//! the connection survives the edge's address changing (connection
//! migration). The agent also opens streams of its own towards the gateway's
//! zone, and through it to any other (the gateway relays those). It redials
//! with backoff whenever the connection is lost.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trellis_ca::tls::{CertSource, TrustStore};
use trellis_ca::{Credentials, Role, TrustBundle, TrustDomain};

use crate::config::{QuicSettings, ServiceConfig};
use crate::error::GatewayError;
use crate::peer::{LinkError, open_on};
use crate::quic;
use crate::relay::{BoxStream, QuicStream, ReadError, read_header, write_all_flush};
use crate::routes::{Routes, connect};
use crate::tunnel::{Header, Reply, ReplyCode};

/// What an edge link needs.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// The edge zone this agent belongs to.
    pub zone: String,
    /// The zone of the gateway it dials.
    pub gateway_zone: String,
    /// The gateway's address (UDP).
    pub gateway: SocketAddr,
    /// DNS suffix of mesh names.
    pub dns_suffix: String,
    /// Local address of the QUIC socket; port 0 picks one.
    pub bind: SocketAddr,
    /// Local services the gateway may reach through this link.
    pub services: Vec<ServiceConfig>,
    /// Dial, endpoint connect and reply timeout.
    pub timeout: Duration,
    /// QUIC settings, as for gateways.
    pub quic: QuicSettings,
}

/// An agent's link to a gateway: call [`EdgeLink::run`] to keep it up.
pub struct EdgeLink {
    cfg: EdgeConfig,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    routes: Arc<Routes>,
    conn: watch::Sender<Option<quinn::Connection>>,
}

impl EdgeLink {
    /// Checks the credentials (an agent of `cfg.zone`) and binds the socket.
    pub fn new(
        cfg: EdgeConfig,
        creds: Credentials,
        bundle: TrustBundle,
    ) -> Result<Self, GatewayError> {
        let id = creds.id()?;
        if !matches!(id.role(), Some(Role::Agent { ref zone, .. }) if *zone == cfg.zone) {
            return Err(GatewayError::Tls(format!(
                "{id} is not an agent identity of zone {}",
                cfg.zone
            )));
        }
        Self::with_sources(cfg, CertSource::new(creds)?, TrustStore::new(bundle))
    }

    /// A link presenting whatever `certs` holds at each handshake and
    /// trusting `trust`, so the host's renewals and bundle changes apply to
    /// the next connection.
    pub fn with_sources(
        cfg: EdgeConfig,
        certs: Arc<CertSource>,
        trust: Arc<TrustStore>,
    ) -> Result<Self, GatewayError> {
        let id = certs.id();
        if !matches!(id.role(), Some(Role::Agent { ref zone, .. }) if *zone == cfg.zone) {
            return Err(GatewayError::Tls(format!(
                "{id} is not an agent identity of zone {}",
                cfg.zone
            )));
        }
        let td: TrustDomain = id.trust_domain();
        let policy = quic::peer_policy(&td, &cfg.gateway_zone, None);
        let (client, _) = quic::client_configs(certs, trust, policy, &cfg.quic)?;
        let endpoint = quinn::Endpoint::client(cfg.bind).map_err(|source| GatewayError::Bind {
            what: "edge QUIC (UDP)",
            addr: cfg.bind,
            source,
        })?;
        Ok(Self {
            routes: Arc::new(Routes::from_config(&cfg.services)),
            cfg,
            endpoint,
            client,
            conn: watch::channel(None).0,
        })
    }

    /// The QUIC endpoint; [`quinn::Endpoint::rebind`] moves it to a new
    /// socket, as a changed address would, without losing the connection.
    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// The live connection to the gateway, once there is one.
    pub fn connection(&self) -> Option<quinn::Connection> {
        self.conn
            .borrow()
            .clone()
            .filter(|c| c.close_reason().is_none())
    }

    /// Waits until a connection is up.
    pub async fn connected(&self) -> quinn::Connection {
        let mut rx = self.conn.subscribe();
        loop {
            if let Some(c) = self.connection() {
                return c;
            }
            // The sender lives in self, so the channel cannot close here.
            let _ = rx.changed().await;
        }
    }

    /// Opens a stream towards a service of `zone`, in the trace of
    /// `traceparent` when there is one. A zone other than the gateway's is
    /// reached through it: the gateway relays the stream there.
    pub async fn open(
        &self,
        service: &str,
        namespace: &str,
        port: u16,
        zone: &str,
        traceparent: Option<&str>,
    ) -> Result<BoxStream, LinkError> {
        let header = Header {
            service: service.to_owned(),
            namespace: namespace.to_owned(),
            port,
            source_zone: self.cfg.zone.clone(),
            traceparent: traceparent.map(str::to_owned),
            subset: None,
            zone: (zone != self.cfg.gateway_zone).then(|| zone.to_owned()),
        };
        let conn = self.connection().ok_or_else(|| LinkError::Unreachable {
            zone: self.cfg.gateway_zone.clone(),
            addr: self.cfg.gateway,
            reason: "not connected yet".into(),
        })?;
        open_on(&conn, &self.cfg.gateway_zone, &header, self.cfg.timeout).await
    }

    /// Keeps the link up and serves the gateway's streams until `shutdown`;
    /// then lets open streams finish and closes the connection.
    pub async fn run(&self, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        let mut backoff = Duration::from_millis(100);
        let sni =
            crate::config::GatewayConfig::tunnel_sni(&self.cfg.gateway_zone, &self.cfg.dns_suffix);
        while !shutdown.is_cancelled() {
            let dial = async {
                let connecting = self
                    .endpoint
                    .connect_with(self.client.clone(), self.cfg.gateway, &sni)
                    .map_err(|e| e.to_string())?;
                tokio::time::timeout(self.cfg.timeout, connecting)
                    .await
                    .map_err(|_| "handshake timed out".to_string())?
                    .map_err(|e| e.to_string())
            };
            let conn = tokio::select! {
                () = shutdown.cancelled() => break,
                r = dial => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(gateway = %self.cfg.gateway, error = %e, retry_in = ?backoff, "edge link down");
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                },
            };
            backoff = Duration::from_millis(100);
            tracing::info!(gateway = %self.cfg.gateway, zone = %self.cfg.gateway_zone, "edge link up");
            self.conn.send_replace(Some(conn.clone()));
            loop {
                let next = tokio::select! {
                    () = shutdown.cancelled() => break,
                    s = conn.accept_bi() => s,
                };
                match next {
                    Ok((send, recv)) => {
                        let routes = self.routes.clone();
                        let timeout = self.cfg.timeout;
                        tracker.spawn(async move {
                            let mut stream: BoxStream = Box::new(QuicStream::new(send, recv));
                            serve(&mut stream, &routes, timeout).await;
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "edge link lost; redialling");
                        break;
                    }
                }
            }
        }
        tracker.close();
        tracker.wait().await;
        if let Some(c) = self.conn.send_replace(None) {
            c.close(0u32.into(), b"agent shutting down");
        }
        self.endpoint.wait_idle().await;
    }
}

/// A stream the gateway opened: its header names a local service.
async fn serve(stream: &mut BoxStream, routes: &Routes, timeout: Duration) {
    let header = match read_header(stream, timeout).await {
        Ok(h) => h,
        Err(e) => {
            if let ReadError::Protocol(_) = e {
                let reply = Reply::refused(ReplyCode::ProtocolError, e.to_string());
                let _ = write_all_flush(stream, &reply.encode()).await;
            }
            return;
        }
    };
    // The gateway vouches for the caller's zone: it checked it against the
    // identity of whoever opened the stream on its side.
    let (mut up, _guard) = match connect(routes, &header, timeout).await {
        Ok(c) => c,
        Err(reply) => {
            tracing::info!(%header, code = %reply.code, reason = %reply.reason, "edge stream refused");
            let _ = write_all_flush(stream, &reply.encode()).await;
            return;
        }
    };
    if write_all_flush(stream, &Reply::accepted().encode())
        .await
        .is_err()
    {
        return;
    }
    match trellis_proxy::io::splice_or_abort(&mut up, stream).await {
        Ok(_) => {
            if let Some(done) = crate::relay::Duplex::delivered(stream) {
                let _ = tokio::time::timeout(timeout * 6, done).await;
            }
        }
        Err(e) => tracing::debug!(error = %e, "edge stream aborted"),
    }
}
