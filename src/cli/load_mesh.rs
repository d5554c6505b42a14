//! `trellis load mesh`: many proxies simulated from one process against
//! real servers, and what one change costs them.
//!
//! Each simulated proxy has an agent identity of its own (signed in memory
//! with the zone's CA from `--ca-dir`), its own mutual-TLS connection, and
//! runs the agents' own watch code (`view::follow_scoped`): a scoped watch
//! stream, the check, acknowledgements (on change, on reconnect and every
//! 30 s). Their endpoints (`--endpoints-per-proxy` each, spread over
//! `--namespaces`) are registered with a lease and renewed at a third of it,
//! as agents do. One difference from real agents, said plainly: the
//! registrations and renewals go through a pool of operator connections,
//! because agents may only register workloads their join token granted, and
//! ten thousand joins would take the servers' unauthenticated-call budget
//! (20 a second each) for minutes; the servers do the same write per
//! registration and per renewal either way.
//!
//! Then it makes `--changes` changes, each of a kind that concerns a known
//! set of proxies, and measures, for each, how long until every proxy it
//! concerns has applied it (the watch published it) and acknowledged it
//! (as the servers saw: `Watch.Proxies`, the operators' view); with
//! `--churn`, a sustained rate of endpoint changes and how far behind the
//! watches fall; and from `/proc`, the servers' CPU time and resident memory
//! per proxy and per endpoint (`--pid`, the servers on this machine).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::Args;
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use trellis_ca::tls::{CertSource, TrustStore};
use trellis_ca::{CaDir, IssueOptions, TrustDomain};
use trellis_federation::client::Servers;
use trellis_federation::proto;
use trellis_federation::proto::registry_client::RegistryClient;
use trellis_federation::scope::Scope;
use trellis_federation::view::{self, MeshState};

use crate::cli::ops::Output;
use crate::cli::parse_duration;

#[derive(Debug, Args)]
pub(crate) struct MeshLoadArgs {
    /// The servers (host:port), comma-separated; proxies spread over them.
    #[arg(long = "servers", required = true, value_delimiter = ',')]
    servers: Vec<String>,
    /// The CA directory (`trellis ca init`): the zone's CA there signs each
    /// proxy's identity, in memory.
    #[arg(long)]
    ca_dir: PathBuf,
    /// Operator credentials (PREFIX.crt/.key/.bundle): registrations,
    /// the measured changes, `Watch.Proxies`.
    #[arg(long, env = "TRELLIS_CREDENTIALS")]
    credentials: PathBuf,
    /// The proxies' zone (its CA must be in --ca-dir).
    #[arg(long, default_value = "east")]
    zone: String,
    /// Trust domain of the mesh.
    #[arg(long, default_value = "trellis.local")]
    trust_domain: String,
    /// Simulated proxies.
    #[arg(long, default_value_t = 500)]
    proxies: usize,
    /// Endpoints each proxy registers (one per service of its namespace).
    #[arg(long, default_value_t = 5)]
    endpoints_per_proxy: usize,
    /// Namespaces the proxies live in; each proxy watches its own.
    #[arg(long, default_value_t = 50)]
    namespaces: usize,
    /// Services of other namespaces each proxy also calls (and watches).
    #[arg(long, default_value_t = 2)]
    calls: usize,
    /// Lease of each endpoint; renewed every third of it.
    #[arg(long, value_parser = parse_duration, default_value = "120s")]
    lease: Duration,
    /// Registrations (and later renewals) in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Measured changes, in turn: a gateway (every proxy), a policy and
    /// an endpoint of one service (its namespace and its callers).
    #[arg(long, default_value_t = 6)]
    changes: usize,
    /// Then endpoint changes per second, sustained for --churn-for.
    #[arg(long, default_value_t = 0)]
    churn: u32,
    /// How long the churn lasts.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    churn_for: Duration,
    /// Then a reconnect storm: each server of --servers that runs on this
    /// machine (found among --pids by its listening port) is restarted in
    /// turn: SIGTERM, and once it has exited, started again with the same
    /// command line, directory, environment and log. The first restart
    /// moves its proxies to the other servers; each later one sends every
    /// proxy it holds to the rest at once. Measures, per restart, how long
    /// until every stream is back and how many snapshots the servers sent
    /// (proxies that were current resume from their revision and take
    /// none), then a change after the last. The restarted servers are left
    /// running, detached, and their new process ids printed.
    #[arg(long)]
    storm: bool,
    /// How long a proxy may take to apply a change before it counts as
    /// missed (and the run fails).
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    deadline: Duration,
    /// How long after the registrations, after every proxy has its
    /// snapshot, and after the proxies have left (2 s at least for the
    /// last two), before the servers' memory is read: what they hold once
    /// a burst's transient buffers are freed, not at its peak. Only with
    /// --pids. Shorter than a third of --lease.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    settle: Duration,
    /// Server process ids on this machine (CPU time and resident memory
    /// from /proc), comma-separated.
    #[arg(long = "pids", value_delimiter = ',')]
    pids: Vec<u32>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// One simulated proxy.
struct Proxy {
    namespace: usize,
    /// Namespaces' services it calls: (namespace, service index).
    calls: Vec<(usize, usize)>,
    state: watch::Receiver<Arc<MeshState>>,
    id: String,
}

/// CPU seconds and resident bytes of the servers, summed.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    cpu_s: f64,
    rss: u64,
}

fn usage(pids: &[u32]) -> Usage {
    let mut u = Usage::default();
    for pid in pids {
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // Fields after the command (which may hold spaces) in parens.
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let f: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15 of stat: 11 and 12 here.
            let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
                + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
            u.cpu_s += ticks as f64 / 100.0;
        }
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            u.rss += crate::heap::vm_rss(&status).unwrap_or(0);
        }
    }
    u
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Percentiles of a sample, in milliseconds.
fn pct(mut v: Vec<f64>) -> (f64, f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    (at(0.5), at(0.99), v[v.len() - 1])
}

fn ns(i: usize) -> String {
    format!("load-{i}")
}

fn svc(j: usize) -> String {
    format!("svc-{j}")
}

impl MeshLoadArgs {
    pub(crate) fn run(self) -> Result<()> {
        raise_fd_limit();
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?
            .block_on(self.run_async())
    }

    fn check_args(&self) -> Result<()> {
        if self.proxies == 0 || self.namespaces == 0 || self.endpoints_per_proxy == 0 {
            bail!("--proxies, --namespaces and --endpoints-per-proxy must be at least 1");
        }
        if self.namespaces > self.proxies {
            bail!(
                "--namespaces ({}) must not exceed --proxies ({})",
                self.namespaces,
                self.proxies
            );
        }
        if self.calls >= self.namespaces && self.calls > 0 {
            bail!(
                "--calls ({}) must be below --namespaces ({})",
                self.calls,
                self.namespaces
            );
        }
        let lease = self.lease.as_secs();
        if !(trellis_federation::api::MIN_LEASE_SECONDS
            ..=trellis_federation::api::MAX_LEASE_SECONDS)
            .contains(&lease)
        {
            bail!("--lease must be within the store's limits (3s..=300s)");
        }
        // Renewals start after the settle, so the first endpoints wait
        // registration time plus the settle for theirs; a third of the
        // lease leaves room for the registrations.
        if self.settle >= self.lease / 3 {
            bail!(
                "--settle ({:?}) must be shorter than a third of --lease ({:?})",
                self.settle,
                self.lease
            );
        }
        Ok(())
    }

    async fn run_async(self) -> Result<()> {
        self.check_args()?;
        let td: TrustDomain = self
            .trust_domain
            .parse()
            .map_err(|e| anyhow::anyhow!("--trust-domain: {e}"))?;
        let ca = CaDir::new(&self.ca_dir);
        let zone_ca = ca
            .zone(&self.zone)
            .with_context(|| format!("--ca-dir {}: zone {}", self.ca_dir.display(), self.zone))?;
        let bundle = ca.bundle().context("--ca-dir: the trust bundle")?;
        let (op_creds, op_bundle) = trellis_ca::load_credentials(&self.credentials)
            .with_context(|| format!("--credentials {}", self.credentials.display()))?;
        let stop = CancellationToken::new();
        let t_start = Instant::now();
        let base = usage(&self.pids);

        // Operators' connections: registrations, renewals, changes, reads.
        let op_certs = CertSource::new(op_creds).context("operator credentials")?;
        let op_trust = TrustStore::new(op_bundle);
        let pool: Vec<Servers> = (0..8)
            .map(|i| {
                Servers::new(
                    &rotate(&self.servers, i),
                    op_certs.clone(),
                    op_trust.clone(),
                )
            })
            .collect::<Result<_, _>>()?;

        // 1. Endpoints: E per proxy, one per service of its namespace.
        let n = self.proxies;
        let lease_s = self.lease.as_secs();
        let endpoints: Vec<proto::Endpoint> = (0..n)
            .flat_map(|p| (0..self.endpoints_per_proxy).map(move |j| (p, j)))
            .map(|(p, j)| self.endpoint(p, j, lease_s, "v1"))
            .collect();
        let t = Instant::now();
        let failed = AtomicU64::new(0);
        futures_util::stream::iter(endpoints.iter().enumerate())
            .for_each_concurrent(self.concurrency, |(i, e)| {
                let s = pool[i % pool.len()].clone();
                let e = e.clone();
                let failed = &failed;
                async move {
                    if register(&s, e).await.is_err() {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
            .await;
        let reg_time = t.elapsed();
        if failed.load(Ordering::Relaxed) > 0 {
            bail!(
                "{} of {} registrations failed",
                failed.load(Ordering::Relaxed),
                endpoints.len()
            );
        }
        let settle = |min: Duration| {
            let d = if self.pids.is_empty() {
                Duration::ZERO
            } else {
                self.settle.max(min)
            };
            tokio::time::sleep(d)
        };
        settle(Duration::ZERO).await;
        let after_reg = usage(&self.pids);
        let renewals = Arc::new(AtomicU64::new(0));
        let renewal_failures = Arc::new(AtomicU64::new(0));
        spawn_renewals(
            &pool,
            &endpoints,
            self.lease / 3,
            self.concurrency,
            renewals.clone(),
            renewal_failures.clone(),
            stop.clone(),
        );

        // 2. Proxies: identities, then watches.
        // The servers --storm will restart, found before anything is
        // measured, so a run that cannot storm fails early.
        let restartable = if self.storm {
            let found = find_servers(&self.servers, &self.pids)?;
            if found.is_empty() {
                bail!("--storm: none of --servers listens in a process of --pids on this machine");
            }
            found
        } else {
            Vec::new()
        };
        let proxy_addrs = self.servers.clone();
        let t = Instant::now();
        let mut proxies = Vec::with_capacity(n);
        for p in 0..n {
            let id = td
                .id(["zone", &self.zone, "agent", &format!("load-{p}")])
                .map_err(|e| anyhow::anyhow!("proxy identity: {e}"))?;
            let creds = zone_ca
                .issue(&id, IssueOptions::default())
                .context("signing a proxy identity")?;
            let servers = Servers::new(
                &rotate(&proxy_addrs, p),
                CertSource::new(creds).context("proxy credentials")?,
                TrustStore::new(bundle.clone()),
            )?;
            let namespace = p % self.namespaces;
            let calls: Vec<(usize, usize)> = (0..self.calls)
                .map(|c| {
                    (
                        (namespace + 1 + c) % self.namespaces,
                        c % self.endpoints_per_proxy,
                    )
                })
                .collect();
            let scope = Scope::new(
                [ns(namespace)],
                calls.iter().map(|(n, s)| format!("{}/{}", ns(*n), svc(*s))),
            )
            .and_then(|s| s.with_zone(&self.zone))
            .map_err(|e| anyhow::anyhow!("scope: {e}"))?;
            let check: view::Check = Arc::new(|_| Ok(Vec::new()));
            let state = view::follow_scoped(servers, scope, check, stop.clone());
            proxies.push(Proxy {
                namespace,
                calls,
                state,
                id: id.to_string(),
            });
        }
        let proxies = Arc::new(proxies);
        // Every proxy synced: its snapshot arrived.
        let synced = wait_all(&proxies, self.deadline.max(Duration::from_secs(60)), |s| {
            s.synced
        })
        .await;
        let sync_time = t.elapsed();
        if synced < n {
            bail!(
                "only {synced} of {n} proxies received their snapshot within {:?}",
                self.deadline.max(Duration::from_secs(60))
            );
        }
        // Let the first acknowledgements land before reading memory.
        settle(Duration::from_secs(2)).await;
        let after_watch = usage(&self.pids);
        let entries: Vec<usize> = proxies
            .iter()
            .map(|p| {
                let s = p.state.borrow();
                s.endpoints.len() + s.policies.len() + s.zones.len()
            })
            .collect();

        // 3. Measured changes.
        let mut rows = Vec::new();
        for c in 0..self.changes {
            let m = self.change(c, &pool[0], &proxies).await?;
            rows.push(m);
        }

        // 4. Churn.
        let churn = if self.churn > 0 {
            Some(self.churn(&pool, &proxies).await?)
        } else {
            None
        };

        // 5. The storm.
        let mut pids = self.pids.clone();
        let storm = if self.storm {
            Some(
                self.storm(
                    restartable,
                    &mut pids,
                    &op_certs,
                    &op_trust,
                    &pool[0],
                    &proxies,
                )
                .await?,
            )
        } else {
            None
        };
        let mut end = usage(&pids);
        if let Some(s) = &storm {
            // The CPU of the processes the storm replaced.
            end.cpu_s += s.restarts.iter().map(|r| r.cpu_before_s).sum::<f64>();
        }
        stop.cancel();
        // What the servers keep once every proxy has gone (the endpoints
        // stay until their leases end): memory freed by the streams that
        // the allocator did not give back shows here.
        settle(Duration::from_secs(2)).await;
        let left = usage(&pids);

        let report = Report {
            proxies: n,
            endpoints: endpoints.len(),
            namespaces: self.namespaces,
            registration_s: reg_time.as_secs_f64(),
            registrations_per_s: endpoints.len() as f64 / reg_time.as_secs_f64(),
            snapshot_all_s: sync_time.as_secs_f64(),
            entries_per_proxy: pct(entries.iter().map(|e| *e as f64).collect()),
            server_rss_base: base.rss,
            server_rss_per_endpoint: (after_reg.rss.saturating_sub(base.rss)) as f64
                / endpoints.len() as f64,
            server_rss_per_proxy: (after_watch.rss.saturating_sub(after_reg.rss)) as f64 / n as f64,
            server_rss_with_proxies: after_watch.rss,
            server_rss_proxies_left: left.rss,
            server_cpu_s: end.cpu_s - base.cpu_s,
            renewals: renewals.load(Ordering::Relaxed),
            renewal_failures: renewal_failures.load(Ordering::Relaxed),
            changes: rows,
            churn,
            storm,
            wall_s: t_start.elapsed().as_secs_f64(),
            pids: self.pids.len(),
        };
        report.print(self.output);
        let missed: usize = report.changes.iter().map(|c| c.missed).sum();
        if missed > 0 {
            bail!(
                "{missed} proxies did not apply a change within {:?}",
                self.deadline
            );
        }
        if report.churn.as_ref().is_some_and(|c| c.missed > 0) {
            bail!("the watches did not keep up with the churn");
        }
        if let Some(s) = &report.storm {
            if let Some(r) = s.restarts.iter().find(|r| !r.back) {
                bail!(
                    "after restarting {}, the streams did not all come back within {:?}",
                    r.server,
                    self.deadline
                );
            }
            if s.after.missed > 0 {
                bail!(
                    "after the storm, {} proxies missed a change",
                    s.after.missed
                );
            }
        }
        Ok(())
    }

    fn endpoint(&self, p: usize, j: usize, lease: u64, version: &str) -> proto::Endpoint {
        proto::Endpoint {
            key: Some(proto::EndpointKey {
                namespace: ns(p % self.namespaces),
                service: svc(j),
                zone: self.zone.clone(),
                id: format!("load-{p}"),
            }),
            address: format!("10.{}.{}.{}", (p >> 16) & 0xff, (p >> 8) & 0xff, p & 0xff),
            ports: vec![8080],
            protocol: "http".into(),
            healthy: true,
            lease_seconds: lease,
            labels: [("version".to_string(), version.to_string())].into(),
            ..Default::default()
        }
    }

    /// Change `c` (a gateway, a policy or an endpoint, in turn), and how
    /// long the proxies it concerns took to apply and acknowledge it.
    async fn change(&self, c: usize, op: &Servers, proxies: &[Proxy]) -> Result<Change> {
        let target_ns = c % self.namespaces;
        let (kind, concerned): (&str, Vec<usize>) = match c % 3 {
            0 => ("gateway", (0..proxies.len()).collect()),
            1 => ("policy", concerned(proxies, target_ns, 0)),
            _ => ("endpoint", concerned(proxies, target_ns, 0)),
        };
        let t0 = Instant::now();
        let t0_ms = now_unix_ms();
        let revision = match c % 3 {
            0 => {
                let e = proto::Endpoint {
                    key: Some(proto::EndpointKey {
                        namespace: trellis_federation::state::SYSTEM_NAMESPACE.into(),
                        service: trellis_federation::state::GATEWAY_SERVICE.into(),
                        zone: self.zone.clone(),
                        id: format!("load-gw-{c}"),
                    }),
                    address: "10.255.0.1".into(),
                    ports: vec![15443],
                    protocol: "tcp".into(),
                    healthy: true,
                    ..Default::default()
                };
                register(op, e).await?
            }
            1 => {
                let doc = proto::PolicyDoc {
                    key: Some(proto::PolicyKey {
                        kind: "Authorization".into(),
                        name: format!("load-{target_ns}-{c}"),
                    }),
                    spec_json: format!(
                        r#"{{"service": "{}.{}", "allow": ["ns:{}"]}}"#,
                        svc(0),
                        ns(target_ns),
                        ns(target_ns)
                    ),
                };
                op.call(|ch| {
                    let docs = proto::PolicyDocs {
                        docs: vec![doc.clone()],
                    };
                    async move {
                        proto::policy_client::PolicyClient::new(ch)
                            .apply(docs)
                            .await
                    }
                })
                .await
                .map_err(|s| anyhow::anyhow!("applying a policy: {}", s.message()))?
                .revision
            }
            _ => {
                // Re-register proxy `target_ns`'s svc-0 with a new label.
                let e = self.endpoint(target_ns, 0, self.lease.as_secs(), &format!("v{}", c + 2));
                register(op, e).await?
            }
        };
        let write = t0.elapsed();
        let applied = applied_times(proxies, &concerned, revision, t0, self.deadline).await;
        let missed = concerned.len() - applied.len();
        let acked = acked_times(op, proxies, &concerned, revision, t0_ms, self.deadline).await;
        Ok(Change {
            kind: kind.into(),
            concerned: concerned.len(),
            write_ms: write.as_secs_f64() * 1000.0,
            applied: pct(applied),
            acked_n: acked.len(),
            acked: pct(acked),
            missed,
        })
    }

    /// `--churn` endpoint changes a second for `--churn-for`: what the
    /// writes took, and, for every tenth, how long each proxy it concerns
    /// took to apply it while the others kept coming.
    async fn churn(&self, pool: &[Servers], proxies: &Arc<Vec<Proxy>>) -> Result<Churn> {
        let total = (self.churn as f64 * self.churn_for.as_secs_f64()) as usize;
        let every = Duration::from_secs_f64(1.0 / self.churn as f64);
        let t = Instant::now();
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut tasks = Vec::with_capacity(total);
        for i in 0..total {
            ticker.tick().await;
            let p = (i * 7919) % self.proxies;
            let j = i % self.endpoints_per_proxy;
            let e = self.endpoint(p, j, self.lease.as_secs(), &format!("c{i}"));
            let s = pool[i % pool.len()].clone();
            let measure = (i % 10 == 0).then(|| concerned(proxies, p % self.namespaces, j));
            let proxies = proxies.clone();
            let deadline = self.deadline;
            tasks.push(tokio::spawn(async move {
                let at = Instant::now();
                let r = register(&s, e).await.map_err(|e| e.to_string());
                let took = at.elapsed();
                let lags = match (r.as_ref().ok().copied(), measure) {
                    (Some(rev), Some(which)) => {
                        let got = applied_times(&proxies, &which, rev, at, deadline).await;
                        let missed = which.len() - got.len();
                        (got, missed)
                    }
                    _ => (Vec::new(), 0),
                };
                (r, took, lags)
            }));
        }
        let sent_for = t.elapsed();
        let mut writes = Vec::new();
        let mut lags = Vec::new();
        let (mut failed, mut missed) = (0, 0);
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        for task in tasks {
            let Ok((r, took, (l, m))) = task.await else {
                failed += 1;
                continue;
            };
            match r {
                Ok(_) => writes.push(took.as_secs_f64() * 1000.0),
                Err(why) => {
                    failed += 1;
                    *reasons.entry(why).or_default() += 1;
                }
            }
            lags.extend(l);
            missed += m;
        }
        Ok(Churn {
            target_per_s: self.churn,
            achieved_per_s: writes.len() as f64 / sent_for.as_secs_f64(),
            failed,
            reasons,
            write: pct(writes),
            applied: pct(lags),
            missed,
        })
    }
}

impl MeshLoadArgs {
    /// Restarts each server in `servers` in turn and watches the proxies
    /// come back; `pids` has each restarted server's new process id after.
    async fn storm(
        &self,
        servers: Vec<ServerProc>,
        pids: &mut [u32],
        certs: &Arc<CertSource>,
        trust: &Arc<TrustStore>,
        op: &Servers,
        proxies: &Arc<Vec<Proxy>>,
    ) -> Result<Storm> {
        // Streams are counted on every member, not only --servers: other
        // watchers of the cluster (trellis dev's own agents) list a
        // learner too, and may move there.
        let mut members: Vec<String> = cluster_status(op)
            .await?
            .members
            .into_iter()
            .map(|m| m.address)
            .collect();
        for a in &self.servers {
            if !members.contains(a) {
                members.push(a.clone());
            }
        }
        let each: Vec<Servers> = members
            .iter()
            .map(|s| Servers::new(std::slice::from_ref(s), certs.clone(), trust.clone()))
            .collect::<Result<_, _>>()?;
        let mut restarts = Vec::new();
        for server in servers {
            let at = members
                .iter()
                .position(|a| *a == server.addr)
                .context("a restarted server is a member")?;
            let before = servers_status(&each).await?;
            let streams_before: u64 = before.iter().map(|c| c.streams).sum();
            let cpu_before_s = usage(&[server.pid]).cpu_s;
            let t = Instant::now();
            let old = server.pid;
            let deadline = t + self.deadline;
            // The restarted server's count starts from zero; until it has
            // answered, nothing of it is known. Polled from SIGTERM on, each
            // server on its own, so the moved streams are seen coming back
            // on the others while it is still down.
            let mut now: Vec<StreamCount> = before
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    if i == at {
                        StreamCount {
                            streams: 0,
                            snapshots: 0,
                        }
                    } else {
                        *c
                    }
                })
                .collect();
            // When half, nine tenths and 99 % of the moved streams were
            // back: a steady climb is the servers' (or the proxies') CPU, a
            // long tail is waits (backoff, retransmitted SYNs).
            let moved = before[at].streams;
            let mut quantiles: Vec<(u64, Option<f64>)> =
                BACK_PER_MILLE.iter().map(|q| (*q, None)).collect();
            // Until the new process started, an answer from the restarted
            // server's address is the old process still stopping.
            let up = std::cell::Cell::new(false);
            // From SIGTERM until every server, in one round, held as many
            // streams as before; `None`: not within the deadline.
            let watch = async {
                while Instant::now() < deadline {
                    let at_s = t.elapsed().as_secs_f64();
                    let answers = each_status(&each, (!up.get()).then_some(at)).await;
                    let all_answered = answers.iter().all(Option::is_some);
                    for (n, a) in now.iter_mut().zip(answers) {
                        if let Some(a) = a {
                            *n = a;
                        }
                    }
                    let held: u64 = now.iter().map(|c| c.streams).sum();
                    let missing = streams_before.saturating_sub(held);
                    for (q, mark) in &mut quantiles {
                        if mark.is_none() && missing * 1000 <= moved * (1000 - *q) {
                            *mark = Some(at_s);
                        }
                    }
                    if all_answered && held >= streams_before {
                        return Ok(Some(t.elapsed().as_secs_f64()));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok::<_, anyhow::Error>(None)
            };
            let restart = async {
                let r = server.restart(self.deadline).await;
                up.set(r.is_ok());
                r
            };
            // A restart that fails ends the wait at once.
            let ((new, started), back_at) = tokio::try_join!(restart, watch)?;
            let down_s = (started - t).as_secs_f64();
            if let Some(p) = pids.iter_mut().find(|p| **p == old) {
                *p = new;
            }
            let back = back_at.is_some();
            let back_s = back_at.unwrap_or_else(|| t.elapsed().as_secs_f64());
            let snapshots = now
                .iter()
                .zip(&before)
                .enumerate()
                .map(|(i, (n, b))| {
                    if i == at {
                        n.snapshots
                    } else {
                        n.snapshots.saturating_sub(b.snapshots)
                    }
                })
                .sum();
            restarts.push(Restart {
                server: server.addr.clone(),
                pid: new,
                streams: (
                    before.iter().map(|c| c.streams).collect(),
                    now.iter().map(|c| c.streams).collect(),
                ),
                moved,
                down_s,
                back_s,
                back,
                back_quantiles_s: quantiles
                    .into_iter()
                    .map(|(q, at_s)| (q as f64 / 1000.0, at_s))
                    .collect(),
                snapshots,
                cpu_before_s,
            });
            if !back {
                break;
            }
            // The next restart starts from a cluster that takes writes.
            wait_for_leader(&each, self.deadline).await?;
        }
        // A change, to show every proxy is live again.
        let after = self.change(0, op, proxies).await?;
        Ok(Storm { restarts, after })
    }
}

/// What a server says of its watch streams.
#[derive(Debug, Clone, Copy)]
struct StreamCount {
    streams: u64,
    snapshots: u64,
}

impl StreamCount {
    fn of(st: &proto::ClusterStatus) -> Self {
        Self {
            streams: st.watch_streams + st.watch_streams_scoped,
            snapshots: st.watch_snapshots,
        }
    }
}

/// Each server's count, in the order of `each`, asked of all at once;
/// `None` for `skip` and for one that did not answer within a second.
async fn each_status(each: &[Servers], skip: Option<usize>) -> Vec<Option<StreamCount>> {
    futures_util::future::join_all(each.iter().enumerate().map(|(i, s)| async move {
        if skip == Some(i) {
            return None;
        }
        let st = tokio::time::timeout(Duration::from_secs(1), cluster_status(s))
            .await
            .ok()?
            .ok()?;
        Some(StreamCount::of(&st))
    }))
    .await
}

/// Each server's count, in the order of `each`; a server that does not
/// answer fails the whole read.
async fn servers_status(each: &[Servers]) -> Result<Vec<StreamCount>> {
    let mut out = Vec::with_capacity(each.len());
    for s in each {
        out.push(StreamCount::of(&cluster_status(s).await?));
    }
    Ok(out)
}

async fn cluster_status(s: &Servers) -> Result<proto::ClusterStatus> {
    s.call(|ch| async move {
        proto::cluster_client::ClusterClient::new(ch)
            .status(proto::Empty {})
            .await
    })
    .await
    .map_err(|e| anyhow::anyhow!("Cluster.Status: {}", e.message()))
}

/// Waits until every server answers and names the same leader.
async fn wait_for_leader(each: &[Servers], within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let mut leaders = Vec::new();
        for s in each {
            match cluster_status(s).await {
                Ok(st) if st.leader != 0 => leaders.push(st.leader),
                _ => break,
            }
        }
        if leaders.len() == each.len() && leaders.windows(2).all(|w| w[0] == w[1]) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the servers did not agree on a leader within {within:?} after a restart");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A server process on this machine, as the storm restarts it: how it
/// was started, read from /proc.
struct ServerProc {
    /// The --servers address it listens on.
    addr: String,
    pid: u32,
    argv: Vec<std::ffi::OsString>,
    cwd: PathBuf,
    env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
    /// Where its standard error went, when that was a file.
    log: Option<PathBuf>,
}

/// The processes of `pids` that listen on a port of `servers`, in the
/// order of `servers`. A listening socket is matched to its process by
/// inode (`/proc/net/tcp*` against `/proc/PID/fd`).
fn find_servers(servers: &[String], pids: &[u32]) -> Result<Vec<ServerProc>> {
    use std::os::unix::ffi::OsStrExt;
    let mut out = Vec::new();
    for addr in servers {
        let port = port_of(addr)?;
        let Some(pid) = pids.iter().copied().find(|pid| listens(*pid, port)) else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .with_context(|| format!("reading pid {pid}'s command line"))?;
        let argv = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| std::ffi::OsStr::from_bytes(a).to_os_string())
            .collect();
        let environ = std::fs::read(format!("/proc/{pid}/environ"))
            .with_context(|| format!("reading pid {pid}'s environment"))?;
        let env = environ
            .split(|b| *b == 0)
            .filter_map(|kv| {
                let i = kv.iter().position(|b| *b == b'=')?;
                Some((
                    std::ffi::OsStr::from_bytes(&kv[..i]).to_os_string(),
                    std::ffi::OsStr::from_bytes(&kv[i + 1..]).to_os_string(),
                ))
            })
            .collect();
        let env: Vec<(std::ffi::OsString, std::ffi::OsString)> = env;
        // A supervised server is its supervisor's to restart: started
        // again from here it would lose its unit's user, limits, sandbox
        // and watchdog. So is one of another user.
        // (NOTIFY_SOCKET: the server's own unit is Type=notify.)
        if env.iter().any(|(k, _)| k == "NOTIFY_SOCKET") {
            bail!(
                "--storm: the server on {addr} (pid {pid}) runs under systemd (it has NOTIFY_SOCKET); restart it with systemctl, not from here"
            );
        }
        let uid = std::fs::metadata(format!("/proc/{pid}"))
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
            .with_context(|| format!("reading pid {pid}'s owner"))?;
        if uid != nix::unistd::geteuid().as_raw() {
            bail!(
                "--storm: the server on {addr} (pid {pid}) runs as uid {uid}, not as this process; it would come back as the wrong user"
            );
        }
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"))
            .with_context(|| format!("reading pid {pid}'s directory"))?;
        let log = std::fs::read_link(format!("/proc/{pid}/fd/2"))
            .ok()
            .filter(|p| p.is_file());
        out.push(ServerProc {
            addr: addr.clone(),
            pid,
            argv,
            cwd,
            env,
            log,
        });
    }
    Ok(out)
}

/// Every listening TCP socket of this machine: (port, inode).
fn listening_sockets() -> Vec<(u16, u64)> {
    let mut listening = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is field 1 (HEXIP:HEXPORT), st field 3 (0A is
            // LISTEN), inode field 9.
            if f.len() < 10 || f[3] != "0A" {
                continue;
            }
            let port = f[1]
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if let (Some(port), Ok(inode)) = (port, f[9].parse::<u64>()) {
                listening.push((port, inode));
            }
        }
    }
    listening
}

fn port_of(addr: &str) -> Result<u16> {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .with_context(|| format!("--servers {addr}: no port"))
}

/// Whether process `pid` holds a socket listening on `port`.
fn listens(pid: u32, port: u16) -> bool {
    let inodes: Vec<String> = listening_sockets()
        .into_iter()
        .filter(|(p, _)| *p == port)
        .map(|(_, i)| format!("socket:[{i}]"))
        .collect();
    std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
        fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|l| inodes.iter().any(|i| l.as_os_str() == i.as_str()))
        })
    })
}
impl ServerProc {
    /// SIGTERM, then (once the process has exited; SIGKILL after `within`)
    /// the same command again; the new process id and when it started. It
    /// is not waited for: it outlives this one.
    async fn restart(&self, within: Duration) -> Result<(u32, Instant)> {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        // The id is minutes old: signal it only if it is still the server.
        if !listens(self.pid, port_of(&self.addr)?) {
            bail!(
                "--storm: pid {} no longer listens on {}; not signalling it",
                self.pid,
                self.addr
            );
        }
        let pid = Pid::from_raw(self.pid as i32);
        kill(pid, Signal::SIGTERM).with_context(|| format!("SIGTERM to {}", self.pid))?;
        let deadline = Instant::now() + within;
        // A process that exited but was not reaped yet (its parent is not
        // us) is a zombie: its sockets are closed already.
        let gone = |pid: u32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| {
                    s.rsplit_once(')')
                        .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
                })
                .unwrap_or(true)
        };
        while !gone(self.pid) {
            if Instant::now() > deadline {
                let _ = kill(pid, Signal::SIGKILL);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (out, err) = match &self.log {
            Some(p) => {
                let f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(p)
                    .with_context(|| format!("opening {}", p.display()))?;
                (
                    std::process::Stdio::from(f.try_clone()?),
                    std::process::Stdio::from(f),
                )
            }
            None => (std::process::Stdio::null(), std::process::Stdio::null()),
        };
        let (prog, args) = self
            .argv
            .split_first()
            .with_context(|| format!("pid {} had an empty command line", self.pid))?;
        let started = Instant::now();
        let mut child = std::process::Command::new(prog)
            .args(args)
            .current_dir(&self.cwd)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {} again", self.addr))?;
        // One that fails at start (its port still taken, its data refused)
        // says so here rather than as streams that never come back.
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "the server on {} exited ({status}) right after its restart; see {}",
                self.addr,
                self.log
                    .as_ref()
                    .map_or("its log".to_string(), |p| p.display().to_string())
            );
        }
        Ok((child.id(), started))
    }
}

/// The proxies an endpoint change of `svc-j` in namespace `ns` concerns:
/// those of that namespace and those that call it.
fn concerned(proxies: &[Proxy], ns: usize, j: usize) -> Vec<usize> {
    proxies
        .iter()
        .enumerate()
        .filter(|(_, p)| p.namespace == ns || p.calls.contains(&(ns, j)))
        .map(|(i, _)| i)
        .collect()
}

/// Registers `e`; the revision that holds it.
async fn register(s: &Servers, e: proto::Endpoint) -> Result<u64> {
    s.call(|ch| {
        let e = e.clone();
        async move { RegistryClient::new(ch).register(e).await }
    })
    .await
    .map(|r| r.revision)
    .map_err(|st| anyhow::anyhow!("registering: {}", st.message()))
}

/// Renews every endpoint's lease every `every`, spread evenly over the
/// interval, as a host's agents would.
fn spawn_renewals(
    pool: &[Servers],
    endpoints: &[proto::Endpoint],
    every: Duration,
    concurrency: usize,
    count: Arc<AtomicU64>,
    failures: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    // At most --concurrency renewals in flight: a slow store holds the
    // ticker back rather than piling up tasks.
    let slots = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let keys: Vec<proto::EndpointKey> = endpoints.iter().filter_map(|e| e.key.clone()).collect();
    let pool = pool.to_vec();
    tokio::spawn(async move {
        let n = keys.len().max(1);
        let gap = every / n as u32;
        let mut ticker = tokio::time::interval(gap.max(Duration::from_micros(50)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut i = 0usize;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let permit = tokio::select! {
                () = stop.cancelled() => return,
                p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            };
            let k = keys[i % n].clone();
            let s = pool[i % pool.len()].clone();
            let (count, failures) = (count.clone(), failures.clone());
            tokio::spawn(async move {
                let _permit = permit;
                // Retried until the next renewal is due, as an agent's
                // lease keeper does: a server restarting (the storm) or an
                // election is a pause, not a lost lease. A failure counts
                // when the whole interval went by without one succeeding.
                let t = Instant::now();
                let mut wait = Duration::from_millis(100);
                loop {
                    let r = s
                        .call(|ch| {
                            let k = k.clone();
                            async move { RegistryClient::new(ch).renew_lease(k).await }
                        })
                        .await;
                    if r.is_ok() {
                        count.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    if t.elapsed() + wait >= every {
                        failures.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
            });
            i += 1;
        }
    });
}

/// Waits until `ok` holds for every proxy's state, or `within`; how many.
async fn wait_all(proxies: &[Proxy], within: Duration, ok: fn(&MeshState) -> bool) -> usize {
    let tasks: Vec<_> = proxies
        .iter()
        .map(|p| {
            let mut rx = p.state.clone();
            tokio::spawn(async move {
                tokio::time::timeout(within, rx.wait_for(|s| ok(s)))
                    .await
                    .is_ok_and(|r| r.is_ok())
            })
        })
        .collect();
    let mut n = 0;
    for t in tasks {
        if t.await.unwrap_or(false) {
            n += 1;
        }
    }
    n
}

/// For each of `which`, how long after `t0` its state reached `revision`
/// (milliseconds); proxies that did not within `within` are left out.
async fn applied_times(
    proxies: &[Proxy],
    which: &[usize],
    revision: u64,
    t0: Instant,
    within: Duration,
) -> Vec<f64> {
    let tasks: Vec<_> = which
        .iter()
        .map(|i| {
            let mut rx = proxies[*i].state.clone();
            tokio::spawn(async move {
                tokio::time::timeout(within, rx.wait_for(|s| s.revision >= revision))
                    .await
                    .ok()
                    .and_then(|r| r.ok().map(|_| t0.elapsed().as_secs_f64() * 1000.0))
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        if let Ok(Some(ms)) = t.await {
            out.push(ms);
        }
    }
    out
}

/// For each of `which`, how long after `t0_ms` the servers heard it
/// acknowledge `revision` or later, from `Watch.Proxies` polled until all
/// have or `within` passes.
async fn acked_times(
    op: &Servers,
    proxies: &[Proxy],
    which: &[usize],
    revision: u64,
    t0_ms: u64,
    within: Duration,
) -> Vec<f64> {
    let wanted: BTreeMap<&str, ()> = which
        .iter()
        .map(|i| (proxies[*i].id.as_str(), ()))
        .collect();
    let deadline = Instant::now() + within;
    let mut seen: BTreeMap<String, f64> = BTreeMap::new();
    while Instant::now() < deadline && seen.len() < wanted.len() {
        let list = op
            .call(|ch| async move {
                proto::watch_client::WatchClient::new(ch)
                    .proxies(proto::ReadOptions::default())
                    .await
            })
            .await;
        if let Ok(list) = list {
            for p in list.proxies {
                if p.revision >= revision
                    && wanted.contains_key(p.proxy.as_str())
                    && !seen.contains_key(&p.proxy)
                {
                    seen.insert(p.proxy, p.seen_unix_ms.saturating_sub(t0_ms) as f64);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    seen.into_values().collect()
}

/// The address list starting at server `i % n`, so proxies spread over
/// the servers as agents configured nearest-first would in several zones.
fn rotate(servers: &[String], i: usize) -> Vec<String> {
    let n = servers.len();
    (0..n).map(|k| servers[(i + k) % n].clone()).collect()
}

/// Each proxy holds a connection: the default limit of 1024 descriptors
/// stops a run at about a thousand proxies.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

#[derive(Debug, serde::Serialize)]
struct Change {
    kind: String,
    concerned: usize,
    write_ms: f64,
    /// p50, p99, max (ms).
    applied: (f64, f64, f64),
    acked_n: usize,
    acked: (f64, f64, f64),
    missed: usize,
}

#[derive(Debug, serde::Serialize)]
struct Churn {
    target_per_s: u32,
    achieved_per_s: f64,
    failed: usize,
    /// Why writes failed, with how many failed so.
    reasons: BTreeMap<String, usize>,
    write: (f64, f64, f64),
    /// Per proxy and sampled change: write start to applied.
    applied: (f64, f64, f64),
    missed: usize,
}

#[derive(Debug, serde::Serialize)]
struct Storm {
    restarts: Vec<Restart>,
    /// A gateway change after the last restart.
    after: Change,
}

/// The shares of a restarted server's streams whose return a storm times,
/// in thousandths.
const BACK_PER_MILLE: [u64; 3] = [500, 900, 990];

/// One server restarted.
#[derive(Debug, serde::Serialize)]
struct Restart {
    server: String,
    /// Its new process id.
    pid: u32,
    /// Each member's watch streams (in the cluster's order) before the
    /// restart, and at the end of the wait.
    streams: (Vec<u64>, Vec<u64>),
    /// Watch streams it held when it was stopped.
    moved: u64,
    /// From SIGTERM until it was started again.
    down_s: f64,
    /// From SIGTERM until the servers held as many streams as before.
    back_s: f64,
    back: bool,
    /// For each of [`BACK_PER_MILLE`] (as a share), from SIGTERM until that share of
    /// the moved streams was back (none: not within the wait).
    back_quantiles_s: Vec<(f64, Option<f64>)>,
    /// Snapshots the servers sent meanwhile.
    snapshots: u64,
    /// CPU the stopped process had used.
    cpu_before_s: f64,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    proxies: usize,
    endpoints: usize,
    namespaces: usize,
    registration_s: f64,
    registrations_per_s: f64,
    snapshot_all_s: f64,
    entries_per_proxy: (f64, f64, f64),
    server_rss_base: u64,
    server_rss_per_endpoint: f64,
    server_rss_per_proxy: f64,
    server_rss_with_proxies: u64,
    server_rss_proxies_left: u64,
    server_cpu_s: f64,
    renewals: u64,
    renewal_failures: u64,
    changes: Vec<Change>,
    churn: Option<Churn>,
    storm: Option<Storm>,
    wall_s: f64,
    pids: usize,
}

impl Report {
    fn print(&self, output: Output) {
        if output == Output::Json {
            outln!("{}", serde_json::to_string(self).unwrap_or_default());
            return;
        }
        outln!(
            "{} proxies, {} endpoints in {} namespaces; registered in {:.1} s ({:.0}/s); every proxy synced in {:.1} s",
            self.proxies,
            self.endpoints,
            self.namespaces,
            self.registration_s,
            self.registrations_per_s,
            self.snapshot_all_s
        );
        outln!(
            "entries per proxy (endpoints+policies+zones): p50 {:.0}  max {:.0}",
            self.entries_per_proxy.0,
            self.entries_per_proxy.2
        );
        if self.pids > 0 {
            outln!(
                "servers ({}): resident {:.1} MiB at start; +{:.0} B per endpoint, +{:.0} B per proxy; {:.1} CPU s in all",
                self.pids,
                self.server_rss_base as f64 / 1048576.0,
                self.server_rss_per_endpoint,
                self.server_rss_per_proxy,
                self.server_cpu_s
            );
            outln!(
                "servers ({}): resident {:.1} MiB with every proxy, {:.1} MiB once they had left",
                self.pids,
                self.server_rss_with_proxies as f64 / 1048576.0,
                self.server_rss_proxies_left as f64 / 1048576.0
            );
        }
        outln!(
            "lease renewals: {} ({} failed)",
            self.renewals,
            self.renewal_failures
        );
        let f = |v: f64| {
            if v.is_nan() {
                "-".to_string()
            } else {
                format!("{v:.0}")
            }
        };
        let mut rows = vec![vec![
            "CHANGE".to_string(),
            "PROXIES".into(),
            "WRITE ms".into(),
            "APPLIED p50/p99/max ms".into(),
            "ACKED p50/p99/max ms".into(),
            "MISSED".into(),
        ]];
        for c in &self.changes {
            rows.push(vec![
                c.kind.clone(),
                c.concerned.to_string(),
                format!("{:.0}", c.write_ms),
                format!("{}/{}/{}", f(c.applied.0), f(c.applied.1), f(c.applied.2)),
                format!(
                    "{}/{}/{} ({})",
                    f(c.acked.0),
                    f(c.acked.1),
                    f(c.acked.2),
                    c.acked_n
                ),
                c.missed.to_string(),
            ]);
        }
        crate::cli::ops::table(rows);
        if let Some(c) = &self.churn {
            outln!(
                "churn: {} changes/s asked, {:.0}/s written ({} failed); write p50/p99 {}/{} ms; applied by the proxies each concerns p50/p99/max {}/{}/{} ms ({} missed)",
                c.target_per_s,
                c.achieved_per_s,
                c.failed,
                f(c.write.0),
                f(c.write.1),
                f(c.applied.0),
                f(c.applied.1),
                f(c.applied.2),
                c.missed
            );
            for (why, n) in &c.reasons {
                outln!("  {n} failed: {why}");
            }
        }
        if let Some(s) = &self.storm {
            for r in &s.restarts {
                outln!(
                    "storm: {} restarted (now pid {}): down {:.2} s; its {} streams moved, {} back at {} s and every stream back {} {:.2} s after SIGTERM; {} snapshots sent; streams per server {:?} before, {:?} after",
                    r.server,
                    r.pid,
                    r.down_s,
                    r.moved,
                    r.back_quantiles_s
                        .iter()
                        .map(|(q, _)| format!("{:.0} %", q * 100.0))
                        .collect::<Vec<_>>()
                        .join(" / "),
                    r.back_quantiles_s
                        .iter()
                        .map(|(_, s)| s.map_or("-".to_string(), |s| format!("{s:.2}")))
                        .collect::<Vec<_>>()
                        .join(" / "),
                    if r.back { "in" } else { "NOT within" },
                    r.back_s,
                    r.snapshots,
                    r.streams.0,
                    r.streams.1
                );
            }
            outln!(
                "storm: a gateway change after the last restart applied p50/p99/max {}/{}/{} ms, acknowledged p99 {} ms",
                f(s.after.applied.0),
                f(s.after.applied.1),
                f(s.after.applied.2),
                f(s.after.acked.1)
            );
        }
        outln!("wall time {:.1} s", self.wall_s);
    }
}
