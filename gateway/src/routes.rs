//! Where accepted streams go: the zone's exported services and their
//! endpoints, and the choice of one endpoint per stream.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use trellis_federation::view::OrdMap;

use crate::config::ServiceConfig;
use crate::tunnel::{Reply, ReplyCode};

/// The services this gateway routes to, keyed by (namespace, name).
///
/// A persistent map: a revision that changes a few services copies the
/// routes in O(1) and replaces those, and every other service keeps its
/// endpoints and their in-flight counts.
#[derive(Debug, Default, Clone)]
pub struct Routes {
    pub(crate) services: OrdMap<(String, String), Arc<Service>>,
}

/// One service's route as a revision leaves it: its configuration and
/// subset members, or `None` when it no longer has one.
pub type Change = (
    (String, String),
    Option<(ServiceConfig, HashMap<String, Vec<SocketAddr>>)>,
);

#[derive(Debug)]
pub(crate) struct Service {
    export_to: Vec<String>,
    /// A plain service's ports (see [`ServiceConfig::plain_ports`]); empty
    /// for a service with sidecars.
    plain: Vec<u16>,
    pub(crate) endpoints: Vec<Arc<Endpoint>>,
    /// Endpoints by `Backend` subset, sharing the counters above.
    subsets: HashMap<String, Vec<Arc<Endpoint>>>,
}

/// Subset members by service (namespace, name), then subset name.
pub type Subsets = HashMap<(String, String), HashMap<String, Vec<SocketAddr>>>;

/// One endpoint (a sidecar's inbound address) and its in-flight streams.
#[derive(Debug)]
pub struct Endpoint {
    /// Where to connect.
    pub addr: SocketAddr,
    outstanding: AtomicUsize,
}

/// Counts a stream against its endpoint until dropped.
#[derive(Debug)]
pub struct EndpointGuard(Arc<Endpoint>);

impl Routes {
    /// Routes for the configured services.
    pub fn from_config(services: &[ServiceConfig]) -> Self {
        Self::with_subsets(services, &Subsets::new())
    }

    /// Routes for `services`, with the endpoints of each subset (the
    /// store's `Backend` documents applied to endpoint labels).
    pub fn with_subsets(services: &[ServiceConfig], subsets: &Subsets) -> Self {
        Self::default().replaced(services, subsets)
    }

    /// [`Routes::with_subsets`], where an endpoint these routes have keeps
    /// its count of streams in flight.
    pub fn replaced(&self, services: &[ServiceConfig], subsets: &Subsets) -> Self {
        let services = services
            .iter()
            .map(|s| {
                let key = (s.namespace.clone(), s.name.clone());
                let old = self.services.get(&key).map(|s| &**s);
                let svc = Service::new(s, subsets.get(&key), old);
                (key, Arc::new(svc))
            })
            .collect();
        Self { services }
    }

    /// These routes with `changes` applied. An endpoint that stays keeps
    /// its count of streams in flight, which balancing reads.
    pub fn updated(&self, changes: Vec<Change>) -> Self {
        let mut services = self.services.clone();
        for (key, change) in changes {
            match change {
                None => {
                    services.remove(&key);
                }
                Some((cfg, subsets)) => {
                    let old = services.get(&key).cloned();
                    let svc = Service::new(&cfg, Some(&subsets), old.as_deref());
                    services.insert(key, Arc::new(svc));
                }
            }
        }
        Self { services }
    }

    /// Each service's zones, endpoints and subset members, to compare.
    #[cfg(test)]
    #[allow(clippy::type_complexity)]
    pub(crate) fn summary(
        &self,
    ) -> Vec<(
        (String, String),
        Vec<String>,
        Vec<SocketAddr>,
        std::collections::BTreeMap<String, Vec<SocketAddr>>,
    )> {
        let addrs = |v: &[Arc<Endpoint>]| v.iter().map(|e| e.addr).collect::<Vec<_>>();
        self.services
            .iter()
            .map(|(k, s)| {
                let subsets = s
                    .subsets
                    .iter()
                    .map(|(n, m)| (n.clone(), addrs(m)))
                    .collect();
                (k.clone(), s.export_to.clone(), addrs(&s.endpoints), subsets)
            })
            .collect()
    }

    /// How many services there are.
    pub fn len(&self) -> usize {
        self.services.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// Up to `n` distinct endpoints for a stream from `source_zone`, best
    /// first, or the refusal to send back: of two endpoints at random, the
    /// one with fewer streams in flight first.
    pub fn pick(
        &self,
        namespace: &str,
        service: &str,
        subset: Option<&str>,
        source_zone: &str,
        n: usize,
    ) -> Result<Vec<Arc<Endpoint>>, Reply> {
        self.service(namespace, service)?
            .pick(namespace, service, subset, source_zone, n)
    }

    /// Where a stream of `header` goes, from one lookup: up to `n`
    /// addresses, best first, each with its endpoint (a sidecar's inbound
    /// address, or for a plain service the app's address at the port the
    /// stream names, which must be one of the service's), and whether this
    /// gateway terminates for it.
    pub fn targets(&self, header: &crate::tunnel::Header, n: usize) -> Result<Targets, Reply> {
        let (namespace, service) = (&header.namespace, &header.service);
        let svc = self.service(namespace, service)?;
        let picked = svc.pick(
            namespace,
            service,
            header.subset.as_deref(),
            &header.source_zone,
            n,
        )?;
        if svc.plain.is_empty() {
            return Ok(Targets {
                plain: false,
                endpoints: picked.into_iter().map(|e| (e.addr, e)).collect(),
            });
        }
        if !svc.plain.contains(&header.port) {
            return Err(Reply::refused(
                ReplyCode::UnknownService,
                format!("port {} is not one of {service}.{namespace}'s", header.port),
            ));
        }
        Ok(Targets {
            plain: true,
            endpoints: picked
                .into_iter()
                .map(|e| (SocketAddr::new(e.addr.ip(), header.port), e))
                .collect(),
        })
    }

    fn service(&self, namespace: &str, service: &str) -> Result<&Service, Reply> {
        self.services
            .get(&(namespace.to_owned(), service.to_owned()))
            .map(|s| &**s)
            .ok_or_else(|| {
                Reply::refused(
                    ReplyCode::UnknownService,
                    format!("no service {service}.{namespace} in this zone"),
                )
            })
    }
}

/// An address to connect to, with the endpoint it counts against.
pub type Target = (SocketAddr, Arc<Endpoint>);

/// Where one stream goes (see [`Routes::targets`]).
#[derive(Debug)]
pub struct Targets {
    /// This gateway terminates for the service (it has no sidecar here).
    pub plain: bool,
    /// Addresses to connect to, best first, with their endpoints.
    pub endpoints: Vec<Target>,
}

/// Connects to an endpoint of `header`'s service for a stream from
/// `header.source_zone`: the chosen one, or the next if it cannot be reached.
/// The guard counts the stream against the endpoint while it lives.
pub async fn connect(
    routes: &Routes,
    header: &crate::tunnel::Header,
    timeout: Duration,
) -> Result<(TcpStream, EndpointGuard), Reply> {
    connect_to(routes.targets(header, 2)?.endpoints, timeout).await
}

/// Connects to the first of `targets` that answers within `timeout`.
pub async fn connect_to(
    targets: Vec<Target>,
    timeout: Duration,
) -> Result<(TcpStream, EndpointGuard), Reply> {
    let mut last_err = String::from("no endpoint");
    for (addr, ep) in targets {
        let guard = ep.track();
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(up)) => {
                let _ = up.set_nodelay(true);
                return Ok((up, guard));
            }
            Ok(Err(e)) => last_err = format!("{addr}: {e}"),
            Err(_) => last_err = format!("{addr}: connect timed out"),
        }
    }
    Err(Reply::refused(
        ReplyCode::UpstreamFailed,
        format!("endpoint unreachable ({last_err})"),
    ))
}

impl Service {
    /// Up to `n` distinct endpoints for a stream from `source_zone`, best
    /// first, or the refusal to send back (`namespace` and `service` name it
    /// in refusals).
    ///
    /// The first is chosen by the power of two choices on outstanding
    /// streams: two endpoints at random, the less loaded wins. That keeps
    /// load even without a global view and avoids the herd that "least
    /// loaded of all" causes when many gateways see the same counts.
    fn pick(
        &self,
        namespace: &str,
        service: &str,
        subset: Option<&str>,
        source_zone: &str,
        n: usize,
    ) -> Result<Vec<Arc<Endpoint>>, Reply> {
        if !trellis_federation::policy::Exports::admits(&self.export_to, source_zone) {
            return Err(Reply::refused(
                ReplyCode::NotExported,
                format!("{service}.{namespace} is not exported to zone {source_zone}"),
            ));
        }
        let eps = match subset {
            None => &self.endpoints,
            Some(name) => match self.subsets.get(name) {
                Some(members) if !members.is_empty() => members,
                _ => {
                    return Err(Reply::refused(
                        ReplyCode::NoHealthyEndpoint,
                        format!(
                            "{service}.{namespace} has no healthy endpoint of subset {name} in this zone"
                        ),
                    ));
                }
            },
        };
        if eps.is_empty() {
            return Err(Reply::refused(
                ReplyCode::NoHealthyEndpoint,
                format!("{service}.{namespace} has no healthy endpoint in this zone"),
            ));
        }
        let first = if eps.len() == 1 {
            0
        } else {
            let a = fastrand::usize(..eps.len());
            let mut b = fastrand::usize(..eps.len() - 1);
            if b >= a {
                b += 1;
            }
            if eps[b].outstanding.load(Ordering::Relaxed)
                < eps[a].outstanding.load(Ordering::Relaxed)
            {
                b
            } else {
                a
            }
        };
        // Fallbacks, for when the first cannot be reached: the others in order.
        let mut out = Vec::with_capacity(n.min(eps.len()));
        out.push(eps[first].clone());
        out.extend(
            (1..eps.len())
                .map(|k| eps[(first + k) % eps.len()].clone())
                .take(n.saturating_sub(1)),
        );
        Ok(out)
    }

    /// The route of `s`, with `subsets`' members; endpoints `old` had keep
    /// their counters.
    fn new(
        s: &ServiceConfig,
        subsets: Option<&HashMap<String, Vec<SocketAddr>>>,
        old: Option<&Service>,
    ) -> Self {
        // By address: a service may have thousands of endpoints.
        let kept: HashMap<SocketAddr, &Arc<Endpoint>> = old
            .map(|o| o.endpoints.iter().map(|e| (e.addr, e)).collect())
            .unwrap_or_default();
        let endpoints: Vec<Arc<Endpoint>> = s
            .endpoints
            .iter()
            .map(|a| {
                kept.get(a).map(|e| Arc::clone(e)).unwrap_or_else(|| {
                    Arc::new(Endpoint {
                        addr: *a,
                        outstanding: AtomicUsize::new(0),
                    })
                })
            })
            .collect();
        let subsets = subsets
            .into_iter()
            .flatten()
            .map(|(name, addrs)| {
                let members = endpoints
                    .iter()
                    .filter(|e| addrs.contains(&e.addr))
                    .cloned()
                    .collect();
                (name.clone(), members)
            })
            .collect();
        Service {
            export_to: s.export_to.clone(),
            plain: s.plain_ports.clone(),
            endpoints,
            subsets,
        }
    }
}

impl Endpoint {
    /// Marks a stream in flight until the guard drops.
    pub fn track(self: &Arc<Self>) -> EndpointGuard {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        EndpointGuard(self.clone())
    }

    /// Streams in flight.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }
}

impl Drop for EndpointGuard {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes() -> Routes {
        Routes::from_config(&[
            ServiceConfig {
                name: "catalog".into(),
                namespace: "shop".into(),
                export_to: vec!["east".into()],
                endpoints: vec![
                    "127.0.0.1:1".parse().unwrap(),
                    "127.0.0.1:2".parse().unwrap(),
                ],
                plain_ports: Vec::new(),
            },
            ServiceConfig {
                name: "empty".into(),
                namespace: "shop".into(),
                export_to: vec!["*".into()],
                endpoints: vec![],
                plain_ports: Vec::new(),
            },
        ])
    }

    #[test]
    fn refusals_carry_their_reason_code() {
        let r = routes();
        let code =
            |ns: &str, svc: &str, zone: &str| r.pick(ns, svc, None, zone, 1).unwrap_err().code;
        assert_eq!(code("shop", "nope", "east"), ReplyCode::UnknownService);
        assert_eq!(code("shop", "catalog", "edge"), ReplyCode::NotExported);
        assert_eq!(code("shop", "empty", "edge"), ReplyCode::NoHealthyEndpoint);
        assert_eq!(r.pick("shop", "catalog", None, "east", 5).unwrap().len(), 2);
    }

    #[test]
    fn two_choices_avoid_the_busier_endpoint() {
        let r = routes();
        let busy = r.pick("shop", "catalog", None, "east", 2).unwrap();
        let (a, b) = (busy[0].clone(), busy[1].clone());
        let _held: Vec<_> = (0..5).map(|_| a.track()).collect();
        for _ in 0..50 {
            assert_eq!(
                r.pick("shop", "catalog", None, "east", 1).unwrap()[0].addr,
                b.addr
            );
        }
        drop(_held);
        assert_eq!(a.outstanding(), 0);
    }
}
