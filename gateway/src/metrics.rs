//! Prometheus metrics of the gateway, served on the admin port.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of a tunnelled stream.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    /// `outbound` (from our zone to a peer) or `inbound` (from a peer into our zone).
    pub direction: &'static str,
    /// The other zone.
    pub peer_zone: String,
    /// `service.namespace`.
    pub service: String,
    /// `accepted` or the refusal code.
    pub outcome: &'static str,
}

/// Labels naming a peer zone and a transport.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    /// The other zone (or `unknown` before it is authenticated).
    pub peer_zone: String,
    /// `quic` or `tcp`.
    pub transport: &'static str,
}

/// Labels naming a listener's transport.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabels {
    /// `tcp` or `quic`.
    pub transport: &'static str,
}

/// Labels of a byte counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByteLabels {
    /// `outbound` or `inbound`, as for streams.
    pub direction: &'static str,
    /// `to_zone` (towards the workload side) or `from_zone`.
    pub flow: &'static str,
}

/// Every metric the gateway keeps.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Streams by direction, peer zone, service and outcome.
    pub streams: Family<StreamLabels, Counter>,
    /// Streams open now.
    pub active_streams: Gauge,
    /// Bytes spliced, counted when a stream ends.
    pub bytes: Family<ByteLabels, Counter>,
    /// Failed connections to or from peers (TLS or QUIC handshake, connect).
    pub handshake_failures: Family<PeerLabels, Counter>,
    /// Streams opened towards peers, by transport; `tcp` is the fallback.
    pub peer_streams: Family<PeerLabels, Counter>,
    /// Malformed tunnel headers and ClientHellos.
    pub protocol_errors: Counter,
    /// Connections closed on arrival because `max_handshakes` were in progress.
    pub handshakes_refused: Family<TransportLabels, Counter>,
    /// Connections dropped for not finishing their handshake in `handshake_timeout`.
    pub handshake_timeouts: Family<TransportLabels, Counter>,
    /// QUIC Initials from unvalidated addresses, answered with a Retry.
    pub quic_retries: Counter,
    /// Workload connections on the peer-facing port (with `zone_listen` set), closed.
    pub misdirected: Counter,
}

impl Metrics {
    /// Registers the metrics under `trellis_gateway_`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("trellis_gateway");
        r.register(
            "streams",
            "Tunnelled streams by direction, peer zone, service and outcome",
            self.streams.clone(),
        );
        r.register(
            "active_streams",
            "Tunnelled streams open now",
            self.active_streams.clone(),
        );
        r.register("bytes", "Bytes spliced through tunnels", self.bytes.clone());
        r.register(
            "handshake_failures",
            "Failed connections with peer gateways",
            self.handshake_failures.clone(),
        );
        r.register(
            "peer_streams",
            "Streams opened towards peer gateways by transport (tcp = fallback)",
            self.peer_streams.clone(),
        );
        r.register(
            "protocol_errors",
            "Malformed tunnel headers or ClientHellos",
            self.protocol_errors.clone(),
        );
        r.register(
            "handshakes_refused",
            "Connections closed on arrival: max_handshakes were already in progress",
            self.handshakes_refused.clone(),
        );
        r.register(
            "handshake_timeouts",
            "Connections dropped for not finishing their handshake within handshake_timeout",
            self.handshake_timeouts.clone(),
        );
        r.register(
            "quic_retries",
            "QUIC connection attempts from unvalidated addresses answered with a Retry",
            self.quic_retries.clone(),
        );
        r.register(
            "misdirected",
            "Workload connections on the peer-facing port (zone_listen set), closed",
            self.misdirected.clone(),
        );
    }

    /// Counts a stream's outcome.
    pub fn stream(
        &self,
        direction: &'static str,
        peer_zone: &str,
        service: &str,
        outcome: &'static str,
    ) {
        self.streams
            .get_or_create(&StreamLabels {
                direction,
                peer_zone: peer_zone.to_owned(),
                service: service.to_owned(),
                outcome,
            })
            .inc();
    }

    /// Counts the bytes of a finished splice.
    pub fn spliced(&self, direction: &'static str, to_zone: u64, from_zone: u64) {
        self.bytes
            .get_or_create(&ByteLabels {
                direction,
                flow: "to_zone",
            })
            .inc_by(to_zone);
        self.bytes
            .get_or_create(&ByteLabels {
                direction,
                flow: "from_zone",
            })
            .inc_by(from_zone);
    }
}
