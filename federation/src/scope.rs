//! What one proxy's watch carries: the endpoints and policies of the
//! namespaces and services it may call, not the whole mesh.
//!
//! A sidecar's copy of the registry (and what the servers send it) then
//! grows with what it calls, the way Istio's `Sidecar` egress hosts and
//! Consul's intention-scoped upstreams bound theirs. Zones and the system
//! namespace (gateways) reach every proxy: routing across zones needs them
//! and they are few. Every policy names the service it concerns
//! (`spec.service`), so a policy reaches the proxies that call it; one
//! whose service cannot be read, and every deletion (whose value is gone),
//! reaches everyone, since a proxy that misses a deletion would enforce a
//! stale rule.
//!
//! A proxy that says its zone is scoped by the `Export` documents too, the
//! way Istio's `exportTo` and Consul's exported services hide a service
//! from who may not reach it: a service's endpoints in another zone reach
//! it only if the service is exported to its zone, since the gateways
//! would refuse it there anyway. Endpoint deletions are not held back by
//! exports (one the proxy never had is a no-op to it), so an export
//! narrowing while an endpoint goes away cannot leave a stale one behind.

use std::collections::BTreeSet;
use std::fmt;

use crate::policy::Exports;
use crate::state::SYSTEM_NAMESPACE;

/// Most namespaces and services one scope may name.
pub const MAX_ENTRIES: usize = 4096;

/// The scope of one watch. No namespaces or services: every one; no zone:
/// unscoped by exports; neither: the whole mesh.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    namespaces: BTreeSet<String>,
    /// `namespace/service`.
    services: BTreeSet<String>,
    /// The zone the proxy calls from: other zones' endpoints of a service
    /// not exported to it are left out.
    zone: Option<String>,
}

/// Which watchers one change concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topic {
    /// Every watcher.
    All,
    /// Watchers of this namespace or of this `namespace/service`.
    Service {
        /// The namespace.
        namespace: String,
        /// `namespace/service`.
        key: String,
        /// For an endpoint, its zone (where exports apply).
        zone: Option<String>,
    },
}

impl Scope {
    /// The whole mesh.
    pub fn all() -> Self {
        Self::default()
    }

    /// A scope from a watch request's lists, checked: namespaces are DNS
    /// labels, services `namespace/service`. The error names the entry.
    pub fn new(
        namespaces: impl IntoIterator<Item = String>,
        services: impl IntoIterator<Item = String>,
    ) -> Result<Self, String> {
        let mut s = Self::default();
        for ns in namespaces {
            check_label(&ns).map_err(|e| format!("namespaces: {ns:?} {e}"))?;
            s.namespaces.insert(ns);
        }
        for svc in services {
            let Some((ns, name)) = svc.split_once('/') else {
                return Err(format!("services: {svc:?} is not namespace/service"));
            };
            check_label(ns).map_err(|e| format!("services: {svc:?}: namespace {e}"))?;
            check_label(name).map_err(|e| format!("services: {svc:?}: service {e}"))?;
            s.services.insert(svc);
        }
        if s.namespaces.len() + s.services.len() > MAX_ENTRIES {
            return Err(format!(
                "namespaces and services: {} in all, more than {MAX_ENTRIES}",
                s.namespaces.len() + s.services.len()
            ));
        }
        Ok(s)
    }

    /// This scope for a proxy of `zone` (see the module's docs); an
    /// empty zone leaves it unscoped by exports.
    pub fn with_zone(mut self, zone: &str) -> Result<Self, String> {
        if zone.is_empty() {
            self.zone = None;
        } else {
            check_label(zone).map_err(|e| format!("zone: {zone:?} {e}"))?;
            self.zone = Some(zone.to_string());
        }
        Ok(self)
    }

    /// The zone the proxy calls from, if it said.
    pub fn zone(&self) -> Option<&str> {
        self.zone.as_deref()
    }

    /// The `namespace/service` pairs named outside the namespaces named
    /// (a service inside a named namespace comes with its namespace).
    pub fn services_outside_namespaces(&self) -> impl Iterator<Item = &str> {
        self.services.iter().map(String::as_str).filter(|svc| {
            let ns = svc.split('/').next().unwrap_or_default();
            !self.namespaces.contains(ns)
        })
    }

    /// Whether this is the whole mesh, unfiltered.
    pub fn is_all(&self) -> bool {
        self.every_service() && self.zone.is_none()
    }

    /// Whether every namespace is in scope (exports may still filter).
    pub fn every_service(&self) -> bool {
        self.namespaces.is_empty() && self.services.is_empty()
    }

    /// The namespaces named.
    pub fn namespaces(&self) -> impl Iterator<Item = &str> {
        self.namespaces.iter().map(String::as_str)
    }

    /// The `namespace/service` pairs named.
    pub fn services(&self) -> impl Iterator<Item = &str> {
        self.services.iter().map(String::as_str)
    }

    /// Whether a change of `topic` is within this scope's namespaces and
    /// services (exports aside: see [`Scope::receives`]).
    pub fn wants(&self, topic: &Topic) -> bool {
        match topic {
            Topic::All => true,
            Topic::Service { namespace, key, .. } => {
                self.every_service()
                    || namespace == SYSTEM_NAMESPACE
                    || self.namespaces.contains(namespace)
                    || self.services.contains(key)
            }
        }
    }

    /// Whether a change of `topic` reaches this scope, given the mesh's
    /// `exports`; `deleted` for a deletion, which exports never hold back.
    pub fn receives(&self, topic: &Topic, deleted: bool, exports: &Exports) -> bool {
        self.wants(topic) && (deleted || self.exported(topic, exports))
    }

    /// Whether exports let a change of `topic` reach this scope's zone: an
    /// endpoint of another zone reaches it only if its service is exported
    /// there.
    pub fn exported(&self, topic: &Topic, exports: &Exports) -> bool {
        exported_to(self.zone.as_deref(), topic, exports)
    }

    /// [`Scope::exported`] for an endpoint by its key
    /// (`namespace/service/zone/id`), without building its topic.
    pub fn exported_endpoint(&self, key: &str, exports: &Exports) -> bool {
        let Some(mine) = self.zone.as_deref() else {
            return true;
        };
        let mut parts = key.split('/');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(ns), Some(svc), Some(theirs)) => {
                // `namespace/service` is the key's start: no key to build.
                let service_key = &key[..ns.len() + 1 + svc.len()];
                reaches(mine, theirs, exports.targets_of_key(service_key))
            }
            _ => true,
        }
    }

    /// The request fields for this scope.
    pub fn to_lists(&self) -> (Vec<String>, Vec<String>) {
        (
            self.namespaces.iter().cloned().collect(),
            self.services.iter().cloned().collect(),
        )
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_all() {
            return f.write_str("the whole mesh");
        }
        let mut first = true;
        if self.every_service() {
            f.write_str("every namespace")?;
            first = false;
        }
        for n in &self.namespaces {
            write!(f, "{}namespace {n}", if first { "" } else { ", " })?;
            first = false;
        }
        for s in &self.services {
            write!(f, "{}{s}", if first { "" } else { ", " })?;
            first = false;
        }
        if let Some(z) = &self.zone {
            write!(f, ", as exported to zone {z}")?;
        }
        Ok(())
    }
}

/// Whether exports let a change of `topic` reach a proxy of `zone` (any
/// change, for a proxy that did not say its zone).
pub fn exported_to(zone: Option<&str>, topic: &Topic, exports: &Exports) -> bool {
    match (zone, topic) {
        (
            Some(mine),
            Topic::Service {
                key,
                zone: Some(theirs),
                ..
            },
        ) => reaches(mine, theirs, exports.targets_of_key(key)),
        _ => true,
    }
}

/// The one rule: an endpoint in zone `theirs` of a service exported to
/// `targets` (zones or `*`; `None` without an `Export`) reaches a proxy of
/// zone `mine` if it is in its zone or [`admitted`] there.
pub fn reaches(mine: &str, theirs: &str, targets: Option<&[String]>) -> bool {
    theirs == mine || admitted(mine, targets)
}

/// Whether a service exported to `targets` reaches zone `mine` from
/// another zone: without an `Export` every zone does. The system namespace
/// never has targets (see `Exports`), so the gateways reach every zone.
/// (A gateway with `default_deny_exports` refuses more; the store cannot
/// know which gateways do, so it scopes by the documents alone.)
pub fn admitted(mine: &str, targets: Option<&[String]>) -> bool {
    targets.is_none_or(|to| Exports::admits(to, mine))
}

/// Which watchers a change concerns, from its kind, key and new value.
pub fn topic(kind: &str, key: &str, value: Option<&serde_json::Value>) -> Topic {
    match kind {
        // `namespace/service/zone/id`.
        "endpoint" => {
            let mut parts = key.splitn(4, '/');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(ns), Some(svc), zone) => Topic::Service {
                    namespace: ns.to_string(),
                    key: format!("{ns}/{svc}"),
                    zone: zone.map(str::to_string),
                },
                _ => Topic::All,
            }
        }
        "policy" => {
            let service = value
                .and_then(|v| v.get("spec"))
                .and_then(|s| s.get("service"))
                .and_then(|s| s.as_str())
                .and_then(|s| s.parse::<crate::policy::ServiceRef>().ok());
            match service {
                Some(s) => Topic::Service {
                    namespace: s.namespace().to_string(),
                    key: format!("{}/{}", s.namespace(), s.name()),
                    zone: None,
                },
                None => Topic::All,
            }
        }
        _ => Topic::All,
    }
}

/// The mesh's one name rule (`policy::check_label`), its reason as text.
fn check_label(s: &str) -> Result<(), String> {
    crate::policy::check_label(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn endpoints_and_policies_reach_the_scopes_that_call_them() {
        let shop = Scope::new(["shop".to_string()], ["billing/pay".to_string()]).unwrap();
        let ep = |k: &str| topic("endpoint", k, Some(&json!({})));
        assert!(shop.wants(&ep("shop/catalog/west/h1")));
        assert!(shop.wants(&ep("billing/pay/west/h1")));
        assert!(!shop.wants(&ep("billing/ledger/west/h1")));
        // Gateways and zones reach everyone.
        assert!(shop.wants(&ep("trellis-system/gateway/west/gw1")));
        assert!(shop.wants(&topic("zone", "west", Some(&json!({})))));
        let pol = |svc: &str| {
            topic(
                "policy",
                "Authorization/x",
                Some(&json!({"kind": "Authorization", "name": "x", "spec": {"service": svc}})),
            )
        };
        assert!(shop.wants(&pol("catalog.shop")));
        assert!(shop.wants(&pol("pay.billing")));
        assert!(!shop.wants(&pol("ledger.billing")));
        // A deletion has no value to read the service from: everyone.
        assert!(shop.wants(&topic("policy", "Authorization/x", None)));
        assert!(Scope::all().wants(&pol("ledger.billing")));
    }

    #[test]
    fn a_zone_receives_other_zones_endpoints_only_where_exported() {
        let ex = crate::policy::Exports::from_records(&[crate::state::PolicyRecord {
            kind: "Export".into(),
            name: "pay".into(),
            spec: json!({"service": "pay.billing", "to": ["east"]}),
        }]);
        let ep = |k: &str| topic("endpoint", k, Some(&json!({})));
        let west = Scope::new([], ["billing/pay".to_string()])
            .unwrap()
            .with_zone("west")
            .unwrap();
        assert!(west.receives(&ep("billing/pay/west/h1"), false, &ex));
        assert!(!west.receives(&ep("billing/pay/east/h1"), false, &ex));
        // A deletion passes: one the proxy never had costs it nothing.
        assert!(west.receives(&ep("billing/pay/east/h1"), true, &ex));
        let east = west.clone().with_zone("east").unwrap();
        assert!(east.receives(&ep("billing/pay/west/h1"), false, &ex));
        // Without a zone, or for a service with no Export: everything.
        let anywhere = Scope::new([], ["billing/pay".to_string()]).unwrap();
        assert!(anywhere.receives(&ep("billing/pay/east/h1"), false, &ex));
        let wide = Scope::all().with_zone("west").unwrap();
        assert!(!wide.is_all() && wide.every_service());
        assert!(wide.receives(&ep("shop/cart/east/h1"), false, &ex));
        assert!(!wide.receives(&ep("billing/pay/east/h1"), false, &ex));
        // Gateways reach everyone.
        assert!(wide.receives(&ep("trellis-system/gateway/east/g"), false, &ex));
        assert!(Scope::all().with_zone("West").is_err());
    }

    #[test]
    fn malformed_scopes_are_refused_by_entry() {
        let e = Scope::new(["Shop".to_string()], []).unwrap_err();
        assert!(e.starts_with("namespaces: \"Shop\""), "{e}");
        let e = Scope::new([], ["pay.billing".to_string()]).unwrap_err();
        assert!(e.contains("not namespace/service"), "{e}");
        let many = (0..=MAX_ENTRIES).map(|i| format!("n{i}"));
        assert!(Scope::new(many, []).unwrap_err().contains("more than"));
    }
}
