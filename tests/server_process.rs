//! Real `trellis server` processes on loopback: crashes (SIGKILL), restarts
//! from the data directory, catch-up by snapshot, and a partitioned minority
//! (SIGSTOP), observed through the gRPC API with operator credentials.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use trellis_federation::api::member_id;
use trellis_federation::client;
use trellis_federation::proto::*;

struct Cluster {
    dir: tempfile::TempDir,
    ports: Vec<u16>,
    procs: Vec<Option<Child>>,
    extra: Vec<String>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn trellis() -> Command {
    Command::new(env!("CARGO_BIN_EXE_trellis"))
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} failed");
}

impl Cluster {
    fn new(n: usize, extra: &[&str]) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        let run = |args: &[&str]| {
            let out = trellis().args(args).output().unwrap();
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "ca",
            "init",
            "--dir",
            ca.to_str().unwrap(),
            "--trust-domain",
            "test.local",
        ]);
        run(&[
            "ca",
            "zone",
            "--dir",
            ca.to_str().unwrap(),
            "--zone",
            "east",
        ]);
        run(&[
            "ca",
            "issue",
            "--dir",
            ca.to_str().unwrap(),
            "--id",
            "spiffe://test.local/operator/op",
            "--out",
            dir.path().join("op").to_str().unwrap(),
        ]);
        let mut c = Self {
            dir,
            ports: (0..n).map(|_| free_port()).collect(),
            procs: Vec::new(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        for i in 0..n {
            let p = c.spawn(i);
            c.procs.push(Some(p));
        }
        c
    }

    fn addr(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.ports[i])
    }

    fn id(&self, i: usize) -> u64 {
        member_id("east", &format!("s{i}"))
    }

    fn log(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("s{i}.log"))
    }

    fn spawn(&self, i: usize) -> Child {
        let mut cmd = trellis();
        cmd.args([
            "server",
            "--name",
            &format!("s{i}"),
            "--zone",
            "east",
            "--trust-domain",
            "test.local",
            "--data-dir",
            self.dir.path().join(format!("d{i}")).to_str().unwrap(),
            "--listen",
            &self.addr(i),
            "--ca-dir",
            self.dir.path().join("ca").to_str().unwrap(),
            "--bootstrap",
        ]);
        for j in 0..self.ports.len() {
            if j != i {
                cmd.args(["--peer", &format!("s{j}={}", self.addr(j))]);
            }
        }
        cmd.args(&self.extra);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log(i))
            .unwrap();
        cmd.env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    fn channel(&self, i: usize) -> Channel {
        client::connect(&self.addr(i), &self.dir.path().join("op")).unwrap()
    }

    fn kill(&mut self, i: usize) {
        let mut p = self.procs[i].take().unwrap();
        p.kill().unwrap(); // SIGKILL
        p.wait().unwrap();
    }

    fn restart(&mut self, i: usize) {
        let p = self.spawn(i);
        self.procs[i] = Some(p);
    }

    /// The leader as seen by live server `i`, if any.
    async fn leader_seen_by(&self, i: usize) -> Option<u64> {
        let s = cluster_client::ClusterClient::new(self.channel(i))
            .status(Empty {})
            .await
            .ok()?
            .into_inner();
        (s.leader != 0).then_some(s.leader)
    }

    /// Waits for a leader that every listed server agrees on; its index.
    async fn leader(&self, among: &[usize], within: Duration) -> usize {
        let start = Instant::now();
        while start.elapsed() < within {
            let mut seen = BTreeSet::new();
            for &i in among {
                seen.insert(self.leader_seen_by(i).await);
            }
            if seen.len() == 1
                && let Some(Some(id)) = seen.into_iter().next()
                && let Some(i) = among.iter().copied().find(|&i| self.id(i) == id)
            {
                return i;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no agreed leader among {among:?} within {within:?}");
    }

    async fn endpoint_ids(&self, i: usize) -> Option<(u64, BTreeSet<String>)> {
        let r = registry_client::RegistryClient::new(self.channel(i))
            .list(ReadOptions {
                linearizable: false,
            })
            .await
            .ok()?
            .into_inner();
        Some((
            r.revision,
            r.endpoints.into_iter().map(|e| e.key.unwrap().id).collect(),
        ))
    }

    async fn wait_for_all(&self, i: usize, want: &BTreeSet<String>) {
        let start = Instant::now();
        loop {
            if let Some((_, have)) = self.endpoint_ids(i).await
                && want.is_subset(&have)
            {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "server s{i} lacks acknowledged writes"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for p in self.procs.iter_mut().flatten() {
            let _ = Command::new("kill")
                .args(["-CONT", &p.id().to_string()])
                .status();
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

fn endpoint(id: &str) -> Endpoint {
    Endpoint {
        key: Some(EndpointKey {
            namespace: "shop".into(),
            service: "catalog".into(),
            zone: "east".into(),
            id: id.into(),
        }),
        address: "10.1.1.1".into(),
        ports: vec![80],
        protocol: "tcp".into(),
        healthy: true,
        ..Default::default()
    }
}

/// Writes through any live server in `servers`, moving on when one fails;
/// returns the ids acknowledged.
async fn write_some(c: &Cluster, servers: &[usize], prefix: &str, n: usize) -> BTreeSet<String> {
    let mut acked = BTreeSet::new();
    let mut k = 0;
    let start = Instant::now();
    while acked.len() < n {
        assert!(start.elapsed() < Duration::from_secs(60), "writes stalled");
        let id = format!("{prefix}-{}", acked.len());
        let i = servers[k % servers.len()];
        match registry_client::RegistryClient::new(c.channel(i))
            .register(endpoint(&id))
            .await
        {
            Ok(_) => {
                acked.insert(id);
            }
            Err(_) => {
                k += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_loses_no_acknowledged_write() {
    let mut c = Cluster::new(3, &[]);
    let l = c.leader(&[0, 1, 2], Duration::from_secs(10)).await;
    let survivors: Vec<usize> = (0..3).filter(|&i| i != l).collect();

    // A stream of writes runs through the leader when the leader dies.
    let mut acked = write_some(&c, &[l], "before", 100).await;
    let writer = {
        let addrs: Vec<String> = (0..3).map(|i| c.addr(i)).collect();
        let op = c.dir.path().join("op");
        let order = [l, survivors[0], survivors[1]];
        tokio::spawn(async move {
            let mut acked = BTreeSet::new();
            let mut k = 0usize;
            let start = Instant::now();
            while acked.len() < 200 && start.elapsed() < Duration::from_secs(60) {
                let id = format!("during-{k}");
                let addr = &addrs[order[k % 3]];
                let ch = client::connect(addr, &op).unwrap();
                if registry_client::RegistryClient::new(ch)
                    .register(endpoint(&id))
                    .await
                    .is_ok()
                {
                    acked.insert(id);
                }
                k += 1;
            }
            acked
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.kill(l);
    let killed = Instant::now();
    let new = c.leader(&survivors, Duration::from_secs(10)).await;
    let took = killed.elapsed();
    assert_ne!(new, l);
    assert!(took < Duration::from_secs(3), "new leader after {took:?}");

    acked.extend(writer.await.unwrap());
    acked.extend(write_some(&c, &survivors, "after", 50).await);
    for &i in &survivors {
        c.wait_for_all(i, &acked).await;
    }
    // The old leader comes back from its data directory and has them all.
    c.restart(l);
    c.wait_for_all(l, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_compacted_past_catches_up_by_snapshot() {
    let mut c = Cluster::new(3, &["--compact-after", "100"]);
    let l = c.leader(&[0, 1, 2], Duration::from_secs(10)).await;
    let f = (l + 1) % 3;
    let other = (l + 2) % 3;
    let mut acked = write_some(&c, &[l], "a", 20).await;
    c.kill(f);
    acked.extend(write_some(&c, &[l, other], "b", 300).await);
    c.restart(f);
    c.wait_for_all(f, &acked).await;
    let log = std::fs::read_to_string(c.log(f)).unwrap();
    assert!(
        log.contains("installed snapshot"),
        "the lagging server caught up without a snapshot:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_minority_reads_stale_refuses_writes_and_heals() {
    let c = Cluster::new(3, &[]);
    let l = c.leader(&[0, 1, 2], Duration::from_secs(10)).await;
    let mut acked = write_some(&c, &[l], "a", 10).await;
    let m = (l + 1) % 3; // the minority: a follower cut off from both others
    c.wait_for_all(m, &acked).await;
    let others: Vec<usize> = (0..3).filter(|&i| i != m).collect();
    for &i in &others {
        signal(c.procs[i].as_ref().unwrap(), "-STOP");
    }

    // Local reads still answer, with the revision they reflect.
    let (rev, ids) = c.endpoint_ids(m).await.expect("local read on the minority");
    assert!(acked.is_subset(&ids) && rev > 0);
    // Writes are refused with a reason, not hung.
    let start = Instant::now();
    let err = registry_client::RegistryClient::new(c.channel(m))
        .register(endpoint("nope"))
        .await
        .expect_err("a minority must not accept writes");
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(
        matches!(
            err.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
        ),
        "{err:?}"
    );
    assert!(
        err.message().contains("leader") || err.message().contains("quorum"),
        "{}",
        err.message()
    );
    let lin = registry_client::RegistryClient::new(c.channel(m))
        .list(ReadOptions { linearizable: true })
        .await;
    assert!(
        lin.is_err(),
        "a linearizable read cannot be served by a minority"
    );

    for &i in &others {
        signal(c.procs[i].as_ref().unwrap(), "-CONT");
    }
    acked.extend(write_some(&c, &others, "b", 10).await);
    c.wait_for_all(m, &acked).await;
}

#[test]
fn bad_configuration_exits_64_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let out = trellis()
        .args([
            "server", "--name", "Bad Name", "--zone", "east", "--ca-dir", "x",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid configuration: name:"), "{err}");

    let cfg = dir.path().join("server.toml");
    let example =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/server.toml"))
            .unwrap();
    std::fs::write(&cfg, format!("listen_port = 1\n{example}")).unwrap();
    let out = trellis()
        .args(["server", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listen_port"), "{err}");
}

fn dig(port: u16, args: &[&str]) -> String {
    let out = Command::new("dig")
        .args(["@127.0.0.1", "-p", &port.to_string(), "+time=2", "+tries=1"])
        .args(args)
        .output()
        .expect("dig is installed by .ci/run (bind9-dnsutils)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_dns_truncates_udp_answers_to_the_askers_buffer() {
    if Command::new("dig").arg("-v").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "CI must have dig");
        eprintln!("skipped: dig is not installed");
        return;
    }
    let conf = tempfile::tempdir().unwrap();
    let dns = free_port();
    let file = conf.path().join("server.toml");
    std::fs::write(&file, format!("dns = \"127.0.0.1:{dns}\"\n")).unwrap();
    let c = Cluster::new(1, &["--config", file.to_str().unwrap()]);
    c.leader(&[0], Duration::from_secs(10)).await;

    // 100 endpoints of catalog.shop in the server's zone: ~1.6 kB of A records.
    let mut registry = registry_client::RegistryClient::new(c.channel(0));
    for i in 0..100u32 {
        let mut e = endpoint(&format!("many-{i}"));
        e.address = format!("10.9.{}.{}", i / 250, i % 250 + 1);
        registry.register(e).await.unwrap();
    }

    let run = |args: &'static [&'static str]| tokio::task::spawn_blocking(move || dig(dns, args));
    // Served once the server's replica has all 100 (a TCP query sees them whole).
    let start = Instant::now();
    loop {
        let out = run(&["+tcp", "catalog.shop.mesh"]).await.unwrap();
        if out.contains("ANSWER: 100") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{out}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Without EDNS (512 bytes) and with a 1232-byte buffer: TC, no records.
    for args in [
        &["+noedns", "+ignore", "catalog.shop.mesh"][..],
        &["+bufsize=1232", "+ignore", "catalog.shop.mesh"][..],
    ] {
        let out = run(args).await.unwrap();
        assert!(
            out.contains(" tc") && out.contains("ANSWER: 0"),
            "{args:?}: {out}"
        );
    }
    let out = run(&["+bufsize=4096", "catalog.shop.mesh"]).await.unwrap();
    assert!(!out.contains(" tc") && out.contains("ANSWER: 100"), "{out}");
}
