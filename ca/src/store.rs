//! The CA directory on disk and credential files for clients.
//!
//! ```text
//! DIR/                 0700
//!   trust-domain       the trust domain, one line
//!   root.crt  root.key the root (key 0600)
//!   bundle.pem         the trust bundle: every root in force
//!   zones/<zone>/ca.crt  ca.key   one intermediate per zone
//!   retired/<serial>.crt .key     roots and zone CAs replaced by a rotation
//! ```
//!
//! Rotating the root without downtime: [`CaDir::rotate_root`] makes a new
//! root and trusts both (distribute the bundle); [`CaDir::replace_zone`]
//! re-signs each zone under the new root (its new leaves chain to it);
//! once every old leaf has expired, [`CaDir::retire_old_roots`] trusts the
//! current root alone.
//!
//! Credentials handed to a client are three files beside each other:
//! `PREFIX.crt` (leaf, then chain), `PREFIX.key` (0600) and `PREFIX.bundle`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::authority::{Authority, AuthorityKind, Credentials};
use crate::bundle::TrustBundle;
use crate::cert::{certs_from_pem, key_from_pem};
use crate::error::CaError;
use crate::files;
use crate::spiffe::TrustDomain;

/// A CA directory.
#[derive(Debug, Clone)]
pub struct CaDir {
    dir: PathBuf,
}

impl CaDir {
    /// A handle on `dir`; nothing is read until asked.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Makes a new root and bundle; refuses if a CA is already here.
    pub fn init(&self, trust_domain: &TrustDomain, ttl: Duration) -> Result<Authority, CaError> {
        if self.root_cert_path().exists() || self.root_key_path().exists() {
            return Err(CaError::AlreadyExists(self.dir.clone()));
        }
        files::create_private_dir(&self.dir)?;
        let root = Authority::new_root(trust_domain, ttl)?;
        // Key first: a crash between the writes leaves a key without a
        // certificate, which `init` refuses to overwrite rather than losing it.
        files::write_private(&self.root_key_path(), root.key_pem().as_bytes())?;
        files::write_public(&self.root_cert_path(), root.cert_pem().as_bytes())?;
        files::write_public(
            &self.dir.join("trust-domain"),
            format!("{trust_domain}\n").as_bytes(),
        )?;
        TrustBundle::new(trust_domain.clone(), vec![root.cert().clone()])?
            .save(&self.bundle_path())?;
        Ok(root)
    }

    /// The trust domain recorded by `init`.
    pub fn trust_domain(&self) -> Result<TrustDomain, CaError> {
        let path = self.dir.join("trust-domain");
        let text = self.read_required(&path)?;
        Ok(String::from_utf8_lossy(&text).trim().parse()?)
    }

    /// The root authority.
    pub fn root(&self) -> Result<Authority, CaError> {
        let td = self.trust_domain()?;
        let cert = self.read_required(&self.root_cert_path())?;
        let key = self.read_required(&self.root_key_path())?;
        Authority::from_pem(
            AuthorityKind::Root,
            td,
            &String::from_utf8_lossy(&cert),
            &String::from_utf8_lossy(&key),
            Vec::new(),
        )
    }

    /// The trust bundle.
    pub fn bundle(&self) -> Result<TrustBundle, CaError> {
        let path = self.bundle_path();
        let pem = self.read_required(&path)?;
        TrustBundle::from_pem(self.trust_domain()?, &pem, &path.display().to_string())
    }

    /// Makes the intermediate of `zone`; refuses if the zone has one.
    pub fn create_zone(&self, zone: &str, ttl: Duration) -> Result<Authority, CaError> {
        let dir = self.zone_dir(zone);
        if dir.join("ca.key").exists() {
            return Err(CaError::AlreadyExists(dir));
        }
        self.write_zone(zone, ttl)
    }

    /// Replaces the intermediate of `zone` with one signed by the current
    /// root, archiving the old one under `retired/`. Leaves it signed stay
    /// valid for as long as the bundle trusts their root.
    pub fn replace_zone(&self, zone: &str, ttl: Duration) -> Result<Authority, CaError> {
        let old = self.zone(zone)?;
        self.retire(&old)?;
        self.write_zone(zone, ttl)
    }

    /// Makes a new root, archives the old one under `retired/`, and writes a
    /// bundle that trusts both, so peers with either chain keep talking.
    pub fn rotate_root(&self, ttl: Duration) -> Result<Authority, CaError> {
        let old = self.root()?;
        let mut bundle = self.bundle()?;
        let td = self.trust_domain()?;
        let new = Authority::new_root(&td, ttl)?;
        self.retire(&old)?;
        files::write_private(&self.root_key_path(), new.key_pem().as_bytes())?;
        files::write_public(&self.root_cert_path(), new.cert_pem().as_bytes())?;
        bundle.add_root(new.cert().clone())?;
        bundle.save(&self.bundle_path())?;
        Ok(new)
    }

    /// Trusts the current root alone; returns how many roots were dropped.
    /// Run it only after every leaf under the old roots has expired.
    pub fn retire_old_roots(&self) -> Result<usize, CaError> {
        let root = self.root()?;
        let bundle = self.bundle()?;
        let before = bundle.roots().len();
        TrustBundle::new(bundle.trust_domain().clone(), vec![root.cert().clone()])?
            .save(&self.bundle_path())?;
        Ok(before - 1)
    }

    fn retire(&self, ca: &Authority) -> Result<(), CaError> {
        let dir = self.dir.join("retired");
        files::create_private_dir(&dir)?;
        let name = ca.info().serial.replace(':', "");
        files::write_private(&dir.join(format!("{name}.key")), ca.key_pem().as_bytes())?;
        files::write_public(&dir.join(format!("{name}.crt")), ca.cert_pem().as_bytes())
    }

    fn write_zone(&self, zone: &str, ttl: Duration) -> Result<Authority, CaError> {
        let root = self.root()?;
        let dir = self.zone_dir(zone);
        let ca = root.new_zone(zone, ttl)?;
        files::create_private_dir(&dir)?;
        files::write_private(&dir.join("ca.key"), ca.key_pem().as_bytes())?;
        files::write_public(&dir.join("ca.crt"), ca.cert_pem().as_bytes())?;
        Ok(ca)
    }

    /// The intermediate of `zone`.
    pub fn zone(&self, zone: &str) -> Result<Authority, CaError> {
        let td = self.trust_domain()?;
        let dir = self.zone_dir(zone);
        let hint = format!(
            "run `trellis ca zone --dir {} --zone {zone}`",
            self.dir.display()
        );
        let cert = read_or_hint(&dir.join("ca.crt"), &hint)?;
        let key = read_or_hint(&dir.join("ca.key"), &hint)?;
        Authority::from_pem(
            AuthorityKind::Zone(zone.to_owned()),
            td,
            &String::from_utf8_lossy(&cert),
            &String::from_utf8_lossy(&key),
            Vec::new(),
        )
    }

    /// Path of the root certificate.
    pub fn root_cert_path(&self) -> PathBuf {
        self.dir.join("root.crt")
    }

    pub(crate) fn root_key_path(&self) -> PathBuf {
        self.dir.join("root.key")
    }

    /// Path of the trust bundle.
    pub fn bundle_path(&self) -> PathBuf {
        self.dir.join("bundle.pem")
    }

    /// Directory of a zone's intermediate.
    pub fn zone_dir(&self, zone: &str) -> PathBuf {
        self.dir.join("zones").join(zone)
    }

    fn read_required(&self, path: &Path) -> Result<Vec<u8>, CaError> {
        read_or_hint(
            path,
            &format!(
                "is {} a CA directory? Create one with `trellis ca init --dir {}`",
                self.dir.display(),
                self.dir.display()
            ),
        )
    }
}

fn read_or_hint(path: &Path, hint: &str) -> Result<Vec<u8>, CaError> {
    if !path.exists() {
        return Err(CaError::Missing {
            path: path.to_owned(),
            hint: hint.to_owned(),
        });
    }
    files::read(path)
}

/// The three file paths of a credentials prefix.
pub fn credential_paths(prefix: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let with = |ext: &str| {
        let mut s = prefix.as_os_str().to_owned();
        s.push(ext);
        PathBuf::from(s)
    };
    (with(".crt"), with(".key"), with(".bundle"))
}

/// Writes `PREFIX.crt`, `PREFIX.key` (0600) and `PREFIX.bundle`.
pub fn write_credentials(
    prefix: &Path,
    creds: &Credentials,
    bundle: &TrustBundle,
) -> Result<(), CaError> {
    let (crt, key, bun) = credential_paths(prefix);
    if let Some(parent) = crt.parent().filter(|p| !p.exists()) {
        files::create_private_dir(parent)?;
    }
    files::write_private(&key, creds.key_pem().as_bytes())?;
    files::write_public(&crt, creds.chain_pem().as_bytes())?;
    bundle.save(&bun)
}

/// Reads credentials written by [`write_credentials`]; the trust domain of the
/// bundle is that of the certificate's SPIFFE ID.
pub fn load_credentials(prefix: &Path) -> Result<(Credentials, TrustBundle), CaError> {
    let (crt, key, bun) = credential_paths(prefix);
    let hint = "issue credentials with `trellis ca issue --out PREFIX`";
    let chain = certs_from_pem(&read_or_hint(&crt, hint)?, &crt.display().to_string())?;
    let key_der = key_from_pem(&read_or_hint(&key, hint)?, &key.display().to_string())?;
    let rustls_pki_types::PrivateKeyDer::Pkcs8(key) = key_der else {
        return Err(CaError::Pem {
            what: key.display().to_string(),
            reason: "the key must be PKCS#8 (\"BEGIN PRIVATE KEY\")".into(),
        });
    };
    let creds = Credentials { chain, key };
    creds.check_key_matches()?;
    let td = creds.id()?.trust_domain();
    let bundle = TrustBundle::from_pem(td, &read_or_hint(&bun, hint)?, &bun.display().to_string())?;
    Ok((creds, bundle))
}
