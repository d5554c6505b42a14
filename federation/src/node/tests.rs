//! The node on an in-memory network that can cut links, before any gRPC.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use super::*;
use crate::state::EndpointRecord;
use crate::storage::Db;

#[derive(Default)]
struct Net {
    nodes: Mutex<HashMap<u64, NodeHandle>>,
    cut: Mutex<HashSet<u64>>,
}

struct Link {
    from: u64,
    net: Arc<Net>,
}

impl Transport for Link {
    fn send(&self, msgs: Vec<Message>) {
        let cut = self.net.cut.lock().unwrap().clone();
        if cut.contains(&self.from) {
            return;
        }
        let nodes = self.net.nodes.lock().unwrap();
        for m in msgs {
            if cut.contains(&m.to) {
                continue;
            }
            if let Some(h) = nodes.get(&m.to) {
                let _ = h.step(vec![m]);
            }
        }
    }
    fn set_address(&self, _id: u64, _address: &str) {}
}

fn cfg(id: u64) -> NodeConfig {
    NodeConfig {
        id,
        tick: Duration::from_millis(20),
        compact_after: 50,
        ..Default::default()
    }
}

fn start_node(net: &Arc<Net>, dir: &std::path::Path, id: u64, voters: &[u64]) -> NodeHandle {
    let storage = RaftStorage::open(Db::open(dir).unwrap()).unwrap();
    let link = Arc::new(Link {
        from: id,
        net: net.clone(),
    });
    let h = start(cfg(id), storage, Some(voters.to_vec()), link).unwrap();
    net.nodes.lock().unwrap().insert(id, h.clone());
    h
}

async fn leader(nodes: &[&NodeHandle]) -> NodeHandle {
    for _ in 0..300 {
        for n in nodes {
            if n.is_leader() {
                return (*n).clone();
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no leader elected");
}

fn ep(id: u64) -> Command {
    Command::Register {
        endpoint: EndpointRecord {
            namespace: "shop".into(),
            service: "catalog".into(),
            zone: "east".into(),
            id: format!("e{id}"),
            address: "10.0.0.1".into(),
            ports: vec![80],
            protocol: "tcp".into(),
            labels: Default::default(),
            healthy: true,
            lease_seconds: 0,
            lease_expires_ms: 0,
            owner: String::new(),
        },
        now_ms: 0,
    }
}

#[tokio::test]
async fn three_nodes_replicate_and_a_lagging_node_catches_up_by_snapshot() {
    let net = Arc::new(Net::default());
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let voters = [1, 2, 3];
    let a = start_node(&net, dirs[0].path(), 1, &voters);
    let b = start_node(&net, dirs[1].path(), 2, &voters);
    let c = start_node(&net, dirs[2].path(), 3, &voters);
    let l = leader(&[&a, &b, &c]).await;
    // Cut one follower off, write past the compaction threshold, heal.
    let lagger = [&a, &b, &c]
        .into_iter()
        .find(|n| n.id() != l.id())
        .unwrap()
        .clone();
    net.cut.lock().unwrap().insert(lagger.id());
    let mut last = 0;
    for i in 0..120 {
        let l = leader(&[&a, &b, &c]).await;
        last = l.propose(ep(i)).await.unwrap().revision;
    }
    assert_eq!(last, 120);
    assert!(l.status().applied > 0);
    net.cut.lock().unwrap().clear();
    tokio::time::timeout(Duration::from_secs(10), lagger.wait_revision(120))
        .await
        .expect("lagging node caught up")
        .unwrap();
    assert_eq!(crate::state::endpoints(lagger.db()).unwrap().len(), 120);
    // The log was compacted past what the lagger had, so it needed a snapshot.
    assert_eq!(lagger.status().snapshots_installed, 1);
}

#[tokio::test]
async fn a_minority_refuses_writes_and_still_reads() {
    let net = Arc::new(Net::default());
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let voters = [1, 2, 3];
    let a = start_node(&net, dirs[0].path(), 1, &voters);
    let b = start_node(&net, dirs[1].path(), 2, &voters);
    let c = start_node(&net, dirs[2].path(), 3, &voters);
    let l = leader(&[&a, &b, &c]).await;
    l.propose(ep(1)).await.unwrap();
    // Isolate the leader: it must step down (check_quorum) and refuse.
    net.cut.lock().unwrap().insert(l.id());
    let err = l
        .propose(ep(2))
        .await
        .expect_err("an isolated leader committed a write");
    assert!(
        matches!(
            err,
            FedError::Timeout(_) | FedError::NoLeader | FedError::LeaderChanged
        ),
        "{err}"
    );
    // Local reads still answer, with the revision they reflect.
    assert_eq!(crate::state::endpoints(l.db()).unwrap().len(), 1);
    let others: Vec<&NodeHandle> = [&a, &b, &c]
        .into_iter()
        .filter(|n| n.id() != l.id())
        .collect();
    let nl = leader(&others).await;
    nl.propose(ep(3)).await.unwrap();
    net.cut.lock().unwrap().clear();
    tokio::time::timeout(Duration::from_secs(10), l.wait_revision(2))
        .await
        .unwrap()
        .unwrap();
}
