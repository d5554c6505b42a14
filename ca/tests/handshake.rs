//! mTLS handshakes over real TCP sockets on loopback, with the configs the
//! rest of Trellis uses. Each case checks what both ends see.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow};
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use trellis_ca::rotate::{LocalSigner, Rotator};
use trellis_ca::tls::{self, CertSource, PeerPolicy, TrustStore};
use trellis_ca::{
    Authority, CertInfo, Credentials, DEFAULT_ROOT_TTL, DEFAULT_ZONE_TTL, IssueOptions, RoleKind,
    SpiffeId, TrustBundle, TrustDomain,
};

struct Pki {
    td: TrustDomain,
    root: Authority,
    east: Authority,
}

impl Pki {
    fn new(td: &str) -> Self {
        let td: TrustDomain = td.parse().unwrap();
        let root = Authority::new_root(&td, DEFAULT_ROOT_TTL).unwrap();
        let east = root.new_zone("east", DEFAULT_ZONE_TTL).unwrap();
        Self { td, root, east }
    }

    fn bundle(&self) -> TrustBundle {
        TrustBundle::new(self.td.clone(), vec![self.root.cert().clone()]).unwrap()
    }

    fn trust(&self) -> Arc<TrustStore> {
        TrustStore::new(self.bundle())
    }

    fn gateway(&self, name: &str) -> Credentials {
        self.issue(&self.td.role(RoleKind::Gateway, "east", name).unwrap())
    }

    fn issue(&self, id: &SpiffeId) -> Credentials {
        self.east.issue(id, IssueOptions::default()).unwrap()
    }
}

fn server(creds: Credentials, trust: Arc<TrustStore>, peers: PeerPolicy) -> ServerConfig {
    tls::server_config(CertSource::new(creds).unwrap(), trust, peers).unwrap()
}

fn client(creds: Credentials, trust: Arc<TrustStore>, peers: PeerPolicy) -> ClientConfig {
    tls::client_config(CertSource::new(creds).unwrap(), trust, peers).unwrap()
}

/// What each end learned: the verified peer identity, or the error text.
struct Outcome {
    server: Result<SpiffeId, String>,
    client: Result<SpiffeId, String>,
}

/// One connection: handshake, then the client sends "ping" and expects "pong".
async fn exchange(server_cfg: ServerConfig, client_cfg: ClientConfig) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(server_cfg));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let peer = tls::peer_id(tls.get_ref().1.peer_certificates())
            .ok_or_else(|| "no peer identity".to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(b"pong").await.map_err(|e| e.to_string())?;
        tls.shutdown().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(peer)
    });
    let client = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let sni = ServerName::try_from("8080.catalog.shop.east.mesh").unwrap();
        let mut tls = TlsConnector::from(Arc::new(client_cfg))
            .connect(sni, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let peer = tls::peer_id(tls.get_ref().1.peer_certificates())
            .ok_or_else(|| "no peer identity".to_string())?;
        // In TLS 1.3 the server judges the client's certificate after the
        // client finished; a refusal shows up on the first read.
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(peer)
    }
    .await;
    let server = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server side hung")
        .expect("server task panicked");
    Outcome { server, client }
}

fn assert_refused(side: &Result<SpiffeId, String>, needle: &str) {
    match side {
        Ok(id) => {
            panic!("expected a refusal mentioning {needle:?}, but the peer {id} was accepted")
        }
        Err(e) => assert!(
            e.to_lowercase().contains(&needle.to_lowercase()),
            "refusal {e:?} does not mention {needle:?}"
        ),
    }
}

#[tokio::test]
async fn right_identities_handshake_and_see_each_other() {
    let pki = Pki::new("trellis.local");
    let west = pki.root.new_zone("west", DEFAULT_ZONE_TTL).unwrap();
    let west_gw_id = pki.td.role(RoleKind::Gateway, "west", "gw1").unwrap();
    let west_gw = west.issue(&west_gw_id, IssueOptions::default()).unwrap();
    let gateways = PeerPolicy::Roles(vec![RoleKind::Gateway]);
    let out = exchange(
        server(pki.gateway("gw1"), pki.trust(), gateways.clone()),
        client(west_gw, pki.trust(), gateways),
    )
    .await;
    assert_eq!(out.server.unwrap(), west_gw_id);
    assert_eq!(
        out.client.unwrap().as_str(),
        "spiffe://trellis.local/zone/east/gateway/gw1"
    );
}

#[tokio::test]
async fn client_from_another_root_is_refused() {
    let pki = Pki::new("trellis.local");
    let stranger = Pki::new("trellis.local");
    let out = exchange(
        server(pki.gateway("a"), pki.trust(), PeerPolicy::TrustDomain),
        client(stranger.gateway("b"), pki.trust(), PeerPolicy::TrustDomain),
    )
    .await;
    assert_refused(&out.server, "UnknownIssuer");
    assert!(out.client.is_err());
}

#[tokio::test]
async fn server_from_another_root_is_refused() {
    let pki = Pki::new("trellis.local");
    let stranger = Pki::new("trellis.local");
    let out = exchange(
        server(
            stranger.gateway("a"),
            stranger.trust(),
            PeerPolicy::TrustDomain,
        ),
        client(pki.gateway("b"), pki.trust(), PeerPolicy::TrustDomain),
    )
    .await;
    assert_refused(&out.client, "UnknownIssuer");
}

#[tokio::test]
async fn another_trust_domain_is_refused_even_with_its_root_trusted() {
    let pki = Pki::new("trellis.local");
    let other = Pki::new("other.example");
    // Trust both roots, so only the trust-domain rule can refuse.
    let both = TrustBundle::new(
        pki.td.clone(),
        vec![pki.root.cert().clone(), other.root.cert().clone()],
    )
    .unwrap();
    let out = exchange(
        server(
            pki.gateway("a"),
            TrustStore::new(both.clone()),
            PeerPolicy::TrustDomain,
        ),
        client(
            other.gateway("b"),
            TrustStore::new(both),
            PeerPolicy::TrustDomain,
        ),
    )
    .await;
    assert_refused(&out.server, "is not in trust domain trellis.local");
}

#[tokio::test]
async fn expired_and_not_yet_valid_certificates_are_refused() {
    let pki = Pki::new("trellis.local");
    let id = pki.td.workload("shop", "catalog").unwrap();
    let day = Duration::from_secs(86_400);
    let expired = pki
        .east
        .issue(
            &id,
            IssueOptions {
                ttl: day,
                not_before: Some(SystemTime::now() - 2 * day),
            },
        )
        .unwrap();
    let future = pki
        .east
        .issue(
            &id,
            IssueOptions {
                ttl: day,
                not_before: Some(SystemTime::now() + day),
            },
        )
        .unwrap();

    let out = exchange(
        server(pki.gateway("a"), pki.trust(), PeerPolicy::TrustDomain),
        client(expired.clone(), pki.trust(), PeerPolicy::TrustDomain),
    )
    .await;
    assert_refused(&out.server, "expired");

    let out = exchange(
        server(pki.gateway("a"), pki.trust(), PeerPolicy::TrustDomain),
        client(future, pki.trust(), PeerPolicy::TrustDomain),
    )
    .await;
    assert_refused(&out.server, "NotValidYet");

    // The server side is checked the same way.
    let out = exchange(
        server(expired, pki.trust(), PeerPolicy::TrustDomain),
        client(pki.gateway("b"), pki.trust(), PeerPolicy::TrustDomain),
    )
    .await;
    assert_refused(&out.client, "expired");
}

#[tokio::test]
async fn certificate_without_uri_san_is_refused() {
    let pki = Pki::new("trellis.local");
    // Sign a DNS-only leaf with the zone CA's own key, outside the Authority API,
    // which would never make one.
    let issuer_key = rcgen::KeyPair::from_pem(&pki.east.key_pem()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&pki.east.cert_pem(), issuer_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["catalog.shop.mesh".into()]).unwrap();
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let leaf = params.signed_by(&leaf_key, &issuer).unwrap();
    let chain = vec![leaf.der().clone(), pki.east.cert().clone()];
    let key = rustls_pki_types::PrivatePkcs8KeyDer::from(leaf_key.serialize_der());
    let no_san = Credentials { chain, key };

    // Trellis refuses to present it at all...
    let err = CertSource::new(no_san.clone()).unwrap_err();
    assert!(err.to_string().contains("no URI SAN"), "{err}");

    // ...and a peer presenting it (here through plain rustls) is refused.
    let client_cfg = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer))
        .with_client_auth_cert(
            no_san.chain.clone(),
            rustls_pki_types::PrivateKeyDer::Pkcs8(no_san.key.clone_key()),
        )
        .unwrap();
    let out = exchange(
        server(pki.gateway("a"), pki.trust(), PeerPolicy::TrustDomain),
        client_cfg,
    )
    .await;
    assert_refused(&out.server, "no URI SAN");
}

#[tokio::test]
async fn client_not_on_the_allow_list_is_refused() {
    let pki = Pki::new("trellis.local");
    let allowed = pki.td.role(RoleKind::Gateway, "east", "gw2").unwrap();
    let out = exchange(
        server(
            pki.gateway("gw1"),
            pki.trust(),
            PeerPolicy::AllowList(vec![allowed.clone()]),
        ),
        client(pki.gateway("gw3"), pki.trust(), PeerPolicy::TrustDomain),
    )
    .await;
    assert_refused(&out.server, "is not allowed here");
    assert!(out.client.is_err());

    // A workload identity is refused where only gateways may connect.
    let workload = pki.issue(&pki.td.workload("shop", "catalog").unwrap());
    let out = exchange(
        server(
            pki.gateway("gw1"),
            pki.trust(),
            PeerPolicy::Roles(vec![RoleKind::Gateway]),
        ),
        client(workload, pki.trust(), PeerPolicy::TrustDomain),
    )
    .await;
    assert_refused(&out.server, "only roles [gateway]");

    // The listed identity gets in.
    let out = exchange(
        server(
            pki.gateway("gw1"),
            pki.trust(),
            PeerPolicy::AllowList(vec![allowed.clone()]),
        ),
        client(pki.gateway("gw2"), pki.trust(), PeerPolicy::TrustDomain),
    )
    .await;
    assert_eq!(out.server.unwrap(), allowed);
}

#[tokio::test]
async fn bundle_with_old_and_new_root_accepts_both_during_rotation() {
    let old = Pki::new("trellis.local");
    let new = Pki::new("trellis.local");
    let both = TrustBundle::new(
        old.td.clone(),
        vec![old.root.cert().clone(), new.root.cert().clone()],
    )
    .unwrap();
    let store = TrustStore::new(both.clone());
    // old-root server, new-root client, and the other way round.
    for (s, c) in [
        (old.gateway("a"), new.gateway("b")),
        (new.gateway("a"), old.gateway("b")),
    ] {
        let out = exchange(
            server(s, store.clone(), PeerPolicy::TrustDomain),
            client(c, store.clone(), PeerPolicy::TrustDomain),
        )
        .await;
        out.server.unwrap();
        out.client.unwrap();
    }
    // Once the old root is dropped, its leaves are refused at the next handshake.
    let mut only_new = both;
    only_new.remove_root(old.root.cert()).unwrap();
    store.update(only_new);
    let out = exchange(
        server(new.gateway("a"), store.clone(), PeerPolicy::TrustDomain),
        client(old.gateway("b"), store.clone(), PeerPolicy::TrustDomain),
    )
    .await;
    assert_refused(&out.server, "UnknownIssuer");
}

/// Serves echo over mTLS until the listener is dropped.
async fn echo_server(cfg: ServerConfig) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(cfg));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

struct Conn {
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    peer_serial: String,
}

async fn connect(addr: std::net::SocketAddr, cfg: Arc<ClientConfig>) -> Result<Conn> {
    let tcp = TcpStream::connect(addr).await?;
    let tls = TlsConnector::from(cfg)
        .connect(ServerName::try_from("echo.mesh")?, tcp)
        .await?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .context("no peer certificate")?;
    let peer_serial = CertInfo::parse(leaf)?.serial;
    Ok(Conn { tls, peer_serial })
}

async fn echo(conn: &mut Conn, msg: &[u8]) -> Result<()> {
    conn.tls.write_all(msg).await?;
    let mut buf = vec![0u8; msg.len()];
    conn.tls.read_exact(&mut buf).await?;
    if buf != msg {
        return Err(anyhow!("echo mismatch"));
    }
    Ok(())
}

#[tokio::test]
async fn swapped_certificate_serves_new_connections_while_old_ones_keep_working() {
    let pki = Pki::new("trellis.local");
    let source = CertSource::new(pki.gateway("gw1")).unwrap();
    let addr = echo_server(
        tls::server_config(source.clone(), pki.trust(), PeerPolicy::TrustDomain).unwrap(),
    )
    .await;
    let client_cfg = Arc::new(client(
        pki.gateway("c"),
        pki.trust(),
        PeerPolicy::TrustDomain,
    ));

    let mut old = connect(addr, client_cfg.clone()).await.unwrap();
    echo(&mut old, b"before").await.unwrap();

    let next = pki.gateway("gw1");
    let next_serial = next.leaf_info().unwrap().serial;
    source.swap(next).unwrap();

    let mut new = connect(addr, client_cfg).await.unwrap();
    assert_eq!(new.peer_serial, next_serial);
    assert_ne!(old.peer_serial, new.peer_serial);
    echo(&mut new, b"new").await.unwrap();
    echo(&mut old, b"old connection still works").await.unwrap();
}

#[tokio::test]
async fn rotator_renews_before_expiry_without_dropping_connections() {
    let pki = Pki::new("trellis.local");
    let id = pki.td.role(RoleKind::Gateway, "east", "gw1").unwrap();
    // Short-lived and not backdated, so half-life comes in two seconds.
    let short = IssueOptions {
        ttl: Duration::from_secs(4),
        not_before: Some(SystemTime::now()),
    };
    let first = pki.east.issue(&id, short).unwrap();
    let first_info = first.leaf_info().unwrap();
    let source = CertSource::new(first).unwrap();
    let client_creds = pki.issue(&pki.td.workload("shop", "client").unwrap());
    let Pki { td, root, east } = pki;

    let signer = LocalSigner {
        authority: Arc::new(east),
        options: short,
    };
    let persisted = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = persisted.clone();
    let rotator = Rotator::new(source.clone(), signer).on_renewed(move |c| {
        seen.lock().unwrap().push(c.leaf_info()?.serial);
        Ok(())
    });
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(rotator.run(shutdown.clone()));

    let addr = echo_server(
        tls::server_config(
            source.clone(),
            pki_trust(&root, &td),
            PeerPolicy::TrustDomain,
        )
        .unwrap(),
    )
    .await;
    let client_cfg = Arc::new(client(
        client_creds,
        pki_trust(&root, &td),
        PeerPolicy::TrustDomain,
    ));
    let mut old = connect(addr, client_cfg.clone()).await.unwrap();
    assert_eq!(old.peer_serial, first_info.serial);

    // Wait for the swap, at most until well past the first certificate's expiry.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while source.credentials().leaf_info().unwrap().serial == first_info.serial {
        assert!(tokio::time::Instant::now() < deadline, "never renewed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let swapped_at = SystemTime::now();
    assert!(
        swapped_at < first_info.not_after,
        "renewed only after the old certificate expired"
    );
    let renewed = source.credentials().leaf_info().unwrap();
    assert_eq!(renewed.spiffe_id.as_ref(), Some(&id));
    // The hook sees every certificate before it is served (a slow run may
    // already have renewed more than once).
    assert!(persisted.lock().unwrap().contains(&renewed.serial));

    let new = connect(addr, client_cfg).await.unwrap();
    assert_ne!(new.peer_serial, first_info.serial);
    echo(&mut old, b"still here").await.unwrap();

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("rotator did not stop on shutdown")
        .unwrap();
}

fn pki_trust(root: &Authority, td: &TrustDomain) -> Arc<TrustStore> {
    TrustStore::new(TrustBundle::new(td.clone(), vec![root.cert().clone()]).unwrap())
}

/// Lets the test drive a raw rustls client that presents a non-SPIFFE cert.
#[derive(Debug)]
struct AcceptAnyServer;

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[test]
fn a_new_bundle_must_keep_a_root_trusted_now() {
    let a = Pki::new("example.org");
    let b = Pki::new("example.org");
    let both = TrustBundle::new(
        a.td.clone(),
        vec![a.root.cert().clone(), b.root.cert().clone()],
    )
    .unwrap();
    // A rotation (old and new), then the retirement of the old root.
    assert!(a.bundle().continued_by(&both));
    assert!(both.continued_by(&b.bundle()));
    // A bundle of roots we never trusted.
    assert!(!a.bundle().continued_by(&b.bundle()));
}
