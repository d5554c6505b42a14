//! `trellis dev`, the README's first command, run as a newcomer would.

use std::process::Command;

#[test]
fn dev_runs_requests_through_agents_and_gateways() {
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["dev", "--requests", "20"])
        .output()
        .expect("could not run the trellis binary");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.contains("first response: catalog.shop in zone west answered over plain HTTP"),
        "{out}"
    );
    assert!(out.contains("dig @127.0.0.1 -p "), "{out}");
    assert!(out.contains("curl http://127.77.0.2:"), "{out}");
    assert!(out.contains("20 ok, 0 errors"), "{out}");
}
