//! The systemd side of running on a VM: the unit files pass
//! `systemd-analyze verify`, and the binary speaks the notify protocol.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Every unit in systemd/, with ExecStart pointed at the binary under test
/// (verify insists that the executable exists).
#[test]
fn unit_files_pass_systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        // CI installs systemd; a developer machine without it cannot check.
        eprintln!("skipped: systemd-analyze is not installed");
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have systemd-analyze"
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd");
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("service") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("ExecStart=/usr/bin/trellis "),
            "{}",
            path.display()
        );
        let unit = tmp.path().join(path.file_name().unwrap());
        std::fs::write(
            &unit,
            text.replace("/usr/bin/trellis", env!("CARGO_BIN_EXE_trellis")),
        )
        .unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&unit)
            .output()
            .unwrap();
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        checked.push(path.file_name().unwrap().to_string_lossy().into_owned());
    }
    checked.sort();
    // Named, so a unit that goes missing fails here instead of shrinking
    // the loop.
    assert_eq!(
        checked,
        [
            "trellis-agent.service",
            "trellis-gateway.service",
            "trellis-server.service"
        ],
        "unit files in {dir}"
    );
}

#[test]
fn gateway_says_ready_pings_the_watchdog_and_says_stopping() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = trellis_ca::CaDir::new(tmp.path().join("ca"));
    let td = "trellis.local".parse().unwrap();
    ca.init(&td, trellis_ca::DEFAULT_ROOT_TTL).unwrap();
    let zone = ca
        .create_zone("east", trellis_ca::DEFAULT_ZONE_TTL)
        .unwrap();
    let id = td
        .role(trellis_ca::RoleKind::Gateway, "east", "gw1")
        .unwrap();
    let creds = zone
        .issue(&id, trellis_ca::IssueOptions::default())
        .unwrap();
    let prefix = tmp.path().join("gw");
    trellis_ca::write_credentials(&prefix, &creds, &ca.bundle().unwrap()).unwrap();
    let cfg = tmp.path().join("gw.toml");
    std::fs::write(
        &cfg,
        format!(
            "name = \"gw1\"\nzone = \"east\"\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ncredentials = \"{}\"\n",
            prefix.display()
        ),
    )
    .unwrap();

    assert_speaks_sd_notify(tmp.path(), &["gateway", "--config", cfg.to_str().unwrap()]);
}

#[test]
fn server_says_ready_pings_the_watchdog_and_says_stopping() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    trellis_ca::CaDir::new(&ca)
        .init(
            &"trellis.local".parse().unwrap(),
            trellis_ca::DEFAULT_ROOT_TTL,
        )
        .unwrap();
    let cfg = tmp.path().join("server.toml");
    std::fs::write(
        &cfg,
        format!(
            "name = \"east-1\"\nzone = \"east\"\ndata_dir = \"{}\"\nlisten = \"127.0.0.1:0\"\nca_dir = \"{}\"\nbootstrap = true\n",
            tmp.path().join("data").display(),
            ca.display()
        ),
    )
    .unwrap();
    assert_speaks_sd_notify(tmp.path(), &["server", "--config", cfg.to_str().unwrap()]);
}

/// Runs `trellis ARGS…` as systemd would (NOTIFY_SOCKET, a 200 ms
/// watchdog) and checks READY=1, two watchdog pings, then STOPPING=1 and a
/// clean exit after SIGTERM.
fn assert_speaks_sd_notify(dir: &std::path::Path, args: &[&str]) {
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(args)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "200000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let recv = || {
        let mut buf = [0u8; 256];
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no notification from trellis {}: {e}", args[0]));
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(recv(), "READY=1\n");
    assert_eq!(recv(), "WATCHDOG=1\n");
    assert_eq!(recv(), "WATCHDOG=1\n");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut saw_stopping = false;
    while Instant::now() < deadline && !saw_stopping {
        saw_stopping = recv() == "STOPPING=1\n";
    }
    assert!(saw_stopping, "trellis {} never said STOPPING=1", args[0]);
    assert!(child.wait().unwrap().success());
}
