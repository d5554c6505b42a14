//! Handing freed heap back to the kernel.
//!
//! glibc's malloc gives memory back on `free` only from the top of an
//! arena. A server's bursts (a registration wave, a reconnect storm of
//! thousands of TLS handshakes) spread short-lived buffers over every
//! arena, and once they are freed the pages stay resident: measured at
//! 10,000 proxies, each voter held 350-385 MB after the proxies left, of
//! which `malloc_trim(0)` gave 220-240 MB back. `malloc_trim` returns the
//! whole free pages inside every arena too (MADV_DONTNEED), so a server
//! that peaked does not stay at its peak.
//!
//! It walks and locks each arena in turn, so it runs on a blocking thread,
//! and only when enough is free and the heap has changed since the last
//! time; in between it costs one `mallinfo2` a period.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// How often the free heap is looked at.
const PERIOD: Duration = Duration::from_secs(2);

/// Gives freed heap back to the kernel while `cancel` is not cancelled,
/// whenever at least `threshold` bytes sit free in the allocator and that
/// figure moved by a quarter of `threshold` since the last trim (a heap
/// that did not change has nothing new to give). `threshold` 0 does
/// nothing.
pub(crate) async fn release_free(threshold: u64, cancel: CancellationToken) {
    if threshold == 0 || !imp::AVAILABLE {
        return;
    }
    let mut last_free: Option<u64> = None;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(PERIOD) => {}
        }
        let seen = last_free;
        let Ok(done) = tokio::task::spawn_blocking(move || {
            let free = imp::free_bytes();
            let moved = seen.is_none_or(|s| s.abs_diff(free) >= threshold / 4);
            if free < threshold || !moved {
                return None;
            }
            let rss_before = resident_bytes();
            let t = Instant::now();
            imp::trim();
            let took = t.elapsed();
            Some((free, rss_before, resident_bytes(), took, imp::free_bytes()))
        })
        .await
        else {
            // The runtime is shutting down.
            return;
        };
        if let Some((free, before, after, took, free_after)) = done {
            last_free = Some(free_after);
            tracing::debug!(
                free_mib = free >> 20,
                released_mib = before.saturating_sub(after) >> 20,
                resident_mib = after >> 20,
                took_us = took.as_micros() as u64,
                "gave freed heap back to the kernel"
            );
        }
    }
}

/// This process's resident set, from /proc/self/statm (0 if unreadable).
fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
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

    /// Blocks below the mmap threshold (so they come from an arena),
    /// three of every four freed: the freed runs sit between live blocks,
    /// so `free` gives none of them back; the task must.
    #[cfg(all(target_os = "linux", target_env = "gnu", not(feature = "mimalloc")))]
    #[test]
    fn freed_pages_go_back_to_the_kernel() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        // 128 MiB in 16 KiB blocks, touched; 96 MiB of it freed in 48 KiB runs.
        let mut blocks: Vec<Vec<u8>> = (0..8192)
            .map(|i| vec![1 + i as u8 % 255; 16 << 10])
            .collect();
        let mut i = 0;
        blocks.retain(|_| {
            i += 1;
            i % 4 == 0
        });
        let before = resident_bytes();
        assert!(imp::free_bytes() >= 64 << 20, "free {}", imp::free_bytes());
        let cancel = CancellationToken::new();
        rt.block_on(async {
            let task = tokio::spawn(release_free(32 << 20, cancel.clone()));
            tokio::time::sleep(PERIOD + Duration::from_millis(500)).await;
            cancel.cancel();
            task.await.unwrap();
        });
        let after = resident_bytes();
        // Other tests run in this process at the same time; most of the
        // 96 MiB must still show.
        assert!(
            before.saturating_sub(after) >= 48 << 20,
            "resident {} MiB before, {} MiB after",
            before >> 20,
            after >> 20
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
