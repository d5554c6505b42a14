//! The operator's side of the tests that drive a real `trellis server`
//! through the CLI: running verbs with the operator's credentials, and the
//! CA and operator identity they start from.
// Each test file uses its own subset of these.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Output};

/// Processes killed when dropped, so a failed assertion leaves none behind.
pub(crate) struct Kill(pub(crate) Vec<Child>);

impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `trellis ARGS` against `server` with the operator credentials `dir/op`.
pub(crate) fn trellis(dir: &Path, server: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(args)
        .env("TRELLIS_SERVER", server)
        .env("TRELLIS_CREDENTIALS", dir.join("op"))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

/// The same, which must succeed; its standard output.
pub(crate) fn ok(dir: &Path, server: &str, args: &[&str]) -> String {
    let out = trellis(dir, server, args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A mesh CA in `dir/ca` for `trust_domain`, and the operator identity
/// `spiffe://TRUST_DOMAIN/operator/op` in `dir/op`.
pub(crate) fn ca_and_operator(dir: &Path, trust_domain: &str) {
    let d = |p: &str| dir.join(p).to_str().unwrap().to_string();
    ok(
        dir,
        "",
        &[
            "ca",
            "init",
            "--dir",
            &d("ca"),
            "--trust-domain",
            trust_domain,
        ],
    );
    ok(
        dir,
        "",
        &[
            "ca",
            "issue",
            "--dir",
            &d("ca"),
            "--id",
            &format!("spiffe://{trust_domain}/operator/op"),
            "--out",
            &d("op"),
        ],
    );
}
