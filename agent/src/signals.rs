//! Golden signals of this host's sidecar: every finished request and
//! opaque connection, at both ends (outbound as `source`, inbound as
//! `destination`), summed per edge and sent to a server of the zone every
//! interval (see `trellis_federation::telemetry`).
//!
//! An edge is who called which service, in which zones, answered by which
//! workload, by which route; per edge the sidecar keeps counts, errors
//! ([`telemetry::is_error`]) and a latency sketch. On the data path that
//! costs one short lock and a hash of the edge's labels: a known edge
//! allocates nothing, and the map is bounded ([`MAX_EDGES`]; past it
//! requests are counted as dropped and the count is reported).

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use trellis_federation::proto;
use trellis_federation::telemetry::{self, Summary};
use trellis_proxy::metrics::{ConnRecord, Detail, Observer, Peers, RequestRecord};

/// Most distinct edges one sidecar holds: with sketches of a few hundred
/// bytes to 4 KiB, at most ~4 MiB, usually well under one.
pub(crate) const MAX_EDGES: usize = 1024;

/// The route of a request no route rule named.
pub(crate) const DEFAULT_ROUTE: &str = "default";

/// Reports an edge with no traffic stays in memory for before it is
/// forgotten (so a steady edge never allocates again).
const IDLE_REPORTS: u32 = 30;

/// The summaries since the last report.
pub(crate) struct Signals {
    /// This proxy's SPIFFE ID, named in each report.
    proxy: String,
    hasher: std::hash::RandomState,
    edges: Mutex<Edges>,
}

struct Edges {
    /// Edges by the hash of their labels (collisions share a bucket).
    by_hash: HashMap<u64, Vec<Edge>>,
    len: usize,
    /// When the summaries started: the last report taken.
    since: Instant,
    /// Requests and connections not summarised since then.
    dropped: u64,
}

struct Edge {
    key: proto::EdgeKey,
    sum: Summary,
    idle: u32,
}

/// An edge's labels, borrowed from what the proxy hands the observer.
type Labels<'a> = (
    &'a str,
    &'a str,
    &'a str,
    &'a str,
    &'a str,
    &'a str,
    &'a str,
    &'a str,
    &'a str,
);

fn labels<'a>(p: &'a Peers, route: &'a str) -> Labels<'a> {
    (
        p.reporter,
        &p.source_workload,
        &p.source_workload_namespace,
        &p.source_zone,
        &p.destination_service_name,
        &p.destination_service_namespace,
        &p.destination_zone,
        &p.destination_workload,
        route,
    )
}

fn key_of(l: Labels<'_>) -> proto::EdgeKey {
    proto::EdgeKey {
        reporter: l.0.into(),
        source_workload: l.1.into(),
        source_namespace: l.2.into(),
        source_zone: l.3.into(),
        destination_service: l.4.into(),
        destination_namespace: l.5.into(),
        destination_zone: l.6.into(),
        destination_workload: l.7.into(),
        route: l.8.into(),
    }
}

fn same(k: &proto::EdgeKey, l: &Labels<'_>) -> bool {
    k.reporter == l.0
        && k.source_workload == l.1
        && k.source_namespace == l.2
        && k.source_zone == l.3
        && k.destination_service == l.4
        && k.destination_namespace == l.5
        && k.destination_zone == l.6
        && k.destination_workload == l.7
        && k.route == l.8
}

// === impl Signals ===

impl Signals {
    /// Empty summaries of the proxy `proxy` (its SPIFFE ID), from `now`.
    pub(crate) fn new(proxy: String, now: Instant) -> Self {
        Self {
            proxy,
            hasher: std::hash::RandomState::new(),
            edges: Mutex::new(Edges {
                by_hash: HashMap::new(),
                len: 0,
                since: now,
                dropped: 0,
            }),
        }
    }

    /// Applies `f` to the summary of the edge `l`, made if new and room is
    /// left; counts one dropped otherwise.
    fn with(&self, l: Labels<'_>, f: impl FnOnce(&mut Summary)) {
        let h = self.hasher.hash_one(l);
        let mut g = self.edges.lock().unwrap_or_else(|e| e.into_inner());
        let Edges {
            by_hash,
            len,
            dropped,
            ..
        } = &mut *g;
        let bucket = by_hash.entry(h).or_default();
        if let Some(e) = bucket.iter_mut().find(|e| same(&e.key, &l)) {
            f(&mut e.sum);
        } else if *len < MAX_EDGES {
            let mut sum = Summary::default();
            f(&mut sum);
            bucket.push(Edge {
                key: key_of(l),
                sum,
                idle: 0,
            });
            *len += 1;
        } else {
            *dropped += 1;
        }
    }

    /// The report of what happened since the last one, taken at `now`;
    /// `None` when nothing did. A backlog older than the servers keep
    /// (nothing was taken for that long: no server could be reached) is
    /// dropped, and counted as dropped in the report.
    pub(crate) fn take(&self, now: Instant) -> Option<proto::SignalReport> {
        let mut g = self.edges.lock().unwrap_or_else(|e| e.into_inner());
        let interval = now.saturating_duration_since(g.since);
        let stale = interval > telemetry::RETENTION;
        let mut edges = Vec::new();
        let mut dropped = std::mem::take(&mut g.dropped);
        for bucket in g.by_hash.values_mut() {
            for e in bucket.iter_mut() {
                if e.sum.is_empty() {
                    e.idle += 1;
                    continue;
                }
                if stale {
                    dropped += e.sum.requests + e.sum.connections;
                } else {
                    edges.push(e.sum.to_proto(e.key.clone()));
                }
                e.sum.clear();
                e.idle = 0;
            }
            bucket.retain(|e| e.idle < IDLE_REPORTS);
        }
        g.by_hash.retain(|_, b| !b.is_empty());
        g.len = g.by_hash.values().map(Vec::len).sum();
        g.since = now;
        if stale {
            tracing::warn!(
                dropped,
                backlog = ?interval,
                "golden signals older than the servers keep were dropped (no server took them)"
            );
        }
        if edges.is_empty() && dropped == 0 {
            return None;
        }
        Some(proto::SignalReport {
            proxy: self.proxy.clone(),
            interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            edges,
            dropped,
        })
    }
}

impl Observer for Signals {
    fn request(&self, peers: &Peers, record: &RequestRecord, detail: &Detail) {
        let route = detail.route.as_deref().unwrap_or(DEFAULT_ROUTE);
        let failed = telemetry::is_error(record.code, record.grpc_status.as_deref());
        let micros = u64::try_from(record.duration.as_micros()).unwrap_or(u64::MAX);
        self.with(labels(peers, route), |s| {
            s.requests += 1;
            s.errors += u64::from(failed);
            s.latency.insert(micros);
        });
    }

    fn connection(&self, peers: &Peers, _record: &ConnRecord) {
        self.with(labels(peers, DEFAULT_ROUTE), |s| s.connections += 1);
    }
}

/// How often summaries are sent when the configuration names no interval.
pub(crate) const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(reporter: &'static str, dst_zone: &str) -> Peers {
        Peers {
            reporter,
            source_zone: "east".into(),
            destination_service_name: "catalog".into(),
            destination_service_namespace: "shop".into(),
            destination_zone: dst_zone.into(),
            ..Peers::default()
        }
        .with_source("spiffe://td/ns/shop/sa/auth")
        .with_destination("spiffe://td/ns/shop/sa/catalog")
    }

    fn record(code: u16, grpc: Option<&str>, ms: u64) -> RequestRecord {
        RequestRecord {
            protocol: "http",
            code,
            grpc_status: grpc.map(str::to_string),
            flags: "-",
            duration: Duration::from_millis(ms),
            request_bytes: 0,
            response_bytes: 0,
        }
    }

    #[test]
    fn requests_sum_per_edge_and_route_and_reports_carry_deltas() {
        let t0 = Instant::now();
        let s = Signals::new("spiffe://td/zone/east/agent/h".into(), t0);
        let west = peers("source", "west");
        let canary = Detail {
            route: Some("canary".into()),
            ..Detail::default()
        };
        for i in 0..100 {
            let code = if i % 4 == 0 { 503 } else { 200 };
            s.request(&west, &record(code, None, 10), &Detail::default());
        }
        s.request(&west, &record(200, Some("14"), 20), &canary);
        s.request(&west, &record(0, None, 5), &canary);
        s.request(
            &peers("source", "edge"),
            &record(404, None, 1),
            &Detail::default(),
        );
        s.connection(
            &west,
            &ConnRecord {
                sent: 1,
                received: 1,
                duration: Duration::from_secs(1),
                upstream: None,
            },
        );
        let r = s.take(t0 + Duration::from_secs(2)).expect("a report");
        assert_eq!(r.interval_ms, 2000);
        assert_eq!(r.proxy, "spiffe://td/zone/east/agent/h");
        let mut got: Vec<(String, String, u64, u64, u64)> = r
            .edges
            .iter()
            .map(|e| {
                let k = e.key.as_ref().unwrap();
                (
                    k.destination_zone.clone(),
                    k.route.clone(),
                    e.requests,
                    e.errors,
                    e.connections,
                )
            })
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                ("edge".into(), "default".into(), 1, 0, 0),
                ("west".into(), "canary".into(), 2, 2, 0),
                ("west".into(), "default".into(), 100, 25, 1),
            ]
        );
        let k = r.edges[0].key.as_ref().unwrap();
        assert_eq!(
            (k.source_workload.as_str(), k.destination_service.as_str()),
            ("auth", "catalog")
        );
        // The next report holds only what happened since.
        assert!(s.take(t0 + Duration::from_secs(4)).is_none());
        s.request(&west, &record(200, None, 10), &Detail::default());
        let r = s.take(t0 + Duration::from_secs(6)).unwrap();
        assert_eq!(r.edges.len(), 1);
        assert_eq!(r.edges[0].requests, 1);
    }

    #[test]
    fn edges_are_bounded_and_overflow_is_counted() {
        let t0 = Instant::now();
        let s = Signals::new(String::new(), t0);
        for i in 0..MAX_EDGES + 5 {
            let d = Detail {
                route: Some(format!("r{i}").into()),
                ..Detail::default()
            };
            s.request(&peers("destination", "west"), &record(200, None, 1), &d);
        }
        let r = s.take(t0 + Duration::from_secs(2)).unwrap();
        assert_eq!(r.edges.len(), MAX_EDGES);
        assert_eq!(r.dropped, 5);
    }

    #[test]
    fn a_backlog_older_than_the_servers_keep_is_dropped_and_counted() {
        let t0 = Instant::now();
        let s = Signals::new(String::new(), t0);
        for _ in 0..7 {
            s.request(
                &peers("source", "west"),
                &record(200, None, 1),
                &Detail::default(),
            );
        }
        let r = s
            .take(t0 + telemetry::RETENTION + Duration::from_secs(1))
            .unwrap();
        assert!(r.edges.is_empty());
        assert_eq!(r.dropped, 7);
    }

    /// The data-path cost, for the record (`cargo test -p trellis-agent
    /// --release --lib stress_observer -- --ignored --nocapture`); `.ci/run`
    /// runs it for its count.
    #[test]
    #[ignore = "stress: 2 million requests, a timing read by hand in release; .ci/run runs it"]
    fn stress_observer_cost_per_request() {
        let t0 = Instant::now();
        let s = Signals::new(String::new(), t0);
        let edges: Vec<Peers> = ["east", "west", "edge", "north"]
            .iter()
            .map(|z| peers("source", z))
            .collect();
        let rec = record(200, None, 7);
        let d = Detail::default();
        let n = 2_000_000u32;
        let start = Instant::now();
        for i in 0..n {
            s.request(&edges[i as usize % edges.len()], &rec, &d);
        }
        let per = start.elapsed() / n;
        eprintln!("observer: {per:?} per request over {n} requests on 4 edges");
        let r = s.take(Instant::now()).unwrap();
        assert_eq!(
            r.edges.iter().map(|e| e.requests).sum::<u64>(),
            u64::from(n)
        );
    }

    #[test]
    fn idle_edges_are_forgotten() {
        let t0 = Instant::now();
        let s = Signals::new(String::new(), t0);
        s.request(
            &peers("source", "west"),
            &record(200, None, 1),
            &Detail::default(),
        );
        for i in 1..=(IDLE_REPORTS + 1) {
            s.take(t0 + Duration::from_secs(u64::from(i)));
        }
        assert_eq!(s.edges.lock().unwrap().len, 0);
    }
}
