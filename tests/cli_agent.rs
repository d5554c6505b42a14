//! `trellis agent` as a process: a plain app on this host calls its own
//! service through the agent's outbound listener and mTLS inbound, then the
//! agent stops on SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use trellis_ca::{CaDir, DEFAULT_ROOT_TTL, DEFAULT_ZONE_TTL, IssueOptions};

#[test]
fn the_agent_carries_a_plain_call_over_mtls_and_stops_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CaDir::new(tmp.path().join("ca"));
    let td = "trellis.local".parse().unwrap();
    ca.init(&td, DEFAULT_ROOT_TTL).unwrap();
    let zone = ca.create_zone("east", DEFAULT_ZONE_TTL).unwrap();
    let creds = zone
        .issue(
            &td.workload("shop", "catalog").unwrap(),
            IssueOptions::default(),
        )
        .unwrap();
    let prefix = tmp.path().join("catalog");
    trellis_ca::write_credentials(&prefix, &creds, &ca.bundle().unwrap()).unwrap();

    // The app: answers one line with "echo: <line>".
    let app = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = app.local_addr().unwrap().port();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = app.accept() {
            let mut line = String::new();
            BufReader::new(s.try_clone().unwrap())
                .read_line(&mut line)
                .unwrap();
            s.write_all(format!("echo: {line}").as_bytes()).unwrap();
        }
    });
    let inbound = TcpListener::bind("127.0.0.1:0").unwrap();
    let inbound_addr = inbound.local_addr().unwrap();
    drop(inbound);
    let loopback = format!("127.77.{}.{}", fastrand::u8(1..255), fastrand::u8(1..255));
    let cfg = tmp.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"name = "host1"
zone = "east"
inbound = "{inbound_addr}"
dns = "127.0.0.1:0"
admin = "127.0.0.1:0"
[[services]]
name = "catalog"
namespace = "shop"
credentials = "{}"
ports = [{port}]
[[upstreams]]
name = "catalog"
namespace = "shop"
address = "{loopback}"
ports = [{port}]
identities = ["spiffe://trellis.local/ns/shop/sa/catalog"]
endpoints = ["{inbound_addr}"]
"#,
            prefix.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["agent", "--config", cfg.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("listening"), "{line:?}");

    let mut s = TcpStream::connect((loopback.as_str(), port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"hello\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert_eq!(reply, "echo: hello\n");
    drop(s);

    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "agent did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}
