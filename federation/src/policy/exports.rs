//! The `Export` documents of the mesh as one table: which zones may reach
//! each service through the gateways. The gateways enforce it when a stream
//! opens; the servers scope what they send a proxy that says its zone by
//! it, so such a proxy is not sent the endpoints of a zone it may not
//! reach (see `crate::scope`).
//!
//! The system namespace (the gateways themselves) is exported to every
//! zone whatever a document says: routing across zones needs every zone's
//! gateways, and an `Export` that hid them would cut a zone off.

use std::collections::HashMap;

use super::Policy;
use crate::state::{PolicyRecord, SYSTEM_NAMESPACE};

/// Every `Export`, parsed with the store's own parser.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exports {
    /// Zones (or `*`) by `namespace/service`, sorted. A service without an
    /// entry has no `Export`.
    to: HashMap<String, Vec<String>>,
    /// The documents that could not be applied, one reason each.
    pub skipped: Vec<String>,
}

impl Exports {
    /// The table of `records` (the `Export` ones; others are ignored). One
    /// that cannot be applied is left out and reported, and the rest apply.
    pub fn from_records<'a>(records: impl IntoIterator<Item = &'a PolicyRecord>) -> Self {
        let mut out = Self::default();
        for p in records.into_iter().filter(|p| p.kind == "Export") {
            match p.parse() {
                Ok(Policy::Export(e)) => out
                    .to
                    .entry(key(e.service.namespace(), e.service.name()))
                    .or_default()
                    .extend(e.to.iter().map(ToString::to_string)),
                Ok(_) => out
                    .skipped
                    .push(format!("Export/{}: kind: not read as an Export", p.name)),
                Err(e) => {
                    // Fail closed: skipping the document would leave the
                    // service without an Export, which exports it to every
                    // zone. The service it names (if readable) gets an entry
                    // that admits no zone, beyond what its other Exports
                    // admit; but never the gateways (an older store may hold
                    // such a document: it is refused now), which every zone
                    // needs.
                    if let Some((svc, ns)) = e.service.as_deref().and_then(|s| s.split_once('.'))
                        && ns != SYSTEM_NAMESPACE
                    {
                        out.to.entry(key(ns, svc)).or_default();
                    }
                    out.skipped.push(e.to_string());
                }
            }
        }
        // One order whatever the documents' order, so `changed` compares
        // what they say.
        for to in out.to.values_mut() {
            to.sort();
            to.dedup();
        }
        out
    }

    /// [`Exports::targets`] by `namespace/service`, the key a watch hub has
    /// at hand.
    pub fn targets_of_key(&self, key: &str) -> Option<&[String]> {
        self.to.get(key).map(Vec::as_slice)
    }

    /// Whether export targets `to` (zones, or `*`) admit `zone`.
    pub fn admits(to: &[String], zone: &str) -> bool {
        // `*` is ExportTarget::Any as the table spells it.
        to.iter().any(|z| z == zone || z == "*")
    }

    /// The zones (or `*`) a service is exported to; `None` without an
    /// `Export`.
    pub fn targets(&self, namespace: &str, service: &str) -> Option<&[String]> {
        // A lookup builds the key: skip it when the mesh has no Export at
        // all (the common case).
        if self.to.is_empty() {
            return None;
        }
        self.targets_of_key(&key(namespace, service))
    }

    /// The services, as (namespace, service), whose entry differs between
    /// `self` and `other`.
    pub fn changed<'a>(&'a self, other: &'a Self) -> Vec<(&'a str, &'a str)> {
        self.to
            .iter()
            .filter(|(k, v)| other.to.get(*k) != Some(*v))
            .map(|(k, _)| k)
            .chain(other.to.keys().filter(|k| !self.to.contains_key(*k)))
            .filter_map(|k| k.split_once('/'))
            .collect()
    }
}

/// The table's key of a service.
fn key(namespace: &str, service: &str) -> String {
    format!("{namespace}/{service}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn export(name: &str, spec: serde_json::Value) -> PolicyRecord {
        PolicyRecord {
            kind: "Export".into(),
            name: name.into(),
            spec,
        }
    }

    #[test]
    fn exports_say_which_zones_reach_a_service_and_fail_closed() {
        let a = Exports::from_records(&[
            export("c", json!({"service": "catalog.shop", "to": ["east"]})),
            export("c2", json!({"service": "catalog.shop", "to": ["edge"]})),
            export("p", json!({"service": "pay.billing", "to": ["*"]})),
            export(
                "bad",
                json!({"service": "ledger.billing", "to": ["us_east"]}),
            ),
            export(
                "gw",
                json!({"service": "gateway.trellis-system", "to": ["east"]}),
            ),
        ]);
        // Through the one rule, from another zone.
        let reaches =
            |ns: &str, svc: &str, zone: &str| crate::scope::admitted(zone, a.targets(ns, svc));
        assert!(reaches("shop", "catalog", "east"));
        assert!(reaches("shop", "catalog", "edge"));
        assert!(!reaches("shop", "catalog", "west"));
        assert!(reaches("billing", "pay", "west"));
        // No Export: every zone. An unusable one: none.
        assert!(reaches("shop", "cart", "west"));
        assert!(!reaches("billing", "ledger", "east"));
        // The gateways reach every zone, whatever a document says.
        assert!(reaches("trellis-system", "gateway", "west"));
        assert_eq!(a.skipped.len(), 2, "{:?}", a.skipped);
        assert!(
            a.skipped[1].contains("exported to every zone"),
            "{:?}",
            a.skipped
        );

        let b = Exports::from_records(&[
            export(
                "c",
                json!({"service": "catalog.shop", "to": ["east", "edge"]}),
            ),
            export("p", json!({"service": "pay.billing", "to": ["west"]})),
            export("k", json!({"service": "cart.shop", "to": ["west"]})),
        ]);
        let mut changed = a.changed(&b);
        changed.sort();
        let names: Vec<String> = changed.iter().map(|(n, s)| format!("{s}.{n}")).collect();
        // catalog's two documents are one entry, the same in both.
        assert_eq!(names, ["ledger.billing", "pay.billing", "cart.shop"]);
    }
}
