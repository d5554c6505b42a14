//! The agent's life on the federation store: the first start's bootstrap by
//! join token, identity renewal through the servers, registration of the
//! local services with their health, and the watch that feeds the directory.

use std::path::Path;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use trellis_ca::rotate::Rotator;
use trellis_ca::tls::{CertSource, TrustStore};
use trellis_federation::client::Servers;
use trellis_federation::signer::StoreSigner;
use trellis_federation::state::{
    EndpointRecord, LABEL_ACCOUNT, LABEL_INBOUND_PORT, LABEL_PORT_PROTOCOLS,
};
use trellis_federation::token::JoinToken;

use crate::config::AgentConfig;
use crate::error::AgentError;
use crate::health::Health;

fn store_err(e: impl std::fmt::Display) -> AgentError {
    AgentError::Store(e.to_string())
}

/// Makes sure every identity this host needs has credentials in the data
/// directory: reuses what an earlier start left, otherwise joins with the
/// token. A host that has all its credentials never reads the token again.
pub(crate) async fn bootstrap(cfg: &AgentConfig) -> Result<(), AgentError> {
    // Before reading any credentials: a newer agent's directory is refused.
    trellis_federation::datadir::open(&cfg.data_dir, trellis_federation::datadir::AGENT_FORMAT)?;
    let node = cfg.node_credentials();
    let missing: Vec<_> = cfg
        .services
        .iter()
        .filter(|s| !has_credentials(&cfg.credentials_of(s)))
        .collect();
    if has_credentials(&node) && missing.is_empty() {
        return Ok(());
    }
    let token = match (&cfg.join_token, &cfg.join_token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .map_err(|e| AgentError::Store(format!("join_token_file {}: {e}", f.display())))?,
        (None, None) => {
            let names: Vec<String> = missing
                .iter()
                .map(|s| format!("{}/{}", s.namespace, s.account()))
                .collect();
            return Err(AgentError::Store(format!(
                "no credentials in {} for {} and no join token: create one with `trellis zone token create --agent --zone {} --workload NS/ACCOUNT` and set join_token_file",
                cfg.data_dir.display(),
                if names.is_empty() {
                    "this host".into()
                } else {
                    names.join(", ")
                },
                cfg.zone
            )));
        }
    };
    let token = JoinToken::parse(&token).map_err(store_err)?;
    if token.zone != cfg.zone {
        return Err(AgentError::Store(format!(
            "join token: it is for zone {}, this host is in zone {}",
            token.zone, cfg.zone
        )));
    }
    if token.trust_domain != cfg.trust_domain {
        return Err(AgentError::Store(format!(
            "join token: it is for trust domain {}, this host is configured for {}",
            token.trust_domain, cfg.trust_domain
        )));
    }
    let workloads: Vec<(String, String)> = cfg
        .services
        .iter()
        .map(|s| (s.namespace.clone(), s.account().to_string()))
        .collect();
    let joined = trellis_federation::join::join_agent(
        &token,
        &cfg.name,
        &workloads,
        Some(cfg.certificate_ttl),
    )
    .await
    .map_err(store_err)?;
    trellis_ca::files::create_private_dir(&cfg.data_dir)?;
    trellis_ca::write_credentials(&node, &joined.node, &joined.bundle)?;
    for (s, creds) in cfg.services.iter().zip(&joined.workloads) {
        trellis_ca::write_credentials(&cfg.credentials_of(s), creds, &joined.bundle)?;
    }
    tracing::info!(
        zone = %joined.zone,
        workloads = joined.workloads.len(),
        dir = %cfg.data_dir.display(),
        "joined the mesh; credentials stored"
    );
    Ok(())
}

fn has_credentials(prefix: &Path) -> bool {
    let (crt, key, bundle) = trellis_ca::credential_paths(prefix);
    crt.exists() && key.exists() && bundle.exists()
}

/// Channels to the servers that present the identity in `certs`.
pub(crate) fn servers(
    cfg: &AgentConfig,
    certs: Arc<CertSource>,
    trust: Arc<TrustStore>,
) -> Result<Servers, AgentError> {
    Servers::new(&cfg.servers, certs, trust).map_err(store_err)
}

/// Renews the identity in `certs` at half-life through the servers, and
/// writes each renewal to `prefix` so a restart starts from it.
pub(crate) fn spawn_renewal(
    cfg: &AgentConfig,
    prefix: std::path::PathBuf,
    certs: Arc<CertSource>,
    trust: Arc<TrustStore>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let signer = StoreSigner {
        servers: servers(cfg, certs.clone(), trust.clone())?,
        ttl: Some(cfg.certificate_ttl),
    };
    let rotator = Rotator::new(certs, signer)
        .on_renewed(move |creds| trellis_ca::write_credentials(&prefix, creds, &trust.bundle()));
    tokio::spawn(rotator.run(shutdown));
    Ok(())
}

/// Keeps each local service registered with its current health until
/// `shutdown`, then deregisters it.
pub(crate) fn spawn_registrations(
    cfg: &AgentConfig,
    servers: &Servers,
    inbound_port: u16,
    healths: &std::collections::HashMap<(String, String), Health>,
    shutdown: CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    let Some(ip) = cfg.advertised() else {
        return tasks;
    };
    // A service without ports only calls: nothing to find it by.
    for s in cfg.services.iter().filter(|s| !s.ports.is_empty()) {
        let mut labels = s.labels.clone();
        labels.insert(LABEL_INBOUND_PORT.into(), inbound_port.to_string());
        labels.insert(LABEL_ACCOUNT.into(), s.account().to_string());
        if let Some(p) = s.port_protocols_label() {
            labels.insert(LABEL_PORT_PROTOCOLS.into(), p);
        }
        let record = EndpointRecord {
            namespace: s.namespace.clone(),
            service: s.name.clone(),
            zone: cfg.zone.clone(),
            id: cfg.name.clone(),
            address: ip.to_string(),
            ports: s.ports.iter().map(|p| u32::from(*p)).collect(),
            protocol: s.protocol.clone(),
            labels,
            healthy: true,
            lease_seconds: cfg.lease.as_secs(),
            lease_expires_ms: 0,
            owner: String::new(),
        };
        let health = &healths[&(s.namespace.clone(), s.name.clone())];
        let mut healthy = health.subscribe();
        let (tx, rx) = watch::channel(EndpointRecord {
            healthy: *healthy.borrow_and_update(),
            ..record
        });
        let stop = shutdown.clone();
        // Health changes become registrations at once.
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    r = healthy.changed() => if r.is_err() { return },
                }
                let h = *healthy.borrow_and_update();
                tx.send_modify(|e| e.healthy = h);
            }
        });
        tasks.push(tokio::spawn(trellis_federation::lease::keep_registered(
            servers.clone(),
            rx,
            shutdown.clone(),
        )));
    }
    tasks
}
