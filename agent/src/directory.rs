//! What this host knows of the mesh, in the form the proxy and DNS use: the
//! services it can call (each with its loopback address, ports, allowed
//! identities, local endpoints and the other zones that serve it), this
//! zone's gateways, and who may call the local services.
//!
//! One directory is built from the static configuration or from the store's
//! state; the listeners, the DNS answers and the authorization all read the
//! current one, which is swapped whole when the store changes.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use trellis_ca::SpiffeId;
use trellis_federation::policy::{Authorization, Authorizations, RequestFacts};
use trellis_federation::state::{
    EndpointRecord, GATEWAY_SERVICE, LABEL_ACCOUNT, LABEL_INBOUND_PORT, LABEL_PORT_PROTOCOLS,
    LABEL_ZONE_ADDRESS, SYSTEM_NAMESPACE,
};
use trellis_federation::view::{DiffItem, MeshState, OrdMap};
use trellis_proxy::protocol::Declared;

use crate::config::AgentConfig;
use crate::traffic::Policies;

/// One name this host can call: a service, or a service pinned to a zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) name: String,
    pub(crate) namespace: String,
    /// `Some` for `<svc>.<ns>.<zone>.<suffix>`: only that zone serves it.
    pub(crate) pinned: Option<String>,
    pub(crate) address: IpAddr,
    pub(crate) ports: Vec<u16>,
    /// SPIFFE IDs its workloads may present.
    pub(crate) identities: BTreeSet<String>,
    /// Zones that serve it only through plain endpoints (no sidecar there),
    /// with their gateways' SPIFFE IDs: a route to such a zone admits those,
    /// which terminate for it, and a route anywhere else never does.
    pub(crate) plain: BTreeMap<String, BTreeSet<String>>,
    /// Sidecar inbound addresses of its healthy endpoints in this zone.
    pub(crate) local: Vec<SocketAddr>,
    /// Other zones with a healthy endpoint, nearest first.
    pub(crate) zones: Vec<String>,
    /// What its ports speak: declared by its endpoints (all alike), or
    /// detected per connection.
    pub(crate) protocol: Declared,
    /// Ports declared otherwise.
    pub(crate) port_protocols: BTreeMap<u16, Declared>,
    /// Its healthy endpoints in every zone it may be reached in, with their
    /// labels: where a `Backend` subset's members are.
    pub(crate) members: Vec<Member>,
}

/// One healthy endpoint of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Member {
    pub(crate) zone: String,
    /// Its sidecar's inbound address, for an endpoint of this zone.
    pub(crate) local: Option<SocketAddr>,
    pub(crate) labels: BTreeMap<String, String>,
}

impl Member {
    /// Whether it has every label of `want`.
    pub(crate) fn has(&self, want: &BTreeMap<String, String>) -> bool {
        want.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }
}

impl Entry {
    /// What `port` speaks.
    pub(crate) fn protocol_of(&self, port: u16) -> Declared {
        self.port_protocols
            .get(&port)
            .copied()
            .unwrap_or(self.protocol)
    }

    /// `service.namespace`, or `service.namespace.zone` when pinned.
    pub(crate) fn label(&self) -> String {
        match &self.pinned {
            Some(z) => format!("{}.{}.{z}", self.name, self.namespace),
            None => format!("{}.{}", self.name, self.namespace),
        }
    }
}

/// A name's key: namespace, service and, for a pinned name, its zone.
pub(crate) type Key = (String, String, Option<String>);

/// The whole view at one moment.
///
/// Its maps are persistent (`imbl`): a directory is published as a copy per
/// revision, the copy costs O(1), and what the next revision did not touch
/// is shared with it. The listener loop finds what to open and close by
/// diffing two of them, which skips the shared parts.
#[derive(Debug, Clone, Default)]
pub(crate) struct Directory {
    /// Every name.
    names: OrdMap<Key, Arc<Entry>>,
    /// The name on each (address, port) something listens on.
    listening: OrdMap<SocketAddr, Key>,
    /// This zone's gateways (TCP, SNI passthrough).
    pub(crate) gateways: Vec<SocketAddr>,
    /// Who may call the local services: the file's rules, then the
    /// store's, and the services that fail closed for a document that
    /// could not be applied.
    pub(crate) authz: Arc<Authorizations>,
    /// Traffic policy by destination service.
    pub(crate) traffic: Arc<Policies>,
}

impl Directory {
    /// The entry listening on `to`.
    pub(crate) fn at(&self, to: SocketAddr) -> Option<&Entry> {
        self.names.get(self.listening.get(&to)?).map(|e| &**e)
    }

    /// The entry for a DNS name's labels.
    pub(crate) fn named(
        &self,
        service: &str,
        namespace: &str,
        zone: Option<&str>,
    ) -> Option<&Entry> {
        let key = (
            namespace.to_string(),
            service.to_string(),
            zone.map(str::to_string),
        );
        self.names.get(&key).map(|e| &**e)
    }

    /// Every name, by namespace, service and zone.
    #[cfg(test)]
    pub(crate) fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.names.values().map(|e| &**e)
    }

    /// How many names there are.
    pub(crate) fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether `caller` may make `request` of the local `service`
    /// (`name.namespace`; `request` is `None` for an opaque connection);
    /// `Err` names the entry that refuses it. A service whose store document
    /// could not be applied refuses everyone; then deny wins over allow, and
    /// with any allow entry, what no allow entry matches is refused.
    pub(crate) fn authorize(
        &self,
        service: &str,
        caller: &SpiffeId,
        request: Option<RequestFacts<'_>>,
    ) -> Result<(), String> {
        self.authz.check(service, caller, request)
    }

    /// Every (address, port) something should listen on.
    pub(crate) fn listeners(&self) -> BTreeSet<SocketAddr> {
        self.listening.keys().copied().collect()
    }

    /// The listeners to open and to close to go from `old` to this one.
    pub(crate) fn listener_changes(&self, old: &Directory) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
        let (mut open, mut close) = (Vec::new(), Vec::new());
        for d in old.listening.diff(&self.listening) {
            match d {
                DiffItem::Add(a, _) => open.push(*a),
                DiffItem::Remove(a, _) => close.push(*a),
                DiffItem::Update { .. } => {}
            }
        }
        (open, close)
    }

    fn insert(&mut self, e: Entry) -> Key {
        let key = (e.namespace.clone(), e.name.clone(), e.pinned.clone());
        for p in &e.ports {
            self.listening
                .insert(SocketAddr::new(e.address, *p), key.clone());
        }
        self.names.insert(key.clone(), Arc::new(e));
        key
    }

    fn remove(&mut self, key: &Key) -> Option<Arc<Entry>> {
        let e = self.names.remove(key)?;
        for p in &e.ports {
            let at = SocketAddr::new(e.address, *p);
            if self.listening.get(&at) == Some(key) {
                self.listening.remove(&at);
            }
        }
        Some(e)
    }

    /// From the static configuration (`upstreams`, `gateway`, `authorization`).
    pub(crate) fn from_config(cfg: &AgentConfig) -> Self {
        let mut dir = Self {
            gateways: cfg.gateway.into_iter().collect(),
            authz: Arc::new(Authorizations {
                rules: config_authz(cfg),
                ..Authorizations::default()
            }),
            ..Self::default()
        };
        for e in fixed_entries(cfg) {
            dir.insert(e);
        }
        dir
    }

    /// From the store's state, for an agent of `cfg.zone`, built whole (see
    /// [`Builder`]).
    #[cfg(test)]
    pub(crate) fn from_state(cfg: &AgentConfig, state: &MeshState, trust_domain: &str) -> Self {
        Builder::new(cfg, trust_domain).update(state)
    }
}

/// The configured upstreams as entries, at their configured addresses.
fn fixed_entries(cfg: &AgentConfig) -> Vec<Entry> {
    cfg.upstreams
        .iter()
        .map(|u| Entry {
            name: u.name.clone(),
            namespace: u.namespace.clone(),
            pinned: None,
            address: u.address,
            ports: u.ports.clone(),
            identities: u.identities.iter().cloned().collect(),
            plain: BTreeMap::new(),
            local: u.endpoints.clone(),
            zones: u.zones.clone(),
            protocol: u.protocol,
            port_protocols: u
                .port_protocols
                .iter()
                .filter_map(|(p, d)| Some((p.parse().ok()?, *d)))
                .collect(),
            members: u
                .endpoints
                .iter()
                .map(|a| Member {
                    zone: cfg.zone.clone(),
                    local: Some(*a),
                    labels: BTreeMap::new(),
                })
                .chain(u.zones.iter().map(|z| Member {
                    zone: z.clone(),
                    local: None,
                    labels: BTreeMap::new(),
                }))
                .collect(),
        })
        .collect()
}

/// Keeps a directory true to successive states of the store, for one
/// configuration. A new state costs what changed, not the size of the mesh:
/// the endpoints are diffed against the last state (persistent maps, so the
/// shared parts are skipped) and only the services with a changed endpoint
/// are built again. Unscoped at 50,000 endpoints, rebuilding everything for
/// every change was most of an agent's CPU (perf, testbed/bench-scale).
///
/// A store name keeps its address while it exists, and for [`HOLD`] after
/// it leaves: an app may still hold the DNS answer, and must not reach
/// another service there; the name gets it back if it returns meanwhile. A
/// reload of the configuration keeps every address too. A new name takes the
/// address a hash of its label picks, or the next free one; the names of the
/// first state are placed in label order, so a host that starts on a state
/// gives its names the same addresses as every other host starting on it
/// (collisions since may have moved a name elsewhere on a long-running one).
pub(crate) struct Builder {
    cfg: AgentConfig,
    trust_domain: String,
    /// The state the directory reflects (a copy costs O(1)).
    state: Option<MeshState>,
    /// The store names of each service (namespace, service).
    owned: HashMap<(String, String), Vec<Key>>,
    /// Hosts of `cfg.outbound_network` in use (the low 16 bits).
    taken: HashSet<u32>,
    /// Hosts of names that left, by label, kept (and taken) until then.
    held: HashMap<String, (u32, Instant)>,
    /// Services with a plain endpoint: their identities are their zones'
    /// gateways', so they are built again when a gateway changes.
    plain: BTreeSet<(String, String)>,
    dir: Directory,
}

/// How long a name that left keeps its address from other names (the DNS
/// TTL is 5 s; apps and resolvers may cache longer).
pub(crate) const HOLD: Duration = Duration::from_secs(120);

/// Hosts of a /16 a name can have: .0.2 to .255.254.
const HOSTS: usize = 0xfffe - 2 + 1;

impl Builder {
    pub(crate) fn new(cfg: &AgentConfig, trust_domain: &str) -> Self {
        let base = network_base(cfg.outbound_network);
        // A store name must not land on a configured upstream's address.
        let taken = cfg
            .upstreams
            .iter()
            .filter_map(|u| match u.address {
                IpAddr::V4(a) if u32::from(a) & 0xffff_0000 == base => Some(u32::from(a) & 0xffff),
                _ => None,
            })
            .collect();
        Self {
            cfg: cfg.clone(),
            trust_domain: trust_domain.to_string(),
            state: None,
            owned: HashMap::new(),
            taken,
            held: HashMap::new(),
            plain: BTreeSet::new(),
            dir: Directory::from_config(cfg),
        }
    }

    /// A builder for a reloaded configuration: the next state is built whole,
    /// and each store name gets its address back unless a configured
    /// upstream now has it.
    pub(crate) fn reconfigure(self, cfg: &AgentConfig) -> Self {
        let mut next = Self::new(cfg, &self.trust_domain);
        if cfg.outbound_network != self.cfg.outbound_network {
            return next;
        }
        let until = Instant::now() + HOLD;
        let owned = self.owned.values().flatten();
        for e in owned.filter_map(|k| self.dir.names.get(k)) {
            let host = host_of(e.address);
            if next.taken.insert(host) {
                next.held.insert(e.label(), (host, until));
            }
        }
        for (label, (host, until)) in self.held {
            if next.taken.insert(host) {
                next.held.insert(label, (host, until));
            }
        }
        next
    }

    /// The directory for `state`. A policy document that cannot be applied
    /// is left out (see [`Authorizations::from_state`]); everything else applies.
    pub(crate) fn update(&mut self, state: &MeshState) -> Directory {
        let empty = MeshState::default();
        let old = self.state.as_ref().unwrap_or(&empty);
        let (mut services, gateways) = state.changed_services(old, |_| true);
        let gateways = gateways || self.state.is_none();
        if gateways {
            services.extend(self.plain.iter().cloned());
        }
        let policies = self.state.is_none() || old.policies.diff(&state.policies).next().is_some();
        let now = Instant::now();
        let mut fresh = Vec::new();
        for (ns, svc) in services {
            let built = service_entries(&self.cfg, state, &ns, &svc, &self.trust_domain);
            let key = (ns.clone(), svc.clone());
            if state.endpoints_of(&ns, &svc).any(EndpointRecord::is_plain) {
                self.plain.insert(key);
            } else {
                self.plain.remove(&key);
            }
            let mut kept = HashMap::new();
            for key in self
                .owned
                .remove(&(ns.clone(), svc.clone()))
                .unwrap_or_default()
            {
                let Some(old) = self.dir.remove(&key) else {
                    continue;
                };
                if built.iter().any(|e| e.pinned == key.2) {
                    kept.insert(key.2, old.address);
                } else {
                    self.held
                        .insert(old.label(), (host_of(old.address), now + HOLD));
                }
            }
            let fixed = self
                .cfg
                .upstreams
                .iter()
                .any(|u| u.name == svc && u.namespace == ns);
            for mut e in built {
                // Configured upstreams keep their configured addresses, and
                // win over the store's entry of the same name.
                if fixed && e.pinned.is_none() {
                    continue;
                }
                match kept.get(&e.pinned) {
                    Some(a) => {
                        e.address = *a;
                        let key = self.dir.insert(e);
                        self.owned
                            .entry((ns.clone(), svc.clone()))
                            .or_default()
                            .push(key);
                    }
                    None => fresh.push(e),
                }
            }
        }
        self.held.retain(|_, (host, until)| {
            let keep = *until > now;
            if !keep {
                self.taken.remove(host);
            }
            keep
        });
        fresh.sort_by_key(Entry::label);
        for mut e in fresh {
            let Some(address) = self.assign(&e.label()) else {
                tracing::warn!(
                    name = %e.label(),
                    network = %self.cfg.outbound_network,
                    "no free address for a mesh name: every host of the /16 is in use"
                );
                continue;
            };
            e.address = address;
            let owner = (e.namespace.clone(), e.name.clone());
            let key = self.dir.insert(e);
            self.owned.entry(owner).or_default().push(key);
        }
        if gateways {
            self.dir.gateways = gateways_of(&self.cfg, state);
        }
        if policies {
            let mut authz = Authorizations::from_state(state);
            let mut rules = config_authz(&self.cfg);
            rules.append(&mut authz.rules);
            authz.rules = rules;
            self.dir.authz = Arc::new(authz);
            self.dir.traffic = Arc::new(Policies::from_state(state));
        }
        self.state = Some(state.clone());
        self.dir.clone()
    }

    /// An address for `label`: the one it held, else the one a hash of it
    /// picks or the next free one after it; `None` when none is free.
    fn assign(&mut self, label: &str) -> Option<IpAddr> {
        let base = network_base(self.cfg.outbound_network);
        if let Some((host, _)) = self.held.remove(label) {
            return Some(IpAddr::V4(Ipv4Addr::from(base | host)));
        }
        if self.taken.len() >= HOSTS {
            return None;
        }
        let mut host = hashed_host(label);
        // Skip .0.0, .0.1 (often the host itself) and .255.255.
        loop {
            host = host.clamp(2, 0xfffe);
            if self.taken.insert(host) {
                break;
            }
            host = if host >= 0xfffe { 2 } else { host + 1 };
        }
        Some(IpAddr::V4(Ipv4Addr::from(base | host)))
    }
}

/// Where a hash of `label` puts it in the /16, before collisions.
fn hashed_host(label: &str) -> u32 {
    let d = ring::digest::digest(&ring::digest::SHA256, label.as_bytes());
    u32::from(u16::from_be_bytes([d.as_ref()[0], d.as_ref()[1]]))
}

/// The /16 that store names get addresses in.
fn network_base(net: Ipv4Addr) -> u32 {
    u32::from(net) & 0xffff_0000
}

fn host_of(a: IpAddr) -> u32 {
    match a {
        IpAddr::V4(a) => u32::from(a) & 0xffff,
        IpAddr::V6(_) => 0,
    }
}

/// This zone's gateways: the configured one, and those the store lists.
fn gateways_of(cfg: &AgentConfig, state: &MeshState) -> Vec<SocketAddr> {
    let mut gateways: Vec<SocketAddr> = cfg.gateway.into_iter().collect();
    for e in state.endpoints_of(SYSTEM_NAMESPACE, GATEWAY_SERVICE) {
        if e.zone != cfg.zone || !e.healthy {
            continue;
        }
        // A gateway with a port for its zone refuses workloads on its
        // tunnel port.
        let zone_port = e
            .labels
            .get(LABEL_ZONE_ADDRESS)
            .and_then(|a| a.parse::<SocketAddr>().ok());
        let g = e.ports.first().and_then(|p| u16::try_from(*p).ok());
        if let Some(g) = zone_port.or_else(|| g.and_then(|p| resolve(&e.address, p)))
            && !gateways.contains(&g)
        {
            gateways.push(g);
        }
    }
    gateways
}

/// The names of one service (`svc.ns`, and `svc.ns.zone` for each zone that
/// serves it), without addresses; a name nobody healthy can answer for is
/// left out (it leaves DNS and its listener closes, and comes back with its
/// endpoints).
fn service_entries(
    cfg: &AgentConfig,
    state: &MeshState,
    ns: &str,
    svc: &str,
    trust_domain: &str,
) -> Vec<Entry> {
    let mut acc = Acc::default();
    let mut zones_serving = BTreeSet::new();
    let plain_zones = state.plain_zones(ns, svc);
    for z in &plain_zones {
        // No sidecar answers there (a cluster Service a zone controller
        // exported): its zone's gateway terminates for it, with its own
        // identity, and is reached through the gateways, even from this
        // zone. A zone with no gateway registered cannot serve it.
        let ids: BTreeSet<String> = state
            .endpoints_of(SYSTEM_NAMESPACE, GATEWAY_SERVICE)
            .filter(|g| g.zone == *z)
            .map(|g| format!("spiffe://{trust_domain}/zone/{}/gateway/{}", g.zone, g.id))
            .collect();
        if !ids.is_empty() {
            acc.plain.insert(z.clone(), ids);
        }
    }
    for e in state.endpoints_of(ns, svc) {
        let plain = e.is_plain();
        // Plain endpoints count only where they are all the zone has, and
        // its gateway can answer for them.
        if plain && !acc.plain.contains_key(&e.zone) {
            continue;
        }
        zones_serving.insert(e.zone.clone());
        acc.ports
            .extend(e.ports.iter().filter_map(|p| u16::try_from(*p).ok()));
        // An endpoint of an older agent says `tcp` by default; a name it
        // does not know is left to detection.
        acc.protocols
            .insert(e.protocol.parse::<Declared>().unwrap_or_default());
        for (port, d) in e
            .labels
            .get(LABEL_PORT_PROTOCOLS)
            .into_iter()
            .flat_map(|v| v.split(','))
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(p, d)| Some((p.trim().parse::<u16>().ok()?, d.trim().parse().ok()?)))
        {
            acc.port_protocols.entry(port).or_default().insert(d);
        }
        if !plain {
            let account = e.labels.get(LABEL_ACCOUNT).unwrap_or(&e.service);
            acc.identities.insert(format!(
                "spiffe://{trust_domain}/ns/{}/sa/{account}",
                e.namespace
            ));
        }
        if !e.healthy {
            continue;
        }
        let mut local = None;
        if e.zone == cfg.zone && !plain {
            let inbound = e
                .labels
                .get(LABEL_INBOUND_PORT)
                .and_then(|p| p.parse::<u16>().ok())
                .unwrap_or(15006);
            local = resolve(&e.address, inbound);
            acc.local.extend(local);
        } else {
            acc.zones.insert(e.zone.clone());
        }
        acc.members.push(Member {
            zone: e.zone.clone(),
            local,
            labels: e.labels.clone(),
        });
    }
    // No endpoint, or plain ones whose zone has no gateway: no name.
    if acc.identities.is_empty() && acc.plain.is_empty() {
        return Vec::new();
    }
    // Every zone is reachable: through this zone's gateways, or from an
    // edge host through the gateway it dials, which relays to the others.
    let mut zones: Vec<String> = acc.zones.iter().cloned().collect();
    // The configured order; an edge host's carrier zone, unless listed, comes
    // first: it is one relay nearer than any other.
    let carrier = cfg.edge.as_ref().map(|e| e.gateway_zone.as_str());
    let rank = |z: &String| match cfg.zone_priority.iter().position(|p| p == z) {
        Some(i) => i + 1,
        None if carrier == Some(z.as_str()) => 0,
        None => usize::MAX,
    };
    zones.sort_by(|a, b| rank(a).cmp(&rank(b)).then(a.cmp(b)));
    let ports: Vec<u16> = acc.ports.iter().copied().collect();
    let mut names = vec![Entry {
        name: svc.to_string(),
        namespace: ns.to_string(),
        pinned: None,
        address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        ports: ports.clone(),
        identities: acc.identities.clone(),
        plain: acc.plain.clone(),
        local: acc.local.clone(),
        zones,
        protocol: acc.protocol(),
        port_protocols: acc.port_protocols(),
        members: acc.members.clone(),
    }];
    // One pinned name per zone that serves it.
    for z in zones_serving {
        let members: Vec<Member> = acc
            .members
            .iter()
            .filter(|m| m.zone == z)
            .cloned()
            .collect();
        let (local, zones) = if z == cfg.zone {
            // Plain endpoints of this zone are reached through its gateway.
            let via = if acc.zones.contains(&z) {
                vec![z.clone()]
            } else {
                Vec::new()
            };
            (acc.local.clone(), via)
        } else if acc.zones.contains(&z) {
            (Vec::new(), vec![z.clone()])
        } else {
            (Vec::new(), Vec::new())
        };
        names.push(Entry {
            name: svc.to_string(),
            namespace: ns.to_string(),
            pinned: Some(z),
            address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            ports: ports.clone(),
            identities: acc.identities.clone(),
            plain: acc.plain.clone(),
            local,
            zones,
            protocol: acc.protocol(),
            port_protocols: acc.port_protocols(),
            members,
        });
    }
    names.retain(|e| !e.local.is_empty() || !e.zones.is_empty());
    names
}

#[derive(Default)]
struct Acc {
    members: Vec<Member>,
    ports: BTreeSet<u16>,
    identities: BTreeSet<String>,
    plain: BTreeMap<String, BTreeSet<String>>,
    local: Vec<SocketAddr>,
    zones: BTreeSet<String>,
    protocols: BTreeSet<Declared>,
    port_protocols: BTreeMap<u16, BTreeSet<Declared>>,
}

impl Acc {
    /// The endpoints' protocol when they agree; detection when they do not.
    fn protocol(&self) -> Declared {
        agreed(&self.protocols)
    }

    /// Ports the endpoints declare otherwise.
    fn port_protocols(&self) -> BTreeMap<u16, Declared> {
        self.port_protocols
            .iter()
            .map(|(p, set)| (*p, agreed(set)))
            .collect()
    }
}

fn agreed(set: &BTreeSet<Declared>) -> Declared {
    match (set.len(), set.first()) {
        (1, Some(p)) => *p,
        _ => Declared::Detect,
    }
}

fn resolve(address: &str, port: u16) -> Option<SocketAddr> {
    address
        .parse::<IpAddr>()
        .ok()
        .map(|ip| SocketAddr::new(ip, port))
}

/// The file's `authorization` rules, typed; the configuration was checked
/// with the same parser when it was loaded.
fn config_authz(cfg: &AgentConfig) -> Vec<Authorization> {
    cfg.authorization
        .iter()
        .filter_map(|r| crate::config::check_authz_rule(r).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use trellis_federation::policy::cases;
    use trellis_federation::state::{LABEL_PLAIN, PolicyRecord};

    use super::*;

    /// An agent of zone `east` hosting `auth.shop` and `catalog.shop`.
    fn agent() -> AgentConfig {
        AgentConfig::from_toml(
            r#"
            name = "h1"
            zone = "east"
            [[services]]
            name = "auth"
            namespace = "shop"
            credentials = "/unused/auth"
            ports = [8080]
            [[services]]
            name = "catalog"
            namespace = "shop"
            credentials = "/unused/catalog"
            ports = [8081]
            "#,
        )
        .unwrap()
    }

    fn policy(kind: &str, name: &str, spec: serde_json::Value) -> PolicyRecord {
        PolicyRecord {
            kind: kind.into(),
            name: name.into(),
            spec,
        }
    }

    fn endpoint(service: &str, zone: &str, address: &str, healthy: bool) -> EndpointRecord {
        EndpointRecord {
            namespace: "shop".into(),
            service: service.into(),
            zone: zone.into(),
            id: format!("{service}-1.{zone}.internal"),
            address: address.into(),
            ports: vec![8080],
            protocol: "tcp".into(),
            labels: BTreeMap::new(),
            healthy,
            lease_seconds: 10,
            lease_expires_ms: 0,
            owner: String::new(),
        }
    }

    /// A synced state holding what it is given as it is, unvalidated: the way
    /// a document stored by an older or foreign server reaches the agent.
    fn state(endpoints: &[EndpointRecord], policies: &[PolicyRecord]) -> MeshState {
        MeshState {
            revision: 42,
            endpoints: endpoints.iter().map(|e| (e.key(), e.clone())).collect(),
            policies: policies
                .iter()
                .map(|p| (format!("{}/{}", p.kind, p.name), p.clone()))
                .collect(),
            zones: Default::default(),
            synced: true,
        }
    }

    #[test]
    fn the_agent_applies_exactly_the_authorizations_the_store_accepts() {
        let mut seen = 0;
        for c in cases::all()
            .into_iter()
            .filter(|c| c.kind == "Authorization")
        {
            let p = policy(&c.kind, &c.name, c.spec.clone());
            let stored = p.validate().is_ok();
            let authz = Authorizations::from_state(&state(&[], std::slice::from_ref(&p)));
            assert_eq!(
                stored,
                authz.skipped.is_empty(),
                "line {}: {:?}",
                c.line,
                authz.skipped
            );
            assert_eq!(authz.rules.len(), usize::from(stored), "line {}", c.line);
            seen += 1;
        }
        assert!(seen >= 10, "the table lost its Authorization cases");
    }

    #[test]
    fn the_file_and_the_store_share_the_authorization_rules() {
        let rule = |allow: &str| crate::config::AuthzRule {
            service: "auth.shop".into(),
            allow: vec!["ns:shop".into(), allow.into()],
            deny: vec![],
        };
        assert!(crate::config::check_authz_rule(&rule("ns:team-a")).is_ok());
        let err = crate::config::check_authz_rule(&rule("ns:team_a")).unwrap_err();
        assert_eq!(err.field, "allow[1]");
        assert!(err.reason.contains("neither a SPIFFE ID"), "{err}");
    }

    #[test]
    fn one_bad_document_is_skipped_and_the_rest_of_the_revision_applies() {
        let cfg = agent();
        let good = policy(
            "Authorization",
            "catalog-callers",
            json!({"service": "catalog.shop", "allow": ["ns:team-a"]}),
        );
        // The issue's document, as an older store accepted it.
        let bad = policy(
            "Authorization",
            "auth-callers",
            json!({"service": "auth.shop", "allow": ["ns:team_a"]}),
        );
        let unreadable = policy("Authorization", "nameless", json!({"allow": 3}));
        let export = policy(
            "Export",
            "x",
            json!({"service": "cart.shop", "to": ["us_east"]}),
        );
        let before = state(
            &[
                endpoint("cart", "east", "10.0.0.5", true),
                endpoint("cart", "west", "10.1.0.5", true),
            ],
            std::slice::from_ref(&good),
        );
        // The next revision: a health check failed in this zone, and the bad
        // documents arrived.
        let after = state(
            &[
                endpoint("cart", "east", "10.0.0.5", false),
                endpoint("cart", "west", "10.1.0.5", true),
            ],
            &[good, bad, unreadable, export],
        );
        let cart = |d: &Directory| d.named("cart", "shop", None).unwrap().clone();
        let was = cart(&Directory::from_state(&cfg, &before, "trellis.local"));
        assert_eq!(was.local.len(), 1);

        let dir = Directory::from_state(&cfg, &after, "trellis.local");
        // The endpoint change moved traffic: cart now goes to zone west.
        let now = cart(&dir);
        assert!(now.local.is_empty(), "{now:?}");
        assert_eq!(now.zones, ["west"]);
        // The good document applies; the bad one's service fails closed.
        assert_eq!(dir.authz.rules.len(), 1);
        assert_eq!(dir.authz.rules[0].service.to_string(), "catalog.shop");
        assert_eq!(dir.authz.rules[0].allow[0].to_string(), "ns:team-a");
        assert_eq!(
            dir.authz.closed,
            BTreeMap::from([(
                "auth.shop".to_string(),
                "Authorization/auth-callers".to_string()
            )])
        );
        // The check (what the ack carries) names each skipped document, its
        // field and its reason; Exports are the gateway's, not the agent's.
        let skipped = Authorizations::from_state(&after).skipped;
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert!(
            skipped[0].starts_with("Authorization/auth-callers: spec.allow[0]: \"ns:team_a\""),
            "{}",
            skipped[0]
        );
        assert!(skipped[0].ends_with("(calls to auth.shop are refused until it is fixed)"));
        assert!(
            skipped[1].starts_with("Authorization/nameless: spec.service: missing"),
            "{}",
            skipped[1]
        );
    }

    #[test]
    fn a_service_whose_document_cannot_be_applied_refuses_every_caller() {
        let docs = [
            // Would deny the legacy account, were it readable.
            policy(
                "Authorization",
                "auth-deny",
                json!({"service": "auth.shop", "deny": ["spiffe://trellis.local/ns/shop/sa/legacy", "ns:team_a"]}),
            ),
            policy(
                "Authorization",
                "catalog-callers",
                json!({"service": "catalog.shop", "allow": ["ns:shop"], "deny": ["spiffe://trellis.local/ns/shop/sa/legacy"]}),
            ),
        ];
        let dir = Directory::from_state(&agent(), &state(&[], &docs), "trellis.local");
        let id = |sa: &str| -> SpiffeId {
            format!("spiffe://trellis.local/ns/shop/sa/{sa}")
                .parse()
                .unwrap()
        };
        let ops: SpiffeId = "spiffe://trellis.local/ns/ops/sa/probe".parse().unwrap();
        let err = dir
            .authorize("auth.shop", &id("frontend"), None)
            .unwrap_err();
        assert!(err.contains("Authorization/auth-deny"), "{err}");
        assert!(dir.authorize("auth.shop", &id("legacy"), None).is_err());
        // The rest of the rules still apply as written.
        assert_eq!(dir.authorize("catalog.shop", &id("frontend"), None), Ok(()));
        assert_eq!(
            dir.authorize("catalog.shop", &id("legacy"), None),
            Err("deny spiffe://trellis.local/ns/shop/sa/legacy".into())
        );
        assert_eq!(
            dir.authorize("catalog.shop", &ops, None),
            Err("not in any allow list".into())
        );
        // No rule at all: open, as before.
        assert_eq!(dir.authorize("cart.shop", &ops, None), Ok(()));
    }

    #[test]
    fn request_rules_allow_by_method_and_path_and_fail_closed_for_opaque_connections() {
        let docs = [
            policy(
                "Authorization",
                "catalog-read",
                json!({"service": "catalog.shop", "allow": [{"from": ["ns:shop"], "methods": ["GET"], "paths": ["/items/*"]}]}),
            ),
            policy(
                "Authorization",
                "auth-debug",
                json!({"service": "auth.shop", "deny": [{"headers": {"x-debug": {"present": true}}}]}),
            ),
        ];
        let dir = Directory::from_state(&agent(), &state(&[], &docs), "trellis.local");
        let frontend: SpiffeId = "spiffe://trellis.local/ns/shop/sa/frontend"
            .parse()
            .unwrap();
        let ops: SpiffeId = "spiffe://trellis.local/ns/ops/sa/probe".parse().unwrap();
        let plain = http::HeaderMap::new();
        let mut debug = http::HeaderMap::new();
        debug.insert("x-debug", "1".parse().unwrap());
        let req = |method, path, headers| {
            Some(RequestFacts {
                method,
                path,
                headers,
            })
        };
        let catalog = |id: &SpiffeId, r| dir.authorize("catalog.shop", id, r);
        assert_eq!(catalog(&frontend, req("GET", "/items/7", &plain)), Ok(()));
        assert_eq!(
            catalog(&frontend, req("POST", "/items/7", &plain)),
            Err("not in any allow list".into())
        );
        assert!(catalog(&frontend, req("GET", "/admin", &plain)).is_err());
        assert!(catalog(&ops, req("GET", "/items/7", &plain)).is_err());
        // An opaque connection has no method: the allow entry does not admit it.
        assert!(catalog(&frontend, None).is_err());
        let auth = |r| dir.authorize("auth.shop", &frontend, r);
        assert_eq!(auth(req("GET", "/", &plain)), Ok(()));
        assert!(
            auth(req("GET", "/", &debug))
                .unwrap_err()
                .starts_with("deny ")
        );
        // A deny entry on headers cannot be checked on an opaque connection:
        // it refuses rather than let through what it would deny.
        assert!(auth(None).is_err());
    }

    #[test]
    fn protocols_come_from_the_endpoints_and_single_ports_can_differ() {
        let mut a = endpoint("db", "east", "10.0.0.5", true);
        a.protocol = "http".into();
        a.ports = vec![8080, 5432];
        a.labels
            .insert(LABEL_PORT_PROTOCOLS.into(), "5432=tcp".into());
        let mut b = a.clone();
        b.id = "db-2.east.internal".into();
        // Endpoints that disagree leave the port to detection.
        let mut c = endpoint("web", "east", "10.0.0.6", true);
        c.protocol = "grpc".into();
        let mut d = c.clone();
        d.id = "web-2.east.internal".into();
        d.protocol = "http".into();
        let dir = Directory::from_state(&agent(), &state(&[a, b, c, d], &[]), "trellis.local");
        let db = dir
            .entries()
            .find(|e| e.name == "db" && e.pinned.is_none())
            .unwrap();
        assert_eq!(db.protocol_of(5432), Declared::Tcp);
        assert_eq!(db.protocol_of(8080), Declared::Http);
        let web = dir
            .entries()
            .find(|e| e.name == "web" && e.pinned.is_none())
            .unwrap();
        assert_eq!(web.protocol_of(8080), Declared::Detect);

        // In the file, a port_protocols key must be one of the ports.
        let mut cfg = agent();
        cfg.services[0]
            .port_protocols
            .insert("9999".into(), Declared::Tcp);
        let e = cfg.validate().unwrap_err();
        assert_eq!(e.field, "services[0].port_protocols.9999", "{e}");
        cfg.services[0].port_protocols = [("8080".to_owned(), Declared::Grpc)].into();
        cfg.validate().unwrap();
        assert_eq!(
            cfg.services[0].port_protocols_label().as_deref(),
            Some("8080=grpc")
        );
    }

    #[test]
    fn a_plain_service_is_reached_through_its_zones_gateway_which_answers_for_it() {
        let plain = |svc: &str, zone: &str, addr: &str| {
            let mut e = endpoint(svc, zone, addr, true);
            e.labels.insert(LABEL_PLAIN.into(), "true".into());
            e
        };
        let gateway = |zone: &str, name: &str| {
            let mut g = endpoint(GATEWAY_SERVICE, zone, "10.9.0.1", true);
            g.namespace = SYSTEM_NAMESPACE.into();
            g.id = name.into();
            g
        };
        let web = endpoint("web", "east", "10.0.0.6", true);
        let (legacy, billing) = (
            plain("legacy", "east", "10.0.0.9"),
            plain("billing", "west", "10.1.0.9"),
        );
        // catalog has sidecars in east and west, and plain endpoints in west
        // (ignored: west serves it end to end) and in edge.
        let mut catalog_west = endpoint("catalog", "west", "10.1.0.5", true);
        catalog_west.id = "catalog-2.west.internal".into();
        let catalog = [
            endpoint("catalog", "east", "10.0.0.5", true),
            catalog_west,
            plain("catalog", "west", "10.1.0.7"),
            plain("catalog", "edge", "10.3.0.7"),
        ];
        let mut all = vec![legacy, billing, web];
        all.extend(catalog);
        // No gateway of their zones: nobody could answer for them.
        let cfg = agent();
        let mut b = Builder::new(&cfg, "trellis.local");
        let dir = b.update(&state(&all, &[]));
        assert!(dir.entries().any(|e| e.name == "web"));
        assert!(
            !dir.entries()
                .any(|e| e.name == "legacy" || e.name == "billing")
        );
        let c = dir.named("catalog", "shop", None).unwrap();
        assert!(c.plain.is_empty());
        assert_eq!(c.zones, ["west"]);
        // The gateways register.
        all.extend([
            gateway("east", "gw-e"),
            gateway("west", "gw-w1"),
            gateway("west", "gw-w2"),
            gateway("edge", "gw-x"),
        ]);
        let kept = b.update(&state(&all, &[]));
        let whole = Directory::from_state(&cfg, &state(&all, &[]), "trellis.local");
        let ids = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<BTreeSet<_>>();
        for dir in [&kept, &whole] {
            // A plain service admits its zone's gateways only, on routes to
            // that zone, which go through this zone's gateways, even when it
            // is this zone.
            let l = dir
                .named("legacy", "shop", None)
                .expect("legacy has a name");
            assert!(l.identities.is_empty());
            assert_eq!(
                l.plain,
                BTreeMap::from([(
                    "east".to_owned(),
                    ids(&["spiffe://trellis.local/zone/east/gateway/gw-e"])
                )])
            );
            assert!(l.local.is_empty());
            assert_eq!(l.zones, ["east"]);
            assert_eq!(l.ports, [8080]);
            let pinned = dir.named("legacy", "shop", Some("east")).unwrap();
            assert_eq!(pinned.zones, ["east"]);
            let b = dir.named("billing", "shop", None).unwrap();
            assert_eq!(
                b.plain["west"],
                ids(&[
                    "spiffe://trellis.local/zone/west/gateway/gw-w1",
                    "spiffe://trellis.local/zone/west/gateway/gw-w2",
                ])
            );
            assert_eq!(b.zones, ["west"]);
            // A service with sidecars keeps admitting its workloads only,
            // locally and in west; only edge, plain for it, admits edge's
            // gateway, and west's never.
            let c = dir.named("catalog", "shop", None).unwrap();
            assert_eq!(
                c.identities,
                ids(&["spiffe://trellis.local/ns/shop/sa/catalog"])
            );
            assert_eq!(
                c.plain,
                BTreeMap::from([(
                    "edge".to_owned(),
                    ids(&["spiffe://trellis.local/zone/edge/gateway/gw-x"])
                )])
            );
            assert_eq!(c.local, ["10.0.0.5:15006".parse().unwrap()]);
            assert_eq!(c.zones, ["edge", "west"]);
            assert!(
                !c.members
                    .iter()
                    .any(|m| m.zone == "west" && m.labels.contains_key(LABEL_PLAIN))
            );
        }
    }

    /// Endpoint `i` of service `s{svc}` in zone `zone`.
    fn nth(svc: usize, zone: &str, i: usize, healthy: bool) -> EndpointRecord {
        let mut e = endpoint(
            &format!("s{svc}"),
            zone,
            &format!("10.0.{}.{}", i / 250, i % 250 + 1),
            healthy,
        );
        e.id = format!("s{svc}-{i}.{zone}.internal");
        e
    }

    fn put(state: &mut MeshState, e: EndpointRecord) {
        state.endpoints.insert(e.key(), e);
    }

    /// Each name's content without its address, and whether the listener
    /// map agrees with the names.
    fn contents(dir: &Directory) -> Vec<Entry> {
        let mut out = Vec::new();
        for e in dir.entries() {
            for p in &e.ports {
                let at = SocketAddr::new(e.address, *p);
                assert_eq!(dir.at(at).map(Entry::label), Some(e.label()), "{at}");
            }
            out.push(Entry {
                address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                ..e.clone()
            });
        }
        assert_eq!(
            dir.listeners().len(),
            dir.entries().map(|e| e.ports.len()).sum::<usize>()
        );
        out
    }

    fn addresses(dir: &Directory) -> BTreeMap<String, IpAddr> {
        dir.entries().map(|e| (e.label(), e.address)).collect()
    }

    #[test]
    fn addresses_are_stable_distinct_and_in_the_network() {
        let cfg = agent();
        let mut st = state(&[], &[]);
        for i in 0..500 {
            put(&mut st, nth(i, "east", i, true));
        }
        let a = Directory::from_state(&cfg, &st, "trellis.local");
        // Each service and its pinned east name.
        assert_eq!(a.len(), 1000);
        let ips: HashSet<IpAddr> = a.entries().map(|e| e.address).collect();
        assert_eq!(ips.len(), 1000);
        assert!(
            a.entries()
                .all(|e| matches!(e.address, IpAddr::V4(v) if v.octets()[..2] == [127, 77]))
        );
        // The first state places names in label order, whatever order its
        // maps were filled in: a host starting on it agrees.
        assert_eq!(
            addresses(&a),
            addresses(&Directory::from_state(&cfg, &st, "trellis.local"))
        );

        // Names keep their address while they exist, whatever arrives.
        let mut b = Builder::new(&cfg, "trellis.local");
        let mut half = state(&[], &[]);
        for i in 0..250 {
            put(&mut half, nth(i, "east", i, true));
        }
        let before = addresses(&b.update(&half));
        let after = addresses(&b.update(&st));
        assert_eq!(after.len(), 1000);
        assert_eq!(after.values().collect::<HashSet<_>>().len(), 1000);
        for (name, ip) in &before {
            assert_eq!(after.get(name), Some(ip), "{name} moved");
        }

        // A name nobody healthy answers for leaves, and comes back where it was.
        let was = after["s7.shop"];
        put(&mut st, nth(7, "east", 7, false));
        let gone = b.update(&st);
        assert!(gone.named("s7", "shop", None).is_none());
        assert!(gone.at(SocketAddr::new(was, 8080)).is_none());
        put(&mut st, nth(7, "east", 7, true));
        assert_eq!(
            b.update(&st).named("s7", "shop", None).unwrap().address,
            was
        );
    }

    /// Hosts given to names, held, and configured upstreams' in the network.
    fn bookkeeping_holds(b: &Builder) {
        let store: usize = b.owned.values().map(Vec::len).sum();
        let base = network_base(b.cfg.outbound_network);
        let upstreams: HashSet<u32> = b
            .cfg
            .upstreams
            .iter()
            .filter_map(|u| match u.address {
                IpAddr::V4(a) if u32::from(a) & 0xffff_0000 == base => Some(host_of(u.address)),
                _ => None,
            })
            .collect();
        assert_eq!(b.taken.len(), store + b.held.len() + upstreams.len());
    }

    #[test]
    fn a_directory_kept_current_matches_one_built_whole() {
        let mut cfg = agent();
        cfg.zone_priority = vec!["west".into()];
        // One upstream shadows a store service, one sits in the network.
        for (name, address) in [("s1", "127.0.0.9"), ("legacy", "127.77.0.40")] {
            cfg.upstreams.push(
                toml::from_str(&format!(
                    "name = \"{name}\"\nnamespace = \"shop\"\naddress = \"{address}\"\nports = [8080]\nidentities = [\"spiffe://trellis.local/ns/shop/sa/{name}\"]\nendpoints = [\"10.9.9.9:80\"]"
                ))
                .unwrap(),
            );
        }
        cfg.validate().unwrap();
        let mut b = Builder::new(&cfg, "trellis.local");
        let mut st = state(&[], &[]);
        let mut rng = fastrand::Rng::with_seed(7);
        let zones = ["east", "west", "edge"];
        let mut was = b.dir.clone();
        for round in 0..80 {
            // A few endpoints change: added, health flipped, moved, removed,
            // some plain, some gateways.
            for _ in 0..rng.usize(1..8) {
                let (svc, zone, i) = (rng.usize(0..12), zones[rng.usize(0..3)], rng.usize(0..4));
                let mut e = nth(svc, zone, i, rng.bool());
                match rng.u8(0..10) {
                    0 => {
                        e.labels.insert(LABEL_PLAIN.into(), "true".into());
                    }
                    1 => {
                        e.namespace = SYSTEM_NAMESPACE.into();
                        e.service = GATEWAY_SERVICE.into();
                    }
                    _ => {}
                }
                if rng.u8(0..5) == 0 {
                    st.endpoints.remove(&e.key());
                    continue;
                }
                if rng.bool() {
                    e.ports = vec![8080 + rng.u32(0..3)];
                }
                put(&mut st, e);
            }
            // Now and then a service goes away whole.
            if round % 7 == 6 {
                let gone = format!("shop/s{}/", rng.usize(0..12));
                let keys: Vec<String> = st
                    .endpoints
                    .keys()
                    .filter(|k| k.starts_with(&gone))
                    .cloned()
                    .collect();
                for k in keys {
                    st.endpoints.remove(&k);
                }
            }
            if round % 10 == 9 {
                let p = policy(
                    "Authorization",
                    &format!("r{round}"),
                    json!({"service": format!("s{}.shop", round % 3), "allow": ["ns:shop"]}),
                );
                st.policies.insert(format!("Authorization/{}", p.name), p);
            }
            st.revision += 1;
            let kept = b.update(&st);
            let whole = Directory::from_state(&cfg, &st, "trellis.local");
            assert_eq!(contents(&kept), contents(&whole), "round {round}");
            assert_eq!(kept.gateways, whole.gateways, "round {round}");
            let rules = |d: &Directory| {
                d.authz
                    .rules
                    .iter()
                    .map(|r| format!("{r:?}"))
                    .collect::<Vec<_>>()
            };
            assert_eq!(rules(&kept), rules(&whole));
            assert_eq!(kept.authz.closed, whole.authz.closed);
            assert_eq!(
                kept.entries()
                    .map(|e| e.address)
                    .collect::<HashSet<_>>()
                    .len(),
                kept.len()
            );
            bookkeeping_holds(&b);
            // What the listener loop opens and closes is the difference.
            let (open, close) = kept.listener_changes(&was);
            let (now, before) = (kept.listeners(), was.listeners());
            assert_eq!(open, now.difference(&before).copied().collect::<Vec<_>>());
            assert_eq!(close, before.difference(&now).copied().collect::<Vec<_>>());
            was = kept;
        }
    }

    #[test]
    fn a_name_that_left_keeps_its_address_from_others_and_a_reload_moves_none() {
        let cfg = agent();
        let mut b = Builder::new(&cfg, "trellis.local");
        let mut st = state(&[], &[]);
        for i in 0..40 {
            put(&mut st, nth(i, "east", i, true));
        }
        let before = addresses(&b.update(&st));
        // s3 leaves; a new service whose hash lands on s3's address arrives.
        let s3 = before["s3.shop"];
        let rival = (0..)
            .map(|i| format!("c{i}"))
            .find(|n| {
                network_base(cfg.outbound_network) | hashed_host(&format!("{n}.shop"))
                    == match s3 {
                        IpAddr::V4(a) => u32::from(a),
                        IpAddr::V6(_) => unreachable!(),
                    }
            })
            .unwrap();
        let mut e = nth(3, "east", 3, true);
        st.endpoints.remove(&e.key());
        e.service = rival.clone();
        e.id = format!("{rival}-1.east.internal");
        put(&mut st, e);
        let dir = b.update(&st);
        assert!(dir.named("s3", "shop", None).is_none());
        assert_ne!(dir.named(&rival, "shop", None).unwrap().address, s3);
        bookkeeping_holds(&b);
        // s3 returns to its own address.
        put(&mut st, nth(3, "east", 3, true));
        assert_eq!(b.update(&st).named("s3", "shop", None).unwrap().address, s3);
        bookkeeping_holds(&b);

        // A reload (here: a new authorization rule) rebuilds, moving nobody.
        let now = addresses(&b.dir);
        let mut reloaded = cfg.clone();
        reloaded.authorization.push(crate::config::AuthzRule {
            service: "auth.shop".into(),
            allow: vec!["ns:shop".into()],
            deny: vec![],
        });
        let mut b = b.reconfigure(&reloaded);
        let after = b.update(&st);
        assert_eq!(addresses(&after), now);
        assert_eq!(after.authz.rules.len(), 1);
        bookkeeping_holds(&b);
    }

    #[test]
    fn a_store_name_never_takes_a_configured_upstream_address() {
        let mut cfg = agent();
        let mut st = state(&[], &[]);
        put(&mut st, nth(1, "east", 1, true));
        // Where the store's name would go.
        let would = Directory::from_state(&cfg, &st, "trellis.local")
            .named("s1", "shop", None)
            .unwrap()
            .address;
        cfg.upstreams.push(
            toml::from_str(&format!(
                "name = \"legacy\"\nnamespace = \"ops\"\naddress = \"{would}\"\nports = [8080]\nidentities = [\"spiffe://trellis.local/ns/ops/sa/legacy\"]\nendpoints = [\"10.9.9.9:80\"]"
            ))
            .unwrap(),
        );
        cfg.validate().unwrap();
        let dir = Directory::from_state(&cfg, &st, "trellis.local");
        assert_eq!(dir.at(SocketAddr::new(would, 8080)).unwrap().name, "legacy");
        assert_ne!(dir.named("s1", "shop", None).unwrap().address, would);
    }

    #[test]
    fn a_gateway_with_a_zone_port_is_reached_there() {
        let cfg = AgentConfig::from_toml(
            "name = \"h\"\nzone = \"east\"\n[[services]]\nname = \"a\"\nnamespace = \"b\"\ncredentials = \"/x\"\nports = [1]\n",
        )
        .unwrap();
        let gw = |id: &str, zone_address: Option<&str>| EndpointRecord {
            namespace: SYSTEM_NAMESPACE.into(),
            service: GATEWAY_SERVICE.into(),
            zone: "east".into(),
            id: id.into(),
            address: "10.1.0.1".into(),
            ports: vec![15443],
            protocol: "tcp".into(),
            labels: zone_address
                .map(|a| (LABEL_ZONE_ADDRESS.to_owned(), a.to_owned()))
                .into_iter()
                .collect(),
            healthy: true,
            lease_seconds: 5,
            lease_expires_ms: 0,
            owner: String::new(),
        };
        let mut state = MeshState::default();
        for g in [gw("gw1", None), gw("gw2", Some("10.1.0.2:15444"))] {
            state.endpoints.insert(g.key(), g);
        }
        let dir = Directory::from_state(&cfg, &state, "trellis.local");
        let want: Vec<SocketAddr> = vec![
            "10.1.0.1:15443".parse().unwrap(),
            "10.1.0.2:15444".parse().unwrap(),
        ];
        assert_eq!(dir.gateways, want);
    }
}
