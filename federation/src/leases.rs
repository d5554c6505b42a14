//! Endpoint leases, held by the leader in memory.
//!
//! A renewal used to be a replicated, fsynced write: with 50,000 endpoints
//! renewed every few seconds, renewals alone were more writes than the
//! store can make, queued in front of the registrations and changes that
//! matter. Now a renewal (forwarded to the leader, like any write, and
//! checked there: the endpoint exists and the caller owns it) moves a
//! deadline in this table, and only the outcome is replicated: when a
//! deadline passes, the leader proposes the expiry of exactly those
//! endpoints (`Command::ExpireEndpoints`). A new leader starts every lease
//! afresh (the whole lease from its first tick as leader), the way etcd's
//! leases survive an election: a host that died just before the election
//! stays one lease longer, and no live host loses its registration because
//! its renewals went to the old leader.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// One leased endpoint.
#[derive(Debug, Clone, Copy)]
struct Lease {
    deadline: Instant,
    lease: Duration,
    /// Its expiry was proposed (and may be in the log).
    expiring: bool,
}

/// The leader's table: endpoint key (`namespace/service/zone/id`) → lease.
#[derive(Debug, Default)]
pub struct Table {
    leases: HashMap<String, Lease>,
}

impl Table {
    /// Starts or restarts `key`'s lease of `lease` at `now` (a registration,
    /// a renewal, a new leader taking over).
    pub fn touch(&mut self, key: &str, lease: Duration, now: Instant) {
        let l = Lease {
            deadline: now + lease,
            lease,
            expiring: false,
        };
        match self.leases.get_mut(key) {
            Some(have) => *have = l,
            None => {
                self.leases.insert(key.to_string(), l);
            }
        }
    }

    /// Forgets `key` (deregistered, expired, registered without a lease).
    pub fn remove(&mut self, key: &str) {
        self.leases.remove(key);
    }

    /// Forgets everything (this node stopped leading).
    pub fn clear(&mut self) {
        self.leases.clear();
    }

    /// How many leases.
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    /// Whether `key`'s expiry was proposed: a renewal now would say yes to
    /// an endpoint a log entry is about to remove. A lease whose deadline
    /// passed between two checks is still renewable.
    pub fn expiring(&self, key: &str) -> bool {
        self.leases.get(key).is_some_and(|l| l.expiring)
    }

    /// When `key`'s lease ends, if it has one.
    pub fn deadline(&self, key: &str) -> Option<Instant> {
        self.leases.get(key).map(|l| l.deadline)
    }

    /// Starts a whole lease at `now` for every endpoint of `zone`: the zone
    /// was cut off and is back, and its agents' renewals (each retrying
    /// through servers that did not answer during the cut) need the time
    /// of one lease to reach us again.
    pub fn restart_zone(&mut self, zone: &str, now: Instant) {
        for (key, l) in &mut self.leases {
            if key.split('/').nth(2) == Some(zone) {
                l.deadline = now + l.lease;
            }
        }
    }

    /// The keys whose lease ended by `now`. Endpoints of `spare_zones`
    /// (edge zones cut off from the core, whose agents cannot reach us)
    /// get a whole lease from now instead, so they have one to renew in
    /// after the heal. The keys returned stay in the table until their
    /// expiry applies (or a renewal moves them), so a lost proposal is
    /// made again at the next check.
    pub fn expired(&mut self, now: Instant, spare_zones: &[String]) -> Vec<String> {
        let mut out = Vec::new();
        for (key, l) in &mut self.leases {
            if l.deadline > now {
                continue;
            }
            let zone = key.split('/').nth(2).unwrap_or_default();
            if spare_zones.iter().any(|z| z == zone) {
                l.deadline = now + l.lease;
            } else {
                l.expiring = true;
                out.push(key.clone());
            }
        }
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_end_unless_renewed_and_cut_off_zones_are_spared() {
        let mut t = Table::default();
        let t0 = Instant::now();
        let lease = Duration::from_secs(10);
        t.touch("shop/catalog/west/h1", lease, t0);
        t.touch("shop/catalog/west/h2", lease, t0);
        t.touch("shop/catalog/edge/e1", lease, t0);
        assert!(t.expired(t0 + Duration::from_secs(9), &[]).is_empty());
        assert!(!t.expiring("shop/catalog/west/h2"));
        // h1 renewed at 5 s: it lives until 15 s.
        t.touch("shop/catalog/west/h1", lease, t0 + Duration::from_secs(5));
        let at = t0 + Duration::from_secs(11);
        let spare = vec!["edge".to_string()];
        assert_eq!(t.expired(at, &spare), ["shop/catalog/west/h2"]);
        assert!(t.expiring("shop/catalog/west/h2"));
        assert!(!t.expiring("shop/catalog/edge/e1"));
        // The spared edge endpoint got a whole lease from then.
        assert_eq!(t.deadline("shop/catalog/edge/e1"), Some(at + lease));
        // Still listed until its expiry applies and removes it.
        assert_eq!(t.expired(at, &spare), ["shop/catalog/west/h2"]);
        t.remove("shop/catalog/west/h2");
        assert_eq!(
            t.expired(t0 + Duration::from_secs(16), &[]),
            ["shop/catalog/west/h1"]
        );
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn a_zone_back_from_a_cut_gets_a_whole_lease() {
        let mut t = Table::default();
        let t0 = Instant::now();
        let lease = Duration::from_secs(10);
        t.touch("shop/shipping/edge/e1", lease, t0);
        t.touch("shop/catalog/west/h1", lease, t0);
        // The edge heals at 9.5 s, half a second before e1's lease ends.
        let heal = t0 + Duration::from_millis(9500);
        t.restart_zone("edge", heal);
        assert_eq!(t.deadline("shop/shipping/edge/e1"), Some(heal + lease));
        assert_eq!(t.deadline("shop/catalog/west/h1"), Some(t0 + lease));
        assert_eq!(
            t.expired(t0 + Duration::from_secs(11), &[]),
            ["shop/catalog/west/h1"]
        );
    }
}
