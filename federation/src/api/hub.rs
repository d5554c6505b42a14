//! One reader of the change history per server, handing each change to the
//! watch streams it concerns.
//!
//! Each stream used to read the history itself whenever the revision moved
//! and turn every event into its message on its own: with N proxies, one
//! change cost N reads of the store and N serialisations, scoped or not.
//! The hub reads each change once, serialises it once, and finds the
//! streams it concerns by index (namespace, service), so a change costs in
//! proportion to the proxies it concerns. The hub never waits for a stream:
//! one whose queue is full is dropped from the hub and catches up from the
//! history on its own, as a reconnecting proxy would.
//!
//! A stream that said its zone is also scoped by the `Export` documents
//! (see `crate::scope`). The hub keeps the documents as of the last change
//! it handed out, and applies each `Export` change in order; right behind
//! it, at its revision, each such stream gets the endpoints it may now
//! reach and the deletion of those it no longer may, so it never needs a
//! snapshot for it. (Those endpoints are read when the change is handed
//! out, maybe newer than it: a later change of them follows anyway.)

use std::collections::{HashMap, HashSet};
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
    /// Scoped streams.
    scoped: HashMap<u64, mpsc::Sender<Batch>>,
    by_namespace: HashMap<String, HashSet<u64>>,
    /// By `namespace/service`, for services outside the stream's namespaces.
    by_service: HashMap<String, HashSet<u64>>,
    /// Scoped streams of every namespace (scoped by exports only), by zone.
    wide: HashMap<String, HashSet<u64>>,
    scopes: HashMap<u64, Arc<Scope>>,
    /// The `Export` table as of the last change handed out.
    exports: Arc<Exports>,
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
        let (revision, docs) = state::export_docs(node.db()).unwrap_or_else(|e| {
            // A server that cannot read its own store fails in worse ways;
            // without the documents, every zone is sent every endpoint (the
            // gateways still refuse what is not exported).
            tracing::error!(error = %e, "cannot read the Export documents; watches are not scoped by them");
            (node.status().revision, HashMap::new())
        });
        let (dispatched, _) = watch::channel(revision);
        let subs = Subs {
            exports: Arc::new(Exports::from_records(docs.values())),
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
    /// current revision reaches it; the stream reads older ones from the
    /// history itself (after subscribing, so nothing falls in between).
    pub(crate) fn subscribe(self: &Arc<Self>, scope: &Arc<Scope>) -> Subscription {
        let (tx, rx) = mpsc::channel(QUEUE);
        let mut subs = self.lock();
        subs.next += 1;
        let id = subs.next;
        if scope.is_all() {
            subs.all.insert(id, tx);
        } else {
            subs.scoped.insert(id, tx);
            for ns in scope.namespaces() {
                subs.by_namespace
                    .entry(ns.to_string())
                    .or_default()
                    .insert(id);
            }
            for svc in scope.services_outside_namespaces() {
                subs.by_service
                    .entry(svc.to_string())
                    .or_default()
                    .insert(id);
            }
            if scope.every_service()
                && let Some(zone) = scope.zone()
            {
                subs.wide.entry(zone.to_string()).or_default().insert(id);
            }
            subs.scopes.insert(id, scope.clone());
        }
        drop(subs);
        Subscription {
            hub: self.clone(),
            id,
            rx,
        }
    }

    /// The highest revision handed out.
    pub(crate) fn dispatched(&self) -> u64 {
        *self.dispatched.borrow()
    }

    /// How many streams are subscribed (whole mesh, scoped).
    pub(crate) fn streams(&self) -> (usize, usize) {
        let s = self.lock();
        (s.all.len(), s.scoped.len())
    }

    /// Hands out every change after the hub's revision; `docs` are the
    /// `Export` documents as of it.
    async fn run(self: Arc<Self>, node: NodeHandle, mut docs: HashMap<String, PolicyRecord>) {
        let db = node.db().clone();
        let mut status = node.subscribe();
        let mut last = *self.dispatched.borrow();
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
                        self.start_over(&node, &mut docs, &mut last);
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
                // Outside the lock: each Export change's tables, and the
                // endpoints of the services it changed.
                let steps = match steps(&db, &mut docs, &batch, self.lock().exports.clone()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "watch hub cannot read the exports; streams resynchronise");
                        self.start_over(&node, &mut docs, &mut last);
                        break;
                    }
                };
                let events: Vec<(Topic, Arc<proto::WatchEvent>)> = batch
                    .into_iter()
                    .map(|e| {
                        let topic = crate::scope::topic(&e.kind, &e.key, e.value.as_ref());
                        (topic, Arc::new(super::watch::event_to(e, false)))
                    })
                    .collect();
                self.lock().dispatch(&events, steps);
                last = top;
                self.dispatched.send_replace(last);
            }
            tokio::time::sleep(PASS_EVERY).await;
        }
        self.lock().clear(None);
    }

    /// Drops every stream (each catches up on its own) and goes on from
    /// the store's current revision, with its `Export` documents.
    fn start_over(
        &self,
        node: &NodeHandle,
        docs: &mut HashMap<String, PolicyRecord>,
        last: &mut u64,
    ) {
        match state::export_docs(node.db()) {
            Ok((revision, now)) => {
                *docs = now;
                *last = revision;
                self.lock()
                    .clear(Some(Exports::from_records(docs.values())));
            }
            Err(e) => {
                // Keep the table: the history is read again from `last`.
                tracing::error!(error = %e, "cannot read the Export documents");
                self.lock().clear(None);
            }
        }
        self.dispatched.send_replace(*last);
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
            services.push(((ns.clone(), svc.clone()), rows));
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
    fn remove(&mut self, id: u64) {
        if self.all.remove(&id).is_some() {
            return;
        }
        self.scoped.remove(&id);
        if let Some(scope) = self.scopes.remove(&id) {
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
            if let Some(zone) = scope.zone()
                && let Some(set) = self.wide.get_mut(zone)
            {
                set.remove(&id);
                if set.is_empty() {
                    self.wide.remove(zone);
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
        if self.scoped.is_empty() {
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
                for id in self.wide.get(z).into_iter().flatten() {
                    if let Some(tx) = self.scoped.get(id)
                        && tx.try_send(batch.clone()).is_err()
                    {
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
            Some(theirs) if !e.deleted => {
                let svc = key.split_once('/').map_or("", |(_, s)| s);
                exports.targets(namespace, svc).map(|to| (to, theirs))
            }
            _ => None,
        };
        let passes = |mine: Option<&str>| match (limit, mine) {
            (Some((to, theirs)), Some(mine)) => mine == theirs || Exports::admits(to, mine),
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
        for (id, scope) in &self.scopes {
            if !scope.every_service() {
                per.entry(*id).or_default().push(e.clone());
            }
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
            // Per zone: nothing when its view of the service did not change.
            let mut by_zone: HashMap<&str, Vec<Arc<proto::WatchEvent>>> = HashMap::new();
            let mut events_for = |mine: &'a str| {
                by_zone
                    .entry(mine)
                    .or_insert_with(|| {
                        let is = step.new.reaches(ns, svc, mine);
                        if step.old.reaches(ns, svc, mine) == is {
                            return Vec::new();
                        }
                        rows.iter()
                            .filter(|(k, _)| endpoint_zone(k) != Some(mine))
                            .map(|(k, v)| reexported(k.clone(), v, is, revision))
                            .collect()
                    })
                    .clone()
            };
            let key = format!("{ns}/{svc}");
            for id in self.named(ns, &key) {
                if let Some(mine) = self.scopes.get(id).and_then(|s| s.zone()) {
                    let events = events_for(mine);
                    if !events.is_empty() {
                        per.entry(*id).or_default().extend(events);
                    }
                }
            }
            for z in self.wide.keys() {
                let events = events_for(z);
                if !events.is_empty() {
                    zones.entry(z).or_default().extend(events);
                }
            }
        }
    }
}

/// The zone of an endpoint key (`namespace/service/zone/id`).
pub(crate) fn endpoint_zone(key: &str) -> Option<&str> {
    key.split('/').nth(2)
}
