//! `trellis agent setup` and `trellis gateway setup`: a VM host set up in
//! one command after the package is installed.
//!
//! Setup writes the role's configuration (and, for an agent, its join token
//! and the systemd-resolved drop-in; for a gateway, its credentials) where
//! the packaged units read them, validates it with the same code the role
//! uses to start, and enables and starts the unit. It is idempotent: each
//! file is written only when it would change, a running unit restarts only
//! when what it reads changed, and the output says what was done.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use crate::cli::{UsageError, parse_duration};

mod apply;
use apply::{Ids, Outcome, Owner, Policy, Start, Want, WantDir};

/// The systemd-resolved drop-in the packages ship (inactive) under
/// /usr/share/trellis; setup turns it on by writing it here.
const RESOLVED_DROPIN: &str = include_str!("../../systemd/trellis-mesh.conf");

/// Flags both setups share.
#[derive(Debug, Args)]
pub(crate) struct Common {
    /// The zone this host is in.
    #[arg(long)]
    zone: String,
    /// This host's name in the zone, part of its identity. Default: the
    /// host name.
    #[arg(long)]
    name: Option<String>,
    /// A federation server (HOST:PORT), nearest first; repeat the flag for
    /// each.
    #[arg(long = "server", value_name = "HOST:PORT", required = true)]
    servers: Vec<String>,
    /// The mesh's trust domain. Default: trellis.local.
    #[arg(long)]
    trust_domain: Option<String>,
    /// Put every file under DIR instead of / (configuration, secrets, data
    /// directory, drop-in), with paths inside the written configuration
    /// under DIR too, and leave systemd alone: for tests and images.
    #[arg(long, value_name = "DIR", default_value = "/")]
    root: PathBuf,
    /// Write the files but do not enable, start or restart anything.
    #[arg(long)]
    no_start: bool,
}

#[derive(Debug, Args)]
pub(crate) struct AgentSetupArgs {
    #[command(flatten)]
    common: Common,
    /// The join token file (`trellis zone token create --agent …`); it is
    /// copied to /etc/trellis/agent.token (0640, group trellis). Needed
    /// until the agent has joined; later runs may leave it out.
    #[arg(long, value_name = "FILE")]
    join_token_file: Option<PathBuf>,
    /// A local service: NAME[.NAMESPACE]:PORT[,PORT…] (namespace default
    /// `default`); repeat the flag for each.
    #[arg(long = "service", value_name = "SPEC", required = true)]
    services: Vec<ServiceSpec>,
    /// The health check of the --service in the same position: `tcp`,
    /// `http` or `http:/PATH`. A service without one has no check.
    #[arg(long = "health", value_name = "CHECK")]
    health: Vec<HealthSpec>,
    /// Time between health checks.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    health_interval: Duration,
    /// How callers' sidecars treat the services' ports: detect, http,
    /// http2, grpc or tcp.
    #[arg(long)]
    protocol: Option<String>,
    /// The address other hosts reach this host on (its inbound port).
    /// Default: the agent's own choice (see configs/agent.toml).
    #[arg(long)]
    advertise: Option<IpAddr>,
    /// This zone's gateway for workloads (HOST:PORT). Default: the zone's
    /// gateways registered in the store.
    #[arg(long)]
    gateway: Option<SocketAddr>,
    /// Other zones, nearest first, for when this zone has no healthy
    /// endpoint (comma-separated).
    #[arg(long, value_delimiter = ',')]
    zone_priority: Vec<String>,
    /// Lifetime of the certificates the agent asks for (renewed at
    /// half-life). Default: 24h.
    #[arg(long, value_parser = parse_duration_text)]
    certificate_ttl: Option<String>,
    /// Do not turn on the systemd-resolved drop-in (`~mesh` to the agent).
    #[arg(long)]
    no_resolved: bool,
}

#[derive(Debug, Args)]
pub(crate) struct GatewaySetupArgs {
    #[command(flatten)]
    common: Common,
    /// The gateway's credentials as `trellis ca issue --out PREFIX` wrote
    /// them (PREFIX.crt, PREFIX.key, PREFIX.bundle). Copied under
    /// /var/lib/trellis/gateway the first time only: the gateway renews
    /// them in place.
    #[arg(long, value_name = "PREFIX")]
    credentials: PathBuf,
    /// Where peers reach this gateway (HOST:PORT, UDP and TCP).
    #[arg(long)]
    advertise: SocketAddr,
    /// Where it listens for peers (UDP: QUIC; TCP: the fallback).
    #[arg(long, default_value = "0.0.0.0:15443")]
    listen: SocketAddr,
    /// A TCP port for this zone's workloads only. Default: none (they use
    /// --listen).
    #[arg(long)]
    zone_listen: Option<SocketAddr>,
    /// Zones without a gateway whose agents dial in here (comma-separated).
    #[arg(long, value_delimiter = ',')]
    edge_zones: Vec<String>,
}

/// `NAME[.NAMESPACE]:PORT[,PORT…]`.
#[derive(Debug, Clone)]
pub(crate) struct ServiceSpec {
    name: String,
    namespace: String,
    ports: Vec<u16>,
}

/// `tcp`, `http` or `http:/PATH`.
#[derive(Debug, Clone)]
pub(crate) enum HealthSpec {
    Tcp,
    Http(String),
}

// === impl AgentSetupArgs ===

impl AgentSetupArgs {
    pub(crate) fn run(self) -> Result<()> {
        let c = &self.common;
        let root = Root::new(&c.root)?;
        if self.health.len() > self.services.len() {
            return Err(UsageError(format!(
                "--health: {} checks for {} services; give one per --service, in the same order",
                self.health.len(),
                self.services.len()
            ))
            .into());
        }
        let ids = Ids::of(&root.0);
        let token_dst = root.path("/etc/trellis/agent.token");
        let token = match &self.join_token_file {
            Some(f) => Some(read_token(f, &c.zone)?),
            None => None,
        };
        let config_path = root.path("/etc/trellis/agent.toml");
        // The token line stays once the agent has one, so a rerun without
        // --join-token-file does not change the file.
        let has_token = token.is_some() || token_dst.exists();
        let text = self.config(&root, has_token.then_some(&token_dst))?;
        trellis_agent::AgentConfig::from_toml(&text).map_err(|e| {
            UsageError(format!(
                "the agent configuration setup would write is refused: {e}"
            ))
        })?;

        let mut wants = vec![Want {
            path: config_path.clone(),
            content: text.into_bytes(),
            mode: 0o640,
            owner: Owner::RootGroup,
            policy: Policy::Replace,
        }];
        if let Some(t) = token {
            wants.push(Want {
                path: token_dst,
                content: t.into_bytes(),
                mode: 0o640,
                owner: Owner::RootGroup,
                policy: Policy::Replace,
            });
        }
        let dropin = Want {
            path: root.path("/etc/systemd/resolved.conf.d/trellis-mesh.conf"),
            content: RESOLVED_DROPIN.as_bytes().to_vec(),
            mode: 0o644,
            owner: Owner::Root,
            policy: Policy::Replace,
        };
        let state = WantDir {
            path: root.path("/var/lib/trellis"),
            mode: 0o700,
            owner: Owner::Service,
        };
        let mut report = Report::new(&root, &ids)?;
        report.dir(&state)?;
        for w in &wants {
            report.file(w)?;
        }
        let unit_changed = report.changes > 0;
        let resolved_changed = if self.no_resolved {
            false
        } else {
            report.file(&dropin)?.changed()
        };
        report.finish(
            Start {
                unit: "trellis-agent.service",
                changed: unit_changed,
                resolved_changed,
                exec: format!("trellis agent --config {}", config_path.display()),
            },
            apply::systemd_here(&root.0, c.no_start),
        )
    }

    /// The configuration file's text. Deterministic: the same flags give
    /// the same bytes, which is what makes a rerun change nothing.
    fn config(&self, root: &Root, token: Option<&PathBuf>) -> Result<String> {
        let c = &self.common;
        let mut t = String::new();
        header(&mut t, "agent");
        common_keys(&mut t, c)?;
        kv(
            &mut t,
            "data_dir",
            &q(&root.path("/var/lib/trellis/agent").display()),
        );
        if let Some(p) = token {
            kv(&mut t, "join_token_file", &q(&p.display()));
        }
        if let Some(a) = self.advertise {
            kv(&mut t, "advertise", &q(&a));
        }
        if let Some(g) = self.gateway {
            kv(&mut t, "gateway", &q(&g));
        }
        if !self.zone_priority.is_empty() {
            kv(&mut t, "zone_priority", &list(&self.zone_priority));
        }
        if let Some(ttl) = &self.certificate_ttl {
            kv(&mut t, "certificate_ttl", &q(ttl));
        }
        for (i, s) in self.services.iter().enumerate() {
            t.push_str("\n[[services]]\n");
            kv(&mut t, "name", &q(&s.name));
            kv(&mut t, "namespace", &q(&s.namespace));
            let ports: Vec<String> = s.ports.iter().map(u16::to_string).collect();
            kv(&mut t, "ports", &format!("[{}]", ports.join(", ")));
            if let Some(p) = &self.protocol {
                kv(&mut t, "protocol", &q(p));
            }
            if let Some(h) = self.health.get(i) {
                t.push_str("[services.health]\n");
                match h {
                    HealthSpec::Tcp => kv(&mut t, "kind", &q(&"tcp")),
                    HealthSpec::Http(path) => {
                        kv(&mut t, "kind", &q(&"http"));
                        kv(&mut t, "path", &q(path));
                    }
                }
                let every = self.health_interval;
                kv(&mut t, "interval", &q(&humantime::format_duration(every)));
                // The agent's default timeout (2s) must fit in the interval.
                let timeout = every.min(Duration::from_secs(2));
                kv(&mut t, "timeout", &q(&humantime::format_duration(timeout)));
            }
        }
        Ok(t)
    }
}

// === impl GatewaySetupArgs ===

impl GatewaySetupArgs {
    pub(crate) fn run(self) -> Result<()> {
        let c = &self.common;
        let root = Root::new(&c.root)?;
        let ids = Ids::of(&root.0);
        let name = host_name(c)?;
        let prefix = root.path(&format!("/var/lib/trellis/gateway/{name}"));
        let config_path = root.path("/etc/trellis/gateway.toml");
        let text = self.config(&prefix)?;
        trellis_gateway::config::GatewayConfig::from_toml(&text).map_err(|e| {
            UsageError(format!(
                "the gateway configuration setup would write is refused: {e}"
            ))
        })?;
        let (src_crt, src_key, src_bundle) = trellis_ca::credential_paths(&self.credentials);
        let (crt, key, bundle) = trellis_ca::credential_paths(&prefix);
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| {
                UsageError(format!(
                    "--credentials: cannot read {}: {e} (make them with `trellis ca issue --out PREFIX`)",
                    p.display()
                ))
            })
        };
        let creds = [
            (crt, read(&src_crt)?, 0o644),
            (key, read(&src_key)?, 0o600),
            (bundle, read(&src_bundle)?, 0o644),
        ];
        let mut report = Report::new(&root, &ids)?;
        for dir in ["/var/lib/trellis", "/var/lib/trellis/gateway"] {
            report.dir(&WantDir {
                path: root.path(dir),
                mode: 0o700,
                owner: Owner::Service,
            })?;
        }
        report.file(&Want {
            path: config_path.clone(),
            content: text.into_bytes(),
            mode: 0o640,
            owner: Owner::RootGroup,
            policy: Policy::Replace,
        })?;
        for (path, content, mode) in creds {
            report.file(&Want {
                path,
                content,
                mode,
                owner: Owner::Service,
                policy: Policy::Keep,
            })?;
        }
        let changed = report.changes > 0;
        report.finish(
            Start {
                unit: "trellis-gateway.service",
                changed,
                resolved_changed: false,
                exec: format!("trellis gateway --config {}", config_path.display()),
            },
            apply::systemd_here(&root.0, c.no_start),
        )
    }

    fn config(&self, prefix: &Path) -> Result<String> {
        let mut t = String::new();
        header(&mut t, "gateway");
        common_keys(&mut t, &self.common)?;
        kv(&mut t, "listen", &q(&self.listen));
        if let Some(z) = self.zone_listen {
            kv(&mut t, "zone_listen", &q(&z));
        }
        kv(&mut t, "advertise", &q(&self.advertise));
        kv(&mut t, "credentials", &q(&prefix.display()));
        if !self.edge_zones.is_empty() {
            kv(&mut t, "edge_zones", &list(&self.edge_zones));
        }
        Ok(t)
    }
}

// === impl ServiceSpec ===

impl FromStr for ServiceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (id, ports) = s
            .rsplit_once(':')
            .ok_or("write NAME[.NAMESPACE]:PORT[,PORT…], e.g. catalog.shop:8080")?;
        let (name, namespace) = id.split_once('.').unwrap_or((id, "default"));
        if name.is_empty() || namespace.is_empty() {
            return Err(format!(
                "{id:?}: the service name and namespace may not be empty"
            ));
        }
        let ports = ports
            .split(',')
            .map(|p| {
                p.parse::<u16>()
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(|| format!("port {p:?}: write a number from 1 to 65535"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            name: name.into(),
            namespace: namespace.into(),
            ports,
        })
    }
}

// === impl HealthSpec ===

impl FromStr for HealthSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            None if s == "tcp" => Ok(Self::Tcp),
            None if s == "http" => Ok(Self::Http("/".into())),
            Some(("http", path)) if path.starts_with('/') => Ok(Self::Http(path.into())),
            Some(("http", path)) => Err(format!("http:{path}: the path starts with /")),
            _ => Err(format!("{s:?}: write tcp, http or http:/PATH")),
        }
    }
}

/// The target root: `/`, or a directory standing in for it.
struct Root(PathBuf);

impl Root {
    fn new(dir: &Path) -> Result<Self> {
        if !dir.is_absolute() {
            return Err(
                UsageError(format!("--root {}: give an absolute path", dir.display())).into(),
            );
        }
        Ok(Self(dir.to_path_buf()))
    }

    /// An absolute path on the target system, as seen from here.
    fn path(&self, abs: &str) -> PathBuf {
        self.0.join(abs.trim_start_matches('/'))
    }
}

/// Prints one line per file and counts the changes.
struct Report<'a> {
    ids: &'a Ids,
    changes: usize,
}

impl<'a> Report<'a> {
    /// Refuses a real root without the service account: the units run as
    /// it and the files are handed to it.
    fn new(root: &'a Root, ids: &'a Ids) -> Result<Self> {
        if !ids.known() {
            if root.0 == Path::new("/") {
                anyhow::bail!(
                    "the {0} user or group does not exist: install the trellis package, or create them with `adduser --system --group --home /var/lib/trellis {0}`",
                    apply::ACCOUNT
                );
            }
            outln!(
                "note: no {} account in {}: the files keep the owner this process gives them",
                apply::ACCOUNT,
                root.path("/etc/passwd").display()
            );
        }
        Ok(Self { ids, changes: 0 })
    }

    fn dir(&mut self, want: &WantDir) -> Result<Outcome> {
        let o = apply::ensure_dir(want, self.ids)?;
        self.say(o, &want.path);
        Ok(o)
    }

    fn file(&mut self, want: &Want) -> Result<Outcome> {
        let o = apply::ensure_file(want, self.ids)?;
        self.say(o, &want.path);
        if o == Outcome::Kept {
            outln!(
                "  (its content differs from the source and is left as it is: the service renews it)"
            );
        }
        Ok(o)
    }

    fn say(&mut self, o: Outcome, path: &Path) {
        if o.changed() {
            self.changes += 1;
        }
        outln!("{:<17} {}", o.word(), path.display());
    }

    fn finish(self, start: Start<'_>, systemd: Result<(), apply::NoSystemd>) -> Result<()> {
        if self.changes == 0 {
            outln!("nothing changed");
        } else {
            outln!("{} change(s)", self.changes);
        }
        for line in apply::start(&start, systemd)? {
            outln!("{line}");
        }
        Ok(())
    }
}

fn header(t: &mut String, role: &str) {
    let _ = writeln!(
        t,
        "# Written by `trellis {role} setup`; rerun it to change this file (what is\n\
         # edited here by hand is replaced). configs/{role}.toml in the sources\n\
         # shows every key."
    );
}

fn common_keys(t: &mut String, c: &Common) -> Result<()> {
    kv(t, "name", &q(&host_name(c)?));
    kv(t, "zone", &q(&c.zone));
    if let Some(td) = &c.trust_domain {
        kv(t, "trust_domain", &q(td));
    }
    kv(t, "servers", &list(&c.servers));
    Ok(())
}

fn host_name(c: &Common) -> Result<String> {
    if let Some(n) = &c.name {
        return Ok(n.clone());
    }
    let n = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("reading the host name (give --name)")?;
    // Names are DNS labels; a host name with a domain keeps its first label.
    Ok(n.trim().split('.').next().unwrap_or_default().to_owned())
}

/// Reads the operator's token file and checks it is a token for the zone
/// before it is copied anywhere.
fn read_token(path: &Path, zone: &str) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| UsageError(format!("--join-token-file {}: {e}", path.display())))?;
    let token = trellis_federation::token::JoinToken::parse(text.trim()).map_err(|e| {
        UsageError(format!(
            "--join-token-file {}: not a join token: {e}",
            path.display()
        ))
    })?;
    if token.zone != zone {
        return Err(UsageError(format!(
            "--join-token-file {}: the token is for zone {}, and --zone is {zone}",
            path.display(),
            token.zone
        ))
        .into());
    }
    Ok(format!("{}\n", text.trim()))
}

fn parse_duration_text(s: &str) -> Result<String, String> {
    parse_duration(s).map(|_| s.to_owned())
}

fn kv(t: &mut String, key: &str, value: &str) {
    let _ = writeln!(t, "{key} = {value}");
}

/// A TOML basic string (a JSON string is one).
fn q(v: &impl std::fmt::Display) -> String {
    serde_json::to_string(&v.to_string()).expect("a string always serialises")
}

fn list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(q).collect();
    format!("[{}]", quoted.join(", "))
}
