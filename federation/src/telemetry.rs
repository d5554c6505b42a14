//! Golden signals per service edge: what proxies report and servers keep.
//!
//! Proxies summarise every finished request per edge (who called which
//! service, in which zones, by which route) as counts, errors and a
//! [`Sketch`] of latencies, and stream the deltas to a server of their
//! zone every couple of seconds (`Telemetry.Report`). A server keeps them
//! in memory only, in one-second slots for [`RETENTION`], per reporting
//! proxy and edge: this is soft state, lost with the server and rebuilt by
//! the next reports within seconds, so it never becomes a Raft write. A
//! query (`Telemetry.Query`) merges the slots of a window, and the server
//! asked merges in every other server's answer, so one call sees the whole
//! mesh.
//!
//! Memory is bounded: at most [`MAX_ENTRIES`] (proxy, edge, slot) entries
//! per server, each with at most [`sketch::MAX_BUCKETS`] latency buckets;
//! what would pass the bound is counted as dropped and shown as such.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::proto;

pub mod report;
pub mod sketch;

pub use sketch::Sketch;

/// How long a server keeps reports: the longest window a query may ask.
pub const RETENTION: Duration = Duration::from_secs(60);

/// The window of a query that names none.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(30);

/// Most (proxy, edge, slot) entries one server holds. Reports come every
/// couple of seconds, so one (proxy, edge) pair takes about 30 entries of
/// the 60 s kept: this is room for ~1000 busy pairs per server. An entry
/// is at most ~6.5 KiB (a 4 KiB sketch, nine key fields of at most
/// [`MAX_FIELD`] bytes), usually ~1.5 KiB (latencies over three decades,
/// short names): at most ~210 MiB, usually under 50 MiB.
pub const MAX_ENTRIES: usize = 32_768;

/// Most one report or table may hold on the wire.
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// Longest name a proxy may report in a key field; longer ones are refused.
pub const MAX_FIELD: usize = 253;

/// Whether a request failed, for every golden signal: no response at all
/// (status 0), a 5xx, or a gRPC status that says the server failed
/// (UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE,
/// DATA_LOSS: the codes gRPC maps to 5xx). A 4xx, or a gRPC status that
/// blames the caller (NOT_FOUND, PERMISSION_DENIED…), is an answer, not
/// a failure of the service.
pub fn is_error(code: u16, grpc_status: Option<&str>) -> bool {
    if code == 0 || code >= 500 {
        return true;
    }
    grpc_status
        .and_then(|g| g.trim().parse::<u16>().ok())
        .is_some_and(grpc_server_failure)
}

/// Whether a gRPC status says the server failed (UNKNOWN,
/// DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS), by
/// OpenTelemetry's RPC conventions; the others are answers.
pub fn grpc_server_failure(code: u16) -> bool {
    matches!(code, 2 | 4 | 12 | 13 | 14 | 15)
}

/// One edge's signals over some time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Finished HTTP and gRPC requests.
    pub requests: u64,
    /// Of which failed (see [`is_error`]).
    pub errors: u64,
    /// Opaque TCP connections that closed.
    pub connections: u64,
    /// Request latencies.
    pub latency: Sketch,
}

// === impl Summary ===

impl Summary {
    /// Adds `other`.
    pub fn merge(&mut self, other: &Summary) {
        self.requests = self.requests.saturating_add(other.requests);
        self.errors = self.errors.saturating_add(other.errors);
        self.connections = self.connections.saturating_add(other.connections);
        self.latency.merge(&other.latency);
    }

    /// Whether nothing happened.
    pub fn is_empty(&self) -> bool {
        self.requests == 0 && self.connections == 0
    }

    /// Forgets the counts, keeping the memory.
    pub fn clear(&mut self) {
        self.requests = 0;
        self.errors = 0;
        self.connections = 0;
        self.latency.clear();
    }

    /// The wire form of this edge.
    pub fn to_proto(&self, key: proto::EdgeKey) -> proto::EdgeSignals {
        proto::EdgeSignals {
            key: Some(key),
            requests: self.requests,
            errors: self.errors,
            connections: self.connections,
            latency: Some(self.latency.to_proto()),
        }
    }

    fn from_parts(
        requests: u64,
        errors: u64,
        connections: u64,
        latency: Option<&proto::LatencySketch>,
    ) -> Self {
        Summary {
            requests,
            // More errors than requests is a lie; hold it to the requests.
            errors: errors.min(requests),
            connections,
            latency: latency.map(Sketch::from_proto).unwrap_or_default(),
        }
    }

    /// A row of a table over `window` seconds.
    fn row(&self, key: proto::EdgeKey, proxy: String, window: u32) -> proto::SignalRow {
        let success_rate = if self.requests == 0 {
            1.0
        } else {
            (self.requests - self.errors) as f64 / self.requests as f64
        };
        proto::SignalRow {
            key: Some(key),
            proxy,
            requests: self.requests,
            errors: self.errors,
            connections: self.connections,
            rps: self.requests as f64 / f64::from(window.max(1)),
            success_rate,
            p50_ms: self.latency.quantile_ms(0.5),
            p99_ms: self.latency.quantile_ms(0.99),
            latency: Some(self.latency.to_proto()),
        }
    }
}

/// How a query groups what proxies reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum View {
    /// Per source workload and zone, destination service and zone, and
    /// route, as the callers' sidecars saw them.
    Edges,
    /// Per destination service and route, as the callers saw them.
    Routes,
    /// Per destination service, answering workload, zone and proxy, as the
    /// destinations' sidecars saw them.
    Endpoints,
}

// === impl View ===

impl View {
    /// The view a query names: `edges` (or empty), `routes`, `endpoints`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "" | "edges" => Ok(View::Edges),
            "routes" => Ok(View::Routes),
            "endpoints" => Ok(View::Endpoints),
            other => Err(format!(
                "view {other:?}: expected edges, routes or endpoints"
            )),
        }
    }

    /// `key` as this view groups it, with the proxy it keeps; `None` when
    /// this view leaves the report out (the other side's view).
    fn group(self, proxy: &str, key: &proto::EdgeKey) -> Option<(proto::EdgeKey, String)> {
        let blank = proto::EdgeKey::default();
        match self {
            View::Edges if key.reporter == "source" => Some((
                proto::EdgeKey {
                    destination_workload: String::new(),
                    ..key.clone()
                },
                String::new(),
            )),
            View::Routes if key.reporter == "source" => Some((
                proto::EdgeKey {
                    reporter: key.reporter.clone(),
                    destination_service: key.destination_service.clone(),
                    destination_namespace: key.destination_namespace.clone(),
                    route: key.route.clone(),
                    ..blank
                },
                String::new(),
            )),
            View::Endpoints if key.reporter == "destination" => Some((
                proto::EdgeKey {
                    reporter: key.reporter.clone(),
                    destination_service: key.destination_service.clone(),
                    destination_namespace: key.destination_namespace.clone(),
                    destination_zone: key.destination_zone.clone(),
                    destination_workload: key.destination_workload.clone(),
                    ..blank
                },
                proxy.to_string(),
            )),
            _ => None,
        }
    }
}

/// What a query selects.
#[derive(Debug, Clone)]
pub struct Selection {
    /// The window, in whole seconds (1 to [`RETENTION`]).
    pub window: u32,
    /// `(name, namespace)` of the one service to show, if any.
    pub service: Option<(String, String)>,
    /// How to group.
    pub view: View,
}

// === impl Selection ===

impl Selection {
    /// The selection `q` asks for, or why it is not one.
    pub fn from_query(q: &proto::SignalQuery) -> Result<Self, String> {
        let window = match q.window_seconds {
            0 => DEFAULT_WINDOW.as_secs() as u32,
            w if u64::from(w) > RETENTION.as_secs() => {
                return Err(format!(
                    "window_seconds: {w} s is more than the {} s servers keep",
                    RETENTION.as_secs()
                ));
            }
            w => w,
        };
        let service = match q.service.as_str() {
            "" => None,
            s => match s.split_once('.') {
                Some((name, ns)) if !name.is_empty() && !ns.is_empty() && !ns.contains('.') => {
                    Some((name.to_string(), ns.to_string()))
                }
                _ => return Err(format!("service {s:?}: write it as NAME.NAMESPACE")),
            },
        };
        Ok(Selection {
            window,
            service,
            view: View::parse(&q.view)?,
        })
    }

    fn wants(&self, key: &proto::EdgeKey) -> bool {
        self.service
            .as_ref()
            .is_none_or(|(n, ns)| key.destination_service == *n && key.destination_namespace == *ns)
    }
}

/// Rows keyed by their grouped edge and proxy, merged as they come (from
/// slots, then from other servers).
#[derive(Debug, Default)]
pub struct Merged {
    rows: HashMap<(proto::EdgeKey, String), Summary>,
    /// Dropped requests and connections within the window.
    pub dropped: u64,
}

// === impl Merged ===

impl Merged {
    /// Adds the rows of another server's table (made with the same
    /// selection).
    pub fn add_table(&mut self, t: &proto::SignalTable) {
        for r in &t.rows {
            let s = Summary::from_parts(r.requests, r.errors, r.connections, r.latency.as_ref());
            self.add(r.key.clone().unwrap_or_default(), r.proxy.clone(), &s);
        }
        self.dropped = self.dropped.saturating_add(t.dropped);
    }

    fn add(&mut self, key: proto::EdgeKey, proxy: String, s: &Summary) {
        self.rows.entry((key, proxy)).or_default().merge(s);
    }

    /// The table over `window` seconds, busiest rows first.
    pub fn table(self, window: u32) -> proto::SignalTable {
        let mut rows: Vec<proto::SignalRow> = self
            .rows
            .into_iter()
            .map(|((k, p), s)| s.row(k, p, window))
            .collect();
        rows.sort_by(|a, b| {
            b.requests
                .cmp(&a.requests)
                .then(b.connections.cmp(&a.connections))
                .then_with(|| a.key.cmp(&b.key))
                .then_with(|| a.proxy.cmp(&b.proxy))
        });
        proto::SignalTable {
            window_seconds: window,
            rows,
            servers: Vec::new(),
            missing: Vec::new(),
            dropped: self.dropped,
        }
    }
}

/// Why a report was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// An edge's key has a field that is not what it must be.
    #[error("edge {index}: {field}: {reason}")]
    Field {
        /// The edge's position in the report.
        index: usize,
        /// The key field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// A server's recent reports, in memory.
#[derive(Debug)]
pub struct Store {
    inner: Mutex<Slots>,
}

#[derive(Debug)]
struct Slots {
    start: Instant,
    slots: VecDeque<Slot>,
    entries: usize,
}

#[derive(Debug)]
struct Slot {
    /// Seconds since `start`.
    second: u64,
    edges: HashMap<(Arc<str>, proto::EdgeKey), Summary>,
    dropped: u64,
}

// === impl Store ===

impl Default for Store {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl Store {
    /// An empty store whose clock starts at `now`.
    pub fn new(now: Instant) -> Self {
        Store {
            inner: Mutex::new(Slots {
                start: now,
                slots: VecDeque::new(),
                entries: 0,
            }),
        }
    }

    /// Keeps `report` from `proxy` (the caller's SPIFFE ID), received at
    /// `now`. A report with a malformed key is refused whole.
    pub fn record(
        &self,
        proxy: &str,
        report: &proto::SignalReport,
        now: Instant,
    ) -> Result<(), ReportError> {
        for (index, e) in report.edges.iter().enumerate() {
            check_key(index, e.key.as_ref())?;
        }
        let proxy: Arc<str> = proxy.into();
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let second = g.expire(now);
        if g.slots.back().is_none_or(|s| s.second != second) {
            g.slots.push_back(Slot {
                second,
                edges: HashMap::new(),
                dropped: 0,
            });
        }
        let mut added = 0;
        let full = g.entries;
        let slot = g.slots.back_mut().expect("a slot was just pushed");
        slot.dropped = slot.dropped.saturating_add(report.dropped);
        for e in &report.edges {
            let key = e.key.clone().unwrap_or_default();
            let s = Summary::from_parts(e.requests, e.errors, e.connections, e.latency.as_ref());
            if let Some(have) = slot.edges.get_mut(&(proxy.clone(), key.clone())) {
                have.merge(&s);
            } else if full + added < MAX_ENTRIES {
                slot.edges.insert((proxy.clone(), key), s);
                added += 1;
            } else {
                slot.dropped = slot
                    .dropped
                    .saturating_add(s.requests.saturating_add(s.connections));
            }
        }
        g.entries += added;
        Ok(())
    }

    /// What was reported within `sel.window` seconds before `now`, grouped
    /// as `sel.view` asks.
    pub fn query(&self, sel: &Selection, now: Instant) -> Merged {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let second = g.expire(now);
        let from = (second + 1).saturating_sub(u64::from(sel.window));
        let mut out = Merged::default();
        for slot in g.slots.iter().filter(|s| s.second >= from) {
            out.dropped = out.dropped.saturating_add(slot.dropped);
            for ((proxy, key), s) in &slot.edges {
                if !sel.wants(key) {
                    continue;
                }
                if let Some((k, p)) = sel.view.group(proxy, key) {
                    out.add(k, p, s);
                }
            }
        }
        out
    }

    /// How many (proxy, edge, slot) entries it holds.
    pub fn entries(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).entries
    }
}

impl Slots {
    /// Drops the slots older than [`RETENTION`]; the current second.
    fn expire(&mut self, now: Instant) -> u64 {
        let second = now.saturating_duration_since(self.start).as_secs();
        let keep_from = (second + 1).saturating_sub(RETENTION.as_secs());
        while self.slots.front().is_some_and(|s| s.second < keep_from) {
            if let Some(old) = self.slots.pop_front() {
                self.entries -= old.edges.len();
            }
        }
        second
    }
}

fn check_key(index: usize, key: Option<&proto::EdgeKey>) -> Result<(), ReportError> {
    let bad = |field, reason: &str| ReportError::Field {
        index,
        field,
        reason: reason.to_string(),
    };
    let key = key.ok_or_else(|| bad("key", "missing"))?;
    if key.reporter != "source" && key.reporter != "destination" {
        return Err(bad("reporter", "must be source or destination"));
    }
    for (field, v) in [
        ("source_workload", &key.source_workload),
        ("source_namespace", &key.source_namespace),
        ("source_zone", &key.source_zone),
        ("destination_service", &key.destination_service),
        ("destination_namespace", &key.destination_namespace),
        ("destination_zone", &key.destination_zone),
        ("destination_workload", &key.destination_workload),
        ("route", &key.route),
    ] {
        if v.len() > MAX_FIELD {
            return Err(bad(field, "longer than 253 bytes"));
        }
    }
    Ok(())
}

/// Asks the server behind `channel` for its table (merged across the mesh
/// unless `query.local_only`): the call `trellis top` and the dashboard make.
pub async fn query(
    channel: tonic::transport::Channel,
    query: proto::SignalQuery,
) -> Result<proto::SignalTable, tonic::Status> {
    Ok(proto::telemetry_client::TelemetryClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .query(query)
        .await?
        .into_inner())
}

#[cfg(test)]
mod tests;
