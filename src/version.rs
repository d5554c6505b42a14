//! What `trellis --version` says: the crate version and the commit it was
//! built from (stamped by `build.rs`; "unknown" for a tree without git and
//! without `TRELLIS_COMMIT`).

/// `0.1.0 (commit 634ce86a1b2c)`.
pub(crate) const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("TRELLIS_COMMIT"),
    ")"
);
