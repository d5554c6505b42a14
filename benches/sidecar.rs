//! A sidecar pair against a direct connection, in one run on this machine.
//!
//! `cargo bench --bench sidecar` starts two `trellis agent` processes (a
//! caller's and a server's host, one zone), a small HTTP/1.1 app, and sends
//! 1 KiB POSTs answered by 1 KiB at a fixed rate over one keep-alive
//! connection: directly to the app, then through the caller's outbound
//! listener and the server's mTLS inbound. It prints p50/p99/p99.9 with
//! ratios, and each agent's resident memory idle and under that load.
//! `BENCH_RATE` and `BENCH_SECS` override the load (default 200/s for 10 s).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use trellis_ca::{CaDir, DEFAULT_ROOT_TTL, DEFAULT_ZONE_TTL, IssueOptions};
use trellis_gateway::testing::fixed_rate_latency;

const BODY: usize = 1024;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The app: answers each `POST` with 1 KiB body by a 1 KiB body.
async fn app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let (r, mut w) = s.into_split();
                let mut r = tokio::io::BufReader::new(r);
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {BODY}\r\n\r\n{}",
                    "b".repeat(BODY)
                );
                loop {
                    // Headers until the blank line, then the fixed body.
                    let mut line = String::new();
                    loop {
                        line.clear();
                        match tokio::io::AsyncBufReadExt::read_line(&mut r, &mut line).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) if line == "\r\n" => break,
                            Ok(_) => {}
                        }
                    }
                    let mut body = [0u8; BODY];
                    if r.read_exact(&mut body).await.is_err()
                        || w.write_all(resp.as_bytes()).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

async fn latency(addr: SocketAddr, rate: u32, secs: u32) -> (Duration, Duration, Duration) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let req = format!(
        "POST / HTTP/1.1\r\nhost: catalog.shop.mesh\r\ncontent-length: {BODY}\r\n\r\n{}",
        "a".repeat(BODY)
    );
    let resp_len = format!("HTTP/1.1 200 OK\r\ncontent-length: {BODY}\r\n\r\n").len() + BODY;
    fixed_rate_latency(&mut s, req.as_bytes(), resp_len, rate, secs).await
}

fn start_agent(cfg: &std::path::Path) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["agent", "--config", cfg.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("listening"), "{line:?}");
    Proc(child)
}

fn env(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let rate = env("BENCH_RATE", 200);
    let secs = env("BENCH_SECS", 10);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = CaDir::new(dir.join("ca"));
    let td = "trellis.local".parse().unwrap();
    ca.init(&td, DEFAULT_ROOT_TTL).unwrap();
    let zone = ca.create_zone("east", DEFAULT_ZONE_TTL).unwrap();
    let bundle = ca.bundle().unwrap();
    for account in ["frontend", "catalog"] {
        let c = zone
            .issue(
                &td.workload("shop", account).unwrap(),
                IssueOptions::default(),
            )
            .unwrap();
        trellis_ca::write_credentials(&dir.join(account), &c, &bundle).unwrap();
    }
    let app = app().await;
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let server_inbound = free();
    let loopback = "127.77.200.2";
    std::fs::write(
        dir.join("server.toml"),
        format!(
            "name = \"server\"\nzone = \"east\"\ninbound = \"{server_inbound}\"\ndns = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[[services]]\nname = \"catalog\"\nnamespace = \"shop\"\ncredentials = \"{}\"\nports = [{}]\n",
            dir.join("catalog").display(),
            app.port()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("client.toml"),
        format!(
            "name = \"client\"\nzone = \"east\"\ninbound = \"{}\"\ndns = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[[services]]\nname = \"frontend\"\nnamespace = \"shop\"\ncredentials = \"{}\"\nports = [18000]\n[[upstreams]]\nname = \"catalog\"\nnamespace = \"shop\"\naddress = \"{loopback}\"\nports = [{}]\nidentities = [\"spiffe://trellis.local/ns/shop/sa/catalog\"]\nendpoints = [\"{server_inbound}\"]\n",
            free(),
            dir.join("frontend").display(),
            app.port()
        ),
    )
    .unwrap();
    let server = start_agent(&dir.join("server.toml"));
    let client = start_agent(&dir.join("client.toml"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle = (rss_kib(client.0.id()), rss_kib(server.0.id()));

    println!(
        "HTTP/1.1, 1 KiB request and 1 KiB response, one keep-alive connection, {rate}/s for {secs} s"
    );
    println!(
        "{:<36} {:>9} {:>9} {:>9} {:>10} {:>10}",
        "path", "p50 us", "p99 us", "p99.9 us", "p50 ratio", "p99 ratio"
    );
    let direct = latency(app, rate, secs).await;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{:<36} {:>9.0} {:>9.0} {:>9.0} {:>10} {:>10}",
        "direct to the app",
        us(direct.0),
        us(direct.1),
        us(direct.2),
        "-",
        "-"
    );

    // Peak resident memory of each agent while the load runs.
    let pids = [client.0.id(), server.0.id()];
    let peak = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let sampler = tokio::spawn({
        let peak = peak.clone();
        async move {
            loop {
                for (p, pid) in peak.iter().zip(pids) {
                    p.fetch_max(rss_kib(pid), Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let via: SocketAddr = format!("{loopback}:{}", app.port()).parse().unwrap();
    let mesh = latency(via, rate, secs).await;
    sampler.abort();
    let loaded = (
        peak[0].load(Ordering::Relaxed),
        peak[1].load(Ordering::Relaxed),
    );
    println!(
        "{:<36} {:>9.0} {:>9.0} {:>9.0} {:>9.2}x {:>9.2}x",
        "through a sidecar pair (mTLS)",
        us(mesh.0),
        us(mesh.1),
        us(mesh.2),
        us(mesh.0) / us(direct.0),
        us(mesh.1) / us(direct.1)
    );
    println!(
        "added by the sidecar pair: p50 +{:.0} us, p99 +{:.0} us",
        us(mesh.0) - us(direct.0),
        us(mesh.1) - us(direct.1)
    );
    println!(
        "agent RSS: client {} KiB idle, {} KiB peak under load; server {} KiB idle, {} KiB peak under load",
        idle.0, loaded.0, idle.1, loaded.1
    );
}
