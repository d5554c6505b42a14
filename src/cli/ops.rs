//! The operator verbs: `trellis zone …`, `policy …`, `cluster …`, `service …`.
//! Each finds a server with --server (TRELLIS_SERVER) and authenticates with
//! an operator certificate given as --credentials PREFIX (TRELLIS_CREDENTIALS).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use tonic::transport::Channel;
use trellis_federation::proto::{self, ReadOptions};
use trellis_federation::{client, join, token::JoinToken};

use crate::cli::{UsageError, parse_duration, translate};

#[derive(Debug, Args)]
pub(crate) struct Conn {
    #[command(flatten)]
    endpoint: Endpoint,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub(crate) output: Output,
}

/// The server and the operator's credentials: [`Conn`] without the output
/// format, for a verb whose output is not a table.
#[derive(Debug, Args)]
pub(crate) struct Endpoint {
    /// A server's gRPC address (host:port).
    #[arg(long, env = "TRELLIS_SERVER", default_value = "127.0.0.1:7400")]
    server: String,
    /// Credentials prefix (PREFIX.crt/.key/.bundle, from `trellis ca issue`).
    #[arg(long, env = "TRELLIS_CREDENTIALS")]
    credentials: Option<PathBuf>,
    /// Ask for a linearizable read (confirmed with a quorum) instead of the
    /// local replica's view.
    #[arg(long)]
    linearizable: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(crate) enum Output {
    /// Aligned columns.
    Table,
    /// JSON.
    Json,
}

/// How `policy get` prints a document.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(crate) enum DocFormat {
    /// YAML, as `policy apply -f` reads it.
    Yaml,
    /// JSON.
    Json,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ZoneCommand {
    /// Join tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Start a server that joins the cluster with TOKEN.
    ///
    /// Gets a certificate for spiffe://TD/zone/ZONE/server/NAME (the key is
    /// made here and stays in DIR), is added as a learner, promoted to voter
    /// in core zones, and then serves. Restart it later with
    /// `trellis server --credentials DIR/server --data-dir DIR ...`.
    Join {
        /// The token from `trellis zone token create`. Prefer --token-file:
        /// a command line is visible to every user of the host (ps).
        #[arg(required_unless_present = "token_file")]
        token: Option<String>,
        /// A file holding the token.
        #[arg(long, conflicts_with = "token")]
        token_file: Option<PathBuf>,
        /// This server's name in the zone.
        #[arg(long)]
        name: String,
        /// Data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// gRPC listen address.
        #[arg(long)]
        listen: SocketAddr,
        /// Address the cluster reaches this server on (default: --listen).
        #[arg(long)]
        advertise: Option<String>,
    },
    /// List zones.
    List(Conn),
}

#[derive(Debug, Subcommand)]
pub(crate) enum TokenCommand {
    /// Print a single-use join token for a zone: for a server (`trellis
    /// zone join`), or with --agent for a host agent (its `join_token_file`).
    Create {
        /// Zone the token admits a server or agent to.
        #[arg(long)]
        zone: String,
        /// The zone is an edge zone: its servers stay learners.
        #[arg(long)]
        edge: bool,
        /// A token for a host agent rather than a server.
        #[arg(long)]
        agent: bool,
        /// With --agent: a workload identity the agent may claim,
        /// NAMESPACE/ACCOUNT or NAMESPACE/* (repeat for several).
        #[arg(long = "workload", requires = "agent")]
        workloads: Vec<String>,
        /// How long the token stays valid (at most a week).
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
        /// Bind the token to this server or host name: the joiner cannot
        /// take another.
        #[arg(long)]
        name: Option<String>,
        /// With --agent and --name: let the token take over that host name
        /// although a host already joined under it (a rebuilt host).
        #[arg(long, requires_all = ["agent", "name"])]
        replace: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// List join tokens (never their secrets): kind, zone, name, expiry,
    /// who created and who used each.
    List(Conn),
    /// Revoke an unused join token by the ID `token list` shows.
    Revoke {
        /// At least 8 hex digits of the token's ID.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `trellis audit`: who changed policy, tokens, zones and membership, when.
#[derive(Debug, Args)]
pub(crate) struct AuditArgs {
    /// How many of the latest entries to show.
    #[arg(long, default_value_t = 100)]
    limit: u64,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Debug, Subcommand)]
pub(crate) enum PolicyCommand {
    /// Apply YAML policy documents (kind, metadata.name, spec), all or none.
    ///
    /// Istio VirtualService and DestinationRule documents, and Gateway API
    /// HTTPRoute and GRPCRoute documents with Service parents, are
    /// translated into Route and Backend documents first; a field Trellis
    /// cannot honour refuses the file, naming the field.
    Apply {
        /// The YAML file; `-` reads standard input.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[command(flatten)]
        conn: Conn,
    },
    /// List policies.
    List(Conn),
    /// Print the stored policy KIND/NAME, as a document `apply -f` takes.
    Get {
        /// KIND/NAME, e.g. Route/catalog.
        policy: String,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = DocFormat::Yaml)]
        output: DocFormat,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Delete the policy KIND/NAME.
    Delete {
        /// KIND/NAME, e.g. Route/catalog.
        policy: String,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum ClusterCommand {
    /// Members, leader, term, commit and applied index.
    Status(Conn),
    /// Make a learner a voter once it has caught up (waits up to 30 s).
    Promote {
        /// The member's Raft id (from `cluster status`).
        id: u64,
        #[command(flatten)]
        conn: Conn,
    },
    /// Remove a member from the Raft group.
    Remove {
        /// The member's Raft id (from `cluster status`).
        id: u64,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum ServiceCommand {
    /// Registered endpoints, by service.
    List(Conn),
}

// === impl Conn ===

impl Conn {
    pub(crate) fn channel(&self, rt: &tokio::runtime::Runtime) -> Result<Channel> {
        self.endpoint.channel(rt)
    }

    fn read(&self) -> ReadOptions {
        self.endpoint.read()
    }
}

impl Endpoint {
    /// A channel made inside `rt` (tonic channels spawn their connection task).
    pub(crate) fn channel(&self, rt: &tokio::runtime::Runtime) -> Result<Channel> {
        let _guard = rt.enter();
        let prefix = self.credentials.as_ref().ok_or_else(|| {
            UsageError(
                "--credentials PREFIX (or TRELLIS_CREDENTIALS) is required: issue an operator certificate with `trellis ca issue --id spiffe://TD/operator/NAME --out PREFIX`".into(),
            )
        })?;
        Ok(client::connect(&self.server, prefix)?)
    }

    pub(crate) fn read(&self) -> ReadOptions {
        ReadOptions {
            linearizable: self.linearizable,
        }
    }

    /// The operator's credentials prefix, when one was given.
    pub(crate) fn credentials(&self) -> Option<&std::path::Path> {
        self.credentials.as_deref()
    }
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}

pub(crate) fn status(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", s.message(), s.code())
}

/// Unix milliseconds as RFC 3339 UTC, for tables.
fn unix_ms(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// `trellis audit`.
pub(crate) fn audit(args: AuditArgs) -> Result<()> {
    let rt = runtime()?;
    let ch = args.conn.channel(&rt)?;
    let r = rt
        .block_on(async {
            proto::audit_client::AuditClient::new(ch)
                .list(proto::AuditQuery { limit: args.limit })
                .await
        })
        .map_err(status)?
        .into_inner();
    if args.conn.output == Output::Json {
        let entries: Vec<_> = r
            .entries
            .iter()
            .map(|a| {
                serde_json::json!({
                    "seq": a.seq, "time_ms": a.time_ms, "by": a.by,
                    "action": a.action, "detail": a.detail,
                })
            })
            .collect();
        outln!("{}", serde_json::json!({ "entries": entries }));
        return Ok(());
    }
    let mut rows = vec![
        ["SEQ", "TIME", "BY", "ACTION", "DETAIL"]
            .map(String::from)
            .to_vec(),
    ];
    for a in r.entries {
        rows.push(vec![
            a.seq.to_string(),
            unix_ms(a.time_ms),
            a.by,
            a.action,
            a.detail,
        ]);
    }
    table(rows);
    Ok(())
}

pub(crate) fn table(rows: Vec<Vec<String>>) {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        outln!("{}", line.join("  ").trim_end());
    }
}

// === zone ===

impl ZoneCommand {
    pub(crate) fn run(self) -> Result<()> {
        match self {
            ZoneCommand::Token(TokenCommand::Create {
                zone,
                edge,
                agent,
                workloads,
                ttl,
                name,
                replace,
                conn,
            }) => {
                if agent && workloads.is_empty() {
                    return Err(UsageError(
                        "--agent needs at least one --workload NAMESPACE/ACCOUNT (the identities the agent may claim)".into(),
                    )
                    .into());
                }
                let rt = runtime()?;
                let ch = conn.channel(&rt)?;
                let r = rt.block_on(async move {
                    proto::zones_client::ZonesClient::new(ch)
                        .create_join_token(proto::TokenRequest {
                            zone,
                            edge,
                            ttl_seconds: ttl.as_secs().max(1),
                            agent,
                            workloads,
                            name: name.unwrap_or_default(),
                            replace,
                        })
                        .await
                        .map_err(status)
                })?;
                outln!("{}", r.into_inner().token);
                Ok(())
            }
            ZoneCommand::Token(TokenCommand::List(conn)) => {
                let rt = runtime()?;
                let ch = conn.channel(&rt)?;
                let r = rt
                    .block_on(async {
                        proto::zones_client::ZonesClient::new(ch)
                            .list_tokens(proto::Empty {})
                            .await
                    })
                    .map_err(status)?
                    .into_inner();
                if conn.output == Output::Json {
                    let tokens: Vec<_> = r
                        .tokens
                        .iter()
                        .map(|t| {
                            serde_json::json!({
                                "id": t.id, "kind": t.kind, "zone": t.zone, "name": t.name,
                                "workloads": t.workloads, "expires_ms": t.expires_ms,
                                "used_by": t.used_by, "created_by": t.created_by,
                                "created_ms": t.created_ms, "replace": t.replace,
                            })
                        })
                        .collect();
                    outln!("{}", serde_json::json!({ "tokens": tokens }));
                    return Ok(());
                }
                let mut rows = vec![
                    [
                        "ID",
                        "KIND",
                        "ZONE",
                        "NAME",
                        "WORKLOADS",
                        "EXPIRES",
                        "USED BY",
                        "CREATED BY",
                    ]
                    .map(String::from)
                    .to_vec(),
                ];
                for t in r.tokens {
                    rows.push(vec![
                        t.id,
                        t.kind,
                        t.zone,
                        t.name,
                        t.workloads.join(","),
                        unix_ms(t.expires_ms),
                        t.used_by,
                        t.created_by,
                    ]);
                }
                table(rows);
                Ok(())
            }
            ZoneCommand::Token(TokenCommand::Revoke { id, conn }) => {
                let rt = runtime()?;
                let ch = conn.channel(&rt)?;
                rt.block_on(async {
                    proto::zones_client::ZonesClient::new(ch)
                        .revoke_token(proto::TokenId { id: id.clone() })
                        .await
                })
                .map_err(status)?;
                outln!("revoked join token {id}");
                Ok(())
            }
            ZoneCommand::Join {
                token,
                token_file,
                name,
                data_dir,
                listen,
                advertise,
            } => {
                let token = match (token, token_file) {
                    (Some(t), _) => t,
                    (None, Some(f)) => std::fs::read_to_string(&f)
                        .with_context(|| format!("reading {}", f.display()))?,
                    (None, None) => unreachable!("clap requires one of them"),
                };
                let token = JoinToken::parse(&token).map_err(|e| UsageError(e.to_string()))?;
                let advertise = advertise.unwrap_or_else(|| listen.to_string());
                let joined = runtime()?
                    .block_on(join::join(&token, &name, &advertise))
                    .context("joining")?;
                std::fs::create_dir_all(&data_dir)
                    .with_context(|| format!("creating {}", data_dir.display()))?;
                let prefix = data_dir.join("server");
                trellis_ca::write_credentials(&prefix, &joined.credentials, &joined.bundle)?;
                eprintln!(
                    "joined zone {} as node {}; credentials in {}.*",
                    joined.zone,
                    joined.node_id,
                    prefix.display()
                );
                let text = format!(
                    "name = {name:?}\nzone = {zone:?}\ntrust_domain = {td:?}\n",
                    zone = joined.zone,
                    td = token.trust_domain
                );
                let mut cfg = trellis_federation::config::ServerConfig::from_toml(&text)
                    .map_err(|e| UsageError(e.to_string()))?;
                cfg.data_dir = data_dir;
                cfg.listen = listen;
                cfg.advertise = Some(advertise);
                cfg.credentials = Some(prefix);
                cfg.join_members = joined.members;
                cfg.validate().map_err(|e| UsageError(e.to_string()))?;
                crate::cli::server::run(cfg)
            }
            ZoneCommand::List(conn) => {
                let rt = runtime()?;
                let ch = conn.channel(&rt)?;
                let r = rt
                    .block_on(async {
                        proto::zones_client::ZonesClient::new(ch)
                            .list(conn.read())
                            .await
                    })
                    .map_err(status)?
                    .into_inner();
                if conn.output == Output::Json {
                    let zones: Vec<_> = r
                        .zones
                        .iter()
                        .map(|z| serde_json::json!({"name": z.name, "role": z.role, "gateways": z.gateways}))
                        .collect();
                    outln!(
                        "{}",
                        serde_json::json!({"revision": r.revision, "zones": zones})
                    );
                    return Ok(());
                }
                let mut rows = vec![vec!["ZONE".into(), "ROLE".into(), "GATEWAYS".into()]];
                for z in r.zones {
                    rows.push(vec![z.name, z.role, z.gateways.join(",")]);
                }
                table(rows);
                eprintln!("revision {}", r.revision);
                Ok(())
            }
        }
    }
}

// === policy ===

/// Reads YAML documents into policy docs; refuses the whole file, naming the
/// document and the field, on the first bad one. Istio and Gateway API
/// documents are translated into native ones (see [`translate`]).
pub(crate) fn parse_policies(text: &str) -> Result<Vec<proto::PolicyDoc>> {
    use serde::Deserialize as _;
    let mut docs = Vec::new();
    // Which document made each key, and whether by translation: a
    // translated document must not overwrite another of the same apply
    // behind the user's back.
    let mut made_by: HashMap<(String, String), (usize, bool)> = HashMap::new();
    let mut claim = |kind: &str, name: &str, n: usize, translated: bool| {
        let key = (kind.to_owned(), name.to_owned());
        match made_by.insert(key, (n, translated)) {
            Some((m, earlier)) if translated || earlier => Err(UsageError(format!(
                "document {n}: {kind}/{name} is made by document {m} too; apply one document per policy"
            ))),
            _ => Ok(()),
        }
    };
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let n = i + 1;
        let v = serde_yaml::Value::deserialize(de)
            .map_err(|e| UsageError(format!("document {n}: not valid YAML: {e}")))?;
        if v.is_null() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::to_value(&v).map_err(|e| UsageError(format!("document {n}: {e}")))?;
        if translate::is_foreign(&v) {
            for d in translate::translate(n, &v)? {
                claim(d.kind, &d.name, n, true)?;
                docs.push(proto::PolicyDoc {
                    key: Some(proto::PolicyKey {
                        kind: d.kind.into(),
                        name: d.name,
                    }),
                    spec_json: d.spec.to_string(),
                });
            }
            continue;
        }
        let kind = v
            .get("kind")
            .and_then(|k| k.as_str())
            .ok_or_else(|| UsageError(format!("document {n}: kind: missing or not a string")))?;
        let name = v
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|m| m.as_str())
            .ok_or_else(|| {
                UsageError(format!(
                    "document {n}: metadata.name: missing or not a string"
                ))
            })?;
        let spec = v
            .get("spec")
            .ok_or_else(|| UsageError(format!("document {n}: spec: missing")))?;
        if let Some(extra) = v.as_object().and_then(|o| {
            o.keys()
                .find(|k| !["kind", "metadata", "spec", "apiVersion"].contains(&k.as_str()))
        }) {
            return Err(UsageError(format!("document {n}: {extra}: unknown field")).into());
        }
        claim(kind, name, n, false)?;
        docs.push(proto::PolicyDoc {
            key: Some(proto::PolicyKey {
                kind: kind.into(),
                name: name.into(),
            }),
            spec_json: spec.to_string(),
        });
    }
    if docs.is_empty() {
        return Err(UsageError("the file holds no documents".into()).into());
    }
    Ok(docs)
}

impl PolicyCommand {
    pub(crate) fn run(self) -> Result<()> {
        match self {
            PolicyCommand::Apply { file, conn } => {
                let text = if file.as_os_str() == "-" {
                    std::io::read_to_string(std::io::stdin()).context("reading standard input")?
                } else {
                    std::fs::read_to_string(&file)
                        .with_context(|| format!("reading {}", file.display()))?
                };
                let docs = parse_policies(&text).with_context(|| format!("{}", file.display()))?;
                let n = docs.len();
                let rt = runtime()?;
                let ch = conn.channel(&rt)?;
                let r = rt
                    .block_on(async {
                        proto::policy_client::PolicyClient::new(ch)
                            .apply(proto::PolicyDocs { docs })
                            .await
                    })
                    .map_err(status)?;
                outln!(
                    "applied {n} document(s) at revision {}",
                    r.into_inner().revision
                );
                Ok(())
            }
            PolicyCommand::List(conn) => {
                let rt = runtime()?;
                let ch = conn.channel(&rt)?;
                let r = rt
                    .block_on(async {
                        proto::policy_client::PolicyClient::new(ch)
                            .list(conn.read())
                            .await
                    })
                    .map_err(status)?
                    .into_inner();
                if conn.output == Output::Json {
                    let docs: Vec<_> = r
                        .docs
                        .iter()
                        .map(|d| {
                            let k = d.key.clone().unwrap_or_default();
                            let spec: serde_json::Value =
                                serde_json::from_str(&d.spec_json).unwrap_or_default();
                            serde_json::json!({"kind": k.kind, "name": k.name, "spec": spec})
                        })
                        .collect();
                    outln!(
                        "{}",
                        serde_json::json!({"revision": r.revision, "policies": docs})
                    );
                    return Ok(());
                }
                let mut rows = vec![vec!["KIND".into(), "NAME".into()]];
                for d in r.docs {
                    let k = d.key.unwrap_or_default();
                    rows.push(vec![k.kind, k.name]);
                }
                table(rows);
                eprintln!("revision {}", r.revision);
                Ok(())
            }
            PolicyCommand::Get {
                policy,
                output,
                endpoint,
            } => {
                let (kind, name) = policy_key(&policy)?;
                // A kind the store does not take is a typo, not a policy
                // that is missing.
                kind.parse::<trellis_federation::policy::Kind>()
                    .map_err(|e| UsageError(format!("{policy}: {e}")))?;
                let rt = runtime()?;
                let ch = endpoint.channel(&rt)?;
                let r = rt
                    .block_on(async {
                        proto::policy_client::PolicyClient::new(ch)
                            .list(endpoint.read())
                            .await
                    })
                    .map_err(status)?
                    .into_inner();
                let doc = r
                    .docs
                    .into_iter()
                    .find(|d| d.key.as_ref().is_some_and(|k| k.kind == kind && k.name == name))
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "{policy}: no such policy at revision {} (`trellis policy list` shows them)",
                            r.revision
                        )
                    })?;
                let spec: serde_json::Value = serde_json::from_str(&doc.spec_json)
                    .with_context(|| format!("{policy}: the stored spec is not JSON"))?;
                let doc = serde_json::json!({
                    "kind": kind,
                    "metadata": { "name": name },
                    "spec": spec,
                });
                match output {
                    DocFormat::Yaml => {
                        let text = serde_yaml::to_string(&doc).context("writing YAML")?;
                        outln!("{}", text.trim_end());
                    }
                    DocFormat::Json => {
                        outln!("{}", serde_json::to_string_pretty(&doc)?);
                    }
                }
                Ok(())
            }
            PolicyCommand::Delete { policy, conn } => {
                let (kind, name) = policy_key(&policy)?;
                let rt = runtime()?;
                let ch = conn.channel(&rt)?;
                let r = rt
                    .block_on(async {
                        proto::policy_client::PolicyClient::new(ch)
                            .delete(proto::PolicyKey {
                                kind: kind.into(),
                                name: name.into(),
                            })
                            .await
                    })
                    .map_err(status)?;
                outln!("deleted {policy} at revision {}", r.into_inner().revision);
                Ok(())
            }
        }
    }
}

/// `KIND/NAME`, split.
fn policy_key(policy: &str) -> Result<(&str, &str)> {
    let Some((kind, name)) = policy.split_once('/') else {
        bail!(UsageError(format!("{policy}: write it as KIND/NAME")));
    };
    Ok((kind, name))
}

// === status ===

/// `trellis status`: the cluster in one line, then each proxy's drift.
pub(crate) fn mesh_status(conn: Conn) -> Result<()> {
    let rt = runtime()?;
    let ch = conn.channel(&rt)?;
    let read = conn.read();
    let (cluster, proxies) = rt
        .block_on(async {
            let c = proto::cluster_client::ClusterClient::new(ch.clone())
                .status(proto::Empty {})
                .await?
                .into_inner();
            let p = proto::watch_client::WatchClient::new(ch)
                .proxies(read)
                .await?
                .into_inner();
            Ok::<_, tonic::Status>((c, p))
        })
        .map_err(status)?;
    let drift = |p: &proto::ProxyStatus| proxies.revision.saturating_sub(p.revision);
    if conn.output == Output::Json {
        let list: Vec<_> = proxies
            .proxies
            .iter()
            .map(|p| serde_json::json!({"proxy": p.proxy, "revision": p.revision, "behind": drift(p), "rejected": p.rejected}))
            .collect();
        outln!(
            "{}",
            serde_json::json!({"revision": proxies.revision, "leader": cluster.leader, "members": cluster.members.len(), "proxies": list})
        );
        return Ok(());
    }
    let voters = cluster.members.iter().filter(|m| m.role == "voter").count();
    outln!(
        "store revision {}  leader {}  {} members ({} voters)  {} proxies",
        proxies.revision,
        cluster.leader,
        cluster.members.len(),
        voters,
        proxies.proxies.len()
    );
    let mut rows = vec![vec![
        "PROXY".into(),
        "APPLIED".into(),
        "BEHIND".into(),
        "STATE".into(),
    ]];
    for p in &proxies.proxies {
        let state = if !p.rejected.is_empty() {
            format!("rejected: {}", p.rejected)
        } else if drift(p) == 0 {
            "in sync".into()
        } else {
            "behind".into()
        };
        rows.push(vec![
            p.proxy.clone(),
            p.revision.to_string(),
            drift(p).to_string(),
            state,
        ]);
    }
    table(rows);
    Ok(())
}

// === cluster, service ===

impl ClusterCommand {
    pub(crate) fn run(self) -> Result<()> {
        let conn = match self {
            ClusterCommand::Status(conn) => conn,
            ClusterCommand::Promote { id, conn } => {
                let rt = runtime()?;
                let ch = conn.channel(&rt)?;
                let r = rt
                    .block_on(async {
                        proto::cluster_client::ClusterClient::new(ch)
                            .promote(proto::MemberId { id })
                            .await
                    })
                    .map_err(status)?;
                outln!(
                    "promoted {id} to voter at revision {}",
                    r.into_inner().revision
                );
                return Ok(());
            }
            ClusterCommand::Remove { id, conn } => {
                let rt = runtime()?;
                let ch = conn.channel(&rt)?;
                let r = rt
                    .block_on(async {
                        proto::cluster_client::ClusterClient::new(ch)
                            .remove(proto::MemberId { id })
                            .await
                    })
                    .map_err(status)?;
                outln!("removed {id} at revision {}", r.into_inner().revision);
                return Ok(());
            }
        };
        let rt = runtime()?;
        let ch = conn.channel(&rt)?;
        let s = rt
            .block_on(async {
                proto::cluster_client::ClusterClient::new(ch)
                    .status(proto::Empty {})
                    .await
            })
            .map_err(status)?
            .into_inner();
        if conn.output == Output::Json {
            let members: Vec<_> = s
                .members
                .iter()
                .map(|m| serde_json::json!({"id": m.id, "name": m.name, "address": m.address, "role": m.role, "leader": m.id == s.leader}))
                .collect();
            outln!(
                "{}",
                serde_json::json!({"id": s.id, "leader": s.leader, "term": s.term, "commit": s.commit, "applied": s.applied, "revision": s.revision, "members": members,
                    "watch_streams": s.watch_streams, "watch_streams_scoped": s.watch_streams_scoped, "watch_snapshots": s.watch_snapshots, "tracked_proxies": s.tracked_proxies})
            );
            return Ok(());
        }
        outln!(
            "answered by {}  leader {}  term {}  commit {}  applied {}  revision {}",
            s.id,
            s.leader,
            s.term,
            s.commit,
            s.applied,
            s.revision
        );
        outln!(
            "its watch streams: {} of the whole mesh, {} scoped; {} snapshots served since start; acknowledgements of {} proxies",
            s.watch_streams,
            s.watch_streams_scoped,
            s.watch_snapshots,
            s.tracked_proxies
        );
        let mut rows = vec![vec![
            "ID".into(),
            "NAME".into(),
            "ADDRESS".into(),
            "ROLE".into(),
        ]];
        for m in s.members {
            let role = if m.id == s.leader {
                format!("{} (leader)", m.role)
            } else {
                m.role
            };
            rows.push(vec![m.id.to_string(), m.name, m.address, role]);
        }
        table(rows);
        Ok(())
    }
}

impl ServiceCommand {
    pub(crate) fn run(self) -> Result<()> {
        let ServiceCommand::List(conn) = self;
        let rt = runtime()?;
        let ch = conn.channel(&rt)?;
        let r = rt
            .block_on(async {
                proto::registry_client::RegistryClient::new(ch)
                    .list(conn.read())
                    .await
            })
            .map_err(status)?
            .into_inner();
        if conn.output == Output::Json {
            let eps: Vec<_> = r
                .endpoints
                .iter()
                .map(|e| {
                    let k = e.key.clone().unwrap_or_default();
                    serde_json::json!({"namespace": k.namespace, "service": k.service, "zone": k.zone, "id": k.id, "address": e.address, "ports": e.ports, "protocol": e.protocol, "healthy": e.healthy, "lease_expires_ms": e.lease_expires_ms})
                })
                .collect();
            outln!(
                "{}",
                serde_json::json!({"revision": r.revision, "endpoints": eps})
            );
            return Ok(());
        }
        let mut rows = vec![vec![
            "SERVICE".into(),
            "ZONE".into(),
            "ENDPOINT".into(),
            "ADDRESS".into(),
            "PORTS".into(),
            "HEALTHY".into(),
        ]];
        for e in r.endpoints {
            let k = e.key.unwrap_or_default();
            let ports: Vec<String> = e.ports.iter().map(u32::to_string).collect();
            rows.push(vec![
                format!("{}.{}", k.service, k.namespace),
                k.zone,
                k.id,
                e.address,
                ports.join(","),
                e.healthy.to_string(),
            ]);
        }
        table(rows);
        eprintln!("revision {}", r.revision);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_files_are_refused_whole_with_document_and_field() {
        let ok = "kind: Route\nmetadata: {name: a}\nspec: {x: 1}\n---\nkind: Export\nmetadata: {name: b}\nspec: {}\n";
        assert_eq!(parse_policies(ok).unwrap().len(), 2);
        let bad = format!("{ok}---\nkind: Route\nspec: {{}}\n");
        let e = parse_policies(&bad).unwrap_err().to_string();
        assert!(
            e.contains("document 3") && e.contains("metadata.name"),
            "{e}"
        );
        let e = parse_policies("kind: Route\nmetadata: {name: a}\nspec: {}\nspecs: 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("specs: unknown field"), "{e}");
    }
}
