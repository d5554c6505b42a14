//! The Raft node: one tokio task owns the `RawNode` and its storage, and
//! everything else talks to it over a channel.
//!
//! Proposals carry a reply channel; the entry's context holds this node's id
//! and a sequence number, and the reply is sent when that entry is applied
//! here. Under load the task drains up to `max_batch` requests before it
//! handles the next `Ready`, so many proposals share one append and one
//! flush (batching without a timer: an idle node still answers at once).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, Entry, EntryType, Message};
use raft::{RawNode, StateRole};
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::FedError;
use crate::leases;
use crate::state::{self, Applier, Command, MemberRecord, Outcome};
use crate::storage::{Db, RaftStorage, encode_applied};

/// Sends Raft messages to peers. Implementations must not block: queue,
/// and drop when a peer is slow (Raft retransmits).
pub trait Transport: Send + Sync + 'static {
    /// Queues `msgs` for their `to` peers.
    fn send(&self, msgs: Vec<Message>);
    /// Learns a peer's address (from config or from an applied conf change).
    fn set_address(&self, id: u64, address: &str);
}

/// Knobs of the Raft node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This server's Raft id (non-zero).
    pub id: u64,
    /// Interval of one Raft tick.
    pub tick: Duration,
    /// Ticks without a heartbeat before a follower campaigns (10 = 1 s at 100 ms).
    pub election_ticks: usize,
    /// Ticks between leader heartbeats.
    pub heartbeat_ticks: usize,
    /// Compact the log once this many entries were applied since the last
    /// compaction; a peer that falls further behind catches up by snapshot.
    pub compact_after: u64,
    /// How long a proposal may wait to be committed and applied.
    pub proposal_timeout: Duration,
    /// Most requests taken from the queue before handling a `Ready`.
    pub max_batch: usize,
    /// How often the leader looks for expired leases.
    pub lease_check: Duration,
    /// Members whose addresses come from configuration (this server and its
    /// bootstrap peers). A leader records any the store lacks, so that
    /// servers joining later learn where the first voters are.
    pub members: Vec<MemberRecord>,
}

/// A snapshot of the node's view, published after every `Ready`.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// This node's id.
    pub id: u64,
    /// Known leader, 0 if none.
    pub leader: u64,
    /// Current term.
    pub term: u64,
    /// Commit index.
    pub commit: u64,
    /// Applied index.
    pub applied: u64,
    /// Store revision.
    pub revision: u64,
    /// Voter ids.
    pub voters: Vec<u64>,
    /// Learner ids.
    pub learners: Vec<u64>,
    /// False once the node task has stopped.
    pub running: bool,
    /// Snapshots from the leader installed since start.
    pub snapshots_installed: u64,
    /// Index of the last compaction or snapshot.
    pub snapshot_index: u64,
    /// On the leader: each member's highest index known to be replicated.
    pub matched: Vec<(u64, u64)>,
}

/// Where a Raft id stands in a node's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    /// A voter.
    Voter,
    /// A learner (non-voting).
    Learner,
    /// Not a member.
    None,
    /// This node holds no configuration yet (it has just joined).
    Unconfigured,
}

/// A cheap, clonable way to talk to the node task.
#[derive(Clone)]
pub struct NodeHandle {
    id: u64,
    tx: mpsc::Sender<Request>,
    status: watch::Receiver<Status>,
    db: Db,
    timeout: Duration,
    leases: Arc<std::sync::Mutex<leases::Table>>,
}

type Reply = oneshot::Sender<Result<Outcome, FedError>>;

enum Request {
    Propose(Command, Reply),
    ConfChange(ConfChange, Reply),
    Step(Vec<Message>),
    ReadIndex(oneshot::Sender<Result<(), FedError>>),
    Unreachable(u64),
    Campaign,
    Stop,
}

struct Pending {
    reply: Reply,
    deadline: Instant,
}

struct Node {
    raw: RawNode<RaftStorage>,
    cfg: NodeConfig,
    transport: Arc<dyn Transport>,
    rx: mpsc::Receiver<Request>,
    status: watch::Sender<Status>,
    seq: u64,
    pending: HashMap<u64, Pending>,
    reads_asked: HashMap<u64, (oneshot::Sender<Result<(), FedError>>, Instant)>,
    reads_ready: Vec<(u64, oneshot::Sender<Result<(), FedError>>)>,
    applied: u64,
    leader: u64,
    term: u64,
    last_lease_check: Instant,
    /// When the last lease-expiry proposal went out and is not yet applied.
    /// It expires with the proposal timeout: a proposal lost to a leader
    /// change must not stop this node from ever expiring leases again.
    expiry_in_flight: Option<Instant>,
    snapshots_installed: u64,
    members_recorded_term: u64,
    /// When each peer was last heard from (any Raft message): a leader that
    /// has not heard from any server of an edge zone for [`CUT_OFF_AFTER`]
    /// treats the zone as cut off and keeps its endpoints.
    last_heard: HashMap<u64, Instant>,
    /// The edge zones the last lease check found cut off.
    spared_zones: Vec<String>,
    /// Endpoint leases, while this node leads (see `crate::leases`).
    leases: Arc<std::sync::Mutex<leases::Table>>,
    /// The term whose leases the table holds (0: none).
    leases_term: u64,
}

/// How long without a message from every server of an edge zone before the
/// zone counts as cut off (heartbeats come every few hundred ms).
const CUT_OFF_AFTER: Duration = Duration::from_secs(3);

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            id: 1,
            tick: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 2,
            compact_after: 10_000,
            proposal_timeout: Duration::from_secs(5),
            max_batch: 512,
            lease_check: Duration::from_secs(1),
            members: Vec::new(),
        }
    }
}

/// Unix milliseconds now, for commands that carry the proposer's clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn context(id: u64, seq: u64) -> Vec<u8> {
    let mut c = id.to_be_bytes().to_vec();
    c.extend_from_slice(&seq.to_be_bytes());
    c
}

fn parse_context(c: &[u8]) -> Option<(u64, u64)> {
    let id = u64::from_be_bytes(c.get(..8)?.try_into().ok()?);
    let seq = u64::from_be_bytes(c.get(8..16)?.try_into().ok()?);
    Some((id, seq))
}

/// Starts the node task on the current runtime. `bootstrap` makes a fresh
/// data directory the first configuration with `voters`; it is refused on a
/// directory that already holds a cluster.
pub fn start(
    cfg: NodeConfig,
    mut storage: RaftStorage,
    bootstrap: Option<Vec<u64>>,
    transport: Arc<dyn Transport>,
) -> Result<NodeHandle, FedError> {
    if let Some(voters) = bootstrap
        && storage.conf_state().voters.is_empty()
        && storage.conf_state().learners.is_empty()
    {
        storage.bootstrap(voters)?;
    }
    let db = storage.db().clone();
    for m in state::members(&db)? {
        transport.set_address(m.id, &m.address);
    }
    let (applied, _) = storage.applied()?;
    let raft_cfg = raft::Config {
        id: cfg.id,
        election_tick: cfg.election_ticks,
        heartbeat_tick: cfg.heartbeat_ticks,
        applied,
        // A leader that loses its quorum steps down, so a partitioned old
        // leader stops accepting writes it can never commit.
        check_quorum: true,
        // Pre-vote keeps a rejoining, partitioned node from bumping the term
        // and deposing a healthy leader.
        pre_vote: true,
        max_size_per_msg: 1024 * 1024,
        max_inflight_msgs: 256,
        ..Default::default()
    };
    raft_cfg.validate()?;
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let raw = RawNode::new(&raft_cfg, storage, &logger)?;
    let (tx, rx) = mpsc::channel(4096);
    let revision = state::revision(&db)?;
    let (status_tx, status_rx) = watch::channel(Status {
        id: cfg.id,
        applied,
        revision,
        running: true,
        ..Default::default()
    });
    let leases = Arc::new(std::sync::Mutex::new(leases::Table::default()));
    let handle = NodeHandle {
        id: cfg.id,
        tx,
        status: status_rx,
        db,
        timeout: cfg.proposal_timeout,
        leases: leases.clone(),
    };
    let node = Node {
        raw,
        cfg,
        transport,
        rx,
        status: status_tx,
        seq: 0,
        pending: HashMap::new(),
        reads_asked: HashMap::new(),
        reads_ready: Vec::new(),
        applied,
        leader: 0,
        term: 0,
        last_lease_check: Instant::now(),
        expiry_in_flight: None,
        snapshots_installed: 0,
        members_recorded_term: 0,
        last_heard: HashMap::new(),
        leases,
        leases_term: 0,
        spared_zones: Vec::new(),
    };
    tokio::spawn(node.run());
    Ok(handle)
}

// === impl NodeHandle ===

impl NodeHandle {
    /// This node's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// How long a proposal may take before it is reported as timed out.
    pub fn proposal_timeout(&self) -> Duration {
        self.timeout
    }

    /// The store, for local reads.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The latest status.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// Where `id` stands in this node's configuration, read without cloning
    /// the status (the Raft service asks on every batch).
    pub fn membership(&self, id: u64) -> Membership {
        let s = self.status.borrow();
        if s.voters.contains(&id) {
            Membership::Voter
        } else if s.learners.contains(&id) {
            Membership::Learner
        } else if s.voters.is_empty() && s.learners.is_empty() {
            Membership::Unconfigured
        } else {
            Membership::None
        }
    }

    /// A receiver that changes after every `Ready`.
    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Renews an endpoint's lease here, the leader, without a write: the
    /// endpoint must exist (with a lease) and `caller` must own it or be an
    /// operator. Answers the revision of the store it was checked against.
    pub fn renew(&self, caller: &str, key: &str) -> Result<Outcome, FedError> {
        if !self.is_leader() {
            return Err(FedError::LeaderChanged);
        }
        let ep = state::endpoint(&self.db, key)?.ok_or_else(|| {
            FedError::Refused(format!(
                "endpoint {key} is not registered (its lease may have expired; register it again)"
            ))
        })?;
        state::Applier::may_change(key, &ep.owner, Some(&caller.to_string()))?;
        if ep.lease_seconds > 0 {
            let now = Instant::now();
            let mut t = self.leases.lock().unwrap_or_else(|e| e.into_inner());
            // Its expiry was proposed, and would remove it after this
            // renewal said yes. The agent registers again.
            if t.expiring(key) {
                return Err(FedError::Refused(format!(
                    "endpoint {key}: its lease ended and its removal is under way (register it again)"
                )));
            }
            t.touch(key, Duration::from_secs(ep.lease_seconds), now);
        }
        Ok(Outcome {
            revision: self.status().revision,
            token: None,
        })
    }

    /// When an endpoint's lease ends, as this node (the leader) holds it.
    pub fn lease_deadline(&self, key: &str) -> Option<Instant> {
        self.leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .deadline(key)
    }

    /// Whether this node believes it leads.
    pub fn is_leader(&self) -> bool {
        let s = self.status.borrow();
        s.running && s.leader == self.id
    }

    /// Proposes `cmd` here (this node must lead) and waits until it is
    /// committed and applied.
    pub async fn propose(&self, cmd: Command) -> Result<Outcome, FedError> {
        let (tx, rx) = oneshot::channel();
        self.send(Request::Propose(cmd, tx)).await?;
        self.wait(rx).await
    }

    /// Proposes a membership change and waits until it is applied.
    pub async fn conf_change(&self, cc: ConfChange) -> Result<Outcome, FedError> {
        let (tx, rx) = oneshot::channel();
        self.send(Request::ConfChange(cc, tx)).await?;
        self.wait(rx).await
    }

    /// Waits until this replica has applied everything committed before the
    /// call, as confirmed by the leader's quorum (Raft ReadIndex).
    pub async fn read_index(&self) -> Result<(), FedError> {
        if self.status().leader == 0 {
            return Err(FedError::NoLeader);
        }
        let (tx, rx) = oneshot::channel();
        self.send(Request::ReadIndex(tx)).await?;
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(FedError::Stopped),
            Err(_) => Err(FedError::Timeout(self.timeout)),
        }
    }

    /// Hands messages from a peer to Raft. Never waits: when the node is
    /// overloaded the messages are dropped, and Raft sends them again.
    pub fn step(&self, msgs: Vec<Message>) -> Result<(), FedError> {
        match self.tx.try_send(Request::Step(msgs)) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(FedError::Stopped),
        }
    }

    /// Tells Raft a peer could not be reached (the transport's dial failed).
    pub fn report_unreachable(&self, id: u64) {
        let _ = self.tx.try_send(Request::Unreachable(id));
    }

    /// Stops the node task (what it persisted stays; nothing more is acknowledged).
    pub async fn stop(&self) {
        let _ = self.send(Request::Stop).await;
        let mut rx = self.status.clone();
        let _ = rx.wait_for(|s| !s.running).await;
    }

    /// Asks this node to start an election now (tests, leadership transfer).
    pub async fn campaign(&self) -> Result<(), FedError> {
        self.send(Request::Campaign).await
    }

    async fn send(&self, r: Request) -> Result<(), FedError> {
        self.tx.send(r).await.map_err(|_| FedError::Stopped)
    }

    async fn wait(
        &self,
        rx: oneshot::Receiver<Result<Outcome, FedError>>,
    ) -> Result<Outcome, FedError> {
        // The node enforces the deadline itself; this one only guards against
        // a node that stopped without answering.
        match tokio::time::timeout(self.timeout + Duration::from_secs(1), rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(FedError::Stopped),
            Err(_) => Err(FedError::Timeout(self.timeout)),
        }
    }

    /// Waits until the applied store revision reaches `rev` or the node stops.
    pub async fn wait_revision(&self, rev: u64) -> Result<(), FedError> {
        let mut rx = self.status.clone();
        rx.wait_for(|s| s.revision >= rev || !s.running)
            .await
            .map_err(|_| FedError::Stopped)?;
        Ok(())
    }
}

// === impl Node ===

impl Node {
    async fn run(mut self) {
        // Whatever ends this task, a panic included, waiters must learn that
        // the node stopped rather than wait forever.
        let _stopped = StoppedOnDrop(self.status.clone());
        let mut ticker = tokio::time::interval(self.cfg.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    self.raw.tick();
                    self.on_tick();
                }
                req = self.rx.recv() => {
                    let Some(req) = req else { break };
                    if matches!(req, Request::Stop) {
                        break;
                    }
                    self.handle(req);
                    // Batching: take whatever else is already queued so that
                    // it all goes through one Ready (one append, one flush).
                    // A Stop among them stops the node like one on its own;
                    // handled as a request it used to be dropped, and the
                    // stopper waited forever (the tests' occasional hang).
                    let mut stop = false;
                    for _ in 1..self.cfg.max_batch {
                        match self.rx.try_recv() {
                            Ok(Request::Stop) => {
                                stop = true;
                                break;
                            }
                            Ok(req) => self.handle(req),
                            Err(_) => break,
                        }
                    }
                    if stop {
                        let _ = self.on_ready();
                        break;
                    }
                }
            }
            if let Err(e) = self.on_ready() {
                // A failed persist or apply leaves us unable to promise
                // durability; stop rather than acknowledge anything more.
                tracing::error!(error = %e, "raft node stopped: storage failed");
                break;
            }
        }
        // A write still waiting may yet be committed by the next leader:
        // its outcome is unknown, not refused.
        for (_, p) in self.pending.drain() {
            let _ = p.reply.send(Err(FedError::LeaderChanged));
        }
        // Spares the next start a replay; a failure only makes it longer.
        if let Err(e) = self.raw.store().db().checkpoint() {
            tracing::warn!(error = %e, "could not move the last applied writes into the store; the next start replays them from the log");
        }
        self.status.send_modify(|s| s.running = false);
    }

    fn handle(&mut self, req: Request) {
        match req {
            Request::Propose(cmd, reply) => {
                let data = match serde_json::to_vec(&cmd) {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = reply.send(Err(FedError::Refused(e.to_string())));
                        return;
                    }
                };
                self.seq += 1;
                let ctx = context(self.cfg.id, self.seq);
                match self.raw.propose(ctx, data) {
                    Ok(()) => self.track(reply),
                    Err(raft::Error::ProposalDropped) => {
                        let _ = reply.send(Err(FedError::NoLeader));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            Request::ConfChange(cc, reply) => {
                self.seq += 1;
                let ctx = context(self.cfg.id, self.seq);
                match self.raw.propose_conf_change(ctx, cc) {
                    Ok(()) => self.track(reply),
                    Err(raft::Error::ProposalDropped) => {
                        let _ = reply.send(Err(FedError::NoLeader));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            Request::Step(msgs) => {
                let now = Instant::now();
                for m in msgs {
                    self.last_heard.insert(m.from, now);
                    // Messages for another id or from a stale term are
                    // refused by raft-rs; that is routine, not an error.
                    if let Err(e) = self.raw.step(m) {
                        tracing::debug!(error = %e, "raft step refused a message");
                    }
                }
            }
            Request::ReadIndex(reply) => {
                self.seq += 1;
                self.reads_asked.insert(
                    self.seq,
                    (reply, Instant::now() + self.cfg.proposal_timeout),
                );
                self.raw.read_index(self.seq.to_be_bytes().to_vec());
            }
            Request::Unreachable(id) => self.raw.report_unreachable(id),
            // Handled by the loop before dispatch.
            // Taken by the run loop before it gets here.
            Request::Stop => {}
            Request::Campaign => {
                if let Err(e) = self.raw.campaign() {
                    tracing::warn!(error = %e, "campaign refused");
                }
            }
        }
    }

    fn track(&mut self, reply: Reply) {
        self.pending.insert(
            self.seq,
            Pending {
                reply,
                deadline: Instant::now() + self.cfg.proposal_timeout,
            },
        );
    }

    fn on_tick(&mut self) {
        // Applies reach sled at least once a tick (see `Db::checkpoint`).
        self.raw.store().db().checkpoint_in_background();
        let now = Instant::now();
        let timeout = self.cfg.proposal_timeout;
        self.pending.retain(|_, p| {
            if p.deadline > now {
                return true;
            }
            // The reply channel may be gone; nothing to do then.
            let (tx, _) = oneshot::channel();
            let reply = std::mem::replace(&mut p.reply, tx);
            let _ = reply.send(Err(FedError::Timeout(timeout)));
            false
        });
        let expired: Vec<u64> = self
            .reads_asked
            .iter()
            .filter(|(_, (_, deadline))| *deadline <= now)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in expired {
            if let Some((reply, _)) = self.reads_asked.remove(&seq) {
                let _ = reply.send(Err(FedError::Timeout(timeout)));
            }
        }

        if self.raw.raft.state == StateRole::Leader
            && self.members_recorded_term != self.raw.raft.term
        {
            self.members_recorded_term = self.raw.raft.term;
            self.record_members();
        }
        let leading = self.raw.raft.state == StateRole::Leader;
        if leading && self.leases_term != self.raw.raft.term {
            self.take_over_leases(now);
        } else if !leading && self.leases_term != 0 {
            self.leases_term = 0;
            self.spared_zones.clear();
            self.leases
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
        }
        if leading
            && self
                .expiry_in_flight
                .is_none_or(|at| now.duration_since(at) >= self.cfg.proposal_timeout)
            && now.duration_since(self.last_lease_check) >= self.cfg.lease_check
        {
            self.last_lease_check = now;
            self.propose_expiry(now);
        }
    }

    /// This node leads a new term: every leased endpoint starts a whole
    /// lease now (their renewals went to the old leader until now).
    fn take_over_leases(&mut self, now: Instant) {
        let eps = match state::endpoints(self.raw.store().db()) {
            Ok(eps) => eps,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read endpoints to take over their leases");
                return;
            }
        };
        let mut t = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        t.clear();
        for e in eps.iter().filter(|e| e.lease_seconds > 0) {
            t.touch(&e.key(), Duration::from_secs(e.lease_seconds), now);
        }
        tracing::debug!(
            leases = t.len(),
            term = self.raw.raft.term,
            "took over the endpoint leases"
        );
        self.leases_term = self.raw.raft.term;
    }

    /// Proposes a `SetMember` for each configured member the store lacks.
    fn record_members(&mut self) {
        let known = match state::members(self.raw.store().db()) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read members");
                return;
            }
        };
        for m in self.cfg.members.clone() {
            if known.iter().any(|k| k == &m) {
                continue;
            }
            let Ok(data) = serde_json::to_vec(&Command::SetMember { member: m }) else {
                continue;
            };
            let _ = self.raw.propose(context(self.cfg.id, 0), data);
        }
    }

    /// The leader alone decides that leases ran out, by its clock, and
    /// replicates the decision; followers never expire anything themselves.
    fn propose_expiry(&mut self, now: Instant) {
        let spare_zones = self.cut_off_edge_zones();
        let db = self.raw.store().db().clone();
        let mut keys = {
            let mut t = self.leases.lock().unwrap_or_else(|e| e.into_inner());
            // A zone back from a cut: a lease spared until now may end
            // before its agent's first renewal gets through (seconds, as
            // each agent works through servers that timed out), and its
            // names would vanish from the edge until it registered again.
            for healed in self
                .spared_zones
                .iter()
                .filter(|z| !spare_zones.contains(z))
            {
                tracing::info!(zone = %healed, "edge zone reachable again: its endpoints get a whole lease");
                t.restart_zone(healed, now);
            }
            t.expired(now, &spare_zones)
        };
        if spare_zones != self.spared_zones {
            if !spare_zones.is_empty() {
                tracing::info!(zones = ?spare_zones, "edge zones cut off: their endpoints are kept");
            }
            self.spared_zones = spare_zones;
        }
        // Endpoints gone by another way (a zone removed) leave the table.
        keys.retain(|k| match state::endpoint(&db, k) {
            Ok(Some(_)) => true,
            Ok(None) => {
                self.leases
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(k);
                false
            }
            Err(_) => true,
        });
        if keys.is_empty() {
            return;
        }
        tracing::debug!(endpoints = keys.len(), "leases ended");
        let cmd = Command::ExpireEndpoints {
            keys,
            now_ms: now_ms(),
        };
        let Ok(data) = serde_json::to_vec(&cmd) else {
            return;
        };
        // No reply wanted: context carries our id and sequence 0.
        if self.raw.propose(context(self.cfg.id, 0), data).is_ok() {
            self.expiry_in_flight = Some(Instant::now());
        }
    }

    /// Edge zones none of whose servers this leader has heard from lately.
    /// Their agents cannot renew through the core while cut off, yet keep
    /// serving each other on their last-known state; expiring them here
    /// would, once the zone heals, delete their names until each agent
    /// registers again. A zone with no server at all is never spared.
    fn cut_off_edge_zones(&self) -> Vec<String> {
        let db = self.raw.store().db();
        let (Ok(zones), Ok(members)) = (state::zones(db), state::members(db)) else {
            return Vec::new();
        };
        let now = Instant::now();
        zones
            .into_iter()
            .filter(|z| z.role == state::ZoneRole::Edge)
            .filter(|z| {
                let mut servers = members.iter().filter(|m| m.zone == z.name).peekable();
                servers.peek().is_some()
                    && servers.all(|m| {
                        m.id != self.cfg.id
                            && self
                                .last_heard
                                .get(&m.id)
                                .is_none_or(|t| now.duration_since(*t) > CUT_OFF_AFTER)
                    })
            })
            .map(|z| z.name)
            .collect()
    }

    /// One pass of the Ready loop, in raft-rs's documented order.
    fn on_ready(&mut self) -> Result<(), FedError> {
        if !self.raw.has_ready() {
            self.finish_reads();
            return Ok(());
        }
        let mut ready = self.raw.ready();

        // 1. Leader messages go out before persisting: the leader may send
        //    entries while it writes them itself (Raft thesis 10.2.1).
        if !ready.messages().is_empty() {
            self.transport.send(ready.take_messages());
        }

        // What follows waits on the disk when the Ready carries entries or
        // a term or vote: a log fdatasync, and sled reads, which wait
        // behind a checkpoint's batch (sled's own lock). On a runtime
        // worker that stalls every task queued behind this one (with two
        // cores, half the API); off the worker, they run meanwhile, as Go's
        // scheduler does for a goroutine in a syscall.
        let touches_disk = !ready.entries().is_empty()
            || !ready.committed_entries().is_empty()
            || !ready.snapshot().is_empty()
            || ready.must_sync();
        if touches_disk {
            off_worker(|| self.persist_and_apply(ready))
        } else {
            self.persist_and_apply(ready)
        }
    }

    /// Steps 2 to 11 of [`Node::on_ready`].
    fn persist_and_apply(&mut self, mut ready: raft::Ready) -> Result<(), FedError> {
        // 2. A snapshot from the leader replaces the state machine and the log
        //    before any entry that follows it can apply.
        if !ready.snapshot().is_empty() {
            let snap = ready.snapshot().clone();
            self.raw.mut_store().apply_snapshot(&snap)?;
            self.applied = snap.get_metadata().index;
            let db = self.raw.store().db().clone();
            for m in state::members(&db)? {
                self.transport.set_address(m.id, &m.address);
            }
            self.snapshots_installed += 1;
            tracing::info!(index = self.applied, "installed snapshot");
        }

        // 3. Read states: ReadIndex answers, released once applied catches up.
        for rs in ready.take_read_states() {
            self.read_state(rs.index, &rs.request_ctx);
        }

        // 4. Committed entries can be applied now (raft-rs hands out only
        //    entries our own log already holds durably).
        let committed = ready.take_committed_entries();
        self.apply(committed)?;

        // 5 and 6. Persist new entries and the hard state (term, vote,
        //    commit) in one log append and one fdatasync, before any message
        //    that depends on them leaves (a vote, an append response).
        if !ready.entries().is_empty() || ready.hs().is_some() {
            let hs = ready.hs().cloned();
            self.raw.mut_store().persist(ready.entries(), hs.as_ref())?;
        }

        // 7. Messages that must follow persistence (votes, append responses).
        if !ready.persisted_messages().is_empty() {
            self.transport.send(ready.take_persisted_messages());
        }

        // 8. Tell raft-rs everything above is done; it hands back what became
        //    committed meanwhile.
        let mut light = self.raw.advance(ready);

        // 9. Record the new commit index (written with the next append).
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit)?;
        }

        // 10. Send and apply what the light ready carries.
        self.transport.send(light.take_messages());
        self.apply(light.take_committed_entries())?;

        // 11. Report applying finished.
        self.raw.advance_apply();

        self.after_apply()?;
        Ok(())
    }

    fn read_state(&mut self, index: u64, ctx: &[u8]) {
        let Ok(seq) = <[u8; 8]>::try_from(ctx).map(u64::from_be_bytes) else {
            return;
        };
        if let Some((reply, _)) = self.reads_asked.remove(&seq) {
            self.reads_ready.push((index, reply));
        }
    }

    fn finish_reads(&mut self) {
        let applied = self.applied;
        let mut i = 0;
        while i < self.reads_ready.len() {
            if self.reads_ready[i].0 <= applied {
                let (_, reply) = self.reads_ready.swap_remove(i);
                let _ = reply.send(Ok(()));
            } else {
                i += 1;
            }
        }
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), FedError> {
        let entries: Vec<Entry> = entries
            .into_iter()
            .filter(|e| e.index > self.applied)
            .collect();
        let Some(last) = entries.last() else {
            return Ok(());
        };
        let (last_index, last_term) = (last.index, last.term);
        let db = self.raw.store().db().clone();
        let mut applier = Applier::new(&db)?;
        let mut replies = Vec::new();
        let mut conf = None;
        // Commands that start or end leases, for the table once applied.
        let mut touched: Vec<Command> = Vec::new();
        for e in &entries {
            let result = match e.get_entry_type() {
                // The empty entry a new leader appends to commit its term.
                EntryType::EntryNormal if e.data.is_empty() => continue,
                EntryType::EntryNormal => match serde_json::from_slice::<Command>(&e.data) {
                    Ok(cmd) => {
                        if matches!(
                            cmd,
                            Command::ExpireLeases { .. } | Command::ExpireEndpoints { .. }
                        ) {
                            self.expiry_in_flight = None;
                        }
                        if let Command::SetMember { member } = &cmd {
                            self.transport.set_address(member.id, &member.address);
                        }
                        let r = applier.apply(&cmd);
                        // Only a leader keeps leases, and only what applied
                        // moves them: a refused Deregister of another's
                        // endpoint must not end that endpoint's lease.
                        if self.leases_term != 0 && r.is_ok() && moves_leases(&cmd) {
                            touched.push(cmd);
                        }
                        r
                    }
                    Err(err) => Err(FedError::Decode {
                        what: "log entry command",
                        reason: err.to_string(),
                    }),
                },
                EntryType::EntryConfChange => {
                    let cc =
                        ConfChange::parse_from_bytes(&e.data).map_err(|err| FedError::Decode {
                            what: "conf change",
                            reason: err.to_string(),
                        })?;
                    let member: Option<MemberRecord> = serde_json::from_slice(&cc.context).ok();
                    match self.raw.apply_conf_change(&cc) {
                        Ok(cs) => {
                            match cc.get_change_type() {
                                ConfChangeType::RemoveNode => applier.member(cc.node_id, None),
                                _ => {
                                    if let Some(m) = &member {
                                        self.transport.set_address(m.id, &m.address);
                                        applier.member(cc.node_id, Some(m));
                                    }
                                }
                            }
                            conf = Some(cs);
                            Ok(Outcome {
                                revision: applier.revision(),
                                token: None,
                            })
                        }
                        Err(err) => Err(FedError::Raft(err)),
                    }
                }
                EntryType::EntryConfChangeV2 => Err(FedError::Refused(
                    "joint-consensus conf changes are not used by Trellis".into(),
                )),
            };
            if let Some((id, seq)) = parse_context(&e.context)
                && id == self.cfg.id
                && seq != 0
            {
                replies.push((seq, result));
            }
        }
        let mut writes = applier.into_writes();
        writes.insert(
            crate::storage::K_APPLIED.to_vec(),
            Some(encode_applied(last_index, last_term)),
        );
        if let Some(cs) = &conf {
            self.raw.mut_store().stage_conf_state(&mut writes, cs);
        }
        db.write_applied(writes)?;
        if let Some(cs) = conf {
            self.raw.mut_store().conf_state_written(cs);
        }
        self.applied = last_index;
        if self.leases_term != 0 {
            self.track_leases(&db, touched);
        }
        // Only now, with the entries durable in the log and applied, are
        // writes acknowledged.
        for (seq, result) in replies {
            if let Some(p) = self.pending.remove(&seq) {
                let _ = p.reply.send(result);
            }
        }
        Ok(())
    }

    /// Keeps the leader's lease table true to what was just applied
    /// (commands for which [`moves_leases`] holds):
    /// registrations start a lease, deregistrations and expiries end one.
    fn track_leases(&mut self, db: &Db, applied: Vec<Command>) {
        let now = Instant::now();
        let mut t = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        for cmd in applied {
            let cmd = match cmd {
                Command::As { command, .. } => *command,
                c => c,
            };
            match cmd {
                Command::Register { endpoint, .. } if endpoint.lease_seconds > 0 => {
                    t.touch(
                        &endpoint.key(),
                        Duration::from_secs(endpoint.lease_seconds),
                        now,
                    );
                }
                Command::Register { endpoint, .. } => t.remove(&endpoint.key()),
                Command::Deregister { key } => t.remove(&key),
                Command::ExpireEndpoints { keys, .. } => {
                    for k in keys {
                        if matches!(state::endpoint(db, &k), Ok(None)) {
                            t.remove(&k);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    fn after_apply(&mut self) -> Result<(), FedError> {
        self.finish_reads();
        let snap_index = self.raw.store().snapshot_index();
        // A data directory bootstrapped before configurations lived in a
        // snapshot has its first voters at index 0, in no entry: compacting
        // once makes new members catch up by snapshot, which carries them.
        let legacy_bootstrap = snap_index == 0 && self.applied > 0;
        if legacy_bootstrap || self.applied >= snap_index + self.cfg.compact_after {
            let applied = self.applied;
            self.raw.mut_store().compact(applied, applied)?;
            tracing::debug!(index = applied, "compacted the raft log");
        }
        let leader = self.raw.raft.leader_id;
        let term = self.raw.raft.term;
        if (leader != self.leader || term != self.term) && !self.pending.is_empty() {
            // A proposal made under another leader or term may have been
            // overwritten; say so rather than let the caller wait it out.
            if self.leader == self.cfg.id && leader != self.cfg.id {
                for (_, p) in self.pending.drain() {
                    let _ = p.reply.send(Err(FedError::LeaderChanged));
                }
            }
        }
        self.leader = leader;
        self.term = term;
        let revision = state::revision(self.raw.store().db())?;
        let cs = self.raw.store().conf_state().clone();
        let commit = self.raw.raft.raft_log.committed;
        let applied = self.applied;
        let snapshots_installed = self.snapshots_installed;
        let snapshot_index = self.raw.store().snapshot_index();
        let matched: Vec<(u64, u64)> = if leader == self.cfg.id {
            self.raw
                .raft
                .prs()
                .iter()
                .map(|(id, pr)| (*id, pr.matched))
                .collect()
        } else {
            Vec::new()
        };
        self.status.send_if_modified(|s| {
            let next = Status {
                id: s.id,
                leader,
                term,
                commit,
                applied,
                revision,
                voters: cs.voters.clone(),
                learners: cs.learners.clone(),
                running: true,
                snapshots_installed,
                snapshot_index,
                // Replication progress alone does not wake watchers; readers
                // see it with the next change.
                matched,
            };
            let changed = s.leader != next.leader
                || s.term != next.term
                || s.commit != next.commit
                || s.applied != next.applied
                || s.revision != next.revision
                || s.voters != next.voters
                || s.learners != next.learners
                || s.snapshot_index != next.snapshot_index;
            *s = next;
            changed
        });
        Ok(())
    }
}

/// Runs `f`, which may block on the disk, without holding a runtime
/// worker: on a multi-thread runtime the worker's queued tasks move to
/// another thread meanwhile (`block_in_place`). On a current-thread
/// runtime (most tests) it just runs.
fn off_worker<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

struct StoppedOnDrop(watch::Sender<Status>);

impl Drop for StoppedOnDrop {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!("raft node task panicked");
        }
        self.0.send_modify(|s| s.running = false);
    }
}

/// A conf change adding `member` as a learner (or voter).
pub fn add_member(member: &MemberRecord, voter: bool) -> ConfChange {
    let mut cc = ConfChange::default();
    cc.set_change_type(if voter {
        ConfChangeType::AddNode
    } else {
        ConfChangeType::AddLearnerNode
    });
    cc.node_id = member.id;
    cc.context = serde_json::to_vec(member).unwrap_or_default().into();
    cc
}

/// A conf change removing node `id`.
pub fn remove_member(id: u64) -> ConfChange {
    let mut cc = ConfChange::default();
    cc.set_change_type(ConfChangeType::RemoveNode);
    cc.node_id = id;
    cc
}

/// Whether applying `cmd` starts or ends a lease (see `Node::track_leases`).
fn moves_leases(cmd: &Command) -> bool {
    match cmd {
        Command::As { command, .. } => moves_leases(command),
        Command::Register { .. } | Command::Deregister { .. } | Command::ExpireEndpoints { .. } => {
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests;
