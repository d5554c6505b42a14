//! The packages as an administrator meets them. `packaging/build` makes the
//! .deb and .rpm from the binary this test run was built with
//! (`--prebuilt`; a release build would cost CI minutes and changes nothing
//! here), and a second .deb with a bumped version. In a Debian
//! bookworm root made by debootstrap (chroot), the .deb is installed,
//! checked (files, owners, modes, conffiles, the system account, nothing
//! enabled or started, `systemd-analyze verify` on the installed units),
//! used (`trellis agent setup` twice), upgraded over a locally edited
//! conffile, removed and purged. lintian must report no error. The .rpm is
//! read with Debian's `rpm` for the same files and its scriptlets.
//!
//! Needs root, debootstrap, lintian, rpm and network access to the Debian
//! mirror (CI installs and has them); elsewhere it is skipped with a
//! message. The debootstrap tarball is cached under the target directory.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const BIN: &str = env!("CARGO_BIN_EXE_trellis");
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    check(&format!("{cmd:?}"), out)
}

fn check(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Why this machine cannot run the test, if it cannot.
fn missing() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root".into());
    }
    for tool in [
        "debootstrap",
        "lintian",
        "rpm",
        "dpkg-deb",
        "unshare",
        "chroot",
    ] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
            .unwrap_or(false);
        if !found {
            return Some(format!("no {tool} command"));
        }
    }
    None
}

/// The target directory of this build (BIN is TARGET/PROFILE/trellis).
fn target_dir() -> PathBuf {
    Path::new(BIN)
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A Debian root. Commands run chrooted in a private mount namespace with
/// /proc mounted, so nothing stays mounted when they end.
struct Root(PathBuf);

impl Root {
    fn make(dir: &Path) -> Self {
        let cache = target_dir().join("debootstrap");
        std::fs::create_dir_all(&cache).unwrap();
        // The package's dependencies beyond minbase, installed up front:
        // `dpkg -i` does not fetch them (apt would, from the network).
        let include = "adduser,procps,systemd";
        let tarball = cache.join(format!("{SUITE}-minbase-{}.tgz", include.replace(',', "-")));
        let base = || {
            let mut c = Command::new("debootstrap");
            c.args(["--variant=minbase", &format!("--include={include}")]);
            c
        };
        if !tarball.exists() {
            // Downloaded once, then reused by every later run on this
            // machine (the tarball holds the .debs, not an installed root).
            let t0 = Instant::now();
            let partial = cache.join("partial.tgz");
            let scratch = cache.join("scratch");
            run(base()
                .arg(format!("--make-tarball={}", partial.display()))
                .arg(SUITE)
                .arg(&scratch)
                .arg(MIRROR));
            std::fs::rename(&partial, &tarball).unwrap();
            eprintln!("debootstrap tarball made in {:?}", t0.elapsed());
        }
        let t0 = Instant::now();
        let root = dir.join("root");
        run(base()
            .arg(format!("--unpack-tarball={}", tarball.display()))
            .arg(SUITE)
            .arg(&root)
            .arg(MIRROR));
        eprintln!("debian root made in {:?}", t0.elapsed());
        Root(root)
    }

    fn sh_output(&self, script: &str) -> Output {
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--fork", "sh", "-c"])
            .arg(r#"mount -t proc proc "$0/proc" && exec chroot "$0" /bin/sh -ec "$1""#)
            .arg(&self.0)
            .arg(script)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("LC_ALL", "C")
            .output()
            .unwrap()
    }

    /// Runs `script` in the root and returns its stdout; panics on failure.
    fn sh(&self, script: &str) -> String {
        check(script, self.sh_output(script))
    }

    fn exists(&self, path: &str) -> bool {
        self.0
            .join(path.trim_start_matches('/'))
            .symlink_metadata()
            .is_ok()
    }

    /// `MODE USER GROUP` of a path.
    fn stat(&self, path: &str) -> String {
        self.sh(&format!("stat -c '%a %U %G' {path}"))
            .trim()
            .to_owned()
    }

    fn read(&self, path: &str) -> String {
        std::fs::read_to_string(self.0.join(path.trim_start_matches('/'))).unwrap()
    }
}

/// Builds the packages: `(deb, rpm)` at the crate's version and a second
/// .deb at `bumped`.
fn build(out: &Path, bumped: &str) -> (PathBuf, PathBuf, PathBuf) {
    let script = format!("{REPO}/packaging/build");
    let build = |extra: &[&str], dir: &str| -> Vec<PathBuf> {
        let text = run(Command::new(&script)
            .args(["--prebuilt", BIN, "--out"])
            .arg(out.join(dir))
            .args(extra));
        text.lines().map(PathBuf::from).collect()
    };
    let first = build(&[], "v1");
    let second = build(&["--deb-version", bumped, "--no-rpm"], "v2");
    assert_eq!(first.len(), 2, "{first:?}");
    (first[0].clone(), first[1].clone(), second[0].clone())
}

#[test]
fn deb_installs_upgrades_removes_and_purges_in_a_debian_root() {
    if let Some(why) = missing() {
        assert!(
            std::env::var_os("CI").is_none(),
            "the package test must run in CI (as root, with debootstrap, lintian and rpm): {why}"
        );
        eprintln!("skipped: the package test needs root, debootstrap, lintian and rpm: {why}");
        return;
    }
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    // A newer Debian revision: dpkg treats it as an upgrade like any other.
    let bumped = format!("{}-2", env!("CARGO_PKG_VERSION"));
    let (deb, rpm, deb2) = build(&tmp.path().join("out"), &bumped);
    eprintln!(
        "packages built in {:?}: {deb:?} {rpm:?} {deb2:?}",
        t0.elapsed()
    );

    lintian_finds_no_error(&deb);
    rpm_has_the_debs_files_and_scriptlets(&deb, &rpm);

    let root = Root::make(tmp.path());
    for (p, name) in [(&deb, "v1.deb"), (&deb2, "v2.deb")] {
        std::fs::copy(p, root.0.join("tmp").join(name)).unwrap();
    }

    // --- install: everything in place, nothing started ---------------------
    let out = root.sh("dpkg -i /tmp/v1.deb");
    eprintln!("{out}");
    let version = root.sh("trellis --version");
    assert!(
        version.starts_with(&format!("trellis {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    let account = root.sh("getent passwd trellis");
    let f: Vec<&str> = account.trim().split(':').collect();
    assert!(
        f[2].parse::<u32>().unwrap() < 1000,
        "not a system uid: {account}"
    );
    assert_eq!(
        (f[5], f[6]),
        ("/var/lib/trellis", "/usr/sbin/nologin"),
        "{account}"
    );
    root.sh("getent group trellis");
    assert_eq!(root.stat("/var/lib/trellis"), "700 trellis trellis");
    assert_eq!(root.stat("/etc/trellis"), "750 root trellis");
    let conffiles = root.sh("dpkg-query -W -f='${Conffiles}' trellis");
    for c in ["agent", "gateway", "server"] {
        assert!(
            conffiles.contains(&format!("/etc/trellis/{c}.toml.example ")),
            "{conffiles}"
        );
    }
    for f in [
        "/usr/bin/trellis",
        "/lib/systemd/system/trellis-agent.service",
        "/lib/systemd/system/trellis-gateway.service",
        "/lib/systemd/system/trellis-server.service",
        "/usr/share/trellis/trellis-mesh.conf",
        "/usr/share/man/man1/trellis.1.gz",
        "/usr/share/man/man1/trellis-agent-setup.1.gz",
        "/usr/share/bash-completion/completions/trellis",
        "/usr/share/zsh/vendor-completions/_trellis",
        "/usr/share/fish/vendor_completions.d/trellis.fish",
        "/usr/share/doc/trellis/copyright",
    ] {
        assert!(root.exists(f), "{f} is not installed");
    }
    assert_eq!(root.stat("/usr/bin/trellis"), "755 root root");
    // Not configured, so not enabled and not turned on.
    assert!(!root.exists("/etc/systemd/resolved.conf.d/trellis-mesh.conf"));
    let wants = root.sh("ls /etc/systemd/system/*.wants/ 2>/dev/null || true");
    assert!(
        !wants.contains("trellis"),
        "a unit was enabled at install: {wants}"
    );
    let verify = root.sh_output(
        "systemd-analyze verify /lib/systemd/system/trellis-agent.service \
         /lib/systemd/system/trellis-gateway.service /lib/systemd/system/trellis-server.service",
    );
    let err = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && err.trim().is_empty(),
        "systemd-analyze verify: {err}"
    );

    // --- setup, twice ------------------------------------------------------
    let setup = "trellis agent setup --name vm1 --zone west --server 10.0.0.1:7400 \
                 --service catalog.shop:8080 --health http:/healthz --advertise 10.0.0.21";
    let out = root.sh(setup);
    assert!(out.contains("systemd is not running on this host"), "{out}");
    assert!(
        out.contains("created           /etc/trellis/agent.toml"),
        "{out}"
    );
    assert_eq!(root.stat("/etc/trellis/agent.toml"), "640 root trellis");
    assert_eq!(
        root.stat("/etc/systemd/resolved.conf.d/trellis-mesh.conf"),
        "644 root root"
    );
    let out = root.sh(setup);
    assert!(out.contains("nothing changed"), "{out}");
    let agent_toml = root.read("/etc/trellis/agent.toml");

    // --- upgrade over a local edit and some state ---------------------------
    root.sh("echo '# edited here' >> /etc/trellis/agent.toml.example");
    root.sh("install -d -o trellis -g trellis -m 0700 /var/lib/trellis/agent && echo k > /var/lib/trellis/agent/keep");
    root.sh("dpkg -i /tmp/v2.deb");
    let v = root.sh("dpkg-query -W -f='${Version} ${Status}' trellis");
    assert_eq!(v, format!("{bumped} install ok installed"));
    assert!(
        root.read("/etc/trellis/agent.toml.example")
            .ends_with("# edited here\n")
    );
    assert!(!root.exists("/etc/trellis/agent.toml.example.dpkg-dist"));
    assert_eq!(root.read("/etc/trellis/agent.toml"), agent_toml);
    assert_eq!(root.read("/var/lib/trellis/agent/keep"), "k\n");
    assert_eq!(root.stat("/var/lib/trellis"), "700 trellis trellis");

    // --- remove: the binary and units go, configuration and state stay ------
    root.sh("dpkg -r trellis");
    for gone in [
        "/usr/bin/trellis",
        "/lib/systemd/system/trellis-agent.service",
    ] {
        assert!(!root.exists(gone), "{gone} survived remove");
    }
    for kept in [
        "/etc/trellis/agent.toml",
        "/etc/trellis/agent.toml.example",
        "/var/lib/trellis/agent/keep",
        "/etc/systemd/resolved.conf.d/trellis-mesh.conf",
    ] {
        assert!(root.exists(kept), "{kept} did not survive remove");
    }
    let s = root.sh("dpkg-query -W -f='${Status}' trellis");
    assert_eq!(s, "deinstall ok config-files");

    // --- purge: all of it goes; the account stays, as Debian leaves them ----
    root.sh("dpkg -P trellis");
    for gone in [
        "/etc/trellis",
        "/var/lib/trellis",
        "/etc/systemd/resolved.conf.d/trellis-mesh.conf",
    ] {
        assert!(!root.exists(gone), "{gone} survived purge");
    }
    root.sh("getent passwd trellis");
    let q = root.sh_output("dpkg-query -W trellis");
    assert!(
        !q.status.success(),
        "trellis is still known to dpkg after purge"
    );
    eprintln!("package test took {:?}", t0.elapsed());
}

/// lintian: no error; warnings are printed for the report.
fn lintian_finds_no_error(deb: &Path) {
    let out = Command::new("lintian")
        .args(["--allow-root", "--no-cfg"])
        .arg(deb)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("lintian:\n{text}{}", String::from_utf8_lossy(&out.stderr));
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("E:")).collect();
    assert!(errors.is_empty(), "lintian errors:\n{}", errors.join("\n"));
    // lintian exits non-zero for errors only; anything else is a crash.
    assert!(
        out.status.success(),
        "lintian failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The .rpm carries the same files as the .deb, at the paths an RPM system
/// uses for units and zsh completions, the same example configuration as
/// config files, and scriptlets that make the account and handle the units.
fn rpm_has_the_debs_files_and_scriptlets(deb: &Path, rpm: &Path) {
    let deb_files: BTreeSet<String> = run(Command::new("dpkg-deb").arg("-c").arg(deb))
        .lines()
        .filter(|l| l.starts_with('-'))
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| p.trim_start_matches('.').to_owned())
        // Debian's own: copyright, the changelog, the lintian override.
        .filter(|p| !p.starts_with("/usr/share/doc/trellis/c"))
        .filter(|p| !p.starts_with("/usr/share/lintian/"))
        .map(|p| {
            p.replace("/lib/systemd/system/", "/usr/lib/systemd/system/")
                .replace("/zsh/vendor-completions/", "/zsh/site-functions/")
        })
        .collect();
    let rpm_files: BTreeSet<String> = run(Command::new("rpm").arg("-qpl").arg(rpm))
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(deb_files, rpm_files);
    let config = run(Command::new("rpm").args(["-qp", "--configfiles"]).arg(rpm));
    for c in ["agent", "gateway", "server"] {
        assert!(
            config.contains(&format!("/etc/trellis/{c}.toml.example")),
            "{config}"
        );
    }
    let scripts = run(Command::new("rpm").args(["-qp", "--scripts"]).arg(rpm));
    for want in [
        "preinstall scriptlet",
        "useradd --system",
        "chmod 0700 /var/lib/trellis",
        "systemctl stop trellis-server.service",
        "systemctl try-restart trellis-server.service",
    ] {
        assert!(
            scripts.contains(want),
            "no {want:?} in the rpm scriptlets:\n{scripts}"
        );
    }
}
