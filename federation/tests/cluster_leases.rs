//! Real servers in this process, talking real gRPC over mutual TLS on
//! loopback (one test per binary: each gets a process of its own).

use std::time::Duration;

use trellis_federation::client;
use trellis_federation::proto::*;

#[path = "support/mesh.rs"]
mod mesh;
use mesh::{Mesh, endpoint, leader};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrenewed_lease_expires_and_a_renewed_one_stays() {
    let mesh = Mesh::new();
    let servers = mesh.cluster(3).await;
    let l = leader(&servers.iter().collect::<Vec<_>>()).await;
    // Endpoints registered through a follower (by an operator: the short
    // leases here are below what a proxy may hold); the leader alone
    // expires leases.
    let f = (l + 1) % 3;
    let agent =
        client::connect(&servers[f].addr.to_string(), &mesh.creds("operator/alice")).unwrap();
    let mut reg = registry_client::RegistryClient::new(agent);
    let mut short = endpoint(1, "east");
    short.lease_seconds = 1;
    let mut kept = endpoint(2, "east");
    kept.lease_seconds = 2;
    reg.register(short).await.unwrap();
    reg.register(kept.clone()).await.unwrap();
    let key = kept.key.clone().unwrap();
    let mut cluster = cluster_client::ClusterClient::new(
        client::connect(&servers[l].addr.to_string(), &mesh.creds("operator/alice")).unwrap(),
    );
    let before = cluster.status(Empty {}).await.unwrap().into_inner();
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        reg.renew_lease(key.clone()).await.unwrap();
    }
    // Renewals are kept by the leader in memory: the log grew by the one
    // expiry and what a new leader writes at the start, not by 30.
    let after = cluster.status(Empty {}).await.unwrap().into_inner();
    eprintln!(
        "commit {} -> {}, revision {} -> {}",
        before.commit, after.commit, before.revision, after.revision
    );
    assert!(
        after.commit - before.commit < 10,
        "30 renewals went through Raft: commit {} -> {}",
        before.commit,
        after.commit
    );
    let list = reg
        .list(ReadOptions { linearizable: true })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<String> = list
        .endpoints
        .into_iter()
        .map(|e| e.key.unwrap().id)
        .collect();
    assert_eq!(
        ids,
        vec!["vm-2".to_string()],
        "the unrenewed endpoint left, the renewed one stayed"
    );
    // Renewing an expired endpoint is refused with the reason.
    let err = reg
        .renew_lease(endpoint(1, "east").key.unwrap())
        .await
        .unwrap_err();
    assert!(err.message().contains("expired"), "{}", err.message());
    for s in servers {
        s.kill().await;
    }
}
