//! Istio and Gateway API documents in `trellis policy apply -f`, translated
//! here in the CLI into native `Route` and `Backend` documents before they
//! are sent, so that the store and the proxies only ever see one schema.
//!
//! The translation is strict: every field of the source is either mapped or
//! refused with its path (`spec.http[0].corsPolicy: not supported by
//! Trellis`), because a silently dropped field is a routing rule the user
//! believes is in force and is not. Where the two meshes mean different
//! things, the source's meaning is spelled out in the native document rather
//! than left to the native defaults. And every translated spec is parsed with
//! [`policy::parse`] before it leaves: a translation bug is refused here, not
//! sent.

use std::fmt;
use std::time::Duration;

use serde_json::{Map, Value};
use trellis_federation::policy::{self, ServiceRef, traffic};

use crate::cli::UsageError;

mod gateway_api;
mod istio;
#[cfg(test)]
mod tests;

/// A native document a foreign one became.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Native {
    /// `Route` or `Backend`.
    pub(crate) kind: &'static str,
    /// `metadata.name`: the source's, suffixed when it became several.
    pub(crate) name: String,
    /// The spec, as the store keeps it.
    pub(crate) spec: Value,
}

/// Whether `doc` is for this module: an `apiVersion` of an Istio group or of
/// the Gateway API. Anything else is a native document.
pub(crate) fn is_foreign(doc: &Value) -> bool {
    let Some(group) = doc
        .get("apiVersion")
        .and_then(Value::as_str)
        .and_then(|v| v.split_once('/'))
        .map(|(g, _)| g)
    else {
        return false;
    };
    group == "istio.io" || group.ends_with(".istio.io") || group == GATEWAY_GROUP
}

/// Translates document `n` of a file (counted from 1), which
/// [`is_foreign`], into native documents, each one parsed as the store
/// would parse it.
pub(crate) fn translate(n: usize, doc: &Value) -> Result<Vec<Native>, UsageError> {
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("");
    let name = doc
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str);
    let what = match (kind, name) {
        ("", _) => String::new(),
        (k, Some(name)) => format!(" ({k}/{name})"),
        (k, None) => format!(" ({k})"),
    };
    let natives = source(doc)
        .and_then(|src| match src.kind {
            SourceKind::VirtualService => istio::virtual_service(&src),
            SourceKind::DestinationRule => istio::destination_rule(&src),
            SourceKind::HttpRoute => gateway_api::http_route(&src),
            SourceKind::GrpcRoute => gateway_api::grpc_route(&src),
        })
        .map_err(|r| UsageError(format!("document {n}{what}: {r}")))?;
    // The translators check what they read, but the native schema has the
    // last word: what it refuses is not sent.
    for d in &natives {
        policy::parse(d.kind, &d.name, &d.spec).map_err(|e| {
            UsageError(format!(
                "document {n}{what}: translated to {}/{}, which Trellis refuses: {}: {}",
                d.kind, d.name, e.field, e.reason
            ))
        })?;
    }
    Ok(natives)
}

const ISTIO_GROUP: &str = "networking.istio.io";
const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// The foreign kinds translated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SourceKind {
    VirtualService,
    DestinationRule,
    HttpRoute,
    GrpcRoute,
}

/// A foreign document, its envelope read.
struct Source<'a> {
    kind: SourceKind,
    /// `metadata.name`.
    name: &'a str,
    /// `metadata.namespace`, or `default` as Kubernetes has it.
    namespace: &'a str,
    /// `spec`.
    spec: At<'a>,
}

fn source(doc: &Value) -> Result<Source<'_>, Refusal> {
    let root = At::root(doc);
    // `status` is written by controllers and configures nothing.
    let top = root.fields(&["apiVersion", "kind", "metadata", "spec", "status"])?;
    let api_version = top.req("apiVersion")?.str()?;
    let kind = top.req("kind")?;
    let (group, version) = api_version.split_once('/').unwrap_or((api_version, ""));
    let kind_name = kind.str()?;
    let (kind, versions): (_, &[&str]) = match (group, kind_name) {
        (ISTIO_GROUP, "VirtualService") => (SourceKind::VirtualService, ISTIO_VERSIONS),
        (ISTIO_GROUP, "DestinationRule") => (SourceKind::DestinationRule, ISTIO_VERSIONS),
        (GATEWAY_GROUP, "HTTPRoute") => (SourceKind::HttpRoute, &["v1", "v1beta1"]),
        (GATEWAY_GROUP, "GRPCRoute") => (SourceKind::GrpcRoute, &["v1", "v1beta1", "v1alpha2"]),
        (g, k) => {
            let takes = if g == GATEWAY_GROUP {
                "HTTPRoute and GRPCRoute (with a Service parent)"
            } else {
                "networking.istio.io VirtualService and DestinationRule"
            };
            return Err(kind.fail(format!(
                "{g} {k} is not supported by Trellis; it translates {takes}"
            )));
        }
    };
    if !versions.contains(&version) {
        return Err(top.req("apiVersion")?.fail(format!(
            "{api_version:?}: Trellis translates {kind_name} of {group}/{}",
            versions.join(", /")
        )));
    }
    // Labels, annotations and the rest of an object's metadata are
    // bookkeeping; only the name and the namespace change what a route does.
    let meta = top.req("metadata")?;
    let name = meta
        .field("name")
        .ok_or_else(|| meta.below("name").fail("missing"))?;
    let name = name.str()?;
    let namespace = match meta.field("namespace") {
        Some(ns) => {
            let s = ns.str()?;
            policy::check_label(s).map_err(|e| ns.fail(format!("{s:?} {e}")))?;
            s
        }
        None => "default",
    };
    Ok(Source {
        kind,
        name,
        namespace,
        spec: top.req("spec")?,
    })
}

const ISTIO_VERSIONS: &[&str] = &["v1", "v1beta1", "v1alpha3"];

impl Source<'_> {
    /// The name of the one native this document becomes.
    fn own_name(&self) -> Result<String> {
        Ok(self.names(&[String::new()])?.remove(0))
    }

    /// Names for the natives this document becomes: its own name for one,
    /// `NAME.SUFFIX` for each of several, every one a valid policy name.
    fn names(&self, suffixes: &[String]) -> Result<Vec<String>, Refusal> {
        let names: Vec<String> = if suffixes.len() == 1 {
            vec![self.name.to_owned()]
        } else {
            suffixes
                .iter()
                .map(|s| format!("{}.{s}", self.name))
                .collect()
        };
        for n in &names {
            policy::check_key(n).map_err(|e| Refusal {
                field: "metadata.name".into(),
                reason: if names.len() == 1 {
                    format!("{n:?} {e}")
                } else {
                    format!(
                        "this document becomes {} policies, and the name of one, {n:?}, {e}",
                        names.len()
                    )
                },
            })?;
        }
        Ok(names)
    }
}

/// Why a foreign document was refused: the field, from the document's root,
/// and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Refusal {
    field: String,
    reason: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

type Result<T, E = Refusal> = std::result::Result<T, E>;

/// A value of the source document and its path, so that any refusal can
/// name the field it is about.
#[derive(Debug, Clone)]
struct At<'a> {
    v: &'a Value,
    path: String,
}

/// A mapping whose every key is known to its reader (see [`At::fields`]).
#[derive(Debug, Clone)]
struct Fields<'a> {
    map: &'a Map<String, Value>,
    at: At<'a>,
}

impl<'a> At<'a> {
    fn root(v: &'a Value) -> Self {
        Self {
            v,
            path: String::new(),
        }
    }

    fn fail(&self, reason: impl Into<String>) -> Refusal {
        Refusal {
            field: if self.path.is_empty() {
                "document".into()
            } else {
                self.path.clone()
            },
            reason: reason.into(),
        }
    }

    /// The path of `key` below this value, for a refusal about a field that
    /// is missing or stands for the whole.
    fn below(&self, key: &str) -> At<'a> {
        static NULL: Value = Value::Null;
        At {
            v: &NULL,
            path: self.child_path(key),
        }
    }

    fn child_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// The mapping, refusing any key but `known`: whatever this translator
    /// does not map must not be dropped in silence. A key whose value is null
    /// counts as absent, as it does to Kubernetes.
    fn fields(&self, known: &[&str]) -> Result<Fields<'a>> {
        let map = self
            .v
            .as_object()
            .ok_or_else(|| self.fail(format!("must be a mapping, found {}", self.v)))?;
        if let Some((k, _)) = map
            .iter()
            .find(|(k, v)| !v.is_null() && !known.contains(&k.as_str()))
        {
            return Err(self.below(k).fail("not supported by Trellis"));
        }
        Ok(Fields {
            map,
            at: self.clone(),
        })
    }

    /// The mapping's own field, for a reader that checks the keys itself.
    fn field(&self, key: &str) -> Option<At<'a>> {
        self.v.get(key).filter(|v| !v.is_null()).map(|v| At {
            v,
            path: self.child_path(key),
        })
    }

    fn str(&self) -> Result<&'a str> {
        self.v
            .as_str()
            .ok_or_else(|| self.fail(format!("must be a string, found {}", self.v)))
    }

    fn bool(&self) -> Result<bool> {
        self.v
            .as_bool()
            .ok_or_else(|| self.fail(format!("must be true or false, found {}", self.v)))
    }

    fn u32(&self) -> Result<u32> {
        self.v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| self.fail(format!("must be a whole number from 0, found {}", self.v)))
    }

    fn f64(&self) -> Result<f64> {
        self.v
            .as_f64()
            .ok_or_else(|| self.fail(format!("must be a number, found {}", self.v)))
    }

    /// A redirect status: 301, 302, 303, 307 or 308.
    fn redirect_code(&self) -> Result<u16> {
        let code = self.u32()?;
        u16::try_from(code)
            .ok()
            .filter(|c| [301, 302, 303, 307, 308].contains(c))
            .ok_or_else(|| self.fail(format!("{code} is not one of 301, 302, 303, 307, 308")))
    }

    /// A port: 1 to 65535.
    fn port(&self) -> Result<u16> {
        self.v
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .filter(|p| *p != 0)
            .ok_or_else(|| self.fail(format!("must be a port, 1 to 65535, found {}", self.v)))
    }

    fn list(&self) -> Result<Vec<At<'a>>> {
        let items = self
            .v
            .as_array()
            .ok_or_else(|| self.fail(format!("must be a list, found {}", self.v)))?;
        Ok(items
            .iter()
            .enumerate()
            .map(|(i, v)| At {
                v,
                path: format!("{}[{i}]", self.path),
            })
            .collect())
    }

    /// A mapping's entries, each with its path.
    fn entries(&self) -> Result<Vec<(&'a str, At<'a>)>> {
        let map = self
            .v
            .as_object()
            .ok_or_else(|| self.fail(format!("must be a mapping, found {}", self.v)))?;
        Ok(map
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str(),
                    At {
                        v,
                        path: self.child_path(k),
                    },
                )
            })
            .collect())
    }

    /// A string of the source parsed into a native type, its reason kept.
    fn parse<T: TryFrom<String, Error = String>>(&self) -> Result<T> {
        T::try_from(self.str()?.to_owned()).map_err(|e| self.fail(e))
    }

    /// A header name, lowercased: both sources take names in any case, the
    /// native schema in lowercase only.
    fn header_name(&self) -> Result<traffic::HeaderKey> {
        traffic::HeaderKey::try_from(self.str()?.to_ascii_lowercase()).map_err(|e| self.fail(e))
    }

    /// A duration in Go's notation, which Istio and the Gateway API both
    /// use (`500ms`, `1.5s`, `1h30m`); `None` for zero, which both take to
    /// mean "none".
    fn duration(&self) -> Result<Option<traffic::Dur>> {
        let s = self.str()?;
        let d = parse_go_duration(s).map_err(|e| self.fail(format!("{s:?} {e}")))?;
        Ok((!d.is_zero()).then_some(traffic::Dur(d)))
    }

    /// A path as the native schema takes it: from `/`, visible ASCII.
    fn http_path(&self) -> Result<String> {
        let p = self.str()?;
        if !p.starts_with('/') {
            return Err(self.fail(format!("{p:?} must start with '/'")));
        }
        if let Some(c) = p.chars().find(|c| !c.is_ascii_graphic()) {
            return Err(self.fail(format!("{p:?} has {c:?}; write it percent-encoded")));
        }
        Ok(p.to_owned())
    }

    /// `http` or `https`.
    fn scheme(&self) -> Result<traffic::Scheme> {
        match self.str()? {
            "http" => Ok(traffic::Scheme::Http),
            "https" => Ok(traffic::Scheme::Https),
            other => Err(self.fail(format!("{other:?} is not http or https"))),
        }
    }

    /// A share in percent, 0 to 100.
    fn percent(&self) -> Result<traffic::Percent> {
        traffic::Percent::try_from(self.f64()?).map_err(|e| self.fail(e))
    }
}

impl<'a> Fields<'a> {
    /// An optional field.
    fn get(&self, key: &str) -> Option<At<'a>> {
        self.map.get(key).filter(|v| !v.is_null()).map(|v| At {
            v,
            path: self.at.child_path(key),
        })
    }

    /// A required field.
    fn req(&self, key: &str) -> Result<At<'a>> {
        self.get(key)
            .ok_or_else(|| self.at.below(key).fail("missing"))
    }

    /// The mapping itself.
    fn here(&self) -> &At<'a> {
        &self.at
    }

    /// Whether no field is given.
    fn is_empty(&self) -> bool {
        self.map.values().all(Value::is_null)
    }

    /// A required list with at least one item; `what` says what an item
    /// names, for the refusal of an empty one.
    fn items(&self, key: &str, what: &str) -> Result<Vec<At<'a>>> {
        let at = self.req(key)?;
        let list = at.list()?;
        if list.is_empty() {
            return Err(at.fail(format!("must name at least one {what}")));
        }
        Ok(list)
    }

    /// An optional list; absent is empty.
    fn list(&self, key: &str) -> Result<Vec<At<'a>>> {
        self.get(key).map_or(Ok(Vec::new()), |a| a.list())
    }
}

/// Parses Go's duration notation: one or more of a decimal number and a
/// unit (`ns`, `us`, `µs`, `ms`, `s`, `m`, `h`), or `0`.
fn parse_go_duration(s: &str) -> Result<Duration, String> {
    const UNITS: [(&str, u128); 8] = [
        ("ns", 1),
        ("us", 1_000),
        ("µs", 1_000),
        ("μs", 1_000),
        ("ms", 1_000_000),
        ("s", 1_000_000_000),
        ("m", 60_000_000_000),
        ("h", 3_600_000_000_000),
    ];
    let bad = || "is not a duration; write e.g. 500ms, 1.5s, 1m or 1h30m".to_owned();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(bad());
    }
    let mut rest = s;
    let mut nanos: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (int, after) = rest.split_at(int_len);
        let (frac, after) = match after.strip_prefix('.') {
            Some(a) => {
                let n = a.find(|c: char| !c.is_ascii_digit()).unwrap_or(a.len());
                a.split_at(n)
            }
            None => ("", after),
        };
        if int.is_empty() && frac.is_empty() {
            return Err(bad());
        }
        // The longest unit that fits: `ms` before `m`.
        let (unit, scale) = UNITS
            .iter()
            .filter(|(u, _)| after.starts_with(u))
            .max_by_key(|(u, _)| u.len())
            .ok_or_else(bad)?;
        let whole: u128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| bad())?
        };
        let mut part = whole.checked_mul(*scale).ok_or_else(bad)?;
        if !frac.is_empty() {
            // Digits beyond the unit's nanosecond resolution are dropped.
            let digits = &frac[..frac.len().min(18)];
            let f: u128 = digits.parse().map_err(|_| bad())?;
            part += f * scale / 10u128.pow(u32::try_from(digits.len()).map_err(|_| bad())?);
        }
        nanos = nanos.checked_add(part).ok_or_else(bad)?;
        rest = &after[unit.len()..];
    }
    let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| bad())?;
    let sub = u32::try_from(nanos % 1_000_000_000).map_err(|_| bad())?;
    Ok(Duration::new(secs, sub))
}

/// The mesh service a host names: `NAME` (in `namespace`),
/// `NAME.NAMESPACE`, and the same with `.svc`, `.svc.cluster.local` or the
/// mesh suffix `.mesh`.
fn mesh_service(host: &str, namespace: &str) -> Result<ServiceRef, String> {
    if host.contains('*') {
        return Err(format!(
            "{host:?}: a wildcard is not supported by Trellis; a policy names one mesh service"
        ));
    }
    let labels: Vec<&str> = host.split('.').collect();
    let (name, ns) = match labels.as_slice() {
        [name] => (*name, namespace),
        [name, ns] | [name, ns, "mesh" | "svc"] | [name, ns, "svc", "cluster", "local"] => {
            (*name, *ns)
        }
        _ => {
            return Err(format!(
                "{host:?} is not a mesh service name: write NAME, NAME.NAMESPACE, NAME.NAMESPACE.svc.cluster.local or NAME.NAMESPACE.mesh"
            ));
        }
    };
    format!("{name}.{ns}").parse()
}

impl At<'_> {
    /// A host naming a mesh service (see [`mesh_service`]).
    fn service(&self, namespace: &str) -> Result<ServiceRef> {
        mesh_service(self.str()?, namespace).map_err(|e| self.fail(e))
    }
}

/// A native document, parsed back to check it is what was meant.
fn native(kind: &'static str, name: String, spec: &impl serde::Serialize) -> Result<Native> {
    let spec = serde_json::to_value(spec).map_err(|e| Refusal {
        field: "spec".into(),
        reason: format!("cannot be written as JSON: {e}"),
    })?;
    Ok(Native { kind, name, spec })
}

/// Escapes `s` for a regular expression that matches it literally.
fn regex_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
