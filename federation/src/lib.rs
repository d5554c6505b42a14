//! The federation store: a Raft-replicated registry of zones, services,
//! endpoints, policies and trust bundles, served over gRPC, with join tokens,
//! mesh DNS and the proxies' config watch streams.
//!
//! Not built yet (issue 3): this crate is an empty member of the workspace
//! so that the dependency order `ca` ← `federation` ← `gateway` ← `agent`
//! is fixed from the start.
