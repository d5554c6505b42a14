//! The Raft log on disk: a write-ahead file of entries and hard state,
//! appended once per Ready and made durable with one `fdatasync`.
//!
//! The log used to live in sled beside the state machine. Every append
//! then went through sled's page cache (a copy-on-write node per change)
//! and its flush: about 6 disk operations and 7.7 KB per write on each
//! server, against 2.4 and 1.5 KB for etcd's own WAL
//! (`/proc/diskstats` during `cargo bench --bench store`), and the
//! allocator and sled's IO threads were most of a server's CPU. A log is
//! written in order and read from memory, so it needs none of a tree.
//!
//! Layout: `wal/<seq>.wal` in the data directory. One segment is live.
//! It opens with a *start* frame that says where the log starts (the
//! compaction or snapshot point, index and term), the hard state and every
//! live entry, so the newest segment alone holds the whole log. Frames
//! follow, one per append: `[len u32 LE][crc32 u32 LE][body]`. A new
//! segment (at start-up, after a snapshot install, when compaction finds
//! the live one large) is written as `.tmp`, synced, renamed and the
//! directory synced; only then are older segments removed.
//!
//! Segments are preallocated a few MiB ahead of the last frame, so an
//! append rarely changes the file's size (each change is one more metadata
//! write for `fdatasync`), and an idle server holds little unused disk
//! (tests run dozens of servers on CI disks of a few GB). After a
//! crash, a last frame that does not check out (torn: cut short or a bad
//! checksum, with only zeros after it) is the append that was never
//! acknowledged and is dropped; a bad frame with data after it is damage,
//! and is reported, never truncated.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt as _, FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::eraftpb::{Entry, HardState};

use crate::error::FedError;

/// Bytes preallocated past the end at a time.
const PREALLOCATE: u64 = 4 * 1024 * 1024;
/// A segment larger than this is replaced by a fresh one at the next
/// compaction (which makes most of it dead).
pub(crate) const ROTATE_BYTES: u64 = 32 * 1024 * 1024;
const FRAME_HEADER: usize = 8;
const KIND_START: u8 = 1;
const KIND_APPEND: u8 = 2;
/// Largest frame read back: a batch of raft-rs entries is far smaller, and
/// a length beyond this is damage, not a frame.
const MAX_FRAME: usize = 1 << 30;

/// The log as a segment replays it.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Log {
    /// Index and term the log starts after.
    pub start: (u64, u64),
    /// The last hard state written.
    pub hard: HardState,
    /// Entries `start.0 + 1 ..`, in order.
    pub entries: Vec<Entry>,
}

impl Log {
    fn last(&self) -> u64 {
        self.entries.last().map_or(self.start.0, |e| e.index)
    }

    /// Adds appended entries: they replace any from their first index on.
    fn append(&mut self, entries: Vec<Entry>) -> Result<(), String> {
        let Some(first) = entries.first().map(|e| e.index) else {
            return Ok(());
        };
        if first <= self.start.0 || first > self.last() + 1 {
            return Err(format!(
                "an append starts at entry {first}, outside {}..={}",
                self.start.0 + 1,
                self.last() + 1
            ));
        }
        self.entries.truncate((first - self.start.0 - 1) as usize);
        for e in entries {
            if e.index != self.last() + 1 {
                return Err(format!("entry {} follows {}", e.index, self.last()));
            }
            self.entries.push(e);
        }
        Ok(())
    }
}

/// The live segment, open for appending.
pub(crate) struct Wal {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    /// Where the next frame goes.
    end: u64,
    /// Bytes preallocated (zeros) from the start of the file.
    allocated: u64,
    buf: Vec<u8>,
}

impl Wal {
    /// Replays the newest segment in `dir` (`None`: there is none) and
    /// opens it for appending. Older segments left by a crash during a
    /// replacement are removed.
    pub(crate) fn open(dir: &Path) -> Result<Option<(Self, Log)>, FedError> {
        let Some((seq, older)) = segments(dir)? else {
            return Ok(None);
        };
        let path = segment_path(dir, seq);
        let data = fs::read(&path).map_err(io(&path))?;
        let (log, end) = replay(&data).map_err(|reason| damaged(&path, reason))?;
        for s in older {
            remove(&segment_path(dir, s))?;
        }
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        // What a dropped append left is zeroed, so a shorter frame written
        // over it is not followed by stale bytes; and what a kill left in
        // the page cache unsynced is synced before Raft counts it persisted.
        if let Some(last) = data[end..].iter().rposition(|b| *b != 0) {
            file.write_all_at(&vec![0; last + 1], end as u64)
                .map_err(io(&path))?;
        }
        file.sync_data().map_err(io(&path))?;
        let allocated = data.len() as u64;
        Ok(Some((
            Self {
                dir: dir.to_path_buf(),
                path,
                file,
                end: end as u64,
                allocated,
                buf: Vec::new(),
            },
            log,
        )))
    }

    /// Writes `log` as a new segment, durable on return, and removes the
    /// older ones.
    pub(crate) fn create(dir: &Path, log: &Log) -> Result<Self, FedError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
        let seq = segments(dir)?.map_or(0, |(newest, _)| newest) + 1;
        let path = segment_path(dir, seq);
        let tmp = path.with_extension("tmp");
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp))?;
        let mut buf = Vec::new();
        frame(
            &mut buf,
            KIND_START,
            Some(log.start),
            Some(&log.hard),
            &log.entries,
        )?;
        let allocated = preallocate(&file, &tmp, 0, buf.len() as u64)?;
        file.write_all_at(&buf, 0).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, &path).map_err(io(&path))?;
        sync_dir(dir)?;
        // A new `wal/` must outlive a power loss as well.
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        // The new segment is live from here: a segment that cannot be
        // removed is only a warning (the next start removes it).
        if let Ok(Some((_, older))) = segments(dir) {
            for s in older.into_iter().filter(|s| *s < seq) {
                if let Err(e) = remove(&segment_path(dir, s)) {
                    tracing::warn!(error = %e, "could not remove an old log segment");
                }
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            path,
            file,
            end: buf.len() as u64,
            allocated,
            buf: Vec::new(),
        })
    }

    /// Replaces the live segment with one that holds exactly `log`.
    pub(crate) fn rotate(&mut self, log: &Log) -> Result<(), FedError> {
        *self = Self::create(&self.dir, log)?;
        Ok(())
    }

    /// Appends `hard` (if any) and `entries` as one frame; with `sync`,
    /// durable on return. A failed append leaves the segment's end where it
    /// was: the next append overwrites whatever part of it reached the file.
    pub(crate) fn append(
        &mut self,
        hard: Option<&HardState>,
        entries: &[Entry],
        sync: bool,
    ) -> Result<(), FedError> {
        let path = &self.path;
        self.buf.clear();
        frame(&mut self.buf, KIND_APPEND, None, hard, entries)?;
        let need = self.end + self.buf.len() as u64;
        if need > self.allocated {
            self.allocated = preallocate(&self.file, path, self.allocated, need)?;
        }
        self.file
            .write_all_at(&self.buf, self.end)
            .map_err(io(path))?;
        if sync {
            self.file.sync_data().map_err(io(path))?;
        }
        self.end += self.buf.len() as u64;
        Ok(())
    }

    /// Bytes written to the live segment.
    pub(crate) fn len(&self) -> u64 {
        self.end
    }
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016}.wal"))
}

/// The newest segment's number and the others', or `None`.
fn segments(dir: &Path) -> Result<Option<(u64, Vec<u64>)>, FedError> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(dir)(e)),
    };
    let mut seqs = Vec::new();
    for item in rd {
        let item = item.map_err(io(dir))?;
        let name = item.file_name();
        let name = name.to_string_lossy();
        if let Some(n) = name
            .strip_suffix(".wal")
            .and_then(|n| n.parse::<u64>().ok())
        {
            seqs.push(n);
        } else if name.ends_with(".tmp") {
            // A replacement that did not finish: never renamed, never used.
            remove(&item.path())?;
        }
    }
    seqs.sort_unstable();
    Ok(seqs.pop().map(|newest| (newest, seqs)))
}

/// Allocates zeros from `from` to past `need`, [`PREALLOCATE`] at a time;
/// the new allocated length.
fn preallocate(file: &File, path: &Path, from: u64, need: u64) -> Result<u64, FedError> {
    use nix::fcntl::{FallocateFlags, fallocate};
    let to = need.div_ceil(PREALLOCATE).max(1) * PREALLOCATE;
    match fallocate(
        file,
        FallocateFlags::empty(),
        from as i64,
        (to - from) as i64,
    ) {
        Ok(()) => Ok(to),
        // A file system without fallocate: appends extend the file instead.
        Err(nix::errno::Errno::EOPNOTSUPP) => Ok(to),
        Err(e) => Err(io(path)(std::io::Error::from(e))),
    }
}

fn sync_dir(dir: &Path) -> Result<(), FedError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

fn remove(path: &Path) -> Result<(), FedError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(path)(e)),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FedError + '_ {
    move |e| FedError::LogWrite(format!("{}: {e}", path.display()))
}

fn damaged(path: &Path, reason: String) -> FedError {
    FedError::Damaged {
        path: path.to_path_buf(),
        reason,
    }
}

/// Encodes one frame onto `out`. Body: kind, then for a start frame the
/// start index and term (u64 LE each), a hard-state flag with the state
/// (u32 LE length, protobuf), the entry count (u32 LE) and each entry
/// (u32 LE length, protobuf).
fn frame(
    out: &mut Vec<u8>,
    kind: u8,
    start: Option<(u64, u64)>,
    hard: Option<&HardState>,
    entries: &[Entry],
) -> Result<(), FedError> {
    let at = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER]);
    out.push(kind);
    if let Some((index, term)) = start {
        out.extend_from_slice(&index.to_le_bytes());
        out.extend_from_slice(&term.to_le_bytes());
    }
    fn put(out: &mut Vec<u8>, m: &impl protobuf::Message) -> Result<(), FedError> {
        let bytes = m
            .write_to_bytes()
            .map_err(|e| FedError::LogWrite(format!("encoding a log record: {e}")))?;
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(&bytes);
        Ok(())
    }
    match hard {
        Some(hs) => {
            out.push(1);
            put(out, hs)?;
        }
        None => out.push(0),
    }
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        put(out, e)?;
    }
    let body = &out[at + FRAME_HEADER..];
    if body.len() > MAX_FRAME {
        return Err(FedError::LogWrite(format!(
            "a log append of {} bytes is larger than {MAX_FRAME}",
            body.len()
        )));
    }
    let len = (body.len() as u32).to_le_bytes();
    let crc = crc32fast::hash(body).to_le_bytes();
    out[at..at + 4].copy_from_slice(&len);
    out[at + 4..at + 8].copy_from_slice(&crc);
    Ok(())
}

/// The log a segment holds and where its last good frame ends.
fn replay(data: &[u8]) -> Result<(Log, usize), String> {
    let mut log: Option<Log> = None;
    let mut at = 0;
    loop {
        let rest = &data[at..];
        let header = rest.get(..FRAME_HEADER).filter(|h| *h != [0; FRAME_HEADER]);
        let body = header.and_then(|h| {
            let len = u32::from_le_bytes(h[..4].try_into().unwrap_or_default()) as usize;
            let crc = u32::from_le_bytes(h[4..8].try_into().unwrap_or_default());
            rest.get(FRAME_HEADER..FRAME_HEADER + len)
                .filter(|b| len <= MAX_FRAME && crc32fast::hash(b) == crc)
        });
        let Some(body) = body else {
            if rest.iter().all(|b| *b == 0) {
                // The end: preallocated zeros, or the file's end.
                break;
            }
            // The last append, cut short: its pages may have reached the
            // disk in any order (a zero header before written data). Only a
            // whole frame after it would mean that this one was damaged.
            if let Some(next) = whole_frame_after(rest) {
                return Err(format!(
                    "the log frame at offset {at} does not check out, and a whole frame follows at offset {}",
                    at + next
                ));
            }
            tracing::warn!(
                offset = at,
                "dropping a log append cut short by a crash (it was never acknowledged)"
            );
            break;
        };
        let len = body.len();
        let (kind, start, hard, entries) =
            parse(body).map_err(|r| format!("the log frame at offset {at}: {r}"))?;
        match (kind, log.as_mut()) {
            (KIND_START, None) => {
                let (index, term) = start.unwrap_or_default();
                let mut l = Log {
                    start: (index, term),
                    hard: hard.unwrap_or_default(),
                    entries: Vec::new(),
                };
                l.append(entries)
                    .map_err(|r| format!("the start frame: {r}"))?;
                log = Some(l);
            }
            (KIND_APPEND, Some(l)) => {
                if let Some(hs) = hard {
                    l.hard = hs;
                }
                l.append(entries)
                    .map_err(|r| format!("the log frame at offset {at}: {r}"))?;
            }
            (KIND_START, Some(_)) => return Err(format!("a second start frame at offset {at}")),
            (k, _) => return Err(format!("frame kind {k} at offset {at} is out of place")),
        }
        at += FRAME_HEADER + len;
    }
    let log = log.ok_or_else(|| "the segment has no start frame".to_string())?;
    Ok((log, at))
}

/// The offset of the first whole frame (length and checksum good) after
/// the start of `rest`, if any. Slow, and only run after a crash.
fn whole_frame_after(rest: &[u8]) -> Option<usize> {
    (1..rest.len().saturating_sub(FRAME_HEADER)).find(|&off| {
        let h = &rest[off..off + FRAME_HEADER];
        let len = u32::from_le_bytes(h[..4].try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(h[4..8].try_into().unwrap_or_default());
        len > 0
            && len <= MAX_FRAME
            && rest
                .get(off + FRAME_HEADER..off + FRAME_HEADER + len)
                .is_some_and(|b| crc32fast::hash(b) == crc)
    })
}

type Parsed = (u8, Option<(u64, u64)>, Option<HardState>, Vec<Entry>);

fn parse(mut b: &[u8]) -> Result<Parsed, String> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
        let (head, tail) = b
            .split_at_checked(n)
            .ok_or_else(|| "cut short".to_string())?;
        *b = tail;
        Ok(head)
    }
    fn u32_of(b: &mut &[u8]) -> Result<usize, String> {
        Ok(u32::from_le_bytes(take(b, 4)?.try_into().map_err(|_| "cut short")?) as usize)
    }
    fn u64_of(b: &mut &[u8]) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            take(b, 8)?.try_into().map_err(|_| "cut short")?,
        ))
    }
    let kind = take(&mut b, 1)?[0];
    let start = if kind == KIND_START {
        Some((u64_of(&mut b)?, u64_of(&mut b)?))
    } else {
        None
    };
    let hard = match take(&mut b, 1)?[0] {
        0 => None,
        _ => {
            let n = u32_of(&mut b)?;
            Some(
                HardState::parse_from_bytes(take(&mut b, n)?)
                    .map_err(|e| format!("hard state: {e}"))?,
            )
        }
    };
    let count = u32_of(&mut b)?;
    let mut entries = Vec::with_capacity(count.min(4096));
    for _ in 0..count {
        let n = u32_of(&mut b)?;
        entries.push(Entry::parse_from_bytes(take(&mut b, n)?).map_err(|e| format!("entry: {e}"))?);
    }
    if !b.is_empty() {
        return Err(format!("{} bytes after the last entry", b.len()));
    }
    Ok((kind, start, hard, entries))
}

#[cfg(test)]
mod tests;
