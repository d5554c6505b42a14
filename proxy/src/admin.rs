//! An admin HTTP endpoint for any Trellis process: `/metrics` (Prometheus
//! text), `/ready` (503 while draining), `/healthz` and `/config_dump` (the
//! effective configuration). The gateway and the agent both serve it, and a
//! process may add read-only JSON reports of its own (the gateway's
//! `/links`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A read-only JSON document computed at each request (e.g. the gateway's
/// links to its peers). It may do network work, such as dialling a peer.
pub type Report = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

/// What the admin endpoint shows.
pub struct Admin {
    /// The process's metrics.
    pub registry: Registry,
    /// Set when the drain starts; `/ready` then answers 503.
    pub draining: Arc<AtomicBool>,
    /// The effective configuration, as TOML.
    pub config: String,
    /// Extra JSON reports by path (`/links`), answered with `application/json`.
    pub reports: Vec<(&'static str, Report)>,
}

impl Admin {
    /// Serves on `listener` until `shutdown`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        loop {
            let (sock, _) = tokio::select! {
                () = shutdown.cancelled() => return,
                r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
            };
            let me = self.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let me = me.clone();
                    async move {
                        let path = req.uri().path();
                        if let Some((_, report)) = me.reports.iter().find(|(p, _)| *p == path) {
                            let body = report().await;
                            return Ok::<_, std::convert::Infallible>(reply(
                                StatusCode::OK,
                                "application/json",
                                body,
                            ));
                        }
                        Ok(me.respond(path))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(sock), svc)
                    .await;
            });
        }
    }

    fn respond(&self, path: &str) -> Response<Full<Bytes>> {
        let (code, ctype, body) = match path {
            "/metrics" => {
                let mut out = String::new();
                match prometheus_client::encoding::text::encode(&mut out, &self.registry) {
                    Ok(()) => (
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        out,
                    ),
                    Err(e) => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain",
                        e.to_string(),
                    ),
                }
            }
            "/ready" if self.draining.load(Ordering::SeqCst) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "draining\n".into(),
            ),
            "/ready" | "/healthz" => (StatusCode::OK, "text/plain", "ok\n".into()),
            "/config_dump" => (StatusCode::OK, "application/toml", self.config.clone()),
            _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        };
        reply(code, ctype, body)
    }
}

fn reply(code: StatusCode, ctype: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    if let Ok(v) = http::HeaderValue::from_str(ctype) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}
