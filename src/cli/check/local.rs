//! What `trellis check` reads on this host alone: the credential files and
//! the systemd-resolved drop-in.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde_json::json;
use trellis_ca::tls::TrustStore;
use trellis_ca::{CertInfo, TrustBundle};

use super::{Check, Ctx, Status, human};

/// Below this share of its lifetime left, a certificate is a warning: the
/// agent renews at half-life, so one this close to its end was not renewed.
const LOW_LIFETIME: f64 = 0.2;

/// One credentials prefix as read from disk.
pub(crate) struct Identity {
    pub(crate) prefix: PathBuf,
    /// The role it plays here: `node` or `service NAME.NS`.
    pub(crate) role: String,
    /// Loaded, or why not (missing file, bad PEM, key not matching).
    pub(crate) loaded: Result<(trellis_ca::Credentials, TrustBundle, CertInfo), String>,
    /// The key file's mode, if it could be read.
    key_mode: Option<u32>,
}

/// Every identity of the host: its node identity first, then one per
/// local service.
pub(crate) struct Credentials {
    pub(crate) ids: Vec<Identity>,
    now: SystemTime,
}

impl Credentials {
    pub(crate) fn read(ctx: &Ctx) -> Self {
        let mut ids = Vec::new();
        if ctx.cfg.uses_store() || ctx.cfg.edge.is_some() || ctx.node != ctx.cfg.node_credentials()
        {
            ids.push(Identity::read(&ctx.node, "node".into()));
        }
        for s in &ctx.cfg.services {
            ids.push(Identity::read(
                &ctx.cfg.credentials_of(s),
                format!("service {}.{}", s.name, s.namespace),
            ));
        }
        Self {
            ids,
            now: SystemTime::now(),
        }
    }

    /// The node identity, when it loaded (the one that calls the servers).
    pub(crate) fn node(&self) -> Option<&Identity> {
        self.ids
            .first()
            .filter(|i| i.role == "node" && i.loaded.is_ok())
    }

    /// Whether the node certificate has expired by this host's clock.
    pub(crate) fn node_expired(&self) -> bool {
        self.node()
            .and_then(|i| i.loaded.as_ref().ok())
            .is_some_and(|(_, _, info)| info.not_after <= self.now)
    }

    /// Whether the node certificate fails to chain to `bundle` (the
    /// servers' bundle): then no server will accept it.
    pub(crate) fn node_untrusted_by(&self, bundle: Option<&TrustBundle>) -> bool {
        match (self.node().and_then(|i| i.loaded.as_ref().ok()), bundle) {
            (Some((creds, _, _)), Some(b)) => TrustStore::new(b.clone())
                .verify_client_chain(&creds.chain)
                .is_err(),
            _ => false,
        }
    }

    /// The `credentials` check; `served` is the bundle the servers serve
    /// now, when one could be fetched (`unverified`: without authenticating
    /// the server, so only worth a finding, never trust).
    pub(crate) fn check(&self, served: Option<&TrustBundle>, unverified: bool) -> Check {
        if self.ids.is_empty() {
            return Check::new(
                "credentials",
                Status::Fail,
                "the configuration names no identity: no local service and no servers",
                json!([]),
            );
        }
        let mut worst = (Status::Ok, String::new());
        let mut details = Vec::new();
        for id in &self.ids {
            let (status, finding, d) = id.assess(self.now, served, unverified);
            if status > worst.0 {
                worst = (status, finding.clone());
            }
            details.push(d);
        }
        if worst.0 == Status::Ok {
            let spiffe: Vec<String> = details
                .iter()
                .filter_map(|d| d["spiffe_id"].as_str().map(str::to_owned))
                .collect();
            let left = details
                .iter()
                .filter_map(|d| d["remaining_s"].as_u64())
                .min()
                .unwrap_or_default();
            worst.1 = format!(
                "{} valid, chained to the {} bundle; {} left at least ({})",
                spiffe.len(),
                if served.is_some() {
                    "on-disk and served"
                } else {
                    "on-disk"
                },
                human(Duration::from_secs(left)),
                spiffe.join(", ")
            );
        }
        Check::new("credentials", worst.0, worst.1, json!(details))
    }
}

impl Identity {
    fn read(prefix: &Path, role: String) -> Self {
        let (_, key, _) = trellis_ca::credential_paths(prefix);
        let key_mode = std::fs::metadata(&key)
            .ok()
            .map(|m| m.permissions().mode() & 0o777);
        let loaded = trellis_ca::load_credentials(prefix)
            .map_err(|e| e.to_string())
            .and_then(|(creds, bundle)| {
                let info = creds.leaf_info().map_err(|e| e.to_string())?;
                Ok((creds, bundle, info))
            });
        Self {
            prefix: prefix.to_owned(),
            role,
            loaded,
            key_mode,
        }
    }

    /// Status, finding and details of one identity.
    fn assess(
        &self,
        now: SystemTime,
        served: Option<&TrustBundle>,
        unverified: bool,
    ) -> (Status, String, serde_json::Value) {
        let (crt, key, bundle_path) = trellis_ca::credential_paths(&self.prefix);
        let mut d = json!({
            "role": self.role,
            "prefix": self.prefix.display().to_string(),
            "key_mode": self.key_mode.map(|m| format!("{m:04o}")),
        });
        let (creds, bundle, info) = match &self.loaded {
            Ok(x) => x,
            Err(e) => {
                let missing = [&crt, &key, &bundle_path].into_iter().find(|p| !p.exists());
                let finding = match missing {
                    Some(p) => format!(
                        "{} credentials {} are missing: has the agent joined? (`systemctl status trellis-agent`, or its join_token_file)",
                        self.role,
                        p.display()
                    ),
                    None => format!("{} credentials {}: {e}", self.role, self.prefix.display()),
                };
                d["error"] = json!(e);
                return (Status::Fail, finding, d);
            }
        };
        let id = info
            .spiffe_id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        let lifetime = info
            .not_after
            .duration_since(info.not_before)
            .unwrap_or_default();
        let remaining = info.remaining(now);
        d["spiffe_id"] = json!(id);
        d["not_before"] = json!(unix_s(info.not_before));
        d["not_after"] = json!(unix_s(info.not_after));
        d["lifetime_s"] = json!(lifetime.as_secs());
        d["remaining_s"] = json!(remaining.as_secs());
        if let Some(m) = self.key_mode
            && m & 0o077 != 0
        {
            return (
                Status::Fail,
                format!(
                    "key {} is mode {m:04o}: other users can read it; `chmod 600 {}`",
                    key.display(),
                    key.display()
                ),
                d,
            );
        }
        if let Ok(early) = info.not_before.duration_since(now)
            && !early.is_zero()
        {
            return (
                Status::Fail,
                format!(
                    "credentials {} ({id}) are not valid for another {}: is this host's clock behind? (see clock)",
                    crt.display(),
                    human(early)
                ),
                d,
            );
        }
        if remaining.is_zero() {
            let ago = now.duration_since(info.not_after).unwrap_or_default();
            return (
                Status::Fail,
                format!(
                    "credentials {} ({id}) expired {} ago: the agent has not renewed; is it running? `systemctl status trellis-agent` (or is this host's clock ahead? see clock)",
                    crt.display(),
                    human(ago)
                ),
                d,
            );
        }
        if let Err(e) = TrustStore::new(bundle.clone()).verify_client_chain(&creds.chain) {
            d["chain_error"] = json!(e.to_string());
            return (
                Status::Fail,
                format!(
                    "{} ({id}) does not chain to the bundle {}: {e}",
                    crt.display(),
                    bundle_path.display()
                ),
                d,
            );
        }
        if let Some(served) = served {
            d["chains_to_served_bundle"] = json!(true);
            d["served_bundle_unverified"] = json!(unverified);
            if let Err(e) = TrustStore::new(served.clone()).verify_client_chain(&creds.chain) {
                d["chains_to_served_bundle"] = json!(false);
                return (
                    Status::Fail,
                    format!(
                        "{} ({id}) does not chain to the bundle the servers serve now{} ({e}): the root was rotated and this host missed it, or it belongs to another mesh; rejoin the host with a new agent token (`trellis zone token create --agent --replace --name HOST`)",
                        crt.display(),
                        if unverified {
                            " (fetched unverified, as no server accepts this host)"
                        } else {
                            ""
                        },
                    ),
                    d,
                );
            }
        }
        let share = remaining.as_secs_f64() / lifetime.as_secs_f64().max(1.0);
        if share < LOW_LIFETIME {
            return (
                Status::Warn,
                format!(
                    "credentials {} ({id}) expire in {} ({:.0}% of their {} lifetime left): renewal is due at half-life; is the agent renewing? (`journalctl -u trellis-agent`)",
                    crt.display(),
                    human(remaining),
                    share * 100.0,
                    human(lifetime)
                ),
                d,
            );
        }
        (Status::Ok, String::new(), d)
    }
}

fn unix_s(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether systemd-resolved runs on this host: it keeps its state here.
fn resolved_runs() -> bool {
    Path::new("/run/systemd/resolve/stub-resolv.conf").exists()
}

/// The `resolved` check: the drop-in routes `~SUFFIX` to the agent's DNS,
/// and resolved (when it runs) agrees.
pub(crate) async fn resolved_check(ctx: &Ctx) -> Check {
    let suffix = ctx.cfg.dns_suffix.trim_end_matches('.');
    let path = &ctx.dropin;
    let runs = resolved_runs();
    let mut d = json!({
        "dropin": path.display().to_string(),
        "resolved_running": runs,
        "want_dns": ctx.dns.to_string(),
        "want_domain": format!("~{suffix}"),
    });
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if ctx.dropin_explicit || runs => {
            d["error"] = json!(e.to_string());
            return Check::new(
                "resolved",
                Status::Fail,
                format!(
                    "drop-in {} cannot be read ({e}): applications resolving through systemd-resolved get no *.{suffix} names; install systemd/trellis-mesh.conf there and `systemctl restart systemd-resolved`",
                    path.display()
                ),
                d,
            );
        }
        Err(_) => {
            return Check::new(
                "resolved",
                Status::Warn,
                format!(
                    "systemd-resolved does not run here and {} is absent: applications must query the agent's DNS {} themselves (as in a pod or `trellis dev`)",
                    path.display(),
                    ctx.dns
                ),
                d,
            );
        }
    };
    let (dns, domains) = parse_dropin(&text);
    d["dns"] = json!(dns);
    d["domains"] = json!(domains);
    let want_dns = ctx.dns.to_string();
    let want_domain = format!("~{suffix}");
    if !domains.contains(&want_domain) {
        return Check::new(
            "resolved",
            Status::Fail,
            format!(
                "drop-in {} does not route {want_domain} (Domains={}): add `Domains={want_domain}` under [Resolve]",
                path.display(),
                domains.join(" ")
            ),
            d,
        );
    }
    if !dns.iter().any(|x| dns_matches(x, &want_dns)) {
        return Check::new(
            "resolved",
            Status::Fail,
            format!(
                "drop-in {} sends {want_domain} to {} but the agent's DNS is {want_dns}: set `DNS={want_dns}`",
                path.display(),
                dns.join(" ")
            ),
            d,
        );
    }
    if !runs {
        return Check::new(
            "resolved",
            Status::Warn,
            format!(
                "drop-in {} routes {want_domain} to {want_dns}, but systemd-resolved does not run here: it has no effect",
                path.display()
            ),
            d,
        );
    }
    match resolvectl_domains().await {
        Some(out) if out.contains(&want_domain) => Check::new(
            "resolved",
            Status::Ok,
            format!("systemd-resolved routes {want_domain} to the agent at {want_dns}"),
            d,
        ),
        Some(out) => {
            d["resolvectl_domain"] = json!(out);
            Check::new(
                "resolved",
                Status::Fail,
                format!(
                    "drop-in {} is right but systemd-resolved does not route {want_domain} yet: `systemctl restart systemd-resolved`",
                    path.display()
                ),
                d,
            )
        }
        None => Check::new(
            "resolved",
            Status::Ok,
            format!(
                "drop-in {} routes {want_domain} to {want_dns} (resolvectl not available to confirm)",
                path.display()
            ),
            d,
        ),
    }
}

/// `DNS=` and `Domains=` values of the `[Resolve]` section.
fn parse_dropin(text: &str) -> (Vec<String>, Vec<String>) {
    let (mut dns, mut domains) = (Vec::new(), Vec::new());
    let mut in_resolve = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            in_resolve = line == "[Resolve]";
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        if !in_resolve {
            continue;
        }
        let words = v.split_whitespace().map(str::to_owned);
        match k.trim() {
            "DNS" => dns.extend(words),
            "Domains" => domains.extend(words),
            _ => {}
        }
    }
    (dns, domains)
}

/// resolved writes `ADDR:PORT` and may add `%IFACE` or `#NAME`.
fn dns_matches(entry: &str, want: &str) -> bool {
    let bare = entry.split(['%', '#']).next().unwrap_or_default();
    bare == want
}

/// `resolvectl domain`, or `None` when it cannot be run.
async fn resolvectl_domains() -> Option<String> {
    let out = tokio::process::Command::new("resolvectl")
        .arg("domain")
        .output()
        .await
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_dropin_routes_mesh_to_the_default_agent_dns() {
        let text = include_str!("../../../systemd/trellis-mesh.conf");
        let (dns, domains) = parse_dropin(text);
        assert!(
            dns.iter().any(|d| dns_matches(d, "127.0.0.1:8600")),
            "{dns:?}"
        );
        assert_eq!(domains, ["~mesh"]);
    }

    #[test]
    fn keys_outside_resolve_do_not_count() {
        let (dns, domains) = parse_dropin("[Other]\nDNS=1.2.3.4\nDomains=~mesh\n");
        assert!(dns.is_empty() && domains.is_empty());
    }
}
