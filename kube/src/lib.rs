//! Trellis on Kubernetes: a cluster is a zone.
//!
//! This crate owns the zone controller (`trellis kube controller`) and the
//! Kubernetes side of a pod's agent:
//!
//! - [`exchange`]: a pod's agent trades its projected service-account token
//!   (audience `trellis`) for a single-use agent join token scoped to exactly
//!   its workload identity; [`review`] verifies the token with a
//!   `TokenReview` and the pod with the API server. The pod then joins
//!   through the ordinary `Zones.JoinAgent`: keys never leave the pod, and
//!   no long-lived secret is mounted into it.
//! - [`pinned`]: the pod verifies the controller's TLS against the trust
//!   root fingerprint it was given, before its token leaves the pod.
//! - [`sync`]: Services and EndpointSlices of opted-in namespaces become
//!   plain endpoints in the zone's registry, kept true by diffing against
//!   what the store holds.
//! - [`pod`]: the agent configuration a pod's environment and downward-API
//!   files describe.
//!
//! It leaves out `trellis inject`, the admission webhook and the manifests.
//! The `testing` feature holds a fake API server for tests only.

// The workspace denies unsafe code; no library of ours needs it at all.
#![forbid(unsafe_code)]

pub mod config;
pub mod controller;
pub mod error;
pub mod exchange;
pub mod pinned;
pub mod pod;
pub mod review;
pub mod sync;
#[cfg(feature = "testing")]
pub mod testing;

pub use config::ControllerConfig;
pub use error::KubeError;

/// The audience a pod's projected service-account token must carry.
pub const AUDIENCE: &str = "trellis";
/// Namespace label (and pod label or annotation) that opts pods in.
pub const INJECT_LABEL: &str = "trellis.io/inject";
/// The value of [`INJECT_LABEL`] that opts in.
pub const INJECT_ENABLED: &str = "enabled";
/// Service annotation: `"true"` exports a Service without sidecars to the
/// mesh as plain endpoints, whatever its namespace.
pub const EXPORT_ANNOTATION: &str = "trellis.io/export";
/// Pod annotation `trellis inject` sets on pods it adds the agent to: such
/// pods register themselves, so the sync leaves them out.
pub const INJECTED_ANNOTATION: &str = "trellis.io/injected";
/// The exchange's path on the controller.
pub const EXCHANGE_PATH: &str = "/v1/exchange";
