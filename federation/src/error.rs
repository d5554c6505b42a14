//! Errors of the federation store.

use std::path::PathBuf;

/// Everything that can go wrong in the store, its node and its API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FedError {
    /// sled refused a read or write.
    #[error("data directory {path}: {source} (check free space and permissions)")]
    Db {
        /// The data directory.
        path: PathBuf,
        /// sled's error.
        #[source]
        source: sled::Error,
    },
    /// The data directory holds data that does not add up; nothing was changed.
    #[error(
        "data directory {path} is damaged: {reason}. Nothing was truncated; restore it from a backup, or move it aside and re-join this server so it catches up from its peers"
    )]
    Damaged {
        /// The data directory.
        path: PathBuf,
        /// What does not add up.
        reason: String,
    },
    /// The API address cannot be bound; nothing was read or changed.
    #[error("cannot listen on {addr}: {source}{hint}")]
    Listen {
        /// The configured `listen` address.
        addr: std::net::SocketAddr,
        /// Why the bind failed.
        #[source]
        source: std::io::Error,
        /// What to look at, when the reason suggests it.
        hint: &'static str,
    },
    /// A write to the Raft log was refused before anything was changed.
    #[error("raft log write refused: {0}")]
    LogWrite(String),
    /// A stored or received value does not decode.
    #[error("cannot decode {what}: {reason}")]
    Decode {
        /// What was being decoded.
        what: &'static str,
        /// Why it failed.
        reason: String,
    },
    /// raft-rs refused an operation.
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// The command was refused by the state machine (bad or stale input).
    #[error("{0}")]
    Refused(String),
    /// The caller may not do this (ownership, role, zone).
    #[error("{0}")]
    Forbidden(String),
    /// No leader is known: the server may be in a minority partition.
    #[error(
        "no leader is known to this server (it may be cut off from a quorum, or have just started); nothing was done, retry or ask another server"
    )]
    NoLeader,
    /// A write was not committed in time; it may still commit later.
    #[error(
        "the write was not committed within {0:?}: a quorum of servers may be unreachable; its outcome is unknown"
    )]
    Timeout(std::time::Duration),
    /// Leadership changed while the write was in flight.
    #[error("leadership changed before the write committed; its outcome is unknown, retry")]
    LeaderChanged,
    /// A TLS configuration could not be built.
    #[error("TLS: {0}")]
    Tls(String),
    /// The data directory is in a format this build does not read.
    #[error(transparent)]
    DataDir(#[from] crate::datadir::DataDirError),
    /// The node task has stopped.
    #[error("the raft node has stopped")]
    Stopped,
}

impl FedError {
    pub(crate) fn db(path: &std::path::Path) -> impl FnOnce(sled::Error) -> FedError + '_ {
        move |source| FedError::Db {
            path: path.to_path_buf(),
            source,
        }
    }
}
