//! Shared by the cluster tests: a CA, three real servers in this process on
//! loopback, and helpers. Each cluster test is its own test binary, so its
//! servers run in a process of their own.
// Each test file uses its own subset of these.
#![allow(dead_code, unused_imports)]

use std::path::PathBuf;
use std::time::Duration;

use tempfile::TempDir;
use tokio::net::TcpListener;
use tonic::Code;
use trellis_ca::{CaDir, IssueOptions, TrustDomain};
use trellis_federation::config::ServerConfig;
use trellis_federation::proto::{self, *};
use trellis_federation::server::{self, Server};
use trellis_federation::{client, join, token::JoinToken};

pub(crate) struct Mesh {
    pub(crate) dir: TempDir,
    pub(crate) td: TrustDomain,
}

impl Mesh {
    pub(crate) fn new() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        // RUST_LOG=trellis_federation=debug shows the servers' view of a failure.
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let td: TrustDomain = "test.local".parse().unwrap();
        let ca = CaDir::new(dir.path().join("ca"));
        ca.init(&td, Duration::from_secs(3600 * 24)).unwrap();
        ca.create_zone("east", Duration::from_secs(3600 * 24))
            .unwrap();
        Self { dir, td }
    }

    pub(crate) fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    /// Credentials for `id` (a SPIFFE path), written under the temp dir.
    pub(crate) fn creds(&self, path: &str) -> PathBuf {
        let ca = CaDir::new(self.ca_dir());
        let id = self.td.id(path.trim_start_matches('/').split('/')).unwrap();
        let auth = match id.role().and_then(|r| r.zone().map(str::to_string)) {
            Some(z) => ca.zone(&z).unwrap(),
            None => ca.root().unwrap(),
        };
        let creds = auth.issue(&id, IssueOptions::default()).unwrap();
        let prefix = self.dir.path().join(path.replace('/', "_"));
        trellis_ca::write_credentials(&prefix, &creds, &ca.bundle().unwrap()).unwrap();
        prefix
    }

    pub(crate) fn config(&self, name: &str, peers: &[(String, String)]) -> ServerConfig {
        let mut text = format!(
            "name = \"{name}\"\nzone = \"east\"\ntrust_domain = \"test.local\"\ndata_dir = \"{}\"\nlisten = \"127.0.0.1:0\"\nca_dir = \"{}\"\nbootstrap = true\n",
            self.dir.path().join(name).display(),
            self.ca_dir().display()
        );
        for (n, a) in peers {
            text.push_str(&format!("[[peers]]\nname = \"{n}\"\naddress = \"{a}\"\n"));
        }
        let cfg = ServerConfig::from_toml(&text).unwrap();
        cfg.validate().unwrap();
        cfg
    }

    pub(crate) async fn cluster(&self, n: usize) -> Vec<Server> {
        let mut listeners = Vec::new();
        for _ in 0..n {
            listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
        }
        let addrs: Vec<(String, String)> = listeners
            .iter()
            .enumerate()
            .map(|(i, l)| (format!("s{i}"), l.local_addr().unwrap().to_string()))
            .collect();
        let mut servers = Vec::new();
        for (i, l) in listeners.into_iter().enumerate() {
            let peers: Vec<_> = addrs
                .iter()
                .filter(|(n, _)| *n != format!("s{i}"))
                .cloned()
                .collect();
            let mut cfg = self.config(&format!("s{i}"), &peers);
            cfg.advertise = Some(addrs[i].1.clone());
            servers.push(server::start_on(&cfg, l).await.unwrap());
        }
        servers
    }
}

/// The leader's index, once every server given knows it (a follower that
/// has not heard from the new leader yet would refuse writes).
pub(crate) async fn leader(servers: &[&Server]) -> usize {
    for _ in 0..200 {
        if let Some(i) = servers.iter().position(|s| s.node.is_leader()) {
            let id = servers[i].node.id();
            if servers.iter().all(|s| s.node.status().leader == id) {
                return i;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no leader known to every server within 10 s");
}

pub(crate) fn endpoint(i: usize, zone: &str) -> proto::Endpoint {
    proto::Endpoint {
        key: Some(EndpointKey {
            namespace: "shop".into(),
            service: "catalog".into(),
            zone: zone.into(),
            id: format!("vm-{i}"),
        }),
        address: format!("10.0.{}.{}", i / 250, i % 250 + 1),
        ports: vec![8080],
        protocol: "http".into(),
        healthy: true,
        ..Default::default()
    }
}

impl Mesh {
    /// A join token made by operator credentials `op` on `server`.
    pub(crate) async fn token(
        &self,
        server: &str,
        op: &std::path::Path,
        req: TokenRequest,
    ) -> String {
        zones_client::ZonesClient::new(client::connect(server, op).unwrap())
            .create_join_token(req)
            .await
            .unwrap()
            .into_inner()
            .token
    }

    /// The configuration of a server that joined as `name` in `zone`, with
    /// the credentials the join wrote.
    pub(crate) fn joined_config(&self, name: &str, zone: &str, addr: &str) -> ServerConfig {
        let prefix = self.dir.path().join(name);
        let text = format!(
            "name = \"{name}\"\nzone = \"{zone}\"\ntrust_domain = \"test.local\"\ndata_dir = \"{}\"\ncredentials = \"{}\"\n",
            self.dir.path().join(format!("{name}-data")).display(),
            prefix.display()
        );
        let mut cfg = ServerConfig::from_toml(&text).unwrap();
        cfg.advertise = Some(addr.into());
        cfg.validate().unwrap();
        cfg
    }

    /// Joins a new server with `token` under `name`, as `trellis zone join`
    /// does, and starts it.
    pub(crate) async fn join_server(&self, token: &str, name: &str, zone: &str) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let joined = join::join(&JoinToken::parse(token).unwrap(), name, &addr)
            .await
            .unwrap();
        let prefix = self.dir.path().join(name);
        trellis_ca::write_credentials(&prefix, &joined.credentials, &joined.bundle).unwrap();
        let mut cfg = self.joined_config(name, zone, &addr);
        cfg.join_members = joined.members;
        server::start_on(&cfg, listener).await.unwrap()
    }
}

/// Each member's view of the membership, as `trellis cluster status` shows
/// it: (name, role) pairs, sorted.
pub(crate) async fn members_seen_by(server: &str, op: &std::path::Path) -> Vec<(String, String)> {
    let s = cluster_client::ClusterClient::new(client::connect(server, op).unwrap())
        .status(Empty {})
        .await
        .unwrap()
        .into_inner();
    let mut m: Vec<(String, String)> = s.members.into_iter().map(|m| (m.name, m.role)).collect();
    m.sort();
    m
}
