//! Scoped watches and acknowledgements off the Raft log, on a real
//! three-server cluster over mutual TLS on loopback.

use std::time::{Duration, Instant};

use trellis_federation::client;
use trellis_federation::proto::*;

#[path = "support/mesh.rs"]
mod mesh;
use mesh::{Mesh, leader};

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
    let mesh = Mesh::new();
    let servers = mesh.cluster(3).await;
    let l = leader(&servers.iter().collect::<Vec<_>>()).await;
    let addr = |i: usize| servers[i].addr.to_string();
    let op = mesh.creds("operator/alice");
    let agent = mesh.creds("zone/east/agent/vm1");
    let opc = client::connect(&addr(l), &op).unwrap();
    let mut reg = registry_client::RegistryClient::new(opc.clone());
    let mut pol = policy_client::PolicyClient::new(opc.clone());
    for e in [
        ep("shop", "catalog", "east", "c1"),
        ep("billing", "pay", "east", "p1"),
        ep("billing", "ledger", "east", "l1"),
        ep("trellis-system", "gateway", "east", "gw1"),
    ] {
        reg.register(e).await.unwrap();
    }
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
    let mut fc = cluster_client::ClusterClient::new(client::connect(&addr(f), &op).unwrap());
    let t = Instant::now();
    let mut fz = zones_client::ZonesClient::new(client::connect(&addr(f), &op).unwrap());
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
    let mut w = watch_client::WatchClient::new(client::connect(&addr(f), &agent).unwrap());
    let scoped = WatchRequest {
        from_revision: 0,
        namespaces: vec!["shop".into()],
        services: vec!["billing/pay".into()],
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
    let list = watch_client::WatchClient::new(client::connect(&addr(other), &op).unwrap())
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
