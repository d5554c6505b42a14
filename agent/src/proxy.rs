//! The sidecar proxy: inbound mutual TLS for the local workloads, and
//! outbound listeners for the mesh services they call.

pub(crate) mod inbound;
pub(crate) mod outbound;

use trellis_gateway::{Duplex, splice};

/// Splices two streams; if one side fails, both are aborted so that neither
/// end mistakes a truncated transfer for a complete one.
pub(crate) async fn relay<A: Duplex, B: Duplex>(a: &mut A, b: &mut B) {
    if let Err(e) = splice(a, b).await {
        a.abort();
        b.abort();
        tracing::debug!(error = %e, "connection aborted");
    }
}
