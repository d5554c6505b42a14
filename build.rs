//! Stamps the binary with the commit it was built from, for `trellis
//! --version`. Sources, in order: `TRELLIS_COMMIT` (set it when building
//! from a tarball, as distribution packagers do), then `git` when the tree
//! is a clone, else "unknown". A missing git or a tree without `.git` is
//! not an error: the version must never stop a build.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=TRELLIS_COMMIT");
    let commit = std::env::var("TRELLIS_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .map(|c| c.trim().to_owned())
        .or_else(git_commit)
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=TRELLIS_COMMIT={commit}");
}

/// The short hash of HEAD, and rebuild triggers on HEAD and the ref it points to, so a new commit
/// restamps the binary without a clean build.
fn git_commit() -> Option<String> {
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    // A source tree unpacked inside some other clone must not take that
    // clone's commit.
    let top = git(&["rev-parse", "--show-toplevel"])?;
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    if Path::new(&top).canonicalize().ok()? != here.canonicalize().ok()? {
        return None;
    }
    let hash = git(&["rev-parse", "--short=12", "HEAD"])?;
    // A worktree keeps HEAD in its own git dir and refs in the common one.
    let refs = git(&["symbolic-ref", "-q", "HEAD"]);
    for dir in [
        git(&["rev-parse", "--git-dir"]),
        git(&["rev-parse", "--git-common-dir"]),
    ]
    .into_iter()
    .flatten()
    {
        let dir = here.join(dir);
        let files = ["HEAD", "packed-refs"]
            .map(String::from)
            .into_iter()
            .chain(refs.clone());
        // Only files that exist: cargo reruns a script on every build while
        // a path it watches is missing.
        for f in files.map(|f| dir.join(f)).filter(|f| f.exists()) {
            println!("cargo:rerun-if-changed={}", f.display());
        }
    }
    // No "-dirty" mark: it would go stale, because this script reruns only
    // when HEAD moves, not on every edit to a source file.
    Some(hash)
}
