//! The policy documents of the mesh, typed, and the name rules they share:
//! the one definition the store validates with at `trellis policy apply` and
//! every proxy parses with when it applies a revision, so that what the store
//! accepts, every proxy of the same version can apply.
//!
//! `Authorization` (enforced by the callee's agent) and `Export` (enforced by
//! the service's zone gateway) are typed here. `Route`, `RateLimit` and
//! `OutlierDetection` are accepted as any mapping, as before, until a proxy
//! enforces them; they come through [`parse`] all the same, so typing one is
//! a change to this module only.
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

/// The policy kinds the store accepts.
pub const KINDS: &[&str] = &[
    "Route",
    "Authorization",
    "RateLimit",
    "OutlierDetection",
    "Export",
];

/// A policy kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Kind {
    /// L7 routing (stored, not enforced yet).
    Route,
    /// Who may call a service; enforced by the callee's agent.
    Authorization,
    /// Rate limits (stored, not enforced yet).
    RateLimit,
    /// Outlier detection (stored, not enforced yet).
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
    /// A kind no proxy enforces yet: its spec, a mapping, as given.
    Untyped {
        /// The kind.
        kind: Kind,
        /// The spec.
        spec: Map<String, Value>,
    },
}

/// Who may call one service. Deny wins over allow; with any allow entry,
/// callers not allowed are refused; without a document, every caller is
/// allowed.
///
/// ```yaml
/// kind: Authorization
/// metadata: { name: catalog-callers }
/// spec:
///   service: catalog.shop          # the callee, service.namespace
///   allow: [ "ns:shop", "spiffe://trellis.local/ns/ops/sa/probe" ]
///   deny:  [ "spiffe://trellis.local/ns/shop/sa/legacy" ]
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Authorization {
    /// The callee.
    pub service: ServiceRef,
    /// Callers allowed.
    #[serde(default)]
    pub allow: Vec<Principal>,
    /// Callers refused.
    #[serde(default)]
    pub deny: Vec<Principal>,
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
    /// The service.
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
        Kind::Route | Kind::RateLimit | Kind::OutlierDetection => {
            object(spec).map(|spec| Policy::Untyped {
                kind: k,
                spec: spec.clone(),
            })
        }
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
}

// === impl Export ===

impl Export {
    const FIELDS: &'static [&'static str] = &["service", "to"];

    /// Parses an `Export` spec, naming the field at fault.
    pub fn from_spec(spec: &Value) -> Result<Self, SpecError> {
        let obj = object(spec)?;
        known(obj, "Export", Self::FIELDS)?;
        present(obj, &["service", "to"])?;
        Ok(Self {
            service: required(obj, "service")?,
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
