//! Real servers in this process, talking real gRPC over mutual TLS on
//! loopback (one test per binary: each gets a process of its own).

use tonic::Code;
use trellis_federation::client;
use trellis_federation::proto::*;

#[path = "support/mesh.rs"]
mod mesh;
use mesh::{Mesh, leader};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_signed_only_for_the_callers_own_identity() {
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
