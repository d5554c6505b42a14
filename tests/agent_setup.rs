//! `trellis agent setup` and `trellis gateway setup` against a directory
//! standing in for the host's root (`--root`): the files they write, their
//! modes, what a rerun says and does, and refused input. The netns test at
//! the end runs the agent setup on the testbed's VM-like host, joins the
//! mesh with it and calls its service by name from another zone.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::SystemTime;

#[path = "support/netns.rs"]
mod netns;

const BIN: &str = env!("CARGO_BIN_EXE_trellis");

fn trellis(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "exit {}: {}{}",
        o.status,
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    stdout(&o)
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn mtime(p: &Path) -> SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

/// A setup of host vm1 in zone west (no join token: setup does not need
/// one to write the files, and a real one comes from a server; the netns
/// test uses one).
fn agent_args<'a>(root: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "agent",
        "setup",
        "--root",
        root,
        "--name",
        "vm1",
        "--zone",
        "west",
        "--server",
        "10.0.0.1:7400",
        "--server",
        "10.0.0.2:7400",
        "--service",
        "catalog.shop:8080",
        "--health",
        "http:/healthz",
        "--advertise",
        "10.0.0.21",
    ];
    a.extend_from_slice(extra);
    a
}

#[test]
fn agent_setup_writes_the_config_and_drop_in_and_a_rerun_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_str().unwrap();
    let out = ok(trellis(&agent_args(root, &[])));
    let cfg = tmp.path().join("etc/trellis/agent.toml");
    let dropin = tmp
        .path()
        .join("etc/systemd/resolved.conf.d/trellis-mesh.conf");
    assert!(
        out.contains(&format!("created           {}", cfg.display())),
        "{out}"
    );
    assert!(
        out.contains("--root was given, so systemd is left alone"),
        "{out}"
    );
    assert!(
        out.contains(&format!("trellis agent --config {}", cfg.display())),
        "{out}"
    );

    // The file the agent reads: 0640, and what the agent itself accepts.
    assert_eq!(mode(&cfg), 0o640);
    assert_eq!(mode(&tmp.path().join("var/lib/trellis")), 0o700);
    let text = std::fs::read_to_string(&cfg).unwrap();
    for line in [
        "name = \"vm1\"",
        "zone = \"west\"",
        "servers = [\"10.0.0.1:7400\", \"10.0.0.2:7400\"]",
        &format!("data_dir = \"{root}/var/lib/trellis/agent\""),
        "advertise = \"10.0.0.21\"",
        "namespace = \"shop\"",
        "ports = [8080]",
        "path = \"/healthz\"",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
    }
    // The drop-in is the one the packages ship, byte for byte.
    assert_eq!(
        std::fs::read_to_string(&dropin).unwrap(),
        std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/systemd/trellis-mesh.conf"
        ))
        .unwrap()
    );

    // The same arguments again: nothing is rewritten, and it says so.
    let before = (mtime(&cfg), mtime(&dropin));
    let out = ok(trellis(&agent_args(root, &[])));
    assert!(out.contains("nothing changed"), "{out}");
    assert!(
        out.contains(&format!("unchanged         {}", cfg.display())),
        "{out}"
    );
    assert_eq!((mtime(&cfg), mtime(&dropin)), before);

    // One argument changed: that file alone, and the count says one.
    let out = ok(trellis(&agent_args(root, &["--zone-priority", "east"])));
    assert!(
        out.contains(&format!("updated           {}", cfg.display())),
        "{out}"
    );
    assert!(
        out.contains(&format!("unchanged         {}", dropin.display())),
        "{out}"
    );
    assert!(out.contains("1 change(s)"), "{out}");
    assert!(
        std::fs::read_to_string(&cfg)
            .unwrap()
            .contains("zone_priority = [\"east\"]")
    );

    // A mode loosened by hand is put back.
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = ok(trellis(&agent_args(root, &["--zone-priority", "east"])));
    assert!(
        out.contains(&format!("fixed mode/owner  {}", cfg.display())),
        "{out}"
    );
    assert_eq!(mode(&cfg), 0o640);
}

#[test]
fn agent_setup_refuses_bad_input_by_flag_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_str().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (&["--service", "catalog"], "--service"),
        (&["--service", "catalog.shop:0"], "port \"0\""),
        (&["--health", "http:healthz"], "the path starts with /"),
        (
            &["--health", "tcp", "--health", "tcp"],
            "--health: 3 checks for 1 services",
        ),
    ];
    for (extra, want) in cases {
        let out = trellis(&agent_args(root, extra));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{extra:?}: {err}");
        assert!(err.contains(want), "{extra:?}: {err}");
    }
    // A zone name the agent refuses is named by the agent's own validation.
    let mut a = agent_args(root, &[]);
    let z = a.iter().position(|x| *x == "west").unwrap();
    a[z] = "West Zone";
    let out = trellis(&a);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("zone"), "{err}");
    // A token file that is not a token.
    let bad = tmp.path().join("token");
    std::fs::write(&bad, "not a token\n").unwrap();
    let out = trellis(&agent_args(
        root,
        &["--join-token-file", bad.to_str().unwrap()],
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("--join-token-file") && err.contains("not a join token"),
        "{err}"
    );
    assert!(
        !tmp.path().join("etc").exists(),
        "refused input wrote files"
    );
}

#[test]
fn gateway_setup_installs_credentials_once_and_a_rerun_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    let src = tmp.path().join("gw1");
    ok(trellis(&["ca", "init", "--dir", ca.to_str().unwrap()]));
    ok(trellis(&[
        "ca",
        "zone",
        "--dir",
        ca.to_str().unwrap(),
        "--zone",
        "west",
    ]));
    ok(trellis(&[
        "ca",
        "issue",
        "--dir",
        ca.to_str().unwrap(),
        "--zone",
        "west",
        "--id",
        "spiffe://trellis.local/zone/west/gateway/gw1",
        "--out",
        src.to_str().unwrap(),
    ]));
    let root = tmp.path().join("root");
    let root_s = root.to_str().unwrap().to_owned();
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "gateway",
            "setup",
            "--root",
            &root_s,
            "--name",
            "gw1",
            "--zone",
            "west",
            "--server",
            "10.0.0.1:7400",
            "--advertise",
            "10.0.0.11:15443",
            "--credentials",
            src.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |a: Vec<String>| ok(Command::new(BIN).args(a).output().unwrap());
    let out = run(args(&[]));
    let key = root.join("var/lib/trellis/gateway/gw1.key");
    let crt = root.join("var/lib/trellis/gateway/gw1.crt");
    let cfg = root.join("etc/trellis/gateway.toml");
    assert!(
        out.contains(&format!("created           {}", key.display())),
        "{out}"
    );
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&crt), 0o644);
    assert_eq!(mode(&cfg), 0o640);
    assert_eq!(mode(&root.join("var/lib/trellis/gateway")), 0o700);
    assert_eq!(
        std::fs::read(&key).unwrap(),
        std::fs::read(tmp.path().join("gw1.key")).unwrap()
    );

    // The gateway renews its certificate in place: a rerun keeps the
    // renewed one rather than copying the original back.
    std::fs::write(&crt, "renewed").unwrap();
    std::fs::set_permissions(&crt, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(args(&[]));
    assert!(out.contains("nothing changed"), "{out}");
    assert!(
        out.contains(&format!("kept              {}", crt.display())),
        "{out}"
    );
    assert_eq!(std::fs::read_to_string(&crt).unwrap(), "renewed");

    let out = run(args(&["--edge-zones", "edge"]));
    assert!(
        out.contains(&format!("updated           {}", cfg.display())),
        "{out}"
    );
    assert!(
        std::fs::read_to_string(&cfg)
            .unwrap()
            .contains("edge_zones = [\"edge\"]")
    );
}

#[test]
fn version_names_the_commit_and_help_lists_setup() {
    let out = ok(trellis(&["--version"]));
    let v = out.trim();
    assert!(
        v.starts_with(&format!("trellis {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{v}"
    );
    // From a git clone the commit is HEAD's; built elsewhere it says unknown.
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output();
    if let Some(h) = head.ok().filter(|h| h.status.success()) {
        let h = String::from_utf8_lossy(&h.stdout).trim().to_owned();
        assert!(v.ends_with(&format!("(commit {h})")), "{v} is not HEAD {h}");
    }
    let help = ok(trellis(&["agent", "--help"]));
    assert!(help.contains("setup"), "{help}");
}

#[test]
fn generate_writes_man_pages_and_completions() {
    let tmp = tempfile::tempdir().unwrap();
    let (man, comp) = (tmp.path().join("man"), tmp.path().join("comp"));
    ok(trellis(&[
        "generate",
        "--man",
        man.to_str().unwrap(),
        "--completions",
        comp.to_str().unwrap(),
    ]));
    let page = std::fs::read_to_string(man.join("trellis-agent-setup.1")).unwrap();
    assert!(page.contains("\\-\\-join\\-token\\-file"), "{page}");
    assert!(man.join("trellis.1").exists());
    // Hidden testbed tools get no page.
    assert!(!man.join("trellis-relay.1").exists());
    let bash = std::fs::read_to_string(comp.join("trellis.bash")).unwrap();
    assert!(bash.contains("--join-token-file"));
    for f in ["_trellis", "trellis.fish"] {
        assert!(comp.join(f).exists(), "{f}");
    }
}

/// The testbed's VM-like host (tb-west-vm) is set up by `testbed/up` with
/// `trellis agent setup --root`, and its agent runs as the unit would run
/// it (`trellis agent --config ROOT/etc/trellis/agent.toml`): systemd cannot
/// run inside a network namespace here. The host joins with its token, its
/// service is called by mesh name from east, and the same setup again
/// changes nothing and leaves the agent running.
#[test]
fn setup_on_a_testbed_host_joins_and_serves_another_zone() {
    if let Err(why) = netns::privileged() {
        assert!(
            std::env::var_os("CI").is_none(),
            "the agent setup netns test must run in CI (as root): {why}"
        );
        eprintln!("skipped: the agent setup netns test needs root, ip netns, nft and curl: {why}");
        return;
    }
    let up = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&up.stdout).contains("tb-"),
        "tb-* namespaces exist already: a testbed is up on this machine; run testbed/down if it is a leftover"
    );
    let dir = tempfile::tempdir().unwrap();
    let tb = dir.path().join("testbed");
    let _down = Testbed(tb.clone());
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/testbed/up"))
        .env("TRELLIS_BIN", BIN)
        .env("TESTBED_DIR", &tb)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "testbed/up failed:\n{}{}",
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    let root = tb.join("vm");
    let cfg = root.join("etc/trellis/agent.toml");
    let token = root.join("etc/trellis/agent.token");
    assert_eq!(mode(&cfg), 0o640);
    assert_eq!(mode(&token), 0o640);
    // Joined: the agent made its keys under the data directory setup named.
    let key = root.join("var/lib/trellis/agent/shop.reviews.key");
    assert_eq!(mode(&key), 0o600, "{}", key.display());
    assert_eq!(std::fs::metadata(&key).unwrap().uid(), 0);

    // Called by mesh name from another zone: dig at east's agent, then GET.
    let ip = ok(netns::in_ns("tb-east-w1", "dig")
        .args([
            "+short",
            "+time=1",
            "+tries=3",
            "@127.0.0.1",
            "-p",
            "8600",
            "reviews.shop.mesh",
        ])
        .output()
        .unwrap());
    let ip = ip.lines().next().unwrap_or_default().to_owned();
    assert!(
        ip.starts_with("127.77."),
        "reviews.shop.mesh resolved to {ip:?}"
    );
    let body = ok(netns::in_ns("tb-east-w1", "curl")
        .args(["-sS", "--max-time", "10", &format!("http://{ip}:8080/")])
        .output()
        .unwrap());
    assert!(body.contains("reviews in zone west"), "{body}");

    // The same setup again (the arguments `up` used, from its record).
    let args: Vec<String> = std::fs::read_to_string(root.join("setup-args"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let pid = std::fs::read_to_string(tb.join("pids/agent-tb-west-vm")).unwrap();
    let before = (mtime(&cfg), mtime(&token));
    let out = ok(netns::in_ns("tb-west-vm", BIN)
        .args(&args)
        .output()
        .unwrap());
    assert!(out.contains("nothing changed"), "{out}");
    assert_eq!((mtime(&cfg), mtime(&token)), before);
    let pid = pid.split_whitespace().next().unwrap();
    assert!(
        PathBuf::from(format!("/proc/{pid}")).exists(),
        "the agent stopped"
    );
}

/// Runs `testbed/down` when dropped.
struct Testbed(PathBuf);

impl Drop for Testbed {
    fn drop(&mut self) {
        let _ = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/testbed/down"))
            .env("TRELLIS_BIN", BIN)
            .env("TESTBED_DIR", &self.0)
            .status();
    }
}
