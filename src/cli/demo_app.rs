//! `trellis demo-app`: a small HTTP service for demos and tests, answering
//! every request with its name, its zone and, over mTLS, the caller's
//! SPIFFE ID. With `--call` it first calls its downstreams and adds their
//! answers, one `-> ` line per hop, so a chain of demo apps shows the path
//! a request took through the mesh.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use trellis_ca::tls::{self, CertSource, PeerPolicy, TrustStore};

use crate::cli::{parse_duration, shutdown_on_signals};

// Shared with `trellis load`, which calls the same way an app does.
pub(crate) mod call;

use call::{CallUrl, Client, Resolver};

#[derive(Debug, Args)]
pub(crate) struct DemoAppArgs {
    /// The service name it answers as.
    #[arg(long)]
    name: String,
    /// The zone it says it runs in.
    #[arg(long)]
    zone: String,
    /// The version it says it is (`catalog v2 in zone west`), as a canary.
    #[arg(long, value_name = "VERSION")]
    app_version: Option<String>,
    /// Read faults to act out from this file on every request, while it
    /// exists: lines `fail PERCENT [STATUS]` (answer STATUS, default 503,
    /// to that share of requests) and `delay DURATION`. For trying retries,
    /// timeouts and outlier detection on a live mesh.
    #[arg(long, value_name = "FILE")]
    faults: Option<PathBuf>,
    /// Where to listen.
    #[arg(long)]
    listen: SocketAddr,
    /// Serve mutual TLS with these credentials (PREFIX.crt/.key/.bundle);
    /// plain HTTP without.
    #[arg(long)]
    credentials: Option<PathBuf>,
    /// Call this plain HTTP URL on every request served and include its
    /// answer; repeat to call several, in order. Any failure answers 502.
    #[arg(long = "call", value_name = "URL")]
    calls: Vec<CallUrl>,
    /// Resolve --call host names with this DNS server over UDP (e.g. the
    /// agent's mesh DNS, 127.0.0.1:8600) instead of the system resolver.
    #[arg(long, value_name = "ADDR")]
    dns: Option<SocketAddr>,
    /// How long one --call may take, from resolving to the last byte.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    call_timeout: Duration,
}

/// What every connection needs to answer.
struct App {
    /// "NAME VERSION in zone ZONE" (or without a version), the start of
    /// this hop's line.
    who: String,
    faults: Option<PathBuf>,
    calls: Vec<CallUrl>,
    client: Client,
}

impl DemoAppArgs {
    pub(crate) fn run(self) -> Result<()> {
        let tls = match &self.credentials {
            Some(prefix) => {
                let (creds, bundle) = trellis_ca::load_credentials(prefix)?;
                let cfg = tls::server_config(
                    CertSource::new(creds)?,
                    TrustStore::new(bundle),
                    PeerPolicy::TrustDomain,
                )?;
                Some(TlsAcceptor::from(Arc::new(cfg)))
            }
            None => None,
        };
        let app = Arc::new(App {
            who: match &self.app_version {
                Some(v) => format!("{} {v} in zone {}", self.name, self.zone),
                None => format!("{} in zone {}", self.name, self.zone),
            },
            faults: self.faults,
            calls: self.calls,
            client: Client {
                resolver: self.dns.map_or(Resolver::System, Resolver::Dns),
                timeout: self.call_timeout,
            },
        });
        for url in &app.calls {
            tracing::info!(%url, resolver = ?app.client.resolver, "calling on every request");
        }
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("could not start the async runtime")?
            .block_on(async move {
                let l = TcpListener::bind(self.listen)
                    .await
                    .with_context(|| format!("could not listen on {}", self.listen))?;
                noteln!("demo-app {} listening on {}", self.name, l.local_addr()?);
                let shutdown = CancellationToken::new();
                shutdown_on_signals(shutdown.clone())?;
                loop {
                    let (sock, _) = tokio::select! {
                        () = shutdown.cancelled() => return Ok(()),
                        r = l.accept() => r?,
                    };
                    let (tls, app) = (tls.clone(), app.clone());
                    tokio::spawn(async move {
                        match tls {
                            Some(a) => {
                                let Ok(t) = a.accept(sock).await else { return };
                                let caller = tls::peer_id(t.get_ref().1.peer_certificates())
                                    .map_or_else(
                                        || "an unknown caller".into(),
                                        |id| id.to_string(),
                                    );
                                answer(t, &app, &caller).await;
                            }
                            None => answer(sock, &app, "over plain HTTP").await,
                        }
                    });
                }
            })
    }
}

/// Answers HTTP/1.1 requests on one connection until the client closes.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, app: &App, caller: &str) {
    let mut req = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
        // Requests carry no body here; answer each complete header block.
        while let Some(end) = req.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&req[..end]).into_owned();
            let close = head.to_ascii_lowercase().contains("\r\nconnection: close");
            req.drain(..end + 4);
            let (status, body) = app.respond(caller, &trace_context(&head)).await;
            let resp = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n{body}",
                body.len(),
                if close { "connection: close\r\n" } else { "" }
            );
            if s.write_all(resp.as_bytes()).await.is_err() || close {
                let _ = s.shutdown().await;
                return;
            }
        }
        if req.len() > 64 * 1024 {
            return;
        }
    }
}

// === impl App ===

impl App {
    /// This hop's line, then each downstream's lines in call order. A call
    /// that fails, or answers other than 2xx, adds a line saying so and
    /// makes the whole answer a 502, so the failure travels back up the
    /// chain with every hop that saw it.
    async fn respond(
        &self,
        caller: &str,
        trace: &[(&'static str, String)],
    ) -> (StatusCode, String) {
        if let Some(f) = self.faults.as_deref().map(Faults::read) {
            if let Some(d) = f.delay {
                tokio::time::sleep(d).await;
            }
            if let Some((percent, status)) = f.fail
                && fastrand::f64() * 100.0 < percent
            {
                return (
                    status,
                    format!("{} failed on purpose ({status})\n", self.who),
                );
            }
        }
        let mut status = StatusCode::OK;
        let mut body = format!("{} answered {caller}\n", self.who);
        for url in &self.calls {
            let failure = match self.client.get(url, trace).await {
                Ok((code, text)) => {
                    add_hops(&mut body, &text);
                    (!code.is_success()).then(|| format!("answered {code}"))
                }
                Err(e) => Some(format!("{e:#}")),
            };
            if let Some(reason) = failure {
                tracing::warn!(%url, %reason, "downstream call failed");
                body.push_str(&format!("-> call to {url} failed: {reason}\n"));
                status = StatusCode::BAD_GATEWAY;
            }
        }
        (status, body)
    }
}

/// The W3C trace context of a request head, to pass on to the calls made
/// for it, as an instrumented app (or one that forwards the headers, as
/// Istio asks of apps) does: that is what joins the hops into one trace.
fn trace_context(head: &str) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    for line in head.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        for known in ["traceparent", "tracestate"] {
            if name.trim().eq_ignore_ascii_case(known) {
                out.push((known, value.trim().to_owned()));
            }
        }
    }
    out
}

/// Faults to act out, read from the `--faults` file.
#[derive(Debug, Default, PartialEq)]
struct Faults {
    fail: Option<(f64, StatusCode)>,
    delay: Option<Duration>,
}

impl Faults {
    /// The file's faults; none while it is missing. A line that does not
    /// parse is logged and skipped, so a typo never stops the app.
    fn read(path: &std::path::Path) -> Self {
        std::fs::read_to_string(path)
            .map(|t| Self::parse(&t))
            .unwrap_or_default()
    }

    fn parse(text: &str) -> Self {
        let mut f = Self::default();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["fail", pct, rest @ ..] => {
                    let status = rest
                        .first()
                        .and_then(|s| s.parse::<u16>().ok())
                        .and_then(|s| StatusCode::from_u16(s).ok())
                        .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                    match pct.parse::<f64>() {
                        Ok(p) => f.fail = Some((p, status)),
                        Err(_) => tracing::warn!(%line, "faults: not a percentage"),
                    }
                }
                ["delay", d] => match humantime::parse_duration(d) {
                    Ok(d) => f.delay = Some(d),
                    Err(e) => tracing::warn!(%line, error = %e, "faults: not a duration"),
                },
                _ => {
                    tracing::warn!(%line, "faults: expected `fail PERCENT [STATUS]` or `delay DURATION`")
                }
            }
        }
        f
    }
}

/// Appends a downstream's answer, one `-> ` line per hop. The downstream's
/// own downstreams already carry the marker, so the path stays flat instead
/// of growing a `-> -> ` staircase.
fn add_hops(body: &mut String, downstream: &str) {
    for line in downstream.lines().filter(|l| !l.trim().is_empty()) {
        if !line.starts_with("-> ") {
            body.push_str("-> ");
        }
        body.push_str(line);
        body.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_read_their_lines_and_skip_typos() {
        let f = Faults::parse("fail 30\ndelay 250ms\nfial 3\n");
        assert_eq!(f.fail, Some((30.0, StatusCode::SERVICE_UNAVAILABLE)));
        assert_eq!(f.delay, Some(Duration::from_millis(250)));
        let f = Faults::parse("fail 100 500\n");
        assert_eq!(f.fail, Some((100.0, StatusCode::INTERNAL_SERVER_ERROR)));
        assert_eq!(Faults::parse(""), Faults::default());
    }

    #[test]
    fn the_trace_context_is_passed_on_and_nothing_else() {
        let head = "GET / HTTP/1.1\r\nHost: a\r\nTraceParent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\ntracestate: k=v\r\nx-other: 1";
        assert_eq!(
            trace_context(head),
            vec![
                (
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned()
                ),
                ("tracestate", "k=v".to_owned())
            ]
        );
        assert!(trace_context("GET / HTTP/1.1\r\nHost: a").is_empty());
    }

    #[test]
    fn downstream_hops_are_marked_once() {
        let mut body = "frontend in zone east answered over plain HTTP\n".to_owned();
        add_hops(
            &mut body,
            "auth in zone east answered over plain HTTP\n-> catalog in zone west answered over plain HTTP\n\n",
        );
        assert_eq!(
            body,
            "frontend in zone east answered over plain HTTP\n\
             -> auth in zone east answered over plain HTTP\n\
             -> catalog in zone west answered over plain HTTP\n"
        );
    }
}
