//! Making a host's files match what setup wants, idempotently: each file is
//! compared with what is there (content, mode, owner) and written only when
//! it differs, atomically; then systemd is told, when it runs here.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{
    DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The service account the packages create (and the units run as).
pub(super) const ACCOUNT: &str = "trellis";

/// Who owns a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Owner {
    /// root:root: system configuration (the resolved drop-in).
    Root,
    /// root:trellis: configuration the service reads but may not change.
    RootGroup,
    /// trellis:trellis: state the service writes (credentials it renews).
    Service,
}

/// What to do with a file that exists with other content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Policy {
    /// Make it say what setup says.
    Replace,
    /// Leave its content alone: the service changes it itself (a gateway
    /// renews its certificate in place; copying the original back over it
    /// would undo a renewal).
    Keep,
}

/// A file setup wants on the host.
#[derive(Debug)]
pub(super) struct Want {
    pub(super) path: PathBuf,
    pub(super) content: Vec<u8>,
    pub(super) mode: u32,
    pub(super) owner: Owner,
    pub(super) policy: Policy,
}

/// A directory setup wants on the host (made if missing; mode and owner
/// fixed if wrong).
#[derive(Debug)]
pub(super) struct WantDir {
    pub(super) path: PathBuf,
    pub(super) mode: u32,
    pub(super) owner: Owner,
}

/// The `trellis` account as the target root knows it, and whether this
/// process may hand files to it.
#[derive(Debug)]
pub(super) struct Ids {
    uid: Option<u32>,
    gid: Option<u32>,
    can_chown: bool,
}

// === impl Ids ===

impl Ids {
    /// Reads ROOT/etc/passwd and ROOT/etc/group (not NSS: under `--root`
    /// the host's own database would be the wrong one).
    pub(super) fn of(root: &Path) -> Self {
        let lookup = |file: &str| -> Option<u32> {
            let text = fs::read_to_string(root.join(file)).ok()?;
            text.lines().find_map(|l| {
                let mut f = l.split(':');
                (f.next()? == ACCOUNT).then_some(())?;
                f.nth(1)?.parse().ok()
            })
        };
        Self {
            uid: lookup("etc/passwd"),
            gid: lookup("etc/group"),
            can_chown: nix::unistd::geteuid().is_root(),
        }
    }

    /// Whether the account exists in the target root.
    pub(super) fn known(&self) -> bool {
        self.uid.is_some() && self.gid.is_some()
    }

    /// The owner to set, or None when it cannot or need not be set.
    fn wanted(&self, owner: Owner) -> Option<(u32, u32)> {
        if !self.can_chown {
            return None;
        }
        match owner {
            Owner::Root => Some((0, 0)),
            Owner::RootGroup => Some((0, self.gid?)),
            Owner::Service => Some((self.uid?, self.gid?)),
        }
    }
}

/// What happened to one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Created,
    Updated,
    /// Same content; mode or owner corrected.
    Fixed,
    Unchanged,
    /// Different content left in place ([`Policy::Keep`]).
    Kept,
}

impl Outcome {
    pub(super) fn changed(self) -> bool {
        matches!(self, Outcome::Created | Outcome::Updated | Outcome::Fixed)
    }

    pub(super) fn word(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Updated => "updated",
            Outcome::Fixed => "fixed mode/owner",
            Outcome::Unchanged => "unchanged",
            Outcome::Kept => "kept",
        }
    }
}

/// Makes the directory exist with its mode and owner.
pub(super) fn ensure_dir(want: &WantDir, ids: &Ids) -> Result<Outcome> {
    let path = &want.path;
    let outcome = match fs::metadata(path) {
        Ok(m) if !m.is_dir() => bail!("{} exists and is not a directory", path.display()),
        Ok(_) => Outcome::Unchanged,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(want.mode)
                .create(path)
                .with_context(|| format!("creating {}", path.display()))?;
            Outcome::Created
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let fixed = fix_mode_owner(path, want.mode, ids.wanted(want.owner))?;
    Ok(if outcome == Outcome::Unchanged && fixed {
        Outcome::Fixed
    } else {
        outcome
    })
}

/// Makes the file say what `want` says, with its mode and owner; writes
/// only when something differs.
pub(super) fn ensure_file(want: &Want, ids: &Ids) -> Result<Outcome> {
    let path = &want.path;
    let owner = ids.wanted(want.owner);
    let current = match fs::read(path) {
        Ok(c) => Some(c),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    match current {
        Some(c) if c == want.content || want.policy == Policy::Keep => {
            let fixed = fix_mode_owner(path, want.mode, owner)?;
            Ok(match (fixed, c == want.content) {
                (true, _) => Outcome::Fixed,
                (false, true) => Outcome::Unchanged,
                (false, false) => Outcome::Kept,
            })
        }
        current => {
            write_atomic(path, &want.content, want.mode, owner)
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(if current.is_some() {
                Outcome::Updated
            } else {
                Outcome::Created
            })
        }
    }
}

/// Sets mode and owner where they differ; true when something was changed.
fn fix_mode_owner(path: &Path, mode: u32, owner: Option<(u32, u32)>) -> Result<bool> {
    let m = fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    let mut fixed = false;
    if let Some((uid, gid)) = owner
        && (m.uid(), m.gid()) != (uid, gid)
    {
        chown(path, uid, gid)?;
        fixed = true;
    }
    if m.permissions().mode() & 0o7777 != mode {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {mode:o} {}", path.display()))?;
        fixed = true;
    }
    Ok(fixed)
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown {uid}:{gid} {}", path.display()))
}

/// Writes through a temporary file in the same directory, owned and with
/// its mode before any byte lands (a secret is never readable by others,
/// even for a moment), then renames it into place.
fn write_atomic(path: &Path, content: &[u8], mode: u32, owner: Option<(u32, u32)>) -> Result<()> {
    let dir = path.parent().context("a file path has a parent")?;
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let name = path.file_name().context("a file path has a name")?;
    let tmp = dir.join(format!(".{}.setup-tmp", name.to_string_lossy()));
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    if let Some((uid, gid)) = owner {
        chown(&tmp, uid, gid)?;
    }
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", tmp.display()))?;
    f.write_all(content)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    // The rename lives in the directory: without its sync, a power loss
    // can bring back the old file (or none) after setup said it was done.
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))?;
    Ok(())
}

/// What systemd should do after the files are in place.
#[derive(Debug)]
pub(super) struct Start<'a> {
    /// The unit, e.g. `trellis-agent.service`.
    pub(super) unit: &'a str,
    /// Whether a file the unit reads changed (a running unit restarts).
    pub(super) changed: bool,
    /// Whether the resolved drop-in changed (systemd-resolved restarts).
    pub(super) resolved_changed: bool,
    /// What the unit runs, for the message when systemd does not run here.
    pub(super) exec: String,
}

/// Where systemd is not asked to do anything, why not.
#[derive(Debug, Clone, Copy)]
pub(super) enum NoSystemd {
    /// `--root`: the files are for another root, not this host.
    Root,
    /// `--no-start`.
    Asked,
    /// No /run/systemd/system: a container or chroot.
    NotRunning,
}

/// Whether systemd manages this host; why not otherwise.
pub(super) fn systemd_here(root: &Path, no_start: bool) -> Result<(), NoSystemd> {
    if root != Path::new("/") {
        Err(NoSystemd::Root)
    } else if no_start {
        Err(NoSystemd::Asked)
    } else if !Path::new("/run/systemd/system").exists() {
        // sd_booted(3)'s test.
        Err(NoSystemd::NotRunning)
    } else {
        Ok(())
    }
}

/// Enables and starts the unit, or restarts it when what it reads changed
/// and it runs; a unit that runs on unchanged files is left alone.
pub(super) fn start(s: &Start<'_>, why_not: Result<(), NoSystemd>) -> Result<Vec<String>> {
    let mut said = Vec::new();
    if let Err(why) = why_not {
        let because = match why {
            NoSystemd::Root => "--root was given, so systemd is left alone",
            NoSystemd::Asked => "--no-start was given",
            NoSystemd::NotRunning => "systemd is not running on this host",
        };
        said.push(format!(
            "{because}: start it with `systemctl enable --now {}` on a systemd host, or run what the unit runs: {}",
            s.unit, s.exec
        ));
        return Ok(said);
    }
    if s.resolved_changed {
        systemctl(&["try-restart", "systemd-resolved.service"])?;
        said.push(
            "restarted systemd-resolved (if it runs): *.mesh names now go to the agent".into(),
        );
    }
    let active = systemctl_ok(&["is-active", "--quiet", s.unit]);
    let enabled = systemctl_ok(&["is-enabled", "--quiet", s.unit]);
    if s.changed && active {
        systemctl(&["restart", s.unit])?;
        said.push(format!("restarted {} (what it reads changed)", s.unit));
    } else if !active || !enabled {
        systemctl(&["enable", "--now", s.unit])?;
        said.push(format!("enabled and started {}", s.unit));
    } else {
        said.push(format!("{} is enabled and running; left alone", s.unit));
    }
    Ok(said)
}

fn systemctl_ok(args: &[&str]) -> bool {
    Command::new("systemctl")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

fn systemctl(args: &[&str]) -> Result<()> {
    let status = Command::new("systemctl")
        .args(args)
        .status()
        .context("running systemctl")?;
    if !status.success() {
        let unit = args.last().copied().unwrap_or_default();
        bail!(
            "systemctl {} failed ({status}); see `journalctl -u {unit}`",
            args.join(" ")
        );
    }
    Ok(())
}
