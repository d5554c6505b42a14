//! A mergeable latency sketch with bounded relative error (the DDSketch
//! scheme): values fall into logarithmic buckets whose bounds grow by a
//! factor `gamma = (1 + a) / (1 - a)`, so any quantile read back is within
//! `a` ([`RELATIVE_ACCURACY`], 2 %) of the true value at that rank. Two
//! sketches merge by adding their bucket counts, which is exactly the sketch
//! of the union of their values; that is what lets proxies send summaries
//! and servers add them up across proxies, time slots and zones.
//!
//! Buckets are held densely from the lowest to the highest index seen,
//! which for request latencies (a spread of 1000x is ~170 buckets) is both
//! small and allocation-free once the range is known. At most
//! [`MAX_BUCKETS`] are kept: past that, the lowest buckets are folded into
//! one, so low quantiles of a very wide distribution lose accuracy first,
//! never p50 or p99 of a realistic one (512 buckets span 1 us to 500 s).

use crate::proto;

/// The bound on the relative error of every quantile.
pub const RELATIVE_ACCURACY: f64 = 0.02;

/// Most buckets one sketch keeps (4 KiB of counts).
pub const MAX_BUCKETS: usize = 512;

/// The highest bucket index a latency in microseconds can have
/// (`u64::MAX` us is index 1109); indexes past it in a peer's sketch are
/// folded into it.
const MAX_INDEX: i64 = 1200;

const GAMMA: f64 = (1.0 + RELATIVE_ACCURACY) / (1.0 - RELATIVE_ACCURACY);

/// A latency distribution in microseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sketch {
    /// The index of `counts[0]`.
    offset: i32,
    counts: Vec<u64>,
    /// Values under 1 us.
    zero: u64,
    /// The sum of `counts`.
    bucketed: u64,
    total: u64,
}

// === impl Sketch ===

impl Sketch {
    /// Adds one value, in microseconds.
    pub fn insert(&mut self, micros: u64) {
        if micros == 0 {
            self.zero += 1;
        } else {
            self.add_at(index_of(micros as f64), 1);
        }
        self.total += 1;
    }

    /// Adds every value of `other`.
    pub fn merge(&mut self, other: &Sketch) {
        for (i, &c) in other.counts.iter().enumerate() {
            if c > 0 {
                self.add_at(other.offset + i as i32, c);
            }
        }
        self.zero = self.zero.saturating_add(other.zero);
        self.total = self.total.saturating_add(other.total);
    }

    /// How many values it holds.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// Whether it holds no value.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Forgets every value but keeps the memory, for the next interval.
    pub fn clear(&mut self) {
        self.counts.iter_mut().for_each(|c| *c = 0);
        self.zero = 0;
        self.bucketed = 0;
        self.total = 0;
    }

    /// The value at quantile `q` (0 to 1), in milliseconds: within
    /// [`RELATIVE_ACCURACY`] of the value of rank `floor(q * (n - 1))` in
    /// sorted order. 0 for an empty sketch.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = (q.clamp(0.0, 1.0) * (self.total - 1) as f64).floor() as u64;
        let mut seen = self.zero;
        if rank < seen {
            return 0.0;
        }
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if rank < seen {
                return value_of(self.offset + i as i32) / 1000.0;
            }
        }
        // Unreachable while `total` is the sum of the counts; the highest
        // bucket is the honest answer if a peer's sketch said otherwise.
        self.counts
            .len()
            .checked_sub(1)
            .map_or(0.0, |last| value_of(self.offset + last as i32) / 1000.0)
    }

    /// The wire form.
    pub fn to_proto(&self) -> proto::LatencySketch {
        // Trim empty buckets at both ends (left by `clear`).
        let first = self.counts.iter().position(|&c| c > 0);
        let last = self.counts.iter().rposition(|&c| c > 0);
        let (offset, counts) = match (first, last) {
            (Some(f), Some(l)) => (self.offset + f as i32, self.counts[f..=l].to_vec()),
            _ => (0, Vec::new()),
        };
        proto::LatencySketch {
            offset,
            counts,
            zero: self.zero,
        }
    }

    /// From the wire: bucket indexes out of range are folded into the
    /// nearest one that is not, and at most [`MAX_BUCKETS`] are kept, so
    /// a peer's message cannot make a sketch larger than one made here.
    pub fn from_proto(p: &proto::LatencySketch) -> Self {
        let mut s = Sketch {
            zero: p.zero,
            total: p.zero,
            ..Sketch::default()
        };
        for (i, &c) in p.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let idx = (i64::from(p.offset) + i as i64).clamp(0, MAX_INDEX) as i32;
            s.add_at(idx, c);
            s.total = s.total.saturating_add(c);
        }
        s
    }

    /// Adds `n` values to bucket `i`, growing the range (and folding the
    /// lowest buckets past [`MAX_BUCKETS`]).
    fn add_at(&mut self, i: i32, n: u64) {
        let was_empty = self.bucketed == 0;
        self.bucketed = self.bucketed.saturating_add(n);
        if was_empty {
            // Empty (or cleared): start the range here, keeping the memory.
            self.counts.clear();
            self.offset = i;
            self.counts.push(n);
            return;
        }
        let lo = self.offset;
        let hi = lo + self.counts.len() as i32 - 1;
        if i < lo {
            // Below the range: grow downwards, but never past MAX_BUCKETS
            // (a value too low for the range lands in the lowest bucket).
            let floor = (hi - MAX_BUCKETS as i32 + 1).max(i);
            if floor < lo {
                let grow = (lo - floor) as usize;
                self.counts.splice(0..0, std::iter::repeat_n(0, grow));
                self.offset = floor;
            }
            self.counts[0] = self.counts[0].saturating_add(n);
        } else if i > hi {
            let len = (i - lo + 1) as usize;
            if len > MAX_BUCKETS {
                // Fold the lowest buckets into the new lowest one.
                let new_lo = i - MAX_BUCKETS as i32 + 1;
                let cut = ((new_lo - lo) as usize).min(self.counts.len());
                let folded: u64 = self.counts.drain(..cut).sum();
                // What stays starts at `new_lo` or above; pad the gap.
                let start = lo + cut as i32;
                if start > new_lo {
                    let gap = (start - new_lo) as usize;
                    self.counts.splice(0..0, std::iter::repeat_n(0, gap));
                }
                self.offset = new_lo;
                if self.counts.is_empty() {
                    self.counts.push(0);
                }
                self.counts[0] = self.counts[0].saturating_add(folded);
            }
            let at = (i - self.offset) as usize;
            self.counts.resize(at + 1, 0);
            self.counts[at] = self.counts[at].saturating_add(n);
        } else {
            let at = (i - lo) as usize;
            self.counts[at] = self.counts[at].saturating_add(n);
        }
    }
}

/// The bucket of a value of at least 1: `ceil(log_gamma(v))`.
fn index_of(v: f64) -> i32 {
    (v.ln() / GAMMA.ln()).ceil() as i32
}

/// The value a bucket stands for: the point whose relative distance to
/// both of the bucket's bounds is the same, `a`.
fn value_of(i: i32) -> f64 {
    2.0 * GAMMA.powi(i) / (GAMMA + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift), so the tests need no
    /// crate and fail the same way every time.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    fn exact_ms(sorted: &[u64], q: f64) -> f64 {
        sorted[(q * (sorted.len() - 1) as f64).floor() as usize] as f64 / 1000.0
    }

    fn check(name: &str, values: &mut [u64]) {
        let mut s = Sketch::default();
        for &v in values.iter() {
            s.insert(v);
        }
        values.sort_unstable();
        assert_eq!(s.count(), values.len() as u64);
        for q in [0.0, 0.1, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0] {
            let (est, exact) = (s.quantile_ms(q), exact_ms(values, q));
            let err = (est - exact).abs() / exact;
            assert!(
                err <= RELATIVE_ACCURACY + 1e-9,
                "{name} q{q}: {est} ms for {exact} ms ({:.2} %)",
                err * 100.0
            );
        }
    }

    #[test]
    fn quantiles_stay_within_the_bound_on_known_distributions() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        // Uniform between 1 ms and 100 ms.
        let mut uniform: Vec<u64> = (0..20_000)
            .map(|_| 1_000 + (rng.next() * 99_000.0) as u64)
            .collect();
        check("uniform", &mut uniform);
        // Exponential with a 5 ms mean (a queue's service time).
        let mut exp: Vec<u64> = (0..20_000)
            .map(|_| 1 + (-(1.0 - rng.next()).ln() * 5_000.0) as u64)
            .collect();
        check("exponential", &mut exp);
        // Log-normal over four decades (a tail, as real latencies have).
        let mut lognormal: Vec<u64> = (0..20_000)
            .map(|_| {
                let (u1, u2) = (1.0 - rng.next(), rng.next());
                let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                (8.0 + 1.5 * z).exp().max(1.0) as u64
            })
            .collect();
        check("lognormal", &mut lognormal);
        // Two modes: a cache hit and a miss.
        let mut bimodal: Vec<u64> = (0..10_000)
            .map(|i| if i % 10 == 0 { 250_000 } else { 800 })
            .collect();
        check("bimodal", &mut bimodal);
    }

    #[test]
    fn merge_is_the_sketch_of_the_union() {
        let mut rng = Rng(42);
        let a: Vec<u64> = (0..5_000).map(|_| (rng.next() * 1e4) as u64).collect();
        let b: Vec<u64> = (0..3_000).map(|_| (rng.next() * 1e7) as u64).collect();
        let (mut sa, mut sb, mut union) = (Sketch::default(), Sketch::default(), Sketch::default());
        a.iter().for_each(|&v| sa.insert(v));
        b.iter().for_each(|&v| sb.insert(v));
        a.iter().chain(&b).for_each(|&v| union.insert(v));
        let mut ab = sa.clone();
        ab.merge(&sb);
        let mut ba = sb.clone();
        ba.merge(&sa);
        assert_eq!(ab.to_proto(), union.to_proto());
        assert_eq!(ba.to_proto(), union.to_proto());
        assert_eq!(ab.count(), 8_000);
        // Merging an empty sketch changes nothing, either way round.
        let mut e = Sketch::default();
        e.merge(&union);
        assert_eq!(e.to_proto(), union.to_proto());
    }

    #[test]
    fn the_wire_form_round_trips_and_cleared_sketches_start_over() {
        let mut s = Sketch::default();
        for v in [0, 1, 10, 1_000, 123_456] {
            s.insert(v);
        }
        let back = Sketch::from_proto(&s.to_proto());
        assert_eq!(back.to_proto(), s.to_proto());
        assert_eq!(back.count(), 5);
        assert_eq!(back.quantile_ms(0.0), 0.0);
        s.clear();
        assert!(s.is_empty());
        assert_eq!(s.to_proto(), proto::LatencySketch::default());
        s.insert(5_000);
        assert!((s.quantile_ms(0.5) - 5.0).abs() <= 5.0 * RELATIVE_ACCURACY);
    }

    #[test]
    fn a_sketch_never_holds_more_than_max_buckets() {
        let mut s = Sketch::default();
        // 1 us to ~10^19 us: far wider than 512 buckets can hold.
        let mut v = 1u64;
        while let Some(n) = v.checked_mul(3) {
            s.insert(v);
            v = n;
        }
        s.insert(u64::MAX);
        assert!(s.counts.len() <= MAX_BUCKETS, "{}", s.counts.len());
        // The top is exact to the bound; only the lowest values were folded.
        let top = u64::MAX as f64 / 1000.0;
        assert!((s.quantile_ms(1.0) - top).abs() / top <= RELATIVE_ACCURACY);
        // A hostile wire sketch is held to the same bounds.
        let wide = proto::LatencySketch {
            offset: i32::MIN,
            counts: vec![1; 5_000],
            zero: 0,
        };
        let s = Sketch::from_proto(&wide);
        assert!(s.counts.len() <= MAX_BUCKETS);
        assert_eq!(s.count(), 5_000);
    }
}
