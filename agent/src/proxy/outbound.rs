//! Outbound: each mesh service this host can call has a loopback address on
//! which the agent listens for its ports. A connection there goes, with the
//! local workload's identity, by mutual TLS straight to an endpoint in this
//! zone, or when there is none, through this zone's gateway to the nearest
//! zone that serves it (the SNI names the destination; the gateway passes
//! the TLS through), or over the edge link on a host without a gateway.
//!
//! Where a connection goes is decided when it arrives, from the directory
//! current at that moment, so registry changes apply to the next connection.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trellis_ca::SpiffeId;
use trellis_ca::tls::{self, CertSource, PeerPolicy, TrustStore};
use trellis_gateway::BoxStream;
use trellis_gateway::edge::EdgeLink;
use trellis_gateway::sni::MeshName;

use crate::directory::{Directory, Entry};
use crate::metrics::Metrics;

/// The outbound side, shared by every outbound listener.
pub(crate) struct Outbound {
    pub(crate) directory: Arc<ArcSwap<Directory>>,
    pub(crate) zone: String,
    pub(crate) suffix: String,
    pub(crate) certs: Arc<CertSource>,
    pub(crate) trust: Arc<TrustStore>,
    pub(crate) timeout: Duration,
    pub(crate) metrics: Arc<Metrics>,
    /// In a zone without a gateway: the link to another zone's gateway.
    pub(crate) edge: Option<Arc<EdgeLink>>,
    /// TLS connectors by entry, rebuilt when its allowed identities change.
    pub(crate) connectors: Mutex<HashMap<String, (BTreeSet<String>, TlsConnector)>>,
}

/// Where one attempt goes.
#[derive(Debug, Clone, Copy)]
enum Via {
    /// TCP to this address (an endpoint's sidecar, or the zone's gateway).
    Tcp(SocketAddr),
    /// A stream over the edge link.
    Edge,
}

impl Outbound {
    /// The connector that admits exactly the identities `e` lists.
    fn connector(&self, e: &Entry) -> Result<TlsConnector, String> {
        let label = e.label();
        let mut cache = self
            .connectors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((ids, c)) = cache.get(&label)
            && *ids == e.identities
        {
            return Ok(c.clone());
        }
        let ids: Vec<SpiffeId> = e.identities.iter().filter_map(|i| i.parse().ok()).collect();
        let client = tls::client_config(
            self.certs.clone(),
            self.trust.clone(),
            PeerPolicy::AllowList(ids),
        )
        .map_err(|err| err.to_string())?;
        let c = TlsConnector::from(Arc::new(client));
        cache.insert(label, (e.identities.clone(), c.clone()));
        Ok(c)
    }

    /// The routes to try, in order: local endpoints (in random order, so load
    /// spreads), then each zone that serves the service, nearest first,
    /// through each of this zone's gateways in random order.
    fn routes(
        &self,
        e: &Entry,
        gateways: &[SocketAddr],
        port: u16,
    ) -> Vec<(Via, String, &'static str)> {
        let name = |zone: &str| {
            MeshName {
                port,
                service: e.name.clone(),
                namespace: e.namespace.clone(),
                zone: zone.to_owned(),
            }
            .to_sni(&self.suffix)
        };
        let mut out: Vec<_> = e
            .local
            .iter()
            .map(|a| (Via::Tcp(*a), name(&self.zone), "local"))
            .collect();
        fastrand::shuffle(&mut out);
        let mut gws = gateways.to_vec();
        fastrand::shuffle(&mut gws);
        for z in &e.zones {
            if self.edge.is_some() && gws.is_empty() {
                out.push((Via::Edge, name(z), "edge"));
            } else {
                out.extend(gws.iter().map(|g| (Via::Tcp(*g), name(z), "gateway")));
            }
        }
        out
    }

    async fn dial(
        &self,
        to: SocketAddr,
    ) -> Result<(BoxStream, &'static str, String), (String, String)> {
        let dir = self.directory.load_full();
        let e = dir
            .at(to.ip())
            .filter(|e| e.ports.contains(&to.port()))
            .ok_or_else(|| {
                (
                    to.to_string(),
                    "no mesh service listens here any more".to_string(),
                )
            })?;
        let label = e.label();
        let connector = self.connector(e).map_err(|err| (label.clone(), err))?;
        let mut last = String::from("no healthy endpoint in any reachable zone");
        for (via, sni, route) in self.routes(e, &dir.gateways, to.port()) {
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
                        edge.open(&e.name, &e.namespace, to.port())
                            .await
                            .map_err(|e| e.to_string())?
                    }
                };
                // The workload TLS runs inside whichever stream carries it.
                let tls = connector
                    .connect(name, stream)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<BoxStream, String>(Box::new(tls))
            };
            match tokio::time::timeout(self.timeout, attempt).await {
                Ok(Ok(t)) => return Ok((t, route, label)),
                Ok(Err(err)) => last = format!("{sni} via {via:?}: {err}"),
                Err(_) => last = format!("{sni} via {via:?}: timed out"),
            }
            tracing::debug!(%last, "route failed; trying the next");
        }
        Err((label, last))
    }

    /// Accepts on one outbound listener until `stop`.
    pub(crate) async fn serve(
        self: Arc<Self>,
        l: TcpListener,
        tracker: TaskTracker,
        stop: CancellationToken,
    ) {
        let Ok(to) = l.local_addr() else { return };
        loop {
            let (mut app, _) = tokio::select! {
                () = stop.cancelled() => return,
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
                match me.dial(to).await {
                    Ok((mut tls, route, label)) => {
                        me.metrics.outbound(&label, route);
                        super::relay(&mut app, &mut tls).await;
                    }
                    Err((label, e)) => {
                        me.metrics.outbound(&label, "no_route");
                        tracing::warn!(service = %label, port = to.port(), error = %e, "no route to the service");
                        trellis_gateway::Duplex::abort(&mut app);
                    }
                }
            });
        }
    }
}
