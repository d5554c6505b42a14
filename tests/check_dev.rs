//! `trellis check` against `trellis dev`: the healthy shop passes every
//! check from a host's agent configuration, with a request from auth in
//! east to catalog in west through both gateways; a service that does not
//! exist fails the service check by name, with exit status 1. No root
//! needed (the netns faults are in `netns_check.rs`).

use std::process::{Command, Output};

#[path = "support/dev.rs"]
mod dev;
use dev::{BIN, Dev};

const NAMES: [&str; 8] = [
    "credentials",
    "servers",
    "quorum",
    "clock",
    "dns",
    "resolved",
    "gateways",
    "service",
];

fn check(dev: &Dev, host: &str, args: &[&str]) -> (Output, serde_json::Value) {
    let config = dev.host(host)["config"].as_str().unwrap().to_owned();
    let out = Command::new(BIN)
        .args(["check", "--config", &config, "--output", "json"])
        .args(args)
        .output()
        .unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "trellis check printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, v)
}

fn by_name<'a>(v: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {v:#}"))
}

#[test]
fn check_passes_on_the_healthy_dev_mesh_and_names_a_missing_service() {
    let dev = Dev::start(28800, "1h");
    dev.in_sync();

    let (out, v) = check(&dev, "auth-east", &["--service", "catalog.shop"]);
    assert!(
        out.status.success(),
        "exit {:?}: {v:#}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let names: Vec<&str> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, NAMES, "{v:#}");
    for name in [
        "credentials",
        "servers",
        "quorum",
        "clock",
        "dns",
        "gateways",
        "service",
    ] {
        assert_eq!(by_name(&v, name)["status"], "ok", "{name}: {v:#}");
    }
    // No systemd-resolved and no drop-in on a test machine: a warning.
    assert_ne!(by_name(&v, "resolved")["status"], "fail", "{v:#}");
    let service = by_name(&v, "service");
    assert_eq!(service["details"]["status"], 200, "{service:#}");
    assert_eq!(service["details"]["zone"], "west", "{service:#}");
    let quorum = &by_name(&v, "quorum")["details"];
    assert_eq!(quorum["voters_up"], quorum["voters"], "{quorum:#}");
    let links = by_name(&v, "gateways")["details"][0]["links"].clone();
    assert_eq!(links[0]["zone"], "west", "{links:#}");
    assert_eq!(links[0]["transport"], "quic", "{links:#}");
    assert!(links[0]["rtt_ms"].as_f64().is_some(), "{links:#}");
    assert_eq!(v["ok"], true);

    let (out, v) = check(&dev, "auth-east", &["--service", "nosuch.shop"]);
    assert_eq!(out.status.code(), Some(1), "{v:#}");
    let service = by_name(&v, "service");
    assert_eq!(service["status"], "fail", "{service:#}");
    assert!(
        service["finding"].as_str().unwrap().contains("NXDOMAIN"),
        "{service:#}"
    );
    assert_eq!(v["summary"]["fail"], 1, "{v:#}");

    // Credentials from another CA (as after a root rotation the host
    // missed): the credentials check says so, and the servers, which
    // refuse them, are skipped rather than failed.
    let tmp = tempfile::tempdir().unwrap();
    let other = tmp.path().join("other-ca");
    let foreign = tmp.path().join("foreign");
    let other_s = other.display().to_string();
    for args in [
        vec![
            "ca",
            "init",
            "--dir",
            &other_s,
            "--trust-domain",
            "trellis.local",
        ],
        vec!["ca", "zone", "--dir", &other_s, "--zone", "east"],
        vec![
            "ca",
            "issue",
            "--dir",
            &other_s,
            "--zone",
            "east",
            "--id",
            "spiffe://trellis.local/zone/east/agent/auth-east",
            "--out",
            foreign.to_str().unwrap(),
        ],
    ] {
        let out = Command::new(BIN).args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (out, v) = check(
        &dev,
        "auth-east",
        &["--credentials", foreign.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1), "{v:#}");
    let creds = by_name(&v, "credentials");
    assert_eq!(creds["status"], "fail", "{creds:#}");
    assert!(
        creds["finding"]
            .as_str()
            .unwrap()
            .contains("does not chain to the bundle the servers serve now"),
        "{creds:#}"
    );
    assert_eq!(by_name(&v, "servers")["status"], "skip", "{v:#}");
    assert_eq!(v["format_version"], 1);

    // The host's own key readable by others.
    let data = dev.state_dir().join("auth-east");
    let loose = tmp.path().join("loose");
    for ext in ["crt", "key", "bundle"] {
        std::fs::copy(
            data.join(format!("node.{ext}")),
            tmp.path().join(format!("loose.{ext}")),
        )
        .unwrap();
    }
    std::fs::set_permissions(
        tmp.path().join("loose.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let (out, v) = check(
        &dev,
        "auth-east",
        &["--credentials", loose.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1), "{v:#}");
    let creds = by_name(&v, "credentials");
    assert!(
        creds["finding"].as_str().unwrap().contains("is mode 0644"),
        "{creds:#}"
    );
    assert_eq!(v["summary"]["fail"], 1, "{v:#}");

    // Text output: one line per check and a summary.
    let config = dev.host("auth-east")["config"].as_str().unwrap().to_owned();
    let out = Command::new(BIN)
        .args(["check", "--config", &config])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for name in NAMES {
        assert!(
            text.lines()
                .any(|l| l.split_whitespace().nth(1) == Some(name)),
            "no line for {name}:\n{text}"
        );
    }
    assert!(text.contains("0 failed"), "{text}");
}
