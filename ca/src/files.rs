//! Writing key material and certificates to disk with the right modes.
//!
//! Every write goes to a temporary file in the same directory, is synced, and
//! is renamed into place, so a crash leaves either the old file or the new one,
//! never half of a key.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::error::CaError;

/// Mode for private keys: owner read/write only.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// Mode for directories that hold private keys.
pub const PRIVATE_DIR_MODE: u32 = 0o700;
const PUBLIC_FILE_MODE: u32 = 0o644;

/// Creates `dir` (and parents) with mode 0700, or tightens an existing one to 0700.
pub fn create_private_dir(dir: &Path) -> Result<(), CaError> {
    if dir.as_os_str().is_empty() {
        return Ok(());
    }
    if !dir.exists() {
        DirBuilder::new()
            .recursive(true)
            .mode(PRIVATE_DIR_MODE)
            .create(dir)
            .map_err(CaError::io(dir))?;
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(PRIVATE_DIR_MODE)).map_err(CaError::io(dir))
}

/// Writes a private key (or any secret) atomically with mode 0600.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), CaError> {
    write_atomic(path, contents, PRIVATE_FILE_MODE)
}

/// Writes a public file (certificate, bundle) atomically with mode 0644.
pub fn write_public(path: &Path, contents: &[u8]) -> Result<(), CaError> {
    write_atomic(path, contents, PUBLIC_FILE_MODE)
}

/// Reads a whole file, naming it in the error.
pub fn read(path: &Path) -> Result<Vec<u8>, CaError> {
    fs::read(path).map_err(CaError::io(path))
}

fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let file_name = path.file_name().ok_or_else(|| CaError::Io {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
    })?;
    let tmp = path.with_file_name(format!(".{}.tmp", file_name.to_string_lossy()));
    // A stale temp file from a crash may carry a wider mode; start afresh.
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(CaError::io(&tmp))?;
    f.write_all(contents).map_err(CaError::io(&tmp))?;
    f.sync_all().map_err(CaError::io(&tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(CaError::io(path))?;
    // Make the rename itself durable.
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && let Ok(d) = fs::File::open(parent)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_0600_and_dirs_0700() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        create_private_dir(&dir).unwrap();
        let key = dir.join("k.key");
        write_private(&key, b"secret").unwrap();
        // Overwriting keeps the mode, even over a file that was made wider.
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&key, b"secret2").unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(fs::read(&key).unwrap(), b"secret2");
    }
}
