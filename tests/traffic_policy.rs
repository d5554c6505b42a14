//! Traffic policy end to end, over real processes: `trellis dev` brings up
//! the shop with catalog v1 and v2 in zone west; policies are applied with
//! `trellis policy apply -f` as an operator would; requests are made through
//! the agents' outbound listeners as a workload would, from a caller in east
//! (the route is applied by the caller's sidecar and subsets are picked by
//! west's gateway) and from one in west (subsets picked by the caller).
//! Shares are measured over hundreds or thousands of requests with stated
//! tolerances.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

#[path = "support/dev.rs"]
mod dev;
use dev::{Answer, Dev, dig, exchange, tool_missing};

/// What the tests read of an answer beyond its status and headers.
trait Version {
    /// `v1` or `v2`, from the answer's first line (`catalog v2 in zone west`).
    fn version(&self) -> Option<&'static str>;
}

impl Version for Answer {
    fn version(&self) -> Option<&'static str> {
        let first = self.body.lines().next().unwrap_or_default();
        ["v1", "v2"]
            .into_iter()
            .find(|v| first.starts_with(&format!("catalog {v} ")))
    }
}

/// One HTTP/1.1 request on a new connection.
fn call(to: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    let mut all = vec![("host", "catalog.shop.mesh")];
    all.extend_from_slice(headers);
    exchange(to, method, path, &all, Duration::from_secs(6))
}

/// Where a host's workload reaches catalog: its agent's outbound listener.
fn catalog_from(dev: &Dev, host: &str) -> SocketAddr {
    let dns = dev.host(host)["dns"].as_str().unwrap().to_owned();
    let ip: IpAddr = dig(&dns, &["catalog.shop.mesh", "+short"])
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("catalog.shop.mesh on {host}: {e}"));
    let port: u16 = dev.host("catalog-west")["app"]
        .as_str()
        .unwrap()
        .rsplit_once(':')
        .unwrap()
        .1
        .parse()
        .unwrap();
    SocketAddr::new(ip, port)
}

/// Applies a YAML document and waits until every proxy has acknowledged
/// the revision; returns how long that took after the command returned.
fn apply(dev: &Dev, name: &str, yaml: &str) -> Duration {
    let path = dev.state_dir().join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    dev.op_ok(&["policy", "apply", "-f", path.to_str().unwrap()]);
    let applied = Instant::now();
    dev.in_sync();
    applied.elapsed()
}

fn delete(dev: &Dev, key: &str) {
    dev.op_ok(&["policy", "delete", key]);
    dev.in_sync();
}

/// The share of `n` answers from `to` that came from v2, failing on any
/// other answer than a 200 from catalog.
fn v2_share(to: SocketAddr, n: usize, headers: &[(&str, &str)]) -> f64 {
    let mut v2 = 0;
    for _ in 0..n {
        let a = call(to, "GET", "/", headers);
        assert_eq!(a.status, 200, "{}", a.body);
        match a.version() {
            Some("v2") => v2 += 1,
            Some(_) => {}
            None => panic!("not an answer of catalog: {}", a.body),
        }
    }
    v2 as f64 / n as f64
}

/// The sum of the samples of `metric` whose labels contain `with`, on the
/// agents of `hosts`.
fn metric(dev: &Dev, hosts: &[&str], metric: &str, with: &str) -> u64 {
    hosts
        .iter()
        .map(|h| {
            let admin: SocketAddr = dev.host(h)["admin"].as_str().unwrap().parse().unwrap();
            let mut s = TcpStream::connect(admin).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).unwrap();
            text.lines()
                .filter(|l| l.starts_with(&format!("{metric}{{")) && l.contains(with))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// Retries of requests to catalog by west's caller (the shop's own load
/// reaches catalog too, so the callees' counts would not do).
fn retries(dev: &Dev) -> u64 {
    metric(
        dev,
        &["inventory-west"],
        "trellis_agent_retries_total",
        "catalog.shop",
    )
}

/// Targets of catalog that west's caller ejected.
fn ejections(dev: &Dev) -> u64 {
    metric(
        dev,
        &["inventory-west"],
        "trellis_agent_outlier_ejections_total",
        "catalog.shop",
    )
}

fn faults(dev: &Dev, host: &str, text: &str) {
    let path = dev.host(host)["faults"].as_str().unwrap().to_owned();
    if text.is_empty() {
        let _ = std::fs::remove_file(path);
    } else {
        std::fs::write(path, text).unwrap();
    }
}

#[test]
fn routes_splits_retries_timeouts_ejections_faults_limits_and_l7_authorization() {
    if tool_missing("dig") {
        return;
    }
    let dev = Dev::start(26600, "1h");
    let east = catalog_from(&dev, "frontend-east");
    let west = catalog_from(&dev, "inventory-west");
    dev.in_sync();

    // A 90/10 canary, applied by each caller's sidecar; from east the subset
    // travels in the server name and west's gateway picks among its members.
    let canary = |v1: u32, v2: u32| {
        format!(
            "kind: Route\nmetadata: {{name: catalog}}\nspec:\n  service: catalog.shop\n  rules:\n  \
             - backends: [{{subset: v1, weight: {v1}}}, {{subset: v2, weight: {v2}}}]\n"
        )
    };
    apply(&dev, "canary", &canary(90, 10));
    let share = v2_share(east, 2000, &[]);
    eprintln!(
        "90/10 from east over 2000 requests: v2 {:.1} %",
        share * 100.0
    );
    assert!((share - 0.10).abs() <= 0.03, "v2 share {share}");
    let share = v2_share(west, 1000, &[]);
    eprintln!(
        "90/10 from west over 1000 requests: v2 {:.1} %",
        share * 100.0
    );
    assert!((share - 0.10).abs() <= 0.03, "v2 share {share}");

    // 50/50: every proxy acknowledges it, then every caller splits so.
    let took = apply(&dev, "canary", &canary(50, 50));
    eprintln!(
        "50/50 applied by all 8 proxies {} ms after the write returned",
        took.as_millis()
    );
    for (who, to) in [("east", east), ("west", west)] {
        let share = v2_share(to, 600, &[]);
        eprintln!(
            "50/50 from {who} over 600 requests: v2 {:.1} %",
            share * 100.0
        );
        assert!((share - 0.5).abs() <= 0.07, "{who}: v2 share {share}");
    }

    // A header route: Chrome users to v2, everyone else to v1.
    apply(
        &dev,
        "canary",
        "kind: Route\nmetadata: {name: catalog}\nspec:\n  service: catalog.shop\n  rules:\n  \
         - name: chrome\n    match: [{headers: {user-agent: {regex: '.*Chrome.*'}}}]\n    backends: [{subset: v2}]\n  \
         - backends: [{subset: v1}]\n",
    );
    let chrome = [(
        "user-agent",
        "Mozilla/5.0 (X11; Linux x86_64) Chrome/131.0 Safari/537.36",
    )];
    let curl = [("user-agent", "curl/8.11")];
    for to in [east, west] {
        assert_eq!(v2_share(to, 100, &chrome), 1.0);
        assert_eq!(v2_share(to, 100, &curl), 0.0);
    }

    // The same, written as Istio documents: the CLI translates them, and
    // `policy get` shows the native documents they became.
    let istio = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/configs/policy/istio-canary.yaml"
    );
    dev.op_ok(&["policy", "apply", "-f", istio]);
    dev.in_sync();
    assert_eq!(v2_share(east, 100, &chrome), 1.0);
    let share = v2_share(east, 1000, &curl);
    eprintln!(
        "Istio 90/10 from east over 1000 requests: v2 {:.1} %",
        share * 100.0
    );
    assert!((share - 0.10).abs() <= 0.03, "v2 share {share}");
    let stored = String::from_utf8(dev.op_ok(&["policy", "get", "Route/catalog"])).unwrap();
    assert!(
        stored.contains("kind: Route") && stored.contains("regex: .*Chrome.*"),
        "{stored}"
    );
    let stored =
        String::from_utf8(dev.op_ok(&["policy", "get", "Backend/catalog", "-o", "json"])).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&stored).unwrap();
    assert_eq!(
        doc["spec"]["outlierDetection"]["maxEjectionPercent"], 50.0,
        "{doc}"
    );
    let unknown = dev.op(&["policy", "get", "Route/nothing"]);
    assert!(!unknown.status.success());
    // Back to the Backend trellis dev applied.
    apply(
        &dev,
        "backend",
        "kind: Backend\nmetadata: {name: catalog}\nspec:\n  service: catalog.shop\n  subsets:\n  \
         - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n",
    );

    // Retries hide a backend that fails 30 % of requests, within the budget.
    faults(&dev, "catalog-west", "fail 30\n");
    faults(&dev, "catalog-west-v2", "fail 30\n");
    apply(
        &dev,
        "canary",
        "kind: Route\nmetadata: {name: catalog}\nspec:\n  service: catalog.shop\n  rules:\n  \
         - retries: {attempts: 5, on: [5xx], budget: {percent: 60, minPerSecond: 0}}\n",
    );
    let before = retries(&dev);
    let n = 1000;
    let ok = (0..n)
        .filter(|_| call(west, "GET", "/", &[]).status == 200)
        .count();
    let attempts = n as u64 + retries(&dev) - before;
    eprintln!(
        "30 % failing backend with retries: {ok}/{n} succeeded, {attempts} attempts ({:.2} per request)",
        attempts as f64 / n as f64
    );
    assert!(ok * 100 >= n * 99, "{ok}/{n}");
    assert!(
        attempts as f64 <= n as f64 * 1.6 + 1.0,
        "{attempts} attempts"
    );
    // When everything fails, the budget stops retries multiplying the load.
    // (The budget counts the last 10 s: let the requests above leave it.)
    std::thread::sleep(Duration::from_secs(10));
    faults(&dev, "catalog-west", "fail 100\n");
    faults(&dev, "catalog-west-v2", "fail 100\n");
    let before = retries(&dev);
    let failed = (0..200)
        .filter(|_| call(west, "GET", "/", &[]).status == 503)
        .count();
    let attempts = 200 + retries(&dev) - before;
    eprintln!("all failing: {failed}/200 answered 503 after {attempts} attempts");
    assert_eq!(failed, 200);
    assert!(
        attempts <= 200 * 8 / 5 + 1,
        "{attempts} attempts for 200 requests"
    );
    faults(&dev, "catalog-west", "");
    faults(&dev, "catalog-west-v2", "");

    // A 500 ms timeout bounds a slow backend; a per-try timeout retries on
    // the fast one.
    faults(&dev, "catalog-west-v2", "delay 3s\n");
    apply(
        &dev,
        "canary",
        "kind: Route\nmetadata: {name: catalog}\nspec:\n  service: catalog.shop\n  rules:\n  \
         - match: [{path: {prefix: /slow}}]\n    backends: [{subset: v2}]\n    timeout: 500ms\n  \
         - retries: {attempts: 2, perTryTimeout: 300ms, on: [gateway-error]}\n",
    );
    for to in [east, west] {
        let t = Instant::now();
        let a = call(to, "GET", "/slow", &[]);
        let took = t.elapsed();
        eprintln!(
            "timeout 500ms on a 3 s backend: {} after {} ms",
            a.status,
            took.as_millis()
        );
        assert_eq!(a.status, 504, "{}", a.body);
        assert!(took >= Duration::from_millis(450) && took < Duration::from_millis(2500));
    }
    for _ in 0..20 {
        let t = Instant::now();
        let a = call(west, "GET", "/", &[]);
        assert_eq!((a.status, a.version()), (200, Some("v1")), "{}", a.body);
        assert!(
            t.elapsed() < Duration::from_millis(2500),
            "{:?}",
            t.elapsed()
        );
    }
    faults(&dev, "catalog-west-v2", "");
    delete(&dev, "Route/catalog");

    // Outlier detection ejects v2 while it fails, readmits it afterwards,
    // and never ejects more than half. (Round robin, so each endpoint's
    // share is known; P2C would favour whichever answers faster.)
    let backend = |extra: &str| {
        format!(
            "kind: Backend\nmetadata: {{name: catalog}}\nspec:\n  service: catalog.shop\n  subsets:\n  \
             - {{name: v1, labels: {{version: v1}}}}\n  - {{name: v2, labels: {{version: v2}}}}\n{extra}"
        )
    };
    apply(
        &dev,
        "backend",
        &backend(
            "  loadBalancer: {policy: roundRobin}\n  \
             outlierDetection: {consecutive5xx: 3, baseEjectionTime: 2s, maxEjectionPercent: 50}\n",
        ),
    );
    faults(&dev, "catalog-west-v2", "fail 100 500\n");
    let before = ejections(&dev);
    let failures = (0..100)
        .filter(|_| call(west, "GET", "/", &[]).status != 200)
        .count();
    eprintln!("outlier: {failures}/100 failed before v2 was ejected");
    assert!(failures <= 6, "{failures} failures: v2 was not ejected");
    assert_eq!(ejections(&dev) - before, 1);
    faults(&dev, "catalog-west-v2", "");
    std::thread::sleep(Duration::from_millis(2500));
    let back = (0..100)
        .filter(|_| call(west, "GET", "/", &[]).version() == Some("v2"))
        .count();
    eprintln!("outlier: v2 readmitted, {back}/100 answers");
    assert!(
        back >= 40,
        "v2 answered {back}/100 after its ejection ended"
    );
    let before = ejections(&dev);
    faults(&dev, "catalog-west", "fail 100 500\n");
    faults(&dev, "catalog-west-v2", "fail 100 500\n");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..60 {
        let a = call(west, "GET", "/", &[]);
        if a.body.contains("v1 in zone") {
            seen.insert("v1");
        }
        if a.body.contains("v2 in zone") {
            seen.insert("v2");
        }
    }
    assert_eq!(seen.len(), 2, "both failed: {seen:?}");
    assert_eq!(
        ejections(&dev) - before,
        1,
        "with both failing, 50 % lets only one be ejected"
    );
    faults(&dev, "catalog-west", "");
    faults(&dev, "catalog-west-v2", "");
    apply(&dev, "backend", &backend(""));

    // Fault injection: 50 % aborts, and a fixed delay.
    apply(
        &dev,
        "canary",
        "kind: Route\nmetadata: {name: catalog}\nspec:\n  service: catalog.shop\n  rules:\n  \
         - match: [{path: {exact: /delayed}}]\n    fault: {delay: {fixed: 200ms}}\n  \
         - fault: {abort: {status: 503, percent: 50}}\n",
    );
    let n = 1000;
    let aborted = (0..n)
        .filter(|_| {
            let a = call(east, "GET", "/", &[]);
            assert!(a.status == 200 || a.status == 503, "{}", a.status);
            a.status == 503
        })
        .count();
    eprintln!("fault abort 50 %: {aborted}/{n} aborted");
    assert!(
        (aborted as f64 / n as f64 - 0.5).abs() <= 0.05,
        "{aborted}/{n}"
    );
    for _ in 0..5 {
        let t = Instant::now();
        assert_eq!(call(east, "GET", "/delayed", &[]).status, 200);
        let took = t.elapsed();
        eprintln!("fault delay 200ms: answered after {} ms", took.as_millis());
        assert!(took >= Duration::from_millis(200), "{took:?}");
    }
    delete(&dev, "Route/catalog");

    // A rate limit at each caller: the burst, then the rate, then 429s.
    apply(
        &dev,
        "limit",
        "kind: RateLimit\nmetadata: {name: catalog}\nspec: {service: catalog.shop, requestsPerSecond: 20, burst: 10}\n",
    );
    let start = Instant::now();
    let mut ok = 0;
    let mut limited = 0;
    while start.elapsed() < Duration::from_secs(2) {
        let a = call(east, "GET", "/", &[]);
        match a.status {
            200 => ok += 1,
            429 => {
                limited += 1;
                assert!(a.header("retry-after").is_some());
            }
            other => panic!("{other}: {}", a.body),
        }
    }
    let expect = 10.0 + 20.0 * start.elapsed().as_secs_f64();
    eprintln!(
        "rate limit 20/s burst 10 over 2 s: {ok} passed (expected {expect:.0}), {limited} answered 429"
    );
    assert!(
        (ok as f64 - expect).abs() <= 4.0 && limited > 0,
        "{ok} passed, {limited} limited"
    );
    delete(&dev, "RateLimit/catalog");

    // L7 authorization at the callee, across zones: GET allowed, POST denied.
    apply(
        &dev,
        "authz",
        "kind: Authorization\nmetadata: {name: catalog-read}\nspec:\n  service: catalog.shop\n  \
         allow: [{from: ['ns:shop'], methods: [GET]}]\n",
    );
    assert_eq!(call(east, "GET", "/items", &[]).status, 200);
    let denied = call(east, "POST", "/items", &[]);
    assert_eq!(denied.status, 403, "{}", denied.body);
    assert!(denied.body.contains("may not call"), "{}", denied.body);
    delete(&dev, "Authorization/catalog-read");
    assert_eq!(call(east, "POST", "/items", &[]).status, 200);
}
