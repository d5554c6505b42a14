//! The registry sync end to end: kube-rs reflectors against the fake API
//! server (list, watch with bookmarks, 410 and relist, cut connections),
//! a real federation server, and the controller's diff.

use std::time::{Duration, Instant};

use trellis_kube::testing::{Kind, endpoint_slice, namespace, pod, service};

#[path = "support/zone.rs"]
mod support;
use support::{Zone, find};

const SECOND: Duration = Duration::from_secs(1);
const PORTS: &[(&str, u16)] = &[("http", 8080)];

fn shop(z: &Zone) {
    z.api
        .apply(namespace("shop", &[("trellis.io/inject", "enabled")]));
    z.api.apply(namespace("legacy", &[]));
    z.api.apply(service("shop", "catalog", &[], PORTS));
    z.api.apply(endpoint_slice(
        "shop",
        "catalog",
        "catalog-abc12",
        &[
            ("10.244.1.10", "catalog-1", true),
            ("10.244.1.11", "catalog-2", true),
        ],
        PORTS,
    ));
}

fn plain(eps: &[trellis_federation::proto::Endpoint]) -> usize {
    eps.iter()
        .filter(|e| e.labels.get("trellis.plain").map(String::as_str) == Some("true"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_reach_the_registry_and_changes_follow_within_a_second() {
    let z = Zone::start(27200).await;
    shop(&z);
    // Injected pods register themselves: their addresses are left out.
    z.api.apply(pod(
        "shop",
        "catalog-2",
        "uid-c2",
        "catalog",
        "Running",
        &[("trellis.io/injected", "true")],
    ));
    // A namespace that is not opted in, exported by annotation.
    z.api.apply(service(
        "legacy",
        "billing",
        &[("trellis.io/export", "true")],
        &[("grpc", 9090)],
    ));
    z.api.apply(endpoint_slice(
        "legacy",
        "billing",
        "billing-x",
        &[("10.244.2.5", "billing-0", true)],
        &[("grpc", 9090)],
    ));
    // ...and one that is not exported.
    z.api.apply(service("legacy", "ledger", &[], PORTS));
    z.api.apply(endpoint_slice(
        "legacy",
        "ledger",
        "ledger-x",
        &[("10.244.2.6", "ledger-0", true)],
        PORTS,
    ));
    let c = z.controller(true).await;

    z.until("initial sync", 10 * SECOND, |eps| plain(eps) == 2)
        .await;
    let (_, eps) = z.registry().await;
    let e = find(&eps, "catalog", "catalog-1").expect("catalog-1");
    assert_eq!(e.address, "10.244.1.10");
    assert_eq!(e.ports, vec![8080]);
    assert_eq!(e.protocol, "http");
    assert!(e.healthy);
    assert_eq!(e.key.as_ref().unwrap().zone, "k8s");
    assert!(
        find(&eps, "catalog", "catalog-2").is_none(),
        "an injected pod is skipped"
    );
    assert_eq!(find(&eps, "billing", "billing-0").unwrap().protocol, "grpc");
    assert!(find(&eps, "ledger", "ledger-0").is_none());

    // Readiness flips: the slice's condition, written within a second.
    let t = Instant::now();
    z.api.apply(endpoint_slice(
        "shop",
        "catalog",
        "catalog-abc12",
        &[("10.244.1.10", "catalog-1", false)],
        PORTS,
    ));
    z.until("readiness flip", SECOND, |eps| {
        find(eps, "catalog", "catalog-1").is_some_and(|e| !e.healthy)
    })
    .await;
    let flip = t.elapsed();

    // A new pod, then the slice deleted: gone within a second.
    z.api.apply(endpoint_slice(
        "shop",
        "catalog",
        "catalog-abc12",
        &[
            ("10.244.1.10", "catalog-1", true),
            ("10.244.1.12", "catalog-3", true),
        ],
        PORTS,
    ));
    z.until("new pod", SECOND, |eps| {
        find(eps, "catalog", "catalog-3").is_some()
    })
    .await;
    let t = Instant::now();
    assert!(z.api.delete(Kind::EndpointSlice, "shop", "catalog-abc12"));
    z.until("slice deleted", SECOND, |eps| {
        find(eps, "catalog", "catalog-1").is_none() && find(eps, "catalog", "catalog-3").is_none()
    })
    .await;
    let deletion = t.elapsed();

    // A Service annotated export=false leaves; deleting a Service does too.
    let t = Instant::now();
    z.api.apply(service(
        "legacy",
        "billing",
        &[("trellis.io/export", "false")],
        &[("grpc", 9090)],
    ));
    z.until("export withdrawn", SECOND, |eps| {
        find(eps, "billing", "billing-0").is_none()
    })
    .await;
    let withdrawn = t.elapsed();
    eprintln!(
        "latency: readiness flip {flip:?}, slice deletion {deletion:?}, export withdrawn {withdrawn:?}"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_watch_resumes_and_a_compacted_one_relists() {
    let z = Zone::start(27210).await;
    shop(&z);
    let c = z.controller(true).await;
    z.until("initial sync", 10 * SECOND, |eps| plain(eps) == 2)
        .await;
    let lists = z.api.requests("/endpointslices?");
    let watches = z.api.requests("watch=true");
    assert!(
        z.api.requests("allowWatchBookmarks=true") >= 4,
        "every watch asks for bookmarks"
    );

    // Connections cut: the watchers resume from their resource version.
    z.api.cut_watches();
    z.api.apply(endpoint_slice(
        "shop",
        "catalog",
        "catalog-abc12",
        &[("10.244.1.10", "catalog-1", true)],
        PORTS,
    ));
    z.until("change after a cut", 5 * SECOND, |eps| {
        find(eps, "catalog", "catalog-2").is_none()
    })
    .await;
    assert!(
        z.api.requests("watch=true") > watches,
        "the watches reconnected"
    );

    // History compacted while cut: 410 Gone, then a relist that sees what
    // changed meanwhile (a slice deleted, another added).
    let lists_before_410 = z.api.requests("/endpointslices?");
    z.api.compact();
    z.api.cut_watches();
    z.api.delete(Kind::EndpointSlice, "shop", "catalog-abc12");
    z.api.apply(endpoint_slice(
        "shop",
        "catalog",
        "catalog-def34",
        &[("10.244.1.20", "catalog-7", true)],
        PORTS,
    ));
    z.api.compact();
    z.until("state after relist", 10 * SECOND, |eps| {
        find(eps, "catalog", "catalog-1").is_none() && find(eps, "catalog", "catalog-7").is_some()
    })
    .await;
    let relists = z.api.requests("/endpointslices?") - lists_before_410;
    assert!(
        relists >= 1,
        "a 410 makes the watcher list again ({lists} lists before)"
    );
    c.stop().await;
}

/// The store's revision once it has not moved for a second.
async fn settled_revision(z: &Zone) -> u64 {
    let (mut rev, _) = z.registry().await;
    let mut since = Instant::now();
    while since.elapsed() < SECOND {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (now, _) = z.registry().await;
        if now != rev {
            (rev, since) = (now, Instant::now());
        }
    }
    rev
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_resynchronises_without_flapping() {
    let z = Zone::start(27220).await;
    shop(&z);
    let c = z.controller(true).await;
    z.until("initial sync", 10 * SECOND, |eps| plain(eps) == 2)
        .await;
    // A young server still writes its own records (members) for a moment:
    // count from a revision nobody has moved for a second.
    let rev = settled_revision(&z).await;
    let (_, before) = z.registry().await;
    c.stop().await;

    // While it is down: one pod goes away.
    z.api.apply(endpoint_slice(
        "shop",
        "catalog",
        "catalog-abc12",
        &[("10.244.1.10", "catalog-1", true)],
        PORTS,
    ));
    let c = z.controller(true).await;
    z.until("the restarted controller caught up", 10 * SECOND, |eps| {
        find(eps, "catalog", "catalog-2").is_none()
    })
    .await;
    // Give it time to write anything else it would write.
    tokio::time::sleep(2 * SECOND).await;
    let (rev2, after) = z.registry().await;
    // Exactly one event: the deregistration. catalog-1, still true, was
    // neither deleted nor written again.
    assert_eq!(
        rev2,
        rev + 1,
        "store revisions {rev} -> {rev2}: the restart wrote more than the one change"
    );
    let e1 = |eps: &[trellis_federation::proto::Endpoint]| {
        find(eps, "catalog", "catalog-1").cloned().unwrap()
    };
    assert_eq!(e1(&before).address, e1(&after).address);
    assert!(
        e1(&after).lease_expires_ms > e1(&before).lease_expires_ms,
        "renewed, not re-registered"
    );

    // And a restart with nothing changed writes nothing at all.
    c.stop().await;
    let c = z.controller(true).await;
    tokio::time::sleep(3 * SECOND).await;
    let (rev3, _) = z.registry().await;
    assert_eq!(rev3, rev2, "an idle restart made store events");
    c.stop().await;
}
