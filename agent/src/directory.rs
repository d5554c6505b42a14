//! What this host knows of the mesh, in the form the proxy and DNS use: the
//! services it can call (each with its loopback address, ports, allowed
//! identities, local endpoints and the other zones that serve it), this
//! zone's gateways, and who may call the local services.
//!
//! One directory is built from the static configuration or from the store's
//! state; the listeners, the DNS answers and the authorization all read the
//! current one, which is swapped whole when the store changes.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use trellis_federation::state::{
    GATEWAY_SERVICE, LABEL_ACCOUNT, LABEL_INBOUND_PORT, LABEL_ZONE_ADDRESS, PolicyRecord,
    SYSTEM_NAMESPACE,
};
use trellis_federation::view::MeshState;

use crate::config::{AgentConfig, AuthzRule};

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
    /// Sidecar inbound addresses of its healthy endpoints in this zone.
    pub(crate) local: Vec<SocketAddr>,
    /// Other zones with a healthy endpoint, nearest first.
    pub(crate) zones: Vec<String>,
}

impl Entry {
    /// `service.namespace`, or `service.namespace.zone` when pinned.
    pub(crate) fn label(&self) -> String {
        match &self.pinned {
            Some(z) => format!("{}.{}.{z}", self.name, self.namespace),
            None => format!("{}.{}", self.name, self.namespace),
        }
    }
}

/// The whole view at one moment.
#[derive(Debug, Clone, Default)]
pub(crate) struct Directory {
    pub(crate) entries: Vec<Entry>,
    /// This zone's gateways (TCP, SNI passthrough).
    pub(crate) gateways: Vec<SocketAddr>,
    /// Who may call the local services.
    pub(crate) authz: Vec<AuthzRule>,
}

impl Directory {
    /// The entry listening on `addr`.
    pub(crate) fn at(&self, addr: IpAddr) -> Option<&Entry> {
        self.entries.iter().find(|e| e.address == addr)
    }

    /// The entry for a DNS name's labels.
    pub(crate) fn named(
        &self,
        service: &str,
        namespace: &str,
        zone: Option<&str>,
    ) -> Option<&Entry> {
        self.entries
            .iter()
            .find(|e| e.name == service && e.namespace == namespace && e.pinned.as_deref() == zone)
    }

    /// Every (address, port) something should listen on.
    pub(crate) fn listeners(&self) -> BTreeSet<SocketAddr> {
        self.entries
            .iter()
            .flat_map(|e| e.ports.iter().map(|p| SocketAddr::new(e.address, *p)))
            .collect()
    }

    /// From the static configuration (`upstreams`, `gateway`, `authorization`).
    pub(crate) fn from_config(cfg: &AgentConfig) -> Self {
        let entries = cfg
            .upstreams
            .iter()
            .map(|u| Entry {
                name: u.name.clone(),
                namespace: u.namespace.clone(),
                pinned: None,
                address: u.address,
                ports: u.ports.clone(),
                identities: u.identities.iter().cloned().collect(),
                local: u.endpoints.clone(),
                zones: u.zones.clone(),
            })
            .collect();
        Self {
            entries,
            gateways: cfg.gateway.into_iter().collect(),
            authz: cfg.authorization.clone(),
        }
    }

    /// From the store's state, for an agent of `cfg.zone`. Errors name what
    /// in the state cannot be used; the agent then keeps its previous view.
    pub(crate) fn from_state(
        cfg: &AgentConfig,
        state: &MeshState,
        trust_domain: &str,
    ) -> Result<Self, String> {
        let mut services: BTreeMap<(String, String), Acc> = BTreeMap::new();
        let mut gateways: Vec<SocketAddr> = cfg.gateway.into_iter().collect();
        for e in state.endpoints.values() {
            if e.namespace == SYSTEM_NAMESPACE {
                if e.service == GATEWAY_SERVICE && e.zone == cfg.zone && e.healthy {
                    // A gateway with a port for its zone refuses workloads
                    // on its tunnel port.
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
                continue;
            }
            let acc = services
                .entry((e.service.clone(), e.namespace.clone()))
                .or_default();
            acc.ports
                .extend(e.ports.iter().filter_map(|p| u16::try_from(*p).ok()));
            let account = e.labels.get(LABEL_ACCOUNT).unwrap_or(&e.service);
            acc.identities.insert(format!(
                "spiffe://{trust_domain}/ns/{}/sa/{account}",
                e.namespace
            ));
            if !e.healthy {
                continue;
            }
            if e.zone == cfg.zone {
                let inbound = e
                    .labels
                    .get(LABEL_INBOUND_PORT)
                    .and_then(|p| p.parse::<u16>().ok())
                    .unwrap_or(15006);
                acc.local.extend(resolve(&e.address, inbound));
            } else {
                acc.zones.insert(e.zone.clone());
            }
        }
        let reachable = |z: &str| match &cfg.edge {
            // An edge host reaches only the zone of the gateway it dials.
            Some(edge) => edge.gateway_zone == z,
            None => true,
        };
        let order = |zones: &BTreeSet<String>| -> Vec<String> {
            let mut v: Vec<String> = zones.iter().filter(|z| reachable(z)).cloned().collect();
            let rank = |z: &String| {
                cfg.zone_priority
                    .iter()
                    .position(|p| p == z)
                    .unwrap_or(usize::MAX)
            };
            v.sort_by(|a, b| rank(a).cmp(&rank(b)).then(a.cmp(b)));
            v
        };
        let mut names = Vec::new();
        for ((svc, ns), acc) in &services {
            let mut ports: Vec<u16> = acc.ports.iter().copied().collect();
            ports.sort_unstable();
            names.push(Entry {
                name: svc.clone(),
                namespace: ns.clone(),
                pinned: None,
                address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                ports: ports.clone(),
                identities: acc.identities.clone(),
                local: acc.local.clone(),
                zones: order(&acc.zones),
            });
            // One pinned name per zone that serves it.
            for z in state
                .endpoints_of(ns, svc)
                .map(|e| e.zone.clone())
                .collect::<BTreeSet<_>>()
            {
                let (local, zones) = if z == cfg.zone {
                    (acc.local.clone(), Vec::new())
                } else if acc.zones.contains(&z) && reachable(&z) {
                    (Vec::new(), vec![z.clone()])
                } else {
                    (Vec::new(), Vec::new())
                };
                names.push(Entry {
                    name: svc.clone(),
                    namespace: ns.clone(),
                    pinned: Some(z),
                    address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    ports: ports.clone(),
                    identities: acc.identities.clone(),
                    local,
                    zones,
                });
            }
        }
        // A name nobody healthy can answer for leaves DNS and its listener
        // closes; it comes back, at the same address, with its endpoints.
        names.retain(|e| !e.local.is_empty() || !e.zones.is_empty());
        assign_addresses(&mut names, cfg.outbound_network);
        // Configured upstreams keep their configured addresses, and win over
        // the store's entry of the same name.
        let fixed = Self::from_config(cfg).entries;
        names.retain(|e| {
            e.pinned.is_some()
                || !fixed
                    .iter()
                    .any(|f| f.name == e.name && f.namespace == e.namespace)
        });
        names.extend(fixed);
        let mut authz = cfg.authorization.clone();
        authz.extend(store_authz(state)?);
        Ok(Self {
            entries: names,
            gateways,
            authz,
        })
    }
}

/// The store's `Authorization` policies as rules: the only part of the
/// state the agent can refuse, so also its check before applying a revision.
pub(crate) fn store_authz(state: &MeshState) -> Result<Vec<AuthzRule>, String> {
    state
        .policies_of("Authorization")
        .map(authz_from_policy)
        .collect()
}

#[derive(Default)]
struct Acc {
    ports: BTreeSet<u16>,
    identities: BTreeSet<String>,
    local: Vec<SocketAddr>,
    zones: BTreeSet<String>,
}

fn resolve(address: &str, port: u16) -> Option<SocketAddr> {
    address
        .parse::<IpAddr>()
        .ok()
        .map(|ip| SocketAddr::new(ip, port))
}

/// Gives every entry a stable address in `net` (a /16 of 127.0.0.0/8): a
/// hash of its name picks the address, so the same service gets the same
/// address on every host and across restarts; a collision moves the later
/// name (in name order) to the next free address.
fn assign_addresses(entries: &mut [Entry], net: Ipv4Addr) {
    let base = u32::from(net) & 0xffff_0000;
    let mut taken = HashSet::new();
    entries.sort_by_key(Entry::label);
    for e in entries.iter_mut() {
        let d = ring::digest::digest(&ring::digest::SHA256, e.label().as_bytes());
        let mut host = u32::from(u16::from_be_bytes([d.as_ref()[0], d.as_ref()[1]]));
        // Skip .0.0, .0.1 (often the host itself) and .255.255.
        loop {
            host = host.clamp(2, 0xfffe);
            if taken.insert(host) {
                break;
            }
            host = if host >= 0xfffe { 2 } else { host + 1 };
        }
        e.address = IpAddr::V4(Ipv4Addr::from(base | host));
    }
}

/// The `Authorization` policy, as the agent enforces it:
///
/// ```yaml
/// kind: Authorization
/// metadata: { name: catalog-callers }
/// spec:
///   service: catalog.shop          # the callee, service.namespace
///   allow: [ "ns:shop", "spiffe://trellis.local/ns/ops/sa/probe" ]
///   deny:  [ "spiffe://trellis.local/ns/shop/sa/legacy" ]
/// ```
pub(crate) fn authz_from_policy(p: &PolicyRecord) -> Result<AuthzRule, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Spec {
        service: String,
        #[serde(default)]
        allow: Vec<String>,
        #[serde(default)]
        deny: Vec<String>,
    }
    let spec: Spec = serde_json::from_value(p.spec.clone())
        .map_err(|e| format!("Authorization/{}: spec: {e}", p.name))?;
    let rule = AuthzRule {
        service: spec.service,
        allow: spec.allow,
        deny: spec.deny,
    };
    crate::config::check_authz_rule(&rule).map_err(|e| format!("Authorization/{}: {e}", p.name))?;
    Ok(rule)
}

#[cfg(test)]
mod tests {
    use trellis_federation::state::EndpointRecord;

    use super::*;

    fn entry(name: &str) -> Entry {
        Entry {
            name: name.into(),
            namespace: "shop".into(),
            pinned: None,
            address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            ports: vec![8080],
            identities: BTreeSet::new(),
            local: vec![],
            zones: vec![],
        }
    }

    #[test]
    fn addresses_are_stable_distinct_and_in_the_network() {
        let net = Ipv4Addr::new(127, 77, 0, 0);
        let mut a: Vec<Entry> = (0..500).map(|i| entry(&format!("s{i}"))).collect();
        assign_addresses(&mut a, net);
        let ips: HashSet<IpAddr> = a.iter().map(|e| e.address).collect();
        assert_eq!(ips.len(), 500);
        assert!(
            a.iter()
                .all(|e| matches!(e.address, IpAddr::V4(v) if v.octets()[..2] == [127, 77]))
        );
        // Another host that lists the same services in another order agrees.
        let mut b: Vec<Entry> = (0..500).rev().map(|i| entry(&format!("s{i}"))).collect();
        assign_addresses(&mut b, net);
        for e in &b {
            let same = a.iter().find(|x| x.name == e.name).unwrap();
            assert_eq!(same.address, e.address, "{}", e.name);
        }
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
        };
        let mut state = MeshState::default();
        for g in [gw("gw1", None), gw("gw2", Some("10.1.0.2:15444"))] {
            state.endpoints.insert(format!("x/{}", g.id), g);
        }
        let dir = Directory::from_state(&cfg, &state, "trellis.local").unwrap();
        let want: Vec<SocketAddr> = vec![
            "10.1.0.1:15443".parse().unwrap(),
            "10.1.0.2:15444".parse().unwrap(),
        ];
        assert_eq!(dir.gateways, want);
    }
}
