//! A server that stops ends its watch streams at once, so its proxies move
//! to another server instead of waiting out the drain (one test per
//! binary: each gets a process of its own).

use std::time::{Duration, Instant};

use trellis_federation::client;
use trellis_federation::proto::*;

#[path = "support/mesh.rs"]
mod mesh;
use mesh::{Mesh, leader};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_server_ends_its_watches_and_stops_well_before_the_drain() {
    let mesh = Mesh::new();
    let mut servers = mesh.cluster(3).await;
    let l = leader(&servers.iter().collect::<Vec<_>>()).await;
    let agent = mesh.creds("zone/east/agent/vm1");
    let follower = servers.remove((l + 1) % 3);
    let addr = follower.addr.to_string();

    let mut stream = watch_client::WatchClient::new(client::connect(&addr, &agent).unwrap())
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    // Through the snapshot, so the stream is in its live phase.
    loop {
        let e = stream.message().await.unwrap().unwrap();
        if e.kind == "sync" {
            break;
        }
    }

    let drain = Duration::from_secs(20);
    let t = Instant::now();
    let stopped = tokio::spawn(follower.shutdown(drain));
    // The stream ends cleanly (its proxy reconnects elsewhere from its
    // revision), not by an error at the drain's end.
    let end = tokio::time::timeout(Duration::from_secs(3), stream.message())
        .await
        .expect("the watch ended within 3 s of the stop");
    assert!(matches!(end, Ok(None)), "a clean end: {end:?}");
    tokio::time::timeout(Duration::from_secs(10), stopped)
        .await
        .expect("the server stopped within 10 s, half its 20 s drain")
        .unwrap();
    eprintln!("watch ended and server stopped in {:?}", t.elapsed());
    for s in servers {
        s.kill().await;
    }
}
