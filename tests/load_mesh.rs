//! `trellis load mesh` at CI size, as a correctness check of the store at
//! scale (the figures come from `testbed/bench-scale`): 500 simulated
//! proxies with their own identities and connections hold scoped watches
//! on `trellis dev`'s servers and acknowledge what they apply, 2,500
//! endpoints are registered and renewed, and every measured change and a
//! burst of churn reach every proxy they concern, and are acknowledged by
//! each, while each proxy holds only its scope; then each voter is
//! restarted in turn (the second restart moves every proxy at once) and
//! every proxy resumes without a snapshot.

use std::process::Command;

use serde_json::Value;

#[path = "support/dev.rs"]
mod dev;
use dev::{BIN, Dev};

#[test]
fn five_hundred_proxies_apply_and_acknowledge_every_change_that_concerns_them() {
    let dev = Dev::start_with(30400, "1h", &["--no-traffic"], &[]);
    let state_dir = std::path::Path::new(&dev.s("/operator"))
        .parent()
        .unwrap()
        .to_path_buf();
    // The two voters: the third server is an edge learner, which relays no
    // operator's writes.
    let servers = format!("{},{}", dev.s("/servers/0"), dev.s("/servers/1"));
    // The server processes, for the storm to restart (and their usage).
    let pids = Command::new("pgrep")
        .args(["-f", &format!("server --config {}", state_dir.display())])
        .output()
        .unwrap();
    let pids = String::from_utf8_lossy(&pids.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(",");
    assert!(!pids.is_empty(), "no server processes of {state_dir:?}");
    let out = Command::new(BIN)
        .args([
            "load",
            "mesh",
            "--servers",
            &servers,
            "--ca-dir",
            state_dir.join("ca").to_str().unwrap(),
            "--credentials",
            &dev.s("/operator"),
            "--proxies",
            "500",
            "--namespaces",
            "25",
            "--endpoints-per-proxy",
            "5",
            "--calls",
            "2",
            "--lease",
            "30s",
            "--changes",
            "6",
            "--churn",
            "40",
            "--churn-for",
            "3s",
            "--deadline",
            "30s",
            "--settle",
            "1s",
            "--storm",
            "--pids",
            &pids,
            "--output",
            "json",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "load mesh failed: {stderr}");
    let r: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    eprintln!("{r:#}");
    assert_eq!(r["proxies"], 500);
    assert_eq!(r["endpoints"], 2500);
    let changes = r["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 6);
    for c in changes {
        let n = c["concerned"].as_u64().unwrap();
        // A gateway concerns every proxy; a service the 20 proxies of its
        // namespace and the 20 of the namespace before, which call it.
        let want = if c["kind"] == "gateway" { 500 } else { 40 };
        assert_eq!(n, want, "{c}");
        assert_eq!(c["missed"], 0, "{c}");
        assert_eq!(
            c["acked_n"].as_u64(),
            Some(n),
            "every proxy acknowledged: {c}"
        );
    }
    let churn = &r["churn"];
    assert_eq!(churn["failed"], 0, "{churn}");
    assert_eq!(churn["missed"], 0, "{churn}");
    assert_eq!(r["renewal_failures"], 0);
    // Scoped: a proxy holds its namespace's 100 endpoints, the 2 × 20 of
    // the services it calls, the gateways (dev's two and the 2 the
    // gateway changes added), the zones and dev's policies of no
    // namespace of its own. Unscoped it would hold every one of the 2,500.
    let most = r["entries_per_proxy"][2].as_f64().unwrap();
    assert!(most < 170.0, "a proxy holds {most} entries");
    // Each voter restarted in turn: the first sends its proxies to the
    // other, the second all 500 back at once. Every stream came back,
    // resumed from its revision (no snapshot), and the next change
    // reached everyone.
    let storm = &r["storm"];
    let restarts = storm["restarts"].as_array().unwrap();
    assert_eq!(restarts.len(), 2, "{storm}");
    for x in restarts {
        assert_eq!(x["back"], true, "{storm}");
        assert_eq!(x["snapshots"], 0, "{storm}");
    }
    assert!(
        restarts[1]["moved"].as_u64().unwrap() >= 500,
        "the second restart moves every proxy: {storm}"
    );
    assert_eq!(storm["after"]["missed"], 0, "{storm}");
    assert_eq!(storm["after"]["acked_n"], 500, "{storm}");
}
