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

use std::collections::BTreeSet;
use std::fmt;

use crate::state::SYSTEM_NAMESPACE;

/// Most namespaces and services one scope may name.
pub const MAX_ENTRIES: usize = 4096;

/// The scope of one watch. Empty: the whole mesh.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    namespaces: BTreeSet<String>,
    /// `namespace/service`.
    services: BTreeSet<String>,
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

    /// The `namespace/service` pairs named outside the namespaces named
    /// (a service inside a named namespace comes with its namespace).
    pub fn services_outside_namespaces(&self) -> impl Iterator<Item = &str> {
        self.services.iter().map(String::as_str).filter(|svc| {
            let ns = svc.split('/').next().unwrap_or_default();
            !self.namespaces.contains(ns)
        })
    }

    /// Whether this is the whole mesh.
    pub fn is_all(&self) -> bool {
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

    /// Whether a change of `topic` reaches this scope.
    pub fn wants(&self, topic: &Topic) -> bool {
        match topic {
            Topic::All => true,
            Topic::Service { namespace, key } => {
                self.is_all()
                    || namespace == SYSTEM_NAMESPACE
                    || self.namespaces.contains(namespace)
                    || self.services.contains(key)
            }
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
        for n in &self.namespaces {
            write!(f, "{}namespace {n}", if first { "" } else { ", " })?;
            first = false;
        }
        for s in &self.services {
            write!(f, "{}{s}", if first { "" } else { ", " })?;
            first = false;
        }
        Ok(())
    }
}

/// Which watchers a change concerns, from its kind, key and new value.
pub fn topic(kind: &str, key: &str, value: Option<&serde_json::Value>) -> Topic {
    match kind {
        // `namespace/service/zone/id`.
        "endpoint" => {
            let mut parts = key.splitn(3, '/');
            match (parts.next(), parts.next()) {
                (Some(ns), Some(svc)) => Topic::Service {
                    namespace: ns.to_string(),
                    key: format!("{ns}/{svc}"),
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
    fn malformed_scopes_are_refused_by_entry() {
        let e = Scope::new(["Shop".to_string()], []).unwrap_err();
        assert!(e.starts_with("namespaces: \"Shop\""), "{e}");
        let e = Scope::new([], ["pay.billing".to_string()]).unwrap_err();
        assert!(e.contains("not namespace/service"), "{e}");
        let many = (0..=MAX_ENTRIES).map(|i| format!("n{i}"));
        assert!(Scope::new(many, []).unwrap_err().contains("more than"));
    }
}
