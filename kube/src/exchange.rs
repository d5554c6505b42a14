//! The token exchange: `POST /v1/exchange` over TLS on the controller.
//!
//! A pod's agent sends its projected service-account token and the pod it
//! claims to be; the controller has the API server review the token
//! ([`crate::review`]) and answers a single-use agent join token (`ta1:`)
//! bound to the pod's agent name and granting exactly the pod's workload
//! identity, with a lifetime of seconds. The agent then joins through
//! `Zones.JoinAgent` as a VM does, so its keys never leave the pod and the
//! store's own checks (zone, name, workloads, single use) apply.
//!
//! Neither side logs a token.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trellis_federation::client::Servers;
use trellis_federation::proto;
use trellis_federation::proto::zones_client::ZonesClient;

use crate::error::KubeError;
use crate::review::{self, Refusal, VerifyError};

/// Most a request may hold: a token and two names.
const MAX_REQUEST: usize = 64 * 1024;
/// A client must finish its TLS handshake and request within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Exchanges in flight at once. Anyone who reaches the port can make the
/// controller ask the API server a TokenReview; past this, callers get
/// `unavailable` (and agents retry) instead of a queue on the API server.
const MAX_IN_FLIGHT: usize = 64;

/// What a pod's agent sends.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeRequest {
    /// The projected service-account token. Never logged.
    pub token: String,
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
}

/// What the controller answers a verified pod.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeReply {
    /// A single-use `ta1:` agent join token. Never logged.
    pub join_token: String,
    /// The agent name the token is bound to ([`agent_name`]).
    pub name: String,
    /// The one workload identity it grants.
    pub workload: String,
    /// Unix ms after which the token is refused.
    pub expires_ms: u64,
}

/// A refusal's body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExchangeRefusal {
    /// Stable code (`pod-gone`, `not-authenticated`, ...; `unavailable`
    /// when the API server or the store did not answer: retry).
    pub reason: String,
    /// What to check.
    pub error: String,
}

impl std::fmt::Debug for ExchangeRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExchangeRequest")
            .field("namespace", &self.namespace)
            .field("pod", &self.pod)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for ExchangeReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExchangeReply")
            .field("name", &self.name)
            .field("workload", &self.workload)
            .field("expires_ms", &self.expires_ms)
            .finish_non_exhaustive()
    }
}

/// The agent name a pod joins under: stable across restarts of its agent
/// and of a StatefulSet's pod, and unique in the zone. Agent names are DNS
/// labels (63 characters, no dots), so the pod's name is shortened and a
/// hash of `namespace/pod` (64 bits) keeps names of different pods apart:
/// pod `a-b` of namespace `c` and pod `a` of `b-c` must never share one.
pub fn agent_name(namespace: &str, pod: &str) -> String {
    let hash = trellis_federation::token::sha256_hex(format!("{namespace}/{pod}").as_bytes());
    let readable: String = pod
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(46)
        .collect();
    format!("{}-{}", readable.trim_matches('-'), &hash[..16])
}

/// The controller's side: reviews pods and mints their tokens.
pub struct Exchange {
    /// The Kubernetes API.
    pub client: kube::Client,
    /// The zone's servers, called with the controller's identity.
    pub servers: Servers,
    /// The controller's zone.
    pub zone: String,
    /// Trust domain, for the identity named in replies.
    pub trust_domain: trellis_ca::TrustDomain,
    /// The audience tokens must carry.
    pub audience: String,
    /// Lifetime of minted tokens.
    pub token_ttl: Duration,
}

// === impl Exchange ===

impl Exchange {
    /// Reviews the pod and mints its token, or says why not.
    pub async fn handle(&self, req: &ExchangeRequest) -> Result<ExchangeReply, ExchangeRefusal> {
        let unavailable = |what: &str, e: &dyn std::fmt::Display| ExchangeRefusal {
            reason: "unavailable".into(),
            error: format!("{what}: {e}"),
        };
        let me = match review::verify(
            &self.client,
            &self.audience,
            &req.token,
            &req.namespace,
            &req.pod,
        )
        .await
        {
            Ok(me) => me,
            Err(VerifyError::Refused(r)) => return Err(refusal(&r)),
            Err(VerifyError::Api(e)) => return Err(unavailable("the Kubernetes API", &e)),
        };
        let workload = self
            .trust_domain
            .workload(&me.namespace, &me.account)
            .map_err(|e| ExchangeRefusal {
                reason: "bad-identity".into(),
                error: format!("service account {}/{}: {e}", me.namespace, me.account),
            })?;
        let name = agent_name(&me.namespace, &me.pod);
        let ask = proto::TokenRequest {
            zone: self.zone.clone(),
            edge: false,
            ttl_seconds: self.token_ttl.as_secs(),
            agent: true,
            workloads: vec![format!("{}/{}", me.namespace, me.account)],
            name: name.clone(),
            // The pod's agent may lose its data directory (an emptyDir) and
            // come back under the same name; the token is single-use and
            // bound to this pod, so taking the name over is safe.
            replace: true,
        };
        let minted = self
            .servers
            .call(|ch| async move { ZonesClient::new(ch).create_join_token(ask).await })
            .await
            .map_err(|s| {
                if Servers::is_unreachable(&s) {
                    unavailable("the federation servers", &s.message())
                } else {
                    ExchangeRefusal {
                        reason: "store-refused".into(),
                        error: s.message().to_string(),
                    }
                }
            })?;
        tracing::info!(pod = %format!("{}/{}", me.namespace, me.pod), %workload, agent = %name, "exchange: pod verified, join token minted");
        Ok(ExchangeReply {
            join_token: minted.token,
            name,
            workload: workload.to_string(),
            expires_ms: minted.expires_ms,
        })
    }
}

fn refusal(r: &Refusal) -> ExchangeRefusal {
    ExchangeRefusal {
        reason: r.code().into(),
        error: r.to_string(),
    }
}

fn http_status(reason: &str) -> StatusCode {
    match reason {
        "not-authenticated" | "wrong-audience" | "not-pod-bound" => StatusCode::UNAUTHORIZED,
        "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
        "bad-request" => StatusCode::BAD_REQUEST,
        "not-found" => StatusCode::NOT_FOUND,
        _ => StatusCode::FORBIDDEN,
    }
}

/// Serves the exchange on `listener` until `shutdown`, then lets requests
/// in flight finish.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    exchange: Arc<Exchange>,
    shutdown: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(tls);
    let tracker = TaskTracker::new();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    loop {
        let (sock, from) = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "exchange: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (acceptor, exchange, stop) = (acceptor.clone(), exchange.clone(), shutdown.clone());
        let in_flight = in_flight.clone();
        tracker.spawn(async move {
            let served = tokio::time::timeout(REQUEST_TIMEOUT, async {
                let tls = acceptor.accept(sock).await?;
                let svc = hyper::service::service_fn(move |req| {
                    let (exchange, in_flight) = (exchange.clone(), in_flight.clone());
                    async move {
                        let resp = match in_flight.try_acquire() {
                            Ok(_permit) => answer(&exchange, req, from).await,
                            Err(_) => busy(),
                        };
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(tls), svc);
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => r.map_err(std::io::Error::other),
                    () = stop.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        conn.await.map_err(std::io::Error::other)
                    }
                }
            })
            .await;
            match served {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%from, error = %e, "exchange: connection failed"),
                Err(_) => tracing::info!(%from, "exchange: client too slow; closed"),
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}

fn busy() -> Response<Full<Bytes>> {
    refuse(ExchangeRefusal {
        reason: "unavailable".into(),
        error: format!("{MAX_IN_FLIGHT} exchanges in flight; retry"),
    })
}

fn json(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("a static status and header make a valid response")
}

/// A refusal as JSON, with the status its reason calls for.
fn refuse(r: ExchangeRefusal) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(&r).unwrap_or_default();
    json(http_status(&r.reason), body)
}

async fn answer(
    exchange: &Exchange,
    req: Request<Incoming>,
    from: SocketAddr,
) -> Response<Full<Bytes>> {
    if req.uri().path() != crate::EXCHANGE_PATH {
        return refuse(ExchangeRefusal {
            reason: "not-found".into(),
            error: format!("the exchange is POST {}", crate::EXCHANGE_PATH),
        });
    }
    if req.method() != Method::POST {
        return refuse(ExchangeRefusal {
            reason: "bad-request".into(),
            error: "method: use POST".into(),
        });
    }
    let body = match Limited::new(req.into_body(), MAX_REQUEST).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return refuse(ExchangeRefusal {
                reason: "bad-request".into(),
                error: format!("body: {e} (at most {MAX_REQUEST} bytes)"),
            });
        }
    };
    let ask: ExchangeRequest = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => {
            return refuse(ExchangeRefusal {
                reason: "bad-request".into(),
                error: format!("body: {e} (expected {{\"token\", \"namespace\", \"pod\"}})"),
            });
        }
    };
    match exchange.handle(&ask).await {
        Ok(reply) => json(
            StatusCode::OK,
            serde_json::to_vec(&reply).unwrap_or_default(),
        ),
        Err(r) => {
            tracing::warn!(%from, pod = %format!("{}/{}", ask.namespace, ask.pod), reason = %r.reason, error = %r.error, "exchange refused");
            refuse(r)
        }
    }
}

/// The agent's side: one exchange at `url` (`https://host:port/v1/exchange`),
/// trusting only a controller of `zone` under the root `fingerprint`.
pub async fn request(
    url: &str,
    fingerprint: &str,
    zone: &str,
    ask: &ExchangeRequest,
) -> Result<ExchangeReply, KubeError> {
    let fail = |reason: String| KubeError::Exchange {
        url: url.into(),
        reason,
    };
    let uri: http::Uri = url
        .parse()
        .map_err(|e| KubeError::config("TRELLIS_TOKEN_EXCHANGE", format!("{url:?}: {e}")))?;
    if uri.scheme_str() != Some("https") {
        return Err(KubeError::config(
            "TRELLIS_TOKEN_EXCHANGE",
            format!("{url:?} is not an https:// URL"),
        ));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| KubeError::config("TRELLIS_TOKEN_EXCHANGE", "no host"))?
        .clone();
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = authority.port_u16().unwrap_or(443);
    let tls = crate::pinned::client_config(fingerprint, zone)?;
    let name = rustls_pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| KubeError::config("TRELLIS_TOKEN_EXCHANGE", format!("host {host:?}: {e}")))?;
    let sock = tokio::time::timeout(REQUEST_TIMEOUT, TcpStream::connect((host, port)))
        .await
        .map_err(|_| fail("connect timed out".into()))?
        .map_err(|e| fail(format!("connect: {e}")))?;
    let tls = TlsConnector::from(Arc::new(tls))
        .connect(name, sock)
        .await
        .map_err(|e| KubeError::Tls(format!("{url}: {e}")))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| fail(format!("HTTP: {e}")))?;
    tokio::spawn(conn);
    let body = serde_json::to_vec(ask).map_err(|e| fail(e.to_string()))?;
    let req = Request::post(uri.path())
        .header(http::header::HOST, authority.as_str())
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| fail(e.to_string()))?;
    let resp = tokio::time::timeout(REQUEST_TIMEOUT, send.send_request(req))
        .await
        .map_err(|_| fail("no answer in time".into()))?
        .map_err(|e| fail(format!("HTTP: {e}")))?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_REQUEST)
        .collect()
        .await
        .map_err(|e| fail(format!("reading the answer: {e}")))?
        .to_bytes();
    if status.is_success() {
        return serde_json::from_slice(&body).map_err(|e| fail(format!("answer: {e}")));
    }
    let r: ExchangeRefusal = serde_json::from_slice(&body).unwrap_or_else(|_| ExchangeRefusal {
        reason: format!("http-{}", status.as_u16()),
        error: String::from_utf8_lossy(&body).into_owned(),
    });
    Err(KubeError::Refused {
        reason: r.reason,
        message: r.error,
    })
}
