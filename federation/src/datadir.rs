//! The format version of a data directory (a server's store, an agent's
//! keys and certificates).
//!
//! Every data directory carries a small marker file, [`MARKER`], holding the
//! number of the on-disk format it was written in. A binary opens a
//! directory only if it understands that number: one written by a newer
//! Trellis is refused before anything inside is read or written, so a
//! downgrade after an upgrade (or a stray old binary) cannot damage data it
//! does not understand. Directories made before the marker existed hold
//! format 1 by definition; they are accepted and stamped.
//!
//! Bump a kind's format when a release changes what it stores in a way an
//! older binary would misread, and teach its opener to upgrade the older
//! format in place: [`open`] then stamps the new number.

use std::fs;
use std::path::{Path, PathBuf};

/// The data format this build writes and reads for an agent.
pub const AGENT_FORMAT: u32 = 1;

/// The data format of a server's directory: 2 moved the Raft log out of
/// sled into `wal/` (see [`crate::storage`], which upgrades format 1).
pub const SERVER_FORMAT: u32 = 2;

/// The marker file's name inside a data directory.
pub const MARKER: &str = "FORMAT";

/// The marker's text before the number: makes the file self-describing for
/// an operator who finds it.
const PREFIX: &str = "trellis data format ";

/// Why a data directory was not opened. Nothing in it was changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataDirError {
    /// The directory was written by a newer Trellis.
    #[error(
        "data directory {path} is in data format {found}, and this trellis ({build}) reads format {supported} at most: it was written by a newer trellis. Nothing was changed; run that newer version (or restore a backup taken before the upgrade)"
    )]
    TooNew {
        /// The data directory.
        path: PathBuf,
        /// The format written in its marker.
        found: u32,
        /// The newest format this build reads.
        supported: u32,
        /// This build's version.
        build: &'static str,
    },
    /// The marker exists but does not say a format this build knows.
    #[error(
        "data directory {path}: the format marker {marker} says {text:?}, expected \"{PREFIX}N\". Nothing was changed; check that the directory belongs to trellis"
    )]
    BadMarker {
        /// The data directory.
        path: PathBuf,
        /// The marker file.
        marker: PathBuf,
        /// What it holds (its first line).
        text: String,
    },
    /// Reading, creating or stamping the directory failed.
    #[error("data directory {path}: {source} (check permissions and free space)")]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
}

/// What [`open`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Opened {
    /// The directory did not exist; it was made (0700) and stamped.
    Created,
    /// The directory predates the marker; it was accepted and stamped.
    Stamped,
    /// The marker names this build's format.
    Current,
    /// The marker named this older format; the caller upgrades what it
    /// stores, and the marker now names the new one.
    Upgraded(u32),
}

/// Checks the format of the data directory `dir` before anything else
/// opens it: creates and stamps a missing directory (owner only, 0700),
/// stamps one made before markers existed or in an older format, and
/// refuses one whose format this build does not read. For a kind whose
/// opener upgrades older data, [`check`] first and [`stamp`] once the
/// upgrade is done.
pub fn open(dir: &Path, format: u32) -> Result<Opened, DataDirError> {
    let opened = check(dir, format)?;
    stamp(dir, format, opened)?;
    Ok(opened)
}

/// [`open`] without writing the marker (except for a directory it makes):
/// refuses what this build cannot read and says what it found.
pub fn check(dir: &Path, format: u32) -> Result<Opened, DataDirError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DataDirError::Io { path, source }
    };
    let marker = dir.join(MARKER);
    let opened = if !dir.exists() {
        trellis_ca::files::create_private_dir(dir).map_err(from_ca)?;
        Opened::Created
    } else {
        match fs::read_to_string(&marker) {
            Ok(text) => {
                let found = parse(&text).ok_or_else(|| DataDirError::BadMarker {
                    path: dir.to_path_buf(),
                    marker: marker.clone(),
                    text: text.lines().next().unwrap_or_default().to_owned(),
                })?;
                if found > format {
                    return Err(DataDirError::TooNew {
                        path: dir.to_path_buf(),
                        found,
                        supported: format,
                        build: env!("CARGO_PKG_VERSION"),
                    });
                }
                if found == format {
                    return Ok(Opened::Current);
                }
                Opened::Upgraded(found)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Opened::Stamped,
            Err(e) => return Err(io(&marker)(e)),
        }
    };
    if opened == Opened::Created {
        stamp(dir, format, opened)?;
    }
    Ok(opened)
}

/// Writes `format` into the marker of a directory [`check`] found as
/// `opened` (nothing for one already current).
pub fn stamp(dir: &Path, format: u32, opened: Opened) -> Result<(), DataDirError> {
    if opened == Opened::Current {
        return Ok(());
    }
    // Through a temporary file, a rename and a sync of the directory, so
    // a crash leaves either no marker or a whole one.
    let marker = dir.join(MARKER);
    trellis_ca::files::write_private(&marker, format!("{PREFIX}{format}\n").as_bytes())
        .map_err(from_ca)?;
    match opened {
        Opened::Stamped => {
            tracing::info!(dir = %dir.display(), format, "data directory stamped with its format version");
        }
        Opened::Upgraded(from) => {
            tracing::info!(dir = %dir.display(), from, to = format, "data directory upgraded to a newer format");
        }
        Opened::Created | Opened::Current => {}
    }
    Ok(())
}

fn parse(text: &str) -> Option<u32> {
    let n: u32 = text
        .lines()
        .next()?
        .strip_prefix(PREFIX)?
        .trim()
        .parse()
        .ok()?;
    (n >= 1).then_some(n)
}

/// The file helpers' errors are all I/O on a named path.
fn from_ca(e: trellis_ca::CaError) -> DataDirError {
    match e {
        trellis_ca::CaError::Io { path, source } => DataDirError::Io { path, source },
        other => DataDirError::Io {
            path: PathBuf::new(),
            source: std::io::Error::other(other.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn a_missing_directory_is_made_private_and_stamped() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        assert_eq!(open(&dir, AGENT_FORMAT).unwrap(), Opened::Created);
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert_eq!(
            fs::read_to_string(dir.join(MARKER)).unwrap(),
            format!("trellis data format {AGENT_FORMAT}\n")
        );
        assert_eq!(open(&dir, AGENT_FORMAT).unwrap(), Opened::Current);
    }

    #[test]
    fn a_directory_from_before_the_marker_is_accepted_and_stamped() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("node.key"), "old").unwrap();
        assert_eq!(open(tmp.path(), AGENT_FORMAT).unwrap(), Opened::Stamped);
        assert!(tmp.path().join(MARKER).exists());
        assert_eq!(
            fs::read_to_string(tmp.path().join("node.key")).unwrap(),
            "old"
        );
        assert_eq!(open(tmp.path(), AGENT_FORMAT).unwrap(), Opened::Current);
    }

    #[test]
    fn an_older_format_is_stamped_with_the_newer_one_its_opener_upgrades_to() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(open(tmp.path(), 1).unwrap(), Opened::Stamped);
        assert_eq!(
            open(tmp.path(), SERVER_FORMAT).unwrap(),
            Opened::Upgraded(1)
        );
        assert_eq!(
            fs::read_to_string(tmp.path().join(MARKER)).unwrap(),
            format!("trellis data format {SERVER_FORMAT}\n")
        );
        // And an older build is now refused.
        assert!(matches!(
            open(tmp.path(), 1),
            Err(DataDirError::TooNew { found: 2, .. })
        ));
    }

    #[test]
    fn check_leaves_an_older_marker_until_the_upgrade_stamps_it() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(open(tmp.path(), 1).unwrap(), Opened::Stamped);
        let found = check(tmp.path(), SERVER_FORMAT).unwrap();
        assert_eq!(found, Opened::Upgraded(1));
        // The upgrade has not happened yet: an older build still opens it.
        assert_eq!(open(tmp.path(), 1).unwrap(), Opened::Current);
        stamp(tmp.path(), SERVER_FORMAT, found).unwrap();
        assert!(matches!(
            check(tmp.path(), 1),
            Err(DataDirError::TooNew { found: 2, .. })
        ));
    }

    #[test]
    fn a_newer_format_is_refused_naming_the_directory_and_both_versions() {
        let tmp = tempfile::tempdir().unwrap();
        let newer = format!("trellis data format {}\n", AGENT_FORMAT + 1);
        fs::write(tmp.path().join(MARKER), &newer).unwrap();
        let e = open(tmp.path(), AGENT_FORMAT).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(
                e,
                DataDirError::TooNew {
                    found: 2,
                    supported: 1,
                    ..
                }
            ),
            "{msg}"
        );
        assert!(msg.contains(&tmp.path().display().to_string()), "{msg}");
        assert!(
            msg.contains("format 2") && msg.contains("format 1 at most"),
            "{msg}"
        );
        // Refused means untouched.
        assert_eq!(fs::read_to_string(tmp.path().join(MARKER)).unwrap(), newer);
    }

    #[test]
    fn a_marker_that_says_something_else_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        for text in [
            "v2\n",
            "trellis data format x\n",
            "trellis data format 0\n",
            "",
        ] {
            fs::write(tmp.path().join(MARKER), text).unwrap();
            let e = open(tmp.path(), AGENT_FORMAT).unwrap_err();
            assert!(matches!(e, DataDirError::BadMarker { .. }), "{text:?}: {e}");
        }
    }
}
