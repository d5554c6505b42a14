//! The CLI and a closed stdout: `trellis … | head -1` must end quietly.
//!
//! Each verb runs with stdout on a pipe whose read end is already closed, so
//! its first line meets `EPIPE` (Rust ignores SIGPIPE); `println!` panicked
//! there with status 101.

use std::process::{Command, Output};

/// Runs `trellis args` with stdout on a pipe nobody reads.
fn with_closed_stdout(args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(args)
        .stdout(writer)
        .output()
        .expect("could not run the trellis binary")
}

fn assert_quiet(args: &[&str], out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "trellis {args:?} exited {:?}: {stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "trellis {args:?}: {stderr}");
    assert!(!stderr.contains("error"), "trellis {args:?}: {stderr}");
}

#[test]
fn verbs_end_quietly_when_the_reader_is_gone() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let d = dir.to_str().unwrap();
    let init = ["ca", "init", "--dir", d, "--trust-domain", "example.org"];
    let out = with_closed_stdout(&init);
    assert_quiet(&init, &out);
    // The verb still did its work before its output was cut.
    let root = dir.join("root.crt");
    assert!(root.exists(), "ca init wrote no root certificate");

    let inspect = ["ca", "inspect", root.to_str().unwrap()];
    let out = with_closed_stdout(&inspect);
    assert_quiet(&inspect, &out);

    let help = ["--help"];
    assert_quiet(&help, &with_closed_stdout(&help));
}
