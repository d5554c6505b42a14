//! The host agent on the federation store, end to end, over real processes
//! and sockets: `trellis dev` brings up three servers, two gateways and six
//! agents bootstrapped by join tokens; this test then drives it as an
//! operator would: `dig` and `curl` through the agents' DNS, a failing
//! health check, certificate renewals under load, a deny policy, and join
//! tokens that are expired or used.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[path = "support/dev.rs"]
mod dev;
use dev::{BIN, Dev, dig, get, tool_missing, wait_for};

fn serial(prefix: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(format!("{}.crt", prefix.display()))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn agents_on_the_store_route_resolve_heal_rotate_and_enforce() {
    if tool_missing("dig") || tool_missing("curl") || tool_missing("openssl") {
        return;
    }
    let dev = Dev::start(26400, "20s");

    // The path crosses both zones: every hop is agent → mTLS → agent.
    let (status, body) = get(dev.frontend()).unwrap();
    assert!(status.contains("200"), "{status}\n{body}");
    for hop in [
        "frontend in zone east",
        "auth in zone east",
        "in zone west",
        "inventory in zone west",
    ] {
        assert!(body.contains(hop), "{hop} missing from\n{body}");
    }
    // catalog runs two versions: either answers.
    assert!(
        body.contains("catalog v1 in zone west") || body.contains("catalog v2 in zone west"),
        "{body}"
    );

    // Every proxy (six agents, two gateways) acknowledges what it applied:
    // `trellis status` shows none behind.
    dev.in_sync();
    let table = String::from_utf8_lossy(&dev.op_ok(&["status"])).into_owned();
    assert!(
        table.contains("spiffe://trellis.local/zone/edge/agent/inventory-edge")
            && table.contains("in sync"),
        "{table}"
    );

    // dig and curl on the auth host, whose app calls catalog.
    let auth = dev.host("auth-east");
    let dns = auth["dns"].as_str().unwrap().to_string();
    let port = auth_port(&dev, "catalog");
    let a = dig(&dns, &["catalog.shop.mesh", "+short"]);
    let ip = a.trim().to_string();
    assert!(
        ip.starts_with("127.78."),
        "catalog.shop.mesh on auth's agent: {a:?}"
    );
    let srv = dig(
        &dns,
        &[&format!("_{port}._tcp.catalog.shop.mesh"), "SRV", "+short"],
    );
    assert_eq!(
        srv.trim(),
        format!("0 0 {port} catalog.shop.mesh."),
        "SRV: {srv}"
    );
    let pinned = dig(&dns, &["catalog.shop.west.mesh", "+short"]);
    assert!(
        pinned.trim().starts_with("127.78.") && pinned.trim() != ip,
        "pinned: {pinned}"
    );
    // Servers answer from the registry with the endpoints' own addresses:
    // west's server gives west's inventory, east's the only healthy one too.
    let west_dns = dev.s("/server_dns/1");
    let inv = dig(&west_dns, &["inventory.shop.mesh", "+short"]);
    assert_eq!(inv.trim(), "127.0.0.1", "inventory from west-1: {inv}");
    // The edge's agent registers through edge-1, a learner that joins
    // after the core is up: the shop can answer before the edge's
    // inventory is in the registry (CI once asked 8 s into the run).
    let start = std::time::Instant::now();
    let edge_inv = loop {
        let a = dig(&west_dns, &["inventory.shop.edge.mesh", "+short"]);
        if !a.trim().is_empty() || start.elapsed() > std::time::Duration::from_secs(30) {
            break a;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(
        edge_inv.trim(),
        "127.0.0.1",
        "inventory.shop.edge from west-1: {edge_inv}"
    );
    let outside = dig(&west_dns, &["example.com"]);
    assert!(outside.contains("status: REFUSED"), "{outside}");
    let nx = dig(&dns, &["nothing.shop.mesh"]);
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
    let url = format!("http://catalog.shop.mesh:{port}/");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--resolve"])
        .arg(format!("catalog.shop.mesh:{port}:{ip}"))
        .arg(&url)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("catalog v")
            && text.contains(" in zone west")
            && text.contains("inventory in zone west"),
        "curl {url}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A failing health check takes inventory in west out of routing and DNS
    // (interval 1 s, threshold 1): catalog's calls move to the edge.
    let catalog_dns = dev.host("catalog-west")["dns"]
        .as_str()
        .unwrap()
        .to_string();
    let switch = PathBuf::from(dev.host("inventory-west")["down_switch"].as_str().unwrap());
    std::fs::write(&switch, b"").unwrap();
    let gone = wait_for("inventory west leaves DNS", Duration::from_secs(3), || {
        dig(&catalog_dns, &["inventory.shop.west.mesh"]).contains("NXDOMAIN")
    });
    let (_, body) = get(dev.frontend()).unwrap();
    assert!(body.contains("inventory in zone edge"), "{body}");
    std::fs::remove_file(&switch).unwrap();
    let back = wait_for("inventory west returns", Duration::from_secs(3), || {
        get(dev.frontend()).is_ok_and(|(_, b)| b.contains("inventory in zone west"))
    });
    eprintln!("health: out of DNS after {gone:?}, back in routing after {back:?} (interval 1 s)");

    // Certificates live 20 s and renew at half-life: a request stream across
    // two renewals loses nothing.
    let data =
        PathBuf::from(dev.host("catalog-west")["config"].as_str().unwrap()).with_extension("");
    let creds = data.join("shop.catalog");
    let before = serial(&creds);
    let start = Instant::now();
    let (mut ok, mut failed) = (0u32, Vec::new());
    while start.elapsed() < Duration::from_secs(24) {
        match get(dev.frontend()) {
            Ok((s, _)) if s.contains("200") => ok += 1,
            Ok((s, b)) => failed.push(format!("{s}: {b}")),
            Err(e) => failed.push(e),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = serial(&creds);
    assert_ne!(before, after, "catalog's certificate was not renewed");
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(3)]
    );
    eprintln!("rotation: {ok} requests, 0 failed, serial {before} -> {after}");

    // A deny policy: auth refuses frontend at its inbound, and says who.
    let policy = dev.state_dir().join("deny.yaml");
    std::fs::write(
        &policy,
        "kind: Authorization\nmetadata:\n  name: no-frontend\nspec:\n  service: auth.shop\n  deny: [\"spiffe://trellis.local/ns/shop/sa/frontend\"]\n",
    )
    .unwrap();
    dev.op_ok(&["policy", "apply", "-f", policy.to_str().unwrap()]);
    wait_for("the deny policy applies", Duration::from_secs(5), || {
        get(dev.frontend()).is_ok_and(|(s, _)| s.contains("502"))
    });
    let log = std::fs::read_to_string(auth["log"].as_str().unwrap()).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("denied by policy"))
        .expect("the refusal is logged");
    assert!(
        line.contains("spiffe://trellis.local/ns/shop/sa/frontend")
            && line.contains("spiffe://trellis.local/ns/shop/sa/auth"),
        "{line}"
    );
    dev.op_ok(&["policy", "delete", "Authorization/no-frontend"]);
    wait_for("the policy is lifted", Duration::from_secs(5), || {
        get(dev.frontend()).is_ok_and(|(s, _)| s.contains("200"))
    });

    // SIGHUP: a local rule added to auth's config file applies live, and
    // goes away with the next reload.
    let auth_cfg = auth["config"].as_str().unwrap().to_string();
    let original = std::fs::read_to_string(&auth_cfg).unwrap();
    let pid = String::from_utf8(
        Command::new("pgrep")
            .args(["-f", &format!("agent --config {auth_cfg}")])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    assert!(!pid.is_empty(), "auth's agent process not found");
    std::fs::write(
        &auth_cfg,
        format!("{original}\n[[authorization]]\nservice = \"auth.shop\"\ndeny = [\"ns:shop\"]\n"),
    )
    .unwrap();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    wait_for("the reloaded rule applies", Duration::from_secs(5), || {
        get(dev.frontend()).is_ok_and(|(s, _)| s.contains("502"))
    });
    std::fs::write(&auth_cfg, &original).unwrap();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    wait_for(
        "the rule is gone after the next reload",
        Duration::from_secs(5),
        || get(dev.frontend()).is_ok_and(|(s, _)| s.contains("200")),
    );

    // Join tokens: a used one and an expired one are refused, clearly.
    let config = std::fs::read_to_string(auth["config"].as_str().unwrap()).unwrap();
    let fresh = |name: &str, token_file: &Path| {
        let cfg = config
            .replace("auth-east", name)
            .lines()
            .filter(|l| !l.starts_with("join_token_file") && !l.starts_with("inbound") && !l.starts_with("dns") && !l.starts_with("admin"))
            .collect::<Vec<_>>()
            .join("\n")
            .replacen(
                "servers",
                &format!(
                    "join_token_file = \"{}\"\ninbound = \"127.0.0.1:0\"\ndns = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nservers",
                    token_file.display()
                ),
                1,
            );
        let path = dev.state_dir().join(format!("{name}.toml"));
        std::fs::write(&path, cfg).unwrap();
        Command::new(BIN)
            .args(["agent", "--config", path.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let used = dev.state_dir().join("auth-east.token");
    let out = fresh("again", &used);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("already used"),
        "{err}"
    );
    let token = dev.op_ok(&[
        "zone",
        "token",
        "create",
        "--zone",
        "east",
        "--agent",
        "--workload",
        "shop/auth",
        "--ttl",
        "1s",
    ]);
    let short = dev.state_dir().join("short.token");
    std::fs::write(&short, &token).unwrap();
    std::thread::sleep(Duration::from_millis(2100));
    let out = fresh("late", &short);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("expired"), "{err}");

    // Root rotation under load: a second root joins the bundle, reaches
    // every server and proxy, then each zone CA is re-signed under it and
    // the leaves move over as they renew. Nothing fails on the way.
    let ca = dev.s("/ca_dir");
    let chain_before = intermediate(&creds);
    let load = Load::start(dev.frontend());
    let out = Command::new(BIN)
        .args(["ca", "rotate-root", "--dir", &ca])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bundle = format!("{}.bundle", creds.display());
    wait_for(
        "the new root reaches catalog's agent",
        Duration::from_secs(15),
        || {
            std::fs::read_to_string(&bundle)
                .is_ok_and(|b| b.matches("BEGIN CERTIFICATE").count() == 2)
        },
    );
    // Every proxy polls every 5 s: give the slowest one its turn.
    std::thread::sleep(Duration::from_secs(6));
    for zone in ["east", "west", "edge"] {
        let out = Command::new(BIN)
            .args(["ca", "zone", "--dir", &ca, "--zone", zone, "--replace"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    wait_for(
        "catalog renews under the new root",
        Duration::from_secs(30),
        || intermediate(&creds) != chain_before,
    );
    std::thread::sleep(Duration::from_secs(2));
    let (ok, failed) = load.stop();
    assert!(
        failed.is_empty(),
        "root rotation: {} of {} failed: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(3)]
    );
    eprintln!("root rotation: {ok} requests, 0 failed");
}

/// The intermediate (second certificate) of a credentials chain, as PEM.
fn intermediate(prefix: &Path) -> String {
    let text = std::fs::read_to_string(format!("{}.crt", prefix.display())).unwrap();
    text.split("-----END CERTIFICATE-----")
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

/// Requests to the frontend in a thread until stopped: (ok, failures).
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(usize, Vec<String>)>,
}

impl Load {
    fn start(to: SocketAddr) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, Vec::new());
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                match get(to) {
                    Ok((st, _)) if st.contains("200") => ok += 1,
                    Ok((st, b)) => failed.push(format!("{st}: {b}")),
                    Err(e) => failed.push(e),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (ok, failed)
        });
        Self { stop, thread }
    }

    fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// The service port of a demo service, from its host entry.
fn auth_port(dev: &Dev, service: &str) -> u16 {
    let h = dev.state["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["service"] == service)
        .unwrap();
    h["app"]
        .as_str()
        .unwrap()
        .rsplit_once(':')
        .unwrap()
        .1
        .parse()
        .unwrap()
}
