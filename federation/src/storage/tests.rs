use raft::Storage as _;
use raft::eraftpb::{Entry, HardState};

use super::*;

fn entry(index: u64, term: u64) -> Entry {
    let mut e = Entry::default();
    e.index = index;
    e.term = term;
    e.data = format!("e{index}").into_bytes().into();
    e
}

fn open(dir: &Path) -> RaftStorage {
    RaftStorage::open(Db::open(dir).expect("open db")).expect("open storage")
}

#[test]
fn entries_and_hard_state_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = open(dir.path());
        s.append(&[entry(1, 1), entry(2, 1), entry(3, 2)]).unwrap();
        let mut hs = HardState::default();
        hs.term = 2;
        hs.vote = 7;
        hs.commit = 2;
        s.set_hard_state(hs).unwrap();
    }
    let s = open(dir.path());
    assert_eq!(s.first_index().unwrap(), 1);
    assert_eq!(s.last_index().unwrap(), 3);
    assert_eq!(s.term(3).unwrap(), 2);
    let st = s.initial_state().unwrap();
    assert_eq!(
        (st.hard_state.term, st.hard_state.vote, st.hard_state.commit),
        (2, 7, 2)
    );
    let got = s
        .entries(1, 4, None, GetEntriesContext::empty(false))
        .unwrap();
    assert_eq!(
        got.iter().map(|e| e.index).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(&got[2].data[..], b"e3");
}

#[test]
fn append_replaces_a_conflicting_tail() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    s.append(&[entry(1, 1), entry(2, 1), entry(3, 1), entry(4, 1)])
        .unwrap();
    s.append(&[entry(3, 2)]).unwrap();
    assert_eq!(s.last_index().unwrap(), 3);
    assert_eq!(s.term(3).unwrap(), 2);
    drop(s);
    // The overwritten entry 4 must not reappear after a restart.
    let s = open(dir.path());
    assert_eq!(s.last_index().unwrap(), 3);
}

#[test]
fn max_size_limits_entries_but_returns_at_least_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    s.append(&[entry(1, 1), entry(2, 1), entry(3, 1)]).unwrap();
    let got = s.entries(1, 4, 1, GetEntriesContext::empty(false)).unwrap();
    assert_eq!(got.len(), 1);
}

#[test]
fn compaction_moves_the_first_index_and_keeps_the_term() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    s.append(&[entry(1, 1), entry(2, 1), entry(3, 2), entry(4, 2)])
        .unwrap();
    s.compact(3, 3).unwrap();
    assert_eq!(s.first_index().unwrap(), 4);
    assert_eq!(s.term(3).unwrap(), 2);
    assert!(matches!(
        s.entries(2, 4, None, GetEntriesContext::empty(false)),
        Err(raft::Error::Store(StorageError::Compacted))
    ));
    assert!(
        s.compact(4, 3).is_err(),
        "compaction past applied must be refused"
    );
    drop(s);
    let s = open(dir.path());
    assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (4, 4));
}

#[test]
fn a_failed_write_leaves_the_node_state_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    s.append(&[entry(1, 1), entry(2, 1)]).unwrap();

    // A write the storage refuses on its own (a hole in the log).
    let err = s.append(&[entry(5, 1)]).unwrap_err();
    assert!(err.to_string().contains("hole"), "{err}");
    assert_eq!(s.last_index().unwrap(), 2);

    // A write that fails in the database: the in-memory view must not move.
    s.fail_next_write();
    assert!(s.append(&[entry(2, 3), entry(3, 3)]).is_err());
    assert_eq!(s.last_index().unwrap(), 2);
    assert_eq!(s.term(2).unwrap(), 1);

    s.fail_next_write();
    let mut hs = HardState::default();
    hs.term = 9;
    assert!(s.set_hard_state(hs).is_err());
    assert_eq!(s.initial_state().unwrap().hard_state.term, 0);

    s.fail_next_write();
    assert!(s.compact(1, 2).is_err());
    assert_eq!(s.first_index().unwrap(), 1);

    // And the disk agrees with memory.
    drop(s);
    let s = open(dir.path());
    assert_eq!((s.last_index().unwrap(), s.term(2).unwrap()), (2, 1));
}

#[test]
fn a_hole_in_the_log_on_disk_is_reported_not_truncated() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = open(dir.path());
        s.append(&[entry(1, 1), entry(2, 1), entry(3, 1)]).unwrap();
        // Damage the directory behind the storage's back.
        let mut b = sled::Batch::default();
        b.remove(entry_key(2));
        s.db().write(b).unwrap();
    }
    let err = RaftStorage::open(Db::open(dir.path()).unwrap())
        .err()
        .expect("a hole must be reported");
    let msg = err.to_string();
    assert!(msg.contains("damaged") && msg.contains("missing"), "{msg}");
    // Reporting did not repair anything: entry 3 is still there.
    let db = Db::open(dir.path()).unwrap();
    assert!(db.get(&entry_key(3)).unwrap().is_some());
}

#[test]
fn a_commit_index_past_the_log_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = open(dir.path());
        s.append(&[entry(1, 1)]).unwrap();
        let mut hs = HardState::default();
        hs.commit = 5;
        s.set_hard_state(hs).unwrap();
    }
    let err = RaftStorage::open(Db::open(dir.path()).unwrap())
        .err()
        .unwrap();
    assert!(err.to_string().contains("committed"), "{err}");
}

#[test]
fn snapshot_round_trips_the_state_machine() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let mut src = open(a.path());
    src.append(&[entry(1, 1), entry(2, 1)]).unwrap();
    let mut batch = sled::Batch::default();
    batch.insert(b"s/z/east".to_vec(), b"{}".to_vec());
    batch.insert(K_APPLIED, encode_applied(2, 1));
    src.db().write(batch).unwrap();
    let snap = src.snapshot(2, 9).unwrap();
    assert_eq!(snap.get_metadata().index, 2);
    assert!(matches!(
        src.snapshot(3, 9),
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable
        ))
    ));

    let mut dst = open(b.path());
    dst.append(&[entry(1, 1)]).unwrap();
    let mut stale = sled::Batch::default();
    stale.insert(b"s/z/gone".to_vec(), b"{}".to_vec());
    dst.db().write(stale).unwrap();
    dst.apply_snapshot(&snap).unwrap();
    assert_eq!(dst.first_index().unwrap(), 3);
    assert_eq!(dst.last_index().unwrap(), 2);
    assert_eq!(dst.applied().unwrap(), (2, 1));
    assert!(dst.db().get(b"s/z/east").unwrap().is_some());
    assert!(dst.db().get(b"s/z/gone").unwrap().is_none());
    drop(dst);
    open(b.path());
}

#[test]
fn a_new_data_directory_is_private() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    open(&data);
    let mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
}
