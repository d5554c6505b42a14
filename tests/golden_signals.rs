//! Golden signals end to end, over real processes: `trellis dev` brings up
//! the shop (frontend and auth in east, catalog v1 and v2 and inventory in
//! west) without traffic of its own; `trellis load` sends a known number
//! of requests through the whole chain, as a workload on the frontend host
//! would; `trellis top --output json` must show them on every edge,
//! across zones and servers (east's server is asked; west's agents report
//! to west's server), and with catalog failing a share on purpose, exactly
//! the failures the load generator counted.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "support/dev.rs"]
mod dev;
use dev::{BIN, Dev};

/// What `trellis load` sent and how it went.
#[derive(Debug)]
struct Sent {
    ok: u64,
    failed: u64,
    started: Instant,
}

impl Sent {
    fn total(&self) -> u64 {
        self.ok + self.failed
    }

    /// A window that covers the load and the reports that followed, but
    /// not what came before it (2 s earlier and more).
    fn window(&self) -> String {
        format!("{}s", (self.started.elapsed().as_secs() + 2).min(60))
    }
}

/// `rate` requests a second for `secs` seconds to frontend, through the
/// frontend host's agent (its DNS, its outbound listener).
fn load(dev: &Dev, name: &str, rate: u32, secs: u32) -> Sent {
    let host = dev.host("frontend-east");
    let port = host["app"].as_str().unwrap().rsplit_once(':').unwrap().1;
    let log = dev.state_dir().join(format!("{name}.log"));
    let started = Instant::now();
    let out = Command::new(BIN)
        .args([
            "load",
            "--url",
            &format!("http://frontend.shop.mesh:{port}/"),
            "--dns",
            host["dns"].as_str().unwrap(),
            "--rate",
            &rate.to_string(),
            "--duration",
            &format!("{secs}s"),
            "--log",
            log.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "trellis load: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let (mut ok, mut failed) = (0, 0);
    for line in text.lines() {
        match line.split(' ').nth(1) {
            Some("ok") => ok += 1,
            Some("fail") => failed += 1,
            other => panic!("load log line {line:?}: {other:?}"),
        }
    }
    Sent {
        ok,
        failed,
        started,
    }
}

fn top(dev: &Dev, args: &[&str]) -> Value {
    let mut all = vec!["top", "--once", "--output", "json"];
    all.extend(args);
    serde_json::from_slice(&dev.op_ok(&all)).unwrap()
}

/// Requests and errors on the edges from `src` to `dst`, summed over
/// routes and destination zones.
fn edge(t: &Value, src: &str, dst: &str) -> (u64, u64) {
    t["edges"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["source_workload"] == src && e["destination_service"] == dst)
        .map(|e| {
            (
                e["requests"].as_u64().unwrap(),
                e["errors"].as_u64().unwrap(),
            )
        })
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

fn within_2_percent(shown: u64, sent: u64) -> bool {
    (shown as f64 - sent as f64).abs() <= sent as f64 * 0.02
}

/// The chain's edges, as (source workload, destination service).
const CHAIN: [(&str, &str); 4] = [
    ("frontend", "frontend"),
    ("frontend", "auth"),
    ("auth", "catalog"),
    ("catalog", "inventory"),
];

/// Polls `top` until `done` holds for the table (the last reports arrive
/// up to one interval after the load ends) or 20 s have passed; the last
/// table, for the caller's assertions to judge.
fn settle(dev: &Dev, sent: &Sent, mut done: impl FnMut(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let t = top(dev, &["--window", &sent.window()]);
        if done(&t) || Instant::now() > deadline {
            return t;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn top_shows_what_was_sent_on_every_edge_and_exactly_the_failures() {
    let dev = Dev::start_with(29200, "1h", &["--no-traffic"], &[]);
    // Half of catalog's traffic to each version, by a named rule: without
    // it, auth's one pooled connection through the gateways reaches one
    // catalog host only.
    let split = dev.state_dir().join("split.yaml");
    std::fs::write(
        &split,
        "kind: Route\nmetadata: {name: catalog}\nspec:\n  service: catalog.shop\n  rules:\n  \
         - name: split\n    backends: [{subset: v1, weight: 50}, {subset: v2, weight: 50}]\n",
    )
    .unwrap();
    dev.op_ok(&["policy", "apply", "-f", split.to_str().unwrap()]);
    dev.in_sync();
    // What the mesh did while starting is reported and out of the window
    // before the load starts.
    std::thread::sleep(Duration::from_secs(5));

    // Healthy: every request crosses every edge, east to west included.
    let sent = load(&dev, "healthy", 20, 10);
    assert_eq!(sent.failed, 0, "{sent:?}");
    let t = settle(&dev, &sent, |t| {
        CHAIN.iter().all(|(s, d)| edge(t, s, d).0 == sent.total())
    });
    eprintln!("healthy: sent {sent:?}");
    for (s, d) in CHAIN {
        let (req, err) = edge(&t, s, d);
        eprintln!("  {s} -> {d}: {req} requests, {err} errors");
        assert!(
            within_2_percent(req, sent.total()),
            "{s} -> {d}: {req} of {}",
            sent.total()
        );
        assert_eq!(err, 0, "{s} -> {d}");
    }
    assert_eq!(t["missing"], serde_json::json!([]), "{t}");
    assert_eq!(t["servers"].as_array().unwrap().len(), 3, "{t}");
    // auth (east) reaches catalog in west: the cross-zone edge, reported
    // by east's agent to east's server.
    let cross: Vec<&Value> = t["edges"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["source_workload"] == "auth" && e["destination_service"] == "catalog")
        .collect();
    assert!(
        cross
            .iter()
            .all(|e| e["source_zone"] == "east" && e["destination_zone"] == "west"),
        "{cross:?}"
    );
    let e = cross[0];
    assert!(e["success_rate"].as_f64().unwrap() == 1.0, "{e}");
    assert!(e["rps"].as_f64().unwrap() > 0.0, "{e}");
    assert!(e["p50_ms"].as_f64().unwrap() > 0.0, "{e}");
    assert!(
        e["p99_ms"].as_f64().unwrap() >= e["p50_ms"].as_f64().unwrap(),
        "{e}"
    );

    // Catalog fails a quarter of its requests (both versions); frontend
    // and auth pass the failure back up, so every failure the load
    // generator saw is one on each edge up to catalog, and catalog calls
    // inventory only when it does not fail.
    for h in ["catalog-west", "catalog-west-v2"] {
        std::fs::write(dev.host(h)["faults"].as_str().unwrap(), "fail 25\n").unwrap();
    }
    std::thread::sleep(Duration::from_secs(3));
    let sent = load(&dev, "faulty", 20, 10);
    assert!(sent.failed > 0, "{sent:?}");
    let t = settle(&dev, &sent, |t| {
        edge(t, "frontend", "frontend").0 == sent.total()
            && edge(t, "auth", "catalog").0 == sent.total()
            && edge(t, "catalog", "inventory").0 == sent.ok
    });
    eprintln!("faulty: sent {sent:?}");
    for (s, d) in CHAIN {
        let (req, err) = edge(&t, s, d);
        eprintln!("  {s} -> {d}: {req} requests, {err} errors");
    }
    for (s, d) in &CHAIN[..3] {
        let (req, err) = edge(&t, s, d);
        assert_eq!(req, sent.total(), "{s} -> {d}");
        assert_eq!(
            err, sent.failed,
            "{s} -> {d}: errors shown against the load's failures"
        );
    }
    assert_eq!(edge(&t, "catalog", "inventory"), (sent.ok, 0));
    let e = t["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["source_workload"] == "auth" && e["destination_service"] == "catalog")
        .unwrap();
    let shown = e["success_rate"].as_f64().unwrap();
    let want = sent.ok as f64 / sent.total() as f64;
    assert!(
        (shown - want).abs() < 1e-9,
        "success rate {shown} against {want}"
    );

    // One service: its routes as auth saw them, its endpoints (v1 and v2,
    // each its own proxy) as they saw themselves.
    let s = top(
        &dev,
        &["--service", "catalog.shop", "--window", &sent.window()],
    );
    eprintln!("catalog.shop: {s:#}");
    let routes = s["routes"].as_array().unwrap();
    assert!(!routes.is_empty(), "{s}");
    // The rule's name, as the caller's sidecar matched it.
    assert!(routes.iter().any(|r| r["route"] == "split"), "{s}");
    assert!(
        routes
            .iter()
            .all(|r| !r["route"].as_str().unwrap().is_empty()),
        "{s}"
    );
    let total: u64 = routes.iter().map(|r| r["requests"].as_u64().unwrap()).sum();
    assert_eq!(total, sent.total(), "{s}");
    let endpoints = s["endpoints"].as_array().unwrap();
    let mut names: Vec<&str> = endpoints
        .iter()
        .map(|e| e["endpoint"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["catalog-west", "catalog-west-v2"], "{s}");
    assert!(
        endpoints
            .iter()
            .all(|e| e["destination_workload"] == "catalog" && e["destination_zone"] == "west"),
        "{s}"
    );
    let (req, err) = endpoints.iter().fold((0, 0), |a, e| {
        (
            a.0 + e["requests"].as_u64().unwrap(),
            a.1 + e["errors"].as_u64().unwrap(),
        )
    });
    assert_eq!((req, err), (sent.total(), sent.failed), "{s}");

    // The table, as an operator reads it.
    let out = dev.op_ok(&["top", "--once", "--window", &sent.window()]);
    let text = String::from_utf8_lossy(&out);
    eprintln!("{text}");
    let head = text.lines().nth(1).unwrap_or_default();
    for col in [
        "SOURCE",
        "DESTINATION",
        "ROUTE",
        "RPS",
        "SUCCESS",
        "P50",
        "P99",
    ] {
        assert!(head.contains(col), "{text}");
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("auth.shop@east") && l.contains("catalog.shop@west")),
        "{text}"
    );
}
