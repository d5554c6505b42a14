//! `trellis dev`, the README's first command, run as a newcomer would.

use std::process::Command;

#[test]
fn dev_runs_a_request_across_two_gateway_processes() {
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
        out.contains(
            "first response: catalog.shop in zone west answered spiffe://trellis.local/ns/shop/sa/frontend"
        ),
        "{out}"
    );
    assert!(out.contains("20 ok, 0 errors"), "{out}");
}
