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

/// A data directory as format 1 wrote it: the log and hard state in sled.
fn format_1(dir: &Path, entries: &[Entry], hs: &HardState) {
    let db = Db::open(dir).unwrap();
    let mut b = sled::Batch::default();
    b.insert(K_VERSION, FORMAT_SLED_LOG);
    b.insert(K_HARD, encode(hs));
    for e in entries {
        b.insert(entry_key(e.index), encode(e));
    }
    b.insert(b"s/z/east".to_vec(), b"{}".to_vec());
    db.write(b).unwrap();
}

#[test]
fn a_format_1_log_moves_out_of_sled_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut hs = HardState::default();
    hs.term = 2;
    hs.vote = 3;
    hs.commit = 2;
    format_1(dir.path(), &[entry(1, 1), entry(2, 2), entry(3, 2)], &hs);
    for _ in 0..2 {
        let s = open(dir.path());
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (1, 3));
        assert_eq!(s.term(2).unwrap(), 2);
        let st = s.initial_state().unwrap().hard_state;
        assert_eq!((st.term, st.vote, st.commit), (2, 3, 2));
        let got = s
            .entries(3, 4, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(&got[0].data[..], b"e3");
        // Gone from sled; the state machine stays.
        assert!(s.db().get(&entry_key(1)).unwrap().is_none());
        assert!(s.db().get(K_HARD).unwrap().is_none());
        assert_eq!(&s.db().get(K_VERSION).unwrap().unwrap()[..], FORMAT_VERSION);
        assert!(s.db().get(b"s/z/east").unwrap().is_some());
    }
}

#[test]
fn a_hole_in_a_format_1_log_is_reported_not_moved() {
    let dir = tempfile::tempdir().unwrap();
    format_1(
        dir.path(),
        &[entry(1, 1), entry(3, 1)],
        &HardState::default(),
    );
    let err = RaftStorage::open(Db::open(dir.path()).unwrap())
        .err()
        .expect("a hole must be reported");
    let msg = err.to_string();
    assert!(msg.contains("damaged") && msg.contains("missing"), "{msg}");
    // Reporting did not repair or move anything: entry 3 is still there.
    let db = Db::open(dir.path()).unwrap();
    assert!(db.get(&entry_key(3)).unwrap().is_some());
    assert_eq!(&db.get(K_VERSION).unwrap().unwrap()[..], FORMAT_SLED_LOG);
}

#[test]
fn a_missing_log_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = open(dir.path());
        s.append(&[entry(1, 1)]).unwrap();
    }
    std::fs::remove_dir_all(dir.path().join("wal")).unwrap();
    let err = RaftStorage::open(Db::open(dir.path()).unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("raft log") && err.contains("missing"), "{err}");
}

#[test]
fn a_snapshot_install_cut_off_before_the_log_was_replaced() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = open(dir.path());
        // An old tail from a deposed leader, never committed here.
        s.append(&[entry(1, 1), entry(2, 1), entry(3, 1)]).unwrap();
        // What apply_snapshot writes to sled before it replaces the log.
        let mut meta = SnapshotMetadata::default();
        meta.index = 10;
        meta.term = 4;
        let mut b = sled::Batch::default();
        b.insert(K_SNAP, encode(&meta));
        b.insert(K_APPLIED, encode_applied(10, 4));
        b.insert(K_RESET, encode_applied(10, 4));
        s.db().write(b).unwrap();
    }
    let mut s = open(dir.path());
    assert_eq!(
        (s.first_index().unwrap(), s.last_index().unwrap()),
        (11, 10)
    );
    assert_eq!(s.term(10).unwrap(), 4);
    let st = s.initial_state().unwrap().hard_state;
    assert!(st.commit >= 10 && st.term >= 4, "{st:?}");
    // The log was replaced at start-up: what is appended after the
    // snapshot survives the next restart.
    s.append(&[entry(11, 4), entry(12, 4)]).unwrap();
    drop(s);
    let s = open(dir.path());
    assert_eq!(
        (s.first_index().unwrap(), s.last_index().unwrap()),
        (11, 12)
    );
    assert_eq!(s.term(12).unwrap(), 4);
}

#[test]
fn a_bootstrap_cut_off_before_the_log_took_its_hard_state() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(dir.path());
        // What bootstrap writes to sled before it replaces the log.
        let mut meta = SnapshotMetadata::default();
        meta.index = 1;
        meta.term = 1;
        meta.mut_conf_state().voters = vec![7];
        let mut b = sled::Batch::default();
        b.insert(K_CONF, encode(meta.get_conf_state()));
        b.insert(K_SNAP, encode(&meta));
        b.insert(K_APPLIED, encode_applied(1, 1));
        s.db().write(b).unwrap();
    }
    for _ in 0..2 {
        let s = open(dir.path());
        let st = s.initial_state().unwrap();
        assert_eq!((st.hard_state.term, st.hard_state.commit), (1, 1));
        assert_eq!(st.conf_state.voters, vec![7]);
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (2, 1));
    }
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

#[test]
fn applied_writes_are_read_before_a_checkpoint_and_land_whole_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path()).unwrap();
    let mut b = sled::Batch::default();
    for k in ["s/a", "s/b", "s/c", "s/d"] {
        b.insert(k.as_bytes(), b"old".to_vec());
    }
    b.insert(K_APPLIED, encode_applied(5, 1));
    db.write(b).unwrap();
    let mut w = Writes::new();
    w.insert(b"s/b".to_vec(), None);
    w.insert(b"s/c".to_vec(), Some(b"new".to_vec()));
    w.insert(b"s/bb".to_vec(), Some(b"added".to_vec()));
    w.insert(b"s/e".to_vec(), Some(b"added".to_vec()));
    w.insert(K_APPLIED.to_vec(), Some(encode_applied(6, 1)));
    db.write_applied(w).unwrap();
    let read = |db: &Db| -> Vec<(String, String)> {
        db.scan_prefix(b"s/")
            .map(|r| {
                let (k, v) = r.unwrap();
                (
                    String::from_utf8_lossy(&k).into_owned(),
                    String::from_utf8_lossy(&v).into_owned(),
                )
            })
            .filter(|(k, _)| k != "s/_applied")
            .collect()
    };
    let want: Vec<(String, String)> = [
        ("s/a", "old"),
        ("s/bb", "added"),
        ("s/c", "new"),
        ("s/d", "old"),
        ("s/e", "added"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(read(&db), want);
    assert!(db.get(b"s/b").unwrap().is_none());
    assert_eq!(&db.get(b"s/c").unwrap().unwrap()[..], b"new");
    let from_c: Vec<_> = db
        .range_from(b"s/c", b"s/")
        .map(|r| r.unwrap().0.to_vec())
        .collect();
    assert_eq!(
        from_c,
        vec![b"s/c".to_vec(), b"s/d".to_vec(), b"s/e".to_vec()]
    );
    // Not in sled yet: a crash now keeps the state of index 5, whole.
    assert_eq!(
        decode_applied(&db.tree.get(K_APPLIED).unwrap().unwrap()),
        Some((5, 1))
    );
    assert_eq!(&db.tree.get(b"s/c").unwrap().unwrap()[..], b"old");
    db.checkpoint().unwrap();
    assert!(db.pending().is_empty());
    assert_eq!(read(&db), want);
    assert_eq!(
        decode_applied(&db.tree.get(K_APPLIED).unwrap().unwrap()),
        Some((6, 1))
    );
    assert!(db.tree.get(b"s/b").unwrap().is_none());
}
