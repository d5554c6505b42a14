//! The gRPC services. Every method first establishes who is calling (the
//! SPIFFE ID verified during the TLS handshake) and whether that role may
//! call it; writes are proposed here when this server leads and forwarded to
//! the leader otherwise; reads are answered locally with the revision they
//! reflect, after a ReadIndex round when the caller asks for linearizable.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use trellis_ca::{CaDir, IssueOptions, Role, RoleKind, SpiffeId, TrustDomain};

use crate::error::FedError;
use crate::node::{self, Membership, NodeHandle};
use crate::proto;
use crate::proto::raft_client::RaftClient;
use crate::state::{
    self, Command, EndpointRecord, MemberChange, MemberRecord, Outcome, PolicyRecord, ZoneRole,
};
use crate::token::{self, JoinToken};
use crate::transport::{MAX_MESSAGE, PeerInfo, RaftTransport};

mod audit;
mod authz;

pub use authz::{MAX_CONTROLLER_TOKEN_SECONDS, MAX_LEASE_SECONDS, MIN_LEASE_SECONDS};
mod cluster;
mod hub;
mod telemetry;
mod watch;
mod zones;

/// Everything the services share.
#[derive(Clone)]
pub struct Api {
    inner: Arc<Inner>,
}

struct Inner {
    node: NodeHandle,
    transport: Arc<RaftTransport>,
    trust_domain: TrustDomain,
    /// This server's zone: its intermediate signs the workloads it serves.
    zone: String,
    ca_dir: Option<PathBuf>,
    /// The trust bundle served to joiners and proxies; replaced when the
    /// CA's bundle changes (a root rotation).
    bundle_pem: std::sync::RwLock<String>,
    advertise: String,
    /// This server's own identity: it asks for its own promotion.
    server_id: SpiffeId,
    /// The members named in this server's join reply (see [`RaftSender`]).
    join_members: Vec<u64>,
    forward_timeout: Duration,
    channels: Mutex<HashMap<u64, tonic::transport::Channel>>,
    /// Calls without a certificate (joins, the bundle): how many may run
    /// at once, and how many may start per second.
    open_calls: Arc<tokio::sync::Semaphore>,
    open_rate: Mutex<RateLimit>,
    /// Proxies' golden-signal reports: memory only, never Raft.
    telemetry: crate::telemetry::Store,
    /// Proxies' acknowledgements: memory only, never Raft.
    acks: crate::acks::Table,
    /// Hands each change to the watch streams it concerns; started by the
    /// first watch (it needs the runtime).
    hub: std::sync::OnceLock<Arc<hub::Hub>>,
    /// Watch snapshots served since start.
    snapshots_served: std::sync::atomic::AtomicU64,
    /// Cancelled when the server stops: long-lived streams (watches,
    /// telemetry reports, Raft) end at once, so their clients move to
    /// another server instead of waiting out the drain.
    stopping: tokio_util::sync::CancellationToken,
}

/// Most unauthenticated calls in progress at once on one server.
const MAX_OPEN_CALLS: usize = 16;
/// Unauthenticated calls one server starts per second, and the burst.
const OPEN_CALLS_PER_SECOND: f64 = 20.0;
const OPEN_CALLS_BURST: f64 = 40.0;

/// A token bucket.
struct RateLimit {
    tokens: f64,
    at: std::time::Instant,
}

const ANY: &[RoleKind] = &[
    RoleKind::Operator,
    RoleKind::Server,
    RoleKind::Gateway,
    RoleKind::Agent,
    RoleKind::Controller,
];
const OPERATOR: &[RoleKind] = &[RoleKind::Operator];
const OPERATOR_OR_SERVER: &[RoleKind] = &[RoleKind::Operator, RoleKind::Server];
const SERVER: &[RoleKind] = &[RoleKind::Server];
const REGISTRANTS: &[RoleKind] = &[
    RoleKind::Agent,
    RoleKind::Gateway,
    RoleKind::Operator,
    RoleKind::Controller,
];
/// Who may create join tokens: operators, and zone controllers the
/// single-pod agent tokens `api/authz.rs` allows them.
const TOKEN_MAKERS: &[RoleKind] = &[RoleKind::Operator, RoleKind::Controller];
const PROXIES: &[RoleKind] = &[RoleKind::Agent, RoleKind::Gateway];
/// Who may renew its own certificate: every identity, workloads included.
const ANY_IDENTITY: &[RoleKind] = &[
    RoleKind::Operator,
    RoleKind::Server,
    RoleKind::Gateway,
    RoleKind::Agent,
    RoleKind::Workload,
    RoleKind::Controller,
];
/// How long a stopping server still takes Raft messages from its peers
/// (`Server::shutdown` stops its node then).
pub const RAFT_STREAM_GRACE: Duration = Duration::from_millis(500);
/// How long a promotion waits for a learner to catch up.
const PROMOTE_WAIT: Duration = Duration::from_secs(30);

/// Maps a store error to what the caller sees.
pub fn to_status(e: FedError) -> Status {
    match e {
        FedError::Refused(m) => Status::invalid_argument(m),
        FedError::Forbidden(m) => Status::permission_denied(m),
        e @ FedError::NoLeader => Status::unavailable(e.to_string()),
        e @ FedError::Timeout(_) => Status::deadline_exceeded(e.to_string()),
        e @ FedError::LeaderChanged => Status::aborted(e.to_string()),
        e @ FedError::Stopped => Status::unavailable(e.to_string()),
        e => Status::internal(e.to_string()),
    }
}

fn caller<T>(
    req: &Request<T>,
    td: &TrustDomain,
    method: &str,
    allowed: &[RoleKind],
) -> Result<SpiffeId, Status> {
    let id = identity_of(req)
        .map_err(|s| Status::new(s.code(), format!("{method}: {}", s.message())))?;
    if id.trust_domain_str() != td.as_str() {
        return Err(Status::permission_denied(format!(
            "{id} is not in trust domain {td:?}",
            td = td.as_str()
        )));
    }
    let kind = id.role_kind();
    if !kind.is_some_and(|k| allowed.contains(&k)) {
        let allowed: Vec<String> = allowed.iter().map(|k| format!("{k}")).collect();
        return Err(Status::permission_denied(format!(
            "{id} may not call {method}: it admits only {}",
            allowed.join(", ")
        )));
    }
    Ok(id)
}

/// Most a request may hold on the services whose messages are small
/// (registrations, acks, CSRs, membership).
const SMALL_MESSAGE: usize = 64 * 1024;
/// Most one golden-signal report or table may hold: a proxy's edges for
/// one interval, or a mesh's for a window (with their sketches).
const TELEMETRY_MESSAGE: usize = crate::telemetry::MAX_MESSAGE;
/// Most a join may hold: a handful of CSRs.
const JOIN_MESSAGE: usize = 1024 * 1024;

/// The caller's identity from the connection, or why there is none.
fn identity_of<T>(req: &Request<T>) -> Result<SpiffeId, Status> {
    let peer = req.extensions().get::<PeerInfo>();
    if let Some(reason) = peer.and_then(|p| p.refused.as_ref()) {
        return Err(Status::unauthenticated(format!(
            "your certificate is not trusted by this server's bundle ({reason}); check that it was issued under a root the mesh trusts and has not expired"
        )));
    }
    peer.and_then(|p| p.id.clone()).ok_or_else(|| {
        Status::unauthenticated(
            "this call needs a client certificate: pass --credentials PREFIX (issued by `trellis ca issue`)",
        )
    })
}

/// Interceptor: any trusted identity (each method then checks its role).
fn require_identity(req: Request<()>) -> Result<Request<()>, Status> {
    identity_of(&req)?;
    Ok(req)
}

/// Interceptor for the Raft service: servers only, before a message that
/// may be large (and is decoded by protobuf 2, RUSTSEC-2024-0437) is read.
fn require_server(req: Request<()>) -> Result<Request<()>, Status> {
    let id = identity_of(&req)?;
    if id.role_kind() != Some(RoleKind::Server) {
        return Err(Status::permission_denied(format!(
            "{id} may not speak Raft: only servers may"
        )));
    }
    Ok(req)
}

fn reply(o: &Outcome) -> Response<proto::WriteReply> {
    Response::new(proto::WriteReply {
        revision: o.revision,
        outcome_json: serde_json::to_string(o).unwrap_or_default(),
    })
}

// === impl Api ===

impl Api {
    /// Services over `node`; `ca_dir` lets this server sign CSRs.
    pub fn new(
        node: NodeHandle,
        transport: Arc<RaftTransport>,
        ca_dir: Option<PathBuf>,
        bundle_pem: String,
        advertise: String,
        server_id: SpiffeId,
        join_members: Vec<u64>,
    ) -> Self {
        let node_timeout = node.proposal_timeout();
        // This server's trust domain and zone: the ones its identity names.
        let trust_domain: TrustDomain = server_id
            .trust_domain_str()
            .parse()
            .expect("a SpiffeId's trust domain parses as one");
        let zone = server_id
            .role()
            .and_then(|r| r.zone().map(str::to_string))
            .unwrap_or_default();
        Self {
            inner: Arc::new(Inner {
                node,
                transport,
                trust_domain,
                zone,
                ca_dir,
                bundle_pem: std::sync::RwLock::new(bundle_pem),
                advertise,
                server_id,
                join_members,
                forward_timeout: node_timeout + Duration::from_secs(1),
                channels: Mutex::new(HashMap::new()),
                open_calls: Arc::new(tokio::sync::Semaphore::new(MAX_OPEN_CALLS)),
                open_rate: Mutex::new(RateLimit {
                    tokens: OPEN_CALLS_BURST,
                    at: std::time::Instant::now(),
                }),
                telemetry: crate::telemetry::Store::default(),
                acks: crate::acks::Table::default(),
                hub: std::sync::OnceLock::new(),
                snapshots_served: std::sync::atomic::AtomicU64::new(0),
                stopping: tokio_util::sync::CancellationToken::new(),
            }),
        }
    }

    /// The token that stops the server: cancelling it ends the API's
    /// long-lived streams as well as the listener.
    pub fn stopping(&self) -> tokio_util::sync::CancellationToken {
        self.inner.stopping.clone()
    }

    /// All services, ready for `Server::builder().add_routes(...)`.
    pub fn routes(&self) -> tonic::service::Routes {
        use proto::*;
        use tonic::service::interceptor::InterceptedService;
        // Every service but Zones (join, bundle) refuses a caller without a
        // trusted certificate from the request's headers, before its body
        // is decoded; each decodes at most what its messages need.
        tonic::service::Routes::new(InterceptedService::new(
            raft_server::RaftServer::new(self.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            require_server,
        ))
        .add_service(InterceptedService::new(
            registry_server::RegistryServer::new(self.clone())
                .max_decoding_message_size(SMALL_MESSAGE),
            require_identity,
        ))
        .add_service(InterceptedService::new(
            policy_server::PolicyServer::new(self.clone()),
            require_identity,
        ))
        .add_service(
            zones_server::ZonesServer::new(self.clone()).max_decoding_message_size(JOIN_MESSAGE),
        )
        .add_service(InterceptedService::new(
            cluster_server::ClusterServer::new(self.clone())
                .max_decoding_message_size(SMALL_MESSAGE),
            require_identity,
        ))
        .add_service(InterceptedService::new(
            certificates_server::CertificatesServer::new(self.clone())
                .max_decoding_message_size(SMALL_MESSAGE),
            require_identity,
        ))
        .add_service(InterceptedService::new(
            watch_server::WatchServer::new(self.clone()).max_decoding_message_size(SMALL_MESSAGE),
            require_identity,
        ))
        .add_service(InterceptedService::new(
            audit_server::AuditServer::new(self.clone()).max_decoding_message_size(SMALL_MESSAGE),
            require_identity,
        ))
        .add_service(InterceptedService::new(
            telemetry_server::TelemetryServer::new(self.clone())
                .max_decoding_message_size(TELEMETRY_MESSAGE)
                .max_encoding_message_size(TELEMETRY_MESSAGE),
            require_identity,
        ))
    }

    /// The trust bundle this server serves, as PEM.
    pub fn bundle_pem(&self) -> String {
        self.inner
            .bundle_pem
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Serves `pem` as the trust bundle from now on.
    pub fn set_bundle_pem(&self, pem: String) {
        *self
            .inner
            .bundle_pem
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = pem;
    }

    /// Who `id` (Raft id `raft_id`) is to this node, or why it may not
    /// speak Raft here: only current members do. A node that holds no
    /// configuration yet has just joined; it takes appends, heartbeats and
    /// snapshots from the members its join reply named, and learns the
    /// configuration from the first snapshot.
    fn raft_sender(&self, id: &SpiffeId, raft_id: u64) -> Result<RaftSender, Status> {
        match self.node().membership(raft_id) {
            Membership::Voter => Ok(RaftSender::Voter),
            Membership::Learner => Ok(RaftSender::Learner),
            Membership::Unconfigured => {
                let named = &self.inner.join_members;
                if named.is_empty() || named.contains(&raft_id) {
                    return Ok(RaftSender::ToNewMember);
                }
                Err(Status::permission_denied(format!(
                    "{id} (Raft id {raft_id}) was not a member when this server joined"
                )))
            }
            Membership::None => Err(Status::permission_denied(format!(
                "{id} (Raft id {raft_id}) is not a member of this cluster"
            ))),
        }
    }

    /// Admits one call from a caller without a certificate, or refuses it
    /// at once when too many run or started lately: such callers cost a
    /// lookup and possibly CA work, and nothing else bounds them.
    fn admit_open_call(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        {
            let mut r = self
                .inner
                .open_rate
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = std::time::Instant::now();
            let refill = now.duration_since(r.at).as_secs_f64() * OPEN_CALLS_PER_SECOND;
            r.tokens = (r.tokens + refill).min(OPEN_CALLS_BURST);
            r.at = now;
            if r.tokens < 1.0 {
                return Err(Status::resource_exhausted(
                    "too many unauthenticated calls to this server lately; retry in a second",
                ));
            }
            r.tokens -= 1.0;
        }
        self.inner
            .open_calls
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                Status::resource_exhausted(
                    "too many joins in progress on this server; retry in a moment",
                )
            })
    }

    fn td(&self) -> &TrustDomain {
        &self.inner.trust_domain
    }

    fn node(&self) -> &NodeHandle {
        &self.inner.node
    }

    fn hub(&self) -> Arc<hub::Hub> {
        self.inner
            .hub
            .get_or_init(|| hub::Hub::start(self.inner.node.clone()))
            .clone()
    }

    /// Watch streams open on this server: of the whole mesh, and scoped.
    pub fn watch_streams(&self) -> (usize, usize) {
        self.inner.hub.get().map(|h| h.streams()).unwrap_or((0, 0))
    }

    /// Proxies whose acknowledgements this server holds.
    pub fn tracked_proxies(&self) -> usize {
        self.inner.acks.len()
    }

    /// The Raft node these services front.
    pub fn node_handle(&self) -> NodeHandle {
        self.inner.node.clone()
    }

    fn leader_channel(&self, leader: u64) -> Result<tonic::transport::Channel, Status> {
        let mut chans = self
            .inner
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = chans.get(&leader) {
            return Ok(c.clone());
        }
        let c = self.inner.transport.channel(leader).map_err(to_status)?;
        chans.insert(leader, c.clone());
        Ok(c)
    }

    /// Checks that `caller` may have `cmd` done, then has it done on the
    /// leader on the caller's behalf (forwarded when another server leads;
    /// the leader checks again).
    async fn write(&self, caller: &SpiffeId, cmd: Command) -> Result<Outcome, Status> {
        authz::check(self.node().db(), caller, &cmd)?;
        let promote = matches!(
            cmd,
            Command::Member {
                change: MemberChange::Promote(_)
            }
        );
        let cmd = Command::As {
            caller: caller.to_string(),
            at_ms: node::now_ms(),
            command: Box::new(cmd),
        };
        let status = self.node().status();
        tracing::debug!(node = self.node().id(), leader = status.leader, "write");
        if status.leader == self.node().id() {
            return self.on_leader(cmd).await;
        }
        if status.leader == 0 {
            return Err(to_status(FedError::NoLeader));
        }
        let command = serde_json::to_vec(&cmd).map_err(|e| Status::internal(e.to_string()))?;
        let mut client = RaftClient::new(self.leader_channel(status.leader)?);
        let mut req = Request::new(proto::ForwardRequest { command });
        // The leader bounds the commit itself (and a promotion's wait for the
        // learner); this covers a leader that stopped answering.
        let timeout = self.inner.forward_timeout
            + if promote {
                PROMOTE_WAIT
            } else {
                Duration::ZERO
            };
        req.set_timeout(timeout);
        // Enforced here as well: grpc-timeout is only honoured by a leader
        // that answers at all, and a stalled connection must not hang us.
        let r = tokio::time::timeout(timeout, client.forward(req))
            .await
            .map_err(|_| {
                self.forward_failed(
                    status.leader,
                    Status::deadline_exceeded("no answer in time"),
                )
            })?
            .map_err(|s| self.forward_failed(status.leader, s))?
            .into_inner();
        tracing::debug!(
            node = self.node().id(),
            leader = status.leader,
            "forwarded write answered"
        );
        serde_json::from_str(&r.outcome_json)
            .map_err(|e| Status::internal(format!("leader's reply: {e}")))
    }

    /// Does an authorised `As` command here, the leader: a membership change
    /// becomes a conf change (and an audit note), anything else an entry.
    async fn on_leader(&self, cmd: Command) -> Result<Outcome, Status> {
        let Command::As {
            caller,
            at_ms,
            command,
        } = &cmd
        else {
            return Err(Status::internal("a write without its caller"));
        };
        // A renewal moves a deadline in the leader's memory: no entry.
        if let Command::Renew { key, .. } = &**command {
            return self.node().renew(caller, key).map_err(to_status);
        }
        let Command::Member { change } = &**command else {
            return self.node().propose(cmd).await.map_err(to_status);
        };
        let o = match change {
            MemberChange::AddLearner(m) => {
                self.node().conf_change(node::add_member(m, false)).await
            }
            MemberChange::Remove(id) => self.node().conf_change(node::remove_member(*id)).await,
            MemberChange::Promote(id) => {
                return self.promote_when_caught_up(*id, caller, *at_ms).await;
            }
        }
        .map_err(to_status)?;
        self.note(caller, *at_ms, command).await;
        Ok(o)
    }

    /// Records a membership change in the audit trail. The change itself is
    /// already committed; a lost note is logged, not retried.
    async fn note(&self, caller: &str, at_ms: u64, change: &Command) {
        let Some((action, detail)) = change.audit() else {
            return;
        };
        let note = Command::As {
            caller: caller.to_string(),
            at_ms,
            command: Box::new(Command::Note { action, detail }),
        };
        if let Err(e) = self.node().propose(note).await {
            tracing::warn!(error = %e, "membership change made but not recorded in the audit trail");
        }
    }

    /// What the caller sees when the leader did not answer a forwarded call.
    fn forward_failed(&self, leader: u64, s: Status) -> Status {
        match s.code() {
            // Answers from the leader itself pass through unchanged.
            tonic::Code::InvalidArgument
            | tonic::Code::PermissionDenied
            | tonic::Code::Aborted
            | tonic::Code::FailedPrecondition
            | tonic::Code::NotFound => s,
            _ => {
                let addr = self.inner.transport.address(leader).unwrap_or_default();
                Status::unavailable(format!(
                    "the leader (Raft id {leader} at {addr}) did not answer ({}); this server may be cut off from a quorum. If the write reached the leader its outcome is unknown; retry",
                    s.message()
                ))
            }
        }
    }

    /// Waits until learner `id` has replicated the log up to where the
    /// commit index stood when we started (so that counting it in the quorum
    /// cannot stall commits), then proposes it as a voter. Leader only.
    async fn promote_when_caught_up(
        &self,
        id: u64,
        caller: &str,
        at_ms: u64,
    ) -> Result<Outcome, Status> {
        let rec = state::members(self.node().db())
            .map_err(to_status)?
            .into_iter()
            .find(|m| m.id == id)
            .ok_or_else(|| Status::not_found(format!("member {id} is not known")))?;
        let target = self.node().status().commit;
        let deadline = tokio::time::Instant::now() + PROMOTE_WAIT;
        loop {
            let s = self.node().status();
            if s.leader != self.node().id() {
                return Err(Status::unavailable(
                    "leadership moved while waiting to promote; retry",
                ));
            }
            let matched = s.matched.iter().find(|(m, _)| *m == id).map(|(_, i)| *i);
            if matched.is_some_and(|m| m >= target) {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::failed_precondition(format!(
                    "member {id} has replicated up to {} of {target} after {PROMOTE_WAIT:?}; it is still catching up, promote it later",
                    matched.unwrap_or(0)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let o = self
            .node()
            .conf_change(node::add_member(&rec, true))
            .await
            .map_err(to_status)?;
        let change = Command::Member {
            change: MemberChange::Promote(id),
        };
        self.note(caller, at_ms, &change).await;
        Ok(o)
    }

    /// Asks, as this server, for its own promotion to voter: a core-zone
    /// server that joined as a learner calls this until it is a voter.
    pub async fn promote_self(&self) -> Result<Outcome, Status> {
        let id = self.node().id();
        let me = self.inner.server_id.clone();
        self.write(
            &me,
            Command::Member {
                change: MemberChange::Promote(id),
            },
        )
        .await
    }

    async fn read_barrier(&self, opts: Option<&proto::ReadOptions>) -> Result<(), Status> {
        if opts.is_some_and(|o| o.linearizable) {
            self.node().read_index().await.map_err(to_status)?;
        }
        Ok(())
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&crate::storage::Db) -> Result<T, FedError>,
    ) -> Result<(u64, T), Status> {
        let db = self.node().db();
        db.consistent(|| Ok((state::revision(db)?, f(db)?)))
            .map_err(to_status)
    }

    fn authority_for(&self, id: &SpiffeId) -> Result<trellis_ca::Authority, Status> {
        let dir = self.inner.ca_dir.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "this server holds no CA (start it with --ca-dir to sign certificates)",
            )
        })?;
        let ca = CaDir::new(dir);
        let zone = match id.role_kind() {
            // Workloads have no zone of their own: the zone serving them signs.
            Some(RoleKind::Workload) => Some(self.inner.zone.clone()),
            _ => id.role().and_then(|r| r.zone().map(str::to_string)),
        };
        let auth = match zone {
            Some(z) => match ca.zone(&z) {
                Ok(a) => Ok(a),
                Err(_) => ca.create_zone(&z, trellis_ca::DEFAULT_ZONE_TTL),
            },
            None => ca.root(),
        };
        auth.map_err(|e| Status::internal(format!("CA: {e}")))
    }
}

/// The longest certificate lifetime a caller may ask for: the CA's default.
/// A leaked key is good for at most this long after its holder is gone.
pub const MAX_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

/// Issue options for a requested lifetime in seconds (0: the default),
/// capped at [`MAX_CERT_TTL`].
fn issue_options(ttl_seconds: u64) -> IssueOptions {
    let mut opts = IssueOptions::default();
    if ttl_seconds > 0 {
        opts.ttl = Duration::from_secs(ttl_seconds).min(MAX_CERT_TTL);
    }
    opts
}

/// What a server may send over Raft.Send, by its standing here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RaftSender {
    /// A voter: anything a voter sends, but proposals (writes reach the
    /// leader through Forward, where the caller is checked; a raw proposal
    /// would skip that check).
    Voter,
    /// A learner answers the leader and asks for reads; it never campaigns,
    /// votes, proposes or leads.
    Learner,
    /// A leader feeding this node, which has just joined and holds no
    /// configuration yet: appends, heartbeats, snapshots, and answers to
    /// read-index requests (the node already knows the leader from its
    /// heartbeats and may ask before the snapshot lands).
    ToNewMember,
}

impl RaftSender {
    fn may_send(self, t: raft::eraftpb::MessageType) -> bool {
        use raft::eraftpb::MessageType as T;
        match self {
            RaftSender::Voter => t != T::MsgPropose,
            RaftSender::Learner => matches!(
                t,
                T::MsgAppendResponse | T::MsgHeartbeatResponse | T::MsgReadIndex
            ),
            RaftSender::ToNewMember => {
                matches!(
                    t,
                    T::MsgAppend | T::MsgHeartbeat | T::MsgSnapshot | T::MsgReadIndexResp
                )
            }
        }
    }
}

/// An endpoint off the wire, checked as the store checks a registration.
pub fn endpoint_from(p: proto::Endpoint) -> Result<EndpointRecord, Status> {
    let key = p
        .key
        .ok_or_else(|| Status::invalid_argument("key: missing"))?;
    let e = EndpointRecord {
        namespace: key.namespace,
        service: key.service,
        zone: key.zone,
        id: key.id,
        address: p.address,
        ports: p.ports,
        protocol: p.protocol,
        labels: p.labels.into_iter().collect(),
        healthy: p.healthy,
        lease_seconds: p.lease_seconds,
        lease_expires_ms: 0,
        owner: String::new(),
    };
    e.validate().map_err(to_status)?;
    Ok(e)
}

/// The wire form of an endpoint.
pub fn endpoint_to(e: EndpointRecord) -> proto::Endpoint {
    proto::Endpoint {
        key: Some(proto::EndpointKey {
            namespace: e.namespace,
            service: e.service,
            zone: e.zone,
            id: e.id,
        }),
        address: e.address,
        ports: e.ports,
        protocol: e.protocol,
        labels: e.labels.into_iter().collect(),
        healthy: e.healthy,
        lease_seconds: e.lease_seconds,
        lease_expires_ms: e.lease_expires_ms,
    }
}

fn key_of(k: &proto::EndpointKey) -> Result<String, Status> {
    for (field, v) in [
        ("namespace", &k.namespace),
        ("service", &k.service),
        ("zone", &k.zone),
    ] {
        state::name_field(field, v).map_err(to_status)?;
    }
    state::key_field("id", &k.id).map_err(to_status)?;
    Ok(format!("{}/{}/{}/{}", k.namespace, k.service, k.zone, k.id))
}

/// The Raft id of server `name` in `zone`: derived from the names, so a
/// server that re-joins under the same name keeps its id.
pub fn member_id(zone: &str, name: &str) -> u64 {
    let d = ring::digest::digest(&ring::digest::SHA256, format!("{zone}/{name}").as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    // Non-zero and below 2^63 (raft-rs uses 0 as "none").
    (u64::from_be_bytes(b) >> 1).max(1)
}

// === Raft ===

#[tonic::async_trait]
impl proto::raft_server::Raft for Api {
    async fn send(
        &self,
        req: Request<tonic::Streaming<proto::RaftBatch>>,
    ) -> Result<Response<proto::Empty>, Status> {
        let id = caller(&req, self.td(), "Raft.Send", SERVER)?;
        // A server speaks only for its own Raft id, derived from its name.
        let expected = match id.role() {
            Some(trellis_ca::Role::Server { zone, name }) => member_id(&zone, &name),
            _ => return Err(Status::permission_denied(format!("{id} is not a server"))),
        };
        let mut stream = req.into_inner();
        let mut learned = false;
        // A stopping server keeps hearing its peers a little longer than
        // the rest: writes it proposed are committed by their answers.
        let stopping = self.inner.stopping.clone();
        let stopped = async move {
            stopping.cancelled().await;
            tokio::time::sleep(RAFT_STREAM_GRACE).await;
        };
        tokio::pin!(stopped);
        loop {
            let batch = tokio::select! {
                () = &mut stopped => break,
                b = stream.message() => match b? {
                    Some(b) => b,
                    None => break,
                },
            };
            if batch.from != expected {
                return Err(Status::permission_denied(format!(
                    "{id} has Raft id {expected}, not {}",
                    batch.from
                )));
            }
            // Checked on every batch, not once per stream: a member removed
            // while its stream is open is cut off at its next batch.
            let sender = self.raft_sender(&id, expected)?;
            if !learned && !batch.from_address.is_empty() {
                self.inner
                    .transport
                    .learn_address(expected, &batch.from_address);
                learned = true;
            }
            let mut msgs = Vec::with_capacity(batch.messages.len());
            for m in &batch.messages {
                // Only authenticated members reach this decoder (RUSTSEC-2024-0437).
                let m = <raft::eraftpb::Message as protobuf::Message>::parse_from_bytes(m)
                    .map_err(|e| Status::invalid_argument(format!("raft message: {e}")))?;
                if m.from != expected {
                    return Err(Status::permission_denied(format!(
                        "{id} sent a message from Raft id {}",
                        m.from
                    )));
                }
                if !sender.may_send(m.get_msg_type()) {
                    return Err(Status::permission_denied(format!(
                        "{id} ({sender:?}) may not send {:?}",
                        m.get_msg_type()
                    )));
                }
                msgs.push(m);
            }
            match self.node().step(msgs) {
                Ok(()) => {}
                // Stopped between the grace's end and this batch: a clean
                // end, as at the grace.
                Err(FedError::Stopped) => break,
                Err(e) => return Err(to_status(e)),
            }
        }
        Ok(Response::new(proto::Empty {}))
    }

    async fn forward(
        &self,
        req: Request<proto::ForwardRequest>,
    ) -> Result<Response<proto::WriteReply>, Status> {
        let server = caller(&req, self.td(), "Raft.Forward", SERVER)?;
        let Some(trellis_ca::Role::Server { zone, name }) = server.role() else {
            return Err(Status::permission_denied(format!(
                "{server} is not a server"
            )));
        };
        let learner = match self.node().membership(member_id(&zone, &name)) {
            Membership::Voter => false,
            Membership::Learner => true,
            Membership::None | Membership::Unconfigured => {
                return Err(Status::permission_denied(format!(
                    "{server} is not a member of this cluster"
                )));
            }
        };
        let cmd: Command = serde_json::from_slice(&req.get_ref().command)
            .map_err(|e| Status::invalid_argument(format!("command: {e}")))?;
        // A server relays a caller's write; it does not make one of its own.
        // The leader checks the original caller again, as if it had called.
        let Command::As {
            caller: on_behalf,
            command,
            ..
        } = &cmd
        else {
            return Err(Status::permission_denied(
                "a forwarded write must carry its caller",
            ));
        };
        let who: SpiffeId = on_behalf
            .parse()
            .map_err(|e| Status::invalid_argument(format!("caller: {e}")))?;
        if who.trust_domain_str() != self.td().as_str() {
            return Err(Status::permission_denied(format!(
                "{who} is not in this trust domain"
            )));
        }
        authz::check(self.node().db(), &who, command)?;
        if learner {
            authz::learner_may_relay(self.node().db(), &zone, &who, command)?;
        }
        if !self.node().is_leader() {
            // One hop only: a forwarded write is never forwarded again, so a
            // stale view of the leader cannot make writes loop.
            return Err(Status::unavailable(
                "this server is no longer the leader; retry",
            ));
        }
        let o = self.on_leader(cmd).await?;
        Ok(reply(&o))
    }
}

// === Registry ===

#[tonic::async_trait]
impl proto::registry_server::Registry for Api {
    async fn register(
        &self,
        req: Request<proto::Endpoint>,
    ) -> Result<Response<proto::WriteReply>, Status> {
        let id = caller(&req, self.td(), "Registry.Register", REGISTRANTS)?;
        let from = req.extensions().get::<PeerInfo>().map(|p| p.addr.ip());
        let ep = endpoint_from(req.into_inner())?;
        if let Some(from) = from {
            authz::address_is_callers(&id, &ep, from)?;
        }
        let o = self
            .write(
                &id,
                Command::Register {
                    endpoint: ep,
                    now_ms: node::now_ms(),
                },
            )
            .await?;
        Ok(reply(&o))
    }

    async fn deregister(
        &self,
        req: Request<proto::EndpointKey>,
    ) -> Result<Response<proto::WriteReply>, Status> {
        let id = caller(&req, self.td(), "Registry.Deregister", REGISTRANTS)?;
        let key = key_of(req.get_ref())?;
        Ok(reply(&self.write(&id, Command::Deregister { key }).await?))
    }

    async fn renew_lease(
        &self,
        req: Request<proto::EndpointKey>,
    ) -> Result<Response<proto::WriteReply>, Status> {
        let id = caller(&req, self.td(), "Registry.RenewLease", REGISTRANTS)?;
        let key = key_of(req.get_ref())?;
        let o = self
            .write(
                &id,
                Command::Renew {
                    key,
                    now_ms: node::now_ms(),
                },
            )
            .await?;
        Ok(reply(&o))
    }

    async fn list(
        &self,
        req: Request<proto::ReadOptions>,
    ) -> Result<Response<proto::EndpointList>, Status> {
        caller(&req, self.td(), "Registry.List", ANY)?;
        self.read_barrier(Some(req.get_ref())).await?;
        let (revision, mut eps) = self.read(state::endpoints)?;
        // Renewals live in the leader's memory: the leader answers with the
        // deadlines it holds; other servers with the last registration's.
        if self.node().is_leader() {
            let (now, now_ms) = (std::time::Instant::now(), node::now_ms());
            for e in eps.iter_mut().filter(|e| e.lease_seconds > 0) {
                if let Some(d) = self.node().lease_deadline(&e.key()) {
                    e.lease_expires_ms =
                        now_ms + d.saturating_duration_since(now).as_millis() as u64;
                }
            }
        }
        Ok(Response::new(proto::EndpointList {
            revision,
            endpoints: eps.into_iter().map(endpoint_to).collect(),
        }))
    }
}

// === Policy ===

#[tonic::async_trait]
impl proto::policy_server::Policy for Api {
    async fn apply(
        &self,
        req: Request<proto::PolicyDocs>,
    ) -> Result<Response<proto::WriteReply>, Status> {
        let id = caller(&req, self.td(), "Policy.Apply", OPERATOR)?;
        let mut docs = Vec::new();
        for (i, d) in req.into_inner().docs.into_iter().enumerate() {
            let key = d.key.unwrap_or_default();
            let spec: serde_json::Value = serde_json::from_str(&d.spec_json)
                .map_err(|e| Status::invalid_argument(format!("document {}: spec: {e}", i + 1)))?;
            let rec = PolicyRecord {
                kind: key.kind,
                name: key.name,
                spec,
            };
            rec.validate().map_err(|e| {
                Status::invalid_argument(format!(
                    "document {} ({}/{}): {e}",
                    i + 1,
                    rec.kind,
                    rec.name
                ))
            })?;
            docs.push(rec);
        }
        if docs.is_empty() {
            return Err(Status::invalid_argument("docs: no documents given"));
        }
        Ok(reply(
            &self.write(&id, Command::ApplyPolicies { docs }).await?,
        ))
    }

    async fn delete(
        &self,
        req: Request<proto::PolicyKey>,
    ) -> Result<Response<proto::WriteReply>, Status> {
        let id = caller(&req, self.td(), "Policy.Delete", OPERATOR)?;
        let k = req.into_inner();
        Ok(reply(
            &self
                .write(
                    &id,
                    Command::DeletePolicy {
                        kind: k.kind,
                        name: k.name,
                    },
                )
                .await?,
        ))
    }

    async fn list(
        &self,
        req: Request<proto::ReadOptions>,
    ) -> Result<Response<proto::PolicyList>, Status> {
        caller(&req, self.td(), "Policy.List", ANY)?;
        self.read_barrier(Some(req.get_ref())).await?;
        let (revision, docs) = self.read(state::policies)?;
        Ok(Response::new(proto::PolicyList {
            revision,
            docs: docs
                .into_iter()
                .map(|d| proto::PolicyDoc {
                    key: Some(proto::PolicyKey {
                        kind: d.kind,
                        name: d.name,
                    }),
                    spec_json: d.spec.to_string(),
                })
                .collect(),
        }))
    }
}

// === Certificates ===

#[tonic::async_trait]
impl proto::certificates_server::Certificates for Api {
    async fn sign(
        &self,
        req: Request<proto::SignRequest>,
    ) -> Result<Response<proto::SignReply>, Status> {
        let id = caller(&req, self.td(), "Certificates.Sign", ANY_IDENTITY)?;
        if let Some(Role::Server { zone, name }) = id.role() {
            let raft_id = member_id(&zone, &name);
            if state::removed(self.node().db(), raft_id).map_err(to_status)? {
                return Err(Status::permission_denied(format!(
                    "{id} was removed from the cluster (Raft id {raft_id}); its certificate is not renewed"
                )));
            }
        }
        let r = req.into_inner();
        let auth = self.authority_for(&id)?;
        let opts = issue_options(r.ttl_seconds);
        let csr = rustls_pki_types::CertificateSigningRequestDer::from(r.csr);
        let chain = auth
            .sign_csr(&csr, &id, opts)
            .map_err(|e| Status::invalid_argument(format!("csr: {e}")))?;
        Ok(Response::new(proto::SignReply {
            chain_pem: trellis_ca::certs_to_pem(chain.iter()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use raft::eraftpb::MessageType as T;

    use super::RaftSender;

    #[test]
    fn each_sender_sends_only_what_its_standing_allows() {
        // Writes reach the leader through Forward, never as raw proposals.
        assert!(!RaftSender::Voter.may_send(T::MsgPropose));
        assert!(RaftSender::Voter.may_send(T::MsgRequestVote));
        assert!(RaftSender::Voter.may_send(T::MsgAppend));
        for t in [
            T::MsgAppendResponse,
            T::MsgHeartbeatResponse,
            T::MsgReadIndex,
        ] {
            assert!(RaftSender::Learner.may_send(t), "{t:?}");
        }
        for t in [
            T::MsgRequestVote,
            T::MsgAppend,
            T::MsgHeartbeat,
            T::MsgPropose,
        ] {
            assert!(!RaftSender::Learner.may_send(t), "{t:?}");
        }
        for t in [
            T::MsgAppend,
            T::MsgHeartbeat,
            T::MsgSnapshot,
            T::MsgReadIndexResp,
        ] {
            assert!(RaftSender::ToNewMember.may_send(t), "{t:?}");
        }
        for t in [T::MsgRequestVote, T::MsgPropose, T::MsgTimeoutNow] {
            assert!(!RaftSender::ToNewMember.may_send(t), "{t:?}");
        }
    }
}
