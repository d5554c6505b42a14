//! Handing freed heap back to the kernel.
//!
//! glibc's malloc gives memory back on `free` only from the top of an
//! arena. A server's bursts (a registration wave, a reconnect storm of
//! thousands of TLS handshakes) spread short-lived buffers over every
//! arena, and once they are freed the pages stay resident: after 10,000
//! simulated proxies had left, two voters still held 588-597 MiB between
//! them, and 189-193 MiB with this task (testbed/README.md).
//! `malloc_trim` returns the whole free pages inside every arena too
//! (MADV_DONTNEED), so a server that peaked does not stay at its peak.
//!
//! Both `mallinfo2` and `malloc_trim` walk every free chunk of every arena
//! under that arena's lock, so they run on a blocking thread, once a
//! period, and the trim only when it can give something back (see
//! [`Trigger`]).

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// How often the free heap is looked at.
const PERIOD: Duration = Duration::from_secs(2);

/// Gives freed heap back to the kernel while `cancel` is not cancelled,
/// when [`Trigger`] says so. `threshold` 0 does nothing.
pub(crate) async fn release_free(threshold: u64, cancel: CancellationToken) {
    if threshold == 0 || !imp::AVAILABLE {
        return;
    }
    let mut trigger = Trigger::new(threshold);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(PERIOD) => {}
        }
        let Ok((t, done)) = tokio::task::spawn_blocking(move || {
            let done = step(&mut trigger);
            (trigger, done)
        })
        .await
        else {
            // The runtime is shutting down (or the step panicked): nothing
            // to hand back that matters more than stopping.
            return;
        };
        trigger = t;
        if let Some(d) = done {
            tracing::debug!(
                free_mib = d.free >> 20,
                released_mib = d.resident_before.saturating_sub(d.resident_after) >> 20,
                resident_mib = d.resident_after >> 20,
                took_us = d.took.as_micros() as u64,
                "gave freed heap back to the kernel"
            );
        }
    }
}

/// When a trim can give something back.
///
/// `mallinfo2`'s free bytes still count the pages a trim gave back (their
/// chunks stay in the bins), so the free figure alone cannot tell new
/// free pages from old: a burst that reuses those chunks and frees them
/// again leaves it where it was. The lowest free figure seen since the
/// last trim can: a rise from it is memory freed since, and resident.
/// Resident memory grown since the last trim counts too, for a burst that
/// came and went between two looks, but not while free heap is falling:
/// that is a burst under way, whose pages are in use.
#[derive(Debug, Clone, Copy)]
struct Trigger {
    threshold: u64,
    free_floor: u64,
    free_after: u64,
    resident_after: u64,
}

impl Trigger {
    fn new(threshold: u64) -> Self {
        Self {
            threshold,
            free_floor: 0,
            free_after: 0,
            resident_after: 0,
        }
    }

    /// Takes a look; true when a trim is due: at least `threshold` free,
    /// and a quarter of it freed since the last trim (a rise from the
    /// floor), or made resident while free heap held.
    fn due(&mut self, free: u64, resident: u64) -> bool {
        self.free_floor = self.free_floor.min(free);
        let step = self.threshold / 4;
        let freed = free - self.free_floor >= step;
        let grew =
            resident.saturating_sub(self.resident_after) >= step && free + step >= self.free_after;
        free >= self.threshold && (freed || grew)
    }

    /// After a trim: what is free and resident now is the new baseline.
    fn trimmed(&mut self, free: u64, resident: u64) {
        self.free_floor = free;
        self.free_after = free;
        self.resident_after = resident;
    }
}

/// One trim.
#[derive(Debug)]
struct Trimmed {
    free: u64,
    resident_before: u64,
    resident_after: u64,
    took: Duration,
}

/// Looks at the heap, and trims it if `trigger` says so.
fn step(trigger: &mut Trigger) -> Option<Trimmed> {
    let free = imp::free_bytes();
    let resident_before = resident_bytes();
    if !trigger.due(free, resident_before) {
        return None;
    }
    let t = Instant::now();
    imp::trim();
    let took = t.elapsed();
    let resident_after = resident_bytes();
    trigger.trimmed(imp::free_bytes(), resident_after);
    Some(Trimmed {
        free,
        resident_before,
        resident_after,
        took,
    })
}

/// This process's resident set, from /proc/self/status (0 if unreadable).
fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| vm_rss(&s))
        .unwrap_or(0)
}

/// The resident set in bytes from the text of a /proc/PID/status file.
pub(crate) fn vm_rss(status: &str) -> Option<u64> {
    let kb = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kb: u64 = kb.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

#[cfg(all(target_os = "linux", target_env = "gnu", not(feature = "mimalloc")))]
#[allow(unsafe_code)]
mod imp {
    pub(super) const AVAILABLE: bool = true;

    /// Bytes in free chunks across every arena.
    pub(super) fn free_bytes() -> u64 {
        // SAFETY: mallinfo2 takes no arguments, returns a plain struct by
        // value and only takes the arenas' own locks.
        let info = unsafe { libc::mallinfo2() };
        info.fordblks as u64
    }

    pub(super) fn trim() {
        // SAFETY: malloc_trim has no preconditions; it takes the arenas'
        // locks itself and frees nothing that is in use.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// Other allocators (musl's, mimalloc) keep no such free pages, or return
/// them on their own.
#[cfg(not(all(target_os = "linux", target_env = "gnu", not(feature = "mimalloc"))))]
mod imp {
    pub(super) const AVAILABLE: bool = false;
    pub(super) fn free_bytes() -> u64 {
        0
    }
    pub(super) fn trim() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn trims_what_was_freed_since_the_last_trim() {
        let mut t = Trigger::new(32 * MIB);
        // Too little free (and the floor is now 10 MiB).
        assert!(!t.due(10 * MIB, 100 * MIB));
        // Enough free, and a rise from the lowest look.
        assert!(t.due(200 * MIB, 300 * MIB));
        t.trimmed(200 * MIB, 100 * MIB);
        // Nothing new: the same free figure, the same resident set.
        assert!(!t.due(200 * MIB, 100 * MIB));
        assert!(!t.due(203 * MIB, 104 * MIB));
        // A burst reuses the free chunks, then frees them again: the free
        // figure is back where it was, but it rose 190 MiB from its floor.
        assert!(!t.due(10 * MIB, 290 * MIB));
        assert!(t.due(200 * MIB, 290 * MIB));
        t.trimmed(200 * MIB, 100 * MIB);
        // A burst between two looks: only the resident set shows it.
        assert!(t.due(200 * MIB, 150 * MIB));
        t.trimmed(200 * MIB, 100 * MIB);
        // Free falling (a burst under way) is no reason to trim, even as
        // the resident set grows with it.
        assert!(!t.due(150 * MIB, 100 * MIB));
        assert!(!t.due(150 * MIB, 150 * MIB));
    }

    /// Blocks below the mmap threshold (so they come from an arena),
    /// three of every four freed: the freed runs sit between live blocks,
    /// so `free` gives none of them back; a step must. 64 KiB blocks make
    /// 192 KiB runs, which hold whole pages of 4 KiB and of 64 KiB alike.
    #[cfg(all(target_os = "linux", target_env = "gnu", not(feature = "mimalloc")))]
    #[test]
    fn freed_pages_go_back_to_the_kernel() {
        // 128 MiB, touched; 96 MiB of it freed.
        let mut blocks: Vec<Vec<u8>> = (0..2048)
            .map(|i| vec![1 + i as u8 % 255; 64 << 10])
            .collect();
        let mut i = 0;
        blocks.retain(|_| {
            i += 1;
            i % 4 == 0
        });
        let mut trigger = Trigger::new(32 * MIB);
        let done = step(&mut trigger).expect("96 MiB free is worth a trim");
        // Other tests run in this process at the same time; most of the
        // 96 MiB must still show.
        assert!(
            done.resident_before.saturating_sub(done.resident_after) >= 48 * MIB,
            "{done:?}"
        );
        drop(blocks);
    }

    #[test]
    fn threshold_zero_returns_at_once() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(
                Duration::from_millis(100),
                release_free(0, CancellationToken::new()),
            )
            .await
            .expect("threshold 0 does nothing");
        });
    }
}
