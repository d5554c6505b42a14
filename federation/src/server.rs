//! A whole federation server: storage, Raft node, transport and the gRPC
//! API on one listener. `trellis server` is a thin wrapper around [`start`].

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use trellis_ca::tls::{CertSource, TrustStore};
use trellis_ca::{CaDir, Credentials, IssueOptions, RoleKind, TrustBundle};

use trellis_ca::rotate::{LocalSigner, Rotator};

use crate::api::{Api, member_id};
use crate::config::ServerConfig;
use crate::error::FedError;
use crate::node::{self, NodeHandle, Transport};
use crate::signer::ClusterSigner;
use crate::state::MemberRecord;
use crate::storage::{Db, RaftStorage};
use crate::transport::{self, Dialer, RaftTransport};

/// A running server.
pub struct Server {
    /// The address the listener is bound to.
    pub addr: SocketAddr,
    /// The Raft node.
    pub node: NodeHandle,
    cancel: CancellationToken,
    serve: JoinHandle<Result<(), tonic::transport::Error>>,
}

/// This server's identity and the bundle it trusts: from `credentials`, or
/// issued from the zone CA of `ca_dir` (the zone CA is made if missing).
pub fn credentials(cfg: &ServerConfig) -> Result<(Credentials, TrustBundle), FedError> {
    let ca_err = |e: trellis_ca::CaError| FedError::Tls(e.to_string());
    if let Some(prefix) = &cfg.credentials {
        return trellis_ca::load_credentials(prefix).map_err(ca_err);
    }
    let dir = cfg
        .ca_dir
        .as_deref()
        .ok_or_else(|| FedError::Refused("credentials: set credentials or ca_dir".into()))?;
    let ca = CaDir::new(dir);
    let td = cfg
        .trust_domain()
        .map_err(|e| FedError::Refused(e.to_string()))?;
    let zone = match ca.zone(&cfg.zone) {
        Ok(z) => z,
        // Another server sharing the CA directory may be making the zone CA
        // at this moment; if creating fails, its result is as good as ours.
        Err(_) => match ca.create_zone(&cfg.zone, trellis_ca::DEFAULT_ZONE_TTL) {
            Ok(z) => z,
            Err(e) => {
                std::thread::sleep(std::time::Duration::from_millis(200));
                ca.zone(&cfg.zone).map_err(|_| ca_err(e))?
            }
        },
    };
    let id = td
        .role(RoleKind::Server, &cfg.zone, &cfg.name)
        .map_err(|e| FedError::Refused(format!("name: {e}")))?;
    let creds = zone.issue(&id, IssueOptions::default()).map_err(ca_err)?;
    Ok((creds, ca.bundle().map_err(ca_err)?))
}

/// Opens the data directory, starts the node and serves the API on `listener`
/// (bind it yourself to learn the port before peers are configured).
pub async fn start_on(cfg: &ServerConfig, listener: TcpListener) -> Result<Server, FedError> {
    let (creds, bundle) = credentials(cfg)?;
    let bundle_pem = bundle.to_pem();
    let certs = CertSource::new(creds).map_err(|e| FedError::Tls(e.to_string()))?;
    let trust = TrustStore::new(bundle);

    // The format marker first: sled must not touch data it may not
    // understand. It names the new format only once the store has moved
    // an older one over, so a failed move leaves the older binary able to
    // open the directory.
    let found = crate::datadir::check(&cfg.data_dir, crate::datadir::SERVER_FORMAT)?;
    let storage = RaftStorage::open(Db::open(&cfg.data_dir)?)?;
    crate::datadir::stamp(&cfg.data_dir, crate::datadir::SERVER_FORMAT, found)?;
    let dialer = Dialer::new(transport::client_tls(certs.clone(), trust.clone())?);
    let signer_dialer = dialer.clone();
    let id = cfg.node_id();
    let addr = listener
        .local_addr()
        .map_err(|e| FedError::Tls(e.to_string()))?;
    let advertise = match &cfg.advertise {
        Some(a) => a.clone(),
        None => addr.to_string(),
    };
    let raft_transport = RaftTransport::new(id, advertise.clone(), dialer);
    let mut node_cfg = cfg.node_config();
    node_cfg.members.push(MemberRecord {
        id,
        name: cfg.name.clone(),
        zone: cfg.zone.clone(),
        address: advertise.clone(),
    });
    let mut voters = vec![id];
    for p in &cfg.peers {
        let zone = p.zone.clone().unwrap_or_else(|| cfg.zone.clone());
        let pid = member_id(&zone, &p.name);
        raft_transport.set_address(pid, &p.address);
        voters.push(pid);
        node_cfg.members.push(MemberRecord {
            id: pid,
            name: p.name.clone(),
            zone,
            address: p.address.clone(),
        });
    }
    let single = voters.len() == 1;
    let node = node::start(
        node_cfg,
        storage,
        cfg.bootstrap.then_some(voters),
        Arc::new(raft_transport.clone()),
    )?;
    raft_transport.attach(node.clone());
    if cfg.bootstrap && single {
        // A lone voter need not wait out an election timeout.
        node.campaign().await?;
    }

    let addr = listener
        .local_addr()
        .map_err(|e| FedError::Tls(e.to_string()))?;
    let advertise = match &cfg.advertise {
        Some(a) => a.clone(),
        None => addr.to_string(),
    };
    let raft_transport_for_signer = raft_transport.clone();
    let api = Api::new(
        node.clone(),
        raft_transport,
        cfg.ca_dir.clone(),
        bundle_pem,
        advertise,
        cfg.trust_domain()
            .map_err(|e| FedError::Refused(e.to_string()))?
            .role(RoleKind::Server, &cfg.zone, &cfg.name)
            .map_err(|e| FedError::Refused(format!("name: {e}")))?,
        cfg.join_members.clone(),
    );
    let incoming = transport::incoming(
        listener,
        transport::server_tls(certs.clone(), trust.clone())?,
        trust.clone(),
    );
    // The API's token: stopping the server also ends its watch, report
    // and Raft streams, which would otherwise hold the drain to its end.
    let cancel = api.stopping();
    tokio::spawn(follow_bundle(
        cfg.clone(),
        trust.clone(),
        api.clone(),
        (signer_dialer.clone(), raft_transport_for_signer.clone()),
        cancel.clone(),
    ));
    tokio::spawn(promote_self(api.clone(), cancel.clone()));
    start_rotation(
        cfg,
        certs,
        signer_dialer,
        raft_transport_for_signer,
        cancel.clone(),
    )?;
    let shutdown = cancel.clone().cancelled_owned();
    let serve = tokio::spawn(
        tonic::transport::Server::builder()
            // A proxy holds one watch per connection; nothing honest opens
            // hundreds of streams on one.
            .max_concurrent_streams(Some(transport::MAX_STREAMS_PER_CONNECTION))
            .layer(tower::layer::layer_fn(crate::spans::layer))
            .add_routes(api.routes())
            .serve_with_incoming_shutdown(incoming, shutdown),
    );
    Ok(Server {
        addr,
        node,
        cancel,
        serve,
    })
}

/// Renews this server's certificate at half-life for as long as it runs:
/// signed locally when it holds the CA, else by a member that does (and
/// written back to the credentials files, so a restart uses the new one).
fn start_rotation(
    cfg: &ServerConfig,
    certs: Arc<CertSource>,
    dialer: Dialer,
    transport: Arc<RaftTransport>,
    cancel: CancellationToken,
) -> Result<(), FedError> {
    let ca_err = |e: trellis_ca::CaError| FedError::Tls(e.to_string());
    if let Some(dir) = &cfg.ca_dir {
        CaDir::new(dir).zone(&cfg.zone).map_err(ca_err)?;
        let signer = ZoneDirSigner {
            dir: dir.clone(),
            zone: cfg.zone.clone(),
        };
        tokio::spawn(Rotator::new(certs, signer).run(cancel));
    } else if let Some(prefix) = cfg.credentials.clone() {
        let signer = ClusterSigner { dialer, transport };
        let bundle = trellis_ca::load_credentials(&prefix).map_err(ca_err)?.1;
        let rotator = Rotator::new(certs, signer)
            .on_renewed(move |creds| trellis_ca::write_credentials(&prefix, creds, &bundle));
        tokio::spawn(rotator.run(cancel));
    }
    Ok(())
}

/// A server that joined a core zone as a learner asks for its own
/// promotion until it votes; the leader promotes it once it has caught up.
/// Edge servers are refused and stay learners.
async fn promote_self(api: Api, cancel: CancellationToken) {
    let node = api.node_handle();
    let mut wait = std::time::Duration::from_millis(200);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let s = node.status();
        if !s.running {
            return;
        }
        if !s.learners.contains(&s.id) || s.leader == 0 {
            wait = std::time::Duration::from_secs(1);
            continue;
        }
        match api.promote_self().await {
            Ok(_) => tracing::info!(id = s.id, "promoted to voter"),
            Err(e) if e.code() == tonic::Code::PermissionDenied => {
                tracing::debug!(reason = %e.message(), "staying a learner");
                wait = std::time::Duration::from_secs(30);
            }
            Err(e) => {
                tracing::info!(reason = %e.message(), "promotion not done yet; asking again");
                wait = std::time::Duration::from_secs(1);
            }
        }
    }
}

/// Signs this server's renewals with its zone's CA as it is on disk at each
/// renewal: after `trellis ca zone --replace` the next certificate comes
/// from the new intermediate, not the one loaded at start.
struct ZoneDirSigner {
    dir: std::path::PathBuf,
    zone: String,
}

impl trellis_ca::rotate::CsrSigner for ZoneDirSigner {
    async fn sign(
        &self,
        id: &trellis_ca::SpiffeId,
        csr: rustls_pki_types::CertificateSigningRequestDer<'static>,
    ) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, trellis_ca::CaError> {
        let authority = CaDir::new(&self.dir).zone(&self.zone)?;
        LocalSigner {
            authority: Arc::new(authority),
            options: IssueOptions::default(),
        }
        .sign(id, csr)
        .await
    }
}

/// How often a server rereads its trust bundle's file.
const BUNDLE_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// Follows the trust bundle: a server holding the CA rereads the CA
/// directory's `bundle.pem` (a root rotation adds a root there); one without
/// asks the other members for theirs, over connections verified with the
/// bundle it holds, and keeps its `.bundle` file in step. From a change on,
/// the server trusts the new bundle and serves it to joiners and proxies.
async fn follow_bundle(
    cfg: ServerConfig,
    trust: Arc<TrustStore>,
    api: Api,
    (dialer, members): (Dialer, Arc<RaftTransport>),
    cancel: CancellationToken,
) {
    let Ok(td) = cfg.trust_domain() else { return };
    let mut current = trust.bundle().to_pem();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(BUNDLE_POLL) => {}
        }
        let (pem, from) = match &cfg.ca_dir {
            Some(dir) => {
                let path = dir.join("bundle.pem");
                match std::fs::read(&path) {
                    Ok(b) => (
                        String::from_utf8_lossy(&b).into_owned(),
                        path.display().to_string(),
                    ),
                    Err(_) => continue,
                }
            }
            None => match members_bundle(&dialer, &members, &current).await {
                Some(x) => x,
                None => continue,
            },
        };
        if pem == current {
            continue;
        }
        match TrustBundle::from_pem(td.clone(), pem.as_bytes(), &from) {
            Ok(b) if cfg.ca_dir.is_none() && !trust.bundle().continued_by(&b) => {
                // Other members' word is not enough to trust strangers'
                // roots; the CA's own directory is (an operator wrote it).
                tracing::warn!(%from, "the members' trust bundle holds none of the roots trusted now; keeping ours");
            }
            Ok(b) => {
                tracing::info!(roots = b.roots().len(), %from, "trust bundle changed; now trusting and serving it");
                current = pem;
                trust.update(b.clone());
                api.set_bundle_pem(b.to_pem());
                if let (None, Some(prefix)) = (&cfg.ca_dir, &cfg.credentials) {
                    let path = trellis_ca::credential_paths(prefix).2;
                    if let Err(e) = trellis_ca::files::write_public(&path, b.to_pem().as_bytes()) {
                        tracing::warn!(path = %path.display(), error = %e, "could not write the new trust bundle");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(%from, error = %e, "trust bundle is unusable; keeping the current one")
            }
        }
    }
}

/// The bundle most other members serve, when a majority of those that
/// answer agree on one that differs from `current`: a member that has not
/// caught up with a rotation yet (or already retired a root) cannot flip
/// this server back and forth.
async fn members_bundle(
    dialer: &Dialer,
    members: &RaftTransport,
    current: &str,
) -> Option<(String, String)> {
    let mut seen: Vec<(String, String)> = Vec::new();
    for addr in members.addresses() {
        let Ok(ch) = dialer.channel(&addr) else {
            continue;
        };
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(3),
            crate::proto::zones_client::ZonesClient::new(ch).bundle(crate::proto::Empty {}),
        )
        .await;
        if let Ok(Ok(r)) = r {
            seen.push((r.into_inner().bundle_pem, addr));
        }
    }
    let count = |p: &String| seen.iter().filter(|(q, _)| q == p).count();
    let (n, pem, from) = seen
        .iter()
        .map(|(p, a)| (count(p), p.clone(), a.clone()))
        .max_by_key(|(n, _, _)| *n)?;
    (pem != current && n * 2 > seen.len()).then_some((pem, from))
}

/// Connections a server's listen socket holds until it takes them: they
/// wait there while [`transport::MAX_HANDSHAKES`] handshakes are running,
/// as when every proxy of a restarted server arrives at once.
const LISTEN_BACKLOG: u32 = 4096;

/// A listening socket on `addr` with [`LISTEN_BACKLOG`] (the kernel caps it
/// at `net.core.somaxconn`).
fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As std's bind does: a restarted server may bind while its old
    // connections linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Binds `cfg.listen` and starts.
pub async fn start(cfg: &ServerConfig) -> Result<Server, FedError> {
    let listener = listen(cfg.listen).map_err(|source| FedError::Listen {
        addr: cfg.listen,
        hint: match source.kind() {
            std::io::ErrorKind::AddrInUse => {
                " (another process, or this server still stopping, holds the port; `listen` in the config sets it)"
            }
            _ => "",
        },
        source,
    })?;
    start_on(cfg, listener).await
}

impl Server {
    /// Stops accepting, ends the API's streams, lets in-flight calls
    /// finish, and waits for the server.
    ///
    /// Writes this server proposed get [`crate::api::RAFT_STREAM_GRACE`] to
    /// commit, while its peers' Raft streams still reach it; then the node
    /// stops, so a call still waiting on it fails at once (its client
    /// retries elsewhere) and the peers elect another leader, rather than
    /// a deaf leader holding writes until the drain's end.
    pub async fn shutdown(self, drain: std::time::Duration) {
        self.cancel.cancel();
        let start = tokio::time::Instant::now();
        let mut serve = self.serve;
        let finished = tokio::time::timeout(crate::api::RAFT_STREAM_GRACE.min(drain), &mut serve)
            .await
            .is_ok();
        self.node.stop().await;
        if !finished {
            let rest = drain.saturating_sub(start.elapsed());
            if tokio::time::timeout(rest, &mut serve).await.is_err() {
                serve.abort();
            }
        }
    }

    /// Stops the Raft node and the listener at once, as a crash would (for
    /// tests). In-flight calls fail.
    pub async fn kill(self) {
        self.node.stop().await;
        self.cancel.cancel();
        self.serve.abort();
    }

    /// Resolves when the server stops on its own (an error) or is cancelled.
    pub async fn wait(&mut self) -> Result<(), FedError> {
        match (&mut self.serve).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(FedError::Tls(format!("gRPC server: {e}"))),
            Err(e) => Err(FedError::Tls(format!("gRPC server task: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use trellis_ca::rotate::CsrSigner as _;

    use super::*;

    #[tokio::test]
    async fn renewals_are_signed_by_the_zone_ca_on_disk_after_a_replacement() {
        let dir = tempfile::tempdir().unwrap();
        let td: trellis_ca::TrustDomain = "test.local".parse().unwrap();
        let ca = CaDir::new(dir.path());
        let day = std::time::Duration::from_secs(86400);
        ca.init(&td, day).unwrap();
        let before = ca.create_zone("east", day).unwrap();
        let signer = ZoneDirSigner {
            dir: dir.path().to_path_buf(),
            zone: "east".into(),
        };
        let id = td.role(RoleKind::Server, "east", "s1").unwrap();
        let issuer = |chain: &[rustls_pki_types::CertificateDer<'static>]| chain[1].clone();
        let (_, csr) = trellis_ca::new_key_and_csr(&id).unwrap();
        let chain = signer.sign(&id, csr).await.unwrap();
        assert_eq!(&issuer(&chain), before.cert());

        let after = ca.replace_zone("east", day).unwrap();
        assert_ne!(before.cert(), after.cert());
        let (_, csr) = trellis_ca::new_key_and_csr(&id).unwrap();
        let chain = signer.sign(&id, csr).await.unwrap();
        assert_eq!(&issuer(&chain), after.cert());
    }
}
