//! One reader of the change history per server, handing each change to the
//! watch streams it concerns.
//!
//! Each stream used to read the history itself whenever the revision moved
//! and turn every event into its message on its own: with N proxies, one
//! change cost N reads of the store and N serialisations, scoped or not.
//! The hub reads each change once, serialises it once, and finds the
//! streams it concerns by index (namespace, service), so a change costs in
//! proportion to the proxies it concerns. The hub never waits for a stream:
//! one whose queue is full is dropped from the hub and catches up on its
//! own, as a reconnecting proxy would: from the latest changes, which the
//! hub keeps for them (see `Recent`), or from the stored history.
//!
//! A stream that said its zone is also scoped by the `Export` documents
//! (see `crate::scope`). The hub keeps the documents as of the last change
//! it handed out, and applies each `Export` change in order; right behind
//! it, at its revision, each such stream gets the endpoints it may now
//! reach and the deletion of those it no longer may, so it never needs a
//! snapshot for it. (Those endpoints are read when the change is handed
//! out, maybe newer than it: a later change of them follows anyway.)

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::node::NodeHandle;
use crate::policy::Exports;
use crate::proto;
use crate::scope::{Scope, Topic};
use crate::state::{self, PolicyRecord, SYSTEM_NAMESPACE};

/// Changes handed to one stream at once.
pub(crate) type Batch = Arc<Vec<Arc<proto::WatchEvent>>>;

/// Batches queued for one stream before the hub gives up on it.
const QUEUE: usize = 64;
/// Least time between two reads of the history: under a stream of writes,
/// changes are handed out in batches rather than one wake-up per stream
/// per write.
const PASS_EVERY: Duration = Duration::from_millis(10);
/// Most events one read of the history takes.
const READ_LIMIT: usize = 4096;
/// Most changes [`Recent`] keeps, and most bytes they take (see
/// [`size_of`]): 10 s of a churn of 500 endpoint changes/s fit.
const RECENT_EVENTS: usize = 8192;
const RECENT_BYTES: usize = 4 << 20;

/// The hub of one server.
pub(crate) struct Hub {
    subs: Mutex<Subs>,
    /// The highest revision handed to every stream that wants it.
    dispatched: watch::Sender<u64>,
}

#[derive(Default)]
struct Subs {
    next: u64,
    /// Streams of the whole mesh.
    all: HashMap<u64, mpsc::Sender<Batch>>,
    /// Streams that named namespaces or services.
    scoped: HashMap<u64, mpsc::Sender<Batch>>,
    by_namespace: HashMap<String, HashSet<u64>>,
    /// By `namespace/service`, for services outside the stream's namespaces.
    by_service: HashMap<String, HashSet<u64>>,
    /// Streams of every namespace scoped by exports only, by zone.
    wide: HashMap<String, HashMap<u64, mpsc::Sender<Batch>>>,
    /// The scope of every stream but those of the whole mesh.
    scopes: HashMap<u64, Arc<Scope>>,
    /// The `Export` table as of the last change handed out.
    exports: Arc<Exports>,
    /// The latest changes handed out.
    recent: Recent,
}

/// The latest changes as the hub handed them out, kept for streams that
/// catch up: every proxy of a stopped server resumes on this one at once,
/// most of them from about the same revision, and each used to read and
/// parse the same stretch of history for itself (half of the receiving
/// server's CPU in a storm after a churn, `perf`). Kept under the hub's
/// lock with the subscriptions, so a change is either here when a stream
/// reads or handed to it after.
#[derive(Default)]
struct Recent {
    events: VecDeque<Change>,
    bytes: usize,
    /// Every change after this revision, up to the last handed out, is in
    /// `events`.
    after: u64,
}

/// One change as handed out, shared by every stream that catches up over
/// it.
pub(crate) type Change = Arc<(Topic, Arc<proto::WatchEvent>)>;

/// A stretch of kept changes for one scope (see [`Hub::recent_after`]).
pub(crate) struct Kept {
    /// The changes within the scope's namespaces and services, and every
    /// `Export` change, in order.
    pub(crate) events: Vec<Change>,
    /// The revision of the stretch's last change, whether given to the
    /// scope or not; `None` when nothing kept follows the revision asked.
    pub(crate) top: Option<u64>,
}

/// One `Export` change in a batch: the tables before and after it, and the
/// services whose exports it changed, with their endpoints.
struct Step {
    /// Its place in the batch.
    at: usize,
    old: Arc<Exports>,
    new: Arc<Exports>,
    services: Vec<((String, String), Rows)>,
}

/// Endpoints as the JSON the store holds, by key.
type Rows = Vec<(String, bytes::Bytes)>;

/// A stream's place in the hub; leaving it (drop) unsubscribes.
pub(crate) struct Subscription {
    hub: Arc<Hub>,
    id: u64,
    /// Batches for this stream; `None` once the hub dropped it.
    pub(crate) rx: mpsc::Receiver<Batch>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.lock().remove(self.id);
    }
}

impl Hub {
    /// A hub following `node`'s history from its current revision, until
    /// the node stops.
    pub(crate) fn start(node: NodeHandle) -> Arc<Self> {
        // Without the documents (a store that cannot be read fails in worse
        // ways), the hub reads them again before it hands anything out.
        let (revision, docs) = match state::export_docs(node.db()) {
            Ok((revision, docs)) => (revision, Some(docs)),
            Err(e) => {
                tracing::error!(error = %e, "cannot read the Export documents");
                (node.status().revision, None)
            }
        };
        let (dispatched, _) = watch::channel(revision);
        let subs = Subs {
            exports: Arc::new(Exports::from_records(docs.iter().flat_map(|d| d.values()))),
            recent: Recent::after(revision),
            ..Subs::default()
        };
        let hub = Arc::new(Self {
            subs: Mutex::new(subs),
            dispatched,
        });
        tokio::spawn(hub.clone().run(node, docs));
        hub
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Subs> {
        self.subs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Subscribes a stream of `scope`. Every change after the hub's
    /// current revision reaches it; the stream reads older ones itself
    /// (after subscribing, so nothing falls in between), from what the hub
    /// keeps or from the history.
    pub(crate) fn subscribe(self: &Arc<Self>, scope: &Arc<Scope>) -> Subscription {
        let (tx, rx) = mpsc::channel(QUEUE);
        let mut subs = self.lock();
        subs.next += 1;
        let id = subs.next;
        subs.add(id, scope, tx);
        drop(subs);
        Subscription {
            hub: self.clone(),
            id,
            rx,
        }
    }

    /// Up to `limit` kept changes after `revision`, those `scope` wants
    /// (and every `Export` change) only; `None` when the hub does not keep
    /// the change right after `revision` any more, and the history must
    /// be read instead. Changes the hub has not handed out yet are not
    /// here: a stream subscribed before it asked gets them in its batches.
    /// (Under the lock: a pointer copy per change given, a few set lookups
    /// per change looked at.)
    pub(crate) fn recent_after(&self, revision: u64, scope: &Scope, limit: usize) -> Option<Kept> {
        let subs = self.lock();
        let r = &subs.recent;
        if revision < r.after {
            return None;
        }
        let start = r.events.partition_point(|c| c.1.revision <= revision);
        let mut top = None;
        let mut events = Vec::new();
        for c in r.events.range(start..).take(limit) {
            let (topic, e) = &**c;
            top = Some(e.revision);
            if scope.wants(topic) || is_export(&e.kind, &e.key) {
                events.push(c.clone());
            }
        }
        Some(Kept { events, top })
    }

    /// A hub at `revision` that follows no node: tests hand it changes.
    #[cfg(test)]
    pub(crate) fn detached(revision: u64, exports: Exports) -> Arc<Self> {
        let (dispatched, _) = watch::channel(revision);
        Arc::new(Self {
            subs: Mutex::new(Subs {
                recent: Recent::after(revision),
                exports: Arc::new(exports),
                ..Subs::default()
            }),
            dispatched,
        })
    }

    /// [`Hub::hand_out`] without `Export` steps, for tests.
    #[cfg(test)]
    pub(crate) fn hand_out_plain(&self, events: Vec<(Topic, Arc<proto::WatchEvent>)>) {
        self.hand_out(events, Vec::new());
    }

    /// Hands `events` (the next changes, with their `Export` steps) to the
    /// streams they concern and keeps them; then says how far it got.
    fn hand_out(&self, events: Vec<(Topic, Arc<proto::WatchEvent>)>, steps: Vec<Step>) {
        let top = events.last().map(|(_, e)| e.revision);
        let mut subs = self.lock();
        subs.dispatch(&events, steps);
        subs.recent.keep(events);
        drop(subs);
        if let Some(top) = top {
            self.dispatched.send_replace(top);
        }
    }

    /// The highest revision handed out.
    pub(crate) fn dispatched(&self) -> u64 {
        *self.dispatched.borrow()
    }

    /// How many streams are subscribed (whole mesh, scoped).
    pub(crate) fn streams(&self) -> (usize, usize) {
        let s = self.lock();
        let wide: usize = s.wide.values().map(HashMap::len).sum();
        (s.all.len(), s.scoped.len() + wide)
    }

    /// Hands out every change after the hub's revision; `docs` are the
    /// `Export` documents as of it.
    async fn run(self: Arc<Self>, node: NodeHandle, docs: Option<HashMap<String, PolicyRecord>>) {
        let db = node.db().clone();
        let mut status = node.subscribe();
        let mut last = *self.dispatched.borrow();
        let mut docs = match docs {
            Some(d) => d,
            None => {
                let mut docs = HashMap::new();
                while !self.start_over(&node, &mut docs, &mut last) {
                    if !node.status().running {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                docs
            }
        };
        loop {
            let running = status
                .wait_for(|s| s.revision > last || !s.running)
                .await
                .map(|s| s.running)
                .unwrap_or(false);
            if !running {
                break;
            }
            loop {
                let batch = match state::events_after(&db, last, READ_LIMIT) {
                    Ok(Some(b)) => b,
                    Ok(None) => {
                        // Fell behind the retained history (the hub never
                        // waits, so only a stalled runtime does this): every
                        // stream catches up, or starts over, on its own.
                        tracing::warn!(
                            revision = last,
                            "watch hub fell behind the history; streams resynchronise"
                        );
                        if !self.start_over(&node, &mut docs, &mut last) {
                            // The store is failing: do not spin on it.
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "watch hub cannot read the history; streams resynchronise");
                        self.lock().clear(None);
                        // The store is failing: do not spin on it.
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        break;
                    }
                };
                let Some(top) = batch.last().map(|e| e.revision) else {
                    break;
                };
                // Outside the lock (its guard must not live through the
                // match: `start_over` takes it): each Export change's
                // tables, and the endpoints of the services it changed. On
                // a copy of the documents, so a failed read leaves them as
                // of `last`.
                let steps = if batch.iter().any(|e| is_export(&e.kind, &e.key)) {
                    let table = self.lock().exports.clone();
                    let mut next = docs.clone();
                    match steps(&db, &mut next, &batch, table) {
                        Ok(s) => {
                            docs = next;
                            s
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "watch hub cannot read the exports; streams resynchronise");
                            if !self.start_over(&node, &mut docs, &mut last) {
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                            break;
                        }
                    }
                } else {
                    Vec::new()
                };
                let events: Vec<(Topic, Arc<proto::WatchEvent>)> = batch
                    .into_iter()
                    .map(|e| {
                        let topic = crate::scope::topic(&e.kind, &e.key, e.value.as_ref());
                        (topic, Arc::new(super::watch::event_to(e, false)))
                    })
                    .collect();
                self.hand_out(events, steps);
                last = top;
            }
            tokio::time::sleep(PASS_EVERY).await;
        }
        self.lock().clear(None);
    }

    /// Drops every stream (each catches up on its own) and goes on from
    /// the store's current revision, with its `Export` documents; false
    /// when they could not be read (the history is then read again from
    /// `last`, with the table the hub had).
    fn start_over(
        &self,
        node: &NodeHandle,
        docs: &mut HashMap<String, PolicyRecord>,
        last: &mut u64,
    ) -> bool {
        let read = match state::export_docs(node.db()) {
            Ok((revision, now)) => {
                *docs = now;
                *last = revision;
                let mut subs = self.lock();
                subs.clear(Some(Exports::from_records(docs.values())));
                // The history in between was never handed out.
                subs.recent = Recent::after(revision);
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read the Export documents");
                self.lock().clear(None);
                false
            }
        };
        self.dispatched.send_replace(*last);
        read
    }
}

/// Whether a change is of an `Export` document.
pub(crate) fn is_export(kind: &str, key: &str) -> bool {
    kind == "policy" && key.starts_with(EXPORT)
}

/// Where `Export` documents are keyed.
const EXPORT: &str = "Export/";

/// Applies the batch's `Export` changes to `docs` in order, from the table
/// `table` (as of before the batch): one step each.
fn steps(
    db: &crate::storage::Db,
    docs: &mut HashMap<String, PolicyRecord>,
    batch: &[state::Event],
    mut table: Arc<Exports>,
) -> Result<Vec<Step>, crate::error::FedError> {
    let mut out = Vec::new();
    for (at, e) in batch.iter().enumerate() {
        if !is_export(&e.kind, &e.key) {
            continue;
        }
        let name = &e.key[EXPORT.len()..];
        match &e.value {
            // The stored record's spec; one that does not parse is left
            // out by `Exports`, failing closed for its service.
            Some(v) => {
                docs.insert(
                    name.to_string(),
                    PolicyRecord {
                        kind: "Export".into(),
                        name: name.to_string(),
                        spec: v.get("spec").cloned().unwrap_or_default(),
                    },
                );
            }
            None => {
                docs.remove(name);
            }
        }
        let new = Arc::new(Exports::from_records(docs.values()));
        let mut services = Vec::new();
        for (ns, svc) in table.changed(&new) {
            let rows = state::endpoints_raw_of(db, ns, svc)?;
            services.push(((ns.to_string(), svc.to_string()), rows));
        }
        out.push(Step {
            at,
            old: table,
            new: new.clone(),
            services,
        });
        table = new;
    }
    Ok(out)
}

/// An endpoint re-sent because exports changed: `value` if it now reaches
/// the stream, its deletion if not.
pub(crate) fn reexported(
    key: String,
    value: &bytes::Bytes,
    reaches: bool,
    revision: u64,
) -> Arc<proto::WatchEvent> {
    Arc::new(proto::WatchEvent {
        revision,
        kind: "endpoint".into(),
        key,
        value_json: if reaches {
            value.clone()
        } else {
            Default::default()
        },
        deleted: !reaches,
        snapshot: false,
    })
}

impl Subs {
    /// Adds stream `id` of `scope`: to the streams of the whole mesh, of
    /// every namespace in one zone, or of the namespaces and services it
    /// named.
    fn add(&mut self, id: u64, scope: &Arc<Scope>, tx: mpsc::Sender<Batch>) {
        if scope.is_all() {
            self.all.insert(id, tx);
            return;
        }
        self.scopes.insert(id, scope.clone());
        if let Some(zone) = scope.zone().filter(|_| scope.every_service()) {
            self.wide
                .entry(zone.to_string())
                .or_default()
                .insert(id, tx);
            return;
        }
        self.scoped.insert(id, tx);
        for ns in scope.namespaces() {
            self.by_namespace
                .entry(ns.to_string())
                .or_default()
                .insert(id);
        }
        for svc in scope.services_outside_namespaces() {
            self.by_service
                .entry(svc.to_string())
                .or_default()
                .insert(id);
        }
    }

    fn remove(&mut self, id: u64) {
        if self.all.remove(&id).is_some() {
            return;
        }
        self.scoped.remove(&id);
        let Some(scope) = self.scopes.remove(&id) else {
            return;
        };
        if let Some(zone) = scope.zone().filter(|_| scope.every_service()) {
            if let Some(set) = self.wide.get_mut(zone) {
                set.remove(&id);
                if set.is_empty() {
                    self.wide.remove(zone);
                }
            }
            return;
        }
        for ns in scope.namespaces() {
            if let Some(set) = self.by_namespace.get_mut(ns) {
                set.remove(&id);
                if set.is_empty() {
                    self.by_namespace.remove(ns);
                }
            }
        }
        for svc in scope.services() {
            if let Some(set) = self.by_service.get_mut(svc) {
                set.remove(&id);
                if set.is_empty() {
                    self.by_service.remove(svc);
                }
            }
        }
    }

    /// Drops every stream (each catches up on its own), with `exports` as
    /// the table from now on (`None`: the one it has).
    fn clear(&mut self, exports: Option<Exports>) {
        *self = Subs {
            next: self.next,
            exports: exports.map_or_else(|| self.exports.clone(), Arc::new),
            recent: std::mem::take(&mut self.recent),
            ..Subs::default()
        };
    }

    /// The streams that named a change's `namespace` or `key`
    /// (`namespace/service`); wide streams are handed changes by zone.
    fn named<'a>(&'a self, namespace: &str, key: &str) -> impl Iterator<Item = &'a u64> + 'a {
        self.by_namespace
            .get(namespace)
            .into_iter()
            .chain(self.by_service.get(key))
            .flatten()
    }

    /// Hands `events` to the streams they concern, each `Export` change's
    /// step (see [`steps`]) right behind its change.
    fn dispatch(&mut self, events: &[(Topic, Arc<proto::WatchEvent>)], steps: Vec<Step>) {
        let mut dropped = Vec::new();
        if !self.all.is_empty() {
            let all: Batch = Arc::new(events.iter().map(|(_, e)| e.clone()).collect());
            for (id, tx) in &self.all {
                if tx.try_send(all.clone()).is_err() {
                    dropped.push(*id);
                }
            }
        }
        if self.scoped.is_empty() && self.wide.is_empty() {
            if let Some(last) = steps.last() {
                self.exports = last.new.clone();
            }
        } else {
            // Streams that named namespaces or services, one batch each;
            // wide streams, one batch per zone, shared by its streams.
            let mut per: HashMap<u64, Vec<Arc<proto::WatchEvent>>> = HashMap::new();
            let mut zones: HashMap<&str, Vec<Arc<proto::WatchEvent>>> = HashMap::new();
            let mut table = self.exports.clone();
            let mut steps = steps.into_iter().peekable();
            for (i, (topic, e)) in events.iter().enumerate() {
                let step = steps.next_if(|s| s.at == i);
                if let Some(step) = &step {
                    table = step.new.clone();
                }
                self.hand(&table, topic, e, &mut per, &mut zones);
                if let Some(step) = &step {
                    self.reexport(step, e.revision, &mut per, &mut zones);
                }
            }
            let table_now = table;
            for (id, batch) in per {
                if let Some(tx) = self.scoped.get(&id)
                    && tx.try_send(Arc::new(batch)).is_err()
                {
                    dropped.push(id);
                }
            }
            for (z, batch) in zones {
                let batch: Batch = Arc::new(batch);
                for (id, tx) in self.wide.get(z).into_iter().flatten() {
                    if tx.try_send(batch.clone()).is_err() {
                        dropped.push(*id);
                    }
                }
            }
            self.exports = table_now;
        }
        for id in dropped {
            self.remove(id);
        }
    }

    /// Adds one change to the batches of the scoped streams it reaches.
    fn hand<'a>(
        &'a self,
        exports: &Exports,
        topic: &Topic,
        e: &Arc<proto::WatchEvent>,
        per: &mut HashMap<u64, Vec<Arc<proto::WatchEvent>>>,
        zones: &mut HashMap<&'a str, Vec<Arc<proto::WatchEvent>>>,
    ) {
        let Topic::Service {
            namespace,
            key,
            zone,
        } = topic
        else {
            return self.hand_everyone(e, per, zones);
        };
        if namespace == SYSTEM_NAMESPACE {
            return self.hand_everyone(e, per, zones);
        }
        // Exports hold back endpoints of other zones, not deletions (see
        // `crate::scope`).
        let limit = match zone {
            Some(theirs) if !e.deleted => exports.targets_of_key(key).map(|to| (to, theirs)),
            _ => None,
        };
        let passes = |mine: Option<&str>| match (limit, mine) {
            (Some((to, theirs)), Some(mine)) => crate::scope::reaches(mine, theirs, Some(to)),
            _ => true,
        };
        for id in self.named(namespace, key) {
            // The common case (no Export for the service) looks up nothing
            // per stream.
            if limit.is_none() || passes(self.scopes.get(id).and_then(|s| s.zone())) {
                per.entry(*id).or_default().push(e.clone());
            }
        }
        for z in self.wide.keys() {
            if passes(Some(z)) {
                zones.entry(z).or_default().push(e.clone());
            }
        }
    }

    /// Adds a change every scoped stream receives (zones, gateways, a
    /// policy whose service cannot be read) to their batches.
    fn hand_everyone<'a>(
        &'a self,
        e: &Arc<proto::WatchEvent>,
        per: &mut HashMap<u64, Vec<Arc<proto::WatchEvent>>>,
        zones: &mut HashMap<&'a str, Vec<Arc<proto::WatchEvent>>>,
    ) {
        for id in self.scoped.keys() {
            per.entry(*id).or_default().push(e.clone());
        }
        for z in self.wide.keys() {
            zones.entry(z).or_default().push(e.clone());
        }
    }

    /// Adds to each zoned stream's batch the endpoints an `Export` change
    /// let it reach (puts) or took away (deletions), at `revision`: built
    /// once per service and zone.
    fn reexport<'a>(
        &'a self,
        step: &Step,
        revision: u64,
        per: &mut HashMap<u64, Vec<Arc<proto::WatchEvent>>>,
        zones: &mut HashMap<&'a str, Vec<Arc<proto::WatchEvent>>>,
    ) {
        for ((ns, svc), rows) in &step.services {
            let key = format!("{ns}/{svc}");
            let (old, new) = (step.old.targets_of_key(&key), step.new.targets_of_key(&key));
            let named: Vec<(u64, &str)> = self
                .named(ns, &key)
                .filter_map(|id| Some((*id, self.scopes.get(id)?.zone()?)))
                .collect();
            // Per zone, once: nothing when its view of the service did not
            // change; the zone's own endpoints never change.
            let mut by_zone: HashMap<&str, Vec<Arc<proto::WatchEvent>>> = HashMap::new();
            for mine in named
                .iter()
                .map(|(_, z)| *z)
                .chain(self.wide.keys().map(String::as_str))
            {
                by_zone.entry(mine).or_insert_with(|| {
                    let is = crate::scope::admitted(mine, new);
                    if crate::scope::admitted(mine, old) == is {
                        return Vec::new();
                    }
                    rows.iter()
                        .filter(|(k, _)| endpoint_zone(k) != Some(mine))
                        .map(|(k, v)| reexported(k.clone(), v, is, revision))
                        .collect()
                });
            }
            for (id, mine) in named {
                if let Some(events) = by_zone.get(mine).filter(|v| !v.is_empty()) {
                    per.entry(id).or_default().extend(events.iter().cloned());
                }
            }
            for z in self.wide.keys() {
                if let Some(events) = by_zone.get(z.as_str()).filter(|v| !v.is_empty()) {
                    zones.entry(z).or_default().extend(events.iter().cloned());
                }
            }
        }
    }
}

impl Recent {
    /// Nothing kept yet, the hub being at `revision`.
    fn after(revision: u64) -> Self {
        Self {
            after: revision,
            ..Self::default()
        }
    }

    /// Keeps `events` (the next ones handed out), dropping the oldest
    /// beyond [`RECENT_EVENTS`] or [`RECENT_BYTES`].
    fn keep(&mut self, events: Vec<(Topic, Arc<proto::WatchEvent>)>) {
        for c in events {
            self.bytes += size_of(&c);
            self.events.push_back(Arc::new(c));
        }
        while self.events.len() > RECENT_EVENTS || self.bytes > RECENT_BYTES {
            let Some(c) = self.events.pop_front() else {
                break;
            };
            self.bytes -= size_of(&c);
            self.after = c.1.revision;
        }
    }
}

/// What a kept change holds, roughly: its strings, and for the rest (the
/// event, topic, two reference counts, the queue's slot) a fixed amount.
fn size_of((topic, e): &(Topic, Arc<proto::WatchEvent>)) -> usize {
    let topic = match topic {
        Topic::All => 0,
        Topic::Service {
            namespace,
            key,
            zone,
        } => namespace.len() + key.len() + zone.as_ref().map_or(0, String::len),
    };
    e.kind.len() + e.key.len() + e.value_json.len() + topic + 256
}

/// The zone of an endpoint key (`namespace/service/zone/id`).
pub(crate) fn endpoint_zone(key: &str) -> Option<&str> {
    key.split('/').nth(2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn table(to: &[&str]) -> Arc<Exports> {
        Arc::new(Exports::from_records(&[PolicyRecord {
            kind: "Export".into(),
            name: "pay".into(),
            spec: json!({"service": "pay.billing", "to": to}),
        }]))
    }

    fn export_event(revision: u64, to: &[&str]) -> (Topic, Arc<proto::WatchEvent>) {
        let value =
            json!({"kind": "Export", "name": "pay", "spec": {"service": "pay.billing", "to": to}});
        let topic = crate::scope::topic("policy", "Export/pay", Some(&value));
        let e = proto::WatchEvent {
            revision,
            kind: "policy".into(),
            key: "Export/pay".into(),
            value_json: value.to_string().into(),
            ..Default::default()
        };
        (topic, Arc::new(e))
    }

    fn endpoint_event(revision: u64, key: &str) -> (Topic, Arc<proto::WatchEvent>) {
        let topic = crate::scope::topic("endpoint", key, Some(&json!({})));
        let e = proto::WatchEvent {
            revision,
            kind: "endpoint".into(),
            key: key.into(),
            value_json: "{}".into(),
            ..Default::default()
        };
        (topic, Arc::new(e))
    }

    /// Two Export changes in one batch: each one's re-sent endpoints follow
    /// it, at its revision, computed from the table just before it, and the
    /// endpoints between and after them are held back by the table of
    /// their place in the batch.
    #[test]
    fn each_export_change_in_a_batch_is_followed_by_what_it_changed() {
        let mut subs = Subs {
            exports: table(&["west"]),
            ..Subs::default()
        };
        let (tx, mut rx) = mpsc::channel(QUEUE);
        subs.add(1, &Arc::new(Scope::all().with_zone("east").unwrap()), tx);
        assert_eq!(subs.wide["east"].len(), 1);
        let rows: Rows = vec![
            (
                "billing/pay/east/p1".into(),
                bytes::Bytes::from_static(b"{}"),
            ),
            (
                "billing/pay/west/p2".into(),
                bytes::Bytes::from_static(b"{}"),
            ),
        ];
        let pay = ("billing".to_string(), "pay".to_string());
        let steps = vec![
            Step {
                at: 0,
                old: table(&["west"]),
                new: table(&["west", "east"]),
                services: vec![(pay.clone(), rows.clone())],
            },
            Step {
                at: 2,
                old: table(&["west", "east"]),
                new: table(&["edge"]),
                services: vec![(pay, rows)],
            },
        ];
        subs.dispatch(
            &[
                export_event(10, &["west", "east"]),
                endpoint_event(11, "billing/pay/west/p3"),
                export_event(12, &["edge"]),
                endpoint_event(13, "billing/pay/west/p4"),
                endpoint_event(14, "billing/pay/east/p5"),
            ],
            steps,
        );
        let got: Vec<String> = rx
            .try_recv()
            .unwrap()
            .iter()
            .map(|e| {
                let sign = if e.deleted { "-" } else { "+" };
                format!("{}{sign}{}", e.revision, e.key)
            })
            .collect();
        // p1 is of the stream's own zone: never re-sent; p4 comes after
        // east lost the export, p5 is east's own.
        assert_eq!(
            got,
            [
                "10+Export/pay",
                "10+billing/pay/west/p2",
                "11+billing/pay/west/p3",
                "12+Export/pay",
                "12-billing/pay/west/p2",
                "14+billing/pay/east/p5"
            ]
        );
        assert_eq!(*subs.exports, *table(&["edge"]));
        subs.remove(1);
        assert!(subs.wide.is_empty() && subs.scopes.is_empty());
    }

    /// The oldest kept changes go beyond the bound, and a revision before
    /// what is kept is sent to the history.
    #[test]
    fn recent_keeps_the_latest_changes_only() {
        let hub = Hub::detached(100, Exports::default());
        let n = RECENT_EVENTS as u64 + 10;
        hub.hand_out_plain(
            (101..=100 + n)
                .map(|r| endpoint_event(r, &format!("billing/pay/east/p{r}")))
                .collect(),
        );
        let scope = Scope::new(["billing".to_string()], []).unwrap();
        assert!(hub.recent_after(109, &scope, 10).is_none());
        let kept = hub.recent_after(110, &scope, 10).unwrap();
        assert_eq!(kept.top, Some(120));
        assert_eq!(kept.events.first().map(|c| c.1.revision), Some(111));
        // Another namespace's scope is given none of them, but the part
        // still ends where it ends.
        let other = Scope::new(["shop".to_string()], []).unwrap();
        let kept = hub.recent_after(110, &other, 10).unwrap();
        assert!(kept.events.is_empty());
        assert_eq!(kept.top, Some(120));
        assert_eq!(hub.recent_after(100 + n, &scope, 10).unwrap().top, None);
    }

    /// A stream catching up is given every Export change, its service in
    /// its scope or not (a document may move to another service, and its
    /// table is read again after one), and the other changes of its scope
    /// only.
    #[test]
    fn a_catching_up_scope_is_given_every_export_change() {
        let hub = Hub::detached(10, Exports::default());
        let value =
            json!({"kind": "Export", "name": "x", "spec": {"service": "x.shop", "to": ["east"]}});
        let shop_export = (
            crate::scope::topic("policy", "Export/x", Some(&value)),
            Arc::new(proto::WatchEvent {
                revision: 12,
                kind: "policy".into(),
                key: "Export/x".into(),
                value_json: value.to_string().into(),
                ..Default::default()
            }),
        );
        hub.hand_out_plain(vec![
            endpoint_event(11, "shop/x/east/a"),
            shop_export,
            endpoint_event(13, "billing/pay/east/b"),
        ]);
        let billing = Scope::new(["billing".to_string()], []).unwrap();
        let kept = hub.recent_after(10, &billing, 100).unwrap();
        let got: Vec<u64> = kept.events.iter().map(|c| c.1.revision).collect();
        assert_eq!(got, [12, 13]);
        assert_eq!(kept.top, Some(13));
    }
}
