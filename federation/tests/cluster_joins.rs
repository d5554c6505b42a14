//! Real servers in this process, talking real gRPC over mutual TLS on
//! loopback (one test per binary: each gets a process of its own).

use std::time::Duration;

use tokio::net::TcpListener;
use trellis_federation::config::ServerConfig;
use trellis_federation::proto::*;
use trellis_federation::server::{self};
use trellis_federation::{client, join, token::JoinToken};

#[path = "support/mesh.rs"]
mod mesh;
use mesh::{Mesh, endpoint, leader};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joined_servers_serve_core_ones_vote_edge_ones_stay_learners() {
    let mesh = Mesh::new();
    let mut servers = mesh.cluster(1).await;
    leader(&servers.iter().collect::<Vec<_>>()).await;
    let first = servers[0].addr.to_string();
    let op = mesh.creds("operator/alice");
    let mut zones = zones_client::ZonesClient::new(client::connect(&first, &op).unwrap());

    for (name, zone, edge) in [("east-2", "east", false), ("edge-1", "edge1", true)] {
        let token = zones
            .create_join_token(TokenRequest {
                zone: zone.into(),
                edge,
                ttl_seconds: 60,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .token;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let joined = join::join(&JoinToken::parse(&token).unwrap(), name, &addr)
            .await
            .unwrap();
        let prefix = mesh.dir.path().join(name);
        trellis_ca::write_credentials(&prefix, &joined.credentials, &joined.bundle).unwrap();
        let text = format!(
            "name = \"{name}\"\nzone = \"{zone}\"\ntrust_domain = \"test.local\"\ndata_dir = \"{}\"\ncredentials = \"{}\"\n",
            mesh.dir.path().join(format!("{name}-data")).display(),
            prefix.display()
        );
        let mut cfg = ServerConfig::from_toml(&text).unwrap();
        cfg.advertise = Some(addr);
        cfg.join_members = joined.members;
        cfg.validate().unwrap();
        servers.push(server::start_on(&cfg, listener).await.unwrap());
    }

    // The core server becomes a voter once it has caught up; the edge one stays a learner.
    let mut cluster = cluster_client::ClusterClient::new(client::connect(&first, &op).unwrap());
    let start = std::time::Instant::now();
    let status = loop {
        let s = cluster.status(Empty {}).await.unwrap().into_inner();
        if s.members.iter().filter(|m| m.role == "voter").count() == 2 {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no promotion: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let role = |n: &str| {
        status
            .members
            .iter()
            .find(|m| m.name.ends_with(n))
            .map(|m| m.role.clone())
    };
    assert_eq!(role("east-2").as_deref(), Some("voter"));
    assert_eq!(role("edge-1").as_deref(), Some("learner"));

    // Writes through the core servers replicate to all three. An edge
    // server relays only its own zone's proxies, never an operator: a
    // learner holds no vote and no say over the mesh.
    for (i, s) in servers.iter().enumerate() {
        let r = registry_client::RegistryClient::new(
            client::connect(&s.addr.to_string(), &op).unwrap(),
        )
        .register(endpoint(i, "east"))
        .await;
        if i < 2 {
            r.unwrap();
        } else {
            let e = r.unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
            assert!(e.message().contains("edge server"), "{e:?}");
        }
    }
    for s in &servers {
        let list = registry_client::RegistryClient::new(
            client::connect(&s.addr.to_string(), &op).unwrap(),
        )
        .list(ReadOptions { linearizable: true })
        .await
        .unwrap()
        .into_inner();
        assert_eq!(list.endpoints.len(), 2);
    }
    for s in servers {
        s.kill().await;
    }
}
