//! The policy documents of the mesh, typed, and the name rules they share:
//! the one definition the store validates with at `trellis policy apply` and
//! every proxy parses with when it applies a revision, so that what the store
//! accepts, every proxy of the same version can apply.
//!
//! `Authorization` is enforced by the callee's agent (by its zone's gateway
//! for a plain service, [`Authorizations`]), `Export` by the
//! service's zone gateway, and the traffic kinds (`Route`, `Backend`,
//! `RateLimit`, `OutlierDetection`, in [`traffic`]) by the caller's agent.
//!
//! Names: namespaces, services and zones are DNS labels ([`check_label`]),
//! because they become labels of mesh DNS names (`<svc>.<ns>.<suffix>`) and
//! of the gateway's SNI names (`<port>.<svc>.<ns>.<zone>.<suffix>`). Endpoint
//! ids, server names and policy names are only key parts ([`check_key`]) and
//! may be host names with dots.

use std::fmt;
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use trellis_ca::SpiffeId;

mod authz;
mod exports;
pub mod traffic;

pub use authz::{Authorizations, authorization_of};
pub use exports::Exports;
pub use traffic::{Backend, OutlierDetection, RateLimit, Route};

/// The policy kinds the store accepts.
pub const KINDS: &[&str] = &[
    "Route",
    "Backend",
    "Authorization",
    "RateLimit",
    "OutlierDetection",
    "Export",
];

/// A policy kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Kind {
    /// How requests to a service are routed; enforced by callers.
    Route,
    /// A service's subsets, balancing and guards; enforced by callers.
    Backend,
    /// Who may call a service; enforced by the callee's agent.
    Authorization,
    /// Rate limits, at each caller's sidecar.
    RateLimit,
    /// Outlier detection for one service; enforced by callers.
    OutlierDetection,
    /// Which zones may reach a service; enforced by its zone's gateway.
    Export,
}

/// One parsed policy document.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Policy {
    /// An `Authorization` document.
    Authorization(Authorization),
    /// An `Export` document.
    Export(Export),
    /// A `Route` document.
    Route(Route),
    /// A `Backend` document.
    Backend(Backend),
    /// A `RateLimit` document.
    RateLimit(RateLimit),
    /// An `OutlierDetection` document.
    OutlierDetection(OutlierDetection),
}

/// Who may call one service, and with which requests. Deny wins over allow;
/// with any allow entry, what no allow entry matches is refused; without a
/// document, every caller is allowed.
///
/// An entry is a caller (a SPIFFE ID or `ns:NAMESPACE`), or a mapping that
/// also names methods, paths (exact, or a prefix ending in `*`) and headers.
/// An opaque TCP connection has no method, path or headers: an allow entry
/// that names them does not admit it, and a deny entry that names them
/// refuses it, so the rule fails closed.
///
/// ```yaml
/// kind: Authorization
/// metadata: { name: catalog-callers }
/// spec:
///   service: catalog.shop          # the callee, service.namespace
///   allow:
///     - "spiffe://trellis.local/ns/ops/sa/probe"
///     - { from: [ "ns:shop" ], methods: [ GET ], paths: [ "/items/*" ] }
///   deny:  [ "spiffe://trellis.local/ns/shop/sa/legacy" ]
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Authorization {
    /// The callee.
    pub service: ServiceRef,
    /// What is allowed.
    #[serde(default)]
    pub allow: Vec<Caller>,
    /// What is refused.
    #[serde(default)]
    pub deny: Vec<Caller>,
}

/// One entry of an [`Authorization`]: a caller, or a caller and a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Value", into = "Value")]
pub enum Caller {
    /// Every request of this caller.
    Principal(Principal),
    /// Requests that have all of this.
    Request(RequestRule),
}

/// The request side of an [`Authorization`] entry: every field given must
/// hold; a list holds when any item does.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestRule {
    /// Callers; none: any caller.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<Principal>,
    /// Methods, e.g. `GET`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<traffic::MethodName>,
    /// Paths: exact, or a prefix ending in `*` (`/items/*`), or `*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<PathPattern>,
    /// Headers, by lowercase name.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub headers: std::collections::BTreeMap<traffic::HeaderKey, traffic::StringMatch>,
}

/// An authorization path: exact, or a prefix ending in `*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PathPattern(String);

/// What an inbound request shows an [`Authorization`]; `None` for an opaque
/// TCP connection.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// The method.
    pub method: &'a str,
    /// The path, without the query.
    pub path: &'a str,
    /// The headers.
    pub headers: &'a http::HeaderMap,
}

/// Which zones may reach one service through the gateways. A service
/// without an `Export` is exported to every zone.
///
/// ```yaml
/// kind: Export
/// metadata: { name: catalog }
/// spec: { service: catalog.shop, to: [ east, edge ] }   # or [ "*" ]
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Export {
    /// The service; not one of the system namespace.
    #[serde(deserialize_with = "exportable")]
    pub service: ServiceRef,
    /// The zones that may reach it.
    pub to: Vec<ExportTarget>,
}

/// A service as `name.namespace`, both DNS labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ServiceRef {
    name: String,
    namespace: String,
}

/// A caller a rule names: a SPIFFE ID, or `ns:NAMESPACE` for every workload
/// of a namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Principal(PrincipalInner);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum PrincipalInner {
    Id(SpiffeId),
    Namespace(String),
}

/// Where an `Export` lets callers come from: a zone, or `*` for every zone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ExportTarget {
    /// Every zone.
    Any,
    /// One zone.
    Zone(String),
}

/// Why a document was refused: which document, which field, why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{document}: {field}: {reason}")]
pub struct PolicyError {
    /// `Kind/name`, as the document is keyed in the store.
    pub document: String,
    /// The field, as written in the document: `kind`, `metadata.name`,
    /// `spec`, `spec.allow[0]`.
    pub field: String,
    /// What is wrong with it and what would be right.
    pub reason: String,
    /// The `spec.service` the document names, when it is a string, even one
    /// that breaks the rules: a proxy that cannot apply the document can
    /// still fail closed for that service.
    pub service: Option<String>,
}

/// Why a spec was refused, with the field relative to the spec (`allow[0]`,
/// or empty for the spec as a whole).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SpecError {
    /// The field within the spec; empty for the spec itself.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Why a name is not a DNS label (or a key part).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name is empty.
    #[error("must not be empty")]
    Empty,
    /// The name is longer than a DNS label can be.
    #[error("is {0} bytes long; at most 63 are allowed")]
    TooLong(usize),
    /// A character outside the rule.
    #[error("has {found:?}; only {allowed} are allowed")]
    Char {
        /// The first character that is not allowed.
        found: char,
        /// What is allowed.
        allowed: &'static str,
    },
    /// A label starts or ends with '-'.
    #[error("must start and end with a letter or digit")]
    Edge,
    /// A key part starts with '-'.
    #[error("must not start with '-'")]
    LeadingDash,
}

/// Parses one document: its kind, its `metadata.name` and its `spec` (the
/// JSON the store keeps). The store refuses a document this refuses, and a
/// proxy skips it.
pub fn parse(kind: &str, name: &str, spec: &Value) -> Result<Policy, PolicyError> {
    let fail = |field: &str, reason: String| PolicyError {
        document: format!("{kind}/{name}"),
        field: field.to_owned(),
        reason,
        service: spec
            .get("service")
            .and_then(Value::as_str)
            .map(str::to_owned),
    };
    let k: Kind = kind.parse().map_err(|reason| fail("kind", reason))?;
    check_key(name).map_err(|e| fail("metadata.name", format!("{name:?} {e}")))?;
    let parsed = match k {
        Kind::Authorization => Authorization::from_spec(spec).map(Policy::Authorization),
        Kind::Export => Export::from_spec(spec).map(Policy::Export),
        Kind::Route => Route::from_spec(spec).map(Policy::Route),
        Kind::Backend => Backend::from_spec(spec).map(Policy::Backend),
        Kind::RateLimit => RateLimit::from_spec(spec).map(Policy::RateLimit),
        Kind::OutlierDetection => OutlierDetection::from_spec(spec).map(Policy::OutlierDetection),
    };
    parsed.map_err(|e| fail(&spec_field(&e.field), e.reason))
}

/// The one name rule for namespaces, services and zones: a DNS label
/// (RFC 1123): 1 to 63 of `a-z 0-9 -`, starting and ending with a letter or
/// digit. These names are labels of mesh DNS and SNI names, so nothing
/// looser can be served.
pub fn check_label(v: &str) -> Result<(), NameError> {
    check_len(v)?;
    if let Some(c) = v
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(NameError::Char {
            found: c,
            allowed: "lowercase letters, digits and '-'",
        });
    }
    if v.starts_with('-') || v.ends_with('-') {
        return Err(NameError::Edge);
    }
    Ok(())
}

/// The rule for names that are only parts of store keys and SPIFFE paths,
/// never DNS labels: endpoint ids (host or pod names, which may hold dots),
/// server names and policy names: 1 to 63 of `a-z 0-9 - . _`, not starting
/// with '-'.
pub fn check_key(v: &str) -> Result<(), NameError> {
    check_len(v)?;
    if let Some(c) = v
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "-._".contains(*c)))
    {
        return Err(NameError::Char {
            found: c,
            allowed: "lowercase letters, digits, '-', '.' and '_'",
        });
    }
    if v.starts_with('-') {
        return Err(NameError::LeadingDash);
    }
    Ok(())
}

fn check_len(v: &str) -> Result<(), NameError> {
    match v.len() {
        0 => Err(NameError::Empty),
        n if n > 63 => Err(NameError::TooLong(n)),
        _ => Ok(()),
    }
}

fn spec_field(field: &str) -> String {
    if field.is_empty() {
        "spec".into()
    } else {
        format!("spec.{field}")
    }
}

// === impl Kind ===

impl Kind {
    /// The kind as written in documents.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Route => "Route",
            Kind::Backend => "Backend",
            Kind::Authorization => "Authorization",
            Kind::RateLimit => "RateLimit",
            Kind::OutlierDetection => "OutlierDetection",
            Kind::Export => "Export",
        }
    }
}

impl FromStr for Kind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "Route" => Kind::Route,
            "Backend" => Kind::Backend,
            "Authorization" => Kind::Authorization,
            "RateLimit" => Kind::RateLimit,
            "OutlierDetection" => Kind::OutlierDetection,
            "Export" => Kind::Export,
            _ => return Err(format!("{s:?} is not one of {}", KINDS.join(", "))),
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl Authorization ===

impl Authorization {
    const FIELDS: &'static [&'static str] = &["service", "allow", "deny"];

    /// Parses an `Authorization` spec, naming the field at fault. Agents
    /// check the rules of their own configuration file with it too.
    pub fn from_spec(spec: &Value) -> Result<Self, SpecError> {
        let obj = object(spec)?;
        known(obj, "Authorization", Self::FIELDS)?;
        present(obj, &["service"])?;
        Ok(Self {
            service: required(obj, "service")?,
            allow: list(obj, "allow")?,
            deny: list(obj, "deny")?,
        })
    }

    /// Whether `caller` may make `request` (`None`: open an opaque
    /// connection); `Err` names the entry that refuses, or says none allows.
    pub fn check(
        &self,
        caller: &SpiffeId,
        request: Option<RequestFacts<'_>>,
    ) -> Result<(), String> {
        if let Some(d) = self.deny.iter().find(|d| d.matches(caller, request, true)) {
            return Err(format!("deny {d}"));
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|a| a.matches(caller, request, false)) {
            return Err("not in any allow list".into());
        }
        Ok(())
    }
}

// === impl Caller ===

impl Caller {
    /// Whether the entry covers `caller` making `request`. For an opaque
    /// connection, request conditions count as met in a deny entry
    /// (`unknown_is_match`) and as unmet in an allow entry.
    pub fn matches(
        &self,
        caller: &SpiffeId,
        request: Option<RequestFacts<'_>>,
        unknown_is_match: bool,
    ) -> bool {
        match self {
            Caller::Principal(p) => p.matches(caller),
            Caller::Request(r) => {
                if !r.from.is_empty() && !r.from.iter().any(|p| p.matches(caller)) {
                    return false;
                }
                let l7 = !r.methods.is_empty() || !r.paths.is_empty() || !r.headers.is_empty();
                let Some(req) = request else {
                    return !l7 || unknown_is_match;
                };
                (r.methods.is_empty() || r.methods.iter().any(|m| m.as_str() == req.method))
                    && (r.paths.is_empty() || r.paths.iter().any(|p| p.matches(req.path)))
                    && r.headers
                        .iter()
                        .all(|(k, m)| m.matches_header(req.headers, k.as_str()))
            }
        }
    }
}

impl TryFrom<Value> for Caller {
    type Error = String;

    fn try_from(v: Value) -> Result<Self, String> {
        match v {
            Value::String(s) => s.parse().map(Caller::Principal),
            Value::Object(_) => traffic::typed::<RequestRule>(&v)
                .map(Caller::Request)
                .map_err(|e| {
                    if e.field.is_empty() {
                        e.reason
                    } else {
                        format!("{}: {}", e.field, e.reason)
                    }
                }),
            other => Err(format!(
                "expected a string (a caller) or a mapping (from, methods, paths, headers), found {other}"
            )),
        }
    }
}

impl From<Caller> for Value {
    fn from(c: Caller) -> Value {
        match c {
            Caller::Principal(p) => Value::String(p.to_string()),
            Caller::Request(r) => serde_json::to_value(r).unwrap_or(Value::Null),
        }
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Principal(p) => write!(f, "{p}"),
            Caller::Request(r) => {
                let v = serde_json::to_string(r).map_err(|_| fmt::Error)?;
                f.write_str(&v)
            }
        }
    }
}

// === impl PathPattern ===

impl PathPattern {
    /// Whether `path` is the path, or under the prefix.
    pub fn matches(&self, path: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => path.starts_with(prefix),
            None => path == self.0,
        }
    }
}

impl TryFrom<String> for PathPattern {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        let body = s.strip_suffix('*').unwrap_or(&s);
        if s != "*" && !body.starts_with('/') {
            return Err(format!("{s:?} must start with '/' (or be *)"));
        }
        if body.contains('*') {
            return Err(format!("{s:?}: '*' is allowed only at the end"));
        }
        Ok(Self(s))
    }
}

impl From<PathPattern> for String {
    fn from(p: PathPattern) -> String {
        p.0
    }
}

// === impl Export ===

impl Export {
    const FIELDS: &'static [&'static str] = &["service", "to"];

    /// Parses an `Export` spec, naming the field at fault.
    pub fn from_spec(spec: &Value) -> Result<Self, SpecError> {
        let obj = object(spec)?;
        known(obj, "Export", Self::FIELDS)?;
        present(obj, &["service", "to"])?;
        let service: ServiceRef = required(obj, "service")?;
        check_exportable(&service).map_err(|reason| SpecError {
            field: "service".into(),
            reason,
        })?;
        Ok(Self {
            service,
            to: list(obj, "to")?,
        })
    }

    /// Whether callers from `zone` may reach the service.
    pub fn admits(&self, zone: &str) -> bool {
        self.to.iter().any(|t| match t {
            ExportTarget::Any => true,
            ExportTarget::Zone(z) => z == zone,
        })
    }
}

/// The gateways (the system namespace) are exported to every zone: routing
/// across zones needs them, and an `Export` that hid them would cut a zone
/// off.
fn check_exportable(service: &ServiceRef) -> Result<(), String> {
    if service.namespace() == crate::state::SYSTEM_NAMESPACE {
        return Err(format!(
            "{service}: the {} namespace (the gateways) is exported to every zone and takes no Export",
            crate::state::SYSTEM_NAMESPACE
        ));
    }
    Ok(())
}

/// Reads an `Export`'s service with serde, by [`check_exportable`].
fn exportable<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ServiceRef, D::Error> {
    let service = ServiceRef::deserialize(d)?;
    check_exportable(&service).map_err(serde::de::Error::custom)?;
    Ok(service)
}

// === impl ServiceRef ===

impl ServiceRef {
    /// The service name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
}

impl FromStr for ServiceRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let Some((name, namespace)) = s.split_once('.') else {
            return Err(format!("{s:?} is not service.namespace"));
        };
        check_label(name)
            .map_err(|e| format!("{s:?} is not service.namespace: service {name:?} {e}"))?;
        check_label(namespace)
            .map_err(|e| format!("{s:?} is not service.namespace: namespace {namespace:?} {e}"))?;
        Ok(Self {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
        })
    }
}

impl TryFrom<String> for ServiceRef {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<ServiceRef> for String {
    fn from(s: ServiceRef) -> String {
        s.to_string()
    }
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.name, self.namespace)
    }
}

// === impl Principal ===

impl Principal {
    /// For `ns:NAMESPACE`: the namespace.
    pub fn namespace(&self) -> Option<&str> {
        match &self.0 {
            PrincipalInner::Namespace(ns) => Some(ns),
            PrincipalInner::Id(_) => None,
        }
    }

    /// Whether `caller` is this identity, or a workload of this namespace.
    pub fn matches(&self, caller: &SpiffeId) -> bool {
        match &self.0 {
            PrincipalInner::Id(id) => id == caller,
            PrincipalInner::Namespace(ns) => matches!(
                caller.role(),
                Some(trellis_ca::Role::Workload { namespace, .. }) if namespace == *ns
            ),
        }
    }

    /// For a SPIFFE ID: the ID.
    pub fn id(&self) -> Option<&SpiffeId> {
        match &self.0 {
            PrincipalInner::Id(id) => Some(id),
            PrincipalInner::Namespace(_) => None,
        }
    }
}

impl FromStr for Principal {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let not = "is neither a SPIFFE ID nor ns:NAMESPACE";
        if let Some(ns) = s.strip_prefix("ns:") {
            check_label(ns).map_err(|e| format!("{s:?} {not}: namespace {ns:?} {e}"))?;
            return Ok(Self(PrincipalInner::Namespace(ns.to_owned())));
        }
        s.parse::<SpiffeId>()
            .map(|id| Self(PrincipalInner::Id(id)))
            .map_err(|e| format!("{s:?} {not}: {e}"))
    }
}

impl TryFrom<String> for Principal {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Principal> for String {
    fn from(p: Principal) -> String {
        p.to_string()
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            PrincipalInner::Id(id) => write!(f, "{id}"),
            PrincipalInner::Namespace(ns) => write!(f, "ns:{ns}"),
        }
    }
}

// === impl ExportTarget ===

impl FromStr for ExportTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "*" {
            return Ok(Self::Any);
        }
        check_label(s).map_err(|e| format!("{s:?} is not a zone name or *: {e}"))?;
        Ok(Self::Zone(s.to_owned()))
    }
}

impl TryFrom<String> for ExportTarget {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<ExportTarget> for String {
    fn from(t: ExportTarget) -> String {
        t.to_string()
    }
}

impl fmt::Display for ExportTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExportTarget::Any => f.write_str("*"),
            ExportTarget::Zone(z) => f.write_str(z),
        }
    }
}

// === spec walking ===
//
// The typed structs above are the schema (serde, `deny_unknown_fields`);
// these helpers walk a spec field by field with the same types so that a
// refusal names the field, down to the list item, which serde_json's own
// errors do not.

fn object(spec: &Value) -> Result<&Map<String, Value>, SpecError> {
    spec.as_object().ok_or_else(|| SpecError {
        field: String::new(),
        reason: "must be a mapping".into(),
    })
}

fn known(obj: &Map<String, Value>, kind: &str, fields: &[&str]) -> Result<(), SpecError> {
    match obj.keys().find(|k| !fields.contains(&k.as_str())) {
        Some(k) => Err(SpecError {
            field: k.clone(),
            reason: format!("unknown field; {kind} takes {}", fields.join(", ")),
        }),
        None => Ok(()),
    }
}

/// Every missing field is reported before any bad value.
fn present(obj: &Map<String, Value>, fields: &[&str]) -> Result<(), SpecError> {
    match fields.iter().find(|f| !obj.contains_key(**f)) {
        Some(f) => Err(missing(f)),
        None => Ok(()),
    }
}

fn missing(field: &str) -> SpecError {
    SpecError {
        field: field.into(),
        reason: "missing".into(),
    }
}

fn value<T: DeserializeOwned>(v: &Value, field: String) -> Result<T, SpecError> {
    T::deserialize(v).map_err(|e| SpecError {
        field,
        reason: e.to_string(),
    })
}

fn required<T: DeserializeOwned>(obj: &Map<String, Value>, key: &str) -> Result<T, SpecError> {
    let v = obj.get(key).ok_or_else(|| missing(key))?;
    value(v, key.into())
}

/// An optional list (absent: empty), each item parsed on its own.
fn list<T: DeserializeOwned>(obj: &Map<String, Value>, key: &str) -> Result<Vec<T>, SpecError> {
    let Some(v) = obj.get(key) else {
        return Ok(Vec::new());
    };
    let items = v.as_array().ok_or_else(|| SpecError {
        field: key.into(),
        reason: "must be a list".into(),
    })?;
    items
        .iter()
        .enumerate()
        .map(|(i, item)| value(item, format!("{key}[{i}]")))
        .collect()
}

#[cfg(any(test, feature = "testing"))]
pub mod cases;
#[cfg(test)]
mod tests;
