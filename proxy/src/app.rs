//! The last hop of a forwarded request: from the proxy that admitted it to
//! the app itself, in the HTTP version the app speaks. The callee's sidecar
//! uses it for its local apps; a zone's gateway for the plain services it
//! terminates for.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use http::{HeaderValue, Request, Response, Uri, Version, header};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::forward::Body;
use crate::hbone::AppProtocol;

/// Connections to apps: pooled keep-alive HTTP/1.1, and one multiplexed
/// connection per address for apps that speak HTTP/2.
pub struct Apps {
    h1: Client<HttpConnector, Body>,
    h2: Mutex<HashMap<SocketAddr, SendRequest<Body>>>,
    connect_timeout: Duration,
}

/// Why a request did not reach its app.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The request's target cannot be made into the app's URI.
    #[error("bad request target")]
    BadTarget,
    /// The app could not be reached or did not answer.
    #[error("{0}")]
    Unreachable(String),
}

impl std::fmt::Debug for Apps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Apps")
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}

impl Apps {
    /// Clients that give up connecting after `connect_timeout`.
    pub fn new(connect_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        let h1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .set_host(false)
            .build(connector);
        Self {
            h1,
            h2: Mutex::new(HashMap::new()),
            connect_timeout,
        }
    }

    /// Sends a request (hop-by-hop headers already stripped) to the app at
    /// `app`: HTTP/1.1 with the request's path and a `Host` from its
    /// authority, or HTTP/2 as it is.
    pub async fn send(
        &self,
        app: SocketAddr,
        protocol: AppProtocol,
        mut parts: http::request::Parts,
        body: Body,
    ) -> Result<Response<Incoming>, AppError> {
        match protocol {
            AppProtocol::Http1 => {
                parts.version = Version::HTTP_11;
                let authority = parts.uri.authority().map(|a| a.to_string());
                if !parts.headers.contains_key(header::HOST)
                    && let Some(h) = authority
                        .as_deref()
                        .and_then(|a| HeaderValue::from_str(a).ok())
                {
                    parts.headers.insert(header::HOST, h);
                }
                let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                parts.uri = format!("http://{app}{path}")
                    .parse::<Uri>()
                    .map_err(|_| AppError::BadTarget)?;
                self.h1
                    .request(Request::from_parts(parts, body))
                    .await
                    .map_err(|e| AppError::Unreachable(e.to_string()))
            }
            AppProtocol::Http2 => {
                parts.version = Version::HTTP_2;
                let mut send = self.h2(app).await.map_err(AppError::Unreachable)?;
                send.send_request(Request::from_parts(parts, body))
                    .await
                    .map_err(|e| AppError::Unreachable(e.to_string()))
            }
        }
    }

    /// The multiplexed connection to an app that speaks HTTP/2. The lock is
    /// never held while connecting: one app that does not answer must not
    /// hold up requests for the others. Two requests that find no
    /// connection at once may both dial; the later one is kept.
    async fn h2(&self, app: SocketAddr) -> Result<SendRequest<Body>, String> {
        let open = |m: &HashMap<SocketAddr, SendRequest<Body>>| {
            m.get(&app).filter(|s| !s.is_closed()).cloned()
        };
        if let Some(s) = open(&self.h2.lock().unwrap_or_else(PoisonError::into_inner)) {
            return Ok(s);
        }
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(app))
            .await
            .map_err(|_| "connect timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        // Pings, so an app that vanished (a pod gone from the network) is
        // noticed before requests wait on it for TCP's own timeouts.
        let (send, c) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(crate::hbone::KEEPALIVE_INTERVAL)
            .keep_alive_timeout(crate::hbone::KEEPALIVE_TIMEOUT)
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = c.await;
        });
        let mut conns = self.h2.lock().unwrap_or_else(PoisonError::into_inner);
        // Apps come and go (pod addresses churn): closed ones are dropped here.
        conns.retain(|_, s| !s.is_closed());
        conns.insert(app, send.clone());
        Ok(send)
    }
}
