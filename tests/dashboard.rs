//! The dashboard over real processes: `trellis dev` serves it on its port
//! plan and prints its URL; the test knocks without the token and with a
//! foreign `Host`, then signs in as the URL says, applies a policy with the
//! CLI as an operator would, and reads the page and `/api/state` for the
//! mesh it knows is running. Then `trellis dashboard` is run on its own
//! against the same mesh, as an operator would run it.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "support/dev.rs"]
mod dev;
use dev::{Answer, BIN, Dev, exchange, wait_for};

fn request(addr: SocketAddr, method: &str, path: &str, host: &str, cookie: &str) -> Answer {
    let mut headers = vec![("host", host)];
    if !cookie.is_empty() {
        headers.push(("cookie", cookie));
    }
    exchange(addr, method, path, &headers, Duration::from_secs(15))
}

/// `http://127.0.0.1:PORT/?token=T` → (address, Host value, token).
fn split_url(url: &str) -> (SocketAddr, String, String) {
    let rest = url.strip_prefix("http://").expect(url);
    let (host, query) = rest.split_once("/?token=").expect(url);
    assert_eq!(query.len(), 64, "a 32-byte token in hex: {url}");
    (host.parse().unwrap(), host.to_owned(), query.to_owned())
}

/// Trades the token for the cookie, checking how the cookie is set.
fn sign_in(addr: SocketAddr, host: &str, token: &str) -> String {
    let a = request(addr, "GET", &format!("/?token={token}"), host, "");
    assert_eq!(a.status, 303, "{}", a.body);
    assert_eq!(a.header("location"), Some("/"));
    let set = a.header("set-cookie").expect("a cookie").to_owned();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    set.split(';').next().unwrap().to_owned()
}

fn state(addr: SocketAddr, host: &str, cookie: &str) -> serde_json::Value {
    let a = request(addr, "GET", "/api/state", host, cookie);
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.header("content-type"), Some("application/json"));
    serde_json::from_str(&a.body).unwrap()
}

/// Requests without the secret, or for another host, get nothing.
fn refuses_strangers(addr: SocketAddr, host: &str, token: &str, cookie: &str) {
    for path in ["/", "/api/state", "/api/sections"] {
        let a = request(addr, "GET", path, host, "");
        assert_eq!(a.status, 401, "{path} without the token: {}", a.body);
        assert!(!a.body.contains("east"), "{}", a.body);
    }
    let a = request(addr, "GET", "/?token=0123", host, "");
    assert_eq!(a.status, 401, "a wrong token");
    // The token with its first digit changed (to another digit: a token
    // that starts with 0 must not get 0 again, 1 time in 16).
    let other = if token.starts_with('0') { '1' } else { '0' };
    let wrong = format!(
        "{}={other}{}",
        cookie.split('=').next().unwrap(),
        &token[1..]
    );
    let a = request(addr, "GET", "/api/state", host, &wrong);
    assert_eq!(a.status, 401, "a wrong cookie");
    // DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends
    // its own name as Host, with or without the secret.
    let port = addr.port();
    let evil = format!("evil.example:{port}");
    let a = request(addr, "GET", &format!("/?token={token}"), &evil, "");
    assert_eq!(a.status, 421, "{}", a.body);
    let a = request(addr, "GET", "/api/state", &evil, cookie);
    assert_eq!(a.status, 421, "{}", a.body);
    let a = request(addr, "POST", "/api/state", host, cookie);
    assert_eq!(a.status, 405, "read-only: {}", a.body);
}

fn names<'a>(v: &'a serde_json::Value, ptr: &str, field: &str) -> Vec<&'a str> {
    v.pointer(ptr)
        .and_then(|l| l.as_array())
        .unwrap_or_else(|| panic!("{ptr}: {v}"))
        .iter()
        .filter_map(|x| x[field].as_str())
        .collect()
}

/// What the dashboard must say about the mesh `trellis dev` runs.
fn shows_the_mesh(v: &serde_json::Value, policy: &str) -> Result<(), String> {
    let mut zones = names(v, "/zones/ok", "name");
    zones.sort_unstable();
    if zones != ["east", "edge", "west"] {
        return Err(format!("zones {zones:?}"));
    }
    let c = &v["cluster"]["ok"];
    let leader = c["leader_name"].as_str().unwrap_or_default();
    if !["east/east-1", "west/west-1"].contains(&leader) {
        return Err(format!("leader {leader:?}"));
    }
    let servers = c["servers"].as_array().cloned().unwrap_or_default();
    if servers.len() != 3 || servers.iter().any(|s| s["lag"] != 0) {
        return Err(format!("servers not caught up: {servers:?}"));
    }
    if !servers
        .iter()
        .any(|s| s["name"] == "edge/edge-1" && s["role"] == "learner")
    {
        return Err(format!("edge-1 is no learner: {servers:?}"));
    }
    let services = v["services"]["ok"].as_array().cloned().unwrap_or_default();
    for (name, count) in [
        ("frontend.shop", 1),
        ("auth.shop", 1),
        ("catalog.shop", 2),
        ("inventory.shop", 2),
    ] {
        let s = services
            .iter()
            .find(|s| s["name"] == name)
            .ok_or_else(|| format!("no {name}"))?;
        let eps = s["endpoints"].as_array().unwrap();
        if eps.len() != count || eps.iter().any(|e| e["healthy"] != true) {
            return Err(format!("{name}: {eps:?}"));
        }
    }
    // Each gateway's own account of its links, from the admin address it
    // registered: east and west reach each other over QUIC.
    let gateways = v["gateways"]["ok"].as_array().cloned().unwrap_or_default();
    for (me, peer) in [("east", "west"), ("west", "east")] {
        let g = gateways
            .iter()
            .find(|g| g["zone"] == me)
            .ok_or_else(|| format!("no gateway in {me}: {gateways:?}"))?;
        let links = g["links"]["ok"]["links"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if !links
            .iter()
            .any(|l| l["zone"] == peer && l["transport"] == "quic")
        {
            return Err(format!("{me}'s links: {}", g["links"]));
        }
    }
    // The golden signals of dev's own traffic (20 requests a second down
    // the chain), from the servers' summaries: every hop has an edge.
    let edges = v["graph"]["edges"].as_array().cloned().unwrap_or_default();
    for (from, to, to_zone) in [
        ("frontend.shop", "auth.shop", "east"),
        ("auth.shop", "catalog.shop", "west"),
        ("catalog.shop", "inventory.shop", "west"),
    ] {
        if !edges.iter().any(|e| {
            e["source"] == from
                && e["destination"] == to
                && e["destination_zone"] == to_zone
                && e["rps"].as_f64().unwrap_or(0.0) > 0.0
                && e["success_rate"].as_f64() == Some(1.0)
        }) {
            return Err(format!("no edge {from} → {to} ({to_zone}): {edges:?}"));
        }
    }
    let p = &v["proxies"]["ok"];
    let proxies = p["proxies"].as_array().cloned().unwrap_or_default();
    let kinds: Vec<&str> = proxies.iter().filter_map(|x| x["kind"].as_str()).collect();
    if proxies.len() != 8
        || kinds.iter().filter(|k| **k == "agent").count() != 6
        || proxies
            .iter()
            .any(|x| x["drift"] != 0 || x["rejected"] != "" || x["revision"] != p["revision"])
    {
        return Err(format!("proxies not in sync: {p}"));
    }
    let (kind, name) = policy.split_once('/').unwrap();
    let pol = v["policies"]["ok"]
        .as_array()
        .and_then(|l| l.iter().find(|d| d["kind"] == kind && d["name"] == name))
        .ok_or_else(|| format!("no {policy}"))?;
    if pol["rejected_by"].as_array().map(Vec::len) != Some(0) {
        return Err(format!("{policy} rejected: {pol}"));
    }
    let audit = v["audit"]["ok"].as_array().cloned().unwrap_or_default();
    let seqs: Vec<u64> = audit.iter().filter_map(|a| a["seq"].as_u64()).collect();
    if seqs.windows(2).any(|w| w[0] < w[1]) {
        return Err(format!("audit not newest first: {seqs:?}"));
    }
    if !audit.iter().any(|a| {
        a["action"] == "policy.apply"
            && a["detail"].as_str().unwrap_or_default().contains(policy)
            && a["by"]
                .as_str()
                .unwrap_or_default()
                .contains("/operator/dev")
    }) {
        return Err(format!("no audit entry for {policy}: {audit:?}"));
    }
    Ok(())
}

/// The page a browser gets: the same facts, escaped, with a script the
/// page's CSP admits by nonce and nothing from elsewhere.
fn page_shows_the_mesh(addr: SocketAddr, host: &str, cookie: &str, policy: &str) {
    let a = request(addr, "GET", "/", host, cookie);
    assert_eq!(a.status, 200, "{}", a.body);
    let csp = a
        .header("content-security-policy")
        .expect("a CSP")
        .to_owned();
    let nonce = csp
        .split("'nonce-")
        .nth(1)
        .and_then(|r| r.split('\'').next())
        .expect("a script nonce");
    assert!(a.body.contains(&format!("<script nonce=\"{nonce}\">")));
    assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"));
    let html = &a.body;
    for want in [
        "<tr data-zone=\"east\">",
        "<tr data-zone=\"west\">",
        "<tr data-zone=\"edge\">",
        "data-service=\"frontend.shop\" data-endpoints=\"1\"",
        "data-service=\"catalog.shop\" data-endpoints=\"2\" data-healthy=\"2\"",
        "data-service=\"inventory.shop\" data-endpoints=\"2\"",
        "data-gateway=\"east/gw1\"",
        "data-gateway=\"west/gw1\"",
        &format!("data-policy=\"{policy}\""),
        "<th>requests/s</th><th>success</th>",
        "marker-end=\"url(#arrow)\"",
        "edge/edge-1 (learner)",
    ] {
        assert!(html.contains(want), "{want} missing from the page:\n{html}");
    }
    assert!(
        html.contains("<b id=\"leader\">east/east-1</b>")
            || html.contains("<b id=\"leader\">west/west-1</b>"),
        "{html}"
    );
    assert_eq!(html.matches("data-drift=\"0\"").count(), 8, "{html}");
    for external in ["http://", "https://", "//cdn"] {
        assert!(!html.contains(external), "{external} in the page");
    }
    let a = request(addr, "GET", "/api/sections", host, cookie);
    assert_eq!(a.status, 200);
    let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    for id in [
        "zones", "gateways", "graph", "services", "proxies", "policies", "audit",
    ] {
        assert!(v["sections"][id].is_string(), "section {id}: {v}");
    }
}

fn apply(dev: &Dev, name: &str) -> String {
    let doc = format!(
        "kind: RateLimit\nmetadata: {{name: {name}}}\nspec: {{service: nobody.shop, requestsPerSecond: 50, burst: 10}}\n"
    );
    let path = dev.state_dir().join(format!("{name}.yaml"));
    std::fs::write(&path, doc).unwrap();
    dev.op_ok(&["policy", "apply", "-f", path.to_str().unwrap()]);
    format!("RateLimit/{name}")
}

#[test]
fn dev_serves_the_dashboard_to_its_operator_only_and_it_shows_the_mesh() {
    let started = Instant::now();
    let dev = Dev::start(28400, "1h");
    let url = dev.s("/dashboard");
    assert!(url.starts_with("http://127.0.0.1:28490/?token="), "{url}");
    assert!(
        dev.read("dev.out").contains(&url),
        "dev prints the URL:\n{}",
        dev.read("dev.out")
    );
    let (addr, host, token) = split_url(&url);
    let cookie = sign_in(addr, &host, &token);
    refuses_strangers(addr, &host, &token, &cookie);

    let policy = apply(&dev, "dash-test");
    dev.in_sync();
    let mut last = String::new();
    wait_for(
        "the dashboard to show the mesh",
        Duration::from_secs(20),
        || {
            let v = state(addr, &host, &cookie);
            match shows_the_mesh(&v, &policy) {
                Ok(()) => true,
                Err(e) => {
                    last = e;
                    false
                }
            }
        },
    );
    eprintln!("last mismatch before it matched: {last:?}");
    page_shows_the_mesh(addr, &host, &cookie, &policy);
    // `localhost` is loopback too, and a browser may be given either.
    let localhost = format!("localhost:{}", addr.port());
    assert_eq!(request(addr, "GET", "/", &localhost, &cookie).status, 200);

    standalone_dashboard(&dev, &policy);
    eprintln!("took {:.1} s", started.elapsed().as_secs_f64());
}

/// `trellis dashboard` as an operator runs it: the URL first, on a port
/// of its own; SIGTERM stops it.
fn standalone_dashboard(dev: &Dev, policy: &str) {
    let mut child = Command::new(BIN)
        .args([
            "dashboard",
            "--server",
            &dev.s("/servers/1"),
            "--credentials",
            &dev.s("/operator"),
            "--gateway-admin",
            &format!("west/gw1={}", dev.s("/gateway_admin/west")),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    let (addr, host, token) = split_url(first.trim());
    assert_ne!(addr.port(), 28490);
    let cookie = sign_in(addr, &host, &token);
    assert_eq!(request(addr, "GET", "/", &host, "").status, 401);
    let v = state(addr, &host, &cookie);
    shows_the_mesh(&v, policy).unwrap();
    page_shows_the_mesh(addr, &host, &cookie, policy);

    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "dashboard ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    assert!(status.success(), "{status}: {err}");
    assert!(!err.contains(&token), "the token was logged: {err}");
}
