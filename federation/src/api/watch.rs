//! Watch: the ordered change stream proxies live on, and their acks.

use super::hub;
use super::*;
use crate::acks;
use crate::policy::Exports;
use crate::scope::{Scope, Topic};
use crate::state::SYSTEM_NAMESPACE;
use std::collections::BTreeSet;

// === Watch ===

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::WatchEvent, Status>> + Send>>;

pub(super) fn event_to(e: state::Event, snapshot: bool) -> proto::WatchEvent {
    proto::WatchEvent {
        revision: e.revision,
        kind: e.kind,
        key: e.key,
        deleted: e.value.is_none(),
        value_json: e.value.map(|v| v.to_string().into()).unwrap_or_default(),
        snapshot,
    }
}

#[tonic::async_trait]
impl proto::watch_server::Watch for Api {
    type WatchStream = EventStream;

    async fn watch(
        &self,
        req: Request<proto::WatchRequest>,
    ) -> Result<Response<EventStream>, Status> {
        caller(&req, self.td(), "Watch.Watch", ANY)?;
        let r = req.into_inner();
        let scope = Scope::new(r.namespaces, r.services)
            .and_then(|s| s.with_zone(&r.zone))
            .map_err(|e| Status::invalid_argument(format!("WatchRequest: {e}")))?;
        let (tx, rx) = mpsc::channel(256);
        let node = self.node().clone();
        let hub = self.hub();
        let api = self.clone();
        tokio::spawn(async move {
            let counted = &api.inner.snapshots_served;
            let stopping = api.inner.stopping.clone();
            let scope = Arc::new(scope);
            if let Err(s) =
                run_watch(node, hub, r.from_revision, scope, counted, stopping, &tx).await
            {
                let _ = tx.send(Err(Box::new(s))).await;
            }
        });
        // An event queued for several streams is one shared value until
        // its stream's encoder takes it.
        Ok(Response::new(Box::pin(tokio_stream::StreamExt::map(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            |r| r.map(Arc::unwrap_or_clone).map_err(|s| *s),
        ))))
    }

    async fn ack(
        &self,
        req: Request<proto::AckRequest>,
    ) -> Result<Response<proto::WriteReply>, Status> {
        // The proxy is who the certificate says, whatever the body claims.
        let id = caller(&req, self.td(), "Watch.Ack", PROXIES)?;
        let r = req.into_inner();
        if r.rejected.len() > MAX_REJECTED {
            return Err(Status::invalid_argument(format!(
                "AckRequest.rejected: {} bytes, more than {MAX_REJECTED}",
                r.rejected.len()
            )));
        }
        self.inner
            .acks
            .record(
                &id.to_string(),
                r.revision,
                &r.rejected,
                std::time::Instant::now(),
                node::now_ms(),
            )
            .map_err(|e| Status::resource_exhausted(e.to_string()))?;
        Ok(Response::new(proto::WriteReply {
            revision: self.node().status().revision,
            outcome_json: String::new(),
        }))
    }

    async fn proxies(
        &self,
        req: Request<proto::ReadOptions>,
    ) -> Result<Response<proto::ProxyList>, Status> {
        let id = caller(&req, self.td(), "Watch.Proxies", OPERATOR_OR_SERVER)?;
        self.read_barrier(Some(req.get_ref())).await?;
        let revision = self.node().status().revision;
        let (me, others) = self.members_for_telemetry();
        let mut lists = vec![self.inner.acks.list(&me, std::time::Instant::now())];
        let mut servers = vec![me];
        let mut missing = Vec::new();
        // A server asks for its peers' own tables only, so a fan-out never
        // fans out again.
        if id.role_kind() != Some(RoleKind::Server) {
            let (answers, failed) = self
                .fan_out(others, |ch| async move {
                    proto::watch_client::WatchClient::new(ch)
                        .proxies(proto::ReadOptions::default())
                        .await
                        .map(|r| r.into_inner().proxies)
                })
                .await;
            for (name, list) in answers {
                lists.push(list);
                servers.push(name);
            }
            missing = failed;
        }
        Ok(Response::new(proto::ProxyList {
            revision,
            proxies: acks::merge(lists),
            servers,
            missing,
        }))
    }
}

/// The longest rejection reason a proxy may file (it names documents and
/// fields; a longer one is a broken or hostile proxy).
const MAX_REJECTED: usize = 16 * 1024;

/// How long a zoned stream resuming ahead of this server waits for it.
const RESUME_WAIT: Duration = Duration::from_secs(3);

/// How often a scoped stream that received nothing says how far the store
/// has come (a `progress` event), so its proxy acknowledges being current.
/// Scoped proxies skip most changes; at most one message per interval each
/// keeps `trellis status` true without a message per change per proxy.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// A stream's queue. Its items are two pointers: tokio allocates a queue's
/// slots 32 at a time, and a server holds one queue per watching proxy, so
/// items the size of an event and a `Status` (about 200 bytes) cost about
/// 9 KiB per proxy once a snapshot had passed through (heaptrack).
type Tx = mpsc::Sender<Result<Arc<proto::WatchEvent>, Box<Status>>>;

/// Sends the snapshot (when needed) and then every event within `scope`
/// in revision order. The events come from the replicated history, so a
/// client that reconnects to any server with the last revision it saw gets
/// each event exactly once.
async fn run_watch(
    node: NodeHandle,
    hub: Arc<hub::Hub>,
    from: u64,
    scope: Arc<Scope>,
    snapshots: &std::sync::atomic::AtomicU64,
    stopping: tokio_util::sync::CancellationToken,
    tx: &Tx,
) -> Result<(), Status> {
    let db = node.db().clone();
    // A zoned proxy that resumes from a revision this server has not
    // applied yet would miss what follows an Export change at that revision
    // (see `resume_after_export`): the history here cannot tell. Waits for
    // it, briefly; a server further behind sends the proxy to another.
    if scope.zone().is_some() && from > node.status().revision {
        let mut status = node.subscribe();
        let reached = tokio::select! {
            r = tokio::time::timeout(
                RESUME_WAIT,
                status.wait_for(|s| s.revision >= from || !s.running),
            ) => r.is_ok_and(|r| r.is_ok_and(|s| s.revision >= from)),
            () = stopping.cancelled() => return Ok(()),
            _ = tx.closed() => return Ok(()),
        };
        if !reached {
            return Err(Status::unavailable(format!(
                "this server has not reached revision {from} yet; watch another"
            )));
        }
    }
    // Subscribed before reading the history: every change is then either
    // in what we read or in what the hub hands us (or both: skipped by
    // revision).
    let mut sub = hub.subscribe(&scope);
    let mut last = from;
    let needs_snapshot = from == 0
        || state::events_after(&db, from, 1)
            .map_err(to_status)?
            .is_none();
    if needs_snapshot {
        snapshots.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (rev, events) = state::snapshot_events_scoped(&db, &scope).map_err(to_status)?;
        for e in events {
            let e = proto::WatchEvent {
                revision: e.revision,
                kind: e.kind.into(),
                key: e.key,
                value_json: e.value_json.into(),
                deleted: false,
                snapshot: true,
            };
            if tx.send(Ok(Arc::new(e))).await.is_err() {
                return Ok(());
            }
        }
        // Marks the end of the snapshot, so an empty store is visible too.
        let sync = proto::WatchEvent {
            revision: rev,
            kind: "sync".into(),
            snapshot: true,
            ..Default::default()
        };
        if tx.send(Ok(Arc::new(sync))).await.is_err() {
            return Ok(());
        }
        last = rev;
    } else if !resume_after_export(&db, &scope, from, tx).await?
        || !catch_up(&db, Some(&hub), &scope, &mut last, tx).await?
    {
        return Ok(());
    }
    let mut status = node.subscribe();
    let mut progress = tokio::time::interval(PROGRESS_EVERY);
    progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    progress.reset();
    loop {
        tokio::select! {
            batch = sub.rx.recv() => match batch {
                Some(batch) => {
                    if !send_batch(&batch, &mut last, tx).await {
                        return Ok(());
                    }
                }
                None => {
                    // The hub dropped us (our client reads too slowly, or
                    // the hub started over): catch up as at the start.
                    sub = hub.subscribe(&scope);
                    if !catch_up(&db, Some(&hub), &scope, &mut last, tx).await? {
                        return Ok(());
                    }
                }
            },
            _ = progress.tick(), if !scope.is_all() => {
                // Read before draining: the hub queues a batch before it
                // moves `dispatched`, so every change up to `reached` is
                // then in our queue (or we were dropped, and see it), and
                // progress never passes a change still waiting for us.
                let reached = hub.dispatched();
                let mut behind = false;
                loop {
                    match sub.rx.try_recv() {
                        Ok(batch) => {
                            if !send_batch(&batch, &mut last, tx).await {
                                return Ok(());
                            }
                        }
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => {
                            behind = true;
                            break;
                        }
                    }
                }
                if !behind && reached > last {
                    last = reached;
                    let p = proto::WatchEvent {
                        revision: reached,
                        kind: "progress".into(),
                        ..Default::default()
                    };
                    if tx.send(Ok(Arc::new(p))).await.is_err() {
                        return Ok(());
                    }
                }
            }
            () = async { let _ = status.wait_for(|s| !s.running).await; } => {
                return Err(Status::unavailable("the server is stopping; watch again from the last revision"));
            }
            _ = tx.closed() => return Ok(()),
            // The server is stopping: ending the stream now sends its proxy
            // to another server at once, where it resumes from `last`.
            () = stopping.cancelled() => return Ok(()),
        }
    }
}

/// Sends what of `batch` is newer than `last`; false when the client left.
/// Events at the revision of one just sent go too: the endpoints an
/// `Export` change re-exports follow it at its revision.
async fn send_batch(batch: &hub::Batch, last: &mut u64, tx: &Tx) -> bool {
    let mut sending = false;
    for e in batch.iter() {
        sending = e.revision > *last || (sending && e.revision == *last);
        if sending {
            *last = e.revision;
            if tx.send(Ok(e.clone())).await.is_err() {
                return false;
            }
        }
    }
    true
}

/// Sends every event within `scope` after `last`, from what `hub` keeps
/// where it can and from the history otherwise; false when the client
/// left. With a hub it ends at the last change the hub handed out, so the
/// caller must have subscribed to it first (the rest comes in its
/// batches); without, at the store's current revision.
///
/// For a scope with a zone, endpoints are held back by the `Export` table
/// as of the end of each part of the history or later, and the last
/// `Export` change of a part that concerns the scope is followed, at its
/// revision, by every endpoint of other zones within the scope: the ones
/// the proxy may reach, and the deletion of the others. The table the
/// proxy had is not known here (it may have watched another server), so
/// all of them go, as a snapshot would send them, but without starting
/// over.
async fn catch_up(
    db: &crate::storage::Db,
    hub: Option<&hub::Hub>,
    scope: &Scope,
    last: &mut u64,
    tx: &Tx,
) -> Result<bool, Status> {
    // The table, and the revision it is as of (`None`: not read; an
    // unzoned scope never reads it, as exports filter nothing for it). It
    // is read after a part, so at or past its end; every change after that
    // revision is in the parts that follow (each starts where the last
    // ended), so the table holds until one of them carries an `Export`
    // change newer than it.
    let mut table: (Option<u64>, Exports) = (None, Exports::default());
    loop {
        let part = match hub.and_then(|h| h.recent_after(*last, scope, PART)) {
            Some(kept) => kept,
            None => history_after(db, *last, scope)?,
        };
        let Some(top) = part.top else {
            return Ok(true);
        };
        let batch = part.events;
        let zoned = scope.zone().is_some();
        let stale = table.0.is_none_or(|rev| {
            batch
                .iter()
                .any(|c| c.1.revision > rev && hub::is_export(&c.1.kind, &c.1.key))
        });
        if zoned && stale {
            let (rev, docs) = state::export_docs(db).map_err(to_status)?;
            table = (Some(rev), Exports::from_records(docs.values()));
        }
        let exports = &table.1;
        let resend = zoned.then(|| Resend::of(scope, &batch)).flatten();
        for (i, c) in batch.iter().enumerate() {
            let (topic, e) = &**c;
            let revision = e.revision;
            if scope.receives(topic, e.deleted, exports) && tx.send(Ok(e.clone())).await.is_err() {
                return Ok(false);
            }
            if let Some((after, what)) = &resend
                && *after == i
                && !send_reexport(db, scope, exports, what, revision, tx).await?
            {
                return Ok(false);
            }
        }
        *last = top;
    }
}

/// Most changes `catch_up` takes at once.
const PART: usize = 1024;

/// The next part of the history after `last`, read from the store (what the
/// hub does not keep), as [`hub::Hub::recent_after`] gives it.
fn history_after(db: &crate::storage::Db, last: u64, scope: &Scope) -> Result<hub::Kept, Status> {
    let batch = state::events_after(db, last, PART)
        .map_err(to_status)?
        .ok_or_else(|| {
            Status::out_of_range(format!(
                "revision {last} is older than the history this server keeps; watch again from 0"
            ))
        })?;
    Ok(hub::Kept {
        top: batch.last().map(|e| e.revision),
        events: batch
            .into_iter()
            .filter_map(|e| {
                let topic = crate::scope::topic(&e.kind, &e.key, e.value.as_ref());
                (scope.wants(&topic) || hub::is_export(&e.kind, &e.key))
                    .then(|| Arc::new((topic, Arc::new(event_to(e, false)))))
            })
            .collect(),
    })
}

/// What a zoned stream is sent again after `Export` changes (see
/// `catch_up`): the endpoints of the services the changes named, or, after
/// a deletion (whose document, and so its service, is gone), of every
/// service in scope.
enum Resend {
    Services(BTreeSet<(String, String)>),
    All,
}

impl Resend {
    /// For the `Export` changes among `batch` that concern `scope`: where
    /// the re-send goes (after the last of them) and what it holds; `None`
    /// without any.
    fn of(scope: &Scope, batch: &[hub::Change]) -> Option<(usize, Resend)> {
        let mut after = None;
        let mut what = Resend::Services(BTreeSet::new());
        for (i, c) in batch.iter().enumerate() {
            let (topic, e) = &**c;
            if !hub::is_export(&e.kind, &e.key) || !scope.wants(topic) {
                continue;
            }
            after = Some(i);
            // A deletion (or a document whose service cannot be read)
            // names no service: everything in scope.
            let named = match topic {
                Topic::Service { key, .. } => key.split_once('/'),
                Topic::All => None,
            };
            match (named, &mut what) {
                (Some((ns, svc)), Resend::Services(set)) => {
                    set.insert((ns.to_string(), svc.to_string()));
                }
                (None, _) => what = Resend::All,
                (Some(_), Resend::All) => {}
            }
        }
        after.map(|i| (i, what))
    }
}

/// For a zoned stream resuming from `from`: when the change at `from` is
/// an `Export` change within the scope, what followed it (the endpoints it
/// re-exported, at the same revision) may not all have reached the proxy
/// before its stream broke, and the history will not send them again:
/// sends them now. False when the client left.
async fn resume_after_export(
    db: &crate::storage::Db,
    scope: &Scope,
    from: u64,
    tx: &Tx,
) -> Result<bool, Status> {
    if scope.zone().is_none() {
        return Ok(true);
    }
    match state::event(db, from).map_err(to_status)? {
        Some(e) => match Resend::of(
            scope,
            &[Arc::new((
                crate::scope::topic(&e.kind, &e.key, e.value.as_ref()),
                Arc::new(event_to(e, false)),
            ))],
        ) {
            Some((_, what)) => {
                let exports = state::exports(db).map_err(to_status)?;
                send_reexport(db, scope, &exports, &what, from, tx).await
            }
            None => Ok(true),
        },
        None => Ok(true),
    }
}

/// Sends, at `revision`, every endpoint of another zone of `what` within
/// `scope`: those `exports` let it reach, and the deletion of the others
/// (idempotent: a proxy may have had any of them, or none).
async fn send_reexport(
    db: &crate::storage::Db,
    scope: &Scope,
    exports: &Exports,
    what: &Resend,
    revision: u64,
    tx: &Tx,
) -> Result<bool, Status> {
    let mine = scope.zone().unwrap_or_default();
    let system = format!("{SYSTEM_NAMESPACE}/");
    let rows = match what {
        Resend::All => state::endpoints_raw_in(db, scope),
        Resend::Services(set) => set.iter().try_fold(Vec::new(), |mut rows, (ns, svc)| {
            rows.extend(state::endpoints_raw_of(db, ns, svc)?);
            Ok(rows)
        }),
    }
    .map_err(to_status)?;
    for (key, value) in rows {
        if hub::endpoint_zone(&key) == Some(mine) || key.starts_with(&system) {
            continue;
        }
        let reaches = scope.exported_endpoint(&key, exports);
        if tx
            .send(Ok(hub::reexported(key, &value, reaches, revision)))
            .await
            .is_err()
        {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Applier, Command, EndpointRecord, PolicyRecord};

    fn endpoint(service: &str, zone: &str, id: &str) -> Command {
        Command::Register {
            endpoint: EndpointRecord {
                namespace: "billing".into(),
                service: service.into(),
                zone: zone.into(),
                id: id.into(),
                address: "10.0.0.1".into(),
                ports: vec![8080],
                protocol: "http".into(),
                labels: Default::default(),
                healthy: true,
                lease_seconds: 0,
                lease_expires_ms: 0,
                owner: String::new(),
            },
            now_ms: 1_000,
        }
    }

    fn export(to: &[&str]) -> Command {
        Command::ApplyPolicies {
            docs: vec![PolicyRecord {
                kind: "Export".into(),
                name: "pay".into(),
                spec: serde_json::json!({"service": "pay.billing", "to": to}),
            }],
        }
    }

    fn run(db: &crate::storage::Db, cmds: &[Command]) {
        let mut ap = Applier::new(db).unwrap();
        for c in cmds {
            ap.apply(c).unwrap();
        }
        db.write_applied(ap.into_writes()).unwrap();
    }

    /// Catch-up keeps the Export table across parts of the history, so it
    /// must read it again when a later part carries an Export change made
    /// after the table was read: here the change widens `pay` to west while
    /// the stream is still sending the first part.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn catch_up_reads_the_export_table_again_after_a_newer_export_change() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::storage::Db::open(dir.path()).unwrap();
        let mut first = vec![export(&["east"]), endpoint("pay", "east", "h1")];
        // More than one part (1,024 events) of other services.
        first.extend((0..1100).map(|i| endpoint("ledger", "west", &format!("f{i}"))));
        run(&db, &first);
        let scope = Scope::new([], ["billing/pay".to_string()])
            .unwrap()
            .with_zone("west")
            .unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        let task = {
            let db = db.clone();
            tokio::spawn(async move {
                let mut last = 0;
                catch_up(&db, None, &scope, &mut last, &tx).await.unwrap()
            })
        };
        // The first part and its table were read once an event is queued;
        // the stream then waits for room, still in the first part.
        while rx.is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        run(
            &db,
            &[export(&["east", "west"]), endpoint("pay", "east", "h2")],
        );
        let mut got = Vec::new();
        while let Some(e) = rx.recv().await {
            got.push(e.unwrap());
        }
        assert!(task.await.unwrap());
        let last_of = |key: &str| {
            got.iter()
                .rev()
                .find(|e| e.key == key)
                .map(|e| (e.revision, e.deleted))
        };
        // h1 was held back (a deletion behind the first Export), then
        // re-sent as a put behind the widening; h2 came after it and
        // passes. A stale table would have ended both with a deletion.
        let widened = got
            .iter()
            .filter(|e| e.kind == "policy")
            .map(|e| e.revision)
            .max()
            .unwrap();
        assert_eq!(last_of("billing/pay/east/h1"), Some((widened, false)));
        assert_eq!(last_of("billing/pay/east/h2"), Some((widened + 1, false)));
        assert!(got.iter().all(|e| !e.key.starts_with("billing/ledger/")));
    }

    /// What a stream is sent is the same whether it catches up from the
    /// history alone or from what the hub keeps and then its batches: from
    /// before what the hub keeps (read from the history first), inside it,
    /// at its end, and ahead of the hub; for a scope that wants none of the
    /// changes but their Export changes too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn catch_up_from_the_hub_sends_what_the_history_would() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::storage::Db::open(dir.path()).unwrap();
        let mut cmds = vec![export(&["east"])];
        for i in 0..1500 {
            let service = ["pay", "ledger", "audit"][i % 3];
            let zone = ["east", "west"][i % 2];
            cmds.push(endpoint(service, zone, &format!("h{i}")));
            if i == 700 {
                cmds.push(export(&["east", "west"]));
            }
            if i == 1000 {
                // The same document now names another service: pay has no
                // Export from here on, and the change's topic is ledger's.
                // (Before what the hub hands out live in this test, whose
                // `hand_out` leaves out the re-sends `run` adds.)
                cmds.push(Command::ApplyPolicies {
                    docs: vec![PolicyRecord {
                        kind: "Export".into(),
                        name: "pay".into(),
                        spec: serde_json::json!({"service": "ledger.billing", "to": ["east"]}),
                    }],
                });
            }
        }
        run(&db, &cmds);
        let top = state::revision(&db).unwrap();
        let all = Scope::all();
        let unshared =
            |k: hub::Kept| -> Vec<_> { k.events.iter().map(|c| (**c).clone()).collect() };
        // The hub keeps what it handed out after revision 400, up to
        // `handed`, and is behind the store until the stream subscribed.
        let handed = 400 + PART as u64;
        let exports_now = Exports::from_records(state::export_docs(&db).unwrap().1.values());
        let scopes = [
            Scope::new([], ["billing/pay".to_string()])
                .unwrap()
                .with_zone("west")
                .unwrap(),
            Scope::new(["billing".to_string()], []).unwrap(),
            Scope::all().with_zone("east").unwrap(),
            Scope::new(["shop".to_string()], [])
                .unwrap()
                .with_zone("west")
                .unwrap(),
        ];
        for scope in &scopes {
            for from in [0, 399, 400, 650, handed, handed + 20, top] {
                // From the history alone.
                let (tx, mut rx) = mpsc::channel(4096);
                let mut last = from;
                assert!(catch_up(&db, None, scope, &mut last, &tx).await.unwrap());
                assert_eq!(last, top, "{scope} from {from}");
                drop(tx);
                let history = drain(&mut rx).await;
                // From the hub: subscribed, caught up to what it handed
                // out, then the rest in its batches.
                let hub = hub::Hub::detached(400, exports_now.clone());
                hub.hand_out_plain(unshared(history_after(&db, 400, &all).unwrap()));
                assert_eq!(hub.dispatched(), handed);
                let mut sub = hub.subscribe(&Arc::new(scope.clone()));
                let (tx, mut rx) = mpsc::channel(4096);
                let mut last = from;
                assert!(
                    catch_up(&db, Some(&hub), scope, &mut last, &tx)
                        .await
                        .unwrap()
                );
                assert_eq!(last, handed.max(from), "{scope} from {from}");
                hub.hand_out_plain(unshared(history_after(&db, handed, &all).unwrap()));
                while let Ok(batch) = sub.rx.try_recv() {
                    assert!(send_batch(&batch, &mut last, &tx).await);
                }
                drop(tx);
                let from_hub = drain(&mut rx).await;
                let wants_some = scope.namespaces().next() != Some("shop");
                assert!(
                    !history.is_empty() || from == top || !wants_some,
                    "{scope} from {from}"
                );
                let differs = history.iter().zip(&from_hub).position(|(a, b)| a != b);
                assert!(
                    history.len() == from_hub.len() && differs.is_none(),
                    "{scope} from {from}: {} events from the history, {} from the hub, first difference at {differs:?}",
                    history.len(),
                    from_hub.len()
                );
            }
        }
    }

    /// What a stream was sent: revision, key, deleted, value.
    async fn drain(
        rx: &mut mpsc::Receiver<Result<Arc<proto::WatchEvent>, Box<Status>>>,
    ) -> Vec<(u64, String, bool, bytes::Bytes)> {
        let mut sent = Vec::new();
        while let Some(e) = rx.recv().await {
            let e = e.unwrap();
            sent.push((e.revision, e.key.clone(), e.deleted, e.value_json.clone()));
        }
        sent
    }
}
