//! Helpers for the tests that build hosts out of network namespaces.
// Each test file uses its own subset of these.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

pub(crate) struct Netns(pub(crate) String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub(crate) fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

pub(crate) fn in_ns(ns: &str, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, program]);
    c
}

/// Starts a trellis role inside `ns` and waits for its first stdout line.
pub(crate) fn start(ns: &str, args: &[&str]) -> Proc {
    let mut child = in_ns(ns, env!("CARGO_BIN_EXE_trellis"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.contains("listening"),
        "{args:?} did not start: {line:?}"
    );
    Proc(child)
}

/// Whether this process may make namespaces; why not, otherwise.
pub(crate) fn privileged() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("not root".into());
    }
    let probe = format!("tprobe{}", std::process::id());
    let ok = Command::new("ip")
        .args(["netns", "add", &probe])
        .status()
        .map_err(|e| format!("no ip command: {e}"))?;
    let _ = Command::new("ip").args(["netns", "del", &probe]).status();
    if !ok.success() {
        return Err("ip netns add failed".into());
    }
    Command::new("nft")
        .arg("--version")
        .output()
        .map_err(|e| format!("no nft command: {e}"))?;
    Command::new("curl")
        .arg("--version")
        .output()
        .map_err(|e| format!("no curl command: {e}"))?;
    Ok(())
}

pub(crate) fn write(path: &Path, text: String) {
    std::fs::write(path, text).unwrap();
}

/// Two hosts, east and west, joined by a veth link on 10.`octet`.X.0/24;
/// `tag` keeps names apart between tests. Returns the namespaces (deleted
/// on drop) and the east and west addresses.
pub(crate) fn two_hosts(tag: &str, octet: u8) -> (Netns, Netns, String, String) {
    let id = std::process::id() % 100_000;
    let (east, west) = (Netns(format!("{tag}{id}e")), Netns(format!("{tag}{id}w")));
    let net = format!("10.{octet}.{}", id % 200 + 20);
    let (e_addr, w_addr) = (format!("{net}.1"), format!("{net}.2"));
    for ns in [&east, &west] {
        ip(&["netns", "add", &ns.0]);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
    }
    let (ve, vw) = (format!("{tag}v{id}e"), format!("{tag}v{id}w"));
    ip(&[
        "link", "add", &ve, "netns", &east.0, "type", "veth", "peer", "name", &vw, "netns", &west.0,
    ]);
    for (ns, dev, addr) in [(&east, &ve, &e_addr), (&west, &vw, &w_addr)] {
        ip(&[
            "-n",
            &ns.0,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            dev,
        ]);
        ip(&["-n", &ns.0, "link", "set", dev, "up"]);
    }
    (east, west, e_addr, w_addr)
}
