//! The dashboard in a real browser: Debian's Chromium, headless, driven by
//! `tests/browser/dashboard.mjs` (npm `playwright-core`, which never
//! downloads a browser). The page must show the mesh `trellis dev` runs,
//! bring in a policy applied meanwhile with the CLI without a reload, and
//! make no request beyond the dashboard itself. `.ci/run` installs
//! `chromium` and runs `npm ci` in `tests/browser`; elsewhere the test
//! skips when they are missing, saying so.
//!
//! Set `DASHBOARD_SCREENSHOT=PATH.png` to keep the screenshot it takes.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[path = "support/dev.rs"]
mod dev;
use dev::Dev;

const CHROMIUM: &str = "/usr/bin/chromium";

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// Whether the browser, Node and the npm package are here; in CI their
/// absence fails the test instead.
fn browser_missing() -> bool {
    let mut missing = Vec::new();
    if !Path::new(CHROMIUM).exists() {
        missing.push("chromium (apt-get install chromium)");
    }
    if Command::new("node").arg("--version").output().is_err() {
        missing.push("node");
    }
    if !browser_dir().join("node_modules/playwright-core").exists() {
        missing.push("playwright-core (npm ci in tests/browser)");
    }
    if missing.is_empty() {
        return false;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "missing in CI: {}; .ci/run installs them",
        missing.join(", ")
    );
    eprintln!(
        "skipped: {} missing (.ci/run installs them)",
        missing.join(", ")
    );
    true
}

#[test]
fn a_browser_sees_the_mesh_and_a_new_policy_without_reloading() {
    if browser_missing() {
        return;
    }
    let started = Instant::now();
    let dev = Dev::start(28500, "1h");
    dev.in_sync();
    let url = dev.s("/dashboard");
    let tmp = tempfile::tempdir().unwrap();
    let shot = std::env::var_os("DASHBOARD_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.path().join("dashboard.png"));
    let policy = "RateLimit/dash-browser";

    let mut node = Command::new("node")
        .current_dir(browser_dir())
        .args([
            "dashboard.mjs",
            &url,
            shot.to_str().unwrap(),
            policy,
            dev.state_dir()
                .join("down")
                .join("inventory-west")
                .to_str()
                .unwrap(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = node.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut stderr = node.stderr.take().unwrap();
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });

    let mut out = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) if l == "LOADED" => break,
            Ok(l) => out.push(l),
            Err(_) => {
                let _ = node.kill();
                let _ = node.wait();
                panic!(
                    "the browser never loaded the page:\n{}\n{}",
                    out.join("\n"),
                    err.join().unwrap()
                );
            }
        }
    }
    let doc = tmp.path().join("policy.yaml");
    std::fs::write(
        &doc,
        "kind: RateLimit\nmetadata: {name: dash-browser}\nspec: {service: nobody.shop, requestsPerSecond: 5, burst: 5}\n",
    )
    .unwrap();
    let applied = Instant::now();
    dev.op_ok(&["policy", "apply", "-f", doc.to_str().unwrap()]);

    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = node.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = node.kill();
            let _ = node.wait();
            panic!("the browser script did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    out.extend(rx.try_iter());
    let err = err.join().unwrap();
    assert!(status.success(), "{status}:\n{}\n{err}", out.join("\n"));
    eprintln!(
        "browser done (policy seen, screenshot taken) {:.1} s after the apply; it said: {}",
        applied.elapsed().as_secs_f64(),
        out.join("\n")
    );
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 20_000,
        "screenshot {} is {size} bytes",
        shot.display()
    );
    eprintln!(
        "screenshot {} ({size} bytes); took {:.1} s",
        shot.display(),
        started.elapsed().as_secs_f64()
    );
}
