//! What the caller's sidecar remembers between requests to apply traffic
//! policy: per target (an endpoint of this zone, or another zone reached
//! through the gateways) its load, latency and failures; per service its
//! retry budget, rate-limit buckets and connection limits.
//!
//! It outlives directory revisions (a new revision must not readmit an
//! ejected endpoint or refill a bucket) and forgets what has not been used
//! for [`FORGET_AFTER`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use trellis_federation::policy::traffic::{ConnectionPool, Outlier, RetryBudget};

/// State unused for this long is dropped.
pub(crate) const FORGET_AFTER: Duration = Duration::from_secs(600);

/// The retry budget's window.
const BUDGET_WINDOW: usize = 10;

/// The weight of a new latency sample in the moving average.
const EWMA_ALPHA: f64 = 0.3;

/// How fast a latency estimate fades when no samples come (a time
/// constant): an endpoint that was slow once is tried again in time
/// instead of being starved for good by a faster one.
const EWMA_DECAY_MS: f64 = 10_000.0;

/// All of it.
pub(crate) struct State {
    epoch: Instant,
    targets: Mutex<HashMap<String, Arc<Target>>>,
    services: Mutex<HashMap<String, Arc<Service>>>,
}

/// One target's load, latency and failures.
pub(crate) struct Target {
    inflight: AtomicU32,
    /// Moving average of the time to an answer, in µs.
    ewma_us: AtomicU64,
    /// Milliseconds since the epoch at the last use.
    used: AtomicU64,
    /// When it was made, and milliseconds since then at the last sample.
    born: Instant,
    sampled: AtomicU64,
    outlier: Mutex<OutlierState>,
}

#[derive(Default)]
struct OutlierState {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    /// Times ejected; one less for each interval without an ejection.
    ejections: u32,
    since: Option<Instant>,
}

/// What one attempt came to, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// An answer below 500.
    Ok,
    /// A 500 or 501, or any 5xx other than 502, 503, 504.
    ServerError,
    /// 502, 503, 504, a failed connection, a reset stream, a timed-out try.
    GatewayError,
}

/// A request in flight to a target, until dropped.
pub(crate) struct InFlight(Arc<Target>);

/// One service's budget, buckets and limits.
pub(crate) struct Service {
    used: AtomicU64,
    rr: AtomicUsize,
    budget: Mutex<Budget>,
    buckets: Mutex<HashMap<String, Bucket>>,
    gate: Mutex<Option<(u32, Arc<Semaphore>)>>,
    pending: AtomicU32,
    tcp: AtomicU32,
}

/// Requests and retries in each of the last seconds.
#[derive(Default)]
struct Budget {
    /// (second, requests, retries), oldest first.
    seconds: std::collections::VecDeque<(u64, u64, u64)>,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Why a request was not admitted under the connection-pool limits.
#[derive(Debug)]
pub(crate) struct Overflow(pub(crate) String);

/// An admitted request (or TCP connection) under the limits.
pub(crate) enum Admitted {
    Free,
    Permit(#[allow(dead_code)] OwnedSemaphorePermit),
}

/// An open TCP connection counted against `maxConnections`, until dropped.
pub(crate) struct TcpSlot(Arc<Service>);

impl State {
    pub(crate) fn new() -> Self {
        Self {
            epoch: Instant::now(),
            targets: Mutex::default(),
            services: Mutex::default(),
        }
    }

    /// Milliseconds since this state was made: the budget's clock.
    pub(crate) fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The state of target `key`.
    pub(crate) fn target(&self, key: &str) -> Arc<Target> {
        let now = self.now_ms();
        let mut m = self.targets.lock().unwrap_or_else(PoisonError::into_inner);
        let t = match m.get(key) {
            Some(t) => t.clone(),
            None => {
                let t = Arc::new(Target {
                    inflight: AtomicU32::new(0),
                    ewma_us: AtomicU64::new(0),
                    used: AtomicU64::new(now),
                    born: Instant::now(),
                    sampled: AtomicU64::new(0),
                    outlier: Mutex::default(),
                });
                m.insert(key.to_owned(), t.clone());
                t
            }
        };
        t.used.store(now, Ordering::Relaxed);
        t
    }

    /// The state of service `key`.
    pub(crate) fn service(&self, key: &str) -> Arc<Service> {
        let now = self.now_ms();
        let mut m = self.services.lock().unwrap_or_else(PoisonError::into_inner);
        let s = m
            .entry(key.to_owned())
            .or_insert_with(|| {
                Arc::new(Service {
                    used: AtomicU64::new(now),
                    rr: AtomicUsize::new(0),
                    budget: Mutex::default(),
                    buckets: Mutex::default(),
                    gate: Mutex::new(None),
                    pending: AtomicU32::new(0),
                    tcp: AtomicU32::new(0),
                })
            })
            .clone();
        s.used.store(now, Ordering::Relaxed);
        s
    }

    /// Drops what has not been used for [`FORGET_AFTER`] and is not in use
    /// (nor ejected: an ejection must run its time).
    pub(crate) fn forget_idle(&self) {
        let now = self.now_ms();
        let old = |used: &AtomicU64| {
            now.saturating_sub(used.load(Ordering::Relaxed))
                > u64::try_from(FORGET_AFTER.as_millis()).unwrap_or(u64::MAX)
        };
        let at = Instant::now();
        self.targets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, t| Arc::strong_count(t) > 1 || !old(&t.used) || t.ejected(at));
        self.services
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, s| Arc::strong_count(s) > 1 || !old(&s.used));
    }
}

// === impl Target ===

impl Target {
    /// Counts a request in flight until the guard drops.
    pub(crate) fn start(self: &Arc<Self>) -> InFlight {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// The P2C cost: latency, faded since the last sample, times load. A
    /// target without a sample costs nothing, so a new endpoint is tried at
    /// once.
    pub(crate) fn cost(&self) -> f64 {
        let load = f64::from(self.inflight.load(Ordering::Relaxed)) + 1.0;
        let since = self.born.elapsed().as_secs_f64() * 1000.0
            - self.sampled.load(Ordering::Relaxed) as f64;
        #[allow(clippy::cast_precision_loss)]
        let latency = self.ewma_us.load(Ordering::Relaxed) as f64;
        latency * (-since.max(0.0) / EWMA_DECAY_MS).exp() * load
    }

    /// Whether it is ejected at `now`.
    pub(crate) fn ejected(&self, now: Instant) -> bool {
        self.outlier
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .ejected_until
            .is_some_and(|t| t > now)
    }

    /// Records an attempt's latency and outcome. With outlier detection, a
    /// run of failures ejects the target when `may_eject` agrees (the
    /// service's share of ejected targets); returns whether it did.
    pub(crate) fn record(
        &self,
        outcome: Outcome,
        latency: Duration,
        outlier: Option<&Outlier>,
        may_eject: impl FnOnce() -> bool,
    ) -> bool {
        if outcome != Outcome::GatewayError {
            let sample = latency.as_secs_f64() * 1e6;
            let old = self.ewma_us.load(Ordering::Relaxed);
            // Precision loss is irrelevant at microsecond scale.
            #[allow(
                clippy::cast_precision_loss,
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss
            )]
            let next = if old == 0 {
                sample as u64
            } else {
                (EWMA_ALPHA * sample + (1.0 - EWMA_ALPHA) * old as f64) as u64
            };
            self.ewma_us.store(next.max(1), Ordering::Relaxed);
            let at = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.sampled.store(at, Ordering::Relaxed);
        }
        let Some(o) = outlier else { return false };
        let now = Instant::now();
        let tripped = {
            let mut s = self.outlier.lock().unwrap_or_else(PoisonError::into_inner);
            // Each interval without an ejection forgives one earlier ejection.
            if s.ejections > 0 && s.ejected_until.is_none_or(|t| t <= now) {
                let since = s.since.get_or_insert(now);
                let intervals =
                    now.duration_since(*since).as_secs_f64() / o.interval.0.as_secs_f64();
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let forgive = intervals as u32;
                if forgive > 0 {
                    s.ejections = s.ejections.saturating_sub(forgive);
                    s.since = Some(now);
                }
            }
            match outcome {
                Outcome::Ok => {
                    s.consecutive_5xx = 0;
                    s.consecutive_gateway = 0;
                    return false;
                }
                Outcome::ServerError => {
                    s.consecutive_5xx += 1;
                    s.consecutive_gateway = 0;
                }
                Outcome::GatewayError => {
                    s.consecutive_5xx += 1;
                    s.consecutive_gateway += 1;
                }
            }
            (s.consecutive_5xx >= o.consecutive_5xx
                || o.consecutive_gateway_errors
                    .is_some_and(|n| s.consecutive_gateway >= n))
                && s.ejected_until.is_none_or(|t| t <= now)
        };
        // Asked without the lock: the share counts this target too.
        if !tripped || !may_eject() {
            return false;
        }
        let mut s = self.outlier.lock().unwrap_or_else(PoisonError::into_inner);
        s.ejections += 1;
        s.ejected_until = Some(now + o.base_ejection_time.0 * s.ejections);
        s.since = Some(now);
        s.consecutive_5xx = 0;
        s.consecutive_gateway = 0;
        true
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

// === impl Service ===

impl Service {
    /// The next round-robin position.
    pub(crate) fn next_rr(&self) -> usize {
        self.rr.fetch_add(1, Ordering::Relaxed)
    }

    /// Counts an original request towards the retry budget.
    pub(crate) fn deposit(&self, now_ms: u64) {
        let mut b = self.budget.lock().unwrap_or_else(PoisonError::into_inner);
        b.at(now_ms / 1000).1 += 1;
    }

    /// Whether a retry fits the budget; if so it is counted.
    pub(crate) fn withdraw(&self, now_ms: u64, budget: &RetryBudget) -> bool {
        let mut b = self.budget.lock().unwrap_or_else(PoisonError::into_inner);
        b.at(now_ms / 1000);
        let (requests, retries) = b
            .seconds
            .iter()
            .fold((0, 0), |(a, r), s| (a + s.1, r + s.2));
        #[allow(clippy::cast_precision_loss)]
        let allowed = budget.percent.fraction() * requests as f64
            + f64::from(budget.min_per_second) * BUDGET_WINDOW as f64;
        #[allow(clippy::cast_precision_loss)]
        if (retries as f64) < allowed {
            b.at(now_ms / 1000).2 += 1;
            true
        } else {
            false
        }
    }

    /// Takes a token of bucket `key` (rate `rps`, size `burst`), or says how
    /// long until one is there.
    pub(crate) fn take(&self, key: &str, rps: f64, burst: f64) -> Result<(), Duration> {
        let now = Instant::now();
        let mut m = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let b = m.entry(key.to_owned()).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * rps).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / rps))
        }
    }

    /// Admits a request under `maxRequests` and `maxPendingRequests`: at
    /// once, after waiting as one of at most `maxPendingRequests`, or not.
    pub(crate) async fn admit(
        &self,
        limits: Option<&ConnectionPool>,
    ) -> Result<Admitted, Overflow> {
        let Some(max) = limits.and_then(|l| l.max_requests) else {
            return Ok(Admitted::Free);
        };
        let sem = {
            let mut g = self.gate.lock().unwrap_or_else(PoisonError::into_inner);
            match &*g {
                Some((n, s)) if *n == max => s.clone(),
                _ => {
                    // A changed limit takes a fresh gate; requests admitted
                    // by the old one finish under it.
                    let s = Arc::new(Semaphore::new(max as usize));
                    *g = Some((max, s.clone()));
                    s
                }
            }
        };
        if let Ok(p) = sem.clone().try_acquire_owned() {
            return Ok(Admitted::Permit(p));
        }
        let pending = limits.and_then(|l| l.max_pending_requests).unwrap_or(0);
        if self.pending.fetch_add(1, Ordering::AcqRel) >= pending {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(Overflow(format!(
                "{max} requests in flight and {pending} waiting (connectionPool)"
            )));
        }
        let p = sem.acquire_owned().await;
        self.pending.fetch_sub(1, Ordering::AcqRel);
        p.map(Admitted::Permit)
            .map_err(|_| Overflow("the limit was closed".into()))
    }

    /// Opens a TCP connection under `maxConnections`, or says why not.
    pub(crate) fn open_tcp(
        self: &Arc<Self>,
        limits: Option<&ConnectionPool>,
    ) -> Result<TcpSlot, Overflow> {
        let n = self.tcp.fetch_add(1, Ordering::AcqRel);
        let slot = TcpSlot(self.clone());
        match limits.and_then(|l| l.max_connections) {
            Some(max) if n >= max => Err(Overflow(format!(
                "{max} connections open (connectionPool.maxConnections)"
            ))),
            _ => Ok(slot),
        }
    }
}

impl Budget {
    /// The counts of `second`, dropping seconds past the window.
    fn at(&mut self, second: u64) -> &mut (u64, u64, u64) {
        while self
            .seconds
            .front()
            .is_some_and(|s| s.0 + BUDGET_WINDOW as u64 <= second)
        {
            self.seconds.pop_front();
        }
        if self.seconds.back().is_none_or(|s| s.0 != second) {
            self.seconds.push_back((second, 0, 0));
        }
        self.seconds.back_mut().unwrap_or_else(|| unreachable!())
    }
}

impl Drop for TcpSlot {
    fn drop(&mut self) {
        self.0.tcp.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use trellis_federation::policy::traffic::{Dur, Percent};

    use super::*;

    fn outlier(n: u32, base: Duration) -> Outlier {
        Outlier {
            consecutive_5xx: n,
            consecutive_gateway_errors: None,
            interval: Dur(Duration::from_secs(10)),
            base_ejection_time: Dur(base),
            max_ejection_percent: Percent(100.0),
        }
    }

    #[test]
    fn a_run_of_failures_ejects_for_longer_each_time() {
        let s = State::new();
        let t = s.target("a");
        let o = outlier(3, Duration::from_millis(40));
        let ms = Duration::from_millis(1);
        assert!(!t.record(Outcome::ServerError, ms, Some(&o), || true));
        assert!(
            !t.record(Outcome::Ok, ms, Some(&o), || true),
            "a success resets the run"
        );
        assert!(!t.record(Outcome::ServerError, ms, Some(&o), || true));
        assert!(!t.record(Outcome::GatewayError, ms, Some(&o), || true));
        assert!(t.record(Outcome::ServerError, ms, Some(&o), || true));
        assert!(t.ejected(Instant::now()));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.ejected(Instant::now()), "readmitted after the base time");
        for _ in 0..3 {
            t.record(Outcome::ServerError, ms, Some(&o), || true);
        }
        // The second ejection lasts twice as long.
        std::thread::sleep(Duration::from_millis(50));
        assert!(t.ejected(Instant::now()));
        // The share is asked without the target's lock held: it may look at
        // the target itself.
        let w = s.target("w");
        for _ in 0..3 {
            w.record(Outcome::ServerError, ms, Some(&o), || {
                !w.ejected(Instant::now())
            });
        }
        assert!(w.ejected(Instant::now()));
        // When the share of ejected targets is used up, it stays in.
        let u = s.target("b");
        for _ in 0..3 {
            assert!(!u.record(Outcome::ServerError, ms, Some(&o), || false));
        }
        assert!(!u.ejected(Instant::now()));
    }

    #[test]
    fn a_latency_estimate_fades_without_samples() {
        let s = State::new();
        let t = s.target("a");
        assert_eq!(t.cost(), 0.0, "a new target is tried at once");
        t.record(Outcome::Ok, Duration::from_millis(100), None, || false);
        let fresh = t.cost();
        assert!((90_000.0..=100_000.0).contains(&fresh), "{fresh}");
        // The same estimate, last sampled ten seconds ago.
        let faded = Target {
            inflight: AtomicU32::new(0),
            ewma_us: AtomicU64::new(100_000),
            used: AtomicU64::new(0),
            born: Instant::now() - Duration::from_secs(10),
            sampled: AtomicU64::new(0),
            outlier: Mutex::default(),
        }
        .cost();
        assert!(faded < fresh / 2.5, "{faded} vs {fresh}");
    }

    #[test]
    fn the_budget_lets_a_share_of_requests_be_retried() {
        let s = State::new();
        let svc = s.service("x");
        let b = RetryBudget {
            percent: Percent(20.0),
            min_per_second: 0,
        };
        for _ in 0..100 {
            svc.deposit(5_000);
        }
        let granted = (0..100).filter(|_| svc.withdraw(5_000, &b)).count();
        assert_eq!(granted, 20);
        // Ten seconds later the window has moved on.
        assert!(!svc.withdraw(14_999, &b));
        assert!(
            !svc.withdraw(15_000, &b),
            "no requests in the window, no retries"
        );
        svc.deposit(15_000);
        let b = RetryBudget {
            percent: Percent(0.0),
            min_per_second: 1,
        };
        assert_eq!((0..30).filter(|_| svc.withdraw(15_000, &b)).count(), 10);
    }

    #[test]
    fn a_bucket_gives_its_burst_then_its_rate() {
        let s = State::new();
        let svc = s.service("x");
        for _ in 0..5 {
            svc.take("k", 10.0, 5.0).unwrap();
        }
        let wait = svc.take("k", 10.0, 5.0).unwrap_err();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        std::thread::sleep(Duration::from_millis(120));
        svc.take("k", 10.0, 5.0).unwrap();
    }

    #[tokio::test]
    async fn the_pool_limits_shed_rather_than_queue_without_bound() {
        let s = State::new();
        let svc = s.service("x");
        let lim = ConnectionPool {
            max_requests: Some(1),
            max_pending_requests: Some(1),
            max_connections: Some(1),
        };
        let first = svc.admit(Some(&lim)).await.unwrap();
        let svc2 = svc.clone();
        let lim2 = lim.clone();
        let waiting = tokio::spawn(async move { svc2.admit(Some(&lim2)).await.is_ok() });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(svc.admit(Some(&lim)).await.is_err(), "one waits already");
        drop(first);
        assert!(waiting.await.unwrap());
        let a = svc.open_tcp(Some(&lim)).unwrap();
        assert!(svc.open_tcp(Some(&lim)).is_err());
        drop(a);
        assert!(svc.open_tcp(Some(&lim)).is_ok());
    }
}
