//! Istio's `VirtualService` as native `Route`s (one per host) and its
//! `DestinationRule` as a native `Backend`.

use std::collections::{BTreeMap, BTreeSet};

use trellis_federation::policy::traffic::{
    Backend, ConnectionPool, Dur, Fault, FaultAbort, FaultDelay, GrpcCode, HeaderEdit, HeaderKey,
    HeaderText, LbPolicy, LoadBalancer, MethodName, Mirror, Outlier, PathMatch, Pattern, Percent,
    Redirect, RequestMatch, Retries, RetryBudget, RetryOn, Rewrite, Route, RouteRule, StringMatch,
    Subset, WeightedBackend,
};
use trellis_federation::policy::{self, Principal, ServiceRef};

use super::{At, Fields, Native, Result, Source, native};

/// A destination as Istio names it: a service of the mesh, perhaps a subset
/// and a port (with its path, to name it if it cannot be kept).
#[derive(Debug, Clone)]
struct Dest {
    service: ServiceRef,
    subset: Option<String>,
    port: Option<(u16, String)>,
}

/// One `http` route, read; what it becomes depends on the host it is
/// translated for (a destination that is that host is "the route's own").
#[derive(Debug)]
struct HttpRule<'a> {
    at: At<'a>,
    name: Option<String>,
    matches: Vec<Match>,
    backends: Vec<(Dest, u32)>,
    redirect: Option<Redirect>,
    /// `rewrite.uri`: a prefix or a whole path, depending on the match.
    rewrite_uri: Option<String>,
    rewrite_authority: Option<String>,
    mirror: Option<(Dest, Percent)>,
    request_headers: HeaderEdit,
    response_headers: HeaderEdit,
    timeout: Option<Dur>,
    retries: Option<Retries>,
    fault: Option<Fault>,
}

#[derive(Debug)]
struct Match {
    m: RequestMatch,
    port: Option<(u16, String)>,
}

impl Match {
    fn is_prefix(&self) -> bool {
        matches!(self.m.path, Some(PathMatch::Prefix(_)))
    }
}

/// A `VirtualService`: one `Route` per host, each with every `http` route.
pub(super) fn virtual_service(src: &Source<'_>) -> Result<Vec<Native>> {
    let spec = src.spec.fields(&["hosts", "gateways", "http"])?;
    for g in spec.list("gateways")? {
        mesh_gateway(&g)?;
    }
    let hosts = spec.items("hosts", "service")?;
    let mut services: Vec<ServiceRef> = Vec::new();
    for h in &hosts {
        let s = h.service(src.namespace)?;
        if services.contains(&s) {
            return Err(h.fail(format!("names {s} again")));
        }
        services.push(s);
    }
    let http_at = spec.req("http")?;
    let http = http_at.list()?;
    if http.is_empty() {
        return Err(http_at.fail("must have at least one route"));
    }
    let rules = http
        .iter()
        .map(|r| http_rule(r, src.namespace))
        .collect::<Result<Vec<_>>>()?;
    let port = route_port(&rules)?;
    for r in &rules {
        check_dest_ports(r, port.as_ref())?;
    }
    let suffixes: Vec<String> = services.iter().map(ToString::to_string).collect();
    let names = src.names(&suffixes)?;
    services
        .into_iter()
        .zip(names)
        .map(|(service, name)| {
            let mut out = Vec::new();
            let mut seen = BTreeSet::new();
            for r in &rules {
                for nr in native_rules(r, &service) {
                    if let Some(n) = &nr.name
                        && !seen.insert(n.clone())
                    {
                        return Err(r.at.below("name").fail(format!(
                            "{n:?} names an earlier rule too (a rule whose uri rewrite meets prefix and other matches becomes NAME-1, NAME-2, …)"
                        )));
                    }
                    out.push(nr);
                }
            }
            let route = Route {
                service,
                port: port.as_ref().map(|(p, _)| *p),
                rules: out,
            };
            native("Route", name, &route)
        })
        .collect()
}

/// Trellis routes the calls of the mesh's own sidecars: the gateway `mesh`.
fn mesh_gateway(g: &At<'_>) -> Result<()> {
    match g.str()? {
        "mesh" => Ok(()),
        other => Err(g.fail(format!(
            "{other:?}: not supported by Trellis, which routes mesh traffic only (the gateway \"mesh\")"
        ))),
    }
}

fn http_rule<'a>(at: &At<'a>, namespace: &str) -> Result<HttpRule<'a>> {
    let f = at.fields(&[
        "name",
        "match",
        "route",
        "redirect",
        "rewrite",
        "timeout",
        "retries",
        "fault",
        "mirror",
        "mirrorPercentage",
        "mirrorPercent",
        "mirrors",
        "headers",
    ])?;
    let name = f.get("name").map(|n| rule_name(&n)).transpose()?;
    let matches = f
        .list("match")?
        .iter()
        .map(request_match)
        .collect::<Result<Vec<_>>>()?;
    let routes = f.list("route")?;
    let mut backends = Vec::new();
    for d in &routes {
        let df = d.fields(&["destination", "weight"])?;
        let dest = destination(&df.req("destination")?, namespace)?;
        // Istio: a lone destination takes everything, and with several an
        // unweighted one takes nothing.
        let weight = match df.get("weight") {
            Some(w) => w.u32()?,
            None if routes.len() == 1 => 1,
            None => 0,
        };
        backends.push((dest, weight));
    }
    if !backends.is_empty() && backends.iter().all(|(_, w)| *w == 0) {
        return Err(f.req("route")?.fail("the weights add up to 0"));
    }
    let redirect = f.get("redirect").map(|r| redirect(&r)).transpose()?;
    match &redirect {
        Some(_) => {
            if let Some(k) = ["route", "rewrite", "retries", "mirror", "mirrors"]
                .into_iter()
                .find(|k| f.get(k).is_some())
            {
                return Err(f.req("redirect")?.fail(format!(
                    "a redirect is answered by the caller's sidecar; Trellis takes no {k} with it"
                )));
            }
        }
        None if backends.is_empty() => {
            return Err(at.fail("give route (or redirect): Trellis translates no other action"));
        }
        None => {}
    }
    let (mut rewrite_uri, mut rewrite_authority) = (None, None);
    if let Some(rw) = f.get("rewrite") {
        let rf = rw.fields(&["uri", "authority"])?;
        if let Some(u) = rf.get("uri") {
            // Without a uri match, Istio rewrites its implicit prefix "/",
            // joining the rest of the path onto the new one; Trellis has no
            // such rewrite.
            if matches.is_empty() {
                return Err(u.fail(
                    "a rule without a match rewrites Istio's implicit prefix \"/\", which Trellis does not; add a uri match",
                ));
            }
            if let Some(i) = matches.iter().position(|m| m.m.path.is_none()) {
                return Err(at.below(&format!("match[{i}]")).fail(
                    "has no uri, so rewrite.uri would rewrite Istio's implicit prefix \"/\", which Trellis does not; give it a uri match",
                ));
            }
            rewrite_uri = Some(u.http_path()?);
        }
        if let Some(a) = rf.get("authority") {
            rewrite_authority = Some(a.str()?.to_owned());
        }
        if rewrite_uri.is_none() && rewrite_authority.is_none() {
            return Err(rw.fail("give uri or authority"));
        }
    }
    let mirror = mirror(&f, namespace)?;
    let (request_headers, response_headers) = match f.get("headers") {
        Some(h) => {
            let hf = h.fields(&["request", "response"])?;
            (
                hf.get("request").map(|r| header_edit(&r)).transpose()?,
                hf.get("response").map(|r| header_edit(&r)).transpose()?,
            )
        }
        None => (None, None),
    };
    let timeout = f
        .get("timeout")
        .map(|t| t.duration())
        .transpose()?
        .flatten();
    let retries = f.get("retries").map(|r| retries(&r)).transpose()?.flatten();
    if let (Some(t), Some(r)) = (&timeout, &retries)
        && let Some(p) = &r.per_try_timeout
        && p.0 > t.0
    {
        return Err(f
            .req("retries")?
            .below("perTryTimeout")
            .fail("is longer than the route's timeout, which bounds every try"));
    }
    Ok(HttpRule {
        at: at.clone(),
        name,
        matches,
        backends,
        redirect,
        rewrite_uri,
        rewrite_authority,
        mirror,
        request_headers: request_headers.unwrap_or_default(),
        response_headers: response_headers.unwrap_or_default(),
        timeout,
        retries,
        fault: f.get("fault").map(|x| fault(&x)).transpose()?,
    })
}

fn rule_name(at: &At<'_>) -> Result<String> {
    let n = at.str()?;
    policy::check_key(n).map_err(|e| at.fail(format!("{n:?} {e}")))?;
    Ok(n.to_owned())
}

fn request_match(at: &At<'_>) -> Result<Match> {
    let f = at.fields(&[
        "uri",
        "method",
        "headers",
        "withoutHeaders",
        "queryParams",
        "port",
        "sourceNamespace",
        "gateways",
        "ignoreUriCase",
    ])?;
    for g in f.list("gateways")? {
        mesh_gateway(&g)?;
    }
    if let Some(i) = f.get("ignoreUriCase")
        && i.bool()?
    {
        return Err(i.fail("not supported by Trellis: paths match case-sensitively"));
    }
    let mut m = RequestMatch::default();
    if let Some(u) = f.get("uri") {
        let uf = u.fields(&["exact", "prefix", "regex"])?;
        m.path = Some(match one_of(&uf, &["exact", "prefix", "regex"])? {
            ("exact", v) => PathMatch::Exact(v.http_path()?),
            ("prefix", v) => PathMatch::Prefix(v.http_path()?),
            (_, v) => PathMatch::Regex(v.parse::<Pattern>()?),
        });
    }
    if let Some(me) = f.get("method") {
        let mf = me.fields(&["exact", "prefix", "regex"])?;
        m.method = Some(match one_of(&mf, &["exact", "prefix", "regex"])? {
            ("exact", v) => v.parse::<MethodName>()?,
            (_, v) => {
                return Err(v.fail("not supported by Trellis, which matches a method exactly"));
            }
        });
    }
    if let Some(h) = f.get("headers") {
        for (name, v) in h.entries()? {
            // Istio skips these names in `headers`; Trellis will not guess
            // what was meant by them.
            if ["uri", "scheme", "method", "authority"]
                .contains(&name.to_ascii_lowercase().as_str())
            {
                return Err(v.fail(
                    "Istio ignores this header name; use the match's own field (uri, method) or leave it out",
                ));
            }
            let key = header_key(name, &v)?;
            let sm = string_match(&v)?;
            if m.headers.insert(key, sm).is_some() {
                return Err(v.fail("names a header an earlier entry names too"));
            }
        }
    }
    if let Some(h) = f.get("withoutHeaders") {
        for (name, v) in h.entries()? {
            let key = header_key(name, &v)?;
            if !v.fields(&["exact", "prefix", "regex"])?.is_empty() {
                return Err(v.fail(
                    "not supported by Trellis: only {} (the header is absent) can be negated",
                ));
            }
            if m.headers.insert(key, StringMatch::Present(false)).is_some() {
                return Err(v.fail("names a header that headers matches too"));
            }
        }
    }
    if let Some(q) = f.get("queryParams") {
        for (name, v) in q.entries()? {
            m.query.insert(name.to_owned(), string_match(&v)?);
        }
    }
    if let Some(ns) = f.get("sourceNamespace") {
        let s = ns.str()?;
        let p: Principal = format!("ns:{s}").parse().map_err(|e: String| ns.fail(e))?;
        m.from.push(p);
    }
    let port = match f.get("port") {
        Some(p) => Some((p.port()?, p.path.clone())),
        None => None,
    };
    Ok(Match { m, port })
}

/// An Istio `StringMatch` of a header or query parameter; `{}` matches
/// presence, as in Istio.
fn string_match(at: &At<'_>) -> Result<StringMatch> {
    let f = at.fields(&["exact", "prefix", "regex"])?;
    if f.is_empty() {
        return Ok(StringMatch::Present(true));
    }
    Ok(match one_of(&f, &["exact", "prefix", "regex"])? {
        ("exact", v) => StringMatch::Exact(v.str()?.to_owned()),
        ("prefix", v) => StringMatch::Prefix(v.str()?.to_owned()),
        (_, v) => StringMatch::Regex(v.parse::<Pattern>()?),
    })
}

/// The one of `keys` that is given.
fn one_of<'a>(f: &Fields<'a>, keys: &[&'static str]) -> Result<(&'static str, At<'a>)> {
    let at = f.here();
    let given: Vec<_> = keys
        .iter()
        .filter_map(|k| f.get(k).map(|v| (*k, v)))
        .collect();
    match given.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(at.fail(format!("give one of {}", keys.join(", ")))),
        _ => Err(at.fail(format!("give only one of {}", keys.join(", ")))),
    }
}

fn header_key(name: &str, at: &At<'_>) -> Result<HeaderKey> {
    HeaderKey::try_from(name.to_ascii_lowercase()).map_err(|e| at.fail(e))
}

fn destination(at: &At<'_>, namespace: &str) -> Result<Dest> {
    let f = at.fields(&["host", "subset", "port"])?;
    let service = f.req("host")?.service(namespace)?;
    let subset = f
        .get("subset")
        .map(|s| {
            let v = s.str()?;
            policy::check_label(v).map_err(|e| s.fail(format!("{v:?} {e}")))?;
            Ok(v.to_owned())
        })
        .transpose()?;
    let port = match f.get("port") {
        Some(p) => {
            let n = p.fields(&["number"])?.req("number")?;
            Some((n.port()?, n.path.clone()))
        }
        None => None,
    };
    Ok(Dest {
        service,
        subset,
        port,
    })
}

fn redirect(at: &At<'_>) -> Result<Redirect> {
    let f = at.fields(&["uri", "authority", "redirectCode", "scheme", "port"])?;
    let status = match f.get("redirectCode") {
        Some(c) => c.redirect_code()?,
        None => 301,
    };
    Ok(Redirect {
        scheme: f.get("scheme").map(|s| s.scheme()).transpose()?,
        host: f
            .get("authority")
            .map(|a| a.str().map(str::to_owned))
            .transpose()?,
        port: f.get("port").map(|p| p.port()).transpose()?,
        path: f.get("uri").map(|u| u.http_path()).transpose()?,
        status,
    })
}

fn mirror(f: &Fields<'_>, namespace: &str) -> Result<Option<(Dest, Percent)>> {
    let (dest, percent) = match (f.get("mirror"), f.get("mirrors")) {
        (Some(_), Some(m)) => return Err(m.fail("give mirror or mirrors, not both")),
        (Some(m), None) => {
            let d = destination(&m, namespace)?;
            let percent = match (f.get("mirrorPercentage"), f.get("mirrorPercent")) {
                (Some(_), Some(p)) => {
                    return Err(p.fail("give mirrorPercentage or mirrorPercent, not both"));
                }
                (Some(p), None) => Some(percentage(&p)?),
                (None, Some(p)) => Some(p.percent()?),
                (None, None) => None,
            };
            (d, percent)
        }
        (None, Some(ms)) => {
            if let Some(p) = f.get("mirrorPercentage").or_else(|| f.get("mirrorPercent")) {
                return Err(p.fail("goes with mirror; give each of mirrors its percentage"));
            }
            let list = ms.list()?;
            let [one] = list.as_slice() else {
                return Err(ms.fail("not supported by Trellis with more than one mirror"));
            };
            let mf = one.fields(&["destination", "percentage"])?;
            let d = destination(&mf.req("destination")?, namespace)?;
            let percent = mf.get("percentage").map(|p| percentage(&p)).transpose()?;
            (d, percent)
        }
        (None, None) => {
            if let Some(p) = f.get("mirrorPercentage").or_else(|| f.get("mirrorPercent")) {
                return Err(p.fail("there is no mirror to apply it to"));
            }
            return Ok(None);
        }
    };
    // Istio mirrors every request when no share is given.
    Ok(Some((dest, percent.unwrap_or(Percent(100.0)))))
}

/// Istio `Percent`: `{value: 0.5}`.
fn percentage(at: &At<'_>) -> Result<Percent> {
    at.fields(&["value"])?.req("value")?.percent()
}

fn header_edit(at: &At<'_>) -> Result<HeaderEdit> {
    let f = at.fields(&["set", "add", "remove"])?;
    let mut edit = HeaderEdit::default();
    for (key, map) in [("set", &mut edit.set), ("add", &mut edit.add)] {
        if let Some(m) = f.get(key) {
            for (name, v) in m.entries()? {
                let k = header_key(name, &v)?;
                let text = v.parse::<HeaderText>()?;
                if map.insert(k, text).is_some() {
                    return Err(v.fail("names a header an earlier entry names too"));
                }
            }
        }
    }
    for r in f.list("remove")? {
        edit.remove.push(r.header_name()?);
    }
    Ok(edit)
}

fn retries(at: &At<'_>) -> Result<Option<Retries>> {
    let f = at.fields(&[
        "attempts",
        "perTryTimeout",
        "retryOn",
        "retryRemoteLocalities",
    ])?;
    if let Some(r) = f.get("retryRemoteLocalities")
        && r.bool()?
    {
        return Err(r.fail("not supported by Trellis"));
    }
    let attempts_at = f.req("attempts")?;
    let attempts = attempts_at.u32()?;
    if attempts == 0 {
        // Istio: no retries.
        return Ok(None);
    }
    if attempts > 10 {
        return Err(attempts_at.fail(format!("{attempts}: Trellis allows 1 to 10")));
    }
    let per_try_timeout = f
        .get("perTryTimeout")
        .map(|t| t.duration())
        .transpose()?
        .flatten();
    let (on, status_codes, grpc_statuses) = match f.get("retryOn") {
        Some(r) => retry_on(&r)?,
        // Istio's default: connect-failure, refused-stream, unavailable,
        // cancelled and retriable-status-codes with 503.
        None => (
            vec![RetryOn::ConnectFailure, RetryOn::Reset],
            vec![503],
            vec![GrpcCode(14), GrpcCode(1)],
        ),
    };
    Ok(Some(Retries {
        attempts,
        per_try_timeout,
        on,
        status_codes,
        grpc_statuses,
        budget: RetryBudget::default(),
    }))
}

type RetryConditions = (Vec<RetryOn>, Vec<u16>, Vec<GrpcCode>);

/// Istio's `retryOn`, Envoy's comma-separated conditions.
fn retry_on(at: &At<'_>) -> Result<RetryConditions> {
    let (mut on, mut codes, mut grpc) = (Vec::new(), Vec::new(), Vec::new());
    for token in at
        .str()?
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        let cond = match token {
            "5xx" => Some(RetryOn::ServerError),
            "gateway-error" => Some(RetryOn::GatewayError),
            // A refused HTTP/2 stream is a reset one that was never processed.
            "reset" | "refused-stream" => Some(RetryOn::Reset),
            "connect-failure" => Some(RetryOn::ConnectFailure),
            // The codes come as numbers in the same list; without any, Istio
            // adds nothing.
            "retriable-status-codes" => None,
            "cancelled" | "deadline-exceeded" | "internal" | "resource-exhausted"
            | "unavailable" => {
                let c: GrpcCode = token.parse().map_err(|e: String| at.fail(e))?;
                if !grpc.contains(&c) {
                    grpc.push(c);
                }
                None
            }
            t if t.bytes().all(|b| b.is_ascii_digit()) => {
                let code = t
                    .parse::<u16>()
                    .ok()
                    .filter(|c| (100..=599).contains(c))
                    .ok_or_else(|| at.fail(format!("{t} is not an HTTP status")))?;
                if !codes.contains(&code) {
                    codes.push(code);
                }
                None
            }
            other => {
                return Err(at.fail(format!(
                    "{other:?} is not supported by Trellis; it retries on 5xx, gateway-error, reset, connect-failure, refused-stream, retriable-status-codes, HTTP status codes and the gRPC statuses cancelled, deadline-exceeded, internal, resource-exhausted and unavailable"
                )));
            }
        };
        if let Some(c) = cond
            && !on.contains(&c)
        {
            on.push(c);
        }
    }
    Ok((on, codes, grpc))
}

fn fault(at: &At<'_>) -> Result<Fault> {
    let f = at.fields(&["delay", "abort"])?;
    let delay = match f.get("delay") {
        Some(d) => {
            let df = d.fields(&["fixedDelay", "percentage", "percent"])?;
            let fixed_at = df.req("fixedDelay")?;
            let fixed = fixed_at
                .duration()?
                .ok_or_else(|| fixed_at.fail("must be more than zero"))?;
            Some(FaultDelay {
                fixed,
                percent: fault_percent(&df)?,
            })
        }
        None => None,
    };
    let abort = match f.get("abort") {
        Some(a) => {
            let af = a.fields(&["httpStatus", "grpcStatus", "percentage"])?;
            let (status, grpc_status) = match one_of(&af, &["httpStatus", "grpcStatus"])? {
                ("httpStatus", s) => {
                    let code = s.u32()?;
                    let code = u16::try_from(code)
                        .ok()
                        .filter(|c| (400..=599).contains(c))
                        .ok_or_else(|| s.fail(format!("{code}: Trellis aborts with 400 to 599")))?;
                    (Some(code), None)
                }
                (_, g) => {
                    let c: GrpcCode = g.str()?.parse().map_err(|e: String| g.fail(e))?;
                    (None, Some(c))
                }
            };
            Some(FaultAbort {
                status,
                grpc_status,
                percent: fault_percent(&af)?,
            })
        }
        None => None,
    };
    if delay.is_none() && abort.is_none() {
        return Err(at.fail("give delay, abort or both"));
    }
    Ok(Fault { delay, abort })
}

/// A fault's share: `percentage.value`, the older whole `percent`, or,
/// as in Istio, every request.
fn fault_percent(f: &Fields<'_>) -> Result<Percent> {
    match (f.get("percentage"), f.get("percent")) {
        (Some(_), Some(p)) => Err(p.fail("give percentage or percent, not both")),
        (Some(p), None) => percentage(&p),
        (None, Some(p)) => p.percent(),
        (None, None) => Ok(Percent(100.0)),
    }
}

/// The port the whole `VirtualService` routes: Trellis routes one port of
/// a service, or all of them, so every match must name the same port, or
/// none may.
fn route_port(rules: &[HttpRule<'_>]) -> Result<Option<(u16, String)>> {
    let mut first: Option<(u16, String)> = None;
    let mut without: Option<String> = None;
    for r in rules {
        if r.matches.is_empty() {
            without.get_or_insert_with(|| r.at.path.clone());
        }
        for (j, m) in r.matches.iter().enumerate() {
            match (&m.port, &first) {
                (None, _) => {
                    without.get_or_insert_with(|| format!("{}.match[{j}]", r.at.path));
                }
                (Some((p, at)), None) => first = Some((*p, at.clone())),
                (Some((p, at)), Some((q, q_at))) if p != q => {
                    return Err(super::Refusal {
                        field: at.clone(),
                        reason: format!(
                            "{p}, while {q_at} is {q}: Trellis routes one port of a service, or every port"
                        ),
                    });
                }
                _ => {}
            }
        }
    }
    if let (Some((p, at)), Some(w)) = (&first, without) {
        return Err(super::Refusal {
            field: at.clone(),
            reason: format!(
                "{p}, while {w} has no port and applies to every port: Trellis routes one port of a service, or every port; give every match the same port, or none"
            ),
        });
    }
    Ok(first)
}

/// Trellis sends a request on to the port it was made to, so a destination
/// may only name that port.
fn check_dest_ports(r: &HttpRule<'_>, port: Option<&(u16, String)>) -> Result<()> {
    let dests = r
        .backends
        .iter()
        .map(|(d, _)| d)
        .chain(r.mirror.as_ref().map(|(d, _)| d));
    for d in dests {
        let Some((p, at)) = &d.port else { continue };
        let reason = match port {
            Some((q, _)) if q == p => continue,
            Some((q, q_at)) => format!(
                "{p}: Trellis sends a request on to the port it was made to, here {q} ({q_at})"
            ),
            None => format!(
                "{p}: Trellis sends a request on to the port it was made to; give every match port: {p}, so that the route is for that port alone, or leave this out"
            ),
        };
        return Err(super::Refusal {
            field: at.clone(),
            reason,
        });
    }
    Ok(())
}

/// The native rules of `r` for the route of `own`: one, or, when a uri
/// rewrite meets matches of different kinds, one per run of prefix matches
/// and one per run of others, in order, since Istio replaces the matched
/// prefix of a prefix match and the whole path of any other.
fn native_rules(r: &HttpRule<'_>, own: &ServiceRef) -> Vec<RouteRule> {
    let dest = |d: &Dest| (d.service != *own).then(|| d.service.clone());
    let base = RouteRule {
        name: r.name.clone(),
        matches: Vec::new(),
        backends: r
            .backends
            .iter()
            .map(|(d, w)| WeightedBackend {
                service: dest(d),
                subset: d.subset.clone(),
                weight: *w,
            })
            .collect(),
        request_headers: r.request_headers.clone(),
        response_headers: r.response_headers.clone(),
        redirect: r.redirect.clone(),
        rewrite: None,
        mirror: r.mirror.as_ref().map(|(d, p)| Mirror {
            service: dest(d),
            subset: d.subset.clone(),
            percent: *p,
        }),
        timeout: r.timeout,
        retries: r.retries.clone(),
        fault: r.fault.clone(),
    };
    let rewrite = |prefix: bool| -> Option<Rewrite> {
        if r.rewrite_uri.is_none() && r.rewrite_authority.is_none() {
            return None;
        }
        let uri = r.rewrite_uri.clone();
        Some(Rewrite {
            path: if prefix { None } else { uri.clone() },
            prefix: if prefix { uri } else { None },
            authority: r.rewrite_authority.clone(),
        })
    };
    if r.rewrite_uri.is_none() {
        return vec![RouteRule {
            matches: r.matches.iter().map(|m| m.m.clone()).collect(),
            rewrite: rewrite(false),
            ..base
        }];
    }
    let mut runs: Vec<(bool, Vec<RequestMatch>)> = Vec::new();
    for m in &r.matches {
        match runs.last_mut() {
            Some((p, ms)) if *p == m.is_prefix() => ms.push(m.m.clone()),
            _ => runs.push((m.is_prefix(), vec![m.m.clone()])),
        }
    }
    let split = runs.len() > 1;
    runs.into_iter()
        .enumerate()
        .map(|(i, (prefix, matches))| RouteRule {
            name: match (&r.name, split) {
                (Some(n), true) => Some(format!("{n}-{}", i + 1)),
                (n, _) => n.clone(),
            },
            matches,
            rewrite: rewrite(prefix),
            ..base.clone()
        })
        .collect()
}

/// A `DestinationRule`: one `Backend`.
pub(super) fn destination_rule(src: &Source<'_>) -> Result<Vec<Native>> {
    let spec = src.spec.fields(&["host", "trafficPolicy", "subsets"])?;
    let service = spec.req("host")?.service(src.namespace)?;
    let mut subsets = Vec::new();
    for s in spec.list("subsets")? {
        let sf = s.fields(&["name", "labels"])?;
        let name_at = sf.req("name")?;
        let name = name_at.str()?;
        policy::check_label(name).map_err(|e| name_at.fail(format!("{name:?} {e}")))?;
        if subsets.iter().any(|x: &Subset| x.name == name) {
            return Err(name_at.fail(format!("{name:?} names an earlier subset too")));
        }
        let labels_at = sf.get("labels").ok_or_else(|| {
            s.below("labels")
                .fail("missing: a Trellis subset selects endpoints by at least one label")
        })?;
        let mut labels = BTreeMap::new();
        for (k, v) in labels_at.entries()? {
            labels.insert(k.to_owned(), v.str()?.to_owned());
        }
        if labels.is_empty() {
            return Err(labels_at.fail("must name at least one label"));
        }
        subsets.push(Subset {
            name: name.to_owned(),
            labels,
        });
    }
    let mut backend = Backend {
        service,
        subsets,
        load_balancer: LoadBalancer::default(),
        connection_pool: None,
        outlier_detection: None,
        locality: None,
    };
    if let Some(tp) = spec.get("trafficPolicy") {
        let tf = tp.fields(&["loadBalancer", "connectionPool", "outlierDetection"])?;
        if let Some(lb) = tf.get("loadBalancer") {
            backend.load_balancer = load_balancer(&lb)?;
        }
        if let Some(cp) = tf.get("connectionPool") {
            backend.connection_pool = connection_pool(&cp)?;
        }
        if let Some(od) = tf.get("outlierDetection") {
            backend.outlier_detection = Some(outlier(&od)?);
        }
    }
    Ok(vec![native("Backend", src.own_name()?, &backend)?])
}

fn load_balancer(at: &At<'_>) -> Result<LoadBalancer> {
    let f = at.fields(&["simple", "consistentHash"])?;
    match one_of(&f, &["simple", "consistentHash"])? {
        ("simple", s) => {
            let policy = match s.str()? {
                "ROUND_ROBIN" => LbPolicy::RoundRobin,
                // Trellis' default weighs load and latency, which is what
                // least-request asks for and at least as good as random.
                "LEAST_REQUEST" | "LEAST_CONN" | "RANDOM" | "UNSPECIFIED" => LbPolicy::P2c,
                other => {
                    return Err(s.fail(format!(
                        "{other:?} is not supported by Trellis; it balances ROUND_ROBIN, LEAST_REQUEST, LEAST_CONN, RANDOM and UNSPECIFIED"
                    )));
                }
            };
            Ok(LoadBalancer {
                policy,
                hash_header: None,
            })
        }
        (_, ch) => {
            let header = ch.fields(&["httpHeaderName"])?.req("httpHeaderName")?;
            Ok(LoadBalancer {
                policy: LbPolicy::ConsistentHash,
                hash_header: Some(header.header_name()?),
            })
        }
    }
}

fn connection_pool(at: &At<'_>) -> Result<Option<ConnectionPool>> {
    let f = at.fields(&["tcp", "http"])?;
    // Istio reads 0 as "not set".
    let limit = |a: Option<At<'_>>| -> Result<Option<u32>> {
        Ok(a.map(|a| a.u32()).transpose()?.filter(|n| *n != 0))
    };
    let max_connections = match f.get("tcp") {
        Some(t) => limit(t.fields(&["maxConnections"])?.get("maxConnections"))?,
        None => None,
    };
    let (max_requests, max_pending_requests) = match f.get("http") {
        Some(h) => {
            let hf = h.fields(&["http2MaxRequests", "http1MaxPendingRequests"])?;
            let max = limit(hf.get("http2MaxRequests"))?;
            let pending = limit(hf.get("http1MaxPendingRequests"))?;
            if let (None, Some(_)) = (max, pending) {
                return Err(hf.req("http1MaxPendingRequests")?.fail(
                    "Trellis queues requests only behind a limit on requests in flight; give http2MaxRequests too",
                ));
            }
            (max, pending)
        }
        None => (None, None),
    };
    if max_connections.is_none() && max_requests.is_none() {
        return Ok(None);
    }
    Ok(Some(ConnectionPool {
        max_requests,
        max_pending_requests,
        max_connections,
    }))
}

fn outlier(at: &At<'_>) -> Result<Outlier> {
    let f = at.fields(&[
        "consecutive5xxErrors",
        "consecutiveGatewayErrors",
        "interval",
        "baseEjectionTime",
        "maxEjectionPercent",
    ])?;
    let positive = |key: &str, default: Dur| -> Result<Dur> {
        match f.get(key) {
            Some(a) => a
                .duration()?
                .ok_or_else(|| a.fail("must be more than zero")),
            None => Ok(default),
        }
    };
    // Istio's defaults, spelled out so they hold whatever Trellis' are.
    let consecutive_5xx = match f.get("consecutive5xxErrors") {
        Some(a) => match a.u32()? {
            0 => {
                return Err(a.fail(
                    "0 turns 5xx ejection off in Istio, which Trellis does not do; give 1 or more",
                ));
            }
            n => n,
        },
        None => 5,
    };
    let consecutive_gateway_errors = f
        .get("consecutiveGatewayErrors")
        .map(|a| a.u32())
        .transpose()?
        .filter(|n| *n != 0);
    let max_ejection_percent = match f.get("maxEjectionPercent") {
        Some(a) => {
            let p = a.percent()?;
            if p.0 == 0.0 {
                return Err(a.fail(
                    "0 ejects nothing in Istio; Trellis always lets one endpoint be ejected",
                ));
            }
            p
        }
        None => Percent(10.0),
    };
    Ok(Outlier {
        consecutive_5xx,
        consecutive_gateway_errors,
        interval: positive("interval", Dur(std::time::Duration::from_secs(10)))?,
        base_ejection_time: positive("baseEjectionTime", Dur(std::time::Duration::from_secs(30)))?,
        max_ejection_percent,
    })
}
