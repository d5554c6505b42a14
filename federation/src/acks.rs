//! Proxies' acknowledgements: soft state in the memory of the server each
//! proxy acknowledges to, never a Raft write.
//!
//! An acknowledgement says which revision a proxy applied (or why it
//! rejected it). It matters to operators (`trellis status`, the dashboard)
//! and is worthless after a restart: a live proxy says it again within
//! [`REFRESH`], and a dead one should drop out of the list. Written through
//! Raft, one change to N proxies cost N replicated, fsynced writes queued in
//! front of registrations; here it costs a map insert. `Watch.Proxies`
//! merges every server's table on demand, keeping each proxy's newest
//! report, since a proxy that moved to another server leaves its older one
//! behind until it expires.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::proto;

/// How often a proxy repeats its acknowledgement when nothing changed.
pub const REFRESH: Duration = Duration::from_secs(30);
/// An acknowledgement not repeated for this long is forgotten: the proxy
/// stopped, or acknowledges to another server now.
pub const EXPIRE_AFTER: Duration = Duration::from_secs(3 * 30 + 10);
/// Longest rejection reason kept per proxy (the rest is cut): with
/// [`MAX_PROXIES`], it bounds the table.
pub const KEEP_REJECTED: usize = 1024;
/// Most proxies one server remembers. Past it, new proxies are refused
/// (they retry, and a full table means expiry has not caught up or the
/// mesh outgrew the server), while known ones keep updating.
pub const MAX_PROXIES: usize = 200_000;

/// One proxy's latest acknowledgement.
#[derive(Debug, Clone)]
struct Entry {
    revision: u64,
    rejected: String,
    at: Instant,
    at_unix_ms: u64,
}

/// One server's table.
#[derive(Debug, Default)]
pub struct Table {
    entries: Mutex<HashMap<String, Entry>>,
}

/// Why an acknowledgement was not kept.
#[derive(Debug, thiserror::Error)]
#[error("this server already tracks {MAX_PROXIES} proxies; acknowledge to another")]
pub struct Full;

impl Table {
    /// Records `proxy`'s acknowledgement (the caller's verified identity).
    pub fn record(
        &self,
        proxy: &str,
        revision: u64,
        rejected: &str,
        now: Instant,
        now_unix_ms: u64,
    ) -> Result<(), Full> {
        let rejected = cut(rejected);
        let mut t = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = t.get_mut(proxy) {
            e.revision = revision;
            if e.rejected != rejected {
                e.rejected = rejected.to_string();
            }
            e.at = now;
            e.at_unix_ms = now_unix_ms;
            return Ok(());
        }
        if t.len() >= MAX_PROXIES {
            t.retain(|_, e| now.duration_since(e.at) < EXPIRE_AFTER);
            if t.len() >= MAX_PROXIES {
                return Err(Full);
            }
        }
        t.insert(
            proxy.to_string(),
            Entry {
                revision,
                rejected: rejected.to_string(),
                at: now,
                at_unix_ms: now_unix_ms,
            },
        );
        Ok(())
    }

    /// Every live acknowledgement, expired ones dropped, labelled with
    /// `server` (who holds it).
    pub fn list(&self, server: &str, now: Instant) -> Vec<proto::ProxyStatus> {
        let mut t = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        t.retain(|_, e| now.duration_since(e.at) < EXPIRE_AFTER);
        t.iter()
            .map(|(proxy, e)| proto::ProxyStatus {
                proxy: proxy.clone(),
                revision: e.revision,
                rejected: e.rejected.clone(),
                server: server.to_string(),
                seen_unix_ms: e.at_unix_ms,
            })
            .collect()
    }

    /// How many proxies are tracked (expired ones included until the next
    /// list or overflow).
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no proxy is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `s` cut to at most [`KEEP_REJECTED`] bytes, on a character boundary.
fn cut(s: &str) -> &str {
    if s.len() <= KEEP_REJECTED {
        return s;
    }
    let mut end = KEEP_REJECTED;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Merges several servers' lists: one row per proxy, the newest report
/// (then the highest revision) winning, sorted by proxy. Servers' clocks
/// decide "newest": with skew between them, a proxy that just moved may
/// show its older report until that one expires (at most [`EXPIRE_AFTER`]).
pub fn merge(lists: impl IntoIterator<Item = Vec<proto::ProxyStatus>>) -> Vec<proto::ProxyStatus> {
    let mut by: HashMap<String, proto::ProxyStatus> = HashMap::new();
    for p in lists.into_iter().flatten() {
        match by.get(&p.proxy) {
            Some(have) if (have.seen_unix_ms, have.revision) >= (p.seen_unix_ms, p.revision) => {}
            _ => {
                by.insert(p.proxy.clone(), p);
            }
        }
    }
    let mut out: Vec<_> = by.into_values().collect();
    out.sort_by(|a, b| a.proxy.cmp(&b.proxy));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_report_wins_and_old_ones_expire() {
        let a = Table::default();
        let b = Table::default();
        let t0 = Instant::now();
        a.record("p1", 5, "", t0, 1000).unwrap();
        a.record("p2", 7, "", t0, 1000).unwrap();
        // p1 moved to server b and acknowledged a later revision there.
        b.record("p1", 9, "", t0, 2000).unwrap();
        let merged = merge([a.list("a", t0), b.list("b", t0)]);
        assert_eq!(merged.len(), 2);
        assert_eq!((merged[0].proxy.as_str(), merged[0].revision), ("p1", 9));
        assert_eq!(merged[0].server, "b");
        assert_eq!(
            (merged[1].proxy.as_str(), merged[1].server.as_str()),
            ("p2", "a")
        );
        // Nothing repeated for longer than the expiry: gone.
        let later = t0 + EXPIRE_AFTER + Duration::from_secs(1);
        b.record("p1", 10, "bad doc", later, 3000).unwrap();
        let merged = merge([a.list("a", later), b.list("b", later)]);
        assert_eq!(merged.len(), 1);
        assert_eq!(merged[0].rejected, "bad doc");
        assert_eq!(a.len(), 0);
    }
}
