//! The joining side of `trellis zone join`: a server with nothing but a
//! token gets its certificate and a place in the cluster.
//!
//! 1. Fetch the trust bundle from a server named in the token over TLS
//!    that verifies nothing yet, and accept it only if one of its roots has
//!    the fingerprint the token carries. The token's secret is not sent on
//!    this connection.
//! 2. Call `Zones.Join` over TLS that verifies the server as a Trellis server
//!    of that bundle (no client certificate: the token is the proof), with a
//!    CSR for `spiffe://TD/zone/ZONE/server/NAME`. The key never leaves here.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use trellis_ca::{Credentials, RoleKind, TrustBundle, TrustDomain};

use crate::error::FedError;
use crate::proto;
use crate::proto::zones_client::ZonesClient;
use crate::token::{JoinToken, sha256_hex};
use crate::transport::Dialer;

/// What a successful join hands back.
pub struct Joined {
    /// This server's new identity.
    pub credentials: Credentials,
    /// The mesh's trust bundle.
    pub bundle: TrustBundle,
    /// The Raft id the cluster gave this server.
    pub node_id: u64,
    /// Its zone.
    pub zone: String,
    /// The members when it joined: the only servers it takes Raft messages
    /// from until its first snapshot.
    pub members: Vec<u64>,
}

/// Accepts any server certificate. Used only to fetch the public trust
/// bundle, which is then checked against the token's fingerprint.
#[derive(Debug)]
struct DangerAcceptAnyServer(WebPkiSupportedAlgorithms);

/// Verifies the server's chain against fixed roots and requires a Trellis
/// server identity of the trust domain.
#[derive(Debug)]
struct ServerOnly {
    roots: Vec<TrustAnchor<'static>>,
    trust_domain: String,
    algs: WebPkiSupportedAlgorithms,
}

fn config(verifier: Arc<dyn ServerCertVerifier>) -> Result<ClientConfig, FedError> {
    let mut cfg = ClientConfig::builder_with_provider(trellis_ca::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| FedError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// A client config without a certificate that admits only Trellis servers
/// of `bundle` (for joining, and for testing refusals).
pub fn anonymous_client_tls(bundle: &TrustBundle) -> Result<ClientConfig, FedError> {
    let mut roots = Vec::new();
    for r in bundle.roots() {
        let a = webpki::anchor_from_trusted_cert(r)
            .map_err(|e| FedError::Tls(format!("trust bundle root: {e}")))?;
        roots.push(a.to_owned());
    }
    config(Arc::new(ServerOnly {
        roots,
        trust_domain: bundle.trust_domain().as_str().to_string(),
        algs: trellis_ca::tls::provider().signature_verification_algorithms,
    }))
}

/// Fetches the bundle from `server` and checks it against `token`.
pub async fn fetch_bundle(server: &str, token: &JoinToken) -> Result<TrustBundle, FedError> {
    let td: TrustDomain = token
        .trust_domain
        .parse()
        .map_err(|e| FedError::Refused(format!("join token: trust domain: {e}")))?;
    // Unverified until the fingerprint matches: that match is the proof.
    let bundle = danger_fetch_bundle_unverified(server, td).await?;
    if !bundle
        .roots()
        .iter()
        .any(|r| sha256_hex(r.as_ref()) == token.ca_fingerprint)
    {
        return Err(FedError::Refused(format!(
            "{server} presents a trust bundle whose roots do not match the token's CA fingerprint; it is not the mesh the token was made for"
        )));
    }
    Ok(bundle)
}

/// Fetches the bundle `server` serves, verifying nothing: for diagnosis
/// only (`trellis check` compares it with the bundle a host holds, to say
/// that a root was rotated while the host was away). Nothing it returns may
/// be trusted: anyone on the path can answer.
pub async fn danger_fetch_bundle_unverified(
    server: &str,
    td: TrustDomain,
) -> Result<TrustBundle, FedError> {
    let algs = trellis_ca::tls::provider().signature_verification_algorithms;
    let channel = Dialer::new(config(Arc::new(DangerAcceptAnyServer(algs)))?).channel(server)?;
    let pem = ZonesClient::new(channel)
        .bundle(proto::Empty {})
        .await
        .map_err(|s| FedError::Refused(format!("{server}: {}", s.message())))?
        .into_inner()
        .bundle_pem;
    TrustBundle::from_pem(td, pem.as_bytes(), server)
        .map_err(|e| FedError::Refused(format!("{server}: trust bundle: {e}")))
}

/// Joins the cluster as server `name`, reachable by peers at `address`.
pub async fn join(token: &JoinToken, name: &str, address: &str) -> Result<Joined, FedError> {
    each_server(token, |server| join_via(server, token, name, address)).await
}

/// Tries the token's servers in order until one answers. A refusal is an
/// answer; only an unreachable server is skipped.
async fn each_server<'a, T, F, Fut>(token: &'a JoinToken, mut f: F) -> Result<T, FedError>
where
    F: FnMut(&'a str) -> Fut,
    Fut: std::future::Future<Output = Result<T, FedError>>,
{
    let mut last = None;
    for server in &token.servers {
        match f(server).await {
            Ok(j) => return Ok(j),
            Err(e @ FedError::Refused(_)) => return Err(e),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or(FedError::NoLeader))
}

async fn join_via(
    server: &str,
    token: &JoinToken,
    name: &str,
    address: &str,
) -> Result<Joined, FedError> {
    let bundle = fetch_bundle(server, token).await?;
    let id = bundle
        .trust_domain()
        .role(RoleKind::Server, &token.zone, name)
        .map_err(|e| FedError::Refused(format!("name: {e}")))?;
    let (key, csr) = trellis_ca::new_key_and_csr(&id).map_err(|e| FedError::Tls(e.to_string()))?;
    let channel = Dialer::new(anonymous_client_tls(&bundle)?).channel(server)?;
    let reply = ZonesClient::new(channel)
        .join(proto::JoinRequest {
            token: token.encode(),
            name: name.into(),
            address: address.into(),
            csr: csr.as_ref().to_vec(),
        })
        .await
        .map_err(|s| match s.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                FedError::Tls(format!("{server}: {}", s.message()))
            }
            _ => FedError::Refused(s.message().to_string()),
        })?
        .into_inner();
    let chain = trellis_ca::certs_from_pem(reply.chain_pem.as_bytes(), "join reply")
        .map_err(|e| FedError::Tls(e.to_string()))?;
    let credentials = Credentials { chain, key };
    credentials
        .check_key_matches()
        .map_err(|e| FedError::Tls(e.to_string()))?;
    Ok(Joined {
        credentials,
        bundle,
        node_id: reply.node_id,
        zone: reply.zone,
        members: reply.members,
    })
}

/// What a host agent's join hands back.
pub struct AgentJoined {
    /// `spiffe://TD/zone/ZONE/agent/NAME`.
    pub node: Credentials,
    /// One per requested workload, in request order.
    pub workloads: Vec<Credentials>,
    /// The mesh's trust bundle.
    pub bundle: TrustBundle,
    /// The agent's zone.
    pub zone: String,
}

/// Joins as host agent `name` with an agent token, claiming the workload
/// identities `workloads` (namespace, account). Keys are made here and
/// never leave: the server sees CSRs only.
pub async fn join_agent(
    token: &JoinToken,
    name: &str,
    workloads: &[(String, String)],
    ttl: Option<std::time::Duration>,
) -> Result<AgentJoined, FedError> {
    if !token.agent {
        return Err(FedError::Refused(
            "join token: this is a server token (tj1:); an agent needs one made with `trellis zone token create --agent`".into(),
        ));
    }
    each_server(token, |server| {
        join_agent_via(server, token, name, workloads, ttl)
    })
    .await
}

async fn join_agent_via(
    server: &str,
    token: &JoinToken,
    name: &str,
    workloads: &[(String, String)],
    ttl: Option<std::time::Duration>,
) -> Result<AgentJoined, FedError> {
    let bundle = fetch_bundle(server, token).await?;
    let td = bundle.trust_domain();
    let refused = |e: trellis_ca::SpiffeIdError| FedError::Refused(e.to_string());
    let tls = |e: trellis_ca::CaError| FedError::Tls(e.to_string());
    let node_id = td
        .role(RoleKind::Agent, &token.zone, name)
        .map_err(refused)?;
    let (node_key, node_csr) = trellis_ca::new_key_and_csr(&node_id).map_err(tls)?;
    let mut keys = Vec::with_capacity(workloads.len());
    let mut csrs = Vec::with_capacity(workloads.len());
    for (ns, sa) in workloads {
        let id = td.workload(ns, sa).map_err(refused)?;
        let (key, csr) = trellis_ca::new_key_and_csr(&id).map_err(tls)?;
        keys.push(key);
        csrs.push(proto::WorkloadCsr {
            namespace: ns.clone(),
            account: sa.clone(),
            csr: csr.as_ref().to_vec(),
        });
    }
    let channel = Dialer::new(anonymous_client_tls(&bundle)?).channel(server)?;
    let reply = ZonesClient::new(channel)
        .join_agent(proto::AgentJoinRequest {
            token: token.encode(),
            name: name.into(),
            node_csr: node_csr.as_ref().to_vec(),
            workloads: csrs,
            ttl_seconds: ttl.map(|t| t.as_secs()).unwrap_or(0),
        })
        .await
        .map_err(|s| match s.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                FedError::Tls(format!("{server}: {}", s.message()))
            }
            _ => FedError::Refused(s.message().to_string()),
        })?
        .into_inner();
    let creds = |pem: &str, key| -> Result<Credentials, FedError> {
        let chain = trellis_ca::certs_from_pem(pem.as_bytes(), "join reply")
            .map_err(|e| FedError::Tls(e.to_string()))?;
        let c = Credentials { chain, key };
        c.check_key_matches()
            .map_err(|e| FedError::Tls(e.to_string()))?;
        Ok(c)
    };
    if reply.workload_chain_pem.len() != keys.len() {
        return Err(FedError::Tls(format!(
            "{server} answered {} workload certificates for {} requests",
            reply.workload_chain_pem.len(),
            keys.len()
        )));
    }
    let node = creds(&reply.node_chain_pem, node_key)?;
    let workloads = reply
        .workload_chain_pem
        .iter()
        .zip(keys)
        .map(|(pem, key)| creds(pem, key))
        .collect::<Result<_, _>>()?;
    Ok(AgentJoined {
        node,
        workloads,
        bundle,
        zone: reply.zone,
    })
}

// === verifiers ===

impl ServerCertVerifier for DangerAcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

impl ServerCertVerifier for ServerOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        trellis_ca::tls::verify_chain(
            end_entity,
            intermediates,
            &self.roots,
            now,
            webpki::KeyUsage::server_auth(),
            &self.algs,
        )
        .map_err(|e| rustls::Error::General(format!("server certificate: {e}")))?;
        let id = trellis_ca::tls::peer_id(Some(std::slice::from_ref(end_entity)))
            .ok_or_else(|| rustls::Error::General("server certificate has no SPIFFE ID".into()))?;
        if id.trust_domain_str() != self.trust_domain || id.role_kind() != Some(RoleKind::Server) {
            return Err(rustls::Error::General(format!(
                "{id} is not a Trellis server of {}",
                self.trust_domain
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
