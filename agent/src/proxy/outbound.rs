//! Outbound: each mesh service this host calls gets a loopback address on
//! which the agent listens for its ports. A connection there goes, with the
//! local workload's identity, by mutual TLS straight to an endpoint in this
//! zone, or when there is none, through this zone's gateway to the nearest
//! zone that serves it (the SNI names the destination; the gateway passes
//! the TLS through).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trellis_ca::tls::{self, CertSource, PeerPolicy, TrustStore};
use trellis_gateway::sni::MeshName;

use crate::config::{AgentConfig, Upstream};
use trellis_gateway::BoxStream;
use trellis_gateway::edge::EdgeLink;

use crate::error::AgentError;
use crate::metrics::Metrics;

/// One upstream service, as this host reaches it.
pub(crate) struct Target {
    up: Upstream,
    zone: String,
    suffix: String,
    gateway: Option<SocketAddr>,
    connector: TlsConnector,
    timeout: Duration,
    metrics: Arc<Metrics>,
    /// In a zone without a gateway: the link to another zone's gateway.
    edge: Option<Arc<EdgeLink>>,
}

/// Where one attempt goes.
#[derive(Debug, Clone, Copy)]
enum Via {
    /// TCP to this address (an endpoint's sidecar, or the zone's gateway).
    Tcp(SocketAddr),
    /// A stream over the edge link.
    Edge,
}

impl Target {
    pub(crate) fn new(
        cfg: &AgentConfig,
        up: &Upstream,
        certs: Arc<CertSource>,
        trust: Arc<TrustStore>,
        metrics: Arc<Metrics>,
        edge: Option<Arc<EdgeLink>>,
    ) -> Result<Self, AgentError> {
        // Config validation parsed every identity already.
        let ids = up
            .identities
            .iter()
            .filter_map(|i| i.parse().ok())
            .collect();
        let client = tls::client_config(certs, trust, PeerPolicy::AllowList(ids))?;
        Ok(Self {
            up: up.clone(),
            zone: cfg.zone.clone(),
            suffix: cfg.dns_suffix.clone(),
            gateway: cfg.gateway,
            connector: TlsConnector::from(Arc::new(client)),
            timeout: cfg.connect_timeout,
            metrics,
            edge,
        })
    }

    /// `service.namespace`.
    pub(crate) fn name(&self) -> String {
        format!("{}.{}", self.up.name, self.up.namespace)
    }

    /// The routes to try, in order: local endpoints (in random order, so load
    /// spreads), then the gateway once per zone that serves the service.
    fn routes(&self, port: u16) -> Vec<(Via, String, &'static str)> {
        let name = |zone: &str| {
            MeshName {
                port,
                service: self.up.name.clone(),
                namespace: self.up.namespace.clone(),
                zone: zone.to_owned(),
            }
            .to_sni(&self.suffix)
        };
        let mut local: Vec<_> = self
            .up
            .endpoints
            .iter()
            .map(|e| (Via::Tcp(*e), name(&self.zone), "local"))
            .collect();
        fastrand::shuffle(&mut local);
        if let Some(gw) = self.gateway {
            local.extend(
                self.up
                    .zones
                    .iter()
                    .map(|z| (Via::Tcp(gw), name(z), "gateway")),
            );
        } else if self.edge.is_some() {
            // Config validation allows only the gateway's own zone here.
            local.extend(self.up.zones.iter().map(|z| (Via::Edge, name(z), "edge")));
        }
        local
    }

    async fn dial(&self, port: u16) -> Result<(BoxStream, &'static str), String> {
        let mut last = String::from("no route");
        for (via, sni, route) in self.routes(port) {
            let attempt = async {
                let name = ServerName::try_from(sni.clone()).map_err(|e| e.to_string())?;
                let stream: BoxStream = match via {
                    Via::Tcp(addr) => {
                        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
                        let _ = tcp.set_nodelay(true);
                        Box::new(tcp)
                    }
                    Via::Edge => {
                        let edge = self.edge.as_ref().ok_or("no edge link")?;
                        edge.open(&self.up.name, &self.up.namespace, port)
                            .await
                            .map_err(|e| e.to_string())?
                    }
                };
                // The workload TLS runs inside whichever stream carries it.
                let tls = self
                    .connector
                    .connect(name, stream)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<BoxStream, String>(Box::new(tls))
            };
            match tokio::time::timeout(self.timeout, attempt).await {
                Ok(Ok(t)) => return Ok((t, route)),
                Ok(Err(e)) => last = format!("{sni} via {via:?}: {e}"),
                Err(_) => last = format!("{sni} via {via:?}: timed out"),
            }
            tracing::debug!(%last, "route failed; trying the next");
        }
        Err(last)
    }

    pub(crate) async fn serve(
        self: Arc<Self>,
        l: TcpListener,
        port: u16,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) {
        loop {
            let (mut app, _) = tokio::select! {
                () = shutdown.cancelled() => return,
                r = l.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "outbound accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let me = self.clone();
            tracker.spawn(async move {
                let _ = app.set_nodelay(true);
                match me.dial(port).await {
                    Ok((mut tls, route)) => {
                        me.metrics.outbound(&me.name(), route);
                        super::relay(&mut app, &mut tls).await;
                    }
                    Err(e) => {
                        me.metrics.outbound(&me.name(), "no_route");
                        tracing::warn!(service = %format!("{}.{}", me.up.name, me.up.namespace), port, error = %e, "no route to the service");
                        trellis_gateway::Duplex::abort(&mut app);
                    }
                }
            });
        }
    }
}
