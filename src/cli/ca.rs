//! `trellis ca …`: make and inspect the mesh's certificates.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use clap::Subcommand;
use trellis_ca::{
    CaDir, CertInfo, IssueOptions, SpiffeId, TrustDomain, certs_from_pem, credential_paths,
    write_credentials,
};

use crate::cli::parse_duration;

/// CA certificates with less than this left get a warning from `inspect`.
const CA_WARN_LEFT: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, Subcommand)]
pub(crate) enum CaCommand {
    /// Make a new root CA and trust bundle in DIR.
    ///
    /// Writes DIR/root.crt, DIR/root.key (0600), DIR/bundle.pem and
    /// DIR/trust-domain. Refuses to touch a directory that already holds a CA.
    Init {
        /// Directory for the CA's files (created 0700).
        #[arg(long)]
        dir: PathBuf,
        /// Trust domain the CA speaks for.
        #[arg(long, default_value = "trellis.local")]
        trust_domain: TrustDomain,
        /// Lifetime of the root certificate.
        #[arg(long, default_value = "10y", value_parser = parse_duration)]
        ttl: Duration,
    },
    /// Make the intermediate CA of a zone, signed by the root.
    ///
    /// Writes DIR/zones/ZONE/ca.crt and ca.key (0600). Zone servers sign
    /// workload certificates with it; its path length is 0.
    Zone {
        /// The CA directory made by `trellis ca init`.
        #[arg(long)]
        dir: PathBuf,
        /// Zone name (a SPIFFE path segment: letters, digits, '.', '-', '_').
        #[arg(long)]
        zone: String,
        /// Lifetime of the intermediate (clipped to the root's).
        #[arg(long, default_value = "1y", value_parser = parse_duration)]
        ttl: Duration,
        /// Replace the zone's intermediate with one under the current root
        /// (after `rotate-root`); the old one is archived under DIR/retired.
        #[arg(long)]
        replace: bool,
    },
    /// Start a root rotation: a new root, trusted beside the old one.
    ///
    /// The bundle then holds both roots: distribute it, re-sign each zone with
    /// `trellis ca zone --replace`, let old leaves expire, then run
    /// `trellis ca retire-roots`. The old root is archived under DIR/retired.
    RotateRoot {
        /// The CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// Lifetime of the new root.
        #[arg(long, default_value = "10y", value_parser = parse_duration)]
        ttl: Duration,
    },
    /// Finish a root rotation: trust only the current root.
    RetireRoots {
        /// The CA directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a certificate for an identity: PREFIX.crt, PREFIX.key, PREFIX.bundle.
    ///
    /// For operators (spiffe://TD/operator/NAME) and tests; workloads get
    /// theirs from the agent, which keeps its key on its host. Signed by the
    /// zone's intermediate with --zone, by the root otherwise.
    Issue {
        /// The CA directory made by `trellis ca init`.
        #[arg(long)]
        dir: PathBuf,
        /// The identity, e.g. spiffe://trellis.local/operator/alice.
        #[arg(long)]
        id: SpiffeId,
        /// Path prefix of the files to write.
        #[arg(long)]
        out: PathBuf,
        /// Lifetime of the certificate.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: Duration,
        /// Sign with this zone's intermediate instead of the root.
        #[arg(long)]
        zone: Option<String>,
        /// A DNS name to add beside the identity (repeatable): for a server
        /// reached by name, such as the admission webhook
        /// (trellis-webhook.trellis-system.svc).
        #[arg(long = "dns-name", value_name = "NAME", value_parser = parse_dns_name)]
        dns_names: Vec<String>,
    },
    /// Show the identity, issuer and validity of every certificate in FILE.
    Inspect {
        /// A PEM file: a certificate, a chain or a bundle.
        file: PathBuf,
    },
}

impl CaCommand {
    pub(crate) fn run(self) -> Result<()> {
        match self {
            CaCommand::Init {
                dir,
                trust_domain,
                ttl,
            } => init(&dir, &trust_domain, ttl),
            CaCommand::Zone {
                dir,
                zone,
                ttl,
                replace,
            } => zone_ca(&dir, &zone, ttl, replace),
            CaCommand::RotateRoot { dir, ttl } => {
                let root = CaDir::new(&dir)
                    .rotate_root(ttl)
                    .context("could not rotate the root")?;
                outln!(
                    "new root {} (expires {}); the bundle now trusts the old and the new root",
                    root.info().serial,
                    rfc3339(root.info().not_after)
                );
                outln!(
                    "next: distribute {}, then trellis ca zone --replace --dir {} --zone <each zone>",
                    CaDir::new(&dir).bundle_path().display(),
                    dir.display()
                );
                Ok(())
            }
            CaCommand::RetireRoots { dir } => {
                let n = CaDir::new(&dir)
                    .retire_old_roots()
                    .context("could not retire old roots")?;
                outln!("the bundle now trusts the current root only ({n} retired)");
                Ok(())
            }
            CaCommand::Issue {
                dir,
                id,
                out,
                ttl,
                zone,
                dns_names,
            } => issue(&dir, &id, &out, ttl, zone.as_deref(), &dns_names),
            CaCommand::Inspect { file } => inspect(&file),
        }
    }
}

fn init(dir: &Path, td: &TrustDomain, ttl: Duration) -> Result<()> {
    let ca = CaDir::new(dir);
    let root = ca.init(td, ttl).context("could not create the CA")?;
    outln!("created root CA for trust domain {td} in {}", dir.display());
    outln!("  certificate: {}", ca.root_cert_path().display());
    outln!("  bundle:      {}", ca.bundle_path().display());
    outln!("  expires:     {}", rfc3339(root.info().not_after));
    outln!(
        "next: trellis ca zone --dir {} --zone <name>",
        dir.display()
    );
    Ok(())
}

fn zone_ca(dir: &Path, zone: &str, ttl: Duration, replace: bool) -> Result<()> {
    let ca = CaDir::new(dir);
    let z = if replace {
        ca.replace_zone(zone, ttl)
    } else {
        ca.create_zone(zone, ttl)
    }
    .with_context(|| format!("could not make the CA of zone {zone:?}"))?;
    outln!(
        "created CA for zone {zone} in {} (expires {})",
        ca.zone_dir(zone).display(),
        rfc3339(z.info().not_after)
    );
    Ok(())
}

fn issue(
    dir: &Path,
    id: &SpiffeId,
    out: &Path,
    ttl: Duration,
    zone: Option<&str>,
    dns_names: &[String],
) -> Result<()> {
    let ca = CaDir::new(dir);
    let authority = match zone {
        Some(z) => ca.zone(z)?,
        None => ca.root()?,
    };
    let creds = authority
        .issue_with_dns_names(id, dns_names, IssueOptions::ttl(ttl))
        .with_context(|| format!("could not issue a certificate for {id}"))?;
    write_credentials(out, &creds, &ca.bundle()?)?;
    let (crt, key, bundle) = credential_paths(out);
    let info = creds.leaf_info()?;
    outln!("issued {id} (expires {})", rfc3339(info.not_after));
    outln!("  certificate chain: {}", crt.display());
    outln!("  private key:       {} (0600)", key.display());
    outln!("  trust bundle:      {}", bundle.display());
    Ok(())
}

/// A DNS name as a certificate may carry it: LDH labels, no wildcard.
fn parse_dns_name(s: &str) -> Result<String, String> {
    let name = s.trim_end_matches('.');
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(name.to_ascii_lowercase())
    } else {
        Err(format!(
            "{s:?} is not a DNS name (letters, digits and '-' in dot-separated labels)"
        ))
    }
}

fn inspect(file: &Path) -> Result<()> {
    let pem = std::fs::read(file).with_context(|| format!("could not read {}", file.display()))?;
    let certs = certs_from_pem(&pem, &file.display().to_string())?;
    let now = SystemTime::now();
    let total = certs.len();
    let mut warnings = Vec::new();
    for (i, der) in certs.iter().enumerate() {
        let info =
            CertInfo::parse(der).with_context(|| format!("certificate {} of {total}", i + 1))?;
        if i > 0 {
            outln!();
        }
        outln!("certificate {} of {total} in {}", i + 1, file.display());
        let identity = match (&info.spiffe_id, info.is_ca) {
            (Some(id), _) => id.to_string(),
            (None, true) => "none (CA certificate)".into(),
            (None, false) => match info.require_spiffe_id() {
                Ok(id) => id.to_string(),
                Err(reason) => format!("none: {reason}"),
            },
        };
        outln!("  identity:   {identity}");
        outln!("  subject:    {}", info.subject);
        outln!("  issuer:     {}", info.issuer);
        outln!("  serial:     {}", info.serial);
        let ca = match (info.is_ca, info.path_len) {
            (false, _) => "no".to_string(),
            (true, Some(n)) => format!("yes, path length {n}"),
            (true, None) => "yes".to_string(),
        };
        outln!("  CA:         {ca}");
        outln!("  not before: {}", rfc3339(info.not_before));
        outln!("  not after:  {}", rfc3339(info.not_after));
        let left = info.remaining(now);
        let subject = info
            .spiffe_id
            .as_ref()
            .map_or(info.subject.clone(), ToString::to_string);
        if now < info.not_before {
            outln!("  time left:  not valid yet");
            warnings.push(format!("{subject} is not valid yet"));
        } else if left.is_zero() {
            outln!("  time left:  expired");
            warnings.push(format!("{subject} has expired"));
        } else {
            outln!("  time left:  {}", human(left));
            if info.is_ca && left < CA_WARN_LEFT {
                warnings.push(format!(
                    "CA {subject} expires in {}: rotate it before it does",
                    human(left)
                ));
            }
        }
    }
    for w in warnings {
        eprintln!("warning: {w}");
    }
    Ok(())
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Days and hours, or minutes when under an hour: precise enough for expiry.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    let (days, hours, mins) = (s / 86_400, (s % 86_400) / 3600, (s % 3600) / 60);
    match (days, hours) {
        (0, 0) => format!("{mins}m"),
        (0, h) => format!("{h}h {mins}m"),
        (d, h) => format!("{d}d {h}h"),
    }
}
