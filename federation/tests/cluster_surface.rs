//! The API's unauthenticated surface and its trust in the live bundle:
//! callers without a certificate are refused before a body is decoded,
//! joins are rate limited, and a root rotation reaches the API.

use std::time::{Duration, Instant};

use tonic::Code;
use trellis_ca::{CaDir, IssueOptions};
use trellis_federation::proto::*;
use trellis_federation::transport::Dialer;
use trellis_federation::{client, join};

#[path = "support/mesh.rs"]
mod mesh;
use mesh::{Mesh, leader};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_certificate_no_body_joins_bounded_and_a_rotated_root_is_trusted_at_once() {
    let mesh = Mesh::new();
    let servers = mesh.cluster(1).await;
    leader(&servers.iter().collect::<Vec<_>>()).await;
    let addr = servers[0].addr.to_string();
    let bundle = CaDir::new(mesh.ca_dir()).bundle().unwrap();
    let anon = Dialer::new(join::anonymous_client_tls(&bundle).unwrap())
        .channel(&addr)
        .unwrap();

    // A 1 MiB registration: without a certificate it is refused as such
    // (the body is never read); with one, it is too large to decode.
    let mut big = mesh::endpoint(1, "east");
    big.labels.insert("pad".into(), "x".repeat(1024 * 1024));
    let e = registry_client::RegistryClient::new(anon.clone())
        .register(big.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let op = mesh.creds("operator/alice");
    let e = registry_client::RegistryClient::new(client::connect(&addr, &op).unwrap())
        .register(big)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(e.message().contains("too large"), "{e:?}");
    // Raft is for servers, refused before decoding too.
    let e = raft_client::RaftClient::new(client::connect(&addr, &op).unwrap())
        .forward(ForwardRequest {
            command: vec![0; 16],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("only servers"), "{e:?}");

    // What the store accepts every proxy applies: a namespace that is no
    // DNS label is refused at apply, naming the field (issue 10, bug 4).
    let e = policy_client::PolicyClient::new(client::connect(&addr, &op).unwrap())
        .apply(PolicyDocs {
            docs: vec![PolicyDoc {
                key: Some(PolicyKey {
                    kind: "Authorization".into(),
                    name: "team".into(),
                }),
                spec_json: r#"{"service": "catalog.shop", "allow": ["ns:team_a"]}"#.into(),
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("spec.allow[0]"), "{e:?}");

    // A flood of joins with junk tokens: past the burst, refused at once.
    let junk = JoinRequest {
        token: format!(
            "tj1:test.local:east:0:{}:{}:{addr}",
            "ab".repeat(32),
            "cd".repeat(32)
        ),
        name: "x".into(),
        address: "127.0.0.1:1".into(),
        csr: vec![],
    };
    let mut exhausted = 0;
    let mut unknown = 0;
    for _ in 0..100 {
        let e = zones_client::ZonesClient::new(anon.clone())
            .join(junk.clone())
            .await
            .unwrap_err();
        match e.code() {
            Code::ResourceExhausted => exhausted += 1,
            Code::Unauthenticated => unknown += 1,
            c => panic!("unexpected {c:?}: {e:?}"),
        }
    }
    assert!(
        exhausted >= 40,
        "{exhausted} of 100 junk joins were limited"
    );
    assert!(unknown >= 20, "{unknown} of 100 junk joins were answered");

    // Root rotation: an operator certificate under a new root and a new
    // zone CA is trusted by the running server within its bundle poll (2 s).
    let ca = CaDir::new(mesh.ca_dir());
    ca.rotate_root(Duration::from_secs(86400)).unwrap();
    ca.replace_zone("east", Duration::from_secs(86400)).unwrap();
    let td = mesh.td.clone();
    let id = td.id(["operator", "bob"]).unwrap();
    let creds = ca
        .root()
        .unwrap()
        .issue(&id, IssueOptions::default())
        .unwrap();
    let prefix = mesh.dir.path().join("bob");
    trellis_ca::write_credentials(&prefix, &creds, &ca.bundle().unwrap()).unwrap();
    let start = Instant::now();
    loop {
        let r = cluster_client::ClusterClient::new(client::connect(&addr, &prefix).unwrap())
            .status(Empty {})
            .await;
        match r {
            Ok(_) => break,
            Err(e) => {
                // Until the server follows the new bundle, the refusal says
                // why in words, not as a cancelled handshake.
                assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
                assert!(
                    e.message().contains("not trusted by this server's bundle"),
                    "{e:?}"
                );
                assert!(
                    start.elapsed() < Duration::from_secs(4),
                    "the new root is not trusted after {:?}: {e:?}",
                    start.elapsed()
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for s in servers {
        s.kill().await;
    }
}
