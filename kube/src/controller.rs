//! `trellis kube controller`: the zone's component with Kubernetes API
//! access. It holds a mesh identity (`spiffe://TD/zone/ZONE/controller/NAME`,
//! renewed through the servers), serves the token exchange and keeps the
//! registry in step with the cluster's Services.

use std::net::SocketAddr;
use std::sync::Arc;

use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use trellis_ca::rotate::Rotator;
use trellis_ca::tls::{CertSource, TrustStore};
use trellis_federation::client::Servers;
use trellis_federation::signer::StoreSigner;

use crate::config::ControllerConfig;
use crate::error::KubeError;
use crate::exchange::Exchange;
use crate::sync::{SyncSettings, Syncer};

/// A controller with its listener bound and its credentials loaded.
pub struct Controller {
    cfg: ControllerConfig,
    listener: TcpListener,
    certs: Arc<CertSource>,
    trust: Arc<TrustStore>,
    client: kube::Client,
}

/// The Kubernetes client `cfg` asks for: its kubeconfig, else in-cluster
/// (then `$KUBECONFIG`, `~/.kube/config`).
pub async fn client_for(cfg: &ControllerConfig) -> Result<kube::Client, KubeError> {
    let config = match &cfg.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|e| {
                KubeError::ClientConfig(format!("kubeconfig {}: {e}", path.display()))
            })?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| {
                    KubeError::ClientConfig(format!("kubeconfig {}: {e}", path.display()))
                })?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| KubeError::ClientConfig(e.to_string()))?,
    };
    kube::Client::try_from(config).map_err(|e| KubeError::ClientConfig(e.to_string()))
}

// === impl Controller ===

impl Controller {
    /// Loads the credentials, builds the Kubernetes client and binds the
    /// exchange's port; nothing runs yet.
    pub async fn bind(cfg: ControllerConfig) -> Result<Self, KubeError> {
        let (creds, bundle) = trellis_ca::load_credentials(&cfg.credentials)
            .map_err(|e| KubeError::config("credentials", e.to_string()))?;
        let id = creds
            .id()
            .map_err(|e| KubeError::config("credentials", e.to_string()))?;
        if id != cfg.id() {
            return Err(KubeError::config(
                "credentials",
                format!(
                    "the certificate is for {id}, this controller is {} (issue it with `trellis ca issue --zone {} --id {}`)",
                    cfg.id(),
                    cfg.zone,
                    cfg.id()
                ),
            ));
        }
        let certs = CertSource::new(creds).map_err(|e| KubeError::Tls(e.to_string()))?;
        let trust = TrustStore::new(bundle);
        let client = client_for(&cfg).await?;
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| KubeError::config("listen", format!("{}: {e}", cfg.listen)))?;
        Ok(Self {
            cfg,
            listener,
            certs,
            trust,
            client,
        })
    }

    /// Where the exchange listens.
    pub fn exchange_addr(&self) -> Result<SocketAddr, KubeError> {
        self.listener
            .local_addr()
            .map_err(|e| KubeError::config("listen", e.to_string()))
    }

    /// Runs the exchange, the sync, renewal and the bundle until
    /// `shutdown`; returns when they have stopped.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), KubeError> {
        let cfg = self.cfg;
        let servers = Servers::new(&cfg.servers, self.certs.clone(), self.trust.clone())
            .map_err(|e| KubeError::Store(e.to_string()))?;
        let prefix = cfg.credentials.clone();
        let trust = self.trust.clone();
        let rotator = Rotator::new(
            self.certs.clone(),
            StoreSigner {
                servers: servers.clone(),
                ttl: None,
            },
        )
        .on_renewed(move |creds| trellis_ca::write_credentials(&prefix, creds, &trust.bundle()));
        let mut tasks = vec![tokio::spawn(rotator.run(shutdown.clone()))];
        tasks.push(tokio::spawn(trellis_federation::view::follow_bundle(
            servers.clone(),
            vec![self.trust.clone()],
            vec![cfg.credentials.clone()],
            shutdown.clone(),
        )));
        let exchange = Arc::new(Exchange {
            client: self.client.clone(),
            servers: servers.clone(),
            zone: cfg.zone.clone(),
            trust_domain: cfg.id().trust_domain(),
            audience: cfg.audience.clone(),
            token_ttl: cfg.token_ttl,
        });
        let tls = crate::pinned::server_config(self.certs.clone(), self.trust.clone())?;
        tasks.push(tokio::spawn(crate::exchange::serve(
            self.listener,
            Arc::new(tls),
            exchange,
            shutdown.clone(),
        )));
        let sync = if cfg.sync {
            let changed = Arc::new(Notify::new());
            let cluster = crate::sync::reflect(&self.client, changed.clone(), &shutdown);
            let syncer = Syncer::new(
                cluster,
                servers,
                SyncSettings {
                    zone: cfg.zone.clone(),
                    lease: cfg.lease,
                    debounce: cfg.debounce,
                },
            );
            Some(tokio::spawn(syncer.run(changed, shutdown.clone())))
        } else {
            None
        };
        tracing::info!(id = %cfg.id(), sync = cfg.sync, "controller running");
        let mut result = Ok(());
        // The sync ends only at shutdown, or when it cannot go on.
        if let Some(s) = sync
            && let Ok(Err(e)) = s.await
        {
            shutdown.cancel();
            result = Err(e);
        }
        shutdown.cancelled().await;
        for t in tasks {
            let _ = t.await;
        }
        result
    }
}
