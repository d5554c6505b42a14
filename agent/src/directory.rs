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
use std::sync::Arc;

use trellis_ca::SpiffeId;
use trellis_federation::policy::{Authorization, Policy, RequestFacts};
use trellis_federation::state::{
    GATEWAY_SERVICE, LABEL_ACCOUNT, LABEL_INBOUND_PORT, LABEL_PLAIN, LABEL_PORT_PROTOCOLS,
    LABEL_ZONE_ADDRESS, PolicyRecord, SYSTEM_NAMESPACE,
};
use trellis_federation::view::MeshState;
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

/// The whole view at one moment.
#[derive(Debug, Clone, Default)]
pub(crate) struct Directory {
    pub(crate) entries: Vec<Entry>,
    /// This zone's gateways (TCP, SNI passthrough).
    pub(crate) gateways: Vec<SocketAddr>,
    /// Who may call the local services.
    pub(crate) authz: Vec<Authorization>,
    /// Services (`name.namespace`) whose store `Authorization` could not be
    /// applied, with that document (`Authorization/name`): they refuse every
    /// caller until it is fixed (see [`store_authz`]).
    pub(crate) closed: BTreeMap<String, String>,
    /// Traffic policy by destination service.
    pub(crate) traffic: Arc<Policies>,
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
        if let Some(doc) = self.closed.get(service) {
            return Err(format!(
                "{doc} cannot be applied (see `trellis status`); failing closed"
            ));
        }
        let (name, namespace) = service.split_once('.').unwrap_or((service, ""));
        let rules = || {
            self.authz
                .iter()
                .filter(|r| r.service.name() == name && r.service.namespace() == namespace)
        };
        if let Some(d) = rules()
            .flat_map(|r| &r.deny)
            .find(|d| d.matches(caller, request, true))
        {
            return Err(format!("deny {d}"));
        }
        let mut allows = rules().filter(|r| !r.allow.is_empty()).peekable();
        if allows.peek().is_some()
            && !allows.any(|r| r.allow.iter().any(|a| a.matches(caller, request, false)))
        {
            return Err("not in any allow list".into());
        }
        Ok(())
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
            .collect();
        Self {
            entries,
            gateways: cfg.gateway.into_iter().collect(),
            authz: config_authz(cfg),
            closed: BTreeMap::new(),
            traffic: Arc::default(),
        }
    }

    /// From the store's state, for an agent of `cfg.zone`. A policy document
    /// that cannot be applied is left out (see [`store_authz`]); everything
    /// else applies.
    pub(crate) fn from_state(cfg: &AgentConfig, state: &MeshState, trust_domain: &str) -> Self {
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
            // No sidecar answers mTLS there (a cluster Service a zone
            // controller exported): the sidecar does not route to it yet.
            if e.labels.get(LABEL_PLAIN).is_some_and(|v| v == "true") {
                continue;
            }
            let acc = services
                .entry((e.service.clone(), e.namespace.clone()))
                .or_default();
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
            let account = e.labels.get(LABEL_ACCOUNT).unwrap_or(&e.service);
            acc.identities.insert(format!(
                "spiffe://{trust_domain}/ns/{}/sa/{account}",
                e.namespace
            ));
            if !e.healthy {
                continue;
            }
            let mut local = None;
            if e.zone == cfg.zone {
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
                protocol: acc.protocol(),
                port_protocols: acc.port_protocols(),
                members: acc
                    .members
                    .iter()
                    .filter(|m| m.zone == cfg.zone || reachable(&m.zone))
                    .cloned()
                    .collect(),
            });
            // One pinned name per zone that serves it.
            for z in state
                .endpoints_of(ns, svc)
                .map(|e| e.zone.clone())
                .collect::<BTreeSet<_>>()
            {
                let members: Vec<Member> = acc
                    .members
                    .iter()
                    .filter(|m| m.zone == z)
                    .cloned()
                    .collect();
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
                    protocol: acc.protocol(),
                    port_protocols: acc.port_protocols(),
                    members,
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
        let store = store_authz(state);
        let mut authz = config_authz(cfg);
        authz.extend(store.rules);
        Self {
            entries: names,
            gateways,
            authz,
            closed: store.closed,
            traffic: Arc::new(Policies::from_state(state)),
        }
    }
}

/// The store's `Authorization` policies as the agent enforces them.
#[derive(Debug, Default)]
pub(crate) struct StoreAuthz {
    /// One rule per document that parsed.
    pub(crate) rules: Vec<Authorization>,
    /// Services whose document did not, with the document.
    pub(crate) closed: BTreeMap<String, String>,
    /// Why each document that did not parse was left out, for the ack.
    pub(crate) skipped: Vec<String>,
}

/// Reads the store's `Authorization` policies with the store's own parser
/// (the only part of the state an agent can fail to apply, so also its check
/// before applying a revision). A document that does not parse (stored by an
/// older or foreign server) is left out and reported, and the rest of the
/// revision applies, so endpoint and health changes keep moving traffic.
///
/// Left out must not mean open: the document may have been a deny. So the
/// service it names, when its `spec.service` is a string, fails closed and
/// refuses every caller until the document is fixed or deleted. A document
/// whose service cannot be read is only reported: it cannot be tied to a
/// service, and closing every local service for it would turn one bad
/// document into an outage of the host.
pub(crate) fn store_authz(state: &MeshState) -> StoreAuthz {
    let mut out = StoreAuthz::default();
    for p in state.policies_of("Authorization") {
        match authz_from_policy(p) {
            Ok(rule) => out.rules.push(rule),
            Err(e) => match e.service.clone() {
                Some(service) => {
                    out.skipped.push(format!(
                        "{e} (calls to {service} are refused until it is fixed)"
                    ));
                    out.closed.insert(service, e.document);
                }
                None => out.skipped.push(e.to_string()),
            },
        }
    }
    out
}

#[derive(Default)]
struct Acc {
    members: Vec<Member>,
    ports: BTreeSet<u16>,
    identities: BTreeSet<String>,
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

/// One `Authorization` document as a rule (see
/// [`trellis_federation::policy::Authorization`]).
pub(crate) fn authz_from_policy(
    p: &PolicyRecord,
) -> Result<Authorization, trellis_federation::policy::PolicyError> {
    match p.parse()? {
        Policy::Authorization(a) => Ok(a),
        _ => Err(trellis_federation::policy::PolicyError {
            document: format!("{}/{}", p.kind, p.name),
            field: "kind".into(),
            reason: "is not Authorization".into(),
            service: None,
        }),
    }
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
    use trellis_federation::state::EndpointRecord;

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
            let authz = store_authz(&state(&[], std::slice::from_ref(&p)));
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
        assert_eq!(dir.authz.len(), 1);
        assert_eq!(dir.authz[0].service.to_string(), "catalog.shop");
        assert_eq!(dir.authz[0].allow[0].to_string(), "ns:team-a");
        assert_eq!(
            dir.closed,
            BTreeMap::from([(
                "auth.shop".to_string(),
                "Authorization/auth-callers".to_string()
            )])
        );
        // The check (what the ack carries) names each skipped document, its
        // field and its reason; Exports are the gateway's, not the agent's.
        let skipped = store_authz(&after).skipped;
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
            .entries
            .iter()
            .find(|e| e.name == "db" && e.pinned.is_none())
            .unwrap();
        assert_eq!(db.protocol_of(5432), Declared::Tcp);
        assert_eq!(db.protocol_of(8080), Declared::Http);
        let web = dir
            .entries
            .iter()
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
    fn a_plain_endpoint_gets_no_entry() {
        let mut plain = endpoint("legacy", "east", "10.0.0.9", true);
        plain.labels.insert(LABEL_PLAIN.into(), "true".into());
        let web = endpoint("web", "east", "10.0.0.6", true);
        let dir = Directory::from_state(&agent(), &state(&[plain, web], &[]), "trellis.local");
        assert!(dir.entries.iter().any(|e| e.name == "web"));
        assert!(!dir.entries.iter().any(|e| e.name == "legacy"));
    }

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
            protocol: Declared::Detect,
            port_protocols: BTreeMap::new(),
            members: vec![],
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
            owner: String::new(),
        };
        let mut state = MeshState::default();
        for g in [gw("gw1", None), gw("gw2", Some("10.1.0.2:15444"))] {
            state.endpoints.insert(format!("x/{}", g.id), g);
        }
        let dir = Directory::from_state(&cfg, &state, "trellis.local");
        let want: Vec<SocketAddr> = vec![
            "10.1.0.1:15443".parse().unwrap(),
            "10.1.0.2:15444".parse().unwrap(),
        ];
        assert_eq!(dir.gateways, want);
    }
}
