//! `trellis dev`, the README's first command, run as a newcomer would.

use std::process::Command;

#[test]
fn dev_brings_up_the_shop_and_sends_requests_through_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["dev", "--requests", "20", "--ports-from", "25400"])
        .output()
        .expect("could not run the trellis binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for hop in [
        "frontend in zone east",
        "-> auth in zone east",
        "in zone west",
        "-> catalog v",
        "-> inventory in zone west",
    ] {
        assert!(stdout.contains(hop), "{hop} missing:\n{stdout}");
    }
    assert!(
        stdout.contains("edge-1 127.0.0.1:25402 (learner)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("dig @127.0.0.1 -p 25440 frontend.shop.mesh"),
        "{stdout}"
    );
    assert!(stdout.contains("curl http://127.77."), "{stdout}");
    assert!(stdout.contains("20 ok, 0 errors"), "{stdout}");
}

#[test]
fn dev_refuses_a_taken_port_and_names_it() {
    let _held = std::net::TcpListener::bind("127.0.0.1:24410").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["dev", "--requests", "1", "--ports-from", "24400"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("port 24410 (gateway east (TCP and UDP)) is taken")
            && err.contains("--ports-from"),
        "{err}"
    );
}
