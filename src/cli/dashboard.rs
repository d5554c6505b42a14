//! `trellis dashboard`: a read-only web view of the mesh, served on
//! loopback with the operator's own credentials, as `linkerd viz dashboard`
//! does.
//!
//! Loopback is no boundary against the host's other users, and a browser
//! will send a request to 127.0.0.1 for any page that asks (DNS rebinding,
//! cross-site GETs). So the printed URL carries a random secret, which the
//! first request trades for an HttpOnly, SameSite=Strict cookie; every
//! request without one of them gets 401, and every request whose `Host` is
//! not this loopback address gets 421. Only GET and HEAD are served: the
//! dashboard never writes to the store.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::Args;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cli::ops::Endpoint;
use crate::cli::{UsageError, shutdown_on_signals};

mod collect;
mod graph;
mod html;

pub(crate) use collect::Source;

/// `trellis dashboard`.
#[derive(Debug, Args)]
pub(crate) struct DashboardArgs {
    #[command(flatten)]
    endpoint: Endpoint,
    /// Port on 127.0.0.1 to serve on; 0 picks a free one.
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// A gateway's admin address, as ZONE/NAME=HOST:PORT (repeat for
    /// several): the dashboard shows its `/links` answer. The store does
    /// not know admin addresses.
    #[arg(long = "gateway-admin", value_name = "ZONE/NAME=HOST:PORT", value_parser = parse_gateway_admin)]
    gateway_admins: Vec<(String, SocketAddr)>,
    /// How many of the latest audit entries to show.
    #[arg(long, default_value_t = 50)]
    audit_limit: u64,
}

/// The secret in the URL and the cookie: 32 bytes from the OS CSPRNG, as
/// hex. Never logged.
#[derive(Clone)]
struct Secret(String);

/// What every request handler shares.
struct Shared {
    source: Source,
    secret: Secret,
    port: u16,
}

/// A dashboard bound and serving.
pub(crate) struct Running {
    /// `http://127.0.0.1:PORT/?token=…`: the one way in.
    pub(crate) url: String,
    /// Ends when the dashboard stopped.
    pub(crate) task: tokio::task::JoinHandle<()>,
}

// === impl DashboardArgs ===

impl DashboardArgs {
    pub(crate) fn run(self) -> Result<()> {
        // Admin-style work: one thread is plenty, and keeps it off any
        // data-plane runtime.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?;
        let channel = self.endpoint.channel(&rt)?;
        let credentials = self
            .endpoint
            .credentials()
            .context("the dashboard reads with the operator's credentials")?
            .to_path_buf();
        let source = Source {
            channel,
            credentials,
            read: self.endpoint.read(),
            gateway_admins: self.gateway_admins.into_iter().collect::<BTreeMap<_, _>>(),
            audit_limit: self.audit_limit,
            members: Default::default(),
        };
        let port = self.port;
        rt.block_on(async move {
            let shutdown = CancellationToken::new();
            shutdown_on_signals(shutdown.clone()).context("installing signal handlers")?;
            let running = start(port, source, shutdown).await?;
            // The first line on stdout is the URL, for scripts and humans.
            noteln!("{}", running.url);
            tracing::info!("dashboard serving on 127.0.0.1 (the URL with its token is on stdout)");
            let _ = running.task.await;
            Ok::<(), anyhow::Error>(())
        })
    }
}

/// Parses `ZONE/NAME=HOST:PORT`.
fn parse_gateway_admin(s: &str) -> Result<(String, SocketAddr), String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or("write it as ZONE/NAME=HOST:PORT, e.g. east/gw1=127.0.0.1:15021")?;
    if name.split('/').count() != 2 || name.split('/').any(str::is_empty) {
        return Err(format!("{name}: name the gateway as ZONE/NAME"));
    }
    let addr = addr
        .parse()
        .map_err(|e| format!("{addr}: not an address (HOST:PORT with an IP): {e}"))?;
    Ok((name.to_owned(), addr))
}

/// Binds 127.0.0.1:`port` and serves until `shutdown`.
pub(crate) async fn start(
    port: u16,
    source: Source,
    shutdown: CancellationToken,
) -> Result<Running> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))
        .await
        .map_err(|e| UsageError(format!("dashboard: cannot listen on 127.0.0.1:{port}: {e}")))?;
    let port = listener.local_addr()?.port();
    let secret = Secret(random_hex(32)?);
    let url = format!("http://127.0.0.1:{port}/?token={}", secret.0);
    let shared = Arc::new(Shared {
        source,
        secret,
        port,
    });
    let task = tokio::spawn(serve(listener, shared, shutdown));
    Ok(Running { url, task })
}

async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let sock = tokio::select! {
            () = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((sock, _)) => sock,
                Err(e) => {
                    tracing::debug!(error = %e, "dashboard: accept failed");
                    continue;
                }
            },
        };
        let shared = shared.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(respond(&shared, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(sock), svc);
            // A page holds no state worth a drain: on shutdown, connections
            // close where they are.
            tokio::select! {
                _ = conn => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

/// 32 bytes (or `n`) from the OS CSPRNG, as hex.
fn random_hex(n: usize) -> Result<String> {
    use ring::rand::SecureRandom;
    let mut buf = vec![0u8; n];
    ring::rand::SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| anyhow::anyhow!("the system random number generator failed"))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Compares in time independent of where the inputs differ, so the secret
/// cannot be guessed a byte at a time by timing.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a request is turned away, before any route.
#[derive(Debug, PartialEq, Eq)]
enum Gate {
    /// Serve it.
    Pass,
    /// The right token in the query: set the cookie and drop the token from
    /// the address bar.
    Login,
    /// Not GET or HEAD.
    Method,
    /// `Host` is not this dashboard's loopback address (DNS rebinding).
    Host,
    /// Neither the token nor the cookie.
    Unauthenticated,
}

fn cookie_name(port: u16) -> String {
    // Cookies ignore the port: a name per port keeps two dashboards on one
    // host from overwriting each other's.
    format!("trellis_dashboard_{port}")
}

fn gate<B>(req: &Request<B>, secret: &Secret, port: u16) -> Gate {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Gate::Method;
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let allowed = [format!("127.0.0.1:{port}"), format!("localhost:{port}")];
    if !allowed.iter().any(|a| a.eq_ignore_ascii_case(host)) {
        return Gate::Host;
    }
    let query_token = req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("token="))
            .map(str::to_owned)
    });
    if let Some(t) = query_token {
        return if same(t.as_bytes(), secret.0.as_bytes()) {
            Gate::Login
        } else {
            Gate::Unauthenticated
        };
    }
    let name = cookie_name(port);
    let cookie_ok = req
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .any(|(k, v)| k == name && same(v.as_bytes(), secret.0.as_bytes()));
    if cookie_ok {
        Gate::Pass
    } else {
        Gate::Unauthenticated
    }
}

async fn respond(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match gate(&req, &shared.secret, shared.port) {
        Gate::Pass => {}
        Gate::Login => {
            let mut r = text(StatusCode::SEE_OTHER, "signed in\n");
            r.headers_mut()
                .insert(header::LOCATION, HeaderValue::from_static("/"));
            let cookie = format!(
                "{}={}; HttpOnly; SameSite=Strict; Path=/",
                cookie_name(shared.port),
                shared.secret.0
            );
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            return r;
        }
        Gate::Method => {
            let mut r = text(
                StatusCode::METHOD_NOT_ALLOWED,
                "the dashboard is read-only\n",
            );
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return r;
        }
        Gate::Host => {
            return text(
                StatusCode::MISDIRECTED_REQUEST,
                "open the dashboard at 127.0.0.1 or localhost, with the port it printed\n",
            );
        }
        Gate::Unauthenticated => {
            return text(
                StatusCode::UNAUTHORIZED,
                "open the URL `trellis dashboard` printed: it carries the token\n",
            );
        }
    }
    match req.uri().path() {
        "/" => {
            let snap = shared.source.snapshot().await;
            let nonce = match random_hex(16) {
                Ok(n) => n,
                Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e:#}\n")),
            };
            let mut r = with_type(html::page(&snap, &nonce), "text/html; charset=utf-8");
            let csp = format!(
                "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
            );
            if let Ok(v) = HeaderValue::from_str(&csp) {
                r.headers_mut().insert(header::CONTENT_SECURITY_POLICY, v);
            }
            r
        }
        "/api/state" => {
            let snap = shared.source.snapshot().await;
            json(&snap)
        }
        "/api/sections" => {
            let snap = shared.source.snapshot().await;
            let sections: serde_json::Map<String, serde_json::Value> = html::sections(&snap)
                .into_iter()
                .map(|(id, body)| (id.to_owned(), body.into()))
                .collect();
            json(&serde_json::json!({
                "taken": html::time(snap.taken_ms),
                "sections": sections,
            }))
        }
        // Browsers ask for one unbidden; an empty answer keeps a 404 out of
        // the console.
        "/favicon.ico" => text(StatusCode::NO_CONTENT, ""),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn json<T: serde::Serialize>(v: &T) -> Response<Full<Bytes>> {
    match serde_json::to_string(v) {
        Ok(s) => with_type(s, "application/json"),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
    }
}

fn text(code: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = with_type(body.to_owned(), "text/plain; charset=utf-8");
    *r.status_mut() = code;
    r
}

/// A 200 with the headers every answer carries: nothing cached (it holds
/// the mesh's state), no framing, no referrer, no type sniffing.
fn with_type(body: String, ctype: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: Method, uri: &str, host: &str, cookie: Option<&str>) -> Request<()> {
        let mut b = Request::builder()
            .method(method)
            .uri(uri)
            .header("host", host);
        if let Some(c) = cookie {
            b = b.header("cookie", c);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn the_gate_wants_loopback_host_and_the_secret() {
        let s = Secret("abcd".into());
        let h = "127.0.0.1:9000";
        let g = |r: Request<()>| gate(&r, &s, 9000);
        assert_eq!(g(req(Method::GET, "/", h, None)), Gate::Unauthenticated);
        assert_eq!(g(req(Method::GET, "/?token=abcd", h, None)), Gate::Login);
        assert_eq!(
            g(req(Method::GET, "/?token=abce", h, None)),
            Gate::Unauthenticated
        );
        assert_eq!(
            g(req(Method::GET, "/?token=abcd", "evil.example:9000", None)),
            Gate::Host
        );
        assert_eq!(g(req(Method::GET, "/", "127.0.0.1:9001", None)), Gate::Host);
        let ok = Some("x=1; trellis_dashboard_9000=abcd");
        assert_eq!(g(req(Method::GET, "/api/state", h, ok)), Gate::Pass);
        assert_eq!(g(req(Method::GET, "/", "localhost:9000", ok)), Gate::Pass);
        assert_eq!(
            g(req(
                Method::GET,
                "/",
                h,
                Some("trellis_dashboard_9001=abcd")
            )),
            Gate::Unauthenticated
        );
        assert_eq!(g(req(Method::POST, "/", h, ok)), Gate::Method);
    }

    #[test]
    fn gateway_admin_flags_parse_or_say_how() {
        assert_eq!(
            parse_gateway_admin("east/gw1=127.0.0.1:15021").unwrap(),
            ("east/gw1".into(), "127.0.0.1:15021".parse().unwrap())
        );
        assert!(parse_gateway_admin("east=127.0.0.1:1").is_err());
        assert!(parse_gateway_admin("east/gw1").is_err());
    }

    #[test]
    fn secrets_are_long_and_differ() {
        let (a, b) = (random_hex(32).unwrap(), random_hex(32).unwrap());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
    }
}
