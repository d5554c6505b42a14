//! Durable Raft storage: the log and hard state in a write-ahead file
//! (`wal.rs`), the state machine, conf state and snapshot metadata in
//! sled.
//!
//! sled holds one tree with key prefixes: `r/c`, `r/s` for the conf state
//! and the metadata of the last snapshot or compaction point, `r/r` for the
//! index of the last snapshot installed, `r/v` for the format version, and
//! `s/...` for the state machine (see [`crate::state`]). The log's entries
//! are kept in memory as well (compaction bounds them), so Raft reads them
//! without touching the disk.
//!
//! Contract (raft-rs `Storage`): every write is durable before the method
//! returns, so the Ready loop may acknowledge what it persisted; and the
//! in-memory view changes only after the write succeeded, so a failed write
//! leaves the node's state as it was. sled is flushed only where the log
//! is about to lose entries (compaction, snapshot install): until then a
//! restart replays the log over whatever state sled kept.
//!
//! Format 1 kept the log in sled (`r/e<index>`, `r/h`); [`RaftStorage::open`]
//! moves such a log into a write-ahead file once.

use std::collections::{BTreeMap, VecDeque};
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};

use crate::error::FedError;
use crate::wal::{self, Wal};

const FORMAT_VERSION: &[u8] = b"2";
// The store's format is the server directory's: bump both together.
const _: () = assert!(crate::datadir::SERVER_FORMAT == 2);
/// The format that kept the log in sled.
const FORMAT_SLED_LOG: &[u8] = b"1";
const K_VERSION: &[u8] = b"r/v";
/// Format 1's hard state.
const K_HARD: &[u8] = b"r/h";
const K_CONF: &[u8] = b"r/c";
const K_SNAP: &[u8] = b"r/s";
/// The index of the last snapshot installed: a log segment that starts
/// before it predates the install and holds nothing of the log after it.
const K_RESET: &[u8] = b"r/r";
/// Format 1's log entries.
const ENTRY_PREFIX: &[u8] = b"r/e";
/// Prefix of every state-machine key; a snapshot is exactly these keys.
pub(crate) const STATE_PREFIX: &[u8] = b"s/";
/// The state machine's applied index and its term (16 bytes, big-endian).
pub(crate) const K_APPLIED: &[u8] = b"s/_applied";

/// The writes of one apply: key to value, `None` removes it.
pub(crate) type Writes = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// Applied writes not yet in sled; reads see them first.
type Pending = BTreeMap<Vec<u8>, Option<sled::IVec>>;

/// Applied keys held before a checkpoint starts in the background whatever
/// the time: a checkpoint holds sled's write lock for as long as its batch
/// takes, and every read of sled waits behind it, so a long one shows in
/// the write latency's tail.
const CHECKPOINT_KEYS: usize = 256;
/// Applied keys held before an apply waits for a checkpoint (sled cannot
/// keep up).
const PENDING_KEYS: usize = 50_000;

/// The open data directory: one sled database, one tree, and the applied
/// writes that have not reached the tree yet.
///
/// Why applies are held: every sled batch seals and writes sled's IO
/// buffer, twice, with a `sync_file_range` each, on its IO threads. One
/// batch per Ready made those threads a third of a server's CPU under
/// write load (perf, `cargo bench --bench store`). Applies need no
/// durability of their own (the log replays them), only atomicity, so the
/// node moves them into sled as one atomic batch every tick (100 ms) and
/// every `CHECKPOINT_KEYS` keys (`Db::checkpoint`); a crash loses whole checkpoints at most, and
/// start-up replays the log from the applied index sled holds.
#[derive(Clone)]
pub struct Db {
    path: PathBuf,
    tree: sled::Tree,
    pending: Arc<RwLock<Pending>>,
    // One checkpoint at a time: two could land their copies out of order
    // and leave an older value in sled once the newer one left `pending`.
    checkpointing: Arc<std::sync::Mutex<()>>,
    // A background checkpoint is queued and has not started.
    scheduled: Arc<AtomicBool>,
    // Held for writing while an apply lands and for reading while a watch
    // takes a full snapshot, so a snapshot never mixes two revisions.
    apply_lock: Arc<RwLock<()>>,
    // Keep the database alive as long as any handle to its tree.
    _db: sled::Db,
}

/// raft-rs storage: the log in a write-ahead file and in memory, the rest
/// in a [`Db`].
pub struct RaftStorage {
    db: Db,
    wal: Wal,
    hard: HardState,
    /// The hard state last written to the log: a commit index alone moves
    /// without a write, and goes out with the next append.
    hard_written: HardState,
    conf: ConfState,
    snap: SnapshotMetadata,
    /// Entries `snap.index + 1 ..= last`.
    log: VecDeque<Entry>,
    last: u64,
    #[cfg(test)]
    fail_next_write: std::cell::Cell<bool>,
}

#[cfg(test)]
pub(crate) fn entry_key(index: u64) -> Vec<u8> {
    let mut k = ENTRY_PREFIX.to_vec();
    k.extend_from_slice(&index.to_be_bytes());
    k
}

fn entry_index(key: &[u8]) -> Option<u64> {
    let b: [u8; 8] = key.strip_prefix(ENTRY_PREFIX)?.try_into().ok()?;
    Some(u64::from_be_bytes(b))
}

fn decode<M: protobuf::Message>(what: &'static str, bytes: &[u8]) -> Result<M, FedError> {
    M::parse_from_bytes(bytes).map_err(|e| FedError::Decode {
        what,
        reason: e.to_string(),
    })
}

fn encode<M: protobuf::Message>(m: &M) -> Vec<u8> {
    // Encoding an in-memory message into a Vec cannot fail: protobuf 2 only
    // errors on writer I/O and on missing required fields (proto3 has none).
    m.write_to_bytes().unwrap_or_default()
}

fn store_err(e: FedError) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

// === impl Db ===

impl Db {
    /// Opens (or creates) the data directory. sled checks its own checksums
    /// here; an error means the files are damaged or locked by another process.
    pub fn open(dir: &Path) -> Result<Self, FedError> {
        if !dir.exists() {
            // The store holds token hashes and the whole registry: owner only.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| FedError::Damaged {
                    path: dir.to_path_buf(),
                    reason: format!("cannot create it: {e}"),
                })?;
        }
        let path = dir.join("store");
        let db = sled::Config::new()
            .path(&path)
            .open()
            .map_err(FedError::db(dir))?;
        let tree = db.open_tree("trellis").map_err(FedError::db(dir))?;
        Ok(Self {
            path: dir.to_path_buf(),
            tree,
            pending: Default::default(),
            checkpointing: Default::default(),
            scheduled: Default::default(),
            apply_lock: Default::default(),
            _db: db,
        })
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<sled::IVec>, FedError> {
        if let Some(v) = self.pending().get(key) {
            return Ok(v.clone());
        }
        self.tree.get(key).map_err(FedError::db(&self.path))
    }

    fn pending(&self) -> std::sync::RwLockReadGuard<'_, Pending> {
        self.pending.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Moves every applied write into sled, applies `batch` atomically and
    /// flushes: durable on return, with everything applied before it.
    pub(crate) fn write(&self, batch: sled::Batch) -> Result<(), FedError> {
        self.checkpoint()?;
        self.tree
            .apply_batch(batch)
            .map_err(FedError::db(&self.path))?;
        self.tree.flush().map_err(FedError::db(&self.path))?;
        Ok(())
    }

    /// Records an apply: visible to every read on return, and moved into
    /// sled, atomically with the applies before it, at the next
    /// [`Db::checkpoint`]. Not durable: the entries it applies are in the
    /// log, and a restart replays whatever a crash took.
    pub(crate) fn write_applied(&self, writes: Writes) -> Result<(), FedError> {
        // sled is far behind: catch up first, so that a failure leaves this
        // apply unseen, as a failed write must.
        if self.pending().len() >= PENDING_KEYS {
            self.checkpoint()?;
        }
        let held = {
            let _guard = self
                .apply_lock
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let mut pending = self.pending.write().unwrap_or_else(PoisonError::into_inner);
            for (k, v) in writes {
                pending.insert(k, v.map(sled::IVec::from));
            }
            pending.len()
        };
        if held >= CHECKPOINT_KEYS {
            self.checkpoint_in_background();
        }
        Ok(())
    }

    /// [`Db::checkpoint`] on a blocking thread, so the Ready loop does not
    /// wait for sled; at most one is scheduled at a time, and none when
    /// nothing is held. Outside a runtime (tools, tests), here and now.
    pub(crate) fn checkpoint_in_background(&self) {
        if self.pending().is_empty() || self.scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        let db = self.clone();
        let run = move || {
            let r = {
                let _one = db
                    .checkpointing
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                db.scheduled.store(false, Ordering::Release);
                db.checkpoint_locked()
            };
            if let Err(e) = r {
                tracing::error!(error = %e, "could not move applied writes into the store; retrying at the next tick");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(run)),
            Err(_) => run(),
        }
    }

    /// Moves the applied writes into sled as one atomic batch (not flushed).
    pub(crate) fn checkpoint(&self) -> Result<(), FedError> {
        let _one = self
            .checkpointing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.checkpoint_locked()
    }

    fn checkpoint_locked(&self) -> Result<(), FedError> {
        let held: Vec<(Vec<u8>, Option<sled::IVec>)> = {
            let pending = self.pending();
            if pending.is_empty() {
                return Ok(());
            }
            pending
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        let mut batch = sled::Batch::default();
        for (k, v) in &held {
            match v {
                Some(v) => batch.insert(k.as_slice(), v.clone()),
                None => batch.remove(k.as_slice()),
            }
        }
        self.tree
            .apply_batch(batch)
            .map_err(FedError::db(&self.path))?;
        // Both hold them now; drop what no later apply changed meanwhile.
        let mut pending = self.pending.write().unwrap_or_else(PoisonError::into_inner);
        for (k, v) in held {
            if pending.get(&k) == Some(&v) {
                pending.remove(&k);
            }
        }
        Ok(())
    }

    /// Runs `f` with no apply landing meanwhile.
    pub(crate) fn consistent<T>(&self, f: impl FnOnce() -> T) -> T {
        let _guard = self
            .apply_lock
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        f()
    }

    pub(crate) fn scan_prefix(
        &self,
        prefix: &[u8],
    ) -> impl Iterator<Item = Result<(sled::IVec, sled::IVec), FedError>> + '_ {
        let held = self.held(prefix, prefix);
        merge(held, self.tree.scan_prefix(prefix), &self.path)
    }

    /// Keys from `start` on that still carry `prefix`.
    pub(crate) fn range_from<'a>(
        &'a self,
        start: &[u8],
        prefix: &'a [u8],
    ) -> impl Iterator<Item = Result<(sled::IVec, sled::IVec), FedError>> + 'a {
        let held = self.held(start, prefix);
        let tree = self
            .tree
            .range(start.to_vec()..)
            .take_while(move |r| r.as_ref().map_or(true, |(k, _)| k.starts_with(prefix)));
        merge(held, tree, &self.path)
    }

    /// The pending writes from `start` on that carry `prefix`, copied: a
    /// read sees the applies up to one moment, and sled holds everything a
    /// checkpoint took from them since.
    fn held(&self, start: &[u8], prefix: &[u8]) -> Vec<(Vec<u8>, Option<sled::IVec>)> {
        self.pending()
            .range(start.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn damaged(&self, reason: impl Into<String>) -> FedError {
        FedError::Damaged {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }
}

/// sled's entries with the pending writes laid over them, in key order;
/// a pending removal hides the key.
fn merge<'a>(
    held: Vec<(Vec<u8>, Option<sled::IVec>)>,
    tree: impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>> + 'a,
    path: &'a Path,
) -> impl Iterator<Item = Result<(sled::IVec, sled::IVec), FedError>> + 'a {
    let mut held = held.into_iter().peekable();
    let mut tree = tree.peekable();
    std::iter::from_fn(move || {
        loop {
            let from_tree = match tree.peek() {
                None => None,
                Some(Err(_)) => {
                    let e = tree.next()?.err()?;
                    return Some(Err(FedError::db(path)(e)));
                }
                Some(Ok((k, _))) => Some(k.clone()),
            };
            let take_held = match (held.peek(), &from_tree) {
                (None, None) => return None,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((hk, _)), Some(tk)) => {
                    if hk.as_slice() == tk.as_ref() {
                        // The pending write replaces sled's value.
                        tree.next();
                        true
                    } else {
                        hk.as_slice() < tk.as_ref()
                    }
                }
            };
            if take_held {
                let (k, v) = held.next()?;
                match v {
                    Some(v) => return Some(Ok((sled::IVec::from(k), v))),
                    None => continue,
                }
            }
            return tree.next().map(|r| r.map_err(FedError::db(path)));
        }
    })
}

// === impl RaftStorage ===

impl RaftStorage {
    /// Loads the Raft state and checks that it adds up: the format version,
    /// the log segment's frames and checksums, the entries following the
    /// snapshot point without a hole, and the commit and applied indexes
    /// lying inside what is stored. Any mismatch is reported, never
    /// repaired; only a last append cut short by a crash (never
    /// acknowledged) is dropped.
    pub fn open(db: Db) -> Result<Self, FedError> {
        let version = db.get(K_VERSION)?;
        let fresh = version.is_none();
        let wal_dir = db.path.join("wal");
        match &version {
            None => {
                if db.tree.scan_prefix(b"r/").next().is_some()
                    || db.tree.scan_prefix(STATE_PREFIX).next().is_some()
                {
                    return Err(db.damaged("it holds data but no format version"));
                }
                Wal::create(&wal_dir, &wal::Log::default())?;
                let mut b = sled::Batch::default();
                b.insert(K_VERSION, FORMAT_VERSION);
                db.write(b)?;
            }
            Some(v) if v.as_ref() == FORMAT_VERSION => {}
            Some(v) if v.as_ref() == FORMAT_SLED_LOG => migrate(&db, &wal_dir)?,
            Some(v) => {
                return Err(db.damaged(format!(
                    "format version {:?}, this build reads {:?}",
                    String::from_utf8_lossy(v),
                    String::from_utf8_lossy(FORMAT_VERSION)
                )));
            }
        }
        let read =
            |k: &[u8]| -> Result<Option<Vec<u8>>, FedError> { Ok(db.get(k)?.map(|v| v.to_vec())) };
        let conf: ConfState = match read(K_CONF)? {
            Some(b) => decode("conf state", &b).map_err(|e| db.damaged(e.to_string()))?,
            None => ConfState::default(),
        };
        let snap: SnapshotMetadata = match read(K_SNAP)? {
            Some(b) => decode("snapshot metadata", &b).map_err(|e| db.damaged(e.to_string()))?,
            None => SnapshotMetadata::default(),
        };
        let reset = match read(K_RESET)? {
            Some(b) => decode_applied(&b).ok_or_else(|| db.damaged("snapshot install index"))?,
            None => (0, 0),
        };
        let (mut wal, log) = Wal::open(&wal_dir)?.ok_or_else(|| {
            db.damaged(format!(
                "the raft log {} is missing (format {:?} keeps it there)",
                wal_dir.display(),
                String::from_utf8_lossy(FORMAT_VERSION)
            ))
        })?;
        let mut hard = log.hard.clone();
        let mut entries = log.entries;
        if log.start.0 > snap.index {
            return Err(db.damaged(format!(
                "the raft log starts after entry {} but the state machine was compacted only to {}",
                log.start.0, snap.index
            )));
        }
        // The snapshot point is committed, in its term or an earlier one
        // (after a bootstrap or snapshot install cut off before the log
        // took its new hard state, the log's may be older).
        if hard.term < snap.term {
            hard.term = snap.term;
            hard.vote = 0;
        }
        hard.commit = hard.commit.max(snap.index);
        let interrupted_install = log.start.0 < reset.0;
        if interrupted_install {
            // A snapshot was installed, and the node stopped before the log
            // was replaced: what the log holds came before the snapshot.
            // Replaced now, or appends would land after that stale start.
            entries.clear();
        }

        // Entries up to the compaction point live on in the state machine.
        entries.retain(|e| e.index > snap.index);
        if let Some(first) = entries.first()
            && first.index != snap.index + 1
        {
            return Err(db.damaged(format!(
                "log entries {}..{} are missing after the compaction point",
                snap.index + 1,
                first.index
            )));
        }
        let last = entries.last().map_or(snap.index, |e| e.index);
        if hard.commit > last {
            return Err(db.damaged(format!(
                "hard state says index {} is committed but the log ends at {last}",
                hard.commit
            )));
        }
        if let Some(b) = db.get(K_APPLIED)? {
            let (applied, _) = decode_applied(&b).ok_or_else(|| db.damaged("applied index"))?;
            if applied > last {
                return Err(db.damaged(format!(
                    "state machine applied index {applied} is past the last log entry {last}"
                )));
            }
            if applied < snap.index {
                return Err(db.damaged(format!(
                    "state machine applied index {applied} is before the compaction point {}",
                    snap.index
                )));
            }
            // The Ready loop applies committed entries before it persists the
            // hard state that carries the new commit index, so a crash between
            // the two leaves applied > commit. Whatever was applied had been
            // committed, so the commit index is at least the applied index.
            hard.commit = hard.commit.max(applied);
        }
        // Checked whole: only now is anything rewritten. A commit index
        // alone may lag in the log (it is written with the next append).
        if interrupted_install || hard.term != log.hard.term || hard.vote != log.hard.vote {
            wal.rotate(&wal::Log {
                start: (snap.index, snap.term),
                hard: hard.clone(),
                entries: entries.clone(),
            })?;
        }
        let hard_written = hard.clone();
        if fresh {
            tracing::info!(path = %db.path.display(), "new data directory");
        }
        Ok(Self {
            db,
            wal,
            hard,
            hard_written,
            conf,
            snap,
            log: entries.into(),
            last,
            #[cfg(test)]
            fail_next_write: std::cell::Cell::new(false),
        })
    }

    /// The database this storage lives in.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The persisted hard state.
    pub fn hard_state(&self) -> &HardState {
        &self.hard
    }

    /// The persisted conf state.
    pub fn conf_state(&self) -> &ConfState {
        &self.conf
    }

    /// Index of the last snapshot or compaction point.
    pub fn snapshot_index(&self) -> u64 {
        self.snap.index
    }

    fn first(&self) -> u64 {
        self.snap.index + 1
    }

    #[cfg(test)]
    fn injected_failure(&self) -> Result<(), FedError> {
        if self.fail_next_write.replace(false) {
            return Err(FedError::LogWrite("injected failure".into()));
        }
        Ok(())
    }

    #[cfg(not(test))]
    #[allow(clippy::unnecessary_wraps)]
    fn injected_failure(&self) -> Result<(), FedError> {
        Ok(())
    }

    fn commit_write(&self, batch: sled::Batch) -> Result<(), FedError> {
        self.injected_failure()?;
        self.db.write(batch)
    }

    /// The log as it stands, for a new segment.
    fn whole_log(&self) -> wal::Log {
        wal::Log {
            start: (self.snap.index, self.snap.term),
            hard: self.hard.clone(),
            entries: self.log.iter().cloned().collect(),
        }
    }

    /// The first-ever start of a cluster: makes `voters` the configuration
    /// of a snapshot at index 1, term 1, with an empty state machine.
    ///
    /// Why a snapshot and not a bare conf state at index 0: a server that
    /// joins later starts with an empty log and learns the membership only
    /// from what the leader sends it. A configuration that lives in no log
    /// entry and no snapshot never reaches it, so it would count only the
    /// members added after it (issue 10: joined servers did not know the
    /// bootstrap server). With the log starting at index 2, a new member's
    /// first catch-up is a snapshot, whose metadata carries the whole
    /// configuration as applied then.
    pub fn bootstrap(&mut self, voters: Vec<u64>) -> Result<(), FedError> {
        if self.last != 0 || !self.conf.voters.is_empty() {
            return Err(FedError::Refused(format!(
                "{} already holds a cluster (log index {}, voters {:?}); bootstrap only an empty data directory",
                self.db.path.display(),
                self.last,
                self.conf.voters
            )));
        }
        let mut conf = ConfState::default();
        conf.voters = voters;
        let mut meta = SnapshotMetadata::default();
        meta.index = 1;
        meta.term = 1;
        meta.set_conf_state(conf.clone());
        let mut hs = self.hard.clone();
        hs.term = hs.term.max(1);
        hs.commit = hs.commit.max(1);
        let mut batch = sled::Batch::default();
        batch.insert(K_CONF, encode(&conf));
        batch.insert(K_SNAP, encode(&meta));
        batch.insert(K_APPLIED, encode_applied(1, 1));
        self.commit_write(batch)?;
        self.wal.rotate(&wal::Log {
            start: (1, 1),
            hard: hs.clone(),
            entries: Vec::new(),
        })?;
        self.conf = conf;
        self.snap = meta;
        self.hard_written = hs.clone();
        self.hard = hs;
        self.last = 1;
        Ok(())
    }

    /// Appends entries, replacing any stored entries from the first new index
    /// on (a new leader overwrote an uncommitted tail). Durable on return.
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), FedError> {
        self.persist(entries, None)
    }

    /// Appends `entries` (as [`RaftStorage::append`]) and stores `hs`, in one
    /// log append and at most one `fdatasync`: one disk sync per Ready.
    pub fn persist(&mut self, entries: &[Entry], hs: Option<&HardState>) -> Result<(), FedError> {
        let Some(first) = entries.first() else {
            if let Some(hs) = hs {
                // A hard state that only moves the commit index need not
                // reach the disk before we go on: a lost commit index is
                // learnt again from the leader (and raised to the applied
                // index at start-up). It goes out with the next append.
                // Term and vote must be durable first.
                if hs.term == self.hard_written.term && hs.vote == self.hard_written.vote {
                    self.hard = hs.clone();
                } else {
                    self.injected_failure()?;
                    self.wal.append(Some(hs), &[], true)?;
                    self.hard_written = hs.clone();
                    self.hard = hs.clone();
                }
            }
            return Ok(());
        };
        if first.index <= self.snap.index {
            return Err(FedError::LogWrite(format!(
                "entry {} is at or before the compaction point {}",
                first.index, self.snap.index
            )));
        }
        if first.index > self.last + 1 {
            return Err(FedError::LogWrite(format!(
                "entry {} would leave a hole after the last entry {}",
                first.index, self.last
            )));
        }
        for pair in entries.windows(2) {
            if pair[1].index != pair[0].index + 1 {
                return Err(FedError::LogWrite(format!(
                    "entries {} and {} are not consecutive",
                    pair[0].index, pair[1].index
                )));
            }
        }
        let hard = hs.cloned().unwrap_or_else(|| self.hard.clone());
        let write_hard = (hard != self.hard_written).then_some(&hard);
        self.injected_failure()?;
        self.wal.append(write_hard, entries, true)?;
        self.log
            .truncate((first.index - self.snap.index - 1) as usize);
        self.log.extend(entries.iter().cloned());
        self.last = entries[entries.len() - 1].index;
        self.hard_written = hard.clone();
        self.hard = hard;
        Ok(())
    }

    /// Persists the hard state (term, vote, commit).
    pub fn set_hard_state(&mut self, hs: HardState) -> Result<(), FedError> {
        self.injected_failure()?;
        self.wal.append(Some(&hs), &[], true)?;
        self.hard_written = hs.clone();
        self.hard = hs;
        Ok(())
    }

    /// Records a new commit index (from a light ready). Not written now: a
    /// commit index lost in a crash is learnt again from the leader, and
    /// start-up raises it to the applied index.
    pub fn set_commit(&mut self, commit: u64) -> Result<(), FedError> {
        self.hard.commit = commit;
        Ok(())
    }

    /// Persists the conf state.
    pub fn set_conf_state(&mut self, cs: ConfState) -> Result<(), FedError> {
        let mut batch = sled::Batch::default();
        batch.insert(K_CONF, encode(&cs));
        self.commit_write(batch)?;
        self.conf = cs;
        Ok(())
    }

    /// The conf state to write into the same batch as an applied conf change.
    pub(crate) fn stage_conf_state(&self, writes: &mut Writes, cs: &ConfState) {
        writes.insert(K_CONF.to_vec(), Some(encode(cs)));
    }

    /// Records a conf state that the apply batch already wrote.
    pub(crate) fn conf_state_written(&mut self, cs: ConfState) {
        self.conf = cs;
    }

    /// Drops log entries up to and including `index`, which must be applied;
    /// the state machine stands in for them (snapshots are made from it), so
    /// it is flushed first. A large log segment is replaced by one that holds
    /// only the live entries.
    pub fn compact(&mut self, index: u64, applied: u64) -> Result<(), FedError> {
        if index <= self.snap.index {
            return Ok(());
        }
        if index > applied || index > self.last {
            return Err(FedError::LogWrite(format!(
                "cannot compact to {index}: applied is {applied}, last entry {}",
                self.last
            )));
        }
        let term = raft::Storage::term(self, index).map_err(FedError::Raft)?;
        let mut meta = SnapshotMetadata::default();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(self.conf.clone());
        let mut batch = sled::Batch::default();
        batch.insert(K_SNAP, encode(&meta));
        self.commit_write(batch)?;
        self.log.drain(..(index - self.snap.index) as usize);
        self.snap = meta;
        if self.wal.len() > wal::ROTATE_BYTES {
            self.wal.rotate(&self.whole_log())?;
        }
        Ok(())
    }

    /// Installs a snapshot from the leader: replaces the state machine with
    /// the snapshot's keys in one atomic, flushed batch, then the log with
    /// nothing (a crash between the two is recognised at start-up by the
    /// install index the batch records).
    pub fn apply_snapshot(&mut self, snap: &Snapshot) -> Result<(), FedError> {
        let meta = snap.get_metadata();
        if meta.index <= self.snap.index {
            return Err(FedError::LogWrite(format!(
                "snapshot at {} is not newer than the compaction point {}",
                meta.index, self.snap.index
            )));
        }
        let pairs = decode_snapshot_data(&snap.data)?;
        self.db.checkpoint()?;
        // The Ready loop, the only writer of applies, is here: nothing can
        // be held that would lie over the snapshot's state.
        debug_assert!(self.db.pending().is_empty());
        let mut batch = sled::Batch::default();
        for item in self.db.tree.scan_prefix(STATE_PREFIX) {
            let (k, _) = item.map_err(FedError::db(&self.db.path))?;
            batch.remove(k);
        }
        for (k, v) in pairs {
            if !k.starts_with(STATE_PREFIX) {
                return Err(FedError::Decode {
                    what: "snapshot",
                    reason: format!("key {k:?} is outside the state machine"),
                });
            }
            batch.insert(k, v);
        }
        batch.insert(K_APPLIED, encode_applied(meta.index, meta.term));
        batch.insert(K_RESET, encode_applied(meta.index, meta.term));
        let mut hs = self.hard.clone();
        hs.commit = hs.commit.max(meta.index);
        hs.term = hs.term.max(meta.term);
        batch.insert(K_CONF, encode(meta.get_conf_state()));
        let m = meta.clone();
        batch.insert(K_SNAP, encode(&m));
        self.commit_write(batch)?;
        self.wal.rotate(&wal::Log {
            start: (meta.index, meta.term),
            hard: hs.clone(),
            entries: Vec::new(),
        })?;
        self.hard_written = hs.clone();
        self.hard = hs;
        self.conf = meta.get_conf_state().clone();
        self.snap = m;
        self.log.clear();
        self.last = meta.index;
        Ok(())
    }

    /// The state machine's applied index and term, as last persisted.
    pub fn applied(&self) -> Result<(u64, u64), FedError> {
        match self.db.get(K_APPLIED)? {
            Some(b) => decode_applied(&b).ok_or_else(|| self.db.damaged("applied index")),
            None => Ok((self.snap.index, self.snap.term)),
        }
    }

    #[cfg(test)]
    pub(crate) fn fail_next_write(&self) {
        self.fail_next_write.set(true);
    }
}

/// Moves a format-1 log (entries and hard state in sled) into a log
/// segment, then drops it from sled and records format 2. Run again from
/// the start if interrupted: sled keeps the old log until the segment is
/// durable.
fn migrate(db: &Db, wal_dir: &Path) -> Result<(), FedError> {
    let snap: SnapshotMetadata = match db.get(K_SNAP)? {
        Some(b) => decode("snapshot metadata", &b).map_err(|e| db.damaged(e.to_string()))?,
        None => SnapshotMetadata::default(),
    };
    let hard: HardState = match db.get(K_HARD)? {
        Some(b) => decode("hard state", &b).map_err(|e| db.damaged(e.to_string()))?,
        None => HardState::default(),
    };
    // Walk the whole log once: a hole, a misplaced entry or an entry that
    // does not decode would make Raft serve wrong data later.
    let mut entries = Vec::new();
    let mut last = snap.index;
    let mut batch = sled::Batch::default();
    for item in db.tree.scan_prefix(ENTRY_PREFIX) {
        let (k, v) = item.map_err(FedError::db(&db.path))?;
        let idx =
            entry_index(&k).ok_or_else(|| db.damaged(format!("log key {k:?} has no index")))?;
        if idx != last + 1 {
            return Err(db.damaged(format!(
                "log entry {idx} follows {last}: entries {}..{idx} are missing",
                last + 1
            )));
        }
        let e: Entry = decode("log entry", &v).map_err(|e| db.damaged(e.to_string()))?;
        if e.index != idx {
            return Err(db.damaged(format!("log key {idx} holds entry {}", e.index)));
        }
        last = idx;
        entries.push(e);
        batch.remove(k);
    }
    Wal::create(
        wal_dir,
        &wal::Log {
            start: (snap.index, snap.term),
            hard,
            entries,
        },
    )?;
    batch.remove(K_HARD);
    batch.insert(K_VERSION, FORMAT_VERSION);
    db.write(batch)?;
    tracing::info!(path = %db.path.display(), entries = last - snap.index, "moved the raft log out of sled into a write-ahead file (format 1 to 2)");
    Ok(())
}

pub(crate) fn encode_applied(index: u64, term: u64) -> Vec<u8> {
    let mut v = index.to_be_bytes().to_vec();
    v.extend_from_slice(&term.to_be_bytes());
    v
}

pub(crate) fn decode_applied(b: &[u8]) -> Option<(u64, u64)> {
    let i: [u8; 8] = b.get(..8)?.try_into().ok()?;
    let t: [u8; 8] = b.get(8..16)?.try_into().ok()?;
    Some((u64::from_be_bytes(i), u64::from_be_bytes(t)))
}

/// Snapshot data: every state-machine key and value, each length-prefixed
/// (u32 big-endian), back to back.
fn encode_snapshot_data(db: &Db) -> Result<Vec<u8>, FedError> {
    let mut out = Vec::new();
    for item in db.scan_prefix(STATE_PREFIX) {
        let (k, v) = item?;
        for part in [&k, &v] {
            let len = u32::try_from(part.len()).map_err(|_| FedError::Decode {
                what: "snapshot",
                reason: "a value is larger than 4 GiB".into(),
            })?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(part);
        }
    }
    Ok(out)
}

type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

fn decode_snapshot_data(mut data: &[u8]) -> Result<Pairs, FedError> {
    let bad = |r: &str| FedError::Decode {
        what: "snapshot",
        reason: r.to_string(),
    };
    let take = |data: &mut &[u8]| -> Result<Vec<u8>, FedError> {
        let len: [u8; 4] = data
            .get(..4)
            .ok_or_else(|| bad("truncated length"))?
            .try_into()
            .map_err(|_| bad("truncated length"))?;
        let len = u32::from_be_bytes(len) as usize;
        let v = data
            .get(4..4 + len)
            .ok_or_else(|| bad("truncated value"))?
            .to_vec();
        *data = &data[4 + len..];
        Ok(v)
    };
    let mut pairs = Vec::new();
    while !data.is_empty() {
        let k = take(&mut data)?;
        let v = take(&mut data)?;
        pairs.push((k, v));
    }
    Ok(pairs)
}

impl raft::Storage for RaftStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState {
            hard_state: self.hard.clone(),
            conf_state: self.conf.clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let max = max_size.into().unwrap_or(u64::MAX);
        let from = (low - self.first()) as usize;
        let mut out = Vec::new();
        let mut size = 0u64;
        for e in self.log.range(from..(high - self.first()) as usize) {
            size += u64::from(e.compute_size());
            // raft-rs wants at least one entry even when it exceeds the limit.
            if !out.is_empty() && size > max {
                break;
            }
            out.push(e.clone());
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.snap.index {
            return Ok(self.snap.term);
        }
        if idx < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.log[(idx - self.first()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last)
    }

    /// A snapshot of the state machine as applied now. The Ready loop owns
    /// both this storage and the state machine, so nothing changes while it
    /// is being read.
    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let (applied, term) = self.applied().map_err(store_err)?;
        if applied < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let mut snap = Snapshot::default();
        snap.data = encode_snapshot_data(&self.db).map_err(store_err)?.into();
        let meta = snap.mut_metadata();
        meta.index = applied;
        meta.term = term;
        meta.set_conf_state(self.conf.clone());
        Ok(snap)
    }
}

#[cfg(test)]
mod tests;
