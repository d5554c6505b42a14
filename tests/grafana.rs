//! The Grafana dashboards in `configs/grafana/` against what the processes
//! really export: `trellis dev` runs the shop under load, and every metric
//! a dashboard's PromQL names must be one a live agent or gateway serves on
//! its `/metrics` (a sample name, or one its `# TYPE` line implies, since a
//! counter nobody has bumped yet has no sample). A renamed metric fails
//! here, not in a user's empty panel.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

#[path = "support/dev.rs"]
mod dev;
use dev::{Dev, wait_for};

fn dashboards() -> Vec<(String, serde_json::Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/grafana");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path).unwrap();
            let v: serde_json::Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            out.push((path.file_name().unwrap().to_string_lossy().into_owned(), v));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(
        out.len() >= 2,
        "dashboards in {}: {}",
        dir.display(),
        out.len()
    );
    out
}

/// Every PromQL string in a dashboard: panel targets and variable queries.
fn queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    ("query", serde_json::Value::String(s)) if s.contains("trellis_") => {
                        out.push(s.clone())
                    }
                    _ => queries(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| queries(x, out)),
        _ => {}
    }
}

/// The metric names in a PromQL expression: ours all start `trellis_`.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("trellis_") {
        // A name starts at a word boundary (not inside a label value).
        let before = rest[..i].chars().last();
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.push(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

/// A dashboard Grafana imports: schema, the datasource variable every
/// panel uses, panel types, unique ids.
fn well_formed(name: &str, d: &serde_json::Value) {
    assert!(
        d["uid"].as_str().is_some_and(|u| !u.is_empty()),
        "{name}: uid"
    );
    assert!(
        d["title"].as_str().is_some_and(|t| !t.is_empty()),
        "{name}: title"
    );
    let schema = d["schemaVersion"].as_u64().unwrap_or(0);
    assert!(
        (36..=41).contains(&schema),
        "{name}: schemaVersion {schema}"
    );
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    assert!(
        vars.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "{name}: no datasource variable of type prometheus"
    );
    let panels = d["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut with_targets = 0;
    for p in panels {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "{name}: panel id {id} twice");
        let ty = p["type"].as_str().unwrap_or_default();
        assert!(
            ["timeseries", "stat", "row"].contains(&ty),
            "{name}: panel {id} of type {ty}"
        );
        for k in ["x", "y", "w", "h"] {
            assert!(p["gridPos"][k].is_u64(), "{name}: panel {id} gridPos.{k}");
        }
        if ty == "row" {
            continue;
        }
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "{name}: panel {id}"
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{name}: panel {id} has no query");
        for t in targets {
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "{name}: panel {id}"
            );
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(
                !metric_names(expr).is_empty(),
                "{name}: panel {id}: {expr:?} names no Trellis metric"
            );
        }
        with_targets += 1;
    }
    assert!(with_targets >= 5, "{name}: {with_targets} panels");
}

/// GET /metrics from an admin port.
fn scrape(addr: &str) -> String {
    let addr: SocketAddr = addr.parse().unwrap();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    assert!(head.starts_with("HTTP/1.1 200"), "{addr}: {head}");
    body.to_owned()
}

/// Sample names in an exposition, plus the ones each `# TYPE` implies.
fn exported(text: &str, into: &mut BTreeSet<String>) {
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (Some(name), Some(kind)) = (it.next(), it.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            for s in suffixes {
                into.insert(format!("{name}{s}"));
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            into.insert(line[..end].to_owned());
        }
    }
}

/// What the dashboards plot beyond plain traffic, made to happen: a
/// backend failing 30 % of requests behind a Route with retries (retries,
/// 5xx), and a connection to west's gateway that never sends a
/// ClientHello (a handshake timeout, after the gateway's default 10 s).
fn make_events(dev: &Dev) {
    for host in ["catalog-west", "catalog-west-v2"] {
        let path = dev.host(host)["faults"].as_str().unwrap().to_owned();
        std::fs::write(path, "fail 30\n").unwrap();
    }
    let route = dev.state_dir().join("retries.yaml");
    std::fs::write(
        &route,
        "kind: Route\nmetadata: {name: catalog}\nspec:\n  service: catalog.shop\n  rules:\n  \
         - retries: {attempts: 5, on: [5xx], budget: {percent: 60, minPerSecond: 0}}\n",
    )
    .unwrap();
    dev.op_ok(&["policy", "apply", "-f", route.to_str().unwrap()]);
    let gateway: SocketAddr = dev.s("/gateways/west").parse().unwrap();
    std::thread::spawn(move || {
        let idle = TcpStream::connect(gateway).unwrap();
        std::thread::sleep(Duration::from_secs(12));
        drop(idle);
    });
}

#[test]
fn dashboards_are_well_formed_and_name_only_metrics_the_mesh_exports() {
    let all = dashboards();
    for (name, d) in &all {
        well_formed(name, d);
    }

    let dev = Dev::start(28600, "1h");
    dev.in_sync();
    make_events(&dev);
    let mut admins: Vec<String> = dev.state["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["admin"].as_str().unwrap().to_owned())
        .collect();
    admins.push(dev.s("/gateway_admin/east"));
    admins.push(dev.s("/gateway_admin/west"));
    // `trellis dev` sends requests from the start; wait until they have
    // crossed zones (request histograms, gateway streams) and the events
    // `make_events` caused have been counted.
    let mut names = BTreeSet::new();
    let want = [
        "trellis_request_duration_milliseconds_bucket",
        "trellis_gateway_streams_total",
        "trellis_agent_retries_total",
        "trellis_gateway_handshake_timeouts_total",
    ];
    wait_for(
        "traffic, retries and a handshake timeout",
        Duration::from_secs(30),
        || {
            names.clear();
            for a in &admins {
                exported(&scrape(a), &mut names);
            }
            want.iter().all(|n| names.contains(*n))
        },
    );
    // Sample names as they really appear, not only what TYPE implies.
    for must in [
        "trellis_requests_total",
        "trellis_request_duration_milliseconds_sum",
        "trellis_agent_outbound_connections_total",
        "trellis_gateway_peer_streams_total",
    ] {
        assert!(names.contains(must), "{must} not exported: {names:?}");
    }

    for (name, d) in &all {
        let mut qs = Vec::new();
        queries(d, &mut qs);
        assert!(!qs.is_empty(), "{name}: no queries");
        let mut used = BTreeSet::new();
        for q in &qs {
            for m in metric_names(q) {
                assert!(
                    names.contains(&m),
                    "{name}: {m} (in {q:?}) is not exported by any agent or gateway"
                );
                used.insert(m);
            }
        }
        eprintln!("{name}: {} queries, metrics {used:?}", qs.len());
    }
}

#[test]
fn metric_names_are_read_from_promql_as_prometheus_would() {
    assert_eq!(
        metric_names(
            r#"sum by (le) (rate(trellis_request_duration_milliseconds_bucket{reporter="source",x="my_trellis_y"}[5m])) / trellis_agent_mesh_revision"#
        ),
        [
            "trellis_request_duration_milliseconds_bucket",
            "trellis_agent_mesh_revision"
        ]
    );
    let mut set = BTreeSet::new();
    exported(
        "# TYPE trellis_x counter\n# TYPE trellis_h histogram\ntrellis_g{a=\"b\"} 1\n",
        &mut set,
    );
    assert!(set.contains("trellis_x_total") && set.contains("trellis_h_bucket"));
    assert!(set.contains("trellis_g") && !set.contains("trellis_x"));
}
