//! Scoped watches and acknowledgements off the Raft log, on a real
//! three-server cluster over mutual TLS on loopback.

use std::time::{Duration, Instant};

use trellis_federation::client;
use trellis_federation::proto::*;

#[path = "support/mesh.rs"]
mod mesh;
use mesh::{Mesh, leader};
use trellis_federation::server::Server;

fn ep(ns: &str, svc: &str, zone: &str, id: &str) -> Endpoint {
    Endpoint {
        key: Some(EndpointKey {
            namespace: ns.into(),
            service: svc.into(),
            zone: zone.into(),
            id: id.into(),
        }),
        address: "10.0.0.9".into(),
        ports: vec![8080],
        protocol: "http".into(),
        healthy: true,
        ..Default::default()
    }
}

fn authz(name: &str, service: &str) -> PolicyDocs {
    PolicyDocs {
        docs: vec![PolicyDoc {
            key: Some(PolicyKey {
                kind: "Authorization".into(),
                name: name.into(),
            }),
            spec_json: format!(r#"{{"service": "{service}", "allow": ["ns:shop"]}}"#),
        }],
    }
}

/// Three servers with `endpoints` registered through the leader, and the
/// credentials of an operator and of an agent of zone east.
struct Fixture {
    servers: Vec<Server>,
    /// Which server leads.
    l: usize,
    op: std::path::PathBuf,
    agent: std::path::PathBuf,
    // Last: its directory outlives the servers.
    _mesh: Mesh,
}

impl Fixture {
    async fn new(endpoints: impl IntoIterator<Item = Endpoint>) -> Self {
        let mesh = Mesh::new();
        let servers = mesh.cluster(3).await;
        let l = leader(&servers.iter().collect::<Vec<_>>()).await;
        let fx = Self {
            l,
            op: mesh.creds("operator/alice"),
            agent: mesh.creds("zone/east/agent/vm1"),
            servers,
            _mesh: mesh,
        };
        let mut reg = fx.registry();
        for e in endpoints {
            reg.register(e).await.unwrap();
        }
        fx
    }

    fn addr(&self, i: usize) -> String {
        self.servers[i].addr.to_string()
    }

    /// The operator's channel to the leader.
    fn operator(&self) -> tonic::transport::Channel {
        client::connect(&self.addr(self.l), &self.op).unwrap()
    }

    fn registry(&self) -> registry_client::RegistryClient<tonic::transport::Channel> {
        registry_client::RegistryClient::new(self.operator())
    }

    fn policy(&self) -> policy_client::PolicyClient<tonic::transport::Channel> {
        policy_client::PolicyClient::new(self.operator())
    }
}

/// Waits until the server at `addr` has applied `revision`.
async fn applied(addr: &str, op: &std::path::Path, revision: u64) {
    let mut c = cluster_client::ClusterClient::new(client::connect(addr, op).unwrap());
    let t = Instant::now();
    while c.status(Empty {}).await.unwrap().into_inner().revision < revision {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{addr} never caught up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads events until `until` is true of one; returns every event read.
async fn read_until(
    s: &mut tonic::Streaming<WatchEvent>,
    within: Duration,
    until: impl Fn(&WatchEvent) -> bool,
) -> Vec<WatchEvent> {
    let mut out = Vec::new();
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let e = tokio::time::timeout(left, s.message())
            .await
            .unwrap_or_else(|_| panic!("nothing matched within {within:?}; read {out:#?}"))
            .expect("watch stream")
            .expect("stream open");
        let done = until(&e);
        out.push(e);
        if done {
            return out;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_watch_carries_what_it_calls_and_acks_stay_off_the_log() {
    let fx = Fixture::new([
        ep("shop", "catalog", "east", "c1"),
        ep("billing", "pay", "east", "p1"),
        ep("billing", "ledger", "east", "l1"),
        ep("trellis-system", "gateway", "east", "gw1"),
    ])
    .await;
    let (l, op, agent, opc) = (fx.l, &fx.op, &fx.agent, fx.operator());
    let addr = |i: usize| fx.addr(i);
    let (mut reg, mut pol) = (fx.registry(), fx.policy());
    pol.apply(authz("catalog", "catalog.shop")).await.unwrap();
    let written = pol
        .apply(authz("ledger", "ledger.billing"))
        .await
        .unwrap()
        .into_inner()
        .revision;

    // A proxy of namespace shop that calls billing's pay, on a follower
    // that has applied the writes above.
    let f = (l + 1) % 3;
    let mut fc = cluster_client::ClusterClient::new(client::connect(&addr(f), op).unwrap());
    let t = Instant::now();
    let mut fz = zones_client::ZonesClient::new(client::connect(&addr(f), op).unwrap());
    // The servers record their zone on their own, some time after the
    // first leader is elected.
    while fc.status(Empty {}).await.unwrap().into_inner().revision < written
        || fz
            .list(ReadOptions::default())
            .await
            .unwrap()
            .into_inner()
            .zones
            .is_empty()
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the follower never caught up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut w = watch_client::WatchClient::new(client::connect(&addr(f), agent).unwrap());
    let scoped = WatchRequest {
        from_revision: 0,
        namespaces: vec!["shop".into()],
        services: vec!["billing/pay".into()],
        zone: String::new(),
    };
    let mut s = w.watch(scoped.clone()).await.unwrap().into_inner();
    let snap = read_until(&mut s, Duration::from_secs(10), |e| e.kind == "sync").await;
    let mut keys: Vec<String> = snap
        .iter()
        .filter(|e| e.kind != "sync")
        .map(|e| format!("{} {}", e.kind, e.key))
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "endpoint billing/pay/east/p1",
            "endpoint shop/catalog/east/c1",
            "endpoint trellis-system/gateway/east/gw1",
            "policy Authorization/catalog",
            "zone east",
        ],
        "the snapshot holds the scope, the gateways and the zones only"
    );
    let base = snap.last().unwrap().revision;

    // Out of scope: nothing arrives; in scope: it does, in order.
    let r1 = reg
        .register(ep("billing", "ledger", "east", "l2"))
        .await
        .unwrap()
        .into_inner()
        .revision;
    let r2 = reg
        .register(ep("billing", "pay", "east", "p2"))
        .await
        .unwrap()
        .into_inner()
        .revision;
    assert!(r2 > r1 && r1 > base);
    let got = read_until(&mut s, Duration::from_secs(10), |e| {
        e.key.starts_with("billing/pay")
    })
    .await;
    assert_eq!(
        got.len(),
        1,
        "the ledger change must not reach this proxy: {got:#?}"
    );
    assert_eq!(got[0].revision, r2);

    // Only out-of-scope changes: a progress marker says how far the store
    // came, within the progress interval (5 s).
    let r3 = reg
        .register(ep("billing", "ledger", "east", "l3"))
        .await
        .unwrap()
        .into_inner()
        .revision;
    let t = Instant::now();
    let got = read_until(&mut s, Duration::from_secs(8), |e| e.kind == "progress").await;
    assert_eq!(got.len(), 1, "{got:#?}");
    assert!(got[0].revision >= r3, "{got:#?}");
    eprintln!("progress after {:?}", t.elapsed());

    // A policy deletion reaches everyone (its value, and so its service,
    // is gone), even one out of scope.
    pol.delete(PolicyKey {
        kind: "Authorization".into(),
        name: "ledger".into(),
    })
    .await
    .unwrap();
    let got = read_until(&mut s, Duration::from_secs(10), |e| e.kind == "policy").await;
    assert!(got.last().unwrap().deleted);

    // A stream resumed from a revision gets the in-scope changes after it,
    // with no snapshot.
    let mut s2 = w
        .watch(WatchRequest {
            from_revision: base,
            ..scoped.clone()
        })
        .await
        .unwrap()
        .into_inner();
    let first = read_until(&mut s2, Duration::from_secs(10), |_| true).await;
    assert!(!first[0].snapshot, "{first:?}");
    assert_eq!(first[0].key, "billing/pay/east/p2", "{first:?}");

    // A malformed scope is refused, naming the entry.
    let e = w
        .watch(WatchRequest {
            from_revision: 0,
            namespaces: vec!["Shop".into()],
            services: vec![],
            zone: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("WatchRequest: namespaces: \"Shop\""),
        "{e:?}"
    );

    // Acknowledgements: kept by the server asked, never a Raft write (the
    // revision does not move), and merged across servers for an operator
    // asking any other server.
    let before = cluster_client::ClusterClient::new(opc.clone())
        .status(Empty {})
        .await
        .unwrap()
        .into_inner();
    for _ in 0..50 {
        w.ack(AckRequest {
            proxy: "spiffe://test.local/zone/east/agent/someone-else".into(),
            revision: r3,
            rejected: String::new(),
        })
        .await
        .unwrap();
    }
    let other = (l + 2) % 3;
    let list = watch_client::WatchClient::new(client::connect(&addr(other), op).unwrap())
        .proxies(ReadOptions::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.servers.len(), 3, "{list:?}");
    assert!(list.missing.is_empty(), "{list:?}");
    let me: Vec<_> = list.proxies.iter().collect();
    assert_eq!(me.len(), 1, "{list:?}");
    // The certificate names the proxy, whatever the body claims.
    assert_eq!(me[0].proxy, "spiffe://test.local/zone/east/agent/vm1");
    assert_eq!(me[0].revision, r3);
    assert!(me[0].server.starts_with("east/"), "{list:?}");
    assert!(me[0].seen_unix_ms > 0, "{list:?}");
    let after = cluster_client::ClusterClient::new(opc.clone())
        .status(Empty {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        before.revision, after.revision,
        "50 acknowledgements moved the store revision"
    );
    assert_eq!(
        before.commit, after.commit,
        "50 acknowledgements went through Raft"
    );

    // An agent may not read the table.
    let e = w.proxies(ReadOptions::default()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
}

fn export(to: &[&str]) -> PolicyDocs {
    let to: Vec<String> = to.iter().map(|z| format!("{z:?}")).collect();
    PolicyDocs {
        docs: vec![PolicyDoc {
            key: Some(PolicyKey {
                kind: "Export".into(),
                name: "pay".into(),
            }),
            spec_json: format!(r#"{{"service": "pay.billing", "to": [{}]}}"#, to.join(", ")),
        }],
    }
}

/// The endpoint keys among `events`, `+key` for a put and `-key` for a
/// deletion, sorted.
fn endpoint_changes(events: &[WatchEvent]) -> Vec<String> {
    let mut out: Vec<String> = events
        .iter()
        .filter(|e| e.kind == "endpoint")
        .map(|e| format!("{}{}", if e.deleted { "-" } else { "+" }, e.key))
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zoned_watch_carries_other_zones_endpoints_only_where_exported() {
    let fx = Fixture::new([
        ep("billing", "pay", "east", "p1"),
        ep("billing", "pay", "west", "p2"),
        ep("billing", "pay", "edge", "p3"),
        ep("shop", "cart", "east", "c1"),
        ep("trellis-system", "gateway", "east", "gw1"),
        ep("trellis-system", "gateway", "west", "gw2"),
    ])
    .await;
    let (l, op, agent) = (fx.l, &fx.op, &fx.agent);
    let addr = |i: usize| fx.addr(i);
    let (mut reg, mut pol) = (fx.registry(), fx.policy());
    let written = pol
        .apply(export(&["west"]))
        .await
        .unwrap()
        .into_inner()
        .revision;
    // The streams are on a follower that has applied the writes above.
    let f = (l + 1) % 3;
    applied(&addr(f), op, written).await;
    let mut w = watch_client::WatchClient::new(client::connect(&addr(f), agent).unwrap());
    // A proxy in zone east that calls pay, and one of east that calls
    // everything: pay is exported to west only, so neither gets its
    // endpoints in west or edge; cart, with no Export, reaches both.
    let calls_pay = WatchRequest {
        from_revision: 0,
        namespaces: vec![],
        services: vec!["billing/pay".into()],
        zone: "east".into(),
    };
    let everything = WatchRequest {
        from_revision: 0,
        namespaces: vec![],
        services: vec![],
        zone: "east".into(),
    };
    let mut s = w.watch(calls_pay.clone()).await.unwrap().into_inner();
    let snap = read_until(&mut s, Duration::from_secs(10), |e| e.kind == "sync").await;
    assert_eq!(
        endpoint_changes(&snap),
        [
            "+billing/pay/east/p1",
            "+trellis-system/gateway/east/gw1",
            "+trellis-system/gateway/west/gw2"
        ],
        "{snap:#?}"
    );
    let mut all = w.watch(everything.clone()).await.unwrap().into_inner();
    let snap = read_until(&mut all, Duration::from_secs(10), |e| e.kind == "sync").await;
    assert_eq!(
        endpoint_changes(&snap),
        [
            "+billing/pay/east/p1",
            "+shop/cart/east/c1",
            "+trellis-system/gateway/east/gw1",
            "+trellis-system/gateway/west/gw2"
        ],
        "{snap:#?}"
    );
    // A stream without a zone (a gateway's, an operator's) gets them all.
    let mut plain = w
        .watch(WatchRequest {
            zone: String::new(),
            ..calls_pay.clone()
        })
        .await
        .unwrap()
        .into_inner();
    let snap = read_until(&mut plain, Duration::from_secs(10), |e| e.kind == "sync").await;
    assert_eq!(endpoint_changes(&snap).len(), 5, "{snap:#?}");
    drop(plain);
    let before = snap.last().unwrap().revision;

    // Live: pay's new endpoint in west is held back, cart's in west is not.
    reg.register(ep("billing", "pay", "west", "p4"))
        .await
        .unwrap();
    reg.register(ep("shop", "cart", "west", "c2"))
        .await
        .unwrap();
    let got = read_until(&mut all, Duration::from_secs(10), |e| {
        e.key == "shop/cart/west/c2"
    })
    .await;
    assert_eq!(endpoint_changes(&got), ["+shop/cart/west/c2"], "{got:#?}");

    // The Export widens to east: right behind the document, each stream
    // gets the endpoints it may now reach, at the document's revision,
    // with no snapshot.
    let widened = pol
        .apply(export(&["west", "east"]))
        .await
        .unwrap()
        .into_inner()
        .revision;
    for stream in [&mut s, &mut all] {
        let got = read_until(stream, Duration::from_secs(10), |e| {
            e.key == "billing/pay/west/p4"
        })
        .await;
        assert!(got.iter().all(|e| !e.snapshot), "{got:#?}");
        assert!(
            got.iter()
                .any(|e| e.kind == "policy" && e.key == "Export/pay"),
            "{got:#?}"
        );
        let mut changes = endpoint_changes(&got);
        changes.retain(|k| !k.contains("west/c2"));
        assert_eq!(
            changes,
            [
                "+billing/pay/edge/p3",
                "+billing/pay/west/p2",
                "+billing/pay/west/p4"
            ],
            "{got:#?}"
        );
        // The document, then its endpoints, all at its revision.
        let at = got.iter().position(|e| e.key == "Export/pay").unwrap();
        assert!(got[at..].iter().all(|e| e.revision == widened), "{got:#?}");
    }

    // A stream that resumes from before the widening, on another server,
    // catches up with the same endpoints (and no snapshot).
    let other = (l + 2) % 3;
    let mut w2 = watch_client::WatchClient::new(client::connect(&addr(other), agent).unwrap());
    applied(&addr(other), op, widened).await;
    let mut resumed = w2
        .watch(WatchRequest {
            from_revision: before,
            ..calls_pay.clone()
        })
        .await
        .unwrap()
        .into_inner();
    let got = read_until(&mut resumed, Duration::from_secs(10), |e| {
        e.key == "billing/pay/west/p4" && e.revision == widened
    })
    .await;
    assert!(got.iter().all(|e| !e.snapshot), "{got:#?}");
    let changes = endpoint_changes(&got);
    for k in [
        "+billing/pay/edge/p3",
        "+billing/pay/west/p2",
        "+billing/pay/west/p4",
    ] {
        assert!(changes.iter().any(|c| c == k), "{k}: {got:#?}");
    }
    drop(resumed);
    // One that resumes from the document's own revision may have lost what
    // followed it at that revision: it gets it again first.
    let mut resumed = w2
        .watch(WatchRequest {
            from_revision: widened,
            ..calls_pay.clone()
        })
        .await
        .unwrap()
        .into_inner();
    let got = read_until(&mut resumed, Duration::from_secs(10), |e| {
        e.key == "billing/pay/west/p4"
    })
    .await;
    assert!(
        got.iter().all(|e| !e.snapshot && e.revision == widened),
        "{got:#?}"
    );
    assert_eq!(
        endpoint_changes(&got),
        [
            "+billing/pay/edge/p3",
            "+billing/pay/west/p2",
            "+billing/pay/west/p4"
        ],
        "{got:#?}"
    );
    drop(resumed);

    // It narrows again: the same streams get the deletions.
    pol.apply(export(&["west"])).await.unwrap();
    let got = read_until(&mut s, Duration::from_secs(10), |e| {
        e.key == "billing/pay/west/p4"
    })
    .await;
    assert_eq!(
        endpoint_changes(&got),
        [
            "-billing/pay/edge/p3",
            "-billing/pay/west/p2",
            "-billing/pay/west/p4"
        ],
        "{got:#?}"
    );
    // A deletion is never held back: a proxy that never had the endpoint
    // ignores it, and one that had it must not keep it.
    reg.deregister(EndpointKey {
        namespace: "billing".into(),
        service: "pay".into(),
        zone: "west".into(),
        id: "p4".into(),
    })
    .await
    .unwrap();
    let got = read_until(&mut s, Duration::from_secs(10), |e| {
        e.key == "billing/pay/west/p4"
    })
    .await;
    assert_eq!(endpoint_changes(&got), ["-billing/pay/west/p4"], "{got:#?}");

    // The Export goes: pay is exported everywhere, and the endpoints come.
    pol.delete(PolicyKey {
        kind: "Export".into(),
        name: "pay".into(),
    })
    .await
    .unwrap();
    let got = read_until(&mut s, Duration::from_secs(10), |e| {
        e.key == "billing/pay/west/p2"
    })
    .await;
    assert_eq!(
        endpoint_changes(&got),
        ["+billing/pay/edge/p3", "+billing/pay/west/p2"],
        "{got:#?}"
    );

    // An Export never hides the gateways: routing to other zones needs
    // them, so the store refuses one, naming the field.
    let mut gw = export(&["west"]);
    gw.docs[0].key.as_mut().unwrap().name = "gateways".into();
    gw.docs[0].spec_json = r#"{"service": "gateway.trellis-system", "to": ["west"]}"#.into();
    let e = pol.apply(gw).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("spec.service"), "{e:?}");

    // A zone that is not a DNS label is refused, naming the field.
    let e = w
        .watch(WatchRequest {
            zone: "East".into(),
            ..everything
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("WatchRequest: zone: \"East\""),
        "{e:?}"
    );
}
