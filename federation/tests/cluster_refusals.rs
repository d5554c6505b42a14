//! Real servers in this process, talking real gRPC over mutual TLS on
//! loopback (one test per binary: each gets a process of its own).

use std::time::Duration;

use tonic::Code;
use trellis_ca::CaDir;
use trellis_federation::proto::*;
use trellis_federation::{client, join, token::JoinToken};

#[path = "support/mesh.rs"]
mod mesh;
use mesh::{Mesh, endpoint, leader};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_callers_and_bad_tokens_are_refused_with_a_reason() {
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
            ..Default::default()
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
            ..Default::default()
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

    // A port in use is named as such, not as a damaged data directory.
    let mut cfg = mesh.config("taken", &[]);
    cfg.listen = servers[0].addr;
    let err = trellis_federation::server::start(&cfg).await.err().unwrap();
    let said = err.to_string();
    assert!(
        said.contains(&format!("cannot listen on {}", servers[0].addr))
            && said.contains("holds the port")
            && !said.contains("damaged"),
        "{said}"
    );
    for s in servers {
        s.kill().await;
    }
}
