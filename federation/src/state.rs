//! The replicated state machine: zones, services and their endpoints,
//! policies, join tokens, proxies' acknowledged versions and the server
//! members, as keys under `s/` in the store's sled tree.
//!
//! Every change bumps the store revision by one and records an [`Event`]
//! under that revision, so a watcher can resume from any revision still
//! retained, on any server: the events are part of the replicated state.
//! Applying is deterministic: anything time-dependent (lease expiry, token
//! expiry) uses the `now_ms` the proposer put into the command.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::error::FedError;
use crate::scope::Scope;
use crate::storage::Db;

/// How many past events each server keeps for watchers to resume from.
pub const EVENT_RETENTION: u64 = 100_000;
const K_REVISION: &[u8] = b"s/_rev";
const P_ZONE: &str = "s/z/";
const P_ENDPOINT: &str = "s/e/";
const P_POLICY: &str = "s/p/";
const P_TOKEN: &str = "s/t/";
const P_PROXY: &str = "s/x/";
const P_MEMBER: &str = "s/m/";
const P_EVENT: &[u8] = b"s/v/";
const P_AUDIT: &str = "s/a/";
/// Who joined with which token: identity -> hash of the token's secret.
const P_JOINED: &str = "s/j/";
/// Raft ids an operator removed: they may not add themselves back.
const P_REMOVED: &str = "s/rm/";
const K_AUDIT_SEQ: &str = "s/_auditseq";

/// Namespace of the mesh's own registrations (zone gateways).
pub const SYSTEM_NAMESPACE: &str = "trellis-system";
/// The service zone gateways register under, in [`SYSTEM_NAMESPACE`]: its
/// endpoints are the zone's gateways (address and tunnel port).
pub const GATEWAY_SERVICE: &str = "gateway";
/// Endpoint label: the sidecar inbound port of the host.
pub const LABEL_INBOUND_PORT: &str = "trellis.inbound-port";
/// Gateway label: the address (`ip:port`) this zone's workloads connect to,
/// when the gateway gives them a port of their own (`zone_listen`); without
/// it they use the registered address and tunnel port.
pub const LABEL_ZONE_ADDRESS: &str = "trellis.zone-address";
/// Gateway label: the gateway's admin address (`ip:port`), where its
/// health and `/links` are served; `trellis check` reads the links there.
pub const LABEL_ADMIN_ADDRESS: &str = "trellis.admin-address";
/// Gateway endpoint label: the edge zones this gateway carries (comma
/// separated): their agents dial it, and it relays their streams to and
/// from other zones.
pub const LABEL_EDGE_ZONES: &str = "trellis.edge-zones";
/// Endpoint label: the service account of the workload's identity.
pub const LABEL_ACCOUNT: &str = "trellis.account";
/// Endpoint label: protocols of single ports, where they differ from the
/// endpoint's `protocol` (`5432=tcp,9090=grpc`).
pub const LABEL_PORT_PROTOCOLS: &str = "trellis.port-protocols";
/// `"true"` on an endpoint with no sidecar (a cluster Service a zone
/// controller exported): its far end speaks plain TCP, not mTLS.
pub const LABEL_PLAIN: &str = "trellis.plain";

/// The policy kinds the store accepts.
pub const POLICY_KINDS: &[&str] = crate::policy::KINDS;

/// One workload instance of a service in a zone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    /// Namespace of the service.
    pub namespace: String,
    /// Service name.
    pub service: String,
    /// Zone the endpoint runs in.
    pub zone: String,
    /// Unique within service and zone (host or pod name).
    pub id: String,
    /// IP address or host name.
    pub address: String,
    /// Ports served.
    pub ports: Vec<u32>,
    /// `tcp`, `http` or `grpc`.
    pub protocol: String,
    /// Free-form labels (subsets, versions).
    pub labels: BTreeMap<String, String>,
    /// Last reported health.
    pub healthy: bool,
    /// Seconds the endpoint lives without renewal; 0 means forever.
    pub lease_seconds: u64,
    /// Unix ms at which the lease runs out (0: no lease).
    pub lease_expires_ms: u64,
    /// The identity that registered it (set by the store, never taken from
    /// the request): only it or an operator may renew, change or remove it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub owner: String,
}

/// A policy document as stored: `kind`, `metadata.name` and the `spec` as
/// JSON. [`crate::policy::parse`] gives it its type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyRecord {
    /// One of [`POLICY_KINDS`].
    pub kind: String,
    /// `metadata.name`.
    pub name: String,
    /// The document's `spec`, a JSON object.
    pub spec: serde_json::Value,
}

/// Whether a zone holds voters or only learners.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ZoneRole {
    /// Servers are voters.
    Core,
    /// Servers stay learners.
    Edge,
}

/// A zone of the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZoneRecord {
    /// Zone name.
    pub name: String,
    /// Core or edge.
    pub role: ZoneRole,
    /// Gateway addresses (host:port).
    pub gateways: Vec<String>,
}

/// A join token as stored: only the SHA-256 of its secret is kept.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Zone the token admits a server to.
    pub zone: String,
    /// Whether that zone is an edge zone.
    pub edge: bool,
    /// Unix ms after which the token is refused.
    pub expires_ms: u64,
    /// Set once the token was used; a token works once.
    pub used_by: Option<String>,
    /// Admits a host agent (JoinAgent) rather than a server (Join).
    #[serde(default)]
    pub agent: bool,
    /// For agent tokens: the workload identities the agent may claim,
    /// `NAMESPACE/ACCOUNT` or `NAMESPACE/*`.
    #[serde(default)]
    pub workloads: Vec<String>,
    /// The server or host name the token is bound to, when the operator
    /// gave one: the joiner cannot choose another.
    #[serde(default)]
    pub name: Option<String>,
    /// The operator allowed this token to take over a name that is already
    /// in use (a server or host rebuilt under the same name).
    #[serde(default)]
    pub replace: bool,
    /// Who created the token (SPIFFE ID) and when (Unix ms).
    #[serde(default)]
    pub created_by: String,
    /// Unix ms of creation.
    #[serde(default)]
    pub created_ms: u64,
}

impl TokenRecord {
    /// Whether this (agent) token lets its holder claim workload identity
    /// `namespace`/`account`.
    pub fn allows_workload(&self, namespace: &str, account: &str) -> bool {
        self.workloads.iter().any(|w| match w.split_once('/') {
            Some((ns, "*")) => ns == namespace,
            Some((ns, sa)) => ns == namespace && sa == account,
            None => false,
        })
    }
}

/// A Raft member and where to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// Raft node id.
    pub id: u64,
    /// Server name.
    pub name: String,
    /// Zone of the server.
    pub zone: String,
    /// host:port of its gRPC listener.
    pub address: String,
}

/// What a proxy last acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyAck {
    /// Revision applied (or rejected).
    pub revision: u64,
    /// Empty when applied, else the proxy's reason.
    pub rejected: String,
}

/// A change, as recorded under its revision and sent to watchers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Store revision of this change.
    pub revision: u64,
    /// `zone`, `endpoint`, `policy`, `member`.
    pub kind: String,
    /// Key within the kind.
    pub key: String,
    /// New value; `None` when deleted.
    pub value: Option<serde_json::Value>,
}

/// A write to the state machine, as carried in a Raft log entry (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Command {
    /// Adds or replaces an endpoint; the lease starts at `now_ms`.
    Register {
        /// The endpoint.
        endpoint: EndpointRecord,
        /// Proposer's clock.
        now_ms: u64,
    },
    /// Removes an endpoint.
    Deregister {
        /// `namespace/service/zone/id`.
        key: String,
    },
    /// Extends an endpoint's lease from `now_ms`.
    Renew {
        /// `namespace/service/zone/id`.
        key: String,
        /// Proposer's clock.
        now_ms: u64,
    },
    /// Removes every endpoint whose lease ran out by `now_ms` (leader only),
    /// except in `spare_zones` (edge zones cut off from the leader), whose
    /// endpoints get their leases extended instead.
    ExpireLeases {
        /// Leader's clock.
        now_ms: u64,
        /// Edge zones whose endpoints are kept this time.
        #[serde(default)]
        spare_zones: Vec<String>,
    },
    /// Removes these endpoints, whose leases the leader saw end (renewals
    /// are held in the leader's memory, see `crate::leases`; only this
    /// outcome is replicated). An endpoint registered again after the
    /// leader's decision (its lease then ends after `now_ms`) stays.
    ExpireEndpoints {
        /// `namespace/service/zone/id`.
        keys: Vec<String>,
        /// Leader's clock.
        now_ms: u64,
    },
    /// Adds or replaces policies, all or none.
    ApplyPolicies {
        /// The documents.
        docs: Vec<PolicyRecord>,
    },
    /// Removes a policy.
    DeletePolicy {
        /// Kind.
        kind: String,
        /// Name.
        name: String,
    },
    /// Stores a new join token by hash.
    CreateToken {
        /// Hex SHA-256 of the secret.
        hash: String,
        /// The token as stored.
        token: TokenRecord,
    },
    /// Uses a join token once; creates the zone on first use.
    UseToken {
        /// Hex SHA-256 of the presented secret.
        hash: String,
        /// Who uses it (server name).
        by: String,
        /// Proposer's clock.
        now_ms: u64,
        /// Whether a host agent presents it (the token's kind must match).
        #[serde(default)]
        agent: bool,
        /// The Raft id a joining server will take: refused when a member
        /// already has it, unless the token allows replacing.
        #[serde(default)]
        member: Option<u64>,
    },
    /// Revokes an unused join token.
    RevokeToken {
        /// Hex SHA-256 of the secret.
        hash: String,
    },
    /// Removes a zone and its endpoints.
    RemoveZone {
        /// Zone name.
        name: String,
    },
    /// Records where a Raft member can be reached (the bootstrap voters,
    /// whose addresses come from configuration rather than a conf change).
    SetMember {
        /// The member.
        member: MemberRecord,
    },
    /// `command` made on behalf of `caller` (a SPIFFE ID), at `at_ms` by
    /// the proposer's clock: ownership checks and the audit trail use them.
    As {
        /// Who asked.
        caller: String,
        /// Proposer's clock.
        at_ms: u64,
        /// What was asked.
        command: Box<Command>,
    },
    /// A membership change: never applied as an entry, but carried to the
    /// leader like a write (so the leader checks who asks) and proposed
    /// there as a Raft conf change.
    Member {
        /// What changes.
        change: MemberChange,
    },
    /// Only an audit entry (membership changes, which travel as Raft conf
    /// changes rather than commands).
    Note {
        /// What was done.
        action: String,
        /// What it was done to.
        detail: String,
    },
    /// Records a proxy's acknowledgement.
    Ack {
        /// Proxy identity.
        proxy: String,
        /// What it acknowledged.
        ack: ProxyAck,
    },
}

/// One entry of the audit trail: a change to policy, tokens, zones or
/// membership, with who asked and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the trail.
    pub seq: u64,
    /// Proposer's clock, Unix ms.
    pub time_ms: u64,
    /// SPIFFE ID of the caller.
    pub by: String,
    /// What was done, e.g. `policy.apply`.
    pub action: String,
    /// What it was done to.
    pub detail: String,
}

/// How many audit entries every server keeps.
pub const AUDIT_RETENTION: u64 = 10_000;

/// A change of the Raft membership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberChange {
    /// Adds a server as a learner (non-voting).
    AddLearner(MemberRecord),
    /// Makes a learner a voter once it has caught up.
    Promote(u64),
    /// Removes a member.
    Remove(u64),
}

/// What an applied command produced.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Outcome {
    /// Store revision after the command.
    pub revision: u64,
    /// For `UseToken`: the token's zone and role.
    pub token: Option<TokenRecord>,
}

/// Applies commands to the store's tree through an overlay, so that a batch
/// of entries sees its own writes, which then land as one apply
/// (`Db::write_applied`).
pub(crate) struct Applier<'a> {
    db: &'a Db,
    overlay: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    revision: u64,
}

// === impl Command ===

impl Command {
    /// What the audit trail records of this command, if anything.
    pub(crate) fn audit(&self) -> Option<(String, String)> {
        let a = |action: &str, detail: String| Some((action.to_string(), detail));
        match self {
            Command::ApplyPolicies { docs } => a(
                "policy.apply",
                docs.iter()
                    .map(|d| format!("{}/{}", d.kind, d.name))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            Command::DeletePolicy { kind, name } => a("policy.delete", format!("{kind}/{name}")),
            Command::CreateToken { hash, token } => a(
                "token.create",
                format!(
                    "{} zone={}{}",
                    token_id(hash),
                    token.zone,
                    token
                        .name
                        .as_deref()
                        .map(|n| format!(" name={n}"))
                        .unwrap_or_default()
                ),
            ),
            Command::RevokeToken { hash } => a("token.revoke", token_id(hash)),
            Command::UseToken { hash, by, .. } => {
                a("token.use", format!("{} by {by}", token_id(hash)))
            }
            Command::RemoveZone { name } => a("zone.remove", name.clone()),
            Command::Note { action, detail } => a(action, detail.clone()),
            Command::Member { change } => match change {
                MemberChange::AddLearner(m) => a(
                    "member.add-learner",
                    format!("{}/{} (Raft id {}) at {}", m.zone, m.name, m.id, m.address),
                ),
                MemberChange::Promote(id) => a("member.promote", format!("Raft id {id}")),
                MemberChange::Remove(id) => a("member.remove", format!("Raft id {id}")),
            },
            _ => None,
        }
    }
}

/// The public id of a token: the start of its secret's hash.
pub fn token_id(hash: &str) -> String {
    hash.chars().take(16).collect()
}

// === impl EndpointRecord ===

impl EndpointRecord {
    /// Whether no sidecar answers at this endpoint ([`LABEL_PLAIN`]).
    pub fn is_plain(&self) -> bool {
        self.labels.get(LABEL_PLAIN).is_some_and(|v| v == "true")
    }

    /// `namespace/service/zone/id`.
    pub fn key(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            self.namespace, self.service, self.zone, self.id
        )
    }

    /// Refuses an endpoint with a missing or malformed field, naming it.
    pub fn validate(&self) -> Result<(), FedError> {
        name_field("namespace", &self.namespace)?;
        name_field("service", &self.service)?;
        name_field("zone", &self.zone)?;
        // Host or pod names, which may hold dots: a key part, not a label.
        key_field("id", &self.id)?;
        if self.address.is_empty() {
            return Err(refused("address", "must not be empty"));
        }
        if self.ports.is_empty() {
            return Err(refused("ports", "list at least one port"));
        }
        if let Some(p) = self.ports.iter().find(|p| **p == 0 || **p > 65535) {
            return Err(refused("ports", &format!("{p} is not a port (1-65535)")));
        }
        if !["detect", "tcp", "http", "http2", "grpc"].contains(&self.protocol.as_str()) {
            return Err(refused(
                "protocol",
                &format!(
                    "{:?} is not one of detect, tcp, http, http2, grpc",
                    self.protocol
                ),
            ));
        }
        Ok(())
    }
}

// === impl PolicyRecord ===

impl PolicyRecord {
    /// The document, typed: the one parse the store validates with and every
    /// proxy applies with.
    pub fn parse(&self) -> Result<crate::policy::Policy, crate::policy::PolicyError> {
        crate::policy::parse(&self.kind, &self.name, &self.spec)
    }

    /// Refuses a document [`PolicyRecord::parse`] refuses, naming the field.
    pub fn validate(&self) -> Result<(), FedError> {
        self.parse()
            .map(|_| ())
            .map_err(|e| refused(&e.field, &e.reason))
    }
}

/// A namespace, service or zone name: a DNS label (see
/// [`crate::policy::check_label`]), as these are labels of mesh DNS and SNI
/// names.
pub fn name_field(field: &str, v: &str) -> Result<(), FedError> {
    crate::policy::check_label(v).map_err(|e| refused(field, &format!("{v:?} {e}")))
}

/// A name that is only a key part (endpoint id, server or host name,
/// service account): see [`crate::policy::check_key`]; dots allowed.
pub fn key_field(field: &str, v: &str) -> Result<(), FedError> {
    crate::policy::check_key(v).map_err(|e| refused(field, &format!("{v:?} {e}")))
}

fn refused(field: &str, reason: &str) -> FedError {
    FedError::Refused(format!("{field}: {reason}"))
}

// === reads ===

/// A join token by the hash of its secret.
pub fn token(db: &Db, hash: &str) -> Result<Option<TokenRecord>, FedError> {
    db.get(format!("{P_TOKEN}{hash}").as_bytes())?
        .map(|v| from_json(&v))
        .transpose()
}

/// Whether an operator removed Raft member `id` (and no operator added it
/// back since).
pub fn removed(db: &Db, id: u64) -> Result<bool, FedError> {
    Ok(db.get(format!("{P_REMOVED}{id:020}").as_bytes())?.is_some())
}

/// The token `identity` joined with, if it joined with one.
pub fn joined_with(db: &Db, identity: &str) -> Result<Option<TokenRecord>, FedError> {
    if let Some(v) = db.get(format!("{P_JOINED}{identity}").as_bytes())? {
        let hash: String = from_json(&v)?;
        return token(db, &hash);
    }
    // Joins recorded before this index existed: look through the tokens.
    Ok(tokens(db)?
        .into_iter()
        .map(|(_, t)| t)
        .find(|t| t.used_by.as_deref() == Some(identity)))
}

/// Every join token, by the hash of its secret.
pub fn tokens(db: &Db) -> Result<Vec<(String, TokenRecord)>, FedError> {
    db.scan_prefix(P_TOKEN.as_bytes())
        .map(|item| {
            let (k, v) = item?;
            let hash = String::from_utf8_lossy(&k[P_TOKEN.len()..]).into_owned();
            Ok((hash, from_json(&v)?))
        })
        .collect()
}

/// The last `limit` audit entries, oldest first.
pub fn audit(db: &Db, limit: usize) -> Result<Vec<AuditRecord>, FedError> {
    let all: Vec<AuditRecord> = list(db, P_AUDIT)?;
    let skip = all.len().saturating_sub(limit);
    Ok(all.into_iter().skip(skip).collect())
}

/// When a lease of `seconds` from `now_ms` ends; saturates rather than wraps
/// on values no honest caller sends.
fn lease_end(now_ms: u64, seconds: u64) -> u64 {
    now_ms.saturating_add(seconds.saturating_mul(1000))
}

/// The current store revision.
pub fn revision(db: &Db) -> Result<u64, FedError> {
    Ok(db.get(K_REVISION)?.map(|v| be_u64(&v)).unwrap_or(0))
}

fn be_u64(b: &[u8]) -> u64 {
    b.get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

fn list<T: serde::de::DeserializeOwned>(db: &Db, prefix: &str) -> Result<Vec<T>, FedError> {
    let mut out = Vec::new();
    for item in db.scan_prefix(prefix.as_bytes()) {
        let (_, v) = item?;
        out.push(from_json(&v)?);
    }
    Ok(out)
}

fn from_json<T: serde::de::DeserializeOwned>(v: &[u8]) -> Result<T, FedError> {
    serde_json::from_slice(v).map_err(|e| FedError::Decode {
        what: "stored record",
        reason: e.to_string(),
    })
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    // Our records are plain structs of strings, numbers and maps with string
    // keys; serde_json cannot fail on them.
    serde_json::to_vec(v).unwrap_or_default()
}

/// The endpoints of one service, in every zone (a prefix scan).
pub fn endpoints_of(
    db: &Db,
    namespace: &str,
    service: &str,
) -> Result<Vec<EndpointRecord>, FedError> {
    list(db, &format!("{P_ENDPOINT}{namespace}/{service}/"))
}

/// One endpoint, by `namespace/service/zone/id`.
pub fn endpoint(db: &Db, key: &str) -> Result<Option<EndpointRecord>, FedError> {
    db.get(format!("{P_ENDPOINT}{key}").as_bytes())?
        .map(|v| from_json(&v))
        .transpose()
}

/// Every endpoint.
pub fn endpoints(db: &Db) -> Result<Vec<EndpointRecord>, FedError> {
    list(db, P_ENDPOINT)
}

/// Every policy.
pub fn policies(db: &Db) -> Result<Vec<PolicyRecord>, FedError> {
    list(db, P_POLICY)
}

/// The mesh's `Export` documents as one table (a scan of that kind only).
pub fn exports(db: &Db) -> Result<crate::policy::Exports, FedError> {
    Ok(crate::policy::Exports::from_records(&export_records(db)?))
}

/// The `Export` documents by name, with the revision they are as of (read
/// together, so no change falls between them).
pub fn export_docs(db: &Db) -> Result<(u64, HashMap<String, PolicyRecord>), FedError> {
    db.consistent(|| {
        let rev = revision(db)?;
        let docs = export_records(db)?;
        Ok((rev, docs.into_iter().map(|d| (d.name.clone(), d)).collect()))
    })
}

fn export_records(db: &Db) -> Result<Vec<PolicyRecord>, FedError> {
    list(db, &format!("{P_POLICY}Export/"))
}

/// The endpoints of one service as the JSON the store holds, by key
/// (`namespace/service/zone/id`).
pub fn endpoints_raw_of(
    db: &Db,
    namespace: &str,
    service: &str,
) -> Result<Vec<(String, bytes::Bytes)>, FedError> {
    let mut out = Vec::new();
    scan_raw(db, &format!("{P_ENDPOINT}{namespace}/{service}/"), &mut out)?;
    Ok(out)
}

/// Appends the endpoints under `prefix` (a key prefix that starts with
/// the endpoints' own) to `out`, by key.
fn scan_raw(db: &Db, prefix: &str, out: &mut Vec<(String, bytes::Bytes)>) -> Result<(), FedError> {
    for item in db.scan_prefix(prefix.as_bytes()) {
        let (k, v) = item?;
        let key = String::from_utf8_lossy(&k[P_ENDPOINT.len()..]).into_owned();
        out.push((key, bytes::Bytes::copy_from_slice(&v)));
    }
    Ok(())
}

/// Every zone.
pub fn zones(db: &Db) -> Result<Vec<ZoneRecord>, FedError> {
    list(db, P_ZONE)
}

/// Every member with a known address.
pub fn members(db: &Db) -> Result<Vec<MemberRecord>, FedError> {
    list(db, P_MEMBER)
}

/// Every proxy's acknowledgement, by proxy.
pub fn proxy_acks(db: &Db) -> Result<Vec<(String, ProxyAck)>, FedError> {
    let mut out = Vec::new();
    for item in db.scan_prefix(P_PROXY.as_bytes()) {
        let (k, v) = item?;
        let name = String::from_utf8_lossy(&k[P_PROXY.len()..]).into_owned();
        out.push((name, from_json(&v)?));
    }
    Ok(out)
}

/// Events after `from`, in order, at most `limit`. `None` when `from` is
/// older than the retained history (the caller then starts from a snapshot).
pub fn events_after(db: &Db, from: u64, limit: usize) -> Result<Option<Vec<Event>>, FedError> {
    let current = revision(db)?;
    if from >= current {
        return Ok(Some(Vec::new()));
    }
    let oldest = current.saturating_sub(EVENT_RETENTION) + 1;
    if from + 1 < oldest {
        return Ok(None);
    }
    let mut out = Vec::new();
    for item in db.range_from(&event_key(from + 1), P_EVENT).take(limit) {
        let (_, v) = item?;
        out.push(from_json(&v)?);
    }
    Ok(Some(out))
}

/// One entry of a snapshot, its value as the JSON the store holds (sent
/// as is: a snapshot neither parses nor re-encodes what it sends).
#[derive(Debug, Clone, PartialEq)]
pub struct RawEvent {
    /// The snapshot's revision.
    pub revision: u64,
    /// `zone`, `endpoint` or `policy`.
    pub kind: &'static str,
    /// Key within the kind.
    pub key: String,
    /// The value, JSON.
    pub value_json: String,
}

/// The watched state within `scope` at one revision: endpoints read by key
/// prefix per namespace and service named (not by filtering the whole
/// registry, so a scoped snapshot costs what it returns) and, for a scope
/// with a zone, exported to it; zones whole; policies whose service is in
/// scope.
pub fn snapshot_events_scoped(db: &Db, scope: &Scope) -> Result<(u64, Vec<RawEvent>), FedError> {
    db.consistent(|| snapshot_raw_now(db, scope))
}

fn snapshot_raw_now(db: &Db, scope: &Scope) -> Result<(u64, Vec<RawEvent>), FedError> {
    let rev = revision(db)?;
    let exports = match scope.zone() {
        Some(_) => exports(db)?,
        None => crate::policy::Exports::default(),
    };
    let mut out = Vec::new();
    let scan = |kind: &'static str, base: &str, prefix: String, out: &mut Vec<RawEvent>| {
        for item in db.scan_prefix(prefix.as_bytes()) {
            let (k, v) = item?;
            let key = String::from_utf8_lossy(&k[base.len()..]).into_owned();
            if kind == "policy" {
                let value: serde_json::Value = from_json(&v)?;
                if !scope.wants(&crate::scope::topic(kind, &key, Some(&value))) {
                    continue;
                }
            } else if kind == "endpoint" && !scope.exported_endpoint(&key, &exports) {
                continue;
            }
            let value_json = String::from_utf8(v.to_vec()).map_err(|e| FedError::Decode {
                what: "stored value",
                reason: e.to_string(),
            })?;
            out.push(RawEvent {
                revision: rev,
                kind,
                key,
                value_json,
            });
        }
        Ok::<_, FedError>(())
    };
    scan("zone", P_ZONE, P_ZONE.into(), &mut out)?;
    for p in endpoint_prefixes(scope) {
        scan("endpoint", P_ENDPOINT, p, &mut out)?;
    }
    scan("policy", P_POLICY, P_POLICY.into(), &mut out)?;
    Ok((rev, out))
}

/// The key prefixes of the endpoints within `scope`, in key order, without
/// repeats: a service inside a named namespace is read with its namespace,
/// and the system namespace (gateways) is always read.
fn endpoint_prefixes(scope: &Scope) -> BTreeSet<String> {
    let mut prefixes: BTreeSet<String> = BTreeSet::new();
    if scope.every_service() {
        prefixes.insert(P_ENDPOINT.into());
        return prefixes;
    }
    prefixes.insert(format!("{P_ENDPOINT}{SYSTEM_NAMESPACE}/"));
    for ns in scope.namespaces() {
        prefixes.insert(format!("{P_ENDPOINT}{ns}/"));
    }
    for svc in scope.services_outside_namespaces() {
        // The system namespace is read whole above.
        if !svc.starts_with(&format!("{SYSTEM_NAMESPACE}/")) {
            prefixes.insert(format!("{P_ENDPOINT}{svc}/"));
        }
    }
    prefixes
}

/// The endpoints within `scope`'s namespaces and services (exports aside),
/// as the JSON the store holds, by key.
pub fn endpoints_raw_in(db: &Db, scope: &Scope) -> Result<Vec<(String, bytes::Bytes)>, FedError> {
    let mut out = Vec::new();
    for p in endpoint_prefixes(scope) {
        scan_raw(db, &p, &mut out)?;
    }
    Ok(out)
}

/// The event at revision `rev`, if the history still holds it.
pub fn event(db: &Db, rev: u64) -> Result<Option<Event>, FedError> {
    db.get(&event_key(rev))?.map(|v| from_json(&v)).transpose()
}

fn event_key(rev: u64) -> Vec<u8> {
    let mut k = P_EVENT.to_vec();
    k.extend_from_slice(&rev.to_be_bytes());
    k
}

// === impl Applier ===

impl<'a> Applier<'a> {
    pub(crate) fn new(db: &'a Db) -> Result<Self, FedError> {
        Ok(Self {
            db,
            overlay: BTreeMap::new(),
            revision: revision(db)?,
        })
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, FedError> {
        if let Some(v) = self.overlay.get(key.as_bytes()) {
            return Ok(v.clone());
        }
        Ok(self.db.get(key.as_bytes())?.map(|v| v.to_vec()))
    }

    fn keys_with_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, FedError> {
        let mut merged: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        for item in self.db.scan_prefix(prefix.as_bytes()) {
            let (k, v) = item?;
            merged.insert(k.to_vec(), Some(v.to_vec()));
        }
        for (k, v) in self.overlay.range(prefix.as_bytes().to_vec()..) {
            if !k.starts_with(prefix.as_bytes()) {
                break;
            }
            merged.insert(k.clone(), v.clone());
        }
        Ok(merged
            .into_iter()
            .filter_map(|(k, v)| Some((String::from_utf8_lossy(&k).into_owned(), v?)))
            .collect())
    }

    /// Writes `value` (or deletes) at `prefix+key`, with one new revision.
    fn change<T: Serialize>(&mut self, kind: &str, prefix: &str, key: &str, value: Option<&T>) {
        self.revision += 1;
        let full = format!("{prefix}{key}").into_bytes();
        let json = value.map(to_json);
        let event = Event {
            revision: self.revision,
            kind: kind.into(),
            key: key.into(),
            value: value.map(|v| serde_json::to_value(v).unwrap_or_default()),
        };
        self.overlay.insert(full, json);
        self.overlay
            .insert(event_key(self.revision), Some(to_json(&event)));
        // Retention is part of the replicated state, so every server keeps
        // exactly the same window of history.
        if self.revision > EVENT_RETENTION {
            self.overlay
                .insert(event_key(self.revision - EVENT_RETENTION), None);
        }
    }

    /// Records a silent write (tokens, acks, members): bumps no revision.
    fn put_quiet<T: Serialize>(&mut self, key: String, value: Option<&T>) {
        self.overlay.insert(key.into_bytes(), value.map(to_json));
    }

    pub(crate) fn revision(&self) -> u64 {
        self.revision
    }

    /// Applies one command. An `Err` is a refusal (bad or stale input); it
    /// leaves no trace in the overlay, as every check runs before any write.
    pub(crate) fn apply(&mut self, cmd: &Command) -> Result<Outcome, FedError> {
        match cmd {
            Command::As {
                caller,
                at_ms,
                command,
            } => {
                if matches!(**command, Command::As { .. }) {
                    return Err(FedError::Refused("a command on behalf of a command".into()));
                }
                let o = self.apply_by(command, Some(caller))?;
                if let Some((action, detail)) = command.audit() {
                    self.audit(caller, *at_ms, action, detail)?;
                }
                Ok(o)
            }
            _ => self.apply_by(cmd, None),
        }
    }

    /// Whether `caller` (None: the store itself) may change an endpoint
    /// registered by `owner`.
    pub(crate) fn may_change(
        key: &str,
        owner: &str,
        caller: Option<&String>,
    ) -> Result<(), FedError> {
        let Some(caller) = caller else { return Ok(()) };
        let operator = caller
            .parse::<trellis_ca::SpiffeId>()
            .is_ok_and(|id| id.role_kind() == Some(trellis_ca::RoleKind::Operator));
        if owner.is_empty() || owner == caller || operator {
            return Ok(());
        }
        Err(FedError::Forbidden(format!(
            "endpoint {key} was registered by {owner}; only it or an operator may change it"
        )))
    }

    fn audit(
        &mut self,
        by: &str,
        time_ms: u64,
        action: String,
        detail: String,
    ) -> Result<(), FedError> {
        let seq = self.get(K_AUDIT_SEQ)?.map(|v| be_u64(&v)).unwrap_or(0) + 1;
        self.overlay.insert(
            K_AUDIT_SEQ.as_bytes().to_vec(),
            Some(seq.to_be_bytes().to_vec()),
        );
        let rec = AuditRecord {
            seq,
            time_ms,
            by: by.into(),
            action,
            detail,
        };
        self.put_quiet(format!("{P_AUDIT}{seq:020}"), Some(&rec));
        if seq > AUDIT_RETENTION {
            self.put_quiet::<AuditRecord>(format!("{P_AUDIT}{:020}", seq - AUDIT_RETENTION), None);
        }
        Ok(())
    }

    fn apply_by(&mut self, cmd: &Command, caller: Option<&String>) -> Result<Outcome, FedError> {
        let mut outcome = Outcome::default();
        match cmd {
            Command::As { .. } => {
                return Err(FedError::Refused("a command on behalf of a command".into()));
            }
            Command::Note { .. } => {}
            Command::Member { .. } => {
                return Err(FedError::Refused(
                    "a membership change travels as a conf change, not an entry".into(),
                ));
            }
            Command::Register { endpoint, now_ms } => {
                endpoint.validate()?;
                let key = endpoint.key();
                let prior = match self.get(&format!("{P_ENDPOINT}{key}"))? {
                    Some(v) => Some(from_json::<EndpointRecord>(&v)?),
                    None => None,
                };
                let mut ep = endpoint.clone();
                ep.owner = match (&prior, caller) {
                    (Some(p), _) => {
                        Self::may_change(&key, &p.owner, caller)?;
                        // An operator's edit keeps the owner, so the agent
                        // that registered it can still renew it.
                        if p.owner.is_empty() {
                            caller.cloned().unwrap_or_default()
                        } else {
                            p.owner.clone()
                        }
                    }
                    (None, c) => c.cloned().unwrap_or_default(),
                };
                ep.lease_expires_ms = if ep.lease_seconds == 0 {
                    0
                } else {
                    lease_end(*now_ms, ep.lease_seconds)
                };
                self.change("endpoint", P_ENDPOINT, &key, Some(&ep));
            }
            Command::Deregister { key } => {
                let Some(v) = self.get(&format!("{P_ENDPOINT}{key}"))? else {
                    return Err(FedError::Refused(format!(
                        "endpoint {key} is not registered"
                    )));
                };
                let prior: EndpointRecord = from_json(&v)?;
                Self::may_change(key, &prior.owner, caller)?;
                self.change::<EndpointRecord>("endpoint", P_ENDPOINT, key, None);
            }
            Command::Renew { key, now_ms } => {
                let Some(v) = self.get(&format!("{P_ENDPOINT}{key}"))? else {
                    return Err(FedError::Refused(format!(
                        "endpoint {key} is not registered (its lease may have expired; register it again)"
                    )));
                };
                let mut ep: EndpointRecord = from_json(&v)?;
                Self::may_change(key, &ep.owner, caller)?;
                if ep.lease_seconds > 0 {
                    ep.lease_expires_ms = lease_end(*now_ms, ep.lease_seconds);
                    // Quiet: a renewal changes nothing a proxy routes by, and
                    // an event per renewal would wake every watcher (and
                    // their acks) every few seconds per endpoint.
                    self.put_quiet(format!("{P_ENDPOINT}{key}"), Some(&ep));
                }
            }
            Command::ExpireLeases {
                now_ms,
                spare_zones,
            } => {
                for (k, v) in self.keys_with_prefix(P_ENDPOINT)? {
                    let mut ep: EndpointRecord = from_json(&v)?;
                    if ep.lease_expires_ms == 0 {
                        continue;
                    }
                    if spare_zones.contains(&ep.zone) {
                        if ep.lease_expires_ms <= now_ms.saturating_add(1000) {
                            ep.lease_expires_ms = lease_end(*now_ms, ep.lease_seconds);
                            self.put_quiet(k.clone(), Some(&ep));
                        }
                        continue;
                    }
                    if ep.lease_expires_ms <= *now_ms {
                        let key = k[P_ENDPOINT.len()..].to_string();
                        self.change::<EndpointRecord>("endpoint", P_ENDPOINT, &key, None);
                    }
                }
            }
            Command::ExpireEndpoints { keys, now_ms } => {
                for key in keys {
                    let Some(v) = self.get(&format!("{P_ENDPOINT}{key}"))? else {
                        continue;
                    };
                    let ep: EndpointRecord = from_json(&v)?;
                    if ep.lease_seconds > 0 && ep.lease_expires_ms <= *now_ms {
                        self.change::<EndpointRecord>("endpoint", P_ENDPOINT, key, None);
                    }
                }
            }
            Command::ApplyPolicies { docs } => {
                for (i, d) in docs.iter().enumerate() {
                    d.validate().map_err(|e| {
                        FedError::Refused(format!(
                            "document {} ({}/{}): {e}",
                            i + 1,
                            d.kind,
                            d.name
                        ))
                    })?;
                }
                for d in docs {
                    let key = format!("{}/{}", d.kind, d.name);
                    // A document that now names another service: its old
                    // service's proxies must drop it, and a scoped watch
                    // routes a change by the new value only. A deletion
                    // reaches everyone first.
                    if let Some(prior) = self.get(&format!("{P_POLICY}{key}"))? {
                        let prior: PolicyRecord = from_json(&prior)?;
                        if prior.spec.get("service") != d.spec.get("service") {
                            self.change::<PolicyRecord>("policy", P_POLICY, &key, None);
                        }
                    }
                    self.change("policy", P_POLICY, &key, Some(d));
                }
            }
            Command::DeletePolicy { kind, name } => {
                let key = format!("{kind}/{name}");
                if self.get(&format!("{P_POLICY}{key}"))?.is_none() {
                    return Err(FedError::Refused(format!("policy {key} does not exist")));
                }
                self.change::<PolicyRecord>("policy", P_POLICY, &key, None);
            }
            Command::CreateToken { hash, token } => {
                name_field("zone", &token.zone)?;
                self.put_quiet(format!("{P_TOKEN}{hash}"), Some(token));
            }
            Command::UseToken {
                hash,
                by,
                now_ms,
                agent,
                member,
            } => {
                let Some(v) = self.get(&format!("{P_TOKEN}{hash}"))? else {
                    return Err(FedError::Refused(
                        "join token: unknown (check that it was copied whole, or create a new one with `trellis zone token create`)".into(),
                    ));
                };
                let mut t: TokenRecord = from_json(&v)?;
                if t.agent != *agent {
                    return Err(FedError::Refused(if t.agent {
                        "join token: this is a host agent token; give it to `trellis agent` (join_token), not to `trellis zone join`".into()
                    } else {
                        "join token: this is a server token; create an agent token with `trellis zone token create --agent`".into()
                    }));
                }
                if let Some(user) = &t.used_by {
                    return Err(FedError::Refused(format!(
                        "join token: already used by {user}; a token works once, create a new one"
                    )));
                }
                if t.expires_ms <= *now_ms {
                    return Err(FedError::Refused(format!(
                        "join token: expired {} s ago; create a new one",
                        (now_ms - t.expires_ms) / 1000
                    )));
                }
                // Checked here too, not only by the API before proposing:
                // two joins racing for one name must not both win.
                if !t.replace {
                    if let Some(id) = member
                        && self.get(&format!("{P_MEMBER}{id:020}"))?.is_some()
                    {
                        return Err(FedError::Refused(format!(
                            "join: {by} is already a member (Raft id {id}); remove it first with `trellis cluster remove {id}`, or create a token with --replace"
                        )));
                    }
                    if *agent && self.get(&format!("{P_JOINED}{by}"))?.is_some() {
                        return Err(FedError::Refused(format!(
                            "join: {by} has already joined; create a token with --replace to rebuild that host"
                        )));
                    }
                }
                t.used_by = Some(by.clone());
                self.put_quiet(format!("{P_TOKEN}{hash}"), Some(&t));
                self.put_quiet(format!("{P_JOINED}{by}"), Some(hash));
                if self.get(&format!("{P_ZONE}{}", t.zone))?.is_none() {
                    let zone = ZoneRecord {
                        name: t.zone.clone(),
                        role: if t.edge {
                            ZoneRole::Edge
                        } else {
                            ZoneRole::Core
                        },
                        gateways: Vec::new(),
                    };
                    self.change("zone", P_ZONE, &t.zone, Some(&zone));
                }
                outcome.token = Some(t);
            }
            Command::RevokeToken { hash } => {
                let Some(v) = self.get(&format!("{P_TOKEN}{hash}"))? else {
                    return Err(FedError::Refused("join token: unknown".into()));
                };
                let t: TokenRecord = from_json(&v)?;
                if let Some(user) = t.used_by {
                    return Err(FedError::Refused(format!(
                        "join token: already used by {user}; revoke that identity by removing the member instead"
                    )));
                }
                self.put_quiet::<TokenRecord>(format!("{P_TOKEN}{hash}"), None);
            }
            Command::RemoveZone { name } => {
                if self.get(&format!("{P_ZONE}{name}"))?.is_none() {
                    return Err(FedError::Refused(format!("zone {name} does not exist")));
                }
                // A zone's role decides whether its servers vote; it cannot
                // go while they are members (re-made, it would be core).
                if let Some((_, m)) = self
                    .keys_with_prefix(P_MEMBER)?
                    .iter()
                    .filter_map(|(k, v)| from_json::<MemberRecord>(v).ok().map(|m| (k.clone(), m)))
                    .find(|(_, m)| &m.zone == name)
                {
                    return Err(FedError::Refused(format!(
                        "zone {name} still has server {} (Raft id {}); remove its servers first with `trellis cluster remove`",
                        m.name, m.id
                    )));
                }
                for (k, v) in self.keys_with_prefix(P_ENDPOINT)? {
                    let ep: EndpointRecord = from_json(&v)?;
                    if &ep.zone == name {
                        let key = k[P_ENDPOINT.len()..].to_string();
                        self.change::<EndpointRecord>("endpoint", P_ENDPOINT, &key, None);
                    }
                }
                self.change::<ZoneRecord>("zone", P_ZONE, name, None);
            }
            Command::SetMember { member } => {
                if member.id == 0 || member.address.is_empty() {
                    return Err(FedError::Refused(
                        "member: id and address are required".into(),
                    ));
                }
                // A leader's configured peers are re-recorded at each term;
                // one an operator removed stays removed.
                if self
                    .get(&format!("{P_REMOVED}{:020}", member.id))?
                    .is_some()
                {
                    return Err(FedError::Refused(format!(
                        "member {} was removed by an operator",
                        member.id
                    )));
                }
                self.member(member.id, Some(member));
            }
            Command::Ack { proxy, ack } => {
                self.put_quiet(format!("{P_PROXY}{proxy}"), Some(ack));
            }
        }
        outcome.revision = self.revision;
        Ok(outcome)
    }

    /// Records (or removes) a Raft member's address, from a conf change.
    /// A removal leaves a mark: the removed server's credentials can no
    /// longer add it back or renew (only an operator's add clears it).
    pub(crate) fn member(&mut self, id: u64, record: Option<&MemberRecord>) {
        let key = format!("{P_MEMBER}{id:020}");
        self.put_quiet(key.clone(), record);
        let mark = format!("{P_REMOVED}{id:020}");
        match record {
            None => self.put_quiet(mark, Some(&true)),
            Some(_) => self.put_quiet::<bool>(mark, None),
        }
        // Also a zone for the member, if it brings one we do not know yet.
        if let Some(m) = record
            && !m.zone.is_empty()
            && self
                .get(&format!("{P_ZONE}{}", m.zone))
                .ok()
                .flatten()
                .is_none()
        {
            let zone = ZoneRecord {
                name: m.zone.clone(),
                role: ZoneRole::Core,
                gateways: Vec::new(),
            };
            let name = m.zone.clone();
            self.change("zone", P_ZONE, &name, Some(&zone));
        }
    }

    /// The writes, with the new revision.
    pub(crate) fn into_writes(self) -> crate::storage::Writes {
        let mut w = self.overlay;
        w.insert(
            K_REVISION.to_vec(),
            Some(self.revision.to_be_bytes().to_vec()),
        );
        w
    }
}

#[cfg(test)]
mod tests;
