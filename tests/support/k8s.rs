//! Helpers for the Kubernetes tests: the `trellis inject` flags every test
//! uses, and offline schema validation with `kubernetes-validate` (PyPI),
//! which `.ci/run` installs.

#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A root fingerprint the goldens carry (no CA is needed to inject).
pub const FINGERPRINT: &str = "3b9f2c0d8e7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c";

/// The flags of every injection in the tests.
pub fn inject_flags() -> Vec<&'static str> {
    vec![
        "--zone",
        "k8s",
        "--trust-root-fingerprint",
        FINGERPRINT,
        "--image",
        "registry.example/trellis:test",
        "--cluster-dns",
        "10.96.0.10",
    ]
}

/// `trellis inject FLAGS EXTRA FILES`, with no TRELLIS_* from the caller.
pub fn inject(extra: &[&str], files: &[&Path]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trellis"));
    cmd.arg("inject")
        .args(inject_flags())
        .args(extra)
        .args(files);
    cmd.env_remove("TRELLIS_ZONE");
    cmd.output().expect("run trellis inject")
}

/// The test data directory.
pub fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// The `kubernetes-validate` program: $KUBERNETES_VALIDATE, or on PATH.
/// Missing, the test fails and says how to get it: a validation that
/// quietly does not run would pass everything.
pub fn kubernetes_validate() -> PathBuf {
    if let Some(p) = std::env::var_os("KUBERNETES_VALIDATE") {
        return PathBuf::from(p);
    }
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("kubernetes-validate"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "kubernetes-validate is not installed: run .ci/run, or `pip install \
             kubernetes-validate` and put it on PATH (or set KUBERNETES_VALIDATE)"
        )
    })
}

/// The newest Kubernetes version `kubernetes-validate` knows (its default).
pub fn newest_kubernetes() -> String {
    let out = Command::new(kubernetes_validate())
        .arg("--help")
        .output()
        .expect("run kubernetes-validate --help");
    let text = String::from_utf8_lossy(&out.stdout).replace('\n', " ");
    let words: Vec<&str> = text.split_whitespace().collect();
    let i = words
        .iter()
        .position(|w| *w == "Defaults")
        .expect("kubernetes-validate --help names its default version");
    words[i + 2].trim_end_matches('.').to_owned()
}

/// Validates `files` strictly (unknown fields refused) against Kubernetes
/// 1.29 (the first with native sidecars on by default) and the newest
/// version known; every resource must pass and have a schema. Returns how
/// many resources passed per version.
pub fn validate(files: &[PathBuf]) -> usize {
    let mut passed = 0;
    for version in ["1.29.0".to_owned(), newest_kubernetes()] {
        let out = Command::new(kubernetes_validate())
            .args(["--strict", "-k", &version])
            .args(files)
            .output()
            .expect("run kubernetes-validate");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        let bad: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("ERROR") || l.starts_with("WARN"))
            .collect();
        assert!(
            out.status.success() && bad.is_empty(),
            "kubernetes-validate {version} refused:\n{text}"
        );
        passed = text
            .lines()
            .filter(|l| l.contains(" passed for resource "))
            .count();
        assert!(
            passed > 0,
            "kubernetes-validate {version} checked nothing:\n{text}"
        );
    }
    passed
}
