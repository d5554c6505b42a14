//! The traffic policy kinds, enforced by the caller's sidecar: `Route` (how
//! requests to a service are matched, split, changed, timed and retried),
//! `Backend` (its subsets, load balancing, connection limits, outlier
//! detection and locality), `RateLimit`, and the standalone
//! `OutlierDetection` of earlier releases.
//!
//! The serde types are the schema (`deny_unknown_fields` throughout, names in
//! camelCase as Istio users write them); `typed` reads a spec with them and
//! names the field at fault down to the list item, and each kind's `check`
//! adds the rules a type cannot carry alone (weights that sum to nothing, a
//! prefix rewrite without a prefix match).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Principal, ServiceRef, SpecError, check_key, check_label};

/// How requests to one service (and port) are routed: ordered rules, the
/// first whose match holds applies; a request no rule matches goes to the
/// whole service as without a `Route`.
///
/// ```yaml
/// kind: Route
/// metadata: { name: catalog-canary }
/// spec:
///   service: catalog.shop
///   rules:
///     - match: [ { headers: { user-agent: { regex: ".*Chrome.*" } } } ]
///       backends: [ { subset: v2 } ]
///     - backends: [ { subset: v1, weight: 90 }, { subset: v2, weight: 10 } ]
///       timeout: 500ms
///       retries: { attempts: 1, on: [ 5xx, reset, connect-failure ] }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Route {
    /// The service whose callers apply it.
    pub service: ServiceRef,
    /// Only requests to this port; without it, every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// In order; the first that matches applies.
    pub rules: Vec<RouteRule>,
}

/// One rule of a [`Route`].
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteRule {
    /// A name, for metrics, logs and `RateLimit.route`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Any of these matches the request; none given matches every request.
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<RequestMatch>,
    /// Where matched requests go, by weight; none given: the whole service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<WeightedBackend>,
    /// Changes to the request headers before it is sent.
    #[serde(default, skip_serializing_if = "HeaderEdit::is_empty")]
    pub request_headers: HeaderEdit,
    /// Changes to the response headers before the caller sees them.
    #[serde(default, skip_serializing_if = "HeaderEdit::is_empty")]
    pub response_headers: HeaderEdit,
    /// Answer with a redirect instead of forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<Redirect>,
    /// Rewrite the path (and authority) before forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Rewrite>,
    /// Also send a copy of matched requests to a subset; its answers are
    /// dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
    /// The whole request, retries included, must be answered within this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Dur>,
    /// Retry failed attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    /// Inject delays or failures, to test how callers cope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
}

/// What a request must have; every condition given must hold.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestMatch {
    /// The path, without the query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// The method, e.g. `GET`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<MethodName>,
    /// Headers, by lowercase name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<HeaderKey, StringMatch>,
    /// Query parameters, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub query: BTreeMap<String, StringMatch>,
    /// The caller: any of these identities or `ns:NAMESPACE`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<Principal>,
}

/// How a path is matched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub enum PathMatch {
    /// The whole path.
    Exact(String),
    /// A prefix on segment boundaries: `/api` matches `/api` and `/api/x`,
    /// not `/apix`.
    Prefix(String),
    /// A regular expression the whole path must match.
    Regex(Pattern),
}

/// How a header or query value is matched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub enum StringMatch {
    /// The whole value.
    Exact(String),
    /// The start of the value.
    Prefix(String),
    /// A regular expression the whole value must match.
    Regex(Pattern),
    /// `true`: present with any value; `false`: absent.
    Present(bool),
}

/// One backend of a rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WeightedBackend {
    /// Another mesh service to send to instead (`name.namespace`); none:
    /// the route's own service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRef>,
    /// A subset of the service's `Backend`; none: every endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// Share of requests, relative to the rule's other backends.
    #[serde(default = "one")]
    pub weight: u32,
}

/// Header changes, applied remove, then set, then add.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderEdit {
    /// Replace (or add) these.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<HeaderKey, HeaderText>,
    /// Append these, keeping values already there.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<HeaderKey, HeaderText>,
    /// Remove these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<HeaderKey>,
}

/// A redirect answered by the caller's sidecar; each part given replaces the
/// request's own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Redirect {
    /// `http` or `https`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<Scheme>,
    /// The host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The path (the query is kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// 301, 302, 303, 307 or 308. Default 301.
    #[serde(default = "moved")]
    pub status: u16,
}

/// `http` or `https`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    /// `http`.
    Http,
    /// `https`.
    Https,
}

/// A path rewrite: the whole path, or the prefix the rule matched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Rewrite {
    /// Replace the whole path with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Replace the prefix the rule's match named with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Replace the authority (`Host`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
}

/// Request mirroring.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Mirror {
    /// Another mesh service the copies go to; none: the route's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRef>,
    /// The subset the copies go to; none: any endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// Share of matched requests copied. Default 100.
    #[serde(default = "hundred")]
    pub percent: Percent,
}

/// Retries of one rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Retries {
    /// Retries after the first attempt (1 to 10).
    pub attempts: u32,
    /// Each attempt's own limit; the rule's `timeout` still bounds the whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Dur>,
    /// The failures retried. Default: `connect-failure`, `reset`,
    /// `gateway-error`.
    #[serde(default = "default_retry_on")]
    pub on: Vec<RetryOn>,
    /// Also retry answers with these HTTP statuses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub status_codes: Vec<u16>,
    /// Also retry gRPC answers with these statuses (`unavailable`, …).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grpc_statuses: Vec<GrpcCode>,
    /// How many retries the caller may add to its load.
    #[serde(default)]
    pub budget: RetryBudget,
}

/// A failure a retry is made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RetryOn {
    /// Any 5xx answer.
    #[serde(rename = "5xx")]
    ServerError,
    /// 502, 503 or 504.
    #[serde(rename = "gateway-error")]
    GatewayError,
    /// The stream or connection failed after it was sent.
    #[serde(rename = "reset")]
    Reset,
    /// No connection to any endpoint could be made.
    #[serde(rename = "connect-failure")]
    ConnectFailure,
}

/// Retries may add at most `percent` of the requests of the last ten
/// seconds, plus `minPerSecond`, so that an outage is not multiplied by the
/// retry count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetryBudget {
    /// Default 20.
    #[serde(default = "twenty")]
    pub percent: Percent,
    /// Default 10.
    #[serde(default = "ten")]
    pub min_per_second: u32,
}

/// Injected faults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Fault {
    /// Delay a share of requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    /// Fail a share of requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// A fixed delay for a share of requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultDelay {
    /// The delay.
    pub fixed: Dur,
    /// Share of requests delayed. Default 100.
    #[serde(default = "hundred")]
    pub percent: Percent,
}

/// A failure answered for a share of requests: an HTTP status, or a gRPC
/// status (in a `200` with `grpc-status`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultAbort {
    /// HTTP status (400 to 599).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// gRPC status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<GrpcCode>,
    /// Share of requests failed. Default 100.
    #[serde(default = "hundred")]
    pub percent: Percent,
}

/// How a service's endpoints are chosen and guarded.
///
/// ```yaml
/// kind: Backend
/// metadata: { name: catalog }
/// spec:
///   service: catalog.shop
///   subsets: [ { name: v1, labels: { version: v1 } }, { name: v2, labels: { version: v2 } } ]
///   outlierDetection: { consecutive5xx: 3, baseEjectionTime: 10s, maxEjectionPercent: 50 }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Backend {
    /// The service.
    pub service: ServiceRef,
    /// Named groups of its endpoints, by label.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subsets: Vec<Subset>,
    /// How one endpoint is picked. Default: latency-aware P2C.
    #[serde(default)]
    pub load_balancer: LoadBalancer,
    /// Limits on what one caller sends at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    /// Take failing endpoints out of rotation for a while.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<Outlier>,
    /// Which zones serve a caller, in which order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<Locality>,
}

/// A named group of a service's endpoints: those with every label given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Subset {
    /// A DNS label: it travels in the server name to other zones.
    pub name: String,
    /// Endpoint labels, all required.
    pub labels: BTreeMap<String, String>,
}

/// Load balancing.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoadBalancer {
    /// The policy. Default `p2c`.
    #[serde(default)]
    pub policy: LbPolicy,
    /// For `consistentHash`: the header whose value picks the endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_header: Option<HeaderKey>,
}

/// A load balancing policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum LbPolicy {
    /// The less loaded of two endpoints picked at random, by latency
    /// (moving average) times requests in flight.
    #[default]
    P2c,
    /// Each endpoint in turn.
    RoundRobin,
    /// The same endpoint for the same `hashHeader` value while the set of
    /// endpoints holds.
    ConsistentHash,
}

/// Limits one caller's sidecar holds to for a service; beyond them a request
/// is answered 503 at once rather than queued without bound.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConnectionPool {
    /// Requests (and opaque TCP connections) in flight at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// Requests waiting for one of `maxRequests`; beyond, 503. Default 0
    /// with `maxRequests`: none wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Opaque TCP connections open at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
}

/// Outlier detection: an endpoint (or, for other zones, a zone) that fails
/// in a row is ejected for `baseEjectionTime` times the number of times it
/// has been ejected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Outlier {
    /// 5xx answers (and failed connections) in a row that eject. Default 5.
    #[serde(default = "five", rename = "consecutive5xx")]
    pub consecutive_5xx: u32,
    /// 502, 503, 504 and failed connections in a row that eject; none: only
    /// `consecutive5xx` counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<u32>,
    /// Each interval without an ejection, an endpoint's repeat count goes
    /// down by one. Default 10s.
    #[serde(default = "ten_seconds")]
    pub interval: Dur,
    /// Default 30s.
    #[serde(default = "thirty_seconds")]
    pub base_ejection_time: Dur,
    /// At most this share of the endpoints is ejected at once (at least one
    /// may be). Default 10.
    #[serde(default = "ten_percent")]
    pub max_ejection_percent: Percent,
}

/// Zones in the order a caller uses them.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Locality {
    /// After the caller's own zone, these in order, then the rest; replaces
    /// the agent's `zone_priority` for this service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failover: Vec<String>,
    /// Spread the requests of callers in `from` over zones by weight, even
    /// while their own zone is healthy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub distribute: Vec<Distribute>,
}

/// Weighted spill-over for callers of one zone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Distribute {
    /// The callers' zone.
    pub from: String,
    /// Weight by destination zone.
    pub to: BTreeMap<String, u32>,
}

/// A token bucket at each caller's sidecar: at most `requestsPerSecond` on
/// average, `burst` at once; beyond, 429 with `retry-after`. The limit is
/// per sidecar: N callers together send up to N times it.
///
/// ```yaml
/// kind: RateLimit
/// metadata: { name: catalog }
/// spec: { service: catalog.shop, requestsPerSecond: 50, burst: 100 }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimit {
    /// The destination.
    pub service: ServiceRef,
    /// Only requests a `Route` rule of this name matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// Only callers with any of these identities or namespaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<Principal>,
    /// The refill rate.
    pub requests_per_second: f64,
    /// The bucket size. Default: one second's worth, at least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

/// The `OutlierDetection` kind: [`Outlier`] for one service, as a document
/// of its own. A `Backend`'s `outlierDetection` wins over it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutlierDetection {
    /// The service.
    pub service: ServiceRef,
    /// The settings.
    #[serde(flatten)]
    pub outlier: Outlier,
}

/// A duration as written (`500ms`, `2s`, `1m`); more than zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Dur(pub Duration);

/// A share in percent, 0 to 100.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Percent(pub f64);

/// A regular expression, compiled at apply time so a bad one is refused
/// there; it must match the whole value.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Pattern {
    source: String,
    anchored: regex::Regex,
}

/// A lowercase HTTP header name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HeaderKey(String);

/// A header value: visible ASCII and spaces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HeaderText(String);

/// An HTTP method token, uppercase.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MethodName(String);

/// A gRPC status, by its name in lowercase (`unavailable`) or its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "Value", into = "String")]
pub struct GrpcCode(pub u8);

const GRPC_CODES: [&str; 17] = [
    "ok",
    "cancelled",
    "unknown",
    "invalid-argument",
    "deadline-exceeded",
    "not-found",
    "already-exists",
    "permission-denied",
    "resource-exhausted",
    "failed-precondition",
    "aborted",
    "out-of-range",
    "unimplemented",
    "internal",
    "unavailable",
    "data-loss",
    "unauthenticated",
];

/// The most a regular expression may compile to: a route table is matched on
/// every request, so a pathological pattern is refused at apply time.
const REGEX_SIZE_LIMIT: usize = 256 * 1024;

/// Reads `spec` as `T`, naming the field at fault (`rules[0].match[1].path`).
pub(super) fn typed<T: DeserializeOwned>(spec: &Value) -> Result<T, SpecError> {
    if !spec.is_object() {
        return Err(SpecError {
            field: String::new(),
            reason: "must be a mapping".into(),
        });
    }
    serde_path_to_error::deserialize(spec).map_err(|e| {
        // The path ends at the field at fault, an unknown one included.
        let path = e.path().to_string();
        SpecError {
            field: if path == "." { String::new() } else { path },
            reason: e.into_inner().to_string(),
        }
    })
}

fn fail(field: impl Into<String>, reason: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        reason: reason.into(),
    }
}

impl StringMatch {
    /// Whether `v` (`None`: absent) matches.
    pub fn matches(&self, v: Option<&str>) -> bool {
        match (self, v) {
            (StringMatch::Present(want), v) => *want == v.is_some(),
            (_, None) => false,
            (StringMatch::Exact(x), Some(v)) => v == x,
            (StringMatch::Prefix(x), Some(v)) => v.starts_with(x.as_str()),
            (StringMatch::Regex(p), Some(v)) => p.is_match(v),
        }
    }

    /// Whether header `name` matches: any of its values, and a value that is
    /// not text counts as present but matches no string.
    pub fn matches_header(&self, headers: &http::HeaderMap, name: &str) -> bool {
        let mut values = headers.get_all(name).iter().peekable();
        if values.peek().is_none() {
            return self.matches(None);
        }
        if let StringMatch::Present(want) = self {
            return *want;
        }
        values.any(|v| v.to_str().is_ok_and(|v| self.matches(Some(v))))
    }
}

impl PathMatch {
    /// Whether `path` matches.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) => {
                let p = p.trim_end_matches('/');
                path.strip_prefix(p)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            PathMatch::Regex(r) => r.is_match(path),
        }
    }
}

// === impl Route ===

impl Route {
    /// Parses a `Route` spec.
    pub fn from_spec(spec: &Value) -> Result<Self, SpecError> {
        let r: Self = typed(spec)?;
        r.check()?;
        Ok(r)
    }

    fn check(&self) -> Result<(), SpecError> {
        if self.rules.is_empty() {
            return Err(fail("rules", "must have at least one rule"));
        }
        if self.port == Some(0) {
            return Err(fail("port", "must be 1 to 65535"));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, rule) in self.rules.iter().enumerate() {
            let at = |f: &str| format!("rules[{i}].{f}");
            if let Some(n) = &rule.name {
                check_key(n).map_err(|e| fail(at("name"), format!("{n:?} {e}")))?;
                if !names.insert(n) {
                    return Err(fail(at("name"), format!("{n:?} names an earlier rule too")));
                }
            }
            for (j, b) in rule.backends.iter().enumerate() {
                if let Some(s) = &b.subset {
                    check_label(s).map_err(|e| {
                        fail(at(&format!("backends[{j}].subset")), format!("{s:?} {e}"))
                    })?;
                }
                if b.weight > 1_000_000 {
                    return Err(fail(
                        at(&format!("backends[{j}].weight")),
                        "must be at most 1000000",
                    ));
                }
            }
            if !rule.backends.is_empty() && rule.backends.iter().all(|b| b.weight == 0) {
                return Err(fail(
                    at("backends"),
                    "the weights add up to 0; give at least one backend a weight",
                ));
            }
            if rule.redirect.is_some()
                && (!rule.backends.is_empty()
                    || rule.rewrite.is_some()
                    || rule.retries.is_some()
                    || rule.mirror.is_some())
            {
                return Err(fail(
                    at("redirect"),
                    "a redirect is answered by the caller's sidecar; it takes no backends, rewrite, retries or mirror",
                ));
            }
            if let Some(r) = &rule.redirect {
                if ![301, 302, 303, 307, 308].contains(&r.status) {
                    return Err(fail(
                        at("redirect.status"),
                        format!("{} is not one of 301, 302, 303, 307, 308", r.status),
                    ));
                }
                if let Some(p) = &r.path {
                    check_path(p).map_err(|why| fail(at("redirect.path"), why))?;
                }
            }
            if let Some(w) = &rule.rewrite {
                match (&w.path, &w.prefix) {
                    (Some(_), Some(_)) => {
                        return Err(fail(at("rewrite"), "give path or prefix, not both"));
                    }
                    (Some(p), None) | (None, Some(p)) => {
                        let f = if w.path.is_some() { "path" } else { "prefix" };
                        check_path(p).map_err(|why| fail(at(&format!("rewrite.{f}")), why))?;
                    }
                    (None, None) if w.authority.is_none() => {
                        return Err(fail(at("rewrite"), "give path, prefix or authority"));
                    }
                    (None, None) => {}
                }
                if w.prefix.is_some()
                    && (rule.matches.is_empty()
                        || rule
                            .matches
                            .iter()
                            .any(|m| !matches!(m.path, Some(PathMatch::Prefix(_)))))
                {
                    return Err(fail(
                        at("rewrite.prefix"),
                        "replaces the matched prefix, so every match of the rule needs a path prefix",
                    ));
                }
            }
            if let Some(m) = &rule.mirror
                && let Some(s) = &m.subset
            {
                check_label(s).map_err(|e| fail(at("mirror.subset"), format!("{s:?} {e}")))?;
            }
            if let Some(r) = &rule.retries {
                if !(1..=10).contains(&r.attempts) {
                    return Err(fail(at("retries.attempts"), "must be 1 to 10"));
                }
                if let Some(c) = r.status_codes.iter().find(|c| !(100..=599).contains(*c)) {
                    return Err(fail(
                        at("retries.statusCodes"),
                        format!("{c} is not an HTTP status"),
                    ));
                }
                if let (Some(t), Some(p)) = (&rule.timeout, &r.per_try_timeout)
                    && p.0 > t.0
                {
                    return Err(fail(
                        at("retries.perTryTimeout"),
                        "is longer than the rule's timeout, which bounds every try",
                    ));
                }
            }
            if let Some(f) = &rule.fault {
                if f.delay.is_none() && f.abort.is_none() {
                    return Err(fail(at("fault"), "give delay, abort or both"));
                }
                if let Some(a) = &f.abort {
                    match (a.status, a.grpc_status) {
                        (Some(_), Some(_)) | (None, None) => {
                            return Err(fail(
                                at("fault.abort"),
                                "give exactly one of status and grpcStatus",
                            ));
                        }
                        (Some(s), None) if !(400..=599).contains(&s) => {
                            return Err(fail(
                                at("fault.abort.status"),
                                format!("{s} is not 400 to 599"),
                            ));
                        }
                        _ => {}
                    }
                }
            }
            for (j, m) in rule.matches.iter().enumerate() {
                if let Some(PathMatch::Exact(p) | PathMatch::Prefix(p)) = &m.path {
                    check_path(p).map_err(|why| fail(at(&format!("match[{j}].path")), why))?;
                }
            }
        }
        Ok(())
    }
}

fn check_path(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err(format!("{p:?} must start with '/'"));
    }
    if let Some(c) = p.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!("{p:?} has {c:?}; write it percent-encoded"));
    }
    Ok(())
}

// === impl Backend ===

impl Backend {
    /// Parses a `Backend` spec.
    pub fn from_spec(spec: &Value) -> Result<Self, SpecError> {
        let b: Self = typed(spec)?;
        b.check()?;
        Ok(b)
    }

    /// The subset named `name`.
    pub fn subset(&self, name: &str) -> Option<&Subset> {
        self.subsets.iter().find(|s| s.name == name)
    }

    fn check(&self) -> Result<(), SpecError> {
        let mut seen = std::collections::BTreeSet::new();
        for (i, s) in self.subsets.iter().enumerate() {
            check_label(&s.name)
                .map_err(|e| fail(format!("subsets[{i}].name"), format!("{:?} {e}", s.name)))?;
            if !seen.insert(&s.name) {
                return Err(fail(
                    format!("subsets[{i}].name"),
                    format!("{:?} names an earlier subset too", s.name),
                ));
            }
            if s.labels.is_empty() {
                return Err(fail(
                    format!("subsets[{i}].labels"),
                    "must name at least one label",
                ));
            }
        }
        match (self.load_balancer.policy, &self.load_balancer.hash_header) {
            (LbPolicy::ConsistentHash, None) => {
                return Err(fail(
                    "loadBalancer.hashHeader",
                    "missing; consistentHash hashes this header's value",
                ));
            }
            (LbPolicy::P2c | LbPolicy::RoundRobin, Some(_)) => {
                return Err(fail(
                    "loadBalancer.hashHeader",
                    "only consistentHash takes a hashHeader",
                ));
            }
            _ => {}
        }
        if let Some(p) = &self.connection_pool {
            if p.max_requests == Some(0) || p.max_connections == Some(0) {
                return Err(fail(
                    "connectionPool",
                    "a limit of 0 refuses everything; leave it out for no limit",
                ));
            }
            if p.max_pending_requests.is_some() && p.max_requests.is_none() {
                return Err(fail(
                    "connectionPool.maxPendingRequests",
                    "requests wait for one of maxRequests; give maxRequests too",
                ));
            }
        }
        if let Some(o) = &self.outlier_detection {
            o.check("outlierDetection.")?;
        }
        if let Some(l) = &self.locality {
            for (i, z) in l.failover.iter().enumerate() {
                check_label(z)
                    .map_err(|e| fail(format!("locality.failover[{i}]"), format!("{z:?} {e}")))?;
            }
            for (i, d) in l.distribute.iter().enumerate() {
                check_label(&d.from).map_err(|e| {
                    fail(
                        format!("locality.distribute[{i}].from"),
                        format!("{:?} {e}", d.from),
                    )
                })?;
                for z in d.to.keys() {
                    check_label(z).map_err(|e| {
                        fail(
                            format!("locality.distribute[{i}].to.{z}"),
                            format!("{z:?} {e}"),
                        )
                    })?;
                }
                if d.to.values().all(|w| *w == 0) {
                    return Err(fail(
                        format!("locality.distribute[{i}].to"),
                        "the weights add up to 0",
                    ));
                }
            }
        }
        Ok(())
    }
}

// === impl Outlier ===

impl Outlier {
    fn check(&self, prefix: &str) -> Result<(), SpecError> {
        if self.consecutive_5xx == 0 || self.consecutive_gateway_errors == Some(0) {
            return Err(fail(
                format!("{prefix}consecutive5xx"),
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

impl OutlierDetection {
    /// Parses an `OutlierDetection` spec.
    pub fn from_spec(spec: &Value) -> Result<Self, SpecError> {
        // serde loses the field path through `flatten`: read the service,
        // then the rest as an `Outlier`.
        #[derive(Deserialize)]
        struct Service {
            service: ServiceRef,
        }
        let mut rest = spec.clone();
        let service = rest
            .as_object_mut()
            .and_then(|o| o.remove("service"))
            .ok_or_else(|| fail("service", "missing"))?;
        let Service { service } = typed(&serde_json::json!({ "service": service }))?;
        let outlier: Outlier = typed(&rest)?;
        outlier.check("")?;
        Ok(Self { service, outlier })
    }
}

// === impl RateLimit ===

impl RateLimit {
    /// Parses a `RateLimit` spec.
    pub fn from_spec(spec: &Value) -> Result<Self, SpecError> {
        let r: Self = typed(spec)?;
        if !(r.requests_per_second.is_finite() && r.requests_per_second > 0.0) {
            return Err(fail("requestsPerSecond", "must be more than 0"));
        }
        if r.burst == Some(0) {
            return Err(fail("burst", "must be at least 1"));
        }
        if let Some(n) = &r.route {
            check_key(n).map_err(|e| fail("route", format!("{n:?} {e}")))?;
        }
        Ok(r)
    }

    /// The bucket size.
    pub fn bucket(&self) -> f64 {
        self.burst
            .map_or_else(|| self.requests_per_second.ceil().max(1.0), f64::from)
    }
}

// === small types ===

impl TryFrom<String> for Dur {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        let d = humantime::parse_duration(&s)
            .map_err(|e| format!("{s:?} is not a duration ({e}); write e.g. 500ms, 2s, 1m"))?;
        if d.is_zero() {
            return Err(format!("{s:?} must be more than zero"));
        }
        Ok(Dur(d))
    }
}

impl From<Dur> for String {
    fn from(d: Dur) -> String {
        humantime::format_duration(d.0).to_string()
    }
}

impl TryFrom<f64> for Percent {
    type Error = String;

    fn try_from(v: f64) -> Result<Self, String> {
        if (0.0..=100.0).contains(&v) {
            Ok(Percent(v))
        } else {
            Err(format!("{v} is not a percentage from 0 to 100"))
        }
    }
}

impl From<Percent> for f64 {
    fn from(p: Percent) -> f64 {
        p.0
    }
}

impl Percent {
    /// The share as a fraction, 0 to 1.
    pub fn fraction(self) -> f64 {
        self.0 / 100.0
    }
}

impl Pattern {
    /// Whether the whole of `v` matches.
    pub fn is_match(&self, v: &str) -> bool {
        self.anchored.is_match(v)
    }

    /// The expression as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl TryFrom<String> for Pattern {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        let anchored = regex::RegexBuilder::new(&format!("^(?:{s})$"))
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map_err(|e| format!("{s:?} is not a regular expression: {e}"))?;
        Ok(Self {
            source: s,
            anchored,
        })
    }
}

impl From<Pattern> for String {
    fn from(p: Pattern) -> String {
        p.source
    }
}

impl TryFrom<String> for HeaderKey {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        match http::HeaderName::from_bytes(s.as_bytes()) {
            Ok(h) if h.as_str() == s => Ok(Self(s)),
            Ok(_) => Err(format!("{s:?}: write header names in lowercase")),
            Err(_) => Err(format!("{s:?} is not a header name")),
        }
    }
}

impl From<HeaderKey> for String {
    fn from(h: HeaderKey) -> String {
        h.0
    }
}

impl HeaderKey {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for HeaderText {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        match http::HeaderValue::from_str(&s) {
            Ok(_) => Ok(Self(s)),
            Err(_) => Err(format!("{s:?} is not a header value")),
        }
    }
}

impl From<HeaderText> for String {
    fn from(h: HeaderText) -> String {
        h.0
    }
}

impl HeaderText {
    /// The value.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for MethodName {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        let token = !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b"-_".contains(&b));
        if token {
            Ok(Self(s))
        } else {
            Err(format!(
                "{s:?} is not a method; write it in capitals, e.g. GET"
            ))
        }
    }
}

impl From<MethodName> for String {
    fn from(m: MethodName) -> String {
        m.0
    }
}

impl MethodName {
    /// The method.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<Value> for GrpcCode {
    type Error = String;

    fn try_from(v: Value) -> Result<Self, String> {
        match &v {
            Value::Number(n) => n
                .as_u64()
                .filter(|n| *n <= 16)
                .and_then(|n| u8::try_from(n).ok())
                .map(GrpcCode)
                .ok_or_else(|| format!("{n} is not a gRPC status (0 to 16)")),
            Value::String(s) => s.parse(),
            _ => Err(format!("{v} is not a gRPC status")),
        }
    }
}

impl FromStr for GrpcCode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let norm = s.to_ascii_lowercase().replace('_', "-");
        GRPC_CODES
            .iter()
            .position(|c| *c == norm)
            .and_then(|i| u8::try_from(i).ok())
            .map(GrpcCode)
            .ok_or_else(|| {
                format!(
                    "{s:?} is not a gRPC status; one of {}",
                    GRPC_CODES.join(", ")
                )
            })
    }
}

impl From<GrpcCode> for String {
    fn from(c: GrpcCode) -> String {
        c.to_string()
    }
}

impl fmt::Display for GrpcCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(GRPC_CODES.get(usize::from(self.0)).unwrap_or(&"unknown"))
    }
}

fn one() -> u32 {
    1
}
fn five() -> u32 {
    5
}
fn ten() -> u32 {
    10
}
fn moved() -> u16 {
    301
}
fn hundred() -> Percent {
    Percent(100.0)
}
fn twenty() -> Percent {
    Percent(20.0)
}
fn ten_percent() -> Percent {
    Percent(10.0)
}
fn ten_seconds() -> Dur {
    Dur(Duration::from_secs(10))
}
fn thirty_seconds() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_retry_on() -> Vec<RetryOn> {
    vec![
        RetryOn::ConnectFailure,
        RetryOn::Reset,
        RetryOn::GatewayError,
    ]
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            percent: twenty(),
            min_per_second: ten(),
        }
    }
}

impl HeaderEdit {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}
