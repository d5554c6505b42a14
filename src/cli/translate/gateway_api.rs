//! The Gateway API's `HTTPRoute` and `GRPCRoute`, bound to Services as GAMMA
//! has it for a mesh, as native `Route`s: one per parent Service.
//!
//! The Gateway API orders matches by precedence (an exact path before a
//! prefix, a longer prefix before a shorter, and so on), where a native
//! `Route` takes its rules in order; so the matches are sorted, and a rule
//! whose matches fall apart in that order becomes several native rules.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use trellis_federation::policy::traffic::{
    Dur, HeaderEdit, HeaderKey, HeaderText, Mirror, PathMatch, Pattern, Percent, Redirect,
    RequestMatch, Rewrite, Route, RouteRule, Scheme, StringMatch, WeightedBackend,
};
use trellis_federation::policy::{self, ServiceRef};

use super::{At, Fields, Native, Refusal, Result, Source, native, regex_literal};

/// A Service a route is for, and the port if one.
#[derive(Debug)]
struct Parent {
    service: ServiceRef,
    port: Option<(u16, String)>,
}

/// A Service a request is sent or mirrored to, with its port and the path
/// of that port.
#[derive(Debug, Clone)]
struct Target {
    service: ServiceRef,
    port: (u16, String),
}

/// One rule, read; how it is split and for which parent is decided later.
#[derive(Debug)]
struct Rule<'a> {
    at: At<'a>,
    name: Option<String>,
    matches: Vec<Match>,
    backends: Vec<(Target, u32)>,
    request_headers: HeaderEdit,
    response_headers: HeaderEdit,
    redirect: Option<Redirect>,
    rewrite: Option<Rewrite>,
    mirror: Option<(Target, Percent)>,
    timeout: Option<Dur>,
}

/// A match and where it stands in the Gateway API's precedence: lower
/// first.
#[derive(Debug, Clone)]
struct Match {
    m: RequestMatch,
    /// Matches every request.
    all: bool,
    key: Precedence,
}

type Precedence = (
    u8,
    Reverse<usize>,
    Reverse<usize>,
    Reverse<usize>,
    Reverse<usize>,
);

/// What each kind of route may have.
struct Flavour {
    rule_fields: &'static [&'static str],
    filters: &'static [&'static str],
    /// Reads a match; `None` for the default of a rule without matches.
    read_match: fn(Option<&At<'_>>) -> Result<Match>,
}

const HTTP: Flavour = Flavour {
    rule_fields: &["name", "matches", "filters", "backendRefs", "timeouts"],
    filters: &[
        "RequestHeaderModifier",
        "ResponseHeaderModifier",
        "RequestRedirect",
        "URLRewrite",
        "RequestMirror",
    ],
    read_match: http_match,
};

const GRPC: Flavour = Flavour {
    rule_fields: &["name", "matches", "filters", "backendRefs"],
    filters: &[
        "RequestHeaderModifier",
        "ResponseHeaderModifier",
        "RequestMirror",
    ],
    read_match: grpc_match,
};

/// An `HTTPRoute`.
pub(super) fn http_route(src: &Source<'_>) -> Result<Vec<Native>> {
    route(src, &HTTP)
}

/// A `GRPCRoute`: a gRPC method is the path `/SERVICE/METHOD`.
pub(super) fn grpc_route(src: &Source<'_>) -> Result<Vec<Native>> {
    route(src, &GRPC)
}

fn route(src: &Source<'_>, flavour: &Flavour) -> Result<Vec<Native>> {
    let spec = src.spec.fields(&["parentRefs", "hostnames", "rules"])?;
    if let Some(h) = spec.get("hostnames")
        && !h.list()?.is_empty()
    {
        return Err(h.fail(
            "not supported by Trellis: a mesh route is for its parent Services, whatever the host",
        ));
    }
    let parents = parents(&spec, src.namespace)?;
    let rules_at = spec.req("rules")?;
    let rules = rules_at
        .list()?
        .iter()
        .map(|r| rule(r, src.namespace, flavour))
        .collect::<Result<Vec<_>>>()?;
    if rules.is_empty() {
        return Err(rules_at.fail("must have at least one rule"));
    }
    let order = precedence(&rules);
    let suffixes: Vec<String> = parents
        .iter()
        .map(|p| match &p.port {
            Some((port, _)) => format!("{}.{port}", p.service),
            None => p.service.to_string(),
        })
        .collect();
    let names = src.names(&suffixes)?;
    parents
        .iter()
        .zip(names)
        .map(|(parent, name)| {
            let route = Route {
                service: parent.service.clone(),
                port: parent.port.as_ref().map(|(p, _)| *p),
                rules: native_rules(&rules, &order, parent)?,
            };
            native("Route", name, &route)
        })
        .collect()
}

fn parents(spec: &Fields<'_>, namespace: &str) -> Result<Vec<Parent>> {
    let list = spec.items("parentRefs", "Service")?;
    let mut out: Vec<Parent> = Vec::new();
    for p in &list {
        let f = p.fields(&["group", "kind", "namespace", "name", "port"])?;
        // The Gateway API's defaults are group gateway.networking.k8s.io
        // and kind Gateway.
        let kind = f
            .get("kind")
            .map(|k| k.str())
            .transpose()?
            .unwrap_or("Gateway");
        if kind != "Service" {
            return Err(f.get("kind").unwrap_or_else(|| p.clone()).fail(format!(
                "a {kind} parent is not supported by Trellis, which routes mesh traffic, not ingress: give a Service (group \"\", kind Service)"
            )));
        }
        core_group(&f, p, "a Service parent")?;
        let service = service_ref(&f, namespace)?;
        let port = match f.get("port") {
            Some(a) => Some((a.port()?, a.path.clone())),
            None => None,
        };
        if out.iter().any(|o| {
            o.service == service && o.port.as_ref().map(|x| x.0) == port.as_ref().map(|x| x.0)
        }) {
            return Err(p.fail("names the same Service and port as an earlier parent"));
        }
        out.push(Parent { service, port });
    }
    Ok(out)
}

/// A reference to a core Service needs group "" (or "core").
fn core_group(f: &Fields<'_>, at: &At<'_>, what: &str) -> Result<()> {
    match f.get("group") {
        Some(g) => match g.str()? {
            "" | "core" => Ok(()),
            other => Err(g.fail(format!(
                "{other:?}: {what} is a core Service, group \"\""
            ))),
        },
        None => Err(at.below("group").fail(format!(
            "missing: {what} needs group \"\" (core); without it the Gateway API reads gateway.networking.k8s.io"
        ))),
    }
}

/// `name` and `namespace` (default: the route's) as a mesh service.
fn service_ref(f: &Fields<'_>, namespace: &str) -> Result<ServiceRef> {
    let name_at = f.req("name")?;
    let name = name_at.str()?;
    let ns = match f.get("namespace") {
        Some(n) => n.str()?,
        None => namespace,
    };
    policy::check_label(name).map_err(|e| name_at.fail(format!("{name:?} {e}")))?;
    format!("{name}.{ns}").parse().map_err(|e: String| {
        f.get("namespace")
            .unwrap_or_else(|| name_at.clone())
            .fail(e)
    })
}

/// A backend or mirror reference: a core Service (the default) and its
/// port, which the Gateway API requires for a Service.
fn target(f: &Fields<'_>, at: &At<'_>, namespace: &str) -> Result<Target> {
    let kind = f
        .get("kind")
        .map(|k| k.str())
        .transpose()?
        .unwrap_or("Service");
    if kind != "Service" {
        return Err(f.req("kind")?.fail(format!(
            "a {kind} backend is not supported by Trellis: give a Service"
        )));
    }
    if let Some(g) = f.get("group") {
        let group = g.str()?;
        if !group.is_empty() && group != "core" {
            return Err(g.fail(format!(
                "{group:?}: a backend is a core Service, group \"\""
            )));
        }
    }
    let service = service_ref(f, namespace)?;
    let port = f.get("port").ok_or_else(|| {
        at.below("port")
            .fail("missing: the Gateway API requires a Service's port")
    })?;
    Ok(Target {
        service,
        port: (port.port()?, port.path.clone()),
    })
}

fn rule<'a>(at: &At<'a>, namespace: &str, flavour: &Flavour) -> Result<Rule<'a>> {
    let f = at.fields(flavour.rule_fields)?;
    let name = match f.get("name") {
        Some(n) => {
            let s = n.str()?;
            policy::check_key(s).map_err(|e| n.fail(format!("{s:?} {e}")))?;
            Some(s.to_owned())
        }
        None => None,
    };
    let mut matches = f
        .list("matches")?
        .iter()
        .map(|m| (flavour.read_match)(Some(m)))
        .collect::<Result<Vec<_>>>()?;
    if matches.is_empty() {
        // The Gateway API's default: every request.
        matches.push((flavour.read_match)(None)?);
    }
    let mut backends = Vec::new();
    for b in f.list("backendRefs")? {
        let bf = b.fields(&["group", "kind", "name", "namespace", "port", "weight"])?;
        let weight = bf.get("weight").map(|w| w.u32()).transpose()?.unwrap_or(1);
        backends.push((target(&bf, &b, namespace)?, weight));
    }
    if !backends.is_empty() && backends.iter().all(|(_, w)| *w == 0) {
        return Err(f.req("backendRefs")?.fail("the weights add up to 0"));
    }
    let mut r = Rule {
        at: at.clone(),
        name,
        matches,
        backends,
        request_headers: HeaderEdit::default(),
        response_headers: HeaderEdit::default(),
        redirect: None,
        rewrite: None,
        mirror: None,
        timeout: None,
    };
    let mut seen: Vec<&str> = Vec::new();
    for filter in f.list("filters")? {
        let ty = filter_into(&filter, &mut r, namespace, flavour)?;
        if seen.contains(&ty) {
            return Err(filter
                .below("type")
                .fail(format!("{ty} again: Trellis takes one {ty} per rule")));
        }
        seen.push(ty);
    }
    if let Some(t) = f.get("timeouts") {
        let tf = t.fields(&["request", "backendRequest"])?;
        let request = tf
            .get("request")
            .map(|a| a.duration())
            .transpose()?
            .flatten();
        if let Some(b) = tf.get("backendRequest")
            && b.duration()? != request
        {
            return Err(b.fail(
                "not supported by Trellis unless equal to request: a rule's timeout bounds the whole request",
            ));
        }
        r.timeout = request;
    }
    match (&r.redirect, r.backends.is_empty()) {
        (Some(_), false) => {
            return Err(f.req("backendRefs")?.fail(
                "a RequestRedirect is answered by the caller's sidecar; Trellis takes no backendRefs with it",
            ));
        }
        (None, true) => {
            // With no backend, the Gateway API answers with an error, and a
            // native rule without backends sends to the whole service.
            return Err(at
                .below("backendRefs")
                .fail("missing: Trellis needs a rule's backends (or a RequestRedirect)"));
        }
        _ => {}
    }
    if r.redirect.is_some()
        && let Some(k) = ["URLRewrite", "RequestMirror"]
            .into_iter()
            .find(|k| seen.contains(k))
    {
        return Err(at.below("filters").fail(format!(
            "a RequestRedirect is answered by the caller's sidecar; Trellis takes no {k} with it"
        )));
    }
    Ok(r)
}

/// Reads one filter into `r`; returns its type.
fn filter_into(
    at: &At<'_>,
    r: &mut Rule<'_>,
    namespace: &str,
    flavour: &Flavour,
) -> Result<&'static str> {
    const CONFIG: [(&str, &str); 5] = [
        ("RequestHeaderModifier", "requestHeaderModifier"),
        ("ResponseHeaderModifier", "responseHeaderModifier"),
        ("RequestRedirect", "requestRedirect"),
        ("URLRewrite", "urlRewrite"),
        ("RequestMirror", "requestMirror"),
    ];
    let mut known = vec!["type"];
    known.extend(
        CONFIG
            .iter()
            .filter(|(t, _)| flavour.filters.contains(t))
            .map(|(_, c)| *c),
    );
    let f = at.fields(&known)?;
    let ty_at = f.req("type")?;
    let ty = ty_at.str()?;
    let Some(&(ty, field)) = CONFIG
        .iter()
        .find(|(t, _)| *t == ty && flavour.filters.contains(t))
    else {
        return Err(ty_at.fail(format!(
            "{ty:?} is not supported by Trellis; it takes {}",
            flavour.filters.join(", ")
        )));
    };
    if let Some(other) = known[1..]
        .iter()
        .find(|k| **k != field && f.get(k).is_some())
    {
        return Err(f.req(other)?.fail(format!("does not go with type {ty}")));
    }
    let cfg = f.req(field)?;
    match ty {
        "RequestHeaderModifier" => r.request_headers = header_edit(&cfg)?,
        "ResponseHeaderModifier" => r.response_headers = header_edit(&cfg)?,
        "RequestRedirect" => r.redirect = Some(redirect(&cfg)?),
        "URLRewrite" => r.rewrite = Some(rewrite(&cfg, &r.matches)?),
        _ => r.mirror = Some(mirror(&cfg, namespace)?),
    }
    Ok(ty)
}

fn header_edit(at: &At<'_>) -> Result<HeaderEdit> {
    let f = at.fields(&["set", "add", "remove"])?;
    let mut edit = HeaderEdit::default();
    for (key, map) in [("set", &mut edit.set), ("add", &mut edit.add)] {
        for h in f.list(key)? {
            let hf = h.fields(&["name", "value"])?;
            let name: HeaderKey = hf.req("name")?.header_name()?;
            let value: HeaderText = hf.req("value")?.parse()?;
            if map.insert(name, value).is_some() {
                return Err(h.fail("names a header an earlier entry names too"));
            }
        }
    }
    for r in f.list("remove")? {
        edit.remove.push(r.header_name()?);
    }
    Ok(edit)
}

fn redirect(at: &At<'_>) -> Result<Redirect> {
    let f = at.fields(&["scheme", "hostname", "path", "port", "statusCode"])?;
    let scheme = f.get("scheme").map(|s| s.scheme()).transpose()?;
    let status = match f.get("statusCode") {
        Some(c) => c.redirect_code()?,
        // The Gateway API's default, not Trellis' 301.
        None => 302,
    };
    let port = match (f.get("port"), scheme) {
        (Some(p), _) => Some(p.port()?),
        // The Gateway API: a new scheme without a port gets that scheme's
        // well-known port, not the request's.
        (None, Some(s)) => Some(match s {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }),
        (None, None) => None,
    };
    let path = match f.get("path") {
        Some(p) => match path_modifier(&p)? {
            (false, v) => Some(v),
            (true, _) => {
                return Err(p.below("replacePrefixMatch").fail(
                    "not supported by Trellis in a redirect, which replaces the whole path (ReplaceFullPath)",
                ));
            }
        },
        None => None,
    };
    Ok(Redirect {
        scheme,
        host: f
            .get("hostname")
            .map(|h| h.str().map(str::to_owned))
            .transpose()?,
        port,
        path,
        status,
    })
}

/// An `HTTPPathModifier`: (whether it replaces the prefix, the value).
fn path_modifier(at: &At<'_>) -> Result<(bool, String)> {
    let f = at.fields(&["type", "replaceFullPath", "replacePrefixMatch"])?;
    let ty = f.req("type")?;
    let (prefix, field, other) = match ty.str()? {
        "ReplaceFullPath" => (false, "replaceFullPath", "replacePrefixMatch"),
        "ReplacePrefixMatch" => (true, "replacePrefixMatch", "replaceFullPath"),
        t => {
            return Err(ty.fail(format!(
                "{t:?} is not ReplaceFullPath or ReplacePrefixMatch"
            )));
        }
    };
    if let Some(o) = f.get(other) {
        return Err(o.fail(format!("does not go with type {}", ty.str()?)));
    }
    Ok((prefix, f.req(field)?.http_path()?))
}

fn rewrite(at: &At<'_>, matches: &[Match]) -> Result<Rewrite> {
    let f = at.fields(&["hostname", "path"])?;
    let mut rw = Rewrite {
        path: None,
        prefix: None,
        authority: f
            .get("hostname")
            .map(|h| h.str().map(str::to_owned))
            .transpose()?,
    };
    if let Some(p) = f.get("path") {
        match path_modifier(&p)? {
            (false, v) => rw.path = Some(v),
            (true, v) => {
                if matches
                    .iter()
                    .any(|m| !matches!(m.m.path, Some(PathMatch::Prefix(_))))
                {
                    return Err(p.below("replacePrefixMatch").fail(
                        "replaces the matched prefix, so every match of the rule needs a PathPrefix path",
                    ));
                }
                rw.prefix = Some(v);
            }
        }
    }
    if rw.path.is_none() && rw.prefix.is_none() && rw.authority.is_none() {
        return Err(at.fail("give hostname, path or both"));
    }
    Ok(rw)
}

fn mirror(at: &At<'_>, namespace: &str) -> Result<(Target, Percent)> {
    let f = at.fields(&["backendRef", "percent", "fraction"])?;
    let b = f.req("backendRef")?;
    let bf = b.fields(&["group", "kind", "name", "namespace", "port"])?;
    let target = target(&bf, &b, namespace)?;
    let percent = match (f.get("percent"), f.get("fraction")) {
        (Some(_), Some(fr)) => return Err(fr.fail("give percent or fraction, not both")),
        (Some(p), None) => p.percent()?,
        (None, Some(fr)) => {
            let ff = fr.fields(&["numerator", "denominator"])?;
            let num = ff.req("numerator")?.u32()?;
            let den = match ff.get("denominator") {
                Some(d) => match d.u32()? {
                    0 => return Err(d.fail("must be more than 0")),
                    n => n,
                },
                None => 100,
            };
            Percent::try_from(f64::from(num) * 100.0 / f64::from(den)).map_err(|e| fr.fail(e))?
        }
        // The Gateway API mirrors every request when no share is given.
        (None, None) => Percent(100.0),
    };
    Ok((target, percent))
}

fn http_match(at: Option<&At<'_>>) -> Result<Match> {
    let f = at
        .map(|a| a.fields(&["path", "headers", "queryParams", "method"]))
        .transpose()?;
    let get = |k: &str| f.as_ref().and_then(|f| f.get(k));
    let mut m = RequestMatch::default();
    // The Gateway API's default path: PathPrefix "/".
    let (rank, len) = match get("path") {
        Some(p) => {
            let pf = p.fields(&["type", "value"])?;
            let ty = pf
                .get("type")
                .map(|t| t.str())
                .transpose()?
                .unwrap_or("PathPrefix");
            let value = pf.get("value");
            let path = || match &value {
                Some(v) => v.http_path(),
                None => Ok("/".to_owned()),
            };
            match ty {
                "Exact" => {
                    m.path = Some(PathMatch::Exact(path()?));
                    (0, 0)
                }
                "PathPrefix" => {
                    let v = path()?;
                    let len = v.len();
                    m.path = Some(PathMatch::Prefix(v));
                    (2, len)
                }
                "RegularExpression" => {
                    let value = value
                        .as_ref()
                        .ok_or_else(|| p.below("value").fail("missing"))?;
                    m.path = Some(PathMatch::Regex(value.parse::<Pattern>()?));
                    // The Gateway API leaves the place of a regular
                    // expression to the implementation: after exact paths,
                    // before prefixes.
                    (1, 0)
                }
                other => {
                    return Err(pf.req("type")?.fail(format!(
                        "{other:?} is not Exact, PathPrefix or RegularExpression"
                    )));
                }
            }
        }
        None => {
            m.path = Some(PathMatch::Prefix("/".into()));
            (2, 1)
        }
    };
    if let Some(h) = get("headers") {
        header_matches(&h, &mut m)?;
    }
    if let Some(q) = get("queryParams") {
        // Query parameter names are case-sensitive, header names are not.
        for e in name_values(&q)? {
            if m.query.insert(e.name.to_owned(), e.m).is_some() {
                return Err(e.at.fail("names a parameter an earlier entry names too"));
            }
        }
    }
    if let Some(me) = get("method") {
        m.method = Some(me.parse()?);
    }
    let all = matches!(&m.path, Some(PathMatch::Prefix(p)) if p == "/")
        && m.method.is_none()
        && m.headers.is_empty()
        && m.query.is_empty();
    let key = (
        rank,
        Reverse(len),
        Reverse(usize::from(m.method.is_some())),
        Reverse(m.headers.len()),
        Reverse(m.query.len()),
    );
    Ok(Match { m, all, key })
}

fn header_matches(at: &At<'_>, m: &mut RequestMatch) -> Result<()> {
    for e in name_values(at)? {
        let key = HeaderKey::try_from(e.name.to_ascii_lowercase()).map_err(|r| e.at.fail(r))?;
        if m.headers.insert(key, e.m).is_some() {
            return Err(e.at.fail("names a header an earlier entry names too"));
        }
    }
    Ok(())
}

/// One entry of the headers or query parameters of a match.
struct NameMatch<'a> {
    at: At<'a>,
    name: &'a str,
    m: StringMatch,
}

/// `[{type, name, value}]` of headers or query parameters.
fn name_values<'a>(at: &At<'a>) -> Result<Vec<NameMatch<'a>>> {
    let mut out = Vec::new();
    for e in at.list()? {
        let f = e.fields(&["type", "name", "value"])?;
        let name = f.req("name")?.str()?;
        let value = f.req("value")?;
        let sm = match f
            .get("type")
            .map(|t| t.str())
            .transpose()?
            .unwrap_or("Exact")
        {
            "Exact" => StringMatch::Exact(value.str()?.to_owned()),
            "RegularExpression" => StringMatch::Regex(value.parse::<Pattern>()?),
            other => {
                return Err(f
                    .req("type")?
                    .fail(format!("{other:?} is not Exact or RegularExpression")));
            }
        };
        out.push(NameMatch {
            at: e.clone(),
            name,
            m: sm,
        });
    }
    Ok(out)
}

fn grpc_match(at: Option<&At<'_>>) -> Result<Match> {
    let f = at.map(|a| a.fields(&["method", "headers"])).transpose()?;
    let get = |k: &str| f.as_ref().and_then(|f| f.get(k));
    let mut m = RequestMatch::default();
    let (mut service_len, mut method_len) = (0, 0);
    if let Some(mm) = get("method") {
        let mf = mm.fields(&["type", "service", "method"])?;
        let part = |k: &str| -> Result<Option<(At<'_>, &str)>> {
            mf.get(k).map(|a| Ok((a.clone(), a.str()?))).transpose()
        };
        let (service, method) = (part("service")?, part("method")?);
        service_len = service.as_ref().map_or(0, |s| s.1.len());
        method_len = method.as_ref().map_or(0, |s| s.1.len());
        let ty = mf
            .get("type")
            .map(|t| t.str())
            .transpose()?
            .unwrap_or("Exact");
        m.path = Some(match (ty, service, method) {
            (_, None, None) => return Err(mm.fail("give service, method or both")),
            ("Exact", s, me) => {
                if let Some((a, v)) = &s {
                    grpc_name(a, v, true)?;
                }
                if let Some((a, v)) = &me {
                    grpc_name(a, v, false)?;
                }
                match (s, me) {
                    (Some((_, s)), Some((_, me))) => PathMatch::Exact(format!("/{s}/{me}")),
                    (Some((_, s)), None) => PathMatch::Prefix(format!("/{s}/")),
                    (None, Some((a, me))) => PathMatch::Regex(
                        Pattern::try_from(format!("/[^/]+/{}", regex_literal(me)))
                            .map_err(|e| a.fail(e))?,
                    ),
                    (None, None) => unreachable!("refused above"),
                }
            }
            ("RegularExpression", s, me) => {
                // Each expression grouped, so that an alternation in one
                // stays inside its own part of the path.
                let re = |x: &Option<(At<'_>, &str)>| {
                    x.as_ref()
                        .map_or("[^/]+".to_owned(), |(_, v)| format!("(?:{v})"))
                };
                let pattern = format!("/{}/{}", re(&s), re(&me));
                let at = s.or(me).map_or_else(|| mm.clone(), |x| x.0);
                PathMatch::Regex(Pattern::try_from(pattern).map_err(|e| at.fail(e))?)
            }
            (other, _, _) => {
                return Err(mf
                    .req("type")?
                    .fail(format!("{other:?} is not Exact or RegularExpression")));
            }
        });
    }
    if let Some(h) = get("headers") {
        header_matches(&h, &mut m)?;
    }
    let all = m.path.is_none() && m.headers.is_empty();
    // The Gateway API: the longer service, then the longer method, then
    // more headers.
    let key = (
        0,
        Reverse(service_len),
        Reverse(method_len),
        Reverse(m.headers.len()),
        Reverse(0),
    );
    Ok(Match { m, all, key })
}

/// A gRPC service (`pkg.Service`) or method name, as the Gateway API
/// allows them.
fn grpc_name(at: &At<'_>, v: &str, service: bool) -> Result<()> {
    let ok = !v.is_empty()
        && v.split('.').all(|part| {
            part.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        && (service || !v.contains('.'));
    if ok {
        Ok(())
    } else {
        Err(at.fail(format!(
            "{v:?} is not a gRPC {}",
            if service {
                "service name"
            } else {
                "method name"
            }
        )))
    }
}

/// The matches of every rule in precedence order, the earlier rule first
/// on a tie, runs of one rule's matches kept together: (rule, matches).
fn precedence(rules: &[Rule<'_>]) -> Vec<(usize, Vec<usize>)> {
    let mut all: Vec<(usize, usize)> = rules
        .iter()
        .enumerate()
        .flat_map(|(i, r)| (0..r.matches.len()).map(move |j| (i, j)))
        .collect();
    // Stable: ties keep the order of the document.
    all.sort_by_key(|(i, j)| rules[*i].matches[*j].key);
    let mut out: Vec<(usize, Vec<usize>)> = Vec::new();
    for (i, j) in all {
        match out.last_mut() {
            Some((r, ms)) if *r == i => ms.push(j),
            _ => out.push((i, vec![j])),
        }
    }
    out
}

fn native_rules(
    rules: &[Rule<'_>],
    order: &[(usize, Vec<usize>)],
    parent: &Parent,
) -> Result<Vec<RouteRule>> {
    let mut parts: BTreeMap<usize, usize> = BTreeMap::new();
    for (i, _) in order {
        *parts.entry(*i).or_default() += 1;
    }
    let mut seen_part: BTreeMap<usize, usize> = BTreeMap::new();
    let mut names = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for (i, ms) in order {
        let r = &rules[*i];
        let part = {
            let n = seen_part.entry(*i).or_default();
            *n += 1;
            *n
        };
        let name = match &r.name {
            Some(n) if parts[i] > 1 => Some(format!("{n}-{part}")),
            n => n.clone(),
        };
        if let Some(n) = &name
            && !names.insert(n.clone())
        {
            return Err(r.at.below("name").fail(format!(
                "{n:?} names an earlier rule too (a rule whose matches fall apart in precedence order becomes NAME-1, NAME-2, …)"
            )));
        }
        let keeps_prefix = r.rewrite.as_ref().is_some_and(|w| w.prefix.is_some());
        // The prefix "/" matches every path: without a prefix rewrite that
        // needs it, it is left out, and a match of nothing else matches
        // every request, as a native rule without matches does.
        let matches = if !keeps_prefix && ms.iter().any(|j| r.matches[*j].all) {
            Vec::new()
        } else {
            ms.iter()
                .map(|j| {
                    let mut m = r.matches[*j].m.clone();
                    if !keeps_prefix && matches!(&m.path, Some(PathMatch::Prefix(p)) if p == "/") {
                        m.path = None;
                    }
                    m
                })
                .collect()
        };
        let backends = r
            .backends
            .iter()
            .map(|(t, weight)| {
                Ok(WeightedBackend {
                    service: send_to(t, parent)?,
                    subset: None,
                    weight: *weight,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mirror = match &r.mirror {
            Some((t, percent)) => Some(Mirror {
                service: send_to(t, parent)?,
                subset: None,
                percent: *percent,
            }),
            None => None,
        };
        out.push(RouteRule {
            name,
            matches,
            backends,
            request_headers: r.request_headers.clone(),
            response_headers: r.response_headers.clone(),
            redirect: r.redirect.clone(),
            rewrite: r.rewrite.clone(),
            mirror,
            timeout: r.timeout,
            retries: None,
            fault: None,
        });
    }
    Ok(out)
}

/// The native `service` of a backend or mirror of `parent`'s route: none
/// for the parent itself. Trellis sends a request on to the port it was
/// made to, so the target's port must be the parent's.
fn send_to(t: &Target, parent: &Parent) -> Result<Option<ServiceRef>> {
    let (p, at) = &t.port;
    let reason = match &parent.port {
        Some((q, _)) if q == p => None,
        Some((q, q_at)) => Some(format!(
            "{p}: Trellis sends a request on to the port it was made to, here {q} ({q_at})"
        )),
        None => Some(format!(
            "{p}: Trellis sends a request on to the port it was made to; give the parentRef port: {p}, so that the route is for that port alone"
        )),
    };
    if let Some(reason) = reason {
        return Err(Refusal {
            field: at.clone(),
            reason,
        });
    }
    Ok((t.service != parent.service).then(|| t.service.clone()))
}
