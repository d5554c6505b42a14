//! Health checks of the local apps: TCP connect, HTTP GET or a command, with
//! thresholds so that one slow check does not flap the state. The state
//! gates the sidecar's inbound side (an unhealthy app's callers are refused
//! at once), is exported as a metric, and registration carries each change
//! to the store at once.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::config::{HealthCheck, HealthKind};

/// Whether one local app is healthy; starts healthy until checks say otherwise.
#[derive(Debug, Clone)]
pub(crate) struct Health(Arc<tokio::sync::watch::Sender<bool>>);

impl Health {
    pub(crate) fn new() -> Self {
        Self(Arc::new(tokio::sync::watch::Sender::new(true)))
    }

    pub(crate) fn is_healthy(&self) -> bool {
        *self.0.borrow()
    }

    fn set(&self, healthy: bool) {
        self.0.send_replace(healthy);
    }

    /// Sees every change.
    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<bool> {
        self.0.subscribe()
    }
}

/// Runs `check` against the app on `port` until `shutdown`, updating `health`.
pub(crate) async fn run(
    check: HealthCheck,
    service: String,
    addr: SocketAddr,
    health: Health,
    shutdown: CancellationToken,
) {
    let (mut fails, mut oks) = (0u32, 0u32);
    let mut tick = tokio::time::interval(check.interval);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let ok = matches!(
            tokio::time::timeout(check.timeout, probe(&check, addr)).await,
            Ok(Ok(()))
        );
        if ok {
            (oks, fails) = (oks + 1, 0);
        } else {
            (fails, oks) = (fails + 1, 0);
        }
        let was = health.is_healthy();
        if was && fails >= check.unhealthy_threshold {
            health.set(false);
            tracing::warn!(%service, failures = fails, "app is unhealthy; refusing its inbound connections");
        } else if !was && oks >= check.healthy_threshold {
            health.set(true);
            tracing::info!(%service, "app is healthy again");
        }
    }
}

async fn probe(check: &HealthCheck, addr: SocketAddr) -> Result<(), String> {
    match check.kind {
        HealthKind::Tcp => TcpStream::connect(addr)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        HealthKind::Http => {
            let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            let req = format!(
                "GET {} HTTP/1.1\r\nhost: {addr}\r\nuser-agent: trellis-agent\r\nconnection: close\r\n\r\n",
                check.path
            );
            s.write_all(req.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            // The status line is all we need: "HTTP/1.1 200 ...".
            let mut head = [0u8; 12];
            s.read_exact(&mut head).await.map_err(|e| e.to_string())?;
            match &head[9..10] {
                b"2" if head.starts_with(b"HTTP/1.") => Ok(()),
                _ => Err(format!("status {}", String::from_utf8_lossy(&head[9..12]))),
            }
        }
        HealthKind::Command => {
            let (prog, args) = check.command.split_first().ok_or("no command")?;
            let status = tokio::process::Command::new(prog)
                .args(args)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .status()
                .await
                .map_err(|e| e.to_string())?;
            if status.success() {
                Ok(())
            } else {
                Err(format!("exit {status}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn check(kind: HealthKind, command: &[&str]) -> HealthCheck {
        HealthCheck {
            kind,
            path: "/healthz".into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            unhealthy_threshold: 1,
            healthy_threshold: 1,
        }
    }

    /// An HTTP server answering every request with `status`.
    async fn http(status: &'static str) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        port
    }

    fn any() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 1))
    }

    #[tokio::test]
    async fn each_kind_of_probe_tells_healthy_from_unhealthy() {
        let http_check = check(HealthKind::Http, &[]);
        assert!(probe(&http_check, http("200 OK").await).await.is_ok());
        let err = probe(&http_check, http("503 Service Unavailable").await)
            .await
            .unwrap_err();
        assert!(err.contains("503"), "{err}");
        assert!(
            probe(&check(HealthKind::Command, &["true"]), any())
                .await
                .is_ok()
        );
        assert!(
            probe(&check(HealthKind::Command, &["false"]), any())
                .await
                .is_err()
        );
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(probe(&check(HealthKind::Tcp, &[]), closed).await.is_err());
    }
}
