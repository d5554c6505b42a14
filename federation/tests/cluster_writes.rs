//! Real servers in this process, talking real gRPC over mutual TLS on
//! loopback (one test per binary: each gets a process of its own).

use trellis_federation::client;
use trellis_federation::proto::*;

#[path = "support/mesh.rs"]
mod mesh;
use mesh::{Mesh, endpoint, leader};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_acknowledged_writes_are_readable_on_every_server() {
    let mesh = Mesh::new();
    let servers = mesh.cluster(3).await;
    leader(&servers.iter().collect::<Vec<_>>()).await;
    let op = mesh.creds("operator/alice");
    let clients: Vec<_> = servers
        .iter()
        .map(|s| {
            registry_client::RegistryClient::new(client::connect(&s.addr.to_string(), &op).unwrap())
        })
        .collect();

    // 1000 writes, spread over all three servers (followers forward), 25 at a time.
    let mut revisions = Vec::new();
    for chunk in (0..1000).collect::<Vec<_>>().chunks(25) {
        let calls = chunk.iter().map(|&i| {
            let mut c = clients[i % 3].clone();
            async move { c.register(endpoint(i, "east")).await }
        });
        for r in futures_util::future::join_all(calls).await {
            revisions.push(r.expect("write acknowledged").into_inner().revision);
        }
    }
    revisions.sort_unstable();
    revisions.dedup();
    assert_eq!(revisions.len(), 1000, "every write got its own revision");
    let last = *revisions.last().unwrap();

    for (i, c) in clients.iter().enumerate() {
        let list = c
            .clone()
            .list(ReadOptions { linearizable: true })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(list.endpoints.len(), 1000, "server {i}");
        // Linearizable: the read reflects at least every acknowledged write.
        assert!(
            list.revision >= last,
            "server {i}: {} < {last}",
            list.revision
        );
    }
    for s in servers {
        s.kill().await;
    }
}
