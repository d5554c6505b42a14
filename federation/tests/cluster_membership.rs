//! Membership as an operator sees it after the README's join path: one
//! bootstrap server, two servers joined by token. Every member must agree on
//! the configuration, and a member restarted after a kill catches up.

use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use trellis_federation::client;
use trellis_federation::proto::*;
use trellis_federation::server;

#[path = "support/mesh.rs"]
mod mesh;
use mesh::{Mesh, endpoint, leader, members_seen_by};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joined_servers_know_the_bootstrap_server_and_a_killed_one_catches_up() {
    let mesh = Mesh::new();
    let mut servers = mesh.cluster(1).await;
    leader(&servers.iter().collect::<Vec<_>>()).await;
    let first = servers[0].addr.to_string();
    let op = mesh.creds("operator/alice");
    for name in ["s1", "s2"] {
        let req = TokenRequest {
            zone: "east".into(),
            ttl_seconds: 60,
            ..Default::default()
        };
        let token = mesh.token(&first, &op, req).await;
        servers.push(mesh.join_server(&token, name, "east").await);
        // The next join waits for this promotion, as an operator following
        // the README would see `cluster status` before going on.
        let start = Instant::now();
        while members_seen_by(&first, &op)
            .await
            .iter()
            .filter(|(_, r)| r == "voter")
            .count()
            < servers.len()
        {
            assert!(start.elapsed() < Duration::from_secs(20), "no promotion");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Every member answers with the same three voters.
    let want = vec![
        ("east/s0".to_string(), "voter".to_string()),
        ("east/s1".to_string(), "voter".to_string()),
        ("east/s2".to_string(), "voter".to_string()),
    ];
    let start = Instant::now();
    for s in &servers {
        loop {
            let seen = members_seen_by(&s.addr.to_string(), &op).await;
            if seen == want {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{} sees {seen:?}, want {want:?}",
                s.addr
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Kill the bootstrap server while it leads; the other two carry on.
    let refs: Vec<_> = servers.iter().collect();
    let l = leader(&refs).await;
    if l != 0 {
        servers[0].node.campaign().await.unwrap();
        let start = Instant::now();
        while !servers[0].node.is_leader() {
            assert!(start.elapsed() < Duration::from_secs(10), "s0 did not lead");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let s0_addr = servers[0].addr;
    let s0 = servers.remove(0);
    s0.kill().await;
    let rest: Vec<_> = servers.iter().collect();
    let l = leader(&rest).await;
    let mut reg = registry_client::RegistryClient::new(
        client::connect(&servers[l].addr.to_string(), &op).unwrap(),
    );
    for i in 0..30 {
        reg.register(endpoint(i, "east")).await.unwrap();
    }
    let want_rev = servers[l].node.status().revision;

    // Restarted from its data directory, s0 catches up within seconds.
    // In this process the killed server's open connections keep its sled
    // database locked; a killed process would release it. Restart from a
    // copy of what it left on disk, as a new process would find it.
    let mut cfg = mesh.config("s0", &[]);
    cfg.advertise = Some(s0_addr.to_string());
    let copy = mesh.dir.path().join("s0-restarted");
    let ok = std::process::Command::new("cp")
        .arg("-a")
        .arg(&cfg.data_dir)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(ok.success());
    cfg.data_dir = copy;
    let listener = TcpListener::bind(s0_addr).await.unwrap();
    let s0 = server::start_on(&cfg, listener).await.unwrap();
    let start = Instant::now();
    loop {
        let st = s0.node.status();
        if st.revision >= want_rev {
            eprintln!(
                "restarted s0 caught up to revision {want_rev} in {:?}",
                start.elapsed()
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "restarted s0 is at revision {} of {want_rev} (commit {}) after 5 s",
            st.revision,
            st.commit
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let list =
        registry_client::RegistryClient::new(client::connect(&s0_addr.to_string(), &op).unwrap())
            .list(ReadOptions {
                linearizable: false,
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(list.endpoints.len(), 30);
    s0.kill().await;
    for s in servers {
        s.kill().await;
    }
}
