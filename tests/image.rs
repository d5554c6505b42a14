//! packaging/image/build: the OCI image of the one binary. Built here from
//! the test binary (a debug build: the script does not care which), then
//! read back: its config (non-root user, entrypoint), its layer (the binary,
//! its libraries, no shell), and the binary run from the unpacked rootfs in
//! a chroot, as the non-root user, with nothing of the host's filesystem.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn blob(layout: &Path, digest: &str) -> PathBuf {
    let (alg, hex) = digest.split_once(':').unwrap();
    layout.join("blobs").join(alg).join(hex)
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn image_of_the_binary_runs_as_non_root() {
    // umoci unpacks with the layer's owners and chroot needs root; as
    // another user the image cannot be checked here at all.
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!(
            "SKIPPED image_of_the_binary_runs_as_non_root: needs root (umoci unpack, chroot)"
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("trellis");
    let started = std::time::Instant::now();
    run(Command::new(repo().join("packaging/image/build"))
        .args(["--binary", env!("CARGO_BIN_EXE_trellis")])
        .arg("--out")
        .arg(&layout)
        .args(["--tag", "test"]));
    eprintln!("image built in {:.1} s", started.elapsed().as_secs_f64());
    assert!(
        layout.with_extension("tar").is_file(),
        "the oci-archive is written too"
    );

    let index = json(&layout.join("index.json"));
    let entry = &index["manifests"][0];
    assert_eq!(
        entry["annotations"]["org.opencontainers.image.ref.name"],
        "test"
    );
    let manifest = json(&blob(&layout, entry["digest"].as_str().unwrap()));
    let config = json(&blob(
        &layout,
        manifest["config"]["digest"].as_str().unwrap(),
    ));
    assert_eq!(config["os"], "linux");
    let c = &config["config"];
    assert_eq!(c["User"], "65532:65532", "non-root");
    assert_eq!(c["Entrypoint"], serde_json::json!(["/usr/bin/trellis"]));
    assert_eq!(manifest["layers"].as_array().unwrap().len(), 1, "one layer");

    let bundle = tmp.path().join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:test", layout.display()))
        .arg(&bundle));
    let rootfs = bundle.join("rootfs");
    for absent in ["bin/sh", "usr/bin/sh", "bin/bash", "usr/bin/env"] {
        assert!(
            !rootfs.join(absent).exists(),
            "{absent} is in the image: it should hold the binary alone"
        );
    }
    let files = walk(&rootfs);
    let libs = files.iter().filter(|f| f.contains(".so")).count();
    assert!(libs >= 2, "the loader and libc at least: {files:?}");
    assert!(
        files.len() <= libs + 5,
        "nothing but the binary, its libraries and /etc: {files:?}"
    );

    // The binary runs from the image alone, as the image's user.
    let version = run(Command::new("chroot")
        .arg("--userspec=65532:65532")
        .arg(&rootfs)
        .args(["/usr/bin/trellis", "--version"]));
    // `trellis 0.1.0 (commit 0123abcd4567)`: the version, then the commit.
    assert!(
        version
            .trim()
            .starts_with(concat!("trellis ", env!("CARGO_PKG_VERSION"), " (commit ")),
        "{version}"
    );
    let help = run(Command::new("chroot")
        .arg("--userspec=65532:65532")
        .arg(&rootfs)
        .args(["/usr/bin/trellis", "agent", "--help"]));
    assert!(help.contains("Usage: trellis agent"), "{help}");
}

/// Regular files under `dir`, relative.
fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path().strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}
