//! The sidecar proxy: inbound mutual TLS for the local workloads, and
//! outbound listeners for the mesh services they call.

pub(crate) mod inbound;
pub(crate) mod outbound;

use trellis_proxy::io::{Duplex, splice};

/// Splices; if one side fails, both are aborted so that neither end
/// mistakes a truncated transfer for a complete one. Returns the bytes each
/// way (`a` to `b`, `b` to `a`).
pub(crate) async fn relay<A: Duplex + ?Sized, B: Duplex + ?Sized>(
    a: &mut A,
    b: &mut B,
) -> (u64, u64) {
    match splice(a, b).await {
        Ok(n) => n,
        Err(e) => {
            a.abort();
            b.abort();
            tracing::debug!(error = %e, "connection aborted");
            (0, 0)
        }
    }
}
