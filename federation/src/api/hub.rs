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
//! (see `crate::scope`). The hub keeps the table as of the changes it has
//! handed out; when an `Export` changes, each such stream gets, right after
//! the change, the endpoints it may now reach and the deletion of those it
//! no longer may, so it never needs a snapshot for it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::node::NodeHandle;
use crate::policy::Exports;
use crate::proto;
use crate::scope::{Scope, Topic};
use crate::state::{self, SYSTEM_NAMESPACE};

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

/// What an `Export` change makes each zone's streams receive: the
/// endpoints of the services whose exports changed, read after the change.
struct Reexport {
    /// The revision the endpoints go out at (the batch's last).
    revision: u64,
    /// The table before the change.
    old: Arc<Exports>,
    /// Each changed service with its endpoints, by key.
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
        let (dispatched, _) = watch::channel(node.status().revision);
        let subs = Subs {
            exports: Arc::new(read_exports(node.db())),
            ..Subs::default()
        };
        let hub = Arc::new(Self {
            subs: Mutex::new(subs),
            dispatched,
        });
        tokio::spawn(hub.clone().run(node));
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

    async fn run(self: Arc<Self>, node: NodeHandle) {
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
                        last = node.status().revision;
                        self.lock().clear(read_exports(&db));
                        self.dispatched.send_replace(last);
                        break;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "watch hub cannot read the history; streams resynchronise");
                        self.lock().clear(read_exports(&db));
                        // The store is failing: do not spin on it.
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        break;
                    }
                };
                let Some(top) = batch.last().map(|e| e.revision) else {
                    break;
                };
                let exports_changed = batch.iter().any(|e| is_export(&e.kind, &e.key));
                let events: Vec<(Topic, Arc<proto::WatchEvent>)> = batch
                    .into_iter()
                    .map(|e| {
                        let topic = crate::scope::topic(&e.kind, &e.key, e.value.as_ref());
                        (topic, Arc::new(super::watch::event_to(e, false)))
                    })
                    .collect();
                // Read outside the lock: the new table, and the endpoints
                // of the services whose exports changed.
                let reexport = if exports_changed {
                    let old = self.lock().exports.clone();
                    match reexport(&db, &old, top) {
                        Ok(r) => Some(r),
                        Err(e) => {
                            tracing::error!(error = %e, "watch hub cannot read the exports; streams resynchronise");
                            self.lock().clear(read_exports(&db));
                            last = top;
                            self.dispatched.send_replace(last);
                            continue;
                        }
                    }
                } else {
                    None
                };
                self.lock().dispatch(&events, reexport);
                last = top;
                self.dispatched.send_replace(last);
            }
            tokio::time::sleep(PASS_EVERY).await;
        }
        self.lock().clear(Exports::default());
    }
}

/// Whether a change is of an `Export` document.
pub(crate) fn is_export(kind: &str, key: &str) -> bool {
    kind == "policy" && key.starts_with("Export/")
}

/// The `Export` table, or (with an error logged) an empty one: a server
/// that cannot read its own store has worse trouble, and an empty table
/// only sends more than needed.
fn read_exports(db: &crate::storage::Db) -> Exports {
    state::exports(db).unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot read the Export documents; watches are not scoped by them");
        Exports::default()
    })
}

/// The new table and what changed since `old` (possibly nothing: a
/// document rewritten the same).
fn reexport(
    db: &crate::storage::Db,
    old: &Arc<Exports>,
    revision: u64,
) -> Result<(Exports, Reexport), crate::error::FedError> {
    let new = state::exports(db)?;
    let changed: Vec<(String, String)> = old.changed(&new).into_iter().cloned().collect();
    let mut services = Vec::with_capacity(changed.len());
    for (ns, svc) in changed {
        let rows = state::endpoints_raw_of(db, &ns, &svc)?;
        services.push(((ns, svc), rows));
    }
    Ok((
        new,
        Reexport {
            revision,
            old: old.clone(),
            services,
        },
    ))
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

    /// Drops every stream (each catches up on its own) and starts over
    /// with `exports`.
    fn clear(&mut self, exports: Exports) {
        *self = Subs {
            next: self.next,
            exports: Arc::new(exports),
            ..Subs::default()
        };
    }

    /// The scoped streams a change of `namespace` / `key` concerns by
    /// their namespaces and services: named ones, then every wide one.
    /// The streams that named a change's `namespace` or `key`
    /// (`namespace/service`); wide streams are handed changes by zone.
    fn named<'a>(&'a self, namespace: &str, key: &str) -> impl Iterator<Item = &'a u64> + 'a {
        self.by_namespace
            .get(namespace)
            .into_iter()
            .chain(self.by_service.get(key))
            .flatten()
    }

    fn dispatch(
        &mut self,
        events: &[(Topic, Arc<proto::WatchEvent>)],
        reexport: Option<(Exports, Reexport)>,
    ) {
        let mut dropped = Vec::new();
        if !self.all.is_empty() {
            let all: Batch = Arc::new(events.iter().map(|(_, e)| e.clone()).collect());
            for (id, tx) in &self.all {
                if tx.try_send(all.clone()).is_err() {
                    dropped.push(*id);
                }
            }
        }
        // The batch is filtered by the table after it: what the old one
        // let through and the new one does not is deleted by the
        // re-export below, and the reverse is sent by it.
        let reexport = reexport.map(|(new, r)| {
            self.exports = Arc::new(new);
            r
        });
        if !self.scoped.is_empty() {
            // Streams that named namespaces or services, one batch each;
            // wide streams, one batch per zone, shared by its streams.
            let mut per: HashMap<u64, Vec<Arc<proto::WatchEvent>>> = HashMap::new();
            let mut zones: HashMap<&str, Vec<Arc<proto::WatchEvent>>> = HashMap::new();
            for (topic, e) in events {
                match topic {
                    Topic::Service {
                        namespace,
                        key,
                        zone,
                    } if namespace != SYSTEM_NAMESPACE => {
                        // Exports hold back endpoints of other zones, not
                        // deletions (see `crate::scope`).
                        let to = match zone {
                            Some(_) if !e.deleted => {
                                let svc = key.split_once('/').map_or("", |(_, s)| s);
                                self.exports.targets(namespace, svc)
                            }
                            _ => None,
                        };
                        let passes = |mine: Option<&str>| match (to, mine, zone) {
                            (Some(to), Some(mine), Some(theirs)) => {
                                mine == theirs || Exports::admits(to, mine)
                            }
                            _ => true,
                        };
                        for id in self.named(namespace, key) {
                            if passes(self.scopes.get(id).and_then(|s| s.zone())) {
                                per.entry(*id).or_default().push(e.clone());
                            }
                        }
                        for z in self.wide.keys() {
                            if passes(Some(z)) {
                                zones.entry(z).or_default().push(e.clone());
                            }
                        }
                    }
                    _ => {
                        for (id, scope) in &self.scopes {
                            if !scope.every_service() {
                                per.entry(*id).or_default().push(e.clone());
                            }
                        }
                        for z in self.wide.keys() {
                            zones.entry(z).or_default().push(e.clone());
                        }
                    }
                }
            }
            if let Some(r) = reexport {
                self.reexport(&r, &mut per, &mut zones);
            }
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
        }
        for id in dropped {
            self.remove(id);
        }
    }

    /// Appends to each zoned stream's batch the endpoints an `Export`
    /// change let it reach (puts) or took away (deletions), computed once
    /// per service and zone.
    fn reexport<'a>(
        &'a self,
        r: &Reexport,
        per: &mut HashMap<u64, Vec<Arc<proto::WatchEvent>>>,
        zones: &mut HashMap<&'a str, Vec<Arc<proto::WatchEvent>>>,
    ) {
        for ((ns, svc), rows) in &r.services {
            let key = format!("{ns}/{svc}");
            let mut by_zone: HashMap<&str, Vec<Arc<proto::WatchEvent>>> = HashMap::new();
            let mut events_for = |mine: &'a str| -> Vec<Arc<proto::WatchEvent>> {
                let is = self.exports.reaches(ns, svc, mine);
                if r.old.reaches(ns, svc, mine) == is {
                    return Vec::new();
                }
                by_zone
                    .entry(mine)
                    .or_insert_with(|| {
                        rows.iter()
                            .filter(|(k, _)| endpoint_zone(k) != Some(mine))
                            .map(|(k, v)| {
                                Arc::new(proto::WatchEvent {
                                    revision: r.revision,
                                    kind: "endpoint".into(),
                                    key: k.clone(),
                                    value_json: if is { v.clone() } else { Default::default() },
                                    deleted: !is,
                                    snapshot: false,
                                })
                            })
                            .collect()
                    })
                    .clone()
            };
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
