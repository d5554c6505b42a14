//! SPIFFE IDs and the Trellis naming scheme on top of them.
//!
//! The parsing rules follow the SPIFFE-ID specification (section 2): a fixed
//! lowercase `spiffe://` scheme, a trust domain of `[a-z0-9._-]`, path segments
//! of `[a-zA-Z0-9._-]` that are neither empty nor `.`/`..`, no query, fragment,
//! port, userinfo or percent-encoding, and at most 2048 bytes in all.

use std::fmt;
use std::str::FromStr;

/// The only scheme a SPIFFE ID may carry; the spec requires lowercase.
const SCHEME: &str = "spiffe://";
/// SPIFFE-ID spec 2.1: a trust domain name is at most 255 bytes.
const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// SPIFFE-ID spec 2.3: a SPIFFE ID is at most 2048 bytes.
const MAX_ID_LEN: usize = 2048;

/// Why a string is not a valid SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeIdError {
    /// The ID is empty.
    #[error("a SPIFFE ID may not be empty")]
    Empty,
    /// The ID does not start with `spiffe://`.
    #[error("{0:?} does not start with \"spiffe://\" (the scheme is required and lowercase)")]
    WrongScheme(String),
    /// The trust domain is empty.
    #[error("the trust domain is empty (expected spiffe://<trust-domain>/...)")]
    EmptyTrustDomain,
    /// The trust domain is longer than the spec allows.
    #[error("the trust domain is {0} bytes long; at most 255 are allowed")]
    TrustDomainTooLong(usize),
    /// The trust domain has a character outside `[a-z0-9._-]`.
    #[error(
        "trust domain {domain:?} has the character {ch:?}; only lowercase letters, digits, '.', '-' and '_' are allowed (no port, userinfo or uppercase)"
    )]
    BadTrustDomainChar {
        /// The trust domain as given.
        domain: String,
        /// The first offending character.
        ch: char,
    },
    /// A path segment is empty (`//` or a trailing `/`).
    #[error("path {0:?} has an empty segment (a doubled or trailing '/')")]
    EmptySegment(String),
    /// A path segment is `.` or `..`.
    #[error("path {0:?} has a '.' or '..' segment")]
    DotSegment(String),
    /// A path segment has a character outside `[a-zA-Z0-9._-]`.
    #[error(
        "path {path:?} has the character {ch:?}; only letters, digits, '.', '-' and '_' are allowed (no query, fragment or percent-encoding)"
    )]
    BadPathChar {
        /// The path as given.
        path: String,
        /// The first offending character.
        ch: char,
    },
    /// The whole ID is longer than the spec allows.
    #[error("the SPIFFE ID is {0} bytes long; at most 2048 are allowed")]
    TooLong(usize),
}

/// A SPIFFE trust domain, such as `trellis.local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

/// A validated SPIFFE ID, such as `spiffe://trellis.local/ns/shop/sa/catalog`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// The whole ID; `td_end` splits it into trust domain and path.
    text: String,
    td_end: usize,
}

/// What a Trellis identity stands for, read from the path of its SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Role {
    /// A workload: `/ns/<namespace>/sa/<account>`.
    Workload {
        /// Namespace of the workload's service.
        namespace: String,
        /// Service account the workload runs as.
        account: String,
    },
    /// A federation store member: `/zone/<zone>/server/<name>`.
    Server {
        /// Zone of the server.
        zone: String,
        /// Server name.
        name: String,
    },
    /// An east-west gateway: `/zone/<zone>/gateway/<name>`.
    Gateway {
        /// Zone of the gateway.
        zone: String,
        /// Gateway name.
        name: String,
    },
    /// A host agent: `/zone/<zone>/agent/<name>`.
    Agent {
        /// Zone of the agent.
        zone: String,
        /// Agent (host) name.
        name: String,
    },
    /// A human or automation running operator verbs: `/operator/<name>`.
    Operator {
        /// Operator name.
        name: String,
    },
    /// A zone controller with a cluster's API access (Kubernetes):
    /// `/zone/<zone>/controller/<name>`. It may mint single-workload agent
    /// tokens for pods it has verified and register the cluster's plain
    /// endpoints, in its own zone only.
    Controller {
        /// Zone of the controller.
        zone: String,
        /// Controller name.
        name: String,
    },
}

/// The kind of a [`Role`], without its names; used in allow-lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RoleKind {
    /// `/ns/<namespace>/sa/<account>`
    Workload,
    /// `/zone/<zone>/server/<name>`
    Server,
    /// `/zone/<zone>/gateway/<name>`
    Gateway,
    /// `/zone/<zone>/agent/<name>`
    Agent,
    /// `/operator/<name>`
    Operator,
    /// `/zone/<zone>/controller/<name>`
    Controller,
}

// === impl TrustDomain ===

impl TrustDomain {
    /// The trust domain as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SPIFFE ID with this trust domain and the given path segments.
    pub fn id<I, S>(&self, segments: I) -> Result<SpiffeId, SpiffeIdError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut text = format!("{SCHEME}{}", self.0);
        for s in segments {
            let s = s.as_ref();
            // Each name is one segment: a '/' inside would smuggle in more.
            if s.contains('/') {
                return Err(SpiffeIdError::BadPathChar {
                    path: s.to_owned(),
                    ch: '/',
                });
            }
            text.push('/');
            text.push_str(s);
        }
        text.parse()
    }

    /// `spiffe://<td>/ns/<namespace>/sa/<account>`.
    pub fn workload(&self, namespace: &str, account: &str) -> Result<SpiffeId, SpiffeIdError> {
        self.id(["ns", namespace, "sa", account])
    }

    /// `spiffe://<td>/zone/<zone>/<kind>/<name>` for servers, gateways, agents and controllers;
    /// `spiffe://<td>/operator/<name>` for operators (zone ignored);
    /// `spiffe://<td>/ns/<zone>/sa/<name>` is not built here: use [`TrustDomain::workload`].
    pub fn role(&self, kind: RoleKind, zone: &str, name: &str) -> Result<SpiffeId, SpiffeIdError> {
        match kind {
            RoleKind::Server => self.id(["zone", zone, "server", name]),
            RoleKind::Gateway => self.id(["zone", zone, "gateway", name]),
            RoleKind::Agent => self.id(["zone", zone, "agent", name]),
            RoleKind::Controller => self.id(["zone", zone, "controller", name]),
            RoleKind::Operator => self.id(["operator", name]),
            RoleKind::Workload => self.workload(zone, name),
        }
    }
}

fn check_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong(td.len()));
    }
    if let Some(ch) = td
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')))
    {
        return Err(SpiffeIdError::BadTrustDomainChar {
            domain: td.to_owned(),
            ch,
        });
    }
    Ok(())
}

fn check_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    // The caller split at the first '/', so the path starts with it.
    for seg in path[1..].split('/') {
        if seg.is_empty() {
            return Err(SpiffeIdError::EmptySegment(path.to_owned()));
        }
        if seg == "." || seg == ".." {
            return Err(SpiffeIdError::DotSegment(path.to_owned()));
        }
        if let Some(ch) = seg
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
        {
            return Err(SpiffeIdError::BadPathChar {
                path: path.to_owned(),
                ch,
            });
        }
    }
    Ok(())
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;

    /// Accepts a bare trust domain (`trellis.local`) or one written as an ID
    /// with no path (`spiffe://trellis.local`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let td = s.strip_prefix(SCHEME).unwrap_or(s);
        check_trust_domain(td)?;
        Ok(Self(td.to_owned()))
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// === impl SpiffeId ===

impl SpiffeId {
    /// The trust domain part, without scheme.
    pub fn trust_domain_str(&self) -> &str {
        &self.text[SCHEME.len()..self.td_end]
    }

    /// The trust domain part.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_str().to_owned())
    }

    /// The path, starting with `/`, or empty for a trust domain's own ID.
    pub fn path(&self) -> &str {
        &self.text[self.td_end..]
    }

    /// The whole ID as text.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The Trellis role this ID names, if its path follows the Trellis scheme.
    pub fn role(&self) -> Option<Role> {
        let segs: Vec<&str> = self.path().split('/').skip(1).collect();
        match segs.as_slice() {
            ["ns", ns, "sa", sa] => Some(Role::Workload {
                namespace: (*ns).to_owned(),
                account: (*sa).to_owned(),
            }),
            ["zone", zone, kind, name] => {
                let (zone, name) = ((*zone).to_owned(), (*name).to_owned());
                match *kind {
                    "server" => Some(Role::Server { zone, name }),
                    "gateway" => Some(Role::Gateway { zone, name }),
                    "agent" => Some(Role::Agent { zone, name }),
                    "controller" => Some(Role::Controller { zone, name }),
                    _ => None,
                }
            }
            ["operator", name] => Some(Role::Operator {
                name: (*name).to_owned(),
            }),
            _ => None,
        }
    }

    /// The kind of Trellis role this ID names, if any.
    pub fn role_kind(&self) -> Option<RoleKind> {
        self.role().map(|r| r.kind())
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong(s.len()));
        }
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| SpiffeIdError::WrongScheme(s.to_owned()))?;
        let td_len = rest.find('/').unwrap_or(rest.len());
        let (td, path) = rest.split_at(td_len);
        check_trust_domain(td)?;
        check_path(path)?;
        Ok(Self {
            text: s.to_owned(),
            td_end: SCHEME.len() + td_len,
        })
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = SpiffeIdError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.text)
    }
}

// === impl Role ===

impl Role {
    /// The kind of this role.
    pub fn kind(&self) -> RoleKind {
        match self {
            Role::Workload { .. } => RoleKind::Workload,
            Role::Server { .. } => RoleKind::Server,
            Role::Gateway { .. } => RoleKind::Gateway,
            Role::Agent { .. } => RoleKind::Agent,
            Role::Operator { .. } => RoleKind::Operator,
            Role::Controller { .. } => RoleKind::Controller,
        }
    }

    /// The zone a server, gateway or agent belongs to.
    pub fn zone(&self) -> Option<&str> {
        match self {
            Role::Server { zone, .. }
            | Role::Gateway { zone, .. }
            | Role::Agent { zone, .. }
            | Role::Controller { zone, .. } => Some(zone),
            Role::Workload { .. } | Role::Operator { .. } => None,
        }
    }
}

impl fmt::Display for RoleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RoleKind::Workload => "workload",
            RoleKind::Server => "server",
            RoleKind::Gateway => "gateway",
            RoleKind::Agent => "agent",
            RoleKind::Operator => "operator",
            RoleKind::Controller => "controller",
        })
    }
}

#[cfg(test)]
mod tests;
