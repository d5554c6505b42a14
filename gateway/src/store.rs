//! The gateway on the federation store: it registers itself as a gateway of
//! its zone, renews its certificate through the servers, and follows the
//! watch for its zone's endpoints (where inbound streams go), the export
//! policy (which zones may reach them) and the other zones' gateways (where
//! outbound streams go). Each applied or rejected revision is acknowledged.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use trellis_ca::rotate::Rotator;
use trellis_federation::client::Servers;
use trellis_federation::policy::{Authorizations, Backend, Exports, Policy};
use trellis_federation::signer::StoreSigner;
use trellis_federation::state::{
    EndpointRecord, GATEWAY_SERVICE, LABEL_ADMIN_ADDRESS, LABEL_EDGE_ZONES, LABEL_INBOUND_PORT,
    LABEL_ZONE_ADDRESS, SYSTEM_NAMESPACE, ZoneRole,
};
use trellis_federation::view::{Check, MeshState};

use crate::config::{GatewayConfig, ServiceConfig, Transport};
use crate::error::GatewayError;
use crate::gateway::{Carrier, Shared};
use crate::peer::PeerLink;
use crate::routes::{Routes, Subsets};

/// The store's `Export` policies, read with the store's own rule (see
/// [`trellis_federation::policy::Exports`]).
fn exports(state: &MeshState) -> Exports {
    Exports::from_records(state.policies_of("Export"))
}

/// This zone's services as routes: the configured ones, then the store's.
fn routes(cfg: &GatewayConfig, exports: &Exports, state: &MeshState) -> Vec<ServiceConfig> {
    let mut keys = std::collections::BTreeSet::new();
    for e in state.endpoints.values() {
        if e.zone == cfg.zone && e.namespace != SYSTEM_NAMESPACE {
            keys.insert((e.namespace.as_str(), e.service.as_str()));
        }
    }
    let mut out = cfg.services.clone();
    out.extend(
        keys.into_iter()
            .filter(|(ns, svc)| !configured(cfg, ns, svc))
            .filter_map(|(ns, svc)| route(cfg, exports, state, ns, svc)),
    );
    out
}

/// The `Backend` that applies to each service (namespace, service).
type Backends = HashMap<(String, String), Backend>;

/// Whether the file configures the service (which then wins over the store).
fn configured(cfg: &GatewayConfig, ns: &str, svc: &str) -> bool {
    cfg.services
        .iter()
        .any(|c| c.name == svc && c.namespace == ns)
}

/// The route of one store service of this zone, if it has an endpoint here.
///
/// A service with a sidecar here is routed to its sidecars, end to end. One
/// whose endpoints here are all plain (no sidecar: a cluster Service a zone
/// controller exported) is terminated by this gateway: its endpoints are the
/// apps' own addresses, at the port each stream names.
fn route(
    cfg: &GatewayConfig,
    exports: &Exports,
    state: &MeshState,
    ns: &str,
    svc: &str,
) -> Option<ServiceConfig> {
    // The one rule callers follow too (`MeshState::plain_zones`).
    let plain = state.plain_zones(ns, svc).contains(&cfg.zone);
    let mut endpoints = Vec::new();
    let mut ports = BTreeSet::new();
    let mut any = false;
    for e in state.endpoints_of(ns, svc) {
        if e.zone != cfg.zone || e.is_plain() != plain {
            continue;
        }
        any = true;
        if plain {
            ports.extend(e.ports.iter().filter_map(|p| u16::try_from(*p).ok()));
            if e.healthy
                && let Some(ip) = plain_target(cfg, e)
            {
                endpoints.push(SocketAddr::new(ip, 0));
            }
        } else if e.healthy {
            endpoints.extend(inbound_addr(e));
        }
    }
    if !any {
        return None;
    }
    let plain_ports: Vec<u16> = ports.into_iter().collect();
    let key = (ns.to_string(), svc.to_string());
    // Without an Export: every zone, or with `default_deny_exports` the
    // service's own zone only.
    let export_to = exports
        .targets(ns, svc)
        .map(<[String]>::to_vec)
        .unwrap_or_else(|| {
            if cfg.default_deny_exports {
                vec![cfg.zone.clone()]
            } else {
                vec!["*".into()]
            }
        });
    let mut s = ServiceConfig {
        name: key.1.clone(),
        namespace: key.0.clone(),
        export_to,
        endpoints,
        plain_ports,
    };
    s.admit_zone(&cfg.zone);
    Some(s)
}

/// The address a plain endpoint may be reached at, or `None` (with a
/// warning) for one this gateway must not connect to on a caller's behalf:
/// a plain endpoint is any address its registrar wrote, and the gateway
/// connects in plaintext, so loopback (this host's own ports), unspecified,
/// link-local (cloud metadata services) and multicast addresses, and the
/// gateway's own addresses, are refused.
fn plain_target(cfg: &GatewayConfig, e: &EndpointRecord) -> Option<IpAddr> {
    // An IPv4 address written as IPv6 (`::ffff:127.0.0.1`) is judged as IPv4.
    let ip = e.address.parse::<IpAddr>().ok()?.to_canonical();
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    };
    let own = [
        Some(cfg.listen),
        cfg.zone_listen,
        cfg.advertise,
        Some(cfg.admin),
    ]
    .into_iter()
    .flatten()
    .any(|a| a.ip() == ip);
    if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() || link_local || own {
        tracing::warn!(
            service = %format!("{}.{}", e.service, e.namespace),
            address = %e.address,
            "plain endpoint left out: not an address the gateway connects to for callers"
        );
        return None;
    }
    Some(ip)
}

/// The `Backend` documents that apply: of two for one service, the first by
/// name, as at the callers. One that does not parse is left out here (the
/// callers report it): a caller that names one of its subsets gets no
/// endpoint, which it treats as any other unreachable subset.
fn backends(state: &MeshState) -> Backends {
    let mut docs: Vec<_> = state
        .policies_of("Backend")
        .filter_map(|p| match p.parse() {
            Ok(Policy::Backend(b)) => Some((p.name.clone(), b)),
            _ => None,
        })
        .collect();
    docs.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = Backends::new();
    for (_, b) in docs {
        let key = (
            b.service.namespace().to_owned(),
            b.service.name().to_owned(),
        );
        out.entry(key).or_insert(b);
    }
    out
}

/// The members of each `Backend` subset among this zone's healthy
/// endpoints, for callers in other zones that name a subset.
fn subsets(cfg: &GatewayConfig, backends: &Backends, state: &MeshState) -> Subsets {
    backends
        .iter()
        .map(|(key, b)| (key.clone(), members(cfg, b, state, key)))
        .collect()
}

/// One service's subset members (see [`subsets`]).
fn members(
    cfg: &GatewayConfig,
    b: &Backend,
    state: &MeshState,
    key: &(String, String),
) -> HashMap<String, Vec<SocketAddr>> {
    let mut by_subset: HashMap<String, Vec<SocketAddr>> = HashMap::new();
    for e in state.endpoints_of(&key.0, &key.1) {
        if e.zone != cfg.zone || !e.healthy {
            continue;
        }
        let Some(addr) = inbound_addr(e) else {
            continue;
        };
        for s in &b.subsets {
            if s.labels.iter().all(|(k, v)| e.labels.get(k) == Some(v)) {
                by_subset.entry(s.name.clone()).or_default().push(addr);
            }
        }
    }
    by_subset
}

/// Keeps the routes true to successive states: the first, and any that
/// changes a policy, are read whole; otherwise only the services with a
/// changed endpoint are routed again. With 50,000 endpoints, reading them
/// all for every change was most of a gateway's CPU (perf,
/// testbed/bench-scale).
#[derive(Default)]
struct Follower {
    state: Option<MeshState>,
    exports: Arc<Exports>,
    backends: Backends,
    /// Enforced for the plain services this gateway terminates for.
    authz: Arc<Authorizations>,
}

impl Follower {
    /// The routes for `state` from `current`, and whether the zones'
    /// gateways may have changed.
    fn update(
        &mut self,
        cfg: &GatewayConfig,
        current: &Routes,
        state: &MeshState,
    ) -> (Routes, bool) {
        let Some(old) = self
            .state
            .replace(state.clone())
            .filter(|old| old.policies.diff(&state.policies).next().is_none())
        else {
            self.exports = Arc::new(exports(state));
            self.backends = backends(state);
            self.authz = Arc::new(Authorizations::from_state(state));
            let services = routes(cfg, &self.exports, state);
            let subsets = subsets(cfg, &self.backends, state);
            return (current.replaced(&services, &subsets), true);
        };
        let (keys, gateways) = state.changed_services(&old, |e| e.zone == cfg.zone);
        let changes = keys
            .into_iter()
            .map(|key| {
                // A service the file configures keeps the file's route, with
                // the store's subset members as in a whole read.
                let file = cfg
                    .services
                    .iter()
                    .find(|c| c.namespace == key.0 && c.name == key.1)
                    .cloned();
                let r = file
                    .or_else(|| route(cfg, &self.exports, state, &key.0, &key.1))
                    .map(|r| {
                        let members = self
                            .backends
                            .get(&key)
                            .map(|b| members(cfg, b, state, &key))
                            .unwrap_or_default();
                        (r, members)
                    });
                (key, r)
            })
            .collect();
        (current.updated(changes), gateways)
    }
}

fn inbound_addr(e: &EndpointRecord) -> Option<SocketAddr> {
    let port = e
        .labels
        .get(LABEL_INBOUND_PORT)
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or(15006);
    e.address
        .parse::<IpAddr>()
        .ok()
        .map(|ip| SocketAddr::new(ip, port))
}

/// Other zones' registered gateways, by zone (configured peers excluded:
/// their zones keep the configured addresses).
fn peer_addrs(cfg: &GatewayConfig, state: &MeshState) -> BTreeMap<String, Vec<SocketAddr>> {
    let mut out: BTreeMap<String, Vec<SocketAddr>> = BTreeMap::new();
    for e in state.endpoints_of(SYSTEM_NAMESPACE, GATEWAY_SERVICE) {
        if e.zone == cfg.zone || !e.healthy || cfg.peers.iter().any(|p| p.zone == e.zone) {
            continue;
        }
        if let Some(addr) = gateway_addr(e) {
            out.entry(e.zone.clone()).or_default().push(addr);
        }
    }
    out
}

/// Where a gateway's record says it is reached: its address and first
/// port, as a peer link dials it.
fn gateway_addr(e: &EndpointRecord) -> Option<SocketAddr> {
    let ip = e.address.parse::<IpAddr>().ok()?;
    let port = u16::try_from(*e.ports.first()?).ok()?;
    Some(SocketAddr::new(ip, port))
}

/// The edge zones other zones' gateways carry, with those zones, from the
/// gateways' records. Only a zone the store knows as an edge zone (its
/// servers joined with an edge token) and that has no gateway of its own
/// can be carried: no gateway may vouch for a core zone.
fn carriers(cfg: &GatewayConfig, state: &MeshState) -> HashMap<String, Vec<Carrier>> {
    let gateways: Vec<&EndpointRecord> = state
        .endpoints_of(SYSTEM_NAMESPACE, GATEWAY_SERVICE)
        .collect();
    let own: BTreeSet<&str> = gateways.iter().map(|g| g.zone.as_str()).collect();
    let mut out: HashMap<String, Vec<Carrier>> = HashMap::new();
    for g in gateways {
        if g.zone == cfg.zone || !g.healthy {
            continue;
        }
        let Some(addr) = gateway_addr(g) else {
            continue;
        };
        let carried = g.labels.get(LABEL_EDGE_ZONES).map_or("", String::as_str);
        for e in carried.split(',').map(str::trim) {
            let edge = state.zones.get(e).is_some_and(|z| z.role == ZoneRole::Edge);
            if !edge || own.contains(e) || cfg.edge_zones.iter().any(|z| z == e) {
                continue;
            }
            out.entry(e.to_owned()).or_default().push(Carrier {
                zone: g.zone.clone(),
                addr,
            });
        }
    }
    out
}

/// Starts registration, renewal and the watch; they stop with `shutdown`.
pub(crate) fn start(
    shared: &Arc<Shared>,
    port: u16,
    zone_port: Option<SocketAddr>,
    admin: SocketAddr,
    shutdown: CancellationToken,
) -> Result<Vec<tokio::task::JoinHandle<()>>, GatewayError> {
    let cfg = &shared.cfg;
    let store_err = |e: trellis_federation::FedError| GatewayError::Tls(e.to_string());
    let servers = Servers::new(&cfg.servers, shared.certs.clone(), shared.trust.clone())
        .map_err(store_err)?;
    // Renewal through the store, written back for the next start.
    let prefix = cfg.credentials.clone();
    let trust = shared.trust.clone();
    let rotator = Rotator::new(
        shared.certs.clone(),
        StoreSigner {
            servers: servers.clone(),
            ttl: None,
        },
    )
    .on_renewed(move |creds| trellis_ca::write_credentials(&prefix, creds, &trust.bundle()));
    tokio::spawn(rotator.run(shutdown.clone()));
    tokio::spawn(trellis_federation::view::follow_bundle(
        servers.clone(),
        vec![shared.trust.clone()],
        vec![cfg.credentials.clone()],
        shutdown.clone(),
    ));

    let mut addr = cfg
        .advertised()
        .ok_or_else(|| GatewayError::config("advertise", "needed to register with the store"))?;
    if addr.port() == 0 {
        addr.set_port(port);
    }
    let mut labels = BTreeMap::new();
    if let Some(mut z) = zone_port {
        // A wildcard bind is reached on the advertised address.
        if z.ip().is_unspecified() {
            z.set_ip(addr.ip());
        }
        labels.insert(LABEL_ZONE_ADDRESS.to_owned(), z.to_string());
    }
    // Bound, so port 0 reads as the real port.
    let mut admin = admin;
    if admin.ip().is_unspecified() {
        admin.set_ip(addr.ip());
    }
    labels.insert(LABEL_ADMIN_ADDRESS.to_owned(), admin.to_string());
    if !cfg.edge_zones.is_empty() {
        labels.insert(LABEL_EDGE_ZONES.to_owned(), cfg.edge_zones.join(","));
    }
    let record = EndpointRecord {
        namespace: SYSTEM_NAMESPACE.into(),
        service: GATEWAY_SERVICE.into(),
        zone: cfg.zone.clone(),
        id: cfg.name.clone(),
        address: addr.ip().to_string(),
        ports: vec![u32::from(addr.port())],
        protocol: "tcp".into(),
        labels,
        healthy: true,
        lease_seconds: cfg.lease.as_secs(),
        lease_expires_ms: 0,
        owner: String::new(),
    };
    let (_keep, rx) = tokio::sync::watch::channel(record);
    let registration = tokio::spawn({
        let servers = servers.clone();
        let stop = shutdown.clone();
        async move {
            // The sender lives as long as the registration.
            let _keep = _keep;
            trellis_federation::lease::keep_registered(servers, rx, stop).await;
        }
    });

    // Export policies, and the Authorization documents it enforces for
    // plain services, are the parts of the state a gateway can fail to
    // apply, one document at a time: the check reports those for the ack,
    // and the routes are built once per revision, below, without them.
    let check: Check = Arc::new(|state| {
        let mut skipped = exports(state).skipped;
        skipped.extend(Authorizations::from_state(state).skipped);
        Ok(skipped)
    });
    let mut view = trellis_federation::view::follow(servers, check, shutdown.clone());
    let s = shared.clone();
    let mut follower = Follower::default();
    let mut peers_complete = false;
    // The zones carriers were read against: an edge zone that joins after
    // the gateways registered becomes carried when its record arrives.
    let mut zones_read = None;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                r = view.changed() => if r.is_err() { return },
            }
            let state = view.borrow_and_update().clone();
            let (routes, gateways) = follower.update(&s.cfg, &s.routes.load(), &state);
            let services = routes.len();
            s.terminating.authz.store(follower.authz.clone());
            s.exports.store(follower.exports.clone());
            s.routes.store(Arc::new(routes));
            // A link that could not be set up is tried again with the next
            // revision, as when every revision set up the peers.
            if gateways || zones_read.as_ref() != Some(&state.zones) {
                s.carriers.store(Arc::new(carriers(&s.cfg, &state)));
                zones_read = Some(state.zones.clone());
            }
            if gateways || !peers_complete {
                peers_complete = apply_peers(&s, &peer_addrs(&s.cfg, &state)).await;
            }
            tracing::debug!(revision = state.revision, services, "mesh view applied");
        }
    });
    Ok(vec![registration])
}

/// Keeps the links whose (zone, address) remain, adds new ones, closes the
/// ones whose gateway left the store.
/// Returns whether every link could be set up (else the caller retries).
async fn apply_peers(s: &Arc<Shared>, want: &BTreeMap<String, Vec<SocketAddr>>) -> bool {
    let mut complete = true;
    let current = s.peers.load_full();
    let mut next: HashMap<String, Vec<Arc<PeerLink>>> = HashMap::new();
    for p in &s.cfg.peers {
        if let Some(links) = current.get(&p.zone) {
            next.insert(p.zone.clone(), links.clone());
        }
    }
    for (zone, addrs) in want {
        let old = current.get(zone).cloned().unwrap_or_default();
        let mut links = Vec::new();
        for a in addrs {
            match old.iter().find(|l| l.addr() == *a) {
                Some(l) => links.push(l.clone()),
                None => match s.link(zone, *a, Transport::Auto, None) {
                    Ok(l) => {
                        tracing::info!(peer_zone = %zone, addr = %a, "peer gateway learned from the store");
                        links.push(Arc::new(l));
                    }
                    Err(e) => {
                        complete = false;
                        tracing::warn!(peer_zone = %zone, addr = %a, error = %e, "could not set up a peer link")
                    }
                },
            }
        }
        if !links.is_empty() {
            next.insert(zone.clone(), links);
        }
    }
    let gone: Vec<Arc<PeerLink>> = current
        .values()
        .flatten()
        .filter(|l| !next.values().flatten().any(|n| Arc::ptr_eq(n, l)))
        .cloned()
        .collect();
    s.peers.store(Arc::new(next));
    for l in gone {
        tracing::info!(peer_zone = %l.zone(), addr = %l.addr(), "peer gateway left the store");
        l.close().await;
    }
    complete
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use trellis_federation::policy::cases;
    use trellis_federation::state::PolicyRecord;

    use super::*;

    /// Every route of `state`, read whole.
    fn routes(cfg: &GatewayConfig, state: &MeshState) -> Vec<ServiceConfig> {
        super::routes(cfg, &exports(state), state)
    }

    fn doc(name: &str, spec: serde_json::Value) -> PolicyRecord {
        PolicyRecord {
            kind: "Export".into(),
            name: name.into(),
            spec,
        }
    }

    /// A synced state holding `docs` as they are, unvalidated, the way an
    /// older or foreign server may have stored them.
    fn state_with(docs: impl IntoIterator<Item = PolicyRecord>) -> MeshState {
        let mut s = MeshState {
            revision: 7,
            synced: true,
            ..MeshState::default()
        };
        for d in docs {
            s.policies.insert(format!("{}/{}", d.kind, d.name), d);
        }
        s
    }

    fn endpoint(service: &str, address: &str) -> EndpointRecord {
        EndpointRecord {
            namespace: "shop".into(),
            service: service.into(),
            zone: "west".into(),
            id: "h1.west.internal".into(),
            address: address.into(),
            ports: vec![8080],
            protocol: "tcp".into(),
            labels: BTreeMap::new(),
            healthy: true,
            lease_seconds: 10,
            lease_expires_ms: 0,
            owner: String::new(),
        }
    }

    #[test]
    fn the_gateway_applies_exactly_the_exports_the_store_accepts() {
        let mut seen = 0;
        for c in cases::all().into_iter().filter(|c| c.kind == "Export") {
            let d = doc(&c.name, c.spec.clone());
            let stored = d.validate().is_ok();
            let skipped = exports(&state_with([d])).skipped;
            assert_eq!(stored, skipped.is_empty(), "line {}: {skipped:?}", c.line);
            seen += 1;
        }
        assert!(seen >= 5, "the table lost its Export cases");
    }

    #[test]
    fn a_bad_export_closes_its_service_and_the_rest_applies() {
        let mut state = state_with([
            doc(
                "catalog",
                json!({"service": "catalog.shop", "to": ["east"]}),
            ),
            // Stored by an older server, whose rule let '_' through.
            doc("auth", json!({"service": "auth.shop", "to": ["us_east"]})),
        ]);
        for (svc, ip) in [
            ("catalog", "10.0.0.1"),
            ("auth", "10.0.0.2"),
            ("cart", "10.0.0.3"),
        ] {
            let e = endpoint(svc, ip);
            state.endpoints.insert(e.key(), e);
        }
        let ex = exports(&state);
        assert_eq!(ex.skipped.len(), 1, "{:?}", ex.skipped);
        assert!(
            ex.skipped[0].starts_with("Export/auth: spec.to[0]: \"us_east\""),
            "{}",
            ex.skipped[0]
        );
        let cfg = crate::testing::config("west", "127.0.0.1:0".parse().unwrap());
        let routes = routes(&cfg, &state);
        let export_to = |name: &str| {
            let r = routes.iter().find(|r| r.name == name).unwrap();
            assert_eq!(r.endpoints.len(), 1, "{name} lost its endpoint");
            r.export_to.clone()
        };
        assert_eq!(export_to("catalog"), ["east"]);
        // Fail closed: without its Export, auth would be open to every zone.
        assert!(export_to("auth").is_empty());
        assert_eq!(export_to("cart"), ["*"]);
    }
}

#[cfg(test)]
mod follower_tests {
    use serde_json::json;
    use trellis_federation::state::PolicyRecord;

    use super::*;

    fn endpoint(svc: usize, zone: &str, i: usize, healthy: bool, version: &str) -> EndpointRecord {
        EndpointRecord {
            namespace: "shop".into(),
            service: format!("s{svc}"),
            zone: zone.into(),
            id: format!("s{svc}-{i}.{zone}.internal"),
            address: format!("10.0.{svc}.{}", i + 1),
            ports: vec![8080],
            protocol: "tcp".into(),
            labels: BTreeMap::from([("version".to_owned(), version.to_owned())]),
            healthy,
            lease_seconds: 10,
            lease_expires_ms: 0,
            owner: String::new(),
        }
    }

    fn policy(kind: &str, name: &str, spec: serde_json::Value) -> PolicyRecord {
        PolicyRecord {
            kind: kind.into(),
            name: name.into(),
            spec,
        }
    }

    #[test]
    fn routes_kept_current_match_routes_read_whole_and_keep_their_counters() {
        let mut cfg = crate::testing::config("west", "127.0.0.1:0".parse().unwrap());
        // The file configures s2, which has a Backend: its subset members
        // come from the store's endpoints of s2 in both reads.
        cfg.services.push(ServiceConfig {
            name: "s2".into(),
            namespace: "shop".into(),
            export_to: vec!["*".into()],
            endpoints: vec![
                "10.0.2.1:15006".parse().unwrap(),
                "10.0.2.2:15006".parse().unwrap(),
            ],
            plain_ports: Vec::new(),
        });
        let mut state = MeshState {
            synced: true,
            ..MeshState::default()
        };
        let put = |st: &mut MeshState, p: PolicyRecord| {
            st.policies.insert(format!("{}/{}", p.kind, p.name), p);
        };
        put(
            &mut state,
            policy(
                "Export",
                "s1",
                json!({"service": "s1.shop", "to": ["east"]}),
            ),
        );
        put(
            &mut state,
            policy(
                "Backend",
                "s2",
                json!({"service": "s2.shop", "subsets": [{"name": "v2", "labels": {"version": "v2"}}]}),
            ),
        );
        let mut follower = Follower::default();
        let mut current = Routes::default();
        let mut rng = fastrand::Rng::with_seed(11);
        let zones = ["west", "east"];
        for round in 0..80 {
            for _ in 0..rng.usize(1..6) {
                let svc = rng.usize(0..6);
                let mut e = endpoint(
                    svc,
                    zones[rng.usize(0..2)],
                    rng.usize(0..3),
                    rng.bool(),
                    ["v1", "v2"][rng.usize(0..2)],
                );
                match rng.u8(0..8) {
                    0 => {
                        state.endpoints.remove(&e.key());
                        continue;
                    }
                    1 => {
                        e.labels
                            .insert(trellis_federation::state::LABEL_PLAIN.into(), "true".into());
                    }
                    2 => {
                        e.namespace = SYSTEM_NAMESPACE.into();
                        e.service = GATEWAY_SERVICE.into();
                    }
                    _ => {}
                }
                state.endpoints.insert(e.key(), e);
            }
            if round % 20 == 19 {
                put(
                    &mut state,
                    policy(
                        "Export",
                        "s3",
                        json!({"service": "s3.shop", "to": ["edge"]}),
                    ),
                );
            }
            state.revision += 1;
            let (next, _) = follower.update(&cfg, &current, &state);
            let whole = Routes::with_subsets(
                &routes(&cfg, &exports(&state), &state),
                &subsets(&cfg, &backends(&state), &state),
            );
            assert_eq!(next.summary(), whole.summary(), "round {round}");
            // An endpoint that stayed is the same one, counters and all.
            for (key, svc) in &current.services {
                let Some(now) = next.services.get(key) else {
                    continue;
                };
                for e in &svc.endpoints {
                    if let Some(n) = now.endpoints.iter().find(|n| n.addr == e.addr) {
                        assert!(Arc::ptr_eq(n, e), "round {round}: {key:?} {}", e.addr);
                    }
                }
            }
            current = next;
        }
    }
}

#[cfg(test)]
mod default_deny_tests {
    use trellis_federation::state::PolicyRecord;

    use super::*;
    use crate::tunnel::ReplyCode;

    fn routes(cfg: &GatewayConfig, state: &MeshState) -> Vec<ServiceConfig> {
        super::routes(cfg, &exports(state), state)
    }

    fn endpoint(service: &str) -> EndpointRecord {
        EndpointRecord {
            namespace: "shop".into(),
            service: service.into(),
            zone: "west".into(),
            id: format!("{service}-1"),
            address: "10.0.0.1".into(),
            ports: vec![8080],
            protocol: "tcp".into(),
            labels: BTreeMap::new(),
            healthy: true,
            lease_seconds: 5,
            lease_expires_ms: 0,
            owner: String::new(),
        }
    }

    /// West's registry: `open` has no Export policy, `listed` is exported to east.
    fn state() -> MeshState {
        let mut s = MeshState::default();
        for svc in ["open", "listed"] {
            s.endpoints
                .insert(format!("shop/{svc}/west/{svc}-1"), endpoint(svc));
        }
        s.policies.insert(
            "Export/listed".into(),
            PolicyRecord {
                kind: "Export".into(),
                name: "listed".into(),
                spec: serde_json::json!({ "service": "listed.shop", "to": ["east"] }),
            },
        );
        s
    }

    fn verdict(deny: bool, service: &str, from: &str) -> Option<ReplyCode> {
        let mut cfg =
            GatewayConfig::from_toml("name = \"gw1\"\nzone = \"west\"\ncredentials = \"/unused\"")
                .unwrap();
        cfg.default_deny_exports = deny;
        let r = Routes::from_config(&routes(&cfg, &state()));
        r.pick("shop", service, None, from, 1).err().map(|e| e.code)
    }

    #[test]
    fn a_plain_service_is_terminated_here_at_the_port_the_stream_names() {
        let cfg =
            GatewayConfig::from_toml("name = \"gw1\"\nzone = \"west\"\ncredentials = \"/unused\"")
                .unwrap();
        let mut s = state();
        let mut plain = endpoint("legacy");
        plain
            .labels
            .insert(trellis_federation::state::LABEL_PLAIN.into(), "true".into());
        plain.ports = vec![8080, 9090];
        s.endpoints
            .insert("shop/legacy/west/legacy-1".into(), plain.clone());
        // A service with a sidecar too is routed to the sidecar only.
        let mut mixed = plain.clone();
        mixed.service = "mixed".into();
        s.endpoints.insert("shop/mixed/west/legacy-1".into(), mixed);
        let mut sidecar = endpoint("mixed");
        sidecar.id = "mixed-2".into();
        sidecar.address = "10.0.0.2".into();
        s.endpoints
            .insert("shop/mixed/west/mixed-2".into(), sidecar);
        // Exported to east only.
        s.policies.insert(
            "Export/legacy".into(),
            PolicyRecord {
                kind: "Export".into(),
                name: "legacy".into(),
                spec: serde_json::json!({ "service": "legacy.shop", "to": ["east"] }),
            },
        );
        let r = Routes::from_config(&routes(&cfg, &s));
        let header = |service: &str, port: u16| crate::tunnel::Header {
            service: service.into(),
            namespace: "shop".into(),
            port,
            source_zone: "east".into(),
            traceparent: None,
            subset: None,
            zone: None,
        };
        assert!(r.targets(&header("legacy", 9090), 1).unwrap().plain);
        let to = |h| {
            r.targets(&h, 2)
                .map(|t| t.endpoints.into_iter().map(|(a, _)| a).collect::<Vec<_>>())
        };
        assert_eq!(
            to(header("legacy", 9090)),
            Ok(vec!["10.0.0.1:9090".parse().unwrap()])
        );
        assert_eq!(
            to(header("legacy", 7000)).map_err(|e| e.code),
            Err(ReplyCode::UnknownService)
        );
        assert!(!r.targets(&header("mixed", 8080), 1).unwrap().plain);
        assert_eq!(
            to(header("mixed", 8080)),
            Ok(vec!["10.0.0.2:15006".parse().unwrap()])
        );
        // The zone's own callers come through here too, whatever the Export;
        // other zones as it says.
        assert!(r.pick("shop", "legacy", None, "west", 1).is_ok());
        assert_eq!(
            r.pick("shop", "legacy", None, "north", 1)
                .err()
                .map(|e| e.code),
            Some(ReplyCode::NotExported)
        );
        // Addresses the gateway must not connect to for a caller are left out.
        let mut s2 = s.clone();
        for (i, addr) in ["127.0.0.1", "169.254.169.254", "0.0.0.0", "fe80::1"]
            .into_iter()
            .enumerate()
        {
            let mut e = plain.clone();
            e.service = "probe".into();
            e.id = format!("p{i}");
            e.address = addr.into();
            s2.endpoints.insert(e.key(), e);
        }
        let r2 = Routes::from_config(&routes(&cfg, &s2));
        assert_eq!(
            r2.targets(&header("probe", 8080), 4).err().map(|e| e.code),
            Some(ReplyCode::NoHealthyEndpoint)
        );
        // Unhealthy: refused as any service without an endpoint.
        plain.healthy = false;
        s.endpoints
            .insert("shop/legacy/west/legacy-1".into(), plain);
        let r = Routes::from_config(&routes(&cfg, &s));
        assert_eq!(
            r.targets(&header("legacy", 8080), 1).err().map(|e| e.code),
            Some(ReplyCode::NoHealthyEndpoint)
        );
    }

    #[test]
    fn without_an_export_policy_a_service_is_open_unless_exports_deny_by_default() {
        // Off (the default): unchanged, every zone may call `open`.
        assert_eq!(verdict(false, "open", "north"), None);
        // On: only the service's own zone.
        assert_eq!(verdict(true, "open", "north"), Some(ReplyCode::NotExported));
        assert_eq!(verdict(true, "open", "west"), None);
        // An Export policy decides either way.
        for deny in [false, true] {
            assert_eq!(verdict(deny, "listed", "east"), None);
            assert_eq!(
                verdict(deny, "listed", "north"),
                Some(ReplyCode::NotExported)
            );
        }
    }
}

#[cfg(test)]
mod carrier_tests {
    use super::*;

    fn gateway(zone: &str, name: &str, edges: Option<&str>, healthy: bool) -> EndpointRecord {
        EndpointRecord {
            namespace: SYSTEM_NAMESPACE.into(),
            service: GATEWAY_SERVICE.into(),
            zone: zone.into(),
            id: name.into(),
            address: "10.0.0.1".into(),
            ports: vec![15443],
            protocol: "tcp".into(),
            labels: edges
                .map(|e| BTreeMap::from([(LABEL_EDGE_ZONES.to_owned(), e.to_owned())]))
                .unwrap_or_default(),
            healthy,
            lease_seconds: 10,
            lease_expires_ms: 0,
            owner: String::new(),
        }
    }

    #[test]
    fn only_edge_zones_without_a_gateway_have_carriers() {
        let mut cfg = crate::testing::config("k8s", "127.0.0.1:0".parse().unwrap());
        cfg.edge_zones = vec!["mine".into()];
        let mut state = MeshState::default();
        for (z, role) in [
            ("edge", ZoneRole::Edge),
            ("shops", ZoneRole::Edge),
            ("far", ZoneRole::Edge),
            ("mine", ZoneRole::Edge),
            // Has a gateway below, whatever its record says.
            ("east", ZoneRole::Edge),
            ("hq", ZoneRole::Core),
        ] {
            state.zones.insert(
                z.into(),
                trellis_federation::state::ZoneRecord {
                    name: z.into(),
                    role,
                    gateways: Vec::new(),
                },
            );
        }
        for g in [
            // hq is a core zone, and "ghost" no zone the store knows.
            gateway("west", "gw4", Some("hq,ghost"), true),
            gateway("west", "gw1", Some("edge, shops"), true),
            gateway("west", "gw2", Some("edge"), true),
            // Claims east, which has a gateway of its own: no edge.
            gateway("north", "gw1", Some("east,edge"), true),
            gateway("east", "gw1", None, true),
            // Not healthy: vouches for nothing.
            gateway("south", "gw1", Some("far"), false),
            // Our own edge is ours to carry.
            gateway("west", "gw3", Some("mine"), true),
        ] {
            state.endpoints.insert(g.key(), g);
        }
        let c = carriers(&cfg, &state);
        let mut got: Vec<(String, Vec<String>)> = c
            .into_iter()
            .map(|(e, v)| {
                let mut zones: Vec<String> = v.into_iter().map(|c| c.zone).collect();
                zones.dedup();
                (e, zones)
            })
            .collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                ("edge".into(), vec!["north".into(), "west".into()]),
                ("shops".into(), vec!["west".into()]),
            ]
        );
    }
}
