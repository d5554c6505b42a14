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

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::node::NodeHandle;
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
    scopes: HashMap<u64, Arc<Scope>>,
}

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
        let hub = Arc::new(Self {
            subs: Mutex::new(Subs::default()),
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
                        self.lock().clear();
                        last = node.status().revision;
                        self.dispatched.send_replace(last);
                        break;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "watch hub cannot read the history; streams resynchronise");
                        self.lock().clear();
                        // The store is failing: do not spin on it.
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        break;
                    }
                };
                let Some(top) = batch.last().map(|e| e.revision) else {
                    break;
                };
                let events: Vec<(Topic, Arc<proto::WatchEvent>)> = batch
                    .into_iter()
                    .map(|e| {
                        let topic = crate::scope::topic(&e.kind, &e.key, e.value.as_ref());
                        (topic, Arc::new(super::watch::event_to(e, false)))
                    })
                    .collect();
                self.lock().dispatch(&events);
                last = top;
                self.dispatched.send_replace(last);
            }
            tokio::time::sleep(PASS_EVERY).await;
        }
        self.lock().clear();
    }
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
        }
    }

    fn clear(&mut self) {
        *self = Subs {
            next: self.next,
            ..Subs::default()
        };
    }

    fn dispatch(&mut self, events: &[(Topic, Arc<proto::WatchEvent>)]) {
        let mut dropped = Vec::new();
        if !self.all.is_empty() {
            let all: Batch = Arc::new(events.iter().map(|(_, e)| e.clone()).collect());
            for (id, tx) in &self.all {
                if tx.try_send(all.clone()).is_err() {
                    dropped.push(*id);
                }
            }
        }
        if !self.scoped.is_empty() {
            let mut per: HashMap<u64, Vec<Arc<proto::WatchEvent>>> = HashMap::new();
            for (topic, e) in events {
                match topic {
                    Topic::Service { namespace, key } if namespace != SYSTEM_NAMESPACE => {
                        let ids = self
                            .by_namespace
                            .get(namespace)
                            .into_iter()
                            .chain(self.by_service.get(key))
                            .flatten();
                        for id in ids {
                            per.entry(*id).or_default().push(e.clone());
                        }
                    }
                    _ => {
                        for id in self.scoped.keys() {
                            per.entry(*id).or_default().push(e.clone());
                        }
                    }
                }
            }
            for (id, batch) in per {
                if let Some(tx) = self.scoped.get(&id)
                    && tx.try_send(Arc::new(batch)).is_err()
                {
                    dropped.push(id);
                }
            }
        }
        for id in dropped {
            self.remove(id);
        }
    }
}
