//! Attacks through the real gRPC API over mutual TLS, with the credentials
//! an attacker would hold: a join token's text, one agent's identity, a
//! server's identity. Each refusal names what was refused and why.

use std::time::Duration;

use tonic::Code;
use trellis_federation::proto::*;
use trellis_federation::state::Command;
use trellis_federation::{client, join, token::JoinToken};

#[path = "support/mesh.rs"]
mod mesh;
use mesh::{Mesh, leader};

fn agent_endpoint(service: &str, host: &str, account: &str, lease: u64) -> Endpoint {
    Endpoint {
        key: Some(EndpointKey {
            namespace: "shop".into(),
            service: service.into(),
            zone: "east".into(),
            id: host.into(),
        }),
        address: "127.0.0.1".into(),
        ports: vec![8080],
        protocol: "http".into(),
        labels: [("trellis.account".to_string(), account.to_string())].into(),
        healthy: true,
        lease_seconds: lease,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_agents_and_servers_get_exactly_what_they_were_granted() {
    let mesh = Mesh::new();
    let servers = mesh.cluster(3).await;
    let l = leader(&servers.iter().collect::<Vec<_>>()).await;
    let addr = servers[l].addr.to_string();
    let op = mesh.creds("operator/alice");
    let opc = client::connect(&addr, &op).unwrap();

    // A server token for zone west whose text is edited to say east: the
    // identity comes from the stored record (west), not the text.
    let token = mesh
        .token(
            &addr,
            &op,
            TokenRequest {
                zone: "west".into(),
                ttl_seconds: 60,
                ..Default::default()
            },
        )
        .await;
    let edited = token.replacen(":west:", ":east:", 1);
    assert_ne!(edited, token);
    let Err(err) = join::join(&JoinToken::parse(&edited).unwrap(), "w1", "127.0.0.1:1").await
    else {
        panic!("an edited token joined")
    };
    assert!(
        err.to_string()
            .contains("entitled only to spiffe://test.local/zone/west/server/w1"),
        "{err}"
    );
    // The refusal did not spend the token: as issued, it joins zone west.
    let joined = join::join(&JoinToken::parse(&token).unwrap(), "w1", "127.0.0.1:1").await;
    let joined = joined.expect("join with the token as issued");
    assert_eq!(joined.zone, "west");
    assert_eq!(
        joined.credentials.id().unwrap().to_string(),
        "spiffe://test.local/zone/west/server/w1"
    );
    assert!(
        !joined.members.is_empty(),
        "the join reply names the members"
    );
    let w1 = mesh.dir.path().join("w1");
    trellis_ca::write_credentials(&w1, &joined.credentials, &joined.bundle).unwrap();
    let w1_id = trellis_federation::api::member_id("west", "w1");
    // A zone cannot go while it has a server (re-made, it would be core).
    let e = zones_client::ZonesClient::new(opc.clone())
        .leave(ZoneName {
            name: "west".into(),
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("still has server w1"), "{e:?}");
    // Removed by an operator, w1's own credentials can neither add it back
    // nor renew it.
    cluster_client::ClusterClient::new(opc.clone())
        .remove(MemberId { id: w1_id })
        .await
        .unwrap();
    let w1c = client::connect(&addr, &w1).unwrap();
    let e = cluster_client::ClusterClient::new(w1c.clone())
        .add_learner(Member {
            id: 0,
            name: "west/w1".into(),
            address: "127.0.0.1:1".into(),
            role: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("removed by an operator"), "{e:?}");
    let (_, csr) = trellis_ca::new_key_and_csr(&joined.credentials.id().unwrap()).unwrap();
    let e = certificates_client::CertificatesClient::new(w1c)
        .sign(SignRequest {
            csr: csr.as_ref().to_vec(),
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert!(
        e.message().contains("was removed from the cluster"),
        "{e:?}"
    );

    // A name already in use is refused, and the token is not spent by it.
    let east = mesh
        .token(
            &addr,
            &op,
            TokenRequest {
                zone: "east".into(),
                ttl_seconds: 60,
                ..Default::default()
            },
        )
        .await;
    let Err(err) = join::join(&JoinToken::parse(&east).unwrap(), "s1", "127.0.0.1:1").await else {
        panic!("joined under a member's name")
    };
    assert!(err.to_string().contains("already a member"), "{err}");

    // Junk tokens never reach the Raft log.
    // Wait for the log to settle (the join's audit note and the like).
    let mut before = servers[l].node.status().commit;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = servers[l].node.status().commit;
        if now == before {
            break;
        }
        before = now;
    }
    let mut junk = JoinToken::parse(&east).unwrap();
    junk.secret = "cd".repeat(32);
    let junk = junk.encode();
    let Err(err) = join::join(&JoinToken::parse(&junk).unwrap(), "x1", "127.0.0.1:2").await else {
        panic!("a junk token joined")
    };
    assert!(err.to_string().contains("unknown"), "{err}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        servers[l].node.status().commit,
        before,
        "a junk token was proposed"
    );

    // An agent token bound to host vm1, granting shop/catalog only.
    let agent_token = mesh
        .token(
            &addr,
            &op,
            TokenRequest {
                zone: "east".into(),
                agent: true,
                workloads: vec!["shop/catalog".into()],
                name: "vm1".into(),
                ttl_seconds: 60,
                ..Default::default()
            },
        )
        .await;
    let t = JoinToken::parse(&agent_token).unwrap();
    let Err(err) = join::join_agent(&t, "vm2", &[("shop".into(), "catalog".into())], None).await
    else {
        panic!("joined under another name than the token's")
    };
    assert!(err.to_string().contains("bound to \"vm1\""), "{err}");
    // A lifetime of ten years is capped at a day.
    let ten_years = Some(Duration::from_secs(10 * 365 * 86400));
    let agent = join::join_agent(&t, "vm1", &[("shop".into(), "catalog".into())], ten_years)
        .await
        .unwrap();
    let left = agent.node.leaf_info().unwrap().not_after;
    assert!(
        left <= std::time::SystemTime::now() + Duration::from_secs(86400 + 60),
        "lifetime not capped"
    );
    let prefix = mesh.dir.path().join("vm1");
    trellis_ca::write_credentials(&prefix, &agent.node, &agent.bundle).unwrap();
    // The operator registers an endpoint the agent does not own.
    registry_client::RegistryClient::new(opc.clone())
        .register(agent_endpoint("catalog", "vm9", "catalog", 30))
        .await
        .unwrap();

    // Registration is checked where it lands and again on the leader: try
    // every server.
    for s in &servers {
        let ch = client::connect(&s.addr.to_string(), &prefix).unwrap();
        let mut reg = registry_client::RegistryClient::new(ch.clone());
        let refused = |r: Result<tonic::Response<WriteReply>, tonic::Status>, want: &str| {
            let e = r.expect_err(want);
            assert!(
                matches!(e.code(), Code::PermissionDenied | Code::InvalidArgument),
                "{want}: {e:?}"
            );
            assert!(e.message().contains(want), "{want}: {e:?}");
        };
        // Its own host, its granted workload: fine.
        reg.register(agent_endpoint("catalog", "vm1", "catalog", 30))
            .await
            .unwrap();
        refused(
            reg.register(agent_endpoint("catalog", "vm1", "admin", 30))
                .await,
            "granted",
        );
        refused(
            reg.register(agent_endpoint("catalog", "vm9", "catalog", 30))
                .await,
            "own host",
        );
        let mut far = agent_endpoint("catalog", "vm1", "catalog", 30);
        far.address = "10.9.9.9".into();
        refused(reg.register(far).await, "connected from");
        let mut sys = agent_endpoint("gateway", "vm1", "catalog", 30);
        sys.key.as_mut().unwrap().namespace = "trellis-system".into();
        refused(reg.register(sys).await, "reserved");
        // Nor a plain endpoint: the zone's gateway would connect in
        // plaintext wherever it pointed.
        let mut plain = agent_endpoint("catalog", "vm1", "catalog", 30);
        plain.labels.insert("trellis.plain".into(), "true".into());
        refused(reg.register(plain).await, "never plain endpoints");
        refused(
            reg.register(agent_endpoint("catalog", "vm1", "catalog", 0))
                .await,
            "lease_seconds",
        );
        let other = EndpointKey {
            namespace: "shop".into(),
            service: "catalog".into(),
            zone: "east".into(),
            id: "vm9".into(),
        };
        refused(
            reg.deregister(other.clone()).await,
            "only it or an operator",
        );
        refused(reg.renew_lease(other).await, "only it or an operator");
        let e = cluster_client::ClusterClient::new(ch.clone())
            .remove(MemberId {
                id: servers[0].node.id(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    }

    // A server's identity is not an operator's: a member forwarding a
    // policy write on an agent's behalf is refused by the leader, and so is
    // a server that is not a member at all.
    let f = (l + 1) % 3;
    let member = mesh.creds(&format!("zone/east/server/s{f}"));
    let forged = |caller: &str| ForwardRequest {
        command: serde_json::to_vec(&serde_json::json!({"As": {
            "caller": caller,
            "at_ms": 0,
            "command": {"DeletePolicy": {"kind": "Route", "name": "x"}},
        }}))
        .unwrap(),
    };
    let e = raft_client::RaftClient::new(client::connect(&addr, &member).unwrap())
        .forward(forged("spiffe://test.local/zone/east/agent/vm1"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let stranger = mesh.creds("zone/east/server/intruder");
    let e = raft_client::RaftClient::new(client::connect(&addr, &stranger).unwrap())
        .forward(forged("spiffe://test.local/operator/alice"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("not a member"), "{e:?}");
    // A forwarded write must carry its caller.
    let bare = ForwardRequest {
        command: serde_json::to_vec(&Command::RemoveZone {
            name: "east".into(),
        })
        .unwrap(),
    };
    let e = raft_client::RaftClient::new(client::connect(&addr, &member).unwrap())
        .forward(bare)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Every change to tokens and membership is in the audit trail, with who.
    let audit = audit_client::AuditClient::new(opc.clone())
        .list(AuditQuery { limit: 0 })
        .await
        .unwrap()
        .into_inner();
    let has = |action: &str, by: &str| {
        audit
            .entries
            .iter()
            .any(|a| a.action == action && a.by.ends_with(by))
    };
    assert!(has("token.create", "operator/alice"), "{audit:?}");
    assert!(has("token.use", "server/w1"), "{audit:?}");
    assert!(has("member.add-learner", "server/w1"), "{audit:?}");
    assert!(has("member.remove", "operator/alice"), "{audit:?}");
    assert!(has("token.use", "agent/vm1"), "{audit:?}");

    // Tokens are listed without secrets and can be revoked while unused.
    let spare = mesh
        .token(
            &addr,
            &op,
            TokenRequest {
                zone: "east".into(),
                ttl_seconds: 60,
                ..Default::default()
            },
        )
        .await;
    let mut zones = zones_client::ZonesClient::new(opc.clone());
    let list = zones.list_tokens(Empty {}).await.unwrap().into_inner();
    let secret = JoinToken::parse(&spare).unwrap().secret;
    assert!(!format!("{list:?}").contains(&secret));
    let spare_id =
        trellis_federation::state::token_id(&JoinToken::parse(&spare).unwrap().secret_hash());
    let unused: Vec<_> = list
        .tokens
        .iter()
        .filter(|t| t.used_by.is_empty())
        .collect();
    assert_eq!(unused.len(), 2, "{list:?}");
    assert!(unused.iter().any(|t| t.id == spare_id), "{list:?}");
    zones.revoke_token(TokenId { id: spare_id }).await.unwrap();
    let Err(err) = join::join(&JoinToken::parse(&spare).unwrap(), "s7", "127.0.0.1:3").await else {
        panic!("a revoked token joined")
    };
    assert!(err.to_string().contains("unknown"), "{err}");

    for s in servers {
        s.kill().await;
    }
}
