//! The `Authorization` documents as a callee enforces them, wherever it
//! runs: a sidecar for its local services, a gateway for the plain
//! (sidecar-less) services it terminates for. One evaluation, so a rule
//! means the same at both.

use std::collections::BTreeMap;

use trellis_ca::SpiffeId;

use super::{Authorization, Policy, PolicyError, RequestFacts};
use crate::state::PolicyRecord;
use crate::view::MeshState;

/// The rules in force, and the services that refuse every caller because
/// a document naming them could not be applied.
#[derive(Debug, Clone, Default)]
pub struct Authorizations {
    /// One rule per document that parsed (and any the caller adds, such as
    /// an agent's file rules).
    pub rules: Vec<Authorization>,
    /// Services (`name.namespace`) whose document did not parse, with that
    /// document (`Authorization/name`).
    pub closed: BTreeMap<String, String>,
    /// Why each document that did not parse was left out, for the ack.
    pub skipped: Vec<String>,
}

impl Authorizations {
    /// Reads the store's `Authorization` documents with the store's own
    /// parser. A document that does not parse (stored by an older or
    /// foreign server) is left out and reported, and the rest apply.
    ///
    /// Left out must not mean open: the document may have been a deny. So
    /// the service it names, when its `spec.service` is a string, fails
    /// closed until the document is fixed or deleted. A document whose
    /// service cannot be read is only reported: closing every service for
    /// it would turn one bad document into an outage.
    pub fn from_state(state: &MeshState) -> Self {
        let mut out = Self::default();
        for p in state.policies_of("Authorization") {
            match authorization_of(p) {
                Ok(rule) => out.rules.push(rule),
                Err(e) => match e.service.clone() {
                    Some(service) => {
                        out.skipped.push(format!(
                            "{e} (calls to {service} are refused until it is fixed)"
                        ));
                        out.closed.insert(service, e.document);
                    }
                    None => out.skipped.push(e.to_string()),
                },
            }
        }
        out
    }

    /// Whether `caller` may call `service` (`name.namespace`), with what it
    /// asks when that is a request: a matching deny refuses; when any rule
    /// of the service allows someone, only a matching allow admits; with no
    /// allow list, everyone is admitted. The error names the rule.
    pub fn check(
        &self,
        service: &str,
        caller: &SpiffeId,
        request: Option<RequestFacts<'_>>,
    ) -> Result<(), String> {
        if let Some(doc) = self.closed.get(service) {
            return Err(format!(
                "{doc} cannot be applied (see `trellis status`); failing closed"
            ));
        }
        let (name, namespace) = service.split_once('.').unwrap_or((service, ""));
        let rules = || {
            self.rules
                .iter()
                .filter(|r| r.service.name() == name && r.service.namespace() == namespace)
        };
        if let Some(d) = rules()
            .flat_map(|r| &r.deny)
            .find(|d| d.matches(caller, request, true))
        {
            return Err(format!("deny {d}"));
        }
        let mut allows = rules().filter(|r| !r.allow.is_empty()).peekable();
        if allows.peek().is_some()
            && !allows.any(|r| r.allow.iter().any(|a| a.matches(caller, request, false)))
        {
            return Err("not in any allow list".into());
        }
        Ok(())
    }
}

/// One stored `Authorization` document as a rule.
pub fn authorization_of(p: &PolicyRecord) -> Result<Authorization, PolicyError> {
    match p.parse()? {
        Policy::Authorization(a) => Ok(a),
        _ => Err(PolicyError {
            document: format!("{}/{}", p.kind, p.name),
            field: "kind".into(),
            reason: "is not Authorization".into(),
            service: None,
        }),
    }
}
