//! `trellis demo-app`: a small HTTP service for demos and tests, answering
//! every request with its name, its zone and, over mTLS, the caller's
//! SPIFFE ID.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use trellis_ca::tls::{self, CertSource, PeerPolicy, TrustStore};

use crate::cli::shutdown_on_signals;

#[derive(Debug, Args)]
pub(crate) struct DemoAppArgs {
    /// The service name it answers as.
    #[arg(long)]
    name: String,
    /// The zone it says it runs in.
    #[arg(long)]
    zone: String,
    /// Where to listen.
    #[arg(long)]
    listen: SocketAddr,
    /// Serve mutual TLS with these credentials (PREFIX.crt/.key/.bundle);
    /// plain HTTP without.
    #[arg(long)]
    credentials: Option<PathBuf>,
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
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("could not start the async runtime")?
            .block_on(async move {
                let l = TcpListener::bind(self.listen)
                    .await
                    .with_context(|| format!("could not listen on {}", self.listen))?;
                println!("demo-app {} listening on {}", self.name, l.local_addr()?);
                let shutdown = CancellationToken::new();
                shutdown_on_signals(shutdown.clone())?;
                let who = Arc::new(format!("{} in zone {}", self.name, self.zone));
                loop {
                    let (sock, _) = tokio::select! {
                        () = shutdown.cancelled() => return Ok(()),
                        r = l.accept() => r?,
                    };
                    let (tls, who) = (tls.clone(), who.clone());
                    tokio::spawn(async move {
                        match tls {
                            Some(a) => {
                                let Ok(t) = a.accept(sock).await else { return };
                                let caller = tls::peer_id(t.get_ref().1.peer_certificates())
                                    .map_or_else(
                                        || "an unknown caller".into(),
                                        |id| id.to_string(),
                                    );
                                answer(t, &who, &caller).await;
                            }
                            None => answer(sock, &who, "over plain HTTP").await,
                        }
                    });
                }
            })
    }
}

/// Answers HTTP/1.1 requests on one connection until the client closes.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, who: &str, caller: &str) {
    let mut req = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
        // Requests carry no body here; answer each complete header block.
        while let Some(end) = req.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&req[..end]).to_ascii_lowercase();
            let close = head.contains("\r\nconnection: close");
            req.drain(..end + 4);
            let body = format!("{who} answered {caller}\n");
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n{body}",
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
