//! Upgrade safety: a server or agent refuses, before touching anything, a
//! data directory written in a newer data format than it reads, and says
//! which directory and both versions. (Accepting and stamping a directory
//! from before the marker is tested in federation/src/datadir.rs.)

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_trellis");

fn trellis(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn newer(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("FORMAT"), "trellis data format 999\n").unwrap();
}

/// `reads`: the newest format the refusing binary knows for that kind of
/// directory (servers moved to 2 with the write-ahead log).
fn assert_refused(out: &Output, dir: &Path, reads: u32) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "data directory {} is in data format 999",
            dir.display()
        )) && err.contains(&format!("reads format {reads} at most"))
            && err.contains("written by a newer trellis"),
        "{err}"
    );
}

#[test]
fn server_refuses_a_newer_data_directory_and_leaves_it_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    let out = trellis(&["ca", "init", "--dir", ca.to_str().unwrap()]);
    assert!(out.status.success());
    let data = tmp.path().join("data");
    let cfg = tmp.path().join("server.toml");
    std::fs::write(
        &cfg,
        format!(
            "name = \"east-1\"\nzone = \"east\"\ndata_dir = \"{}\"\nlisten = \"127.0.0.1:0\"\nca_dir = \"{}\"\nbootstrap = true\n",
            data.display(),
            ca.display()
        ),
    )
    .unwrap();
    newer(&data);
    let out = trellis(&["server", "--config", cfg.to_str().unwrap()]);
    assert_refused(&out, &data, 2);
    // Refused before sled or the log opened anything.
    assert!(!data.join("store").exists());
    assert!(!data.join("wal").exists());
    assert_eq!(
        std::fs::read_to_string(data.join("FORMAT")).unwrap(),
        "trellis data format 999\n"
    );
}

#[test]
fn agent_refuses_a_newer_data_directory_before_joining() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("agent");
    newer(&data);
    let cfg = tmp.path().join("agent.toml");
    // The server address is never dialled: the refusal comes first.
    std::fs::write(
        &cfg,
        format!(
            "name = \"vm1\"\nzone = \"east\"\nservers = [\"127.0.0.1:9\"]\ndata_dir = \"{}\"\nadvertise = \"127.0.0.1\"\njoin_token_file = \"{}\"\n[[services]]\nname = \"catalog\"\nnamespace = \"shop\"\nports = [8080]\n",
            data.display(),
            tmp.path().join("no-token").display()
        ),
    )
    .unwrap();
    let out = trellis(&["agent", "--config", cfg.to_str().unwrap()]);
    assert_refused(&out, &data, 1);
}
