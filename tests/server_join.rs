//! `trellis server --join-token-file`: the one command line a StatefulSet
//! gives its server (configs/kubernetes/servers). The first start joins
//! the federation with the token; a restart with the same command comes
//! back from the data directory's credentials, which a second use of the
//! single-use token could not do.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "support/ops.rs"]
mod ops;
use ops::{Kill, ok, trellis};

/// This suite's ports (the range given to the Kubernetes tests).
const PORTS: std::ops::Range<u16> = 27600..27700;

/// A port of [`PORTS`] nobody listens on now (the server binds it itself;
/// a race with another suite shows as a failed start, named below).
fn port(not: &[u16]) -> u16 {
    PORTS
        .clone()
        .find(|p| !not.contains(p) && std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port in the Kubernetes tests' range")
}

/// Spawns `trellis ARGS` and waits for its "listening on" line.
fn start(args: &[&str]) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(
        line.starts_with("listening on"),
        "trellis {args:?} did not start: {line:?}"
    );
    child
}

fn member(dir: &Path, server: &str, name: &str) -> Option<serde_json::Value> {
    let out = trellis(dir, server, &["cluster", "status", "--output", "json"]);
    if !out.status.success() {
        return None;
    }
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    s["members"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == name)
        .cloned()
}

#[test]
fn a_statefulset_server_joins_once_and_restarts_from_its_credentials() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = |p: &str| dir.join(p).to_str().unwrap().to_string();
    ops::ca_and_operator(dir, "k8s.test");

    let p1 = port(&[]);
    let s1 = format!("127.0.0.1:{p1}");
    let mut procs = Kill(Vec::new());
    procs.0.push(start(&[
        "server",
        "--name",
        "s1",
        "--zone",
        "east",
        "--trust-domain",
        "k8s.test",
        "--data-dir",
        &d("s1"),
        "--listen",
        &s1,
        "--ca-dir",
        &d("ca"),
        "--bootstrap",
    ]));
    // The first write waits for the new cluster's leader.
    let t0 = Instant::now();
    let token = loop {
        let out = trellis(
            dir,
            &s1,
            &["zone", "token", "create", "--zone", "k8s", "--ttl", "5m"],
        );
        if out.status.success() {
            break String::from_utf8(out.stdout).unwrap();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let token_file = dir.join("token");
    std::fs::write(&token_file, token).unwrap();

    let p2 = port(&[p1]);
    let listen = format!("127.0.0.1:{p2}");
    let args = [
        "server",
        "--name",
        "trellis-server-0",
        "--data-dir",
        &d("k0"),
        "--listen",
        &listen,
        "--join-token-file",
        token_file.to_str().unwrap(),
    ];
    let started = Instant::now();
    procs.0.push(start(&args));
    let joined = loop {
        if let Some(m) = member(dir, &s1, "k8s/trellis-server-0") {
            break m;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "trellis-server-0 never joined"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("joined in {} ms: {joined}", started.elapsed().as_millis());
    assert!(dir.join("k0/server.crt").is_file());

    // Stopped and started again with the very same command: it serves
    // again, as the same member, without a second join (the token is spent).
    let mut first = procs.0.pop().unwrap();
    first.kill().unwrap();
    first.wait().unwrap();
    let again = Instant::now();
    procs.0.push(start(&args));
    eprintln!("restarted in {} ms", again.elapsed().as_millis());
    let m = member(dir, &s1, "k8s/trellis-server-0").expect("still a member");
    assert_eq!(m["id"], joined["id"], "the same Raft member");
    let out = trellis(dir, &listen, &["cluster", "status", "--output", "json"]);
    assert!(
        out.status.success(),
        "the restarted server answers: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The spent token cannot make another server.
    let p3 = port(&[p1, p2]);
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args([
            "server",
            "--name",
            "trellis-server-1",
            "--data-dir",
            &d("k1"),
            "--listen",
        ])
        .arg(format!("127.0.0.1:{p3}"))
        .args(["--join-token-file", token_file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already used"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // An agent token is refused before anything is sent.
    let agent = ok(
        dir,
        &s1,
        &[
            "zone",
            "token",
            "create",
            "--zone",
            "k8s",
            "--agent",
            "--workload",
            "shop/*",
        ],
    );
    std::fs::write(&token_file, agent).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args([
            "server",
            "--name",
            "x",
            "--data-dir",
            &d("k2"),
            "--join-token-file",
            token_file.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("an agent token"));
}
