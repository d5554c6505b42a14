//! `trellis webhook`: the mutating admission webhook that injects the agent
//! into pods as the API server creates them. AdmissionReview v1 in, an RFC
//! 6902 JSON patch out, over HTTPS with a certificate from the mesh CA.
//!
//! The patch is the difference between the pod the API server sent and the
//! pod [`inject_template`] makes of it: the very function `trellis inject`
//! runs, so a pod admitted here equals the pod the offline command prints.
//!
//! Which pods reach the webhook is the `MutatingWebhookConfiguration`'s
//! business (`configs/kubernetes/base/webhook.yaml`): a namespace labelled
//! `trellis.io/inject: enabled`, or a pod labelled so. Being called is
//! therefore the namespace's opt-in; a pod's own `disabled` still wins.
//! Its failure policy is `Fail`; the README says why.
//!
//! [`serve_webhook`] is a library function: the zone controller can serve
//! the webhook on its own listener, as `trellis webhook` does alone.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use base64::Engine as _;
use bytes::Bytes;
use clap::Args;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trellis_ca::tls::CertSource;

use crate::cli::inject::{
    InjectFlags, InjectOptions, NamespaceSays, Outcome, PodContext, inject_template,
};

/// The path the `MutatingWebhookConfiguration` calls.
pub(crate) const PATH: &str = "/inject";
/// The API server sends at most a few MiB; a larger body is not a pod.
const MAX_BODY: usize = 8 << 20;
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open requests may take to finish after a shutdown signal.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// Serve the admission webhook.
#[derive(Debug, Args)]
pub(crate) struct WebhookArgs {
    /// Address to listen on (HTTPS).
    #[arg(long, default_value = "0.0.0.0:15017")]
    listen: SocketAddr,
    /// Credentials from `trellis ca issue --dns-name SERVICE.NAMESPACE.svc
    /// --out PREFIX`: PREFIX.crt and PREFIX.key. Changed files are picked
    /// up within 10 s (a rotated Secret); SIGHUP rereads them at once.
    #[arg(long, value_name = "PREFIX")]
    credentials: PathBuf,
    #[command(flatten)]
    flags: InjectFlags,
}

/// How often the credential files are checked for a change.
const CREDENTIALS_POLL: std::time::Duration = std::time::Duration::from_secs(10);

impl WebhookArgs {
    pub(crate) fn run(self) -> Result<()> {
        let opts = Arc::new(self.flags.options_in_cluster()?);
        let (creds, bundle) = trellis_ca::load_credentials(&self.credentials)
            .with_context(|| format!("could not load {}", self.credentials.display()))?;
        let certs = CertSource::new(creds).context("the webhook credentials")?;
        let trust = trellis_ca::tls::TrustStore::new(bundle);
        let tls = Arc::new(server_tls(certs.clone())?);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("could not start the runtime")?;
        rt.block_on(async move {
            let listener = TcpListener::bind(self.listen)
                .await
                .with_context(|| format!("could not listen on {}", self.listen))?;
            let addr = listener.local_addr()?;
            let shutdown = CancellationToken::new();
            crate::cli::shutdown_on_signals(shutdown.clone())?;
            // In a cluster the credentials are a mounted Secret, which the
            // kubelet replaces in place and nobody signals: follow the files
            // as the gateway does. SIGHUP still rereads them at once.
            tokio::spawn(trellis_ca::reload::watch(
                self.credentials.clone(),
                |_| true,
                certs.clone(),
                trust,
                CREDENTIALS_POLL,
                shutdown.clone(),
            ));
            let prefix = self.credentials.clone();
            crate::cli::on_sighup(move || {
                match trellis_ca::load_credentials(&prefix)
                    .map_err(|e| e.to_string())
                    .and_then(|(c, _)| certs.swap(c).map_err(|e| e.to_string()))
                {
                    Ok(()) => tracing::info!("webhook credentials reloaded"),
                    Err(e) => tracing::error!(error = %e, "webhook credentials not reloaded; the old ones stay"),
                }
            })?;
            noteln!("webhook listening on https://{addr}{PATH}");
            tracing::info!(cluster_dns = %opts.cluster_dns, zone = %opts.zone, image = %opts.image, "injecting");
            serve_webhook(listener, tls, opts, shutdown).await;
            Ok(())
        })
    }
}

/// A TLS 1.3 server config presenting `certs` (no client certificate: the
/// API server does not send one unless configured to).
pub(crate) fn server_tls(certs: Arc<CertSource>) -> Result<rustls::ServerConfig> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(trellis_ca::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Answers AdmissionReviews on `listener` until `shutdown`, then gives open
/// requests [`DRAIN_DEADLINE`] to finish.
pub(crate) async fn serve_webhook(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    opts: Arc<InjectOptions>,
    shutdown: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(tls);
    let tracker = TaskTracker::new();
    loop {
        let (sock, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and the like: back off rather than spin.
                    tracing::warn!(error = %e, "webhook: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // A review is one small request and one small answer: without
        // this, Nagle holds the answer's last segment for the client's
        // delayed ACK (40 ms measured on a fresh connection).
        let _ = sock.set_nodelay(true);
        let acceptor = acceptor.clone();
        let opts = opts.clone();
        let stop = shutdown.clone();
        tracker.spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "webhook: TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let svc = hyper::service::service_fn(move |req| {
                let opts = opts.clone();
                async move { Ok::<_, Infallible>(handle(&opts, req).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(tls), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(DRAIN_DEADLINE, conn).await;
                }
            }
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(DRAIN_DEADLINE, tracker.wait()).await;
}

async fn handle(opts: &InjectOptions, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() != PATH {
        return plain(
            StatusCode::NOT_FOUND,
            format!("no such path; the webhook is at {PATH}"),
        );
    }
    if req.method() != Method::POST {
        return plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST an AdmissionReview".into(),
        );
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("could not read the body: {e}"),
            );
        }
    };
    match review(opts, &body) {
        Ok(v) => Response::builder()
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(v.to_string())))
            .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, String::new())),
        Err(reason) => plain(StatusCode::BAD_REQUEST, reason),
    }
}

fn plain(code: StatusCode, text: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = code;
    r
}

/// The AdmissionReview answering `body`, or why `body` is not one (a 400:
/// the API server then applies the failure policy).
pub(crate) fn review(opts: &InjectOptions, body: &[u8]) -> Result<Value, String> {
    let review: Value =
        serde_json::from_slice(body).map_err(|e| format!("not an AdmissionReview: {e}"))?;
    if review.get("apiVersion").and_then(Value::as_str) != Some("admission.k8s.io/v1") {
        return Err("apiVersion: only admission.k8s.io/v1 AdmissionReviews are served".into());
    }
    let req = review.get("request").ok_or("request: missing")?;
    let uid = req
        .get("uid")
        .and_then(Value::as_str)
        .ok_or("request.uid: missing")?;
    let respond = |extra: Value| {
        let mut response = json!({ "uid": uid, "allowed": true });
        if let (Value::Object(r), Value::Object(x)) = (&mut response, extra) {
            r.extend(x);
        }
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": response,
        })
    };
    let kind = req.pointer("/kind/kind").and_then(Value::as_str);
    let operation = req.get("operation").and_then(Value::as_str);
    if kind != Some("Pod") || operation != Some("CREATE") {
        // Not ours to change; the configuration asks only for pod creations.
        return Ok(respond(json!({})));
    }
    let Some(before) = req.get("object") else {
        return Err("request.object: missing".into());
    };
    // A pod from a Deployment has no namespace in its metadata yet: the
    // request says where it goes.
    let namespace = req.get("namespace").and_then(Value::as_str).or_else(|| {
        before
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
    });
    let mut after = before.clone();
    let cx = PodContext {
        namespace,
        namespace_says: NamespaceSays::Enabled,
    };
    let refuse = |message: String| {
        respond(json!({
            "allowed": false,
            "status": { "code": 400, "reason": "BadRequest", "message": message },
        }))
    };
    let outcome = match inject_template(opts, &mut after, cx) {
        Ok(o) => o,
        Err(e) => return Ok(refuse(format!("trellis inject: {}: {}", e.field, e.reason))),
    };
    Ok(match outcome {
        Outcome::Injected => {
            let patch = json_patch::diff(before, &after);
            let bytes = serde_json::to_vec(&patch).map_err(|e| e.to_string())?;
            respond(json!({
                "patchType": "JSONPatch",
                "patch": base64::engine::general_purpose::STANDARD.encode(bytes),
            }))
        }
        Outcome::Skipped(why) => respond(json!({
            "warnings": [format!("trellis: opted in but not injected: {why}")],
        })),
        Outcome::AlreadyInjected | Outcome::NotOptedIn => respond(json!({})),
    })
}
