//! `trellis check` on the netns testbed (`testbed/up`): it passes on the
//! healthy mesh, and each fault introduced makes the check named for it
//! fail, with exit status 1: expired credentials, a majority of servers
//! down, UDP blocked between the zones (gateway links on the TCP fallback),
//! a missing systemd-resolved drop-in, and a wrong clock (`faketime`).
//! Every run is from tb-east-w2 (auth), with a request to catalog in west.
//!
//! Needs root, `ip netns`, nft, dig, curl and faketime: CI runs it as root
//! and installs them; elsewhere it is skipped with a message. The testbed
//! has fixed names, so the faults run one after another in one test, each
//! undone (and the mesh seen healthy again) before the next.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

#[path = "support/netns.rs"]
mod netns;
use netns::privileged;

const TESTBED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testbed");
const BIN: &str = env!("CARGO_BIN_EXE_trellis");
const HOST: &str = "tb-east-w2";

/// Runs `testbed/down` when dropped, and heals what a fault left behind.
struct Testbed {
    dir: PathBuf,
}

impl Drop for Testbed {
    fn drop(&mut self) {
        unblock_udp();
        for s in ["west-1", "west-2"] {
            signal_server(&self.dir, s, "CONT");
        }
        match Command::new(format!("{TESTBED}/down"))
            .env("TRELLIS_BIN", BIN)
            .env("TESTBED_DIR", &self.dir)
            .status()
        {
            Ok(s) if s.success() => {}
            Ok(s) => eprintln!("testbed/down exited {s}"),
            Err(e) => eprintln!("could not run testbed/down: {e}"),
        }
    }
}

/// The nftables table that blocks UDP between east and west.
const UDP_TABLE: &str = "tb_check_udp";

fn tool(name: &str, arg: &str) -> Result<(), String> {
    Command::new(name)
        .arg(arg)
        .output()
        .map(drop)
        .map_err(|e| format!("no {name} command: {e}"))
}

/// One `trellis check` run from HOST: its exit status and JSON report.
struct Run {
    out: Output,
    json: serde_json::Value,
    took: Duration,
}

impl Run {
    fn status(&self, name: &str) -> &str {
        self.check(name)["status"].as_str().unwrap()
    }

    fn check(&self, name: &str) -> &serde_json::Value {
        self.json["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no check {name}: {:#}", self.json))
    }

    fn failed(&self) -> Vec<&str> {
        self.json["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["status"] == "fail")
            .map(|c| c["name"].as_str().unwrap())
            .collect()
    }

    /// Asserts that `name` failed, the exit status is 1, and returns the
    /// finding.
    fn assert_fails(&self, name: &str) -> String {
        assert_eq!(
            self.status(name),
            "fail",
            "{name} should fail: {:#}",
            self.json
        );
        assert_eq!(self.out.status.code(), Some(1), "{:#}", self.json);
        self.check(name)["finding"].as_str().unwrap().to_owned()
    }
}

struct Bed {
    dir: PathBuf,
    dropin: PathBuf,
}

impl Bed {
    fn config(&self) -> String {
        self.dir
            .join(format!("etc/agent-{HOST}.toml"))
            .display()
            .to_string()
    }

    /// `trellis check` in HOST, optionally under `faketime OFFSET`.
    fn check(&self, faketime: Option<&str>, extra: &[&str]) -> Run {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", HOST]);
        if let Some(offset) = faketime {
            c.args(["faketime", "-f", offset]);
        }
        c.arg(BIN).args(["check", "--config", &self.config()]);
        if !extra.contains(&"--resolved-dropin") {
            c.arg("--resolved-dropin").arg(&self.dropin);
        }
        if !extra.contains(&"--timeout") {
            c.args(["--timeout", "2s"]);
        }
        c.args(["--service", "catalog.shop", "--output", "json"]);
        c.args(extra);
        let t = Instant::now();
        let out = c.output().unwrap();
        let took = t.elapsed();
        let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "check printed no JSON ({e}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        Run { out, json, took }
    }

    /// Polls until a check passes (exit 0), up to `limit`.
    fn healthy(&self, what: &str, limit: Duration) -> Run {
        let start = Instant::now();
        loop {
            let r = self.check(None, &[]);
            if r.out.status.success() {
                eprintln!(
                    "healthy ({what}) after {:?}; one run took {:?}",
                    start.elapsed(),
                    r.took
                );
                return r;
            }
            assert!(
                start.elapsed() < limit,
                "not healthy {what} within {limit:?}: failed {:?}: {:#}",
                r.failed(),
                r.json
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

fn signal_server(dir: &Path, name: &str, sig: &str) {
    let Ok(text) = std::fs::read_to_string(dir.join(format!("pids/server-{name}"))) else {
        return;
    };
    if let Some(pid) = text.split_whitespace().next() {
        let _ = Command::new("kill")
            .args([&format!("-{sig}"), pid])
            .status();
    }
}

fn nft(script: &str) {
    let mut c = Command::new("ip")
        .args(["netns", "exec", "tb-router", "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    c.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(c.wait().unwrap().success(), "nft -f failed: {script}");
}

#[test]
fn check_names_each_fault_on_the_testbed() {
    if let Err(why) = privileged()
        .and_then(|()| tool("dig", "-v"))
        .and_then(|()| tool("faketime", "--version"))
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "the check faults must run in CI (as root): {why}"
        );
        eprintln!(
            "skipped: trellis check's netns test needs root, ip netns, nft, curl, dig and faketime: {why}"
        );
        return;
    }
    let up = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&up.stdout).contains("tb-"),
        "tb-* namespaces exist already: a testbed is up on this machine; run testbed/down if it is a leftover"
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("testbed");
    let t = Instant::now();
    let _tb = Testbed { dir: dir.clone() };
    let out = Command::new(format!("{TESTBED}/up"))
        .env("TRELLIS_BIN", BIN)
        .env("TESTBED_DIR", &dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "testbed/up failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("testbed up in {:?}", t.elapsed());
    // The drop-in as systemd/trellis-mesh.conf installs it, where the test
    // can take it away (no systemd-resolved runs in a netns).
    let dropin = tmp.path().join("trellis-mesh.conf");
    std::fs::write(&dropin, "[Resolve]\nDNS=127.0.0.1:8600\nDomains=~mesh\n").unwrap();
    let bed = Bed { dir, dropin };

    // Healthy: every check passes (the drop-in warns: resolved is not running).
    let r = bed.healthy("at start", Duration::from_secs(30));
    for name in [
        "credentials",
        "servers",
        "quorum",
        "clock",
        "dns",
        "gateways",
        "service",
    ] {
        assert_eq!(r.status(name), "ok", "{name}: {:#}", r.json);
    }
    assert_eq!(
        r.check("service")["details"]["zone"],
        "west",
        "{:#}",
        r.json
    );
    let links = &r.check("gateways")["details"];
    eprintln!("healthy gateways: {}", r.check("gateways")["finding"]);
    assert!(
        links.as_array().unwrap().len() >= 2,
        "east runs gw1 and gw2: {links:#}"
    );

    // A missing drop-in.
    let r = bed.check(
        None,
        &["--resolved-dropin", "/nonexistent/trellis-mesh.conf"],
    );
    let f = r.assert_fails("resolved");
    assert!(f.contains("/nonexistent/trellis-mesh.conf"), "{f}");
    assert_eq!(r.failed(), ["resolved"], "{:#}", r.json);
    eprintln!("missing drop-in: {f}");

    // A wrong clock: ten minutes ahead.
    let r = bed.check(Some("+10m"), &[]);
    let f = r.assert_fails("clock");
    let skew = r.check("clock")["details"]["skew_ms"].as_i64().unwrap();
    assert!((-610_000..=-590_000).contains(&skew), "skew {skew} ms: {f}");
    eprintln!("wrong clock: {f}");

    // Expired credentials: the host's node identity, issued by the zone's
    // CA for one second, and checked after it ran out.
    let expired = tmp.path().join("expired");
    let out = Command::new(BIN)
        .args([
            "ca",
            "issue",
            "--dir",
            &bed.dir.join("ca").display().to_string(),
            "--zone",
            "east",
            "--id",
            &format!("spiffe://trellis.local/zone/east/agent/{HOST}"),
            "--ttl",
            "1s",
            "--out",
            &expired.display().to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(Duration::from_millis(2100));
    let r = bed.check(None, &["--credentials", &expired.display().to_string()]);
    let f = r.assert_fails("credentials");
    assert!(f.contains("expired"), "{f}");
    assert_eq!(r.status("servers"), "skip", "{:#}", r.json);
    eprintln!("expired credentials: {f}");

    // A majority of the servers down: west-1 and west-2 stopped.
    for s in ["west-1", "west-2"] {
        signal_server(&bed.dir, s, "STOP");
    }
    let r = bed.check(None, &[]);
    for s in ["west-1", "west-2"] {
        signal_server(&bed.dir, s, "CONT");
    }
    let f = r.assert_fails("quorum");
    assert_eq!(r.check("quorum")["details"]["voters_up"], 1, "{:#}", r.json);
    eprintln!("majority down ({:?}): {f}", r.took);
    bed.healthy("after the servers resumed", Duration::from_secs(30));

    // UDP blocked between east and west: the gateway links fall back to TCP.
    nft(&format!(
        "table inet {UDP_TABLE} {{\n chain forward {{\n  type filter hook forward priority -10; policy accept;\n  ip saddr 10.77.1.0/24 ip daddr 10.77.2.0/24 meta l4proto udp drop\n  ip saddr 10.77.2.0/24 ip daddr 10.77.1.0/24 meta l4proto udp drop\n }}\n}}\n"
    ));
    // A link notices when its QUIC connection dies (idle timeout) or when a
    // stream on it gets no reply (the gateway's connect timeout, 5 s, times
    // 2.5), then redials with QUIC, fails and takes TCP. Until then a
    // request through that gateway stalls: the service gets 16 s here.
    let start = Instant::now();
    let mut first_fallback = None;
    let r = loop {
        let r = bed.check(None, &["--timeout", "8s"]);
        if r.status("gateways") == "fail" {
            first_fallback.get_or_insert(start.elapsed());
            if r.status("service") == "ok" {
                break r;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no fallback with traffic flowing within 120 s: {:#}",
            r.json
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    let f = r.assert_fails("gateways");
    assert!(f.contains("fall back to TCP"), "{f}");
    let links: Vec<serde_json::Value> = r.check("gateways")["details"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["links"].as_array().cloned().unwrap_or_default())
        .collect();
    assert!(
        links
            .iter()
            .any(|l| l["transport"] == "tcp" && l["fallback"] == true),
        "{links:#?}"
    );
    eprintln!(
        "UDP blocked: fallback first reported after {:?}, a request through the mesh answered after {:?}: {f}",
        first_fallback.unwrap_or_default(),
        start.elapsed()
    );
    unblock_udp();
}

/// Lets UDP through the router again (the table may already be gone).
fn unblock_udp() {
    let _ = Command::new("ip")
        .args([
            "netns",
            "exec",
            "tb-router",
            "nft",
            "delete",
            "table",
            "inet",
            UDP_TABLE,
        ])
        .output();
}
