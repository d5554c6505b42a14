//! The proxy side of the watch: a local copy of the mesh (endpoints,
//! policies, zones) kept current from a server's change stream, checked by
//! the proxy before use, and acknowledged so the store knows each proxy's
//! drift.
//!
//! The copy outlives the connection: when every server is out of reach, the
//! proxy keeps routing on the last state it applied and resumes from that
//! revision when a server answers again (or takes a fresh snapshot when the
//! server no longer holds that much history).

pub use imbl::OrdMap;
pub use imbl::ordmap::DiffItem;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::acks;
use crate::client::Servers;
use crate::proto;
use crate::proto::watch_client::WatchClient;
use crate::scope::Scope;
use crate::state::{EndpointRecord, PolicyRecord, SYSTEM_NAMESPACE, ZoneRecord};

/// Bursts of events closer than this are applied (and acknowledged) as one.
const COALESCE: Duration = Duration::from_millis(20);
/// Acknowledgements are sent at most this often (each is a call to a server,
/// kept in its memory).
const ACK_EVERY: Duration = Duration::from_millis(250);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// A stream that lasted this long was working when it failed.
const STREAM_LIVED: Duration = Duration::from_secs(10);

/// The mesh as one proxy sees it at one revision.
///
/// Its maps are persistent (`imbl::OrdMap`): each accepted state is
/// published as a copy, and the copy costs O(1) and shares every entry that
/// did not change, where a `BTreeMap` was copied whole. Unscoped, with
/// 50,000 endpoints, that copy and the drop of the state it replaced were
/// more than half of a proxy's CPU per change (perf, testbed/bench-scale).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MeshState {
    /// Store revision this state reflects.
    pub revision: u64,
    /// Endpoints by `namespace/service/zone/id`.
    pub endpoints: OrdMap<String, EndpointRecord>,
    /// Policies by `kind/name`.
    pub policies: OrdMap<String, PolicyRecord>,
    /// Zones by name.
    pub zones: OrdMap<String, ZoneRecord>,
    /// False until the first snapshot arrived.
    pub synced: bool,
}

impl MeshState {
    /// Endpoints of one service, in every zone.
    pub fn endpoints_of<'a>(
        &'a self,
        namespace: &'a str,
        service: &'a str,
    ) -> impl Iterator<Item = &'a EndpointRecord> + 'a {
        let prefix = format!("{namespace}/{service}/");
        self.endpoints
            .range(prefix.clone()..)
            .take_while(move |(k, _)| k.starts_with(&prefix))
            .map(|(_, e)| e)
    }

    /// Policies of one kind.
    pub fn policies_of<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a PolicyRecord> + 'a {
        self.policies.values().filter(move |p| p.kind == kind)
    }

    /// The zones that serve a service only through plain endpoints (no
    /// sidecar there): each such zone's gateway terminates for it, and
    /// callers admit that zone's gateways for it, and only for it. A zone
    /// with a sidecar endpoint of the service, healthy or not, serves it
    /// end to end and its plain endpoints are ignored: the one rule the
    /// gateways' routes and the sidecars' directories both follow.
    pub fn plain_zones(&self, namespace: &str, service: &str) -> BTreeSet<String> {
        let mut plain = BTreeSet::new();
        let mut sidecar = BTreeSet::new();
        for e in self.endpoints_of(namespace, service) {
            if e.is_plain() {
                // Without a port, no stream could name one.
                if !e.ports.is_empty() {
                    plain.insert(e.zone.clone());
                }
            } else {
                sidecar.insert(e.zone.clone());
            }
        }
        plain.retain(|z| !sidecar.contains(z));
        plain
    }

    /// What the endpoints changed since `old`: the `(namespace, service)` of
    /// every endpoint added, removed or changed for which `keep` holds, and
    /// whether a system endpoint (a zone's gateway) changed. The diff skips
    /// the subtrees both states share, so it costs what changed.
    pub fn changed_services(
        &self,
        old: &MeshState,
        keep: impl Fn(&EndpointRecord) -> bool,
    ) -> (BTreeSet<(String, String)>, bool) {
        let mut services = BTreeSet::new();
        let mut gateways = false;
        for d in old.endpoints.diff(&self.endpoints) {
            // The key holds namespace, service and zone, so an update's old
            // and new record agree on them.
            let e = match d {
                DiffItem::Add(_, e) | DiffItem::Remove(_, e) => e,
                DiffItem::Update { new: (_, e), .. } => e,
            };
            if e.namespace == SYSTEM_NAMESPACE {
                gateways = true;
            } else if keep(e) {
                services.insert((e.namespace.clone(), e.service.clone()));
            }
        }
        (services, gateways)
    }

    /// Applies one event; unknown kinds (added by newer servers) are skipped.
    fn apply(&mut self, e: &proto::WatchEvent) -> Result<(), String> {
        fn put<T: serde::de::DeserializeOwned + Clone>(
            map: &mut OrdMap<String, T>,
            e: &proto::WatchEvent,
        ) -> Result<(), String> {
            if e.deleted {
                map.remove(&e.key);
            } else {
                let v = serde_json::from_slice(&e.value_json)
                    .map_err(|err| format!("{} {}: {err}", e.kind, e.key))?;
                map.insert(e.key.clone(), v);
            }
            Ok(())
        }
        match e.kind.as_str() {
            "endpoint" => put(&mut self.endpoints, e)?,
            "policy" => put(&mut self.policies, e)?,
            "zone" => put(&mut self.zones, e)?,
            _ => {}
        }
        self.revision = self.revision.max(e.revision);
        Ok(())
    }
}

/// Checks a state before the proxy uses it. `Ok(skipped)` applies it: each
/// entry names a document the proxy cannot apply and leaves out (as
/// `Kind/name: field: reason`), and the acknowledgement of the revision
/// carries them in `rejected`, so one bad document never holds back the
/// rest (endpoints, health, other policies). `Err(reason)` rejects the whole
/// state, and the proxy keeps the one it had.
///
/// A check reads only `state.policies`: its verdict is kept and reused
/// until they change, since most revisions (endpoints, health) change none
/// and parsing every document for each would cost in proportion to the
/// mesh's policies, not to the change.
pub type Check = Arc<dyn Fn(&MeshState) -> Verdict + Send + Sync>;

/// What a [`Check`] says of a state.
pub type Verdict = Result<Vec<String>, String>;

/// `check`, run again only when the policies differ from the last ones it
/// judged (see [`Check`]).
fn once_per_policies(check: Check) -> impl FnMut(&MeshState) -> Verdict {
    let mut last: Option<(OrdMap<String, PolicyRecord>, Verdict)> = None;
    move |state| {
        if let Some((policies, verdict)) = &last
            && policies.diff(&state.policies).next().is_none()
        {
            return verdict.clone();
        }
        let verdict = check(state);
        last = Some((state.policies.clone(), verdict.clone()));
        verdict
    }
}

/// Follows the watch of the whole mesh until `shutdown`, publishing each
/// accepted state on the returned receiver (which starts empty and
/// unsynced).
pub fn follow(
    servers: Servers,
    check: Check,
    shutdown: CancellationToken,
) -> watch::Receiver<Arc<MeshState>> {
    follow_scoped(servers, Scope::all(), check, shutdown)
}

/// [`follow`], receiving only what `scope` names (see [`crate::scope`]).
/// A state is acknowledged once published.
pub fn follow_scoped(
    servers: Servers,
    scope: Scope,
    check: Check,
    shutdown: CancellationToken,
) -> watch::Receiver<Arc<MeshState>> {
    follow_inner(servers, scope, check, None, shutdown)
}

/// Said by the user of a state once it applies it (see [`follow_applied`]).
#[derive(Debug, Clone)]
pub struct Applied(Arc<watch::Sender<u64>>);

impl Applied {
    /// The state of `revision` is in use.
    pub fn done(&self, revision: u64) {
        self.0.send_if_modified(|r| {
            let moved = revision > *r;
            *r = (*r).max(revision);
            moved
        });
    }
}

/// [`follow_scoped`], acknowledging a state only once its user says it
/// applied it ([`Applied::done`]), not when it is handed over: an
/// acknowledgement tells operators (and `trellis status`) that the proxy
/// routes by that revision.
pub fn follow_applied(
    servers: Servers,
    scope: Scope,
    check: Check,
    shutdown: CancellationToken,
) -> (watch::Receiver<Arc<MeshState>>, Applied) {
    let (applied_tx, applied_rx) = watch::channel(0);
    let rx = follow_inner(servers, scope, check, Some(applied_rx), shutdown);
    (rx, Applied(Arc::new(applied_tx)))
}

/// An acknowledgement: the revision, what was left out of it, and the
/// revision of the state it rests on (the last one handed over).
type Ack = Option<(u64, String, u64)>;

fn follow_inner(
    servers: Servers,
    scope: Scope,
    check: Check,
    applied: Option<watch::Receiver<u64>>,
    shutdown: CancellationToken,
) -> watch::Receiver<Arc<MeshState>> {
    let (tx, rx) = watch::channel(Arc::new(MeshState::default()));
    let (ack_tx, ack_rx) = watch::channel::<Ack>(None);
    tokio::spawn(acks(servers.clone(), ack_rx, applied, shutdown.clone()));
    let mut check = once_per_policies(check);
    tokio::spawn(async move {
        let mut latest = MeshState::default();
        let mut backoff = BACKOFF_MIN;
        loop {
            let mut answered: Option<tokio::time::Instant> = None;
            let r = tokio::select! {
                () = shutdown.cancelled() => return,
                r = stream(&servers, &scope, &mut latest, &mut check, &tx, &ack_tx, &mut answered) => r,
            };
            // A working stream's end (a server stopping ends it cleanly;
            // one that lived a while failed after working) starts the
            // backoff over, or a long-lived proxy would wait the longest
            // backoff at every later reconnect. A server that answers and
            // then fails at once keeps the backoff growing.
            if answered.is_some_and(|at| r.is_ok() || at.elapsed() >= STREAM_LIVED) {
                backoff = BACKOFF_MIN;
            }
            let (_, addr) = servers.current();
            let addr = addr.to_string();
            match r {
                Err(s) if s.code() == tonic::Code::OutOfRange => {
                    // The server no longer holds our revision: start over.
                    tracing::info!(server = %addr, "watch history gone; taking a fresh snapshot");
                    latest.revision = 0;
                    continue;
                }
                Err(s) => {
                    tracing::warn!(server = %addr, code = ?s.code(), error = %s.message(), revision = latest.revision, "watch interrupted; routing on the last applied state");
                    servers.next(&addr);
                }
                Ok(()) => {
                    tracing::info!(server = %addr, "watch ended by the server; reconnecting");
                    servers.next(&addr);
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(jittered(backoff)) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    });
    rx
}

/// Somewhere in the upper half of `backoff`: every proxy of a server that
/// stops loses its stream at the same instant, and without the spread
/// they would all arrive at their next server in the same instant too.
fn jittered(backoff: Duration) -> Duration {
    backoff / 2 + backoff.mul_f64(fastrand::f64() / 2.0)
}

/// One watch stream: resumes after `latest.revision` (or snapshots from 0).
async fn stream(
    servers: &Servers,
    scope: &Scope,
    latest: &mut MeshState,
    check: &mut impl FnMut(&MeshState) -> Verdict,
    tx: &watch::Sender<Arc<MeshState>>,
    ack: &watch::Sender<Ack>,
    answered: &mut Option<tokio::time::Instant>,
) -> Result<(), tonic::Status> {
    let (channel, _) = servers.current();
    let (namespaces, services) = scope.to_lists();
    let mut s = WatchClient::new(channel)
        .watch(proto::WatchRequest {
            from_revision: latest.revision,
            namespaces,
            services,
            zone: scope.zone().unwrap_or_default().to_string(),
        })
        .await?
        .into_inner();
    // A new stream may be on another server, which has not heard our
    // acknowledgement: say it again.
    if latest.synced {
        ack.send_modify(|_| {});
    }
    let mut snapshot: Option<MeshState> = None;
    while let Some(first) = s.message().await? {
        // From the first message: a wait in a crowded server's queue is
        // not a stream that worked.
        answered.get_or_insert_with(tokio::time::Instant::now);
        let mut batch = vec![first];
        // Take whatever else arrives right behind it, so a burst (a policy
        // apply, a zone leaving) is checked and acknowledged once.
        while let Ok(r) = tokio::time::timeout(COALESCE, s.message()).await {
            match r? {
                Some(e) => batch.push(e),
                None => break,
            }
            if batch.len() >= 4096 {
                break;
            }
        }
        let mut changed = false;
        let mut progressed = false;
        for e in &batch {
            if e.kind == "progress" && !e.snapshot {
                // Nothing in our scope changed up to here.
                if latest.synced && e.revision > latest.revision {
                    latest.revision = e.revision;
                    progressed = true;
                }
            } else if e.snapshot && e.kind == "sync" {
                let mut snap = snapshot.take().unwrap_or_default();
                snap.revision = e.revision;
                snap.synced = true;
                *latest = snap;
                changed = true;
            } else if e.snapshot {
                let snap = snapshot.get_or_insert_with(MeshState::default);
                if let Err(reason) = snap.apply(e) {
                    reject(ack, e.revision, reason);
                }
            } else if let Err(reason) = latest.apply(e) {
                reject(ack, e.revision, reason);
            } else {
                changed = true;
            }
        }
        if changed && latest.synced {
            match check(latest) {
                Ok(skipped) => {
                    for reason in &skipped {
                        tracing::warn!(revision = latest.revision, %reason, "cannot apply a policy document; applying the rest of the revision without it");
                    }
                    tx.send_replace(Arc::new(latest.clone()));
                    ack.send_replace(Some((latest.revision, skipped.join("; "), latest.revision)));
                }
                Err(reason) => {
                    tracing::warn!(revision = latest.revision, %reason, "rejected a mesh configuration; keeping the previous one");
                    reject(ack, latest.revision, reason);
                }
            }
        } else if progressed {
            // The state in use is current up to here; its verdict stands.
            let rev = latest.revision;
            ack.send_modify(|a| match a {
                Some(a) => a.0 = rev,
                None => *a = Some((rev, String::new(), 0)),
            });
        }
    }
    Ok(())
}

fn reject(ack: &watch::Sender<Ack>, revision: u64, reason: String) {
    let reason = if reason.is_empty() {
        "rejected".to_string()
    } else {
        reason
    };
    // A rejected state is not handed over: it rests on the one in use.
    ack.send_modify(|a| {
        let rests_on = a.as_ref().map_or(0, |a| a.2);
        *a = Some((revision, reason, rests_on));
    });
}

/// Sends the latest acknowledgement, at most once per [`ACK_EVERY`], until
/// `shutdown`: when it changes, when the watch moved to another server, and
/// every [`acks::REFRESH`] while nothing changes (servers forget proxies
/// that fall silent). A failed call is retried with the then-latest value.
/// With `applied`, an acknowledgement waits until the state it rests on is
/// in use.
async fn acks(
    servers: Servers,
    mut rx: watch::Receiver<Ack>,
    mut applied: Option<watch::Receiver<u64>>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
            () = tokio::time::sleep(acks::REFRESH) => {}
        }
        let Some(mut want) = rx.borrow_and_update().clone() else {
            continue;
        };
        if let Some(applied) = applied.as_mut() {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    r = applied.wait_for(|r| *r >= want.2) => if r.is_err() {
                        // Its user (the agent's directory loop) ended:
                        // nothing it is handed is applied any more.
                        tracing::error!("the mesh view's user stopped; no longer acknowledging");
                        return;
                    },
                }
                // A newer one may have come meanwhile; it may rest on a
                // state not applied yet.
                match rx.borrow_and_update().clone() {
                    Some(next) if next.2 > want.2 => want = next,
                    Some(next) => {
                        want = next;
                        break;
                    }
                    None => break,
                }
            }
        }
        let req = proto::AckRequest {
            proxy: String::new(),
            revision: want.0,
            rejected: want.1.clone(),
        };
        let r = servers
            .call(|ch| async move { WatchClient::new(ch).ack(req).await })
            .await;
        if let Err(s) = r {
            tracing::debug!(error = %s.message(), "ack failed; will retry");
            // Mark dirty so the next round retries even without news.
            rx.mark_changed();
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(ACK_EVERY) => {}
        }
    }
}

/// How often a proxy asks for the trust bundle.
const BUNDLE_POLL: Duration = Duration::from_secs(5);

/// Keeps `trust` equal to the bundle the servers serve, and writes each new
/// one next to the credentials at `prefixes` (`PREFIX.bundle`) so a restart
/// starts from it. The answer comes over a connection verified with the
/// bundle we hold, so a new bundle is as trustworthy as the old one; it must
/// keep the trust domain.
pub async fn follow_bundle(
    servers: Servers,
    trust: Vec<Arc<trellis_ca::tls::TrustStore>>,
    prefixes: Vec<std::path::PathBuf>,
    shutdown: CancellationToken,
) {
    let Some(first) = trust.first() else { return };
    let td = first.bundle().trust_domain().clone();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(BUNDLE_POLL) => {}
        }
        let pem = match servers
            .call(|ch| async move {
                crate::proto::zones_client::ZonesClient::new(ch)
                    .bundle(proto::Empty {})
                    .await
            })
            .await
        {
            Ok(r) => r.bundle_pem,
            Err(_) => continue,
        };
        let addr = servers.current().1.to_string();
        let current = first.bundle();
        if pem == current.to_pem() {
            continue;
        }
        let bundle = match trellis_ca::TrustBundle::from_pem(td.clone(), pem.as_bytes(), &addr) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(server = %addr, error = %e, "the served trust bundle is unusable; keeping ours");
                continue;
            }
        };
        if bundle == current {
            continue;
        }
        if !current.continued_by(&bundle) {
            tracing::warn!(server = %addr, "the served trust bundle holds none of the roots trusted now; refusing it (a rotation keeps the old root until every proxy has the new one)");
            continue;
        }
        tracing::info!(server = %addr, roots = bundle.roots().len(), "trust bundle changed");
        for t in &trust {
            t.update(bundle.clone());
        }
        for p in &prefixes {
            let path = trellis_ca::credential_paths(p).2;
            if let Err(e) = trellis_ca::files::write_public(&path, bundle.to_pem().as_bytes()) {
                tracing::warn!(path = %path.display(), error = %e, "could not write the new trust bundle");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(rev: u64, kind: &str, key: &str, value: Option<&str>) -> proto::WatchEvent {
        proto::WatchEvent {
            revision: rev,
            kind: kind.into(),
            key: key.into(),
            value_json: bytes::Bytes::copy_from_slice(value.unwrap_or_default().as_bytes()),
            deleted: value.is_none(),
            snapshot: false,
        }
    }

    #[test]
    fn events_build_and_unbuild_the_state() {
        let mut s = MeshState::default();
        let ep = r#"{"namespace":"shop","service":"catalog","zone":"west","id":"h1","address":"10.0.0.1","ports":[8080],"protocol":"http","labels":{},"healthy":true,"lease_seconds":10,"lease_expires_ms":0}"#;
        s.apply(&ev(3, "endpoint", "shop/catalog/west/h1", Some(ep)))
            .unwrap();
        s.apply(&ev(4, "member", "x", Some("{}"))).unwrap();
        assert_eq!(s.revision, 4);
        assert_eq!(s.endpoints_of("shop", "catalog").count(), 1);
        assert_eq!(s.endpoints_of("shop", "cat").count(), 0);
        s.apply(&ev(5, "endpoint", "shop/catalog/west/h1", None))
            .unwrap();
        assert_eq!(s.endpoints_of("shop", "catalog").count(), 0);
        let err = s
            .apply(&ev(6, "zone", "west", Some("{not json")))
            .unwrap_err();
        assert!(err.contains("zone west"), "{err}");
    }

    #[test]
    fn a_check_runs_again_only_when_the_policies_change() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let mut check = once_per_policies(Arc::new(move |s: &MeshState| {
            counted.fetch_add(1, Ordering::SeqCst);
            match s.policies.len() {
                2 => Err("two".into()),
                n => Ok(vec![format!("{n} policies")]),
            }
        }));
        let ep = r#"{"namespace":"shop","service":"catalog","zone":"west","id":"h1","address":"10.0.0.1","ports":[8080],"protocol":"http","labels":{},"healthy":true,"lease_seconds":10,"lease_expires_ms":0}"#;
        let pol = r#"{"kind":"Authorization","name":"a","spec":{}}"#;
        let mut s = MeshState::default();
        assert_eq!(check(&s), Ok(vec!["0 policies".to_string()]));
        s.apply(&ev(2, "endpoint", "shop/catalog/west/h1", Some(ep)))
            .unwrap();
        assert_eq!(check(&s), Ok(vec!["0 policies".to_string()]));
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "an endpoint change re-ran it"
        );
        s.apply(&ev(3, "policy", "Authorization/a", Some(pol)))
            .unwrap();
        assert_eq!(check(&s), Ok(vec!["1 policies".to_string()]));
        s.apply(&ev(4, "policy", "Authorization/b", Some(pol)))
            .unwrap();
        assert_eq!(check(&s), Err("two".to_string()));
        // A rejection is kept as well, until the policies change again.
        s.apply(&ev(5, "endpoint", "shop/catalog/west/h1", None))
            .unwrap();
        assert_eq!(check(&s), Err("two".to_string()));
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        s.apply(&ev(6, "policy", "Authorization/b", None)).unwrap();
        assert_eq!(check(&s), Ok(vec!["1 policies".to_string()]));
        assert_eq!(runs.load(Ordering::SeqCst), 4);
    }
}
