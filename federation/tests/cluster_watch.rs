//! Real servers in this process, talking real gRPC over mutual TLS on
//! loopback (one test per binary: each gets a process of its own).

use std::time::Duration;

use trellis_federation::client;
use trellis_federation::proto::*;
use trellis_federation::server::Server;

#[path = "support/mesh.rs"]
mod mesh;
use mesh::{Mesh, endpoint, leader};

async fn collect_until(stream: &mut tonic::Streaming<WatchEvent>, seen: &mut Vec<u64>, until: u64) {
    while seen.last().copied().unwrap_or(0) < until {
        let e = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("watch event in time")
            .expect("watch stream")
            .expect("stream open");
        if !e.snapshot {
            seen.push(e.revision);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_survives_a_leader_change_without_loss_or_repeat() {
    let mesh = Mesh::new();
    let mut servers: Vec<Option<Server>> = mesh.cluster(3).await.into_iter().map(Some).collect();
    let l = leader(&servers.iter().flatten().collect::<Vec<_>>()).await;
    let op = mesh.creds("operator/alice");
    let agent = mesh.creds("zone/east/agent/vm1");
    let follower = (l + 1) % 3;
    let other = (l + 2) % 3;
    let addr = |i: usize, s: &[Option<Server>]| s[i].as_ref().unwrap().addr.to_string();

    let mut watch =
        watch_client::WatchClient::new(client::connect(&addr(follower, &servers), &agent).unwrap());
    let mut stream = watch
        .watch(WatchRequest {
            from_revision: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // The snapshot comes first (the zone the servers recorded at start),
    // closed by a "sync" marker carrying the revision it reflects.
    let base = loop {
        let e = stream.message().await.unwrap().unwrap();
        assert!(e.snapshot, "{e:?}");
        if e.kind == "sync" {
            break e.revision;
        }
    };

    let mut reg = registry_client::RegistryClient::new(
        client::connect(&addr(follower, &servers), &op).unwrap(),
    );
    for i in 0..50 {
        reg.register(endpoint(i, "east")).await.unwrap();
    }
    let mut seen = Vec::new();
    collect_until(&mut stream, &mut seen, base + 50).await;

    // Kill the leader; writes continue through the survivors. killing");
    servers[l].take().unwrap().kill().await;
    let mut acked = base + 50;
    for i in 50..100 {
        // Retry until a new leader takes the write; count only acknowledged ones.
        let start = std::time::Instant::now();
        loop {
            match reg.register(endpoint(i, "east")).await {
                Ok(r) => {
                    acked = r.into_inner().revision;
                    break;
                }
                Err(e) => {
                    assert!(
                        start.elapsed() < Duration::from_secs(20),
                        "no new leader took write {i}: {e:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
            }
        }
    }
    collect_until(&mut stream, &mut seen, acked / 2 + 25).await;
    // Reconnect to the other survivor from the last revision seen.
    drop(stream);
    let last = *seen.last().unwrap();
    let mut watch2 =
        watch_client::WatchClient::new(client::connect(&addr(other, &servers), &agent).unwrap());
    let mut stream2 = watch2
        .watch(WatchRequest {
            from_revision: last,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    collect_until(&mut stream2, &mut seen, acked).await;
    let expected: Vec<u64> = (base + 1..=acked).collect();
    assert_eq!(seen, expected, "every revision exactly once, in order");
    for s in servers.into_iter().flatten() {
        s.kill().await;
    }
}
