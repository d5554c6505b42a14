//! Write throughput and latency of a 3-server Trellis store against a
//! 3-member etcd, side by side on loopback, in the same run.
//!
//! `cargo bench --bench store` (or `testbed/bench-store`, which installs the
//! Debian package etcd-server first). Both systems run as real processes
//! with their data on the same disk, every write is acknowledged only after
//! a quorum persisted it (each one's log fdatasync), and clients write to
//! the leader. Differences the numbers include: Trellis runs mutual TLS on
//! every connection, etcd here runs plain gRPC (its TLS needs IP SANs that
//! SPIFFE certificates do not carry); a Trellis write is a service endpoint
//! registration (JSON record, revision event), an etcd write a Put of a
//! value of the same size.
//!
//! Environment: BENCH_WRITES (per client count, default 2000 for 1 client,
//! 20000 for 64 clients); TRELLIS_BIN, a `trellis` binary to bench instead
//! of the one cargo built with this bench.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tonic::transport::Channel;
use trellis_federation::api::member_id;
use trellis_federation::client;
use trellis_federation::proto::*;

/// etcd's `etcdserverpb.PutRequest`, the fields we send (field numbers from
/// etcd's public rpc.proto).
#[derive(Clone, PartialEq, prost::Message)]
struct PutRequest {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

/// etcd's `PutResponse`; the header is ignored.
#[derive(Clone, PartialEq, prost::Message)]
struct PutResponse {}

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Result1 {
    ops: f64,
    p50: Duration,
    p99: Duration,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn wait_port(port: u16) -> Result<()> {
    let start = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if start.elapsed() > Duration::from_secs(20) {
            bail!("nothing listens on port {port}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Runs `clients` writers, `per_client` writes each; op(i) does write i.
async fn measure<F, Fut>(clients: usize, per_client: usize, op: F) -> Result<Result1>
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_client);
            for i in 0..per_client {
                let t = Instant::now();
                op(c, i).await?;
                lat.push(t.elapsed());
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let secs = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    Ok(Result1 {
        ops: all.len() as f64 / secs,
        p50: pct(0.50),
        p99: pct(0.99),
    })
}

async fn trellis_cluster(dir: &Path) -> Result<(Procs, Vec<Channel>, usize)> {
    // TRELLIS_BIN: bench a binary built elsewhere (the shipped release
    // build) while this harness builds in a cheaper profile.
    let bin = std::env::var("TRELLIS_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_trellis").into());
    let bin = bin.as_str();
    let ca = dir.join("ca");
    run(Command::new(bin).args([
        "ca",
        "init",
        "--dir",
        ca.to_str().unwrap_or_default(),
        "--trust-domain",
        "bench.local",
    ]))?;
    run(Command::new(bin).args([
        "ca",
        "zone",
        "--dir",
        ca.to_str().unwrap_or_default(),
        "--zone",
        "east",
    ]))?;
    let op = dir.join("op");
    run(Command::new(bin).args([
        "ca",
        "issue",
        "--dir",
        ca.to_str().unwrap_or_default(),
        "--id",
        "spiffe://bench.local/operator/bench",
        "--out",
        op.to_str().unwrap_or_default(),
    ]))?;
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut procs = Procs(Vec::new());
    for i in 0..3 {
        let mut cmd = Command::new(bin);
        cmd.args([
            "server",
            "--name",
            &format!("s{i}"),
            "--zone",
            "east",
            "--trust-domain",
            "bench.local",
            "--data-dir",
            dir.join(format!("t{i}")).to_str().unwrap_or_default(),
            "--listen",
            &format!("127.0.0.1:{}", ports[i]),
            "--ca-dir",
            ca.to_str().unwrap_or_default(),
            "--bootstrap",
        ]);
        for (j, port) in ports.iter().enumerate().filter(|(j, _)| *j != i) {
            cmd.args(["--peer", &format!("s{j}=127.0.0.1:{port}")]);
        }
        procs.0.push(
            cmd.env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
    }
    for p in &ports {
        wait_port(*p).await?;
    }
    let chans: Vec<Channel> = ports
        .iter()
        .map(|p| client::connect(&format!("127.0.0.1:{p}"), &op))
        .collect::<Result<_, _>>()?;
    let start = Instant::now();
    loop {
        let s = cluster_client::ClusterClient::new(chans[0].clone())
            .status(Empty {})
            .await;
        if let Ok(s) = s {
            let leader = s.into_inner().leader;
            if let Some(i) = (0..3).find(|&i| member_id("east", &format!("s{i}")) == leader) {
                return Ok((procs, chans, i));
            }
        }
        if start.elapsed() > Duration::from_secs(20) {
            bail!("no Trellis leader");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn etcd_cluster(dir: &Path) -> Result<(Procs, Vec<Channel>, usize)> {
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let initial: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("e{i}=http://127.0.0.1:{peer}"))
        .collect();
    let mut procs = Procs(Vec::new());
    for (i, (client, peer)) in ports.iter().enumerate() {
        procs.0.push(
            Command::new("etcd")
                .args([
                    "--name",
                    &format!("e{i}"),
                    "--data-dir",
                    dir.join(format!("e{i}")).to_str().unwrap_or_default(),
                    "--listen-client-urls",
                    &format!("http://127.0.0.1:{client}"),
                    "--advertise-client-urls",
                    &format!("http://127.0.0.1:{client}"),
                    "--listen-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                    "--initial-advertise-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                    "--initial-cluster",
                    &initial.join(","),
                    "--initial-cluster-state",
                    "new",
                    "--log-level",
                    "error",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting etcd (install the Debian package etcd-server)")?,
        );
    }
    for (c, _) in &ports {
        wait_port(*c).await?;
    }
    let endpoints: Vec<String> = ports
        .iter()
        .map(|(c, _)| format!("http://127.0.0.1:{c}"))
        .collect();
    let start = Instant::now();
    let leader = loop {
        let out = run(Command::new("etcdctl").env("ETCDCTL_API", "3").args([
            "--endpoints",
            &endpoints.join(","),
            "endpoint",
            "status",
            "-w",
            "json",
        ]));
        if let Ok(out) = out
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&out)
            && let Some(arr) = v.as_array()
        {
            let found = arr.iter().position(|e| {
                let s = &e["Status"];
                s["leader"].as_u64().is_some() && s["leader"] == s["header"]["member_id"]
            });
            if let Some(i) = found {
                break i;
            }
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("no etcd leader");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let chans = endpoints
        .iter()
        .map(|e| Channel::from_shared(e.clone()).map(|c| c.connect_lazy()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((procs, chans, leader))
}

fn endpoint(c: usize, i: usize) -> Endpoint {
    Endpoint {
        key: Some(EndpointKey {
            namespace: "bench".into(),
            service: format!("svc-{}", c % 16),
            zone: "east".into(),
            id: format!("c{c}-{i}"),
        }),
        address: format!("10.{}.{}.{}", c % 250, i / 250 % 250, i % 250),
        ports: vec![8080, 9090],
        protocol: "http".into(),
        healthy: true,
        ..Default::default()
    }
}

async fn etcd_put(ch: Channel, key: String, value: Vec<u8>) -> Result<()> {
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await?;
    let path = http::uri::PathAndQuery::from_static("/etcdserverpb.KV/Put");
    let codec = tonic_prost::ProstCodec::<PutRequest, PutResponse>::default();
    grpc.unary(
        tonic::Request::new(PutRequest {
            key: key.into_bytes(),
            value,
        }),
        path,
        codec,
    )
    .await?;
    Ok(())
}

fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let dir = tempfile::tempdir()?;
        let single: usize = std::env::var("BENCH_WRITES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
        let many_total = single * 10;
        // About the size of the JSON record a Trellis registration stores.
        let value_len = 220;

        println!("store benchmark: 3 members on loopback, writes to the leader, {} cores", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
        let mut rows = Vec::new();

        let (tp, tch, tl) = trellis_cluster(dir.path()).await?;
        for &clients in &[1usize, 64] {
            let per = if clients == 1 { single } else { many_total / clients };
            let ch = tch[tl].clone();
            let r = measure(clients, per, move |c, i| {
                let ch = ch.clone();
                async move {
                    registry_client::RegistryClient::new(ch).register(endpoint(c, i)).await?;
                    Ok(())
                }
            })
            .await?;
            rows.push(("trellis", clients, r));
        }
        drop(tp);

        if Command::new("etcd").arg("--version").output().is_err() {
            println!("etcd is not installed (Debian package etcd-server); Trellis figures only:");
        } else {
            let (ep, ech, el) = etcd_cluster(dir.path()).await?;
            for &clients in &[1usize, 64] {
                let per = if clients == 1 { single } else { many_total / clients };
                let ch = ech[el].clone();
                let r = measure(clients, per, move |c, i| {
                    etcd_put(ch.clone(), format!("/bench/c{c}/{i}"), vec![b'x'; value_len])
                })
                .await?;
                rows.push(("etcd", clients, r));
            }
            drop(ep);
        }

        println!("{:<8} {:>7} {:>10} {:>10} {:>10}", "system", "clients", "writes/s", "p50 ms", "p99 ms");
        for (name, clients, r) in &rows {
            println!(
                "{name:<8} {clients:>7} {:>10.0} {:>10.2} {:>10.2}",
                r.ops,
                r.p50.as_secs_f64() * 1e3,
                r.p99.as_secs_f64() * 1e3
            );
        }
        for clients in [1usize, 64] {
            let t = rows.iter().find(|(n, c, _)| *n == "trellis" && *c == clients);
            let e = rows.iter().find(|(n, c, _)| *n == "etcd" && *c == clients);
            if let (Some((_, _, t)), Some((_, _, e))) = (t, e) {
                println!(
                    "ratio trellis/etcd, {clients} client(s): throughput {:.2}x, p50 latency {:.2}x, p99 latency {:.2}x",
                    t.ops / e.ops,
                    t.p50.as_secs_f64() / e.p50.as_secs_f64(),
                    t.p99.as_secs_f64() / e.p99.as_secs_f64()
                );
            }
        }
        Ok(())
    })
}
