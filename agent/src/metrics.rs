//! Prometheus metrics of the agent, served on its admin port.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of a proxied connection.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ConnLabels {
    /// `service.namespace`.
    pub(crate) service: String,
    /// What became of it.
    pub(crate) outcome: &'static str,
}

/// Labels of a per-service count.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ServiceLabels {
    /// `service.namespace`.
    pub(crate) service: String,
}

/// Labels of a DNS query.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DnsLabels {
    /// `answered`, `nxdomain`, `forwarded`, `forward_failed`, `refused`, `malformed`,
    /// `forward_shed` (past `dns_max_forwarded`) or `truncated` (also `answered`:
    /// a UDP answer too large for the client, sent empty with TC).
    pub(crate) result: &'static str,
}

/// Every metric the agent keeps.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) inbound: Family<ConnLabels, Counter>,
    pub(crate) outbound: Family<ConnLabels, Counter>,
    pub(crate) dns: Family<DnsLabels, Counter>,
    pub(crate) retries: Family<ServiceLabels, Counter>,
    pub(crate) ejections: Family<ServiceLabels, Counter>,
    /// The store revision of the mesh view in use (0: static configuration).
    pub(crate) mesh_revision: Gauge,
    /// Mesh services this host has outbound listeners for.
    pub(crate) mesh_names: Gauge,
}

impl Metrics {
    pub(crate) fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("trellis_agent");
        r.register(
            "inbound_connections",
            "Inbound calls by local service and outcome (accepted, denied, not_served, unhealthy, app_unreachable, handshake_failed): one per stream of a pooled connection (an app connection or an HTTP request), one per connection from callers without the pooled protocol",
            self.inbound.clone(),
        );
        r.register(
            "outbound_connections",
            "Outbound calls by upstream service and route (local, gateway, edge), or why none was made (no_route, refused, rate_limited, overflow): one per opaque app connection and one per HTTP request",
            self.outbound.clone(),
        );
        r.register(
            "retries",
            "Retries of outbound requests by upstream service, within the retry budget",
            self.retries.clone(),
        );
        r.register(
            "outlier_ejections",
            "Targets (endpoints of this zone, or other zones) ejected by outlier detection, by upstream service",
            self.ejections.clone(),
        );
        r.register("dns_queries", "DNS queries by result", self.dns.clone());
        r.register(
            "mesh_revision",
            "Store revision of the mesh view the agent applied (0 without a store)",
            self.mesh_revision.clone(),
        );
        r.register(
            "mesh_names",
            "Mesh names (services, and services pinned to a zone) the agent listens for",
            self.mesh_names.clone(),
        );
    }

    pub(crate) fn inbound(&self, service: &str, outcome: &'static str) {
        self.inbound
            .get_or_create(&ConnLabels {
                service: service.to_owned(),
                outcome,
            })
            .inc();
    }

    pub(crate) fn outbound(&self, service: &str, outcome: &'static str) {
        self.outbound
            .get_or_create(&ConnLabels {
                service: service.to_owned(),
                outcome,
            })
            .inc();
    }

    pub(crate) fn retry(&self, service: &str) {
        self.retries
            .get_or_create(&ServiceLabels {
                service: service.to_owned(),
            })
            .inc();
    }

    pub(crate) fn ejected(&self, service: &str) {
        self.ejections
            .get_or_create(&ServiceLabels {
                service: service.to_owned(),
            })
            .inc();
    }

    pub(crate) fn dns(&self, result: &'static str) {
        self.dns.get_or_create(&DnsLabels { result }).inc();
    }
}
