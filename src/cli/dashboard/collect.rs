//! What the dashboard shows, read from the store with the operator's
//! credentials: one [`Snapshot`] per page or refresh. Each section is read
//! on its own, so a call that fails (a member down, an admin port closed)
//! blanks its section with the reason and leaves the rest of the page.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use tonic::transport::Channel;
use trellis_federation::proto::{self, ReadOptions};

use super::graph::{Edge, Node};

/// How long one call to a server or a gateway's admin port may take: a
/// refresh comes every few seconds, so a slow member must not hold it.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// The namespace and service under which gateways register.
const SYSTEM_NAMESPACE: &str = trellis_federation::state::SYSTEM_NAMESPACE;
const GATEWAY_SERVICE: &str = trellis_federation::state::GATEWAY_SERVICE;
const LABEL_ZONE_ADDRESS: &str = trellis_federation::state::LABEL_ZONE_ADDRESS;

/// Where the dashboard reads from.
pub(crate) struct Source {
    /// The server named on the command line.
    pub(crate) channel: Channel,
    /// The operator's credentials, to reach every other member too.
    pub(crate) credentials: PathBuf,
    /// Local or linearizable reads, as the other verbs' `--linearizable`.
    pub(crate) read: ReadOptions,
    /// Gateways' admin addresses, by `zone/name`: the store does not hold
    /// them, so the operator (or `trellis dev`) names them.
    pub(crate) gateway_admins: BTreeMap<String, SocketAddr>,
    /// How many audit entries to show.
    pub(crate) audit_limit: u64,
    /// Channels to members, by address: tonic reconnects a channel by
    /// itself, so one per member serves every refresh.
    pub(crate) members: Mutex<HashMap<String, Channel>>,
}

/// One section's content, or why it could not be read.
#[derive(Debug, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Part<T> {
    /// Read.
    Ok(T),
    /// Not read: the reason.
    Error(String),
}

/// Everything on the page, as `/api/state` serves it.
#[derive(Debug, Serialize)]
pub(crate) struct Snapshot {
    /// Unix milliseconds when it was read.
    pub(crate) taken_ms: u64,
    pub(crate) cluster: Part<Cluster>,
    pub(crate) zones: Part<Vec<Zone>>,
    pub(crate) gateways: Part<Vec<Gateway>>,
    pub(crate) services: Part<Vec<Service>>,
    pub(crate) graph: Graph,
    pub(crate) proxies: Part<Proxies>,
    pub(crate) policies: Part<Vec<Policy>>,
    pub(crate) audit: Part<Vec<Audit>>,
}

/// The Raft group, with every member's own view.
#[derive(Debug, Serialize)]
pub(crate) struct Cluster {
    /// Raft id of the leader (0: none known).
    pub(crate) leader: u64,
    /// `zone/name` of the leader, when it is a member.
    pub(crate) leader_name: String,
    pub(crate) term: u64,
    /// The leader's commit index, or the answering member's when the leader
    /// did not answer: what lag is measured against.
    pub(crate) commit: u64,
    pub(crate) servers: Vec<Server>,
}

/// One member of the Raft group.
#[derive(Debug, Serialize)]
pub(crate) struct Server {
    pub(crate) id: u64,
    /// `zone/name`.
    pub(crate) name: String,
    pub(crate) zone: String,
    pub(crate) address: String,
    /// `voter` or `learner`.
    pub(crate) role: String,
    pub(crate) leader: bool,
    /// What the member itself says; `None` when it did not answer.
    pub(crate) applied: Option<u64>,
    pub(crate) commit: Option<u64>,
    pub(crate) term: Option<u64>,
    /// Entries the member has yet to apply: the cluster's commit minus its
    /// applied index.
    pub(crate) lag: Option<u64>,
    /// Why the member did not answer.
    pub(crate) error: Option<String>,
}

/// A zone and what serves it.
#[derive(Debug, Serialize)]
pub(crate) struct Zone {
    pub(crate) name: String,
    /// `core` or `edge`.
    pub(crate) role: String,
    /// Gateways' tunnel addresses, as the store lists them.
    pub(crate) gateways: Vec<String>,
}

/// A registered gateway and its links to other zones.
#[derive(Debug, Serialize)]
pub(crate) struct Gateway {
    pub(crate) zone: String,
    pub(crate) name: String,
    /// The tunnel address other gateways dial.
    pub(crate) address: String,
    /// The address its own zone's workloads dial, if it has one.
    pub(crate) zone_address: String,
    pub(crate) healthy: bool,
    /// The zones it keeps links to, from the store: every other zone with
    /// a gateway.
    pub(crate) peer_zones: Vec<String>,
    /// The admin port's `/links` answer, or why there is none.
    pub(crate) links: Part<serde_json::Value>,
}

/// A service and its endpoints.
#[derive(Debug, Serialize)]
pub(crate) struct Service {
    /// `name.namespace`.
    pub(crate) name: String,
    pub(crate) endpoints: Vec<Endpoint>,
}

/// One registered endpoint.
#[derive(Debug, Serialize)]
pub(crate) struct Endpoint {
    pub(crate) zone: String,
    pub(crate) id: String,
    pub(crate) address: String,
    pub(crate) ports: Vec<u32>,
    pub(crate) protocol: String,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) healthy: bool,
    /// Unix milliseconds when the lease runs out (0: no lease).
    pub(crate) lease_expires_ms: u64,
}

/// The service graph: nodes from the registry, edges from telemetry.
#[derive(Debug, Serialize)]
pub(crate) struct Graph {
    /// Zones in display order (the store's), one column each.
    pub(crate) zones: Vec<String>,
    pub(crate) nodes: Vec<Node>,
    pub(crate) edges: Vec<Edge>,
    /// Why the golden signals are missing or partial (a server that did
    /// not answer), if they are.
    pub(crate) note: Option<String>,
}

/// Every proxy's acknowledgement against the store revision.
#[derive(Debug, Serialize)]
pub(crate) struct Proxies {
    /// The store revision.
    pub(crate) revision: u64,
    pub(crate) proxies: Vec<Proxy>,
}

/// One proxy (agent or gateway).
#[derive(Debug, Serialize)]
pub(crate) struct Proxy {
    /// Its SPIFFE ID.
    pub(crate) id: String,
    /// `agent`, `gateway`, or what the ID says.
    pub(crate) kind: String,
    pub(crate) zone: String,
    pub(crate) name: String,
    /// The revision it last applied (or rejected).
    pub(crate) revision: u64,
    /// Store revision minus `revision`.
    pub(crate) drift: u64,
    /// Empty when applied whole; else the proxy's reasons.
    pub(crate) rejected: String,
}

/// One policy document.
#[derive(Debug, Serialize)]
pub(crate) struct Policy {
    pub(crate) kind: String,
    pub(crate) name: String,
    /// The spec, pretty-printed JSON.
    pub(crate) spec: String,
    /// Proxies that left this document out, with their reason.
    pub(crate) rejected_by: Vec<Rejection>,
}

/// A proxy's refusal of one document.
#[derive(Debug, Serialize)]
pub(crate) struct Rejection {
    pub(crate) proxy: String,
    pub(crate) reason: String,
}

/// One audit entry.
#[derive(Debug, Serialize)]
pub(crate) struct Audit {
    pub(crate) seq: u64,
    pub(crate) time_ms: u64,
    pub(crate) by: String,
    pub(crate) action: String,
    pub(crate) detail: String,
}

// === impl Source ===

impl Source {
    /// Reads every section at once.
    pub(crate) async fn snapshot(&self) -> Snapshot {
        let (cluster, zones, registry, proxies, policies, audit, signals) = tokio::join!(
            self.cluster(),
            self.zones(),
            self.registry(),
            self.proxies(),
            self.policies(),
            self.audit(),
            crate::cli::top::fetch(
                self.channel.clone(),
                crate::cli::top::View::Edges,
                None,
                SIGNALS_WINDOW
            ),
        );
        let gateways = match (&zones, &registry) {
            (Ok(z), Ok(r)) => Part::Ok(self.gateways(z, r).await),
            (Err(e), _) | (_, Err(e)) => Part::Error(format!("{e:#}")),
        };
        let mut graph = graph(zones.as_deref().unwrap_or_default(), registry.as_deref());
        match signals {
            Ok(t) => {
                graph.edges = t.rows.iter().map(edge).collect();
                if !t.missing.is_empty() {
                    graph.note = Some(format!("partial, without {}", t.missing.join("; ")));
                }
            }
            Err(e) => graph.note = Some(format!("unavailable: {}", e.message())),
        }
        let services = registry
            .as_deref()
            .map(services)
            .map_err(|e| anyhow!("{e:#}"));
        let policies = match (policies, &proxies) {
            (Ok(docs), Ok(p)) => Ok(with_rejections(docs, &p.proxies)),
            (Ok(docs), Err(_)) => Ok(docs),
            (Err(e), _) => Err(e),
        };
        Snapshot {
            taken_ms: now_ms(),
            cluster: cluster.into(),
            zones: zones.into(),
            gateways,
            services: services.into(),
            graph,
            proxies: proxies.into(),
            policies: policies.into(),
            audit: audit.into(),
        }
    }

    async fn cluster(&self) -> Result<Cluster> {
        let s = call(
            proto::cluster_client::ClusterClient::new(self.channel.clone()).status(proto::Empty {}),
        )
        .await?;
        // Each member answers for itself: its applied index is its lag.
        let views = futures_util::future::join_all(
            s.members.iter().map(|m| self.member_status(&m.address)),
        )
        .await;
        let leader_view = s
            .members
            .iter()
            .zip(&views)
            .find(|(m, _)| m.id == s.leader)
            .and_then(|(_, v)| v.as_ref().ok());
        let commit = leader_view.map_or(s.commit, |v| v.commit);
        let term = leader_view.map_or(s.term, |v| v.term);
        let servers = s
            .members
            .iter()
            .zip(views)
            .map(|(m, v)| {
                let zone = m.name.split_once('/').map_or("", |(z, _)| z).to_owned();
                let (applied, mcommit, mterm, error) = match v {
                    Ok(v) => (Some(v.applied), Some(v.commit), Some(v.term), None),
                    Err(e) => (None, None, None, Some(format!("{e:#}"))),
                };
                Server {
                    id: m.id,
                    name: m.name.clone(),
                    zone,
                    address: m.address.clone(),
                    role: m.role.clone(),
                    leader: m.id == s.leader,
                    applied,
                    commit: mcommit,
                    term: mterm,
                    lag: applied.map(|a| commit.saturating_sub(a)),
                    error,
                }
            })
            .collect();
        let leader_name = s
            .members
            .iter()
            .find(|m| m.id == s.leader)
            .map(|m| m.name.clone())
            .unwrap_or_default();
        Ok(Cluster {
            leader: s.leader,
            leader_name,
            term,
            commit,
            servers,
        })
    }

    /// `Cluster.Status` as one member sees it.
    async fn member_status(&self, address: &str) -> Result<proto::ClusterStatus> {
        let ch = {
            let mut m = self
                .members
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match m.get(address) {
                Some(c) => c.clone(),
                None => {
                    let c = trellis_federation::client::connect(address, &self.credentials)
                        .with_context(|| format!("connecting to {address}"))?;
                    m.insert(address.to_owned(), c.clone());
                    c
                }
            }
        };
        call(proto::cluster_client::ClusterClient::new(ch).status(proto::Empty {}))
            .await
            .with_context(|| address.to_owned())
    }

    async fn zones(&self) -> Result<Vec<Zone>> {
        let z = call(proto::zones_client::ZonesClient::new(self.channel.clone()).list(self.read))
            .await?;
        Ok(z.zones
            .into_iter()
            .map(|z| Zone {
                name: z.name,
                role: z.role,
                gateways: z.gateways,
            })
            .collect())
    }

    async fn registry(&self) -> Result<Vec<proto::Endpoint>> {
        let r =
            call(proto::registry_client::RegistryClient::new(self.channel.clone()).list(self.read))
                .await?;
        Ok(r.endpoints)
    }

    async fn gateways(&self, zones: &[Zone], eps: &[proto::Endpoint]) -> Vec<Gateway> {
        let with_gateway: Vec<&str> = zones
            .iter()
            .filter(|z| !z.gateways.is_empty())
            .map(|z| z.name.as_str())
            .collect();
        let regs: Vec<(proto::EndpointKey, &proto::Endpoint)> = eps
            .iter()
            .filter_map(|e| {
                let k = e.key.clone().unwrap_or_default();
                (k.namespace == SYSTEM_NAMESPACE && k.service == GATEWAY_SERVICE).then_some((k, e))
            })
            .collect();
        // The admin address a gateway registers (`trellis.admin-address`),
        // unless the command line names another (one reachable from here).
        let links = futures_util::future::join_all(regs.iter().map(|(k, e)| {
            let name = format!("{}/{}", k.zone, k.id);
            let registered = e
                .labels
                .get(trellis_federation::state::LABEL_ADMIN_ADDRESS)
                .and_then(|a| a.parse::<SocketAddr>().ok());
            let addr = self.gateway_admins.get(&name).copied().or(registered);
            self.links(addr)
        }))
        .await;
        regs.into_iter()
            .zip(links)
            .map(|((k, e), links)| Gateway {
                peer_zones: with_gateway
                    .iter()
                    .filter(|z| **z != k.zone)
                    .map(|z| (*z).to_owned())
                    .collect(),
                address: join_host_port(&e.address, e.ports.first().copied()),
                zone_address: e
                    .labels
                    .get(LABEL_ZONE_ADDRESS)
                    .cloned()
                    .unwrap_or_default(),
                healthy: e.healthy,
                zone: k.zone,
                name: k.id,
                links,
            })
            .collect()
    }

    /// `GET /links` on the gateway's admin port, when its address is known.
    async fn links(&self, addr: Option<SocketAddr>) -> Part<serde_json::Value> {
        let Some(addr) = addr else {
            return Part::Error(
                "link state unavailable: the gateway registered no admin address (--gateway-admin names one)"
                    .into(),
            );
        };
        match tokio::time::timeout(CALL_TIMEOUT, get_json(addr, "/links")).await {
            Ok(Ok(v)) => Part::Ok(v),
            Ok(Err(e)) => Part::Error(format!("link state unavailable: {e:#}")),
            Err(_) => Part::Error(format!(
                "link state unavailable: {addr} did not answer within {CALL_TIMEOUT:?}"
            )),
        }
    }

    async fn proxies(&self) -> Result<Proxies> {
        let p =
            call(proto::watch_client::WatchClient::new(self.channel.clone()).proxies(self.read))
                .await?;
        let proxies = p
            .proxies
            .into_iter()
            .map(|x| {
                let (kind, zone, name) = proxy_parts(&x.proxy);
                Proxy {
                    drift: p.revision.saturating_sub(x.revision),
                    kind,
                    zone,
                    name,
                    id: x.proxy,
                    revision: x.revision,
                    rejected: x.rejected,
                }
            })
            .collect();
        Ok(Proxies {
            revision: p.revision,
            proxies,
        })
    }

    async fn policies(&self) -> Result<Vec<Policy>> {
        let r = call(proto::policy_client::PolicyClient::new(self.channel.clone()).list(self.read))
            .await?;
        Ok(r.docs
            .into_iter()
            .map(|d| {
                let k = d.key.unwrap_or_default();
                let spec = serde_json::from_str::<serde_json::Value>(&d.spec_json)
                    .and_then(|v| serde_json::to_string_pretty(&v))
                    .unwrap_or(d.spec_json);
                Policy {
                    kind: k.kind,
                    name: k.name,
                    spec,
                    rejected_by: Vec::new(),
                }
            })
            .collect())
    }

    async fn audit(&self) -> Result<Vec<Audit>> {
        let r = call(
            proto::audit_client::AuditClient::new(self.channel.clone()).list(proto::AuditQuery {
                limit: self.audit_limit,
            }),
        )
        .await?;
        // The store lists oldest first; an operator looks for the latest.
        Ok(r.entries
            .into_iter()
            .rev()
            .map(|a| Audit {
                seq: a.seq,
                time_ms: a.time_ms,
                by: a.by,
                action: a.action,
                detail: a.detail,
            })
            .collect())
    }
}

impl<T> From<Result<T>> for Part<T> {
    fn from(r: Result<T>) -> Self {
        match r {
            Ok(v) => Part::Ok(v),
            Err(e) => Part::Error(format!("{e:#}")),
        }
    }
}

/// One unary call, bounded by [`CALL_TIMEOUT`].
async fn call<T>(
    f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(anyhow!("{} ({:?})", s.message(), s.code())),
        Err(_) => bail!("no answer within {CALL_TIMEOUT:?}"),
    }
}

/// Services (gateways aside) and their endpoints, by name.
fn services(eps: &[proto::Endpoint]) -> Vec<Service> {
    let mut by: BTreeMap<String, Vec<Endpoint>> = BTreeMap::new();
    for e in eps {
        let k = e.key.clone().unwrap_or_default();
        if k.namespace == SYSTEM_NAMESPACE {
            continue;
        }
        by.entry(format!("{}.{}", k.service, k.namespace))
            .or_default()
            .push(Endpoint {
                zone: k.zone,
                id: k.id,
                address: e.address.clone(),
                ports: e.ports.clone(),
                protocol: e.protocol.clone(),
                labels: e.labels.clone().into_iter().collect(),
                healthy: e.healthy,
                lease_expires_ms: e.lease_expires_ms,
            });
    }
    by.into_iter()
        .map(|(name, mut endpoints)| {
            endpoints.sort_by(|a, b| (&a.zone, &a.id).cmp(&(&b.zone, &b.id)));
            Service { name, endpoints }
        })
        .collect()
}

/// The graph as far as the store knows it: one node per service and zone.
/// Who calls whom, and how it goes, is telemetry the store does not hold,
/// so the edges are empty until the servers aggregate golden signals.
fn graph(zones: &[Zone], eps: Result<&[proto::Endpoint], &anyhow::Error>) -> Graph {
    let mut nodes: BTreeMap<(String, String), Node> = BTreeMap::new();
    for e in eps.unwrap_or_default() {
        let k = e.key.clone().unwrap_or_default();
        if k.namespace == SYSTEM_NAMESPACE {
            continue;
        }
        let service = format!("{}.{}", k.service, k.namespace);
        let n = nodes
            .entry((k.zone.clone(), service.clone()))
            .or_insert_with(|| Node {
                service,
                zone: k.zone,
                endpoints: 0,
                healthy: 0,
            });
        n.endpoints += 1;
        n.healthy += usize::from(e.healthy);
    }
    Graph {
        zones: zones.iter().map(|z| z.name.clone()).collect(),
        nodes: nodes.into_values().collect(),
        edges: Vec::new(),
        note: None,
    }
}

/// The window of requests the graph's golden signals cover.
const SIGNALS_WINDOW: std::time::Duration = std::time::Duration::from_secs(30);

/// A row of the servers' edges table as the graph draws it.
fn edge(r: &crate::cli::top::Signal) -> Edge {
    let or_unknown = |v: &Option<String>| v.clone().unwrap_or_else(|| "unknown".into());
    Edge {
        source: format!(
            "{}.{}",
            or_unknown(&r.source_workload),
            or_unknown(&r.source_namespace)
        ),
        source_zone: or_unknown(&r.source_zone),
        destination: format!("{}.{}", r.destination_service, r.destination_namespace),
        destination_zone: or_unknown(&r.destination_zone),
        route: r.route.clone().unwrap_or_else(|| "default".into()),
        rps: r.rps,
        success_rate: r.success_rate,
        p50_ms: r.p50_ms,
        p99_ms: r.p99_ms,
    }
}

/// Attaches each proxy's refusal to the document it names. A proxy's
/// `rejected` is `Kind/name: field: reason` entries joined by `; ` (see
/// `trellis_federation::view::Check`); a reason that names no document is a
/// refusal of the whole revision and shows on the proxy, not here.
fn with_rejections(mut docs: Vec<Policy>, proxies: &[Proxy]) -> Vec<Policy> {
    for p in proxies.iter().filter(|p| !p.rejected.is_empty()) {
        for entry in p.rejected.split("; ") {
            let Some((key, reason)) = entry.split_once(": ") else {
                continue;
            };
            if let Some(d) = docs
                .iter_mut()
                .find(|d| key.split_once('/') == Some((d.kind.as_str(), d.name.as_str())))
            {
                d.rejected_by.push(Rejection {
                    proxy: p.id.clone(),
                    reason: reason.to_owned(),
                });
            }
        }
    }
    docs
}

/// `(kind, zone, name)` of `spiffe://TD/zone/ZONE/KIND/NAME`.
fn proxy_parts(id: &str) -> (String, String, String) {
    let path = id
        .strip_prefix("spiffe://")
        .and_then(|r| r.split_once('/'))
        .map_or("", |(_, p)| p);
    let parts: Vec<&str> = path.split('/').collect();
    match parts.as_slice() {
        ["zone", zone, kind, name] => ((*kind).into(), (*zone).into(), (*name).into()),
        _ => ("unknown".into(), String::new(), id.into()),
    }
}

fn join_host_port(host: &str, port: Option<u32>) -> String {
    match port {
        Some(p) if host.contains(':') => format!("[{host}]:{p}"),
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The most of an admin answer the dashboard reads: link lists are small.
const MAX_ADMIN_BODY: usize = 256 * 1024;

/// A plain-HTTP GET of `path` on an admin port, parsed as JSON.
async fn get_json(addr: SocketAddr, path: &str) -> Result<serde_json::Value> {
    use http_body_util::{BodyExt, Empty, Limited};
    let sock = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let (mut tx, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(sock)).await?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<bytes::Bytes>::new())?;
    let resp = tx.send_request(req).await?;
    let status = resp.status();
    if !status.is_success() {
        bail!("{addr}{path} answered {status}");
    }
    let body = Limited::new(resp.into_body(), MAX_ADMIN_BODY)
        .collect()
        .await
        .map_err(|e| anyhow!("reading {addr}{path}: {e}"))?
        .to_bytes();
    serde_json::from_slice(&body).with_context(|| format!("{addr}{path} did not answer JSON"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(kind: &str, name: &str) -> Policy {
        Policy {
            kind: kind.into(),
            name: name.into(),
            spec: "{}".into(),
            rejected_by: Vec::new(),
        }
    }

    #[test]
    fn a_rejection_lands_on_the_document_it_names_only() {
        let proxies = vec![Proxy {
            id: "spiffe://td/zone/west/agent/a".into(),
            kind: "agent".into(),
            zone: "west".into(),
            name: "a".into(),
            revision: 9,
            drift: 0,
            rejected: "Route/catalog: spec.rules[0]: no such subset; whole revision refused".into(),
        }];
        let docs = with_rejections(
            vec![policy("Route", "catalog"), policy("Route", "auth")],
            &proxies,
        );
        assert_eq!(docs[0].rejected_by.len(), 1);
        assert_eq!(
            docs[0].rejected_by[0].reason,
            "spec.rules[0]: no such subset"
        );
        assert!(docs[1].rejected_by.is_empty());
    }

    #[test]
    fn proxy_ids_split_into_kind_zone_and_name() {
        assert_eq!(
            proxy_parts("spiffe://trellis.local/zone/east/gateway/gw1"),
            ("gateway".into(), "east".into(), "gw1".into())
        );
        assert_eq!(proxy_parts("odd").0, "unknown");
    }
}
