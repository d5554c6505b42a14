//! The sidecar proxy: inbound mutual TLS for the local workloads, and
//! outbound listeners for the mesh services they call.

pub(crate) mod balance;
pub(crate) mod inbound;
pub(crate) mod outbound;

use trellis_proxy::io::{Duplex, splice_or_abort};

/// Splices (see [`splice_or_abort`]); returns the bytes each way (`a` to
/// `b`, `b` to `a`), none counted for a failed transfer.
pub(crate) async fn relay<A: Duplex + ?Sized, B: Duplex + ?Sized>(
    a: &mut A,
    b: &mut B,
) -> (u64, u64) {
    splice_or_abort(a, b).await.unwrap_or_else(|e| {
        tracing::debug!(error = %e, "connection aborted");
        (0, 0)
    })
}
