//! Three real servers in this process, talking real gRPC over mutual TLS on
//! loopback: replication, refusals and watches as clients see them.

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

/// The tests run one at a time: each starts three servers with their own
/// sled databases, runtimes and TLS work, and a 2-core machine running all
/// of them at once starves the Raft timers.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Mesh {
    dir: TempDir,
    td: TrustDomain,
}

impl Mesh {
    fn new() -> Self {
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

    fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    /// Credentials for `id` (a SPIFFE path), written under the temp dir.
    fn creds(&self, path: &str) -> PathBuf {
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

    fn config(&self, name: &str, peers: &[(String, String)]) -> ServerConfig {
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

    async fn cluster(&self, n: usize) -> Vec<Server> {
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

async fn leader(servers: &[&Server]) -> usize {
    for _ in 0..100 {
        for (i, s) in servers.iter().enumerate() {
            if s.node.is_leader() {
                return i;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no leader within 5 s");
}

fn endpoint(i: usize, zone: &str) -> proto::Endpoint {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_acknowledged_writes_are_readable_on_every_server() {
    let _serial = SERIAL.lock().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_callers_and_bad_tokens_are_refused_with_a_reason() {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::new();
    let servers = mesh.cluster(3).await;
    leader(&servers.iter().collect::<Vec<_>>()).await;
    let addr = servers[1].addr.to_string();

    // No client certificate at all.
    let bundle = CaDir::new(mesh.ca_dir()).bundle().unwrap();
    let anon =
        trellis_federation::transport::Dialer::new(join::anonymous_client_tls(&bundle).unwrap())
            .channel(&addr)
            .unwrap();
    let err = registry_client::RegistryClient::new(anon)
        .list(ReadOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("client certificate"),
        "{}",
        err.message()
    );

    // An agent calling an operator method.
    let agent = client::connect(&addr, &mesh.creds("zone/east/agent/vm1")).unwrap();
    let err = policy_client::PolicyClient::new(agent.clone())
        .apply(PolicyDocs {
            docs: vec![PolicyDoc {
                key: Some(PolicyKey {
                    kind: "Route".into(),
                    name: "r".into(),
                }),
                spec_json: "{}".into(),
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("operator"), "{}", err.message());
    // An agent may not register in another zone either.
    let err = registry_client::RegistryClient::new(agent)
        .register(endpoint(1, "west"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // Join tokens: one use only, and not after expiry.
    let op = client::connect(&addr, &mesh.creds("operator/alice")).unwrap();
    let mut zones = zones_client::ZonesClient::new(op);
    let token = zones
        .create_join_token(TokenRequest {
            zone: "west".into(),
            edge: true,
            ttl_seconds: 60,
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let token = JoinToken::parse(&token).unwrap();
    let joined = join::join(&token, "w1", "127.0.0.1:1")
        .await
        .expect("first use joins");
    assert_eq!(joined.zone, "west");
    assert_eq!(
        joined.credentials.id().unwrap().as_str(),
        "spiffe://test.local/zone/west/server/w1"
    );
    let err = join::join(&token, "w2", "127.0.0.1:2").await.err().unwrap();
    assert!(err.to_string().contains("already used"), "{err}");

    let short = zones
        .create_join_token(TokenRequest {
            zone: "west".into(),
            edge: true,
            ttl_seconds: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let err = join::join(&JoinToken::parse(&short).unwrap(), "w3", "127.0.0.1:3")
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("expired"), "{err}");

    // A token whose fingerprint names another CA is refused before the secret is sent.
    let mut forged = token.clone();
    forged.ca_fingerprint = "00".repeat(32);
    let err = join::join(&forged, "w4", "127.0.0.1:4")
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("fingerprint"), "{err}");
    for s in servers {
        s.kill().await;
    }
}

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
    let _serial = SERIAL.lock().await;
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
        .watch(WatchRequest { from_revision: 0 })
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrenewed_lease_expires_and_a_renewed_one_stays() {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::new();
    let servers = mesh.cluster(3).await;
    let l = leader(&servers.iter().collect::<Vec<_>>()).await;
    // An agent registers through a follower; the leader alone expires leases.
    let f = (l + 1) % 3;
    let agent = client::connect(
        &servers[f].addr.to_string(),
        &mesh.creds("zone/east/agent/vm1"),
    )
    .unwrap();
    let mut reg = registry_client::RegistryClient::new(agent);
    let mut short = endpoint(1, "east");
    short.lease_seconds = 1;
    let mut kept = endpoint(2, "east");
    kept.lease_seconds = 2;
    reg.register(short).await.unwrap();
    reg.register(kept.clone()).await.unwrap();
    let key = kept.key.clone().unwrap();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        reg.renew_lease(key.clone()).await.unwrap();
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_signed_only_for_the_callers_own_identity() {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::new();
    let servers = mesh.cluster(1).await;
    leader(&servers.iter().collect::<Vec<_>>()).await;
    let addr = servers[0].addr.to_string();
    let agent = client::connect(&addr, &mesh.creds("zone/east/agent/vm1")).unwrap();
    let mut certs = certificates_client::CertificatesClient::new(agent);

    let me = mesh
        .td
        .role(trellis_ca::RoleKind::Agent, "east", "vm1")
        .unwrap();
    let (_key, csr) = trellis_ca::new_key_and_csr(&me).unwrap();
    let chain = certs
        .sign(SignRequest {
            csr: csr.as_ref().to_vec(),
            ttl_seconds: 3600,
        })
        .await
        .unwrap()
        .into_inner()
        .chain_pem;
    let chain = trellis_ca::certs_from_pem(chain.as_bytes(), "reply").unwrap();
    let info = trellis_ca::CertInfo::parse(&chain[0]).unwrap();
    assert_eq!(info.spiffe_id.unwrap(), me);

    // A CSR asking for someone else's identity is refused.
    let other = mesh
        .td
        .role(trellis_ca::RoleKind::Server, "east", "s9")
        .unwrap();
    let (_key, csr) = trellis_ca::new_key_and_csr(&other).unwrap();
    let err = certs
        .sign(SignRequest {
            csr: csr.as_ref().to_vec(),
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("csr"), "{}", err.message());
    for s in servers {
        s.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joined_servers_serve_core_ones_vote_edge_ones_stay_learners() {
    let _serial = SERIAL.lock().await;
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

    // Writes through the joined servers replicate to all three.
    for (i, s) in servers.iter().enumerate() {
        registry_client::RegistryClient::new(client::connect(&s.addr.to_string(), &op).unwrap())
            .register(endpoint(i, "east"))
            .await
            .unwrap();
    }
    for s in &servers {
        let list = registry_client::RegistryClient::new(
            client::connect(&s.addr.to_string(), &op).unwrap(),
        )
        .list(ReadOptions { linearizable: true })
        .await
        .unwrap()
        .into_inner();
        assert_eq!(list.endpoints.len(), 3);
    }
    for s in servers {
        s.kill().await;
    }
}
