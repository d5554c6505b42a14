//! The store's traffic policy, per destination service, as the caller's
//! sidecar applies it: the `Route` rules in order, the `Backend` (subsets,
//! balancing, limits, outlier detection, locality) and the `RateLimit`s.
//!
//! Built once per revision with the store's own parser; a document that does
//! not parse is left out and reported in the revision's ack, and traffic to
//! its service goes on as without it (a route cannot fail closed the way an
//! authorization must: there is no safe default but the plain service).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use http::request::Parts;
use trellis_ca::SpiffeId;
use trellis_federation::policy::traffic::{Outlier, RouteRule};
use trellis_federation::policy::{Backend, Policy, RateLimit};
use trellis_federation::view::MeshState;

/// Every service's traffic policy.
#[derive(Debug, Default)]
pub(crate) struct Policies {
    by_service: HashMap<(String, String), Arc<ServicePolicy>>,
    /// Why each document that could not be applied was left out.
    pub(crate) skipped: Vec<String>,
}

/// One service's traffic policy.
#[derive(Debug, Default)]
pub(crate) struct ServicePolicy {
    /// Route rules, in the order they are tried.
    pub(crate) rules: Vec<Rule>,
    pub(crate) backend: Option<Backend>,
    pub(crate) outlier: Option<Outlier>,
    pub(crate) limits: Vec<Limit>,
}

/// One rule of a `Route`, with where it came from.
#[derive(Debug)]
pub(crate) struct Rule {
    /// `Route/NAME#INDEX`: logs, and the key of its balancing state.
    pub(crate) id: String,
    pub(crate) port: Option<u16>,
    pub(crate) rule: RouteRule,
}

/// One `RateLimit`.
#[derive(Debug)]
pub(crate) struct Limit {
    /// `RateLimit/NAME`, and its settings: the key of its bucket, so a
    /// changed limit starts a fresh bucket.
    pub(crate) key: String,
    pub(crate) spec: RateLimit,
}

static EMPTY: std::sync::LazyLock<Arc<ServicePolicy>> =
    std::sync::LazyLock::new(|| Arc::new(ServicePolicy::default()));

impl Policies {
    /// From the store's documents. Of two `Backend`s (or `OutlierDetection`s)
    /// for one service the first by name applies and the other is reported.
    /// `Route`s for one service are tried in name order, those for one port
    /// before those for every port.
    pub(crate) fn from_state(state: &MeshState) -> Self {
        let mut out = Self::default();
        let mut acc: BTreeMap<(String, String), ServicePolicy> = BTreeMap::new();
        let mut routes: Vec<(String, trellis_federation::policy::Route)> = Vec::new();
        let mut odocs: Vec<(String, (String, String), Outlier)> = Vec::new();
        // Documents come in key order (kind, then name).
        for kind in ["Route", "Backend", "RateLimit", "OutlierDetection"] {
            for p in state.policies_of(kind) {
                let doc = format!("{}/{}", p.kind, p.name);
                match p.parse() {
                    Ok(Policy::Route(r)) => routes.push((p.name.clone(), r)),
                    Ok(Policy::Backend(b)) => {
                        let key = svc_key(&b.service);
                        let sp = acc.entry(key.clone()).or_default();
                        if sp.backend.is_some() {
                            out.skipped.push(format!(
                                "{doc}: spec.service: {}.{} already has a Backend earlier by name; this one is not applied",
                                key.0, key.1
                            ));
                        } else {
                            sp.backend = Some(b);
                        }
                    }
                    Ok(Policy::RateLimit(r)) => {
                        let key = format!("{doc} {} {}", r.requests_per_second, r.bucket());
                        acc.entry(svc_key(&r.service))
                            .or_default()
                            .limits
                            .push(Limit { key, spec: r });
                    }
                    Ok(Policy::OutlierDetection(o)) => {
                        odocs.push((doc, svc_key(&o.service), o.outlier));
                    }
                    Ok(_) => {}
                    Err(e) => out
                        .skipped
                        .push(format!("{e} (not applied; traffic goes on without it)")),
                }
            }
        }
        // Port-specific routes first, each group in name order.
        routes.sort_by(|a, b| (a.1.port.is_none(), &a.0).cmp(&(b.1.port.is_none(), &b.0)));
        for (name, r) in routes {
            let sp = acc.entry(svc_key(&r.service)).or_default();
            for (i, rule) in r.rules.into_iter().enumerate() {
                sp.rules.push(Rule {
                    id: format!("Route/{name}#{i}"),
                    port: r.port,
                    rule,
                });
            }
        }
        for (doc, key, o) in odocs {
            let sp = acc.entry(key).or_default();
            match (&sp.backend, &sp.outlier) {
                (Some(b), _) if b.outlier_detection.is_some() => out.skipped.push(format!(
                    "{doc}: the service's Backend has outlierDetection, which wins; this one is not applied"
                )),
                (_, Some(_)) => out.skipped.push(format!(
                    "{doc}: the service has an OutlierDetection earlier by name; this one is not applied"
                )),
                _ => sp.outlier = Some(o),
            }
        }
        for sp in acc.values_mut() {
            if let Some(o) = sp
                .backend
                .as_ref()
                .and_then(|b| b.outlier_detection.clone())
            {
                sp.outlier = Some(o);
            }
        }
        out.by_service = acc.into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
        out
    }

    /// The policy of `name.namespace` (empty without documents).
    pub(crate) fn of(&self, name: &str, namespace: &str) -> Arc<ServicePolicy> {
        self.by_service
            .get(&(name.to_owned(), namespace.to_owned()))
            .cloned()
            .unwrap_or_else(|| EMPTY.clone())
    }
}

fn svc_key(s: &trellis_federation::policy::ServiceRef) -> (String, String) {
    (s.name().to_owned(), s.namespace().to_owned())
}

// === impl ServicePolicy ===

impl ServicePolicy {
    /// The first rule for `port` that matches the request of `caller`.
    pub(crate) fn select(&self, port: u16, req: &Parts, caller: &SpiffeId) -> Option<&Rule> {
        if self.rules.is_empty() {
            return None;
        }
        let query = req.uri.query().map(parse_query).unwrap_or_default();
        self.rules.iter().find(|r| {
            r.port.is_none_or(|p| p == port)
                && (r.rule.matches.is_empty()
                    || r.rule.matches.iter().any(|m| {
                        m.path.as_ref().is_none_or(|p| p.matches(req.uri.path()))
                            && m.method
                                .as_ref()
                                .is_none_or(|x| x.as_str() == req.method.as_str())
                            && m.headers
                                .iter()
                                .all(|(k, v)| v.matches_header(&req.headers, k.as_str()))
                            && m.query.iter().all(|(k, v)| {
                                v.matches(
                                    query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str()),
                                )
                            })
                            && (m.from.is_empty() || m.from.iter().any(|p| p.matches(caller)))
                    }))
        })
    }

    /// The labels subset `name` selects, if the `Backend` defines it.
    pub(crate) fn subset(&self, name: &str) -> Option<&BTreeMap<String, String>> {
        self.backend
            .as_ref()
            .and_then(|b| b.subset(name))
            .map(|s| &s.labels)
    }
}

/// Query parameters, percent-decoded (`+` is a space, as forms write it).
fn parse_query(q: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(q.as_bytes()).into_owned().collect()
}
