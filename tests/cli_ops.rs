//! The operator verbs against a real `trellis server`, run as a user would:
//! policies, join tokens, `zone join`, cluster and service listings.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "support/ops.rs"]
mod ops;
use ops::{Kill, ok, trellis};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn json(dir: &Path, server: &str, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ok(dir, server, args)).unwrap()
}

fn wait_listening(port: u16) {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "port {port} never opened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn operator_verbs_drive_a_real_server() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = |p: &str| dir.join(p).to_str().unwrap().to_string();
    ops::ca_and_operator(dir, "ops.test");

    let port = free_port();
    let server = format!("127.0.0.1:{port}");
    let mut procs = Kill(Vec::new());
    procs.0.push(
        Command::new(env!("CARGO_BIN_EXE_trellis"))
            .args([
                "server",
                "--name",
                "s1",
                "--zone",
                "east",
                "--trust-domain",
                "ops.test",
                "--data-dir",
                &d("s1"),
                "--listen",
                &server,
                "--ca-dir",
                &d("ca"),
                "--bootstrap",
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(port);
    let start = Instant::now();
    while json(dir, &server, &["cluster", "status", "--output", "json"])["leader"].as_u64()
        == Some(0)
    {
        assert!(start.elapsed() < Duration::from_secs(10), "no leader");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Policies: applied all at once, listed, deleted; a bad file is refused whole.
    let good = dir.join("good.yaml");
    std::fs::write(&good, "kind: Route\nmetadata: {name: a}\nspec: {service: catalog.shop, rules: [{timeout: 1s}]}\n---\nkind: Export\nmetadata: {name: b}\nspec: {service: catalog.shop, to: [east]}\n").unwrap();
    assert!(
        ok(
            dir,
            &server,
            &["policy", "apply", "-f", good.to_str().unwrap()]
        )
        .contains("applied 2 document(s)")
    );
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "kind: Route\nmetadata: {name: c}\nspec: {service: a.b, rules: [{}]}\n---\nkind: Route\nspec: {}\n",
    )
    .unwrap();
    let out = trellis(
        dir,
        &server,
        &["policy", "apply", "-f", bad.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("document 2: metadata.name"));
    // A kind proxies enforce is checked whole by the store, field by field.
    let half = dir.join("half.yaml");
    std::fs::write(
        &half,
        "kind: Export\nmetadata: {name: e}\nspec: {service: catalog}\n",
    )
    .unwrap();
    let out = trellis(
        dir,
        &server,
        &["policy", "apply", "-f", half.to_str().unwrap()],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("spec.to: missing"), "{err}");
    let list = json(
        dir,
        &server,
        &["policy", "list", "--output", "json", "--linearizable"],
    );
    assert_eq!(list["policies"].as_array().unwrap().len(), 2, "{list}");
    ok(dir, &server, &["policy", "delete", "Route/a"]);
    let list = json(dir, &server, &["policy", "list", "--output", "json"]);
    assert_eq!(list["policies"][0]["name"], "b", "{list}");

    // A join token admits an edge server, which stays a learner.
    let token = ok(
        dir,
        &server,
        &[
            "zone", "token", "create", "--zone", "edge1", "--edge", "--ttl", "5m",
        ],
    );
    let port2 = free_port();
    procs.0.push(
        Command::new(env!("CARGO_BIN_EXE_trellis"))
            .args([
                "zone",
                "join",
                token.trim(),
                "--name",
                "e1",
                "--data-dir",
                &d("e1"),
                "--listen",
                &format!("127.0.0.1:{port2}"),
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(port2);
    let start = Instant::now();
    loop {
        let s = json(dir, &server, &["cluster", "status", "--output", "json"]);
        let members = s["members"].as_array().unwrap();
        if members
            .iter()
            .any(|m| m["name"] == "edge1/e1" && m["role"] == "learner")
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "e1 never joined: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A linearizable read on the new learner, once it has heard from the leader.
    let e1 = format!("127.0.0.1:{port2}");
    let start = Instant::now();
    let zones = loop {
        let out = trellis(
            dir,
            &e1,
            &["zone", "list", "--output", "json", "--linearizable"],
        );
        if out.status.success() {
            break serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap();
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no leader is known"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(15), "{err}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let edge = zones["zones"]
        .as_array()
        .unwrap()
        .iter()
        .find(|z| z["name"] == "edge1")
        .cloned();
    assert_eq!(edge.unwrap()["role"], "edge", "{zones}");
    let key = std::fs::metadata(dir.join("e1/server.key")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key.permissions()) & 0o777,
        0o600
    );
    // The same token does not work twice.
    let out = trellis(
        dir,
        &server,
        &[
            "zone",
            "join",
            token.trim(),
            "--name",
            "e2",
            "--data-dir",
            &d("e2"),
            "--listen",
            "127.0.0.1:1",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already used"));

    let services = json(dir, &server, &["service", "list", "--output", "json"]);
    assert!(services["endpoints"].as_array().unwrap().is_empty());
    assert!(services["revision"].as_u64().unwrap() > 0);

    // Without credentials the verbs say what to do, with exit 64.
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["cluster", "status", "--server", &server])
        .env_remove("TRELLIS_CREDENTIALS")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--credentials"));
}
