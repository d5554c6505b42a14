//! Cluster Services in the registry, the way Consul's catalog sync does it.
//!
//! Reflectors (list, then watch with bookmarks; relist after `410 Gone`)
//! keep Namespaces, Services, EndpointSlices and Pods of the cluster in
//! memory. Any change wakes one loop, which computes the endpoints the zone
//! should hold and writes only the difference against what the store has
//! and this controller owns:
//!
//! - a Service is exported when its namespace is labelled
//!   `trellis.io/inject=enabled` or it is annotated `trellis.io/export=true`
//!   (`false` keeps it out);
//! - each ready address of its EndpointSlices becomes an endpoint marked
//!   [`LABEL_PLAIN`] (no sidecar there: callers must not expect mTLS),
//!   healthy as the slice's `ready` condition says;
//! - addresses of pods that carry the agent ([`crate::INJECTED_ANNOTATION`])
//!   are left out: those register themselves, as VMs do.
//!
//! At start the loop waits until every reflector has listed, then reads the
//! store: endpoints that are still true are renewed, not written again, so
//! a restarted controller makes no event (no flap) for what did not change.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{StreamExt, stream};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Resource;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use trellis_federation::api::endpoint_to;
use trellis_federation::client::Servers;
use trellis_federation::proto;
use trellis_federation::proto::registry_client::RegistryClient;
use trellis_federation::state::{EndpointRecord, LABEL_PLAIN};

use crate::error::KubeError;
use crate::{EXPORT_ANNOTATION, INJECT_ENABLED, INJECT_LABEL, INJECTED_ANNOTATION};

/// EndpointSlice label naming the Service it belongs to.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Writes in flight at once.
const PARALLEL_WRITES: usize = 16;

/// The sync's settings.
#[derive(Debug, Clone)]
pub struct SyncSettings {
    /// The zone the cluster is.
    pub zone: String,
    /// Lease of each endpoint; renewed every third.
    pub lease: Duration,
    /// Changes within this window are written together.
    pub debounce: Duration,
}

/// The cluster as the reflectors hold it.
#[derive(Clone)]
pub struct Cluster {
    namespaces: Store<Namespace>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    pods: Store<Pod>,
}

/// What one pass wrote, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Endpoints registered (new or changed).
    pub registered: usize,
    /// Endpoints deregistered.
    pub deregistered: usize,
    /// Writes that failed (retried on the next pass).
    pub failed: usize,
}

/// Starts the reflectors on `client`; every change pokes `changed`. They
/// run (reconnecting, relisting) until `shutdown`.
pub fn reflect(
    client: &kube::Client,
    changed: Arc<Notify>,
    shutdown: &CancellationToken,
) -> Cluster {
    Cluster {
        namespaces: spawn_reflector(Api::all(client.clone()), changed.clone(), shutdown),
        services: spawn_reflector(Api::all(client.clone()), changed.clone(), shutdown),
        slices: spawn_reflector(Api::all(client.clone()), changed.clone(), shutdown),
        pods: spawn_reflector(Api::all(client.clone()), changed, shutdown),
    }
}

fn spawn_reflector<K>(api: Api<K>, changed: Arc<Notify>, shutdown: &CancellationToken) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let kind = K::kind(&());
    let events = kube::runtime::reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::pin!(events);
        loop {
            let ev = tokio::select! {
                () = stop.cancelled() => return,
                ev = events.next() => ev,
            };
            match ev {
                Some(Ok(_)) => changed.notify_one(),
                // The watcher recovers by itself (resume, or relist after
                // 410 Gone); the store keeps its contents meanwhile.
                Some(Err(e)) => tracing::info!(%kind, error = %e, "watch interrupted; resuming"),
                None => return,
            }
        }
    });
    reader
}

// === impl Cluster ===

impl Cluster {
    /// Waits until every reflector has listed once.
    pub async fn ready(&self) -> Result<(), KubeError> {
        let err = |e: reflector::store::WriterDropped| KubeError::ClientConfig(e.to_string());
        self.namespaces.wait_until_ready().await.map_err(err)?;
        self.services.wait_until_ready().await.map_err(err)?;
        self.slices.wait_until_ready().await.map_err(err)?;
        self.pods.wait_until_ready().await.map_err(err)?;
        Ok(())
    }

    /// The endpoints the zone's registry should hold for the cluster.
    pub fn desired(&self, s: &SyncSettings) -> BTreeMap<String, EndpointRecord> {
        let opted: BTreeSet<String> = self
            .namespaces
            .state()
            .iter()
            .filter(|n| label(&n.metadata.labels, INJECT_LABEL) == Some(INJECT_ENABLED))
            .filter_map(|n| n.metadata.name.clone())
            .collect();
        let injected: BTreeSet<(String, String)> = self
            .pods
            .state()
            .iter()
            .filter(|p| label(&p.metadata.annotations, INJECTED_ANNOTATION) == Some("true"))
            .filter_map(|p| Some((p.metadata.namespace.clone()?, p.metadata.name.clone()?)))
            .collect();
        // The store's order is a hash map's: sorted (IPv4 first, then by
        // name) so that a pod in two slices (dual-stack, or moving between
        // slices) is registered the same way on every pass, not flapping.
        let mut slices = self.slices.state();
        slices.sort_by(|a, b| {
            (a.address_type != "IPv4", &a.metadata.name)
                .cmp(&(b.address_type != "IPv4", &b.metadata.name))
        });
        let mut out = BTreeMap::new();
        for svc in self.services.state() {
            let (Some(ns), Some(name)) = (&svc.metadata.namespace, &svc.metadata.name) else {
                continue;
            };
            let export = match label(&svc.metadata.annotations, EXPORT_ANNOTATION) {
                Some("true") => true,
                Some("false") => false,
                _ => opted.contains(ns),
            };
            let external =
                svc.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("ExternalName");
            if !export || external {
                continue;
            }
            for slice in slices.iter().filter(|sl| {
                sl.metadata.namespace.as_ref() == Some(ns)
                    && label(&sl.metadata.labels, SERVICE_NAME_LABEL) == Some(name.as_str())
                    && (sl.address_type == "IPv4" || sl.address_type == "IPv6")
            }) {
                for ep in endpoints_of(ns, name, slice, &injected, s) {
                    // Dual-stack: IPv4 wins per pod.
                    out.entry(ep.key()).or_insert(ep);
                }
            }
        }
        out
    }
}

fn label<'a>(m: &'a Option<BTreeMap<String, String>>, k: &str) -> Option<&'a str> {
    m.as_ref().and_then(|m| m.get(k)).map(String::as_str)
}

fn endpoints_of(
    ns: &str,
    service: &str,
    slice: &EndpointSlice,
    injected: &BTreeSet<(String, String)>,
    s: &SyncSettings,
) -> Vec<EndpointRecord> {
    let ports: Vec<&k8s_openapi::api::discovery::v1::EndpointPort> = slice
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .collect();
    let numbers: Vec<u32> = ports
        .iter()
        .filter_map(|p| p.port.and_then(|n| u32::try_from(n).ok()))
        .collect();
    if numbers.is_empty() {
        return Vec::new();
    }
    let protocol = ports.first().map_or("tcp", |p| protocol_of(p));
    let mut out = Vec::new();
    for ep in &slice.endpoints {
        let pod = ep
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .and_then(|r| r.name.clone());
        if let Some(p) = &pod
            && injected.contains(&(ns.to_string(), p.clone()))
        {
            continue;
        }
        let Some(address) = ep.addresses.first() else {
            continue;
        };
        let c = ep.conditions.clone().unwrap_or_default();
        // Kubernetes: an unset `ready` means ready; terminating is not.
        let healthy = c.ready.unwrap_or(true) && !c.terminating.unwrap_or(false);
        let id = pod.unwrap_or_else(|| address.replace([':', '.'], "-"));
        let rec = EndpointRecord {
            namespace: ns.to_string(),
            service: service.to_string(),
            zone: s.zone.clone(),
            id,
            address: address.clone(),
            ports: numbers.clone(),
            protocol: protocol.to_string(),
            labels: BTreeMap::from([(LABEL_PLAIN.to_string(), "true".to_string())]),
            healthy,
            lease_seconds: s.lease.as_secs(),
            lease_expires_ms: 0,
            owner: String::new(),
        };
        match rec.validate() {
            Ok(()) => out.push(rec),
            Err(e) => {
                tracing::warn!(service = %format!("{service}.{ns}"), error = %e, "endpoint left out of the registry")
            }
        }
    }
    out
}

/// The registry's protocol for a port: `appProtocol` first, then the
/// Istio-style port name prefix, else TCP.
fn protocol_of(p: &k8s_openapi::api::discovery::v1::EndpointPort) -> &'static str {
    let app = p.app_protocol.as_deref().unwrap_or("");
    let name = p.name.as_deref().unwrap_or("");
    let is = |w: &str| app == w || name == w || name.starts_with(&format!("{w}-"));
    if is("grpc") {
        "grpc"
    } else if is("http") || is("http2") || app == "kubernetes.io/h2c" || is("h2c") {
        "http"
    } else {
        "tcp"
    }
}

/// The store's copy without what the store sets itself, for comparing.
fn comparable(e: &EndpointRecord) -> EndpointRecord {
    EndpointRecord {
        lease_expires_ms: 0,
        owner: String::new(),
        ..e.clone()
    }
}

fn key_of(e: &EndpointRecord) -> proto::EndpointKey {
    proto::EndpointKey {
        namespace: e.namespace.clone(),
        service: e.service.clone(),
        zone: e.zone.clone(),
        id: e.id.clone(),
    }
}

/// The loop that keeps the registry true.
pub struct Syncer {
    cluster: Cluster,
    servers: Servers,
    settings: SyncSettings,
    /// What the store holds of ours, as last written or read.
    registered: BTreeMap<String, EndpointRecord>,
}

// === impl Syncer ===

impl Syncer {
    /// A syncer over `cluster`, writing through `servers`.
    pub fn new(cluster: Cluster, servers: Servers, settings: SyncSettings) -> Self {
        Self {
            cluster,
            servers,
            settings,
            registered: BTreeMap::new(),
        }
    }

    /// Reads the plain endpoints of our zone the store holds: the starting
    /// point of the diff after a (re)start.
    async fn read_store(&mut self) -> Result<(), KubeError> {
        let list = self
            .servers
            .call(|ch| async move {
                RegistryClient::new(ch)
                    .list(proto::ReadOptions { linearizable: true })
                    .await
            })
            .await
            .map_err(|s| KubeError::Store(s.message().to_string()))?;
        self.registered = list
            .endpoints
            .into_iter()
            .filter_map(|e| trellis_federation::api::endpoint_from(e).ok())
            .filter(|e| {
                e.zone == self.settings.zone
                    && e.labels.get(LABEL_PLAIN).map(String::as_str) == Some("true")
            })
            .map(|e| (e.key(), comparable(&e)))
            .collect();
        Ok(())
    }

    /// One pass: write the difference between the cluster and the store.
    pub async fn pass(&mut self) -> Pass {
        let want = self.cluster.desired(&self.settings);
        let mut writes: Vec<(String, Option<EndpointRecord>)> = Vec::new();
        for (k, e) in &want {
            if self.registered.get(k) != Some(e) {
                writes.push((k.clone(), Some(e.clone())));
            }
        }
        for k in self.registered.keys() {
            if !want.contains_key(k) {
                writes.push((k.clone(), None));
            }
        }
        let servers = self.servers.clone();
        let done: Vec<(String, Option<EndpointRecord>, Result<(), tonic::Status>)> =
            stream::iter(writes)
                .map(|(k, e)| {
                    let servers = servers.clone();
                    let old = self.registered.get(&k).cloned();
                    async move {
                        let r = match &e {
                            Some(e) => {
                                let w = endpoint_to(e.clone());
                                servers
                            .call(|ch| async move { RegistryClient::new(ch).register(w).await })
                            .await
                            .map(|_| ())
                            }
                            None => {
                                let key = key_of(
                                    old.as_ref()
                                        .expect("a deregistration names a registered endpoint"),
                                );
                                servers
                                    .call(|ch| async move {
                                        RegistryClient::new(ch).deregister(key).await
                                    })
                                    .await
                                    .map(|_| ())
                                    // Already gone (its lease ran out): what we wanted.
                                    .or_else(|s| {
                                        if s.code() == tonic::Code::InvalidArgument {
                                            Ok(())
                                        } else {
                                            Err(s)
                                        }
                                    })
                            }
                        };
                        (k, e, r)
                    }
                })
                .buffer_unordered(PARALLEL_WRITES)
                .collect()
                .await;
        let mut pass = Pass::default();
        for (k, e, r) in done {
            match (r, e) {
                (Ok(()), Some(e)) => {
                    tracing::info!(endpoint = %k, healthy = e.healthy, "registered");
                    self.registered.insert(k, e);
                    pass.registered += 1;
                }
                (Ok(()), None) => {
                    tracing::info!(endpoint = %k, "deregistered");
                    self.registered.remove(&k);
                    pass.deregistered += 1;
                }
                (Err(s), _) => {
                    tracing::warn!(endpoint = %k, error = %s.message(), "registry write failed; retrying");
                    pass.failed += 1;
                }
            }
        }
        pass
    }

    /// Renews every endpoint we hold; one the store forgot is written again
    /// on the next pass.
    async fn renew(&mut self) -> usize {
        let keys: Vec<(String, proto::EndpointKey)> = self
            .registered
            .iter()
            .map(|(k, e)| (k.clone(), key_of(e)))
            .collect();
        let servers = self.servers.clone();
        let results: Vec<(String, Result<(), tonic::Status>)> = stream::iter(keys)
            .map(|(k, key)| {
                let servers = servers.clone();
                async move {
                    let r = servers
                        .call(|ch| async move { RegistryClient::new(ch).renew_lease(key).await })
                        .await
                        .map(|_| ());
                    (k, r)
                }
            })
            .buffer_unordered(PARALLEL_WRITES)
            .collect()
            .await;
        let mut forgotten = 0;
        for (k, r) in results {
            if let Err(s) = r {
                if s.code() == tonic::Code::InvalidArgument {
                    self.registered.remove(&k);
                    forgotten += 1;
                } else {
                    tracing::warn!(endpoint = %k, error = %s.message(), "renewal failed");
                }
            }
        }
        forgotten
    }

    /// Runs until `shutdown`: waits for the reflectors, reads the store,
    /// then writes each change (debounced) and renews every third of the
    /// lease. Endpoints stay registered at shutdown: a restarted controller
    /// takes them over without a flap, and a controller gone for good
    /// leaves them to their lease.
    pub async fn run(
        mut self,
        changed: Arc<Notify>,
        shutdown: CancellationToken,
    ) -> Result<(), KubeError> {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            r = self.cluster.ready() => r?,
        }
        let mut retry = Duration::from_millis(200);
        loop {
            match self.read_store().await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the registry; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(()),
                        () = tokio::time::sleep(retry) => {}
                    }
                    retry = (retry * 2).min(Duration::from_secs(5));
                }
            }
        }
        let held = self.registered.len();
        // Renew first: what is still true keeps its lease and is not written.
        self.renew().await;
        let first = self.pass().await;
        tracing::info!(
            held,
            registered = first.registered,
            deregistered = first.deregistered,
            "registry synchronised with the cluster"
        );
        let renew_every = (self.settings.lease / 3).max(Duration::from_secs(1));
        let mut renew_at = tokio::time::Instant::now() + renew_every;
        let mut dirty = first.failed > 0;
        loop {
            let retry_in = if dirty {
                Duration::from_millis(500)
            } else {
                renew_every
            };
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = changed.notified() => {
                    // Let a burst of events (a rollout) settle into one pass.
                    tokio::time::sleep(self.settings.debounce).await;
                    dirty = true;
                }
                () = tokio::time::sleep_until(renew_at) => {
                    if self.renew().await > 0 {
                        dirty = true;
                    }
                    renew_at = tokio::time::Instant::now() + renew_every;
                }
                () = tokio::time::sleep(retry_in), if dirty => {}
            }
            if dirty {
                dirty = self.pass().await.failed > 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn store<K>(objects: &[serde_json::Value]) -> Store<K>
    where
        K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned,
    {
        let (reader, mut writer) = reflector::store();
        for o in objects {
            let obj: K = serde_json::from_value(o.clone()).unwrap();
            writer.apply_watcher_event(&watcher::Event::Apply(obj));
        }
        reader
    }

    fn slice(
        name: &str,
        family: &str,
        address: &str,
        ready: bool,
        terminating: bool,
    ) -> serde_json::Value {
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": family,
               "metadata": {"name": name, "namespace": "shop", "labels": {"kubernetes.io/service-name": "catalog"}},
               "endpoints": [{"addresses": [address], "conditions": {"ready": ready, "terminating": terminating},
                              "targetRef": {"kind": "Pod", "name": format!("pod-{address}"), "namespace": "shop"}}],
               "ports": [{"name": "grpc-api", "port": 9090, "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"}]})
    }

    #[test]
    fn what_the_registry_should_hold() {
        let settings = SyncSettings {
            zone: "k8s".into(),
            lease: Duration::from_secs(60),
            debounce: Duration::from_millis(50),
        };
        let mut v6 = slice("catalog-v6", "IPv6", "fd00::7", true, false);
        let v4 = slice("catalog-v4", "IPv4", "10.0.0.7", true, false);
        // The same pod in both families.
        v6["endpoints"][0]["targetRef"]["name"] = json!("pod-10.0.0.7");
        let dying = slice("catalog-x", "IPv4", "10.0.0.8", true, true);
        let injected = slice("catalog-y", "IPv4", "10.0.0.9", true, false);
        let cluster = Cluster {
            namespaces: store(&[json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": "shop", "labels": {"trellis.io/inject": "enabled"}}})]),
            services: store(&[json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "catalog", "namespace": "shop"}, "spec": {"type": "ClusterIP"}})]),
            slices: store(&[v6, v4, dying, injected]),
            pods: store(&[json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "pod-10.0.0.9", "namespace": "shop",
                             "annotations": {"trellis.io/injected": "true"}}})]),
        };
        let want = cluster.desired(&settings);
        let ids: Vec<(&str, &str, bool)> = want
            .values()
            .map(|e| (e.id.as_str(), e.address.as_str(), e.healthy))
            .collect();
        assert_eq!(
            ids,
            vec![
                ("pod-10.0.0.7", "10.0.0.7", true),
                ("pod-10.0.0.8", "10.0.0.8", false)
            ],
            "IPv4 wins for a dual-stack pod, a terminating one is unhealthy, an injected one is left out"
        );
        let e = want.values().next().unwrap();
        assert_eq!(e.ports, vec![9090], "UDP ports are not carried");
        assert_eq!(e.protocol, "grpc");
        assert_eq!(e.labels.get(LABEL_PLAIN).map(String::as_str), Some("true"));
        assert_eq!(e.lease_seconds, 60);
    }
}
