//! Who may have the store do what. One check per command, run where a call
//! arrives and again by the leader on a forwarded write, so a follower's
//! word is never the only check: a server identity relays, it is not an
//! operator.

use std::net::IpAddr;

use tonic::Status;
use trellis_ca::{Role, RoleKind, SpiffeId};

use crate::state::{
    self, Command, EndpointRecord, GATEWAY_SERVICE, LABEL_ACCOUNT, LABEL_INBOUND_PORT, LABEL_PLAIN,
    MemberChange, SYSTEM_NAMESPACE, TokenRecord,
};
use crate::storage::Db;

/// Shortest lease a proxy may hold: renewals come every third of it.
pub const MIN_LEASE_SECONDS: u64 = 3;
/// Longest lease a proxy may hold: a dead host leaves DNS within it.
pub const MAX_LEASE_SECONDS: u64 = 300;
/// Longest a zone controller's pod token may live: the pod's agent spends
/// it within seconds of the exchange that minted it.
pub const MAX_CONTROLLER_TOKEN_SECONDS: u64 = 300;

fn denied(msg: String) -> Status {
    Status::permission_denied(msg)
}

fn only(caller: &SpiffeId, what: &str, kinds: &[RoleKind]) -> Result<(), Status> {
    if caller.role_kind().is_some_and(|k| kinds.contains(&k)) {
        return Ok(());
    }
    let names: Vec<String> = kinds.iter().map(|k| k.to_string()).collect();
    Err(denied(format!(
        "{caller} may not {what}: only {} may",
        names.join(" or ")
    )))
}

/// Whether `caller` may have the store apply `cmd`.
pub(crate) fn check(db: &Db, caller: &SpiffeId, cmd: &Command) -> Result<(), Status> {
    match cmd {
        Command::Register { endpoint, .. } => register(db, caller, endpoint),
        Command::Member { change } => member(db, caller, change),
        Command::Deregister { .. } | Command::Renew { .. } => only(
            caller,
            "change registrations",
            &[
                RoleKind::Agent,
                RoleKind::Gateway,
                RoleKind::Operator,
                RoleKind::Controller,
            ],
        ),
        Command::CreateToken { token, .. } if caller.role_kind() == Some(RoleKind::Controller) => {
            controller_token(caller, token)
        }
        Command::ApplyPolicies { .. }
        | Command::DeletePolicy { .. }
        | Command::CreateToken { .. }
        | Command::RevokeToken { .. }
        | Command::RemoveZone { .. } => only(
            caller,
            "change policy, tokens, zones or membership",
            &[RoleKind::Operator],
        ),
        // The token is the proof; the caller is the identity it buys.
        Command::UseToken { by, .. } if *by == caller.to_string() => Ok(()),
        Command::UseToken { by, .. } => {
            Err(denied(format!("{caller} may not spend a token for {by}")))
        }
        Command::Ack { proxy, .. } if *proxy == caller.to_string() => only(
            caller,
            "acknowledge revisions",
            &[RoleKind::Agent, RoleKind::Gateway],
        ),
        Command::Ack { proxy, .. } => {
            Err(denied(format!("{caller} may not acknowledge for {proxy}")))
        }
        // Written only by the leader itself, never on anyone's behalf.
        Command::ExpireLeases { .. }
        | Command::ExpireEndpoints { .. }
        | Command::SetMember { .. }
        | Command::Note { .. }
        | Command::As { .. } => Err(denied(format!("{caller} may not propose this command"))),
    }
}

/// A registration: agents register the workloads their join granted, on
/// their own host, in their own zone; gateways only themselves, under the
/// reserved namespace; operators anything.
fn register(db: &Db, caller: &SpiffeId, ep: &EndpointRecord) -> Result<(), Status> {
    let (kind, zone, name) = match caller.role() {
        Some(Role::Operator { .. }) => return Ok(()),
        Some(Role::Agent { zone, name }) => (RoleKind::Agent, zone, name),
        Some(Role::Gateway { zone, name }) => (RoleKind::Gateway, zone, name),
        Some(Role::Controller { zone, .. }) => return controller_endpoint(caller, &zone, ep),
        _ => {
            return only(
                caller,
                "register endpoints",
                &[RoleKind::Agent, RoleKind::Gateway, RoleKind::Operator],
            );
        }
    };
    if ep.zone != zone {
        return Err(denied(format!(
            "{caller} belongs to zone {zone} and may not register endpoints in zone {}",
            ep.zone
        )));
    }
    if ep.id != name {
        return Err(denied(format!(
            "{caller} registers its own host only: the endpoint id must be {name:?}, not {:?}",
            ep.id
        )));
    }
    if !(MIN_LEASE_SECONDS..=MAX_LEASE_SECONDS).contains(&ep.lease_seconds) {
        return Err(Status::invalid_argument(format!(
            "lease_seconds: {} is outside {MIN_LEASE_SECONDS}..={MAX_LEASE_SECONDS} (only operators register endpoints without a lease)",
            ep.lease_seconds
        )));
    }
    let system = ep.namespace == SYSTEM_NAMESPACE;
    match kind {
        RoleKind::Gateway if !(system && ep.service == GATEWAY_SERVICE) => Err(denied(format!(
            "{caller} may register only {GATEWAY_SERVICE}.{SYSTEM_NAMESPACE}, not {}.{}",
            ep.service, ep.namespace
        ))),
        RoleKind::Agent if system => Err(denied(format!(
            "namespace {SYSTEM_NAMESPACE} is reserved for gateways; {caller} may not register in it"
        ))),
        // A plain endpoint makes its zone's gateway connect in plaintext to
        // the address it names; only a zone controller vouches for those.
        RoleKind::Agent if ep.is_plain() => Err(denied(format!(
            "label {LABEL_PLAIN}: {caller} registers its own sidecar's workloads, never plain endpoints"
        ))),
        RoleKind::Agent => {
            let account = ep.labels.get(LABEL_ACCOUNT).unwrap_or(&ep.service);
            let grant = state::joined_with(db, &caller.to_string())
                .map_err(super::to_status)?
                .filter(|t| t.agent);
            match grant {
                Some(t) if t.allows_workload(&ep.namespace, account) => Ok(()),
                Some(t) => Err(denied(format!(
                    "{caller} may register only the workloads its join token granted ({}), not {}/{account}",
                    t.workloads.join(", "),
                    ep.namespace
                ))),
                None => Err(denied(format!(
                    "{caller} did not join with an agent token, so it was granted no workloads; join the host with `trellis zone token create --agent`"
                ))),
            }
        }
        _ => Ok(()),
    }
}

/// A zone controller registers only what it sees in its cluster and no
/// sidecar serves: plain endpoints of its own zone, with a lease, marked
/// [`LABEL_PLAIN`] so that callers know the far end is not mTLS, and never
/// under the gateways' namespace or with the labels a sidecar's endpoint
/// carries (it may not pose as a workload identity).
fn controller_endpoint(caller: &SpiffeId, zone: &str, ep: &EndpointRecord) -> Result<(), Status> {
    if ep.zone != zone {
        return Err(denied(format!(
            "{caller} belongs to zone {zone} and may not register endpoints in zone {}",
            ep.zone
        )));
    }
    if ep.namespace == SYSTEM_NAMESPACE {
        return Err(denied(format!(
            "namespace {SYSTEM_NAMESPACE} is reserved for gateways; {caller} may not register in it"
        )));
    }
    if ep.labels.get(LABEL_PLAIN).map(String::as_str) != Some("true") {
        return Err(denied(format!(
            "{caller} registers plain endpoints only: label {LABEL_PLAIN}=true is required"
        )));
    }
    for l in [LABEL_INBOUND_PORT, LABEL_ACCOUNT] {
        if ep.labels.contains_key(l) {
            return Err(denied(format!(
                "label {l}: a plain endpoint has no sidecar, so {caller} may not set it"
            )));
        }
    }
    if !(MIN_LEASE_SECONDS..=MAX_LEASE_SECONDS).contains(&ep.lease_seconds) {
        return Err(Status::invalid_argument(format!(
            "lease_seconds: {} is outside {MIN_LEASE_SECONDS}..={MAX_LEASE_SECONDS} (a controller's endpoints hold a lease it renews)",
            ep.lease_seconds
        )));
    }
    Ok(())
}

/// The one token a zone controller may make: for a pod it verified, a
/// short-lived agent token of its own zone, bound to the pod's name and
/// granting exactly one workload identity (no `NS/*`).
fn controller_token(caller: &SpiffeId, t: &TokenRecord) -> Result<(), Status> {
    let Some(Role::Controller { zone, .. }) = caller.role() else {
        return only(caller, "create join tokens", &[RoleKind::Operator]);
    };
    let refuse = |why: String| Err(denied(format!("{caller} may not create this token: {why}")));
    if !t.agent || t.edge {
        return refuse("a controller makes agent tokens only".into());
    }
    if t.zone != zone {
        return refuse(format!(
            "it is for zone {}, the controller's is {zone}",
            t.zone
        ));
    }
    if t.name.is_none() {
        return refuse("it must be bound to the pod's name (name)".into());
    }
    match t.workloads.as_slice() {
        [w] if !w.ends_with("/*") => {}
        _ => {
            return refuse(format!(
                "it must grant exactly one workload NAMESPACE/ACCOUNT, not {:?}",
                t.workloads
            ));
        }
    }
    let ttl = t.expires_ms.saturating_sub(t.created_ms) / 1000;
    if ttl > MAX_CONTROLLER_TOKEN_SECONDS {
        return refuse(format!(
            "ttl_seconds: {ttl} is longer than the {MAX_CONTROLLER_TOKEN_SECONDS} s a controller's token may live"
        ));
    }
    Ok(())
}

/// An agent's endpoint must point at the host that registers it: the
/// address it connected from. Otherwise one agent's credentials could make
/// every sidecar and gateway of the mesh dial any address it names.
pub(crate) fn address_is_callers(
    caller: &SpiffeId,
    ep: &EndpointRecord,
    from: IpAddr,
) -> Result<(), Status> {
    if caller.role_kind() != Some(RoleKind::Agent) {
        return Ok(());
    }
    let from = from.to_canonical();
    match ep.address.parse::<IpAddr>() {
        Ok(a) if a.to_canonical() == from => Ok(()),
        _ => Err(denied(format!(
            "address: {caller} connected from {from} and may register only that address, not {:?} (set the agent's advertise address to the one it reaches the servers from)",
            ep.address
        ))),
    }
}

/// What a learner (an edge server) may relay to the leader: writes of its
/// own zone's proxies and joins into its own zone, never an operator's.
pub(crate) fn learner_may_relay(
    db: &Db,
    learner_zone: &str,
    caller: &SpiffeId,
    cmd: &Command,
) -> Result<(), Status> {
    let caller_zone = caller.role().and_then(|r| r.zone().map(str::to_string));
    if caller.role_kind() == Some(RoleKind::Operator)
        || caller_zone.as_deref() != Some(learner_zone)
    {
        return Err(denied(format!(
            "an edge server of zone {learner_zone} may not relay writes of {caller}"
        )));
    }
    if let Command::UseToken { hash, .. } = cmd {
        let zone = state::token(db, hash)
            .map_err(super::to_status)?
            .map(|t| t.zone);
        if zone.as_deref() != Some(learner_zone) {
            return Err(denied(format!(
                "an edge server of zone {learner_zone} may not relay joins into another zone"
            )));
        }
    }
    Ok(())
}

/// A membership change: an operator's, or a server's own join (its spent
/// token is the proof) and promotion (core zones only).
pub(crate) fn member(db: &Db, caller: &SpiffeId, change: &MemberChange) -> Result<(), Status> {
    if caller.role_kind() == Some(RoleKind::Operator) {
        return Ok(());
    }
    let Some(Role::Server { zone, name }) = caller.role() else {
        return only(caller, "change the membership", &[RoleKind::Operator]);
    };
    let own = super::member_id(&zone, &name);
    let caller_text = caller.to_string();
    match change {
        MemberChange::AddLearner(m) if m.id == own && m.zone == zone && m.name == name => {
            if state::removed(db, own).map_err(super::to_status)? {
                return Err(denied(format!(
                    "{caller} was removed by an operator; only an operator adds it back"
                )));
            }
            if state::members(db)
                .map_err(super::to_status)?
                .iter()
                .any(|m| m.id == own)
            {
                return Err(denied(format!("{caller} is already a member")));
            }
            let joined = state::joined_with(db, &caller_text)
                .map_err(super::to_status)?
                .is_some_and(|t| !t.agent);
            if joined {
                Ok(())
            } else {
                Err(denied(format!(
                    "{caller} has not joined with a token; an operator adds members"
                )))
            }
        }
        MemberChange::Promote(id) if *id == own => {
            let core = state::zones(db)
                .map_err(super::to_status)?
                .iter()
                .any(|z| z.name == zone && z.role == state::ZoneRole::Core);
            if core {
                Ok(())
            } else {
                Err(denied(format!(
                    "{caller} serves an edge zone: its servers stay learners"
                )))
            }
        }
        _ => Err(denied(format!(
            "{caller} may change only its own membership (its join, its promotion); other changes are an operator's"
        ))),
    }
}
