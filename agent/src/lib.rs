//! The host agent: identity bootstrap, service registration and health
//! checks, the sidecar proxy (inbound mTLS, outbound per-service loopback
//! listeners) and local mesh DNS.
//!
//! Not built yet (issue 5): an empty member of the workspace for now.
