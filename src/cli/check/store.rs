//! What `trellis check` asks the federation servers, with the host's own
//! identity (an agent may call Cluster.Status, Zones.Bundle and
//! Registry.List): reachability, quorum and leader, clock skew, the trust
//! bundle in force, and the zone's gateways, whose admin endpoints report
//! their links to other zones.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;
use tonic::transport::Channel;
use trellis_ca::TrustBundle;
use trellis_federation::client;
use trellis_federation::proto::{self, ReadOptions};
use trellis_federation::state::{GATEWAY_SERVICE, LABEL_ADMIN_ADDRESS, SYSTEM_NAMESPACE};

use super::local::Credentials;
use super::{Check, Ctx, Status};

/// Skew past which the clock check warns: certificates are backdated by
/// `trellis_ca::BACKDATE`, but short lifetimes (seconds in tests, hours by
/// default) make every second count for renewals and expiry.
const SKEW_WARN: Duration = Duration::from_secs(1);
/// Skew past which it fails: a clock this far off misjudges the validity
/// of certificates that live minutes.
const SKEW_FAIL: Duration = Duration::from_secs(30);

/// One server's answer to Cluster.Status.
struct ServerProbe {
    addr: String,
    /// Whether the configuration lists it (the others are voters found in
    /// the member list).
    configured: bool,
    rtt: Duration,
    answer: Result<proto::ClusterStatus, String>,
    /// Server clock minus ours, at the middle of the call.
    skew_ms: Option<i64>,
}

/// Everything learnt from the servers, for several checks.
pub(crate) struct Store {
    /// Why the servers were not asked, if they were not.
    not_asked: Option<String>,
    probes: Vec<ServerProbe>,
    /// The bundle the servers serve now.
    pub(crate) bundle: Option<TrustBundle>,
    /// The bundle was fetched without verifying the server (none would
    /// complete an authenticated handshake): a hint, not a fact.
    pub(crate) bundle_unverified: bool,
    /// Registry.List from a reachable server.
    pub(crate) endpoints: Option<Vec<proto::Endpoint>>,
}

impl Store {
    pub(crate) async fn probe(ctx: &Ctx, creds: &Credentials) -> Self {
        let mut s = Self {
            not_asked: None,
            probes: Vec::new(),
            bundle: None,
            bundle_unverified: false,
            endpoints: None,
        };
        if ctx.servers.is_empty() {
            s.not_asked = Some("the configuration lists no servers (static mesh)".into());
            return s;
        }
        let Some((c, b, _)) = creds.node().and_then(|n| n.loaded.as_ref().ok()) else {
            s.not_asked = Some(format!(
                "no usable identity to call the servers with ({}.crt; see credentials)",
                ctx.node.display()
            ));
            return s;
        };
        let mut channels = Vec::new();
        for addr in &ctx.servers {
            let (probe, ch) = status_of(addr, true, c, b, ctx.timeout).await;
            s.probes.push(probe);
            channels.extend(ch);
        }
        // The voters the configuration does not list still count for quorum.
        let voters: Vec<String> = s
            .probes
            .iter()
            .filter_map(|p| p.answer.as_ref().ok())
            .flat_map(|a| a.members.iter())
            .filter(|m| m.role == "voter" && !m.address.is_empty())
            .map(|m| m.address.clone())
            .collect();
        for v in voters {
            if s.probes.iter().any(|p| p.addr == v) {
                continue;
            }
            let (probe, ch) = status_of(&v, false, c, b, ctx.timeout).await;
            s.probes.push(probe);
            channels.extend(ch);
        }
        for ch in channels {
            let bundle = tokio::time::timeout(
                ctx.timeout,
                proto::zones_client::ZonesClient::new(ch.clone()).bundle(proto::Empty {}),
            )
            .await;
            if let Ok(Ok(r)) = bundle {
                s.bundle = TrustBundle::from_pem(
                    b.trust_domain().clone(),
                    r.get_ref().bundle_pem.as_bytes(),
                    "the servers' bundle",
                )
                .ok();
            }
            let list = tokio::time::timeout(
                ctx.timeout,
                proto::registry_client::RegistryClient::new(ch).list(ReadOptions {
                    linearizable: false,
                }),
            )
            .await;
            if let Ok(Ok(r)) = list {
                s.endpoints = Some(r.into_inner().endpoints);
                break;
            }
        }
        if s.bundle.is_none() {
            // No server would talk to us: perhaps the root was rotated while
            // this host was away. Ask for the bundle without verifying, only
            // to tell that apart in the credentials finding.
            for addr in &ctx.servers {
                let fetch = trellis_federation::join::danger_fetch_bundle_unverified(
                    addr,
                    b.trust_domain().clone(),
                );
                if let Ok(Ok(bundle)) = tokio::time::timeout(ctx.timeout, fetch).await {
                    s.bundle = Some(bundle);
                    s.bundle_unverified = true;
                    break;
                }
            }
        }
        s
    }

    fn answered(&self) -> impl Iterator<Item = (&ServerProbe, &proto::ClusterStatus)> {
        self.probes
            .iter()
            .filter_map(|p| p.answer.as_ref().ok().map(|a| (p, a)))
    }

    /// `servers`: each configured server answers over mTLS.
    pub(crate) fn servers_check(&self, creds: &Credentials) -> Check {
        if let Some(why) = &self.not_asked {
            return Check::skip("servers", why.clone());
        }
        let details: Vec<serde_json::Value> = self
            .probes
            .iter()
            .map(|p| {
                json!({
                    "address": p.addr,
                    "configured": p.configured,
                    "ok": p.answer.is_ok(),
                    "rtt_ms": p.answer.is_ok().then(|| ms(p.rtt)),
                    "error": p.answer.as_ref().err(),
                    "id": p.answer.as_ref().ok().map(|a| a.id),
                })
            })
            .collect();
        let configured: Vec<&ServerProbe> = self.probes.iter().filter(|p| p.configured).collect();
        let down: Vec<&ServerProbe> = configured
            .iter()
            .copied()
            .filter(|p| p.answer.is_err())
            .collect();
        if down.len() == configured.len() {
            let why = if creds.node_expired() {
                Some("not reachable with expired credentials (see credentials)")
            } else if creds.node_untrusted_by(self.bundle.as_ref()) {
                Some("not reachable with credentials the servers do not trust (see credentials)")
            } else {
                None
            };
            if let Some(why) = why {
                return Check::new("servers", Status::Skip, why, json!(details));
            }
        }
        let rtts: Vec<String> = configured
            .iter()
            .filter(|p| p.answer.is_ok())
            .map(|p| format!("{} {:.1} ms", p.addr, ms(p.rtt)))
            .collect();
        let (status, finding) = match (down.len(), configured.len()) {
            (0, _) => (
                Status::Ok,
                format!("{} reachable over mTLS: {}", rtts.len(), rtts.join(", ")),
            ),
            (d, n) if d == n => (
                Status::Fail,
                format!(
                    "no server answers ({}): is the network to the servers open (TCP), are they running? `trellis cluster status` from a server host",
                    down_reasons(&down)
                ),
            ),
            _ => (
                Status::Warn,
                format!(
                    "{} of {} servers do not answer ({}); the others do: {}",
                    down.len(),
                    configured.len(),
                    down_reasons(&down),
                    rtts.join(", ")
                ),
            ),
        };
        Check::new("servers", status, finding, json!(details))
    }

    /// `quorum`: a majority of voters answers, and a leader is known.
    pub(crate) fn quorum_check(&self) -> Check {
        if let Some(why) = &self.not_asked {
            return Check::skip("quorum", why.clone());
        }
        // The member list of the answer with the highest term is the most
        // recent view of the group.
        let Some((_, latest)) = self.answered().max_by_key(|(_, a)| a.term) else {
            return Check::skip("quorum", "no server answered (see servers)");
        };
        let voters: Vec<&proto::Member> = latest
            .members
            .iter()
            .filter(|m| m.role == "voter")
            .collect();
        let up: Vec<&proto::Member> = voters
            .iter()
            .copied()
            .filter(|m| {
                self.answered()
                    .any(|(p, a)| a.id == m.id || p.addr == m.address)
            })
            .collect();
        let needed = voters.len() / 2 + 1;
        let leaders: BTreeMap<u64, u64> = self
            .answered()
            .filter(|(_, a)| a.leader != 0)
            .map(|(_, a)| (a.leader, a.term))
            .collect();
        let name_of = |id: u64| {
            voters
                .iter()
                .find(|m| m.id == id)
                .map_or(format!("id {id}"), |m| format!("{} (id {id})", m.name))
        };
        let leader = leaders.keys().next().copied();
        let details = json!({
            "voters": voters.len(),
            "voters_up": up.len(),
            "needed": needed,
            "leader": leader,
            "term": latest.term,
            "down": voters.iter().filter(|m| !up.iter().any(|u| u.id == m.id)).map(|m| format!("{} {}", m.name, m.address)).collect::<Vec<_>>(),
        });
        if up.len() < needed {
            let down: Vec<String> = voters
                .iter()
                .filter(|m| !up.iter().any(|u| u.id == m.id))
                .map(|m| format!("{} at {}", m.name, m.address))
                .collect();
            return Check::new(
                "quorum",
                Status::Fail,
                format!(
                    "only {} of {} voters answer ({needed} needed; down: {}): the store cannot elect a leader or accept writes; proxies run on their last-known state. Start the servers that are down",
                    up.len(),
                    voters.len(),
                    down.join(", ")
                ),
                details,
            );
        }
        match leader {
            None => Check::new(
                "quorum",
                Status::Fail,
                format!(
                    "{} of {} voters answer but none knows a leader: an election is under way or failing; look at the servers' logs",
                    up.len(),
                    voters.len()
                ),
                details,
            ),
            Some(_) if leaders.len() > 1 => Check::new(
                "quorum",
                Status::Warn,
                format!(
                    "servers name different leaders ({}): a leadership change is under way",
                    leaders
                        .keys()
                        .map(|&i| name_of(i))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                details,
            ),
            Some(l) => Check::new(
                "quorum",
                Status::Ok,
                format!(
                    "{} of {} voters up ({needed} needed), leader {}, term {}",
                    up.len(),
                    voters.len(),
                    name_of(l),
                    latest.term
                ),
                details,
            ),
        }
    }

    /// `clock`: this host's clock against the servers', from the answer
    /// with the shortest round trip (the tightest bound).
    pub(crate) fn clock_check(&self) -> Check {
        if let Some(why) = &self.not_asked {
            return Check::skip("clock", why.clone());
        }
        let Some((p, skew)) = self
            .probes
            .iter()
            .filter_map(|p| p.skew_ms.map(|s| (p, s)))
            .min_by_key(|(p, _)| p.rtt)
        else {
            return Check::skip(
                "clock",
                "no server said its time (none answered, or they predate `now_unix_ms`)",
            );
        };
        let abs = Duration::from_millis(skew.unsigned_abs());
        let way = if skew > 0 { "behind" } else { "ahead of" };
        let details = json!({
            "server": p.addr,
            "skew_ms": skew,
            "rtt_ms": ms(p.rtt),
            "uncertainty_ms": ms(p.rtt) / 2.0,
        });
        let said = format!(
            "this host's clock is {:.3} s {way} server {} (±{:.1} ms)",
            abs.as_secs_f64(),
            p.addr,
            ms(p.rtt) / 2.0
        );
        if abs > SKEW_FAIL {
            Check::new(
                "clock",
                Status::Fail,
                format!(
                    "{said}: certificates will look expired or not yet valid (they are backdated only {}); fix time sync (`timedatectl status`, chrony or systemd-timesyncd)",
                    super::human(trellis_ca::BACKDATE)
                ),
                details,
            )
        } else if abs > SKEW_WARN {
            Check::new(
                "clock",
                Status::Warn,
                format!("{said}: check time sync (`timedatectl status`)"),
                details,
            )
        } else {
            Check::new("clock", Status::Ok, said, details)
        }
    }

    /// `gateways`: the zone's registered gateways, and each one's links to
    /// other zones as its admin endpoint reports them.
    pub(crate) async fn gateways_check(&self, ctx: &Ctx) -> Check {
        if let Some(edge) = &ctx.cfg.edge {
            return Check::new(
                "gateways",
                Status::Ok,
                format!(
                    "edge zone {}: no gateway of its own; the agent links to zone {}'s gateway at {} itself",
                    ctx.cfg.zone, edge.gateway_zone, edge.gateway
                ),
                json!({"edge_gateway": edge.gateway.to_string(), "edge_gateway_zone": edge.gateway_zone}),
            );
        }
        if let Some(why) = &self.not_asked {
            return Check::skip("gateways", why.clone());
        }
        let Some(eps) = &self.endpoints else {
            return Check::skip("gateways", "the registry could not be read (see servers)");
        };
        let gws: Vec<&proto::Endpoint> = eps
            .iter()
            .filter(|e| {
                e.key.as_ref().is_some_and(|k| {
                    k.namespace == SYSTEM_NAMESPACE
                        && k.service == GATEWAY_SERVICE
                        && k.zone == ctx.cfg.zone
                })
            })
            .collect();
        if gws.is_empty() {
            return Check::new(
                "gateways",
                Status::Fail,
                format!(
                    "zone {} has no registered gateway: other zones cannot be reached; is `trellis-gateway` running? (`systemctl status trellis-gateway`)",
                    ctx.cfg.zone
                ),
                json!([]),
            );
        }
        let mut worst = (Status::Ok, Vec::new());
        let mut details = Vec::new();
        let mut summary = Vec::new();
        for gw in gws {
            let name = gw.key.as_ref().map(|k| k.id.clone()).unwrap_or_default();
            let addr = format!(
                "{}:{}",
                gw.address,
                gw.ports.first().copied().unwrap_or_default()
            );
            let mut d = json!({"name": name, "address": addr, "healthy": gw.healthy});
            let admin = gw.labels.get(LABEL_ADMIN_ADDRESS);
            d["admin"] = json!(admin);
            let (status, line) = match admin {
                None => (
                    Status::Warn,
                    format!(
                        "{name} {addr}: registered, but names no admin address (an older gateway?), so its links cannot be seen"
                    ),
                ),
                Some(admin) => match links(admin, ctx.timeout).await {
                    Err(e) => (
                        Status::Warn,
                        format!(
                            "{name}: admin {admin} cannot be read from this host ({e}); its links are unknown"
                        ),
                    ),
                    Ok(v) => {
                        let r = assess_links(&name, &v);
                        d["links"] = v["links"].clone();
                        r
                    }
                },
            };
            if status > worst.0 {
                worst = (status, vec![line.clone()]);
            } else if status == worst.0 && status != Status::Ok {
                worst.1.push(line.clone());
            }
            summary.push(line);
            details.push(d);
        }
        let finding = if worst.0 == Status::Ok {
            summary.join("; ")
        } else {
            worst.1.join("; ")
        };
        Check::new("gateways", worst.0, finding, json!(details))
    }
}

/// Status, finding of one gateway's `/links`.
fn assess_links(name: &str, v: &serde_json::Value) -> (Status, String) {
    let links = v["links"].as_array().cloned().unwrap_or_default();
    if links.is_empty() {
        return (Status::Ok, format!("{name}: up, no peer zones to link to"));
    }
    let mut status = Status::Ok;
    let mut parts = Vec::new();
    for l in &links {
        let zone = l["zone"].as_str().unwrap_or("?");
        let rtt = l["rtt_ms"]
            .as_f64()
            .map_or(String::new(), |r| format!(" {r:.1} ms"));
        match l["transport"].as_str() {
            Some(_) if l["fallback"] == true => {
                status = status.max(Status::Fail);
                parts.push(format!(
                    "{name} -> {zone}: QUIC failed ({}), streams fall back to TCP{rtt}: is UDP {} blocked between the zones? Traffic still flows, slower to recover",
                    l["error"].as_str().unwrap_or("no answer"),
                    l["address"].as_str().unwrap_or("?"),
                ));
            }
            Some(t) => parts.push(format!("{name} -> {zone} {t}{rtt}")),
            None => {
                status = status.max(Status::Fail);
                parts.push(format!(
                    "{name} -> {zone}: down ({}): the zone is unreachable through this gateway",
                    l["error"].as_str().unwrap_or("unknown")
                ));
            }
        }
    }
    (status, parts.join(", "))
}

/// GET `/links` from a gateway's admin address.
async fn links(admin: &str, timeout: Duration) -> Result<serde_json::Value, String> {
    // The gateway dials idle links to answer, each bounded by its connect
    // timeout twice (QUIC, then TCP): wait for that, not just our timeout.
    let limit = timeout * 3;
    let body = tokio::time::timeout(limit, super::path::http_get(admin, "/links", "gateway"))
        .await
        .map_err(|_| format!("no answer within {limit:?}"))??;
    if body.status != 200 {
        return Err(format!("/links answered {}", body.status));
    }
    serde_json::from_str(&body.body).map_err(|e| format!("/links is not JSON: {e}"))
}

/// Calls Cluster.Status on `addr`, timing it.
async fn status_of(
    addr: &str,
    configured: bool,
    creds: &trellis_ca::Credentials,
    bundle: &TrustBundle,
    timeout: Duration,
) -> (ServerProbe, Option<Channel>) {
    let mut probe = ServerProbe {
        addr: addr.to_owned(),
        configured,
        rtt: Duration::ZERO,
        answer: Err(String::new()),
        skew_ms: None,
    };
    let ch = match client::connect_with(addr, creds.clone(), bundle.clone()) {
        Ok(ch) => ch,
        Err(e) => {
            probe.answer = Err(e.to_string());
            return (probe, None);
        }
    };
    let mut c = proto::cluster_client::ClusterClient::new(ch.clone());
    // The first call pays for TCP and TLS; the second is the round trip
    // the skew is measured on.
    let first = tokio::time::timeout(timeout, c.status(proto::Empty {})).await;
    match first {
        Err(_) => {
            probe.answer = Err(format!("no answer within {timeout:?}"));
            return (probe, None);
        }
        Ok(Err(s)) => {
            probe.answer = Err(status_words(&s));
            return (probe, None);
        }
        Ok(Ok(_)) => {}
    }
    let (t0, i0) = (SystemTime::now(), Instant::now());
    let second = tokio::time::timeout(timeout, c.status(proto::Empty {})).await;
    let (t1, rtt) = (SystemTime::now(), i0.elapsed());
    probe.rtt = rtt;
    match second {
        Ok(Ok(r)) => {
            let a = r.into_inner();
            if a.now_unix_ms != 0 {
                let mid = unix_ms(t0) / 2 + unix_ms(t1) / 2;
                probe.skew_ms = Some(a.now_unix_ms as i64 - mid as i64);
            }
            probe.answer = Ok(a);
            (probe, Some(ch))
        }
        Ok(Err(s)) => {
            probe.answer = Err(status_words(&s));
            (probe, None)
        }
        Err(_) => {
            probe.answer = Err(format!("no answer within {timeout:?}"));
            (probe, None)
        }
    }
}

/// A gRPC failure in words: tonic's transport errors hide the cause in
/// the message.
fn status_words(s: &tonic::Status) -> String {
    let mut msg = s.message().to_owned();
    let mut src = std::error::Error::source(s);
    while let Some(e) = src {
        msg.push_str(": ");
        msg.push_str(&e.to_string());
        src = e.source();
    }
    format!("{msg} ({:?})", s.code())
}

fn down_reasons(down: &[&ServerProbe]) -> String {
    down.iter()
        .map(|p| {
            format!(
                "{}: {}",
                p.addr,
                p.answer.as_ref().err().cloned().unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests;
