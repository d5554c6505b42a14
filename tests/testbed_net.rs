//! `testbed/net` end to end: the three zones come up, east reaches west
//! through the router (ping and TCP), partitioning edge cuts east↔edge
//! both ways while east↔west and traffic inside edge go on, healing edge
//! restores it, and `down` leaves no `tb-*` namespace behind. Needs root
//! and `ip netns`: CI runs it as root; elsewhere it is skipped with a
//! message.
//!
//! The testbed has fixed names (one per machine), so this is the only test
//! that brings it up, and it refuses to run over a testbed someone else has
//! up.

use std::collections::HashMap;
use std::process::{Command, Output};

#[path = "support/netns.rs"]
mod netns;
use netns::{in_ns, privileged, run, start};

const NET: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testbed/net");

/// Takes the testbed down when dropped, so a failed assertion leaves no
/// namespaces behind. Declared before the processes started in it, so it
/// drops after them: a namespace with a process in it outlives `ip netns del`.
struct Testbed;

impl Drop for Testbed {
    fn drop(&mut self) {
        match Command::new(NET).arg("down").output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "testbed/net down failed: {}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("could not run testbed/net down: {e}"),
        }
    }
}

fn net(args: &[&str]) -> String {
    let out = run(Command::new(NET).args(args));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `curl` from `ns` to a demo-app; a short connect timeout, since a
/// partition drops packets and an unanswered SYN would otherwise wait long.
fn curl(ns: &str, addr: &str) -> Output {
    in_ns(ns, "curl")
        .args(["-sS", "--connect-timeout", "3", "--max-time", "10"])
        .arg(format!("http://{addr}:8080/"))
        .output()
        .unwrap()
}

fn assert_answers(ns: &str, addr: &str, who: &str) {
    let out = curl(ns, addr);
    assert!(
        out.status.success(),
        "{ns} -> {addr}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{who} answered over plain HTTP\n"),
        "{ns} -> {addr}"
    );
}

fn assert_cut(ns: &str, addr: &str) {
    let out = curl(ns, addr);
    assert!(
        !out.status.success(),
        "{ns} -> {addr} got through a partition: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn tb_namespaces() -> Vec<String> {
    let out = run(Command::new("ip").args(["netns", "list"]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("tb-"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn zones_route_through_the_router_and_partition_and_heal() {
    if let Err(why) = privileged().and_then(|()| {
        Command::new("ping")
            .arg("-V")
            .output()
            .map(drop)
            .map_err(|e| format!("no ping command: {e}"))
    }) {
        assert!(
            std::env::var_os("CI").is_none(),
            "the testbed test must run in CI (as root): {why}"
        );
        eprintln!("skipped: the testbed test needs root, ip netns, nft, curl and ping: {why}");
        return;
    }
    let before = tb_namespaces();
    assert!(
        before.is_empty(),
        "tb-* namespaces exist already ({before:?}): a testbed is up on this machine; \
         run testbed/net down if it is a leftover"
    );

    let up = net(&["up"]);
    let tb = Testbed;
    assert!(up.contains("inter-zone delay:"), "{up}");
    let hosts: HashMap<String, (String, String)> = net(&["hosts"])
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 3, "hosts line {l:?}");
            (f[0].to_owned(), (f[1].to_owned(), f[2].to_owned()))
        })
        .collect();
    assert_eq!(hosts.len(), 18, "{hosts:?}");
    assert_eq!(hosts["tb-k8s-p1"], ("k8s".into(), "10.77.4.21".into()));
    let addr = |name: &str| hosts[name].1.clone();
    let (east_w1, west_w1, edge_srv, east_srv) = (
        addr("tb-east-w1"),
        addr("tb-west-w1"),
        addr("tb-edge-server"),
        addr("tb-east-server"),
    );
    assert_eq!(hosts["tb-west-vm"].0, "west");

    // East to west crosses the router: different /24s, one default route.
    run(in_ns("tb-east-w1", "ping").args(["-c", "1", "-W", "5", &west_w1]));
    run(in_ns("tb-west-w1", "ping").args(["-c", "1", "-W", "5", &east_w1]));
    let apps: Vec<_> = [
        ("tb-west-w1", &west_w1, "w1", "west"),
        ("tb-edge-server", &edge_srv, "server", "edge"),
        ("tb-east-server", &east_srv, "server", "east"),
    ]
    .into_iter()
    .map(|(ns, a, name, zone)| {
        start(
            ns,
            &[
                "demo-app",
                "--name",
                name,
                "--zone",
                zone,
                "--listen",
                &format!("{a}:8080"),
            ],
        )
    })
    .collect();
    assert_answers("tb-east-w1", &west_w1, "w1 in zone west");
    assert_answers("tb-east-w1", &edge_srv, "server in zone edge");
    assert_answers("tb-edge-w1", &east_srv, "server in zone east");

    // Edge cut off: both directions to east fail, east↔west and traffic
    // inside edge are untouched.
    net(&["partition", "edge"]);
    assert_cut("tb-east-w1", &edge_srv);
    assert_cut("tb-edge-w1", &east_srv);
    assert_answers("tb-east-w1", &west_w1, "w1 in zone west");
    assert_answers("tb-edge-w1", &edge_srv, "server in zone edge");

    net(&["heal", "edge"]);
    assert_answers("tb-east-w1", &edge_srv, "server in zone edge");
    assert_answers("tb-edge-w1", &east_srv, "server in zone east");

    // The processes go first: a namespace lives on while a process is in it.
    drop(apps);
    drop(tb);
    let after = tb_namespaces();
    assert!(after.is_empty(), "left behind after down: {after:?}");
    // A second down, on nothing, still succeeds.
    net(&["down"]);
}
