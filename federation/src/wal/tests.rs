use raft::eraftpb::{Entry, HardState};

use super::*;

fn entry(index: u64, term: u64) -> Entry {
    let mut e = Entry::default();
    e.index = index;
    e.term = term;
    e.data = format!("e{index}t{term}").into_bytes().into();
    e
}

fn hs(term: u64, vote: u64, commit: u64) -> HardState {
    let mut h = HardState::default();
    h.term = term;
    h.vote = vote;
    h.commit = commit;
    h
}

fn indexes(log: &Log) -> Vec<(u64, u64)> {
    log.entries.iter().map(|e| (e.index, e.term)).collect()
}

fn only_segment(dir: &Path) -> PathBuf {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files.pop().unwrap()
}

#[test]
fn appends_replay_with_overwritten_tails_and_the_last_hard_state() {
    let dir = tempfile::tempdir().unwrap();
    let start = Log {
        start: (5, 2),
        hard: hs(2, 1, 5),
        entries: vec![entry(6, 2)],
    };
    let mut w = Wal::create(dir.path(), &start).unwrap();
    w.append(None, &[entry(7, 2), entry(8, 2), entry(9, 2)], true)
        .unwrap();
    // A new leader overwrites the uncommitted tail from 8 on.
    w.append(Some(&hs(3, 2, 7)), &[entry(8, 3)], true).unwrap();
    w.append(Some(&hs(3, 2, 8)), &[], false).unwrap();
    drop(w);
    let (w, log) = Wal::open(dir.path()).unwrap().unwrap();
    assert_eq!(log.start, (5, 2));
    assert_eq!(indexes(&log), vec![(6, 2), (7, 2), (8, 3)]);
    assert_eq!(log.hard, hs(3, 2, 8));
    assert_eq!(&log.entries[2].data[..], b"e8t3");
    // Preallocated: the file is larger than what was written.
    let path = only_segment(dir.path());
    assert_eq!(fs::metadata(&path).unwrap().len(), PREALLOCATE);
    assert!(w.len() < 4096);
}

#[test]
fn an_append_cut_short_by_a_crash_is_dropped_and_the_next_one_lands() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = Wal::create(dir.path(), &Log::default()).unwrap();
    w.append(None, &[entry(1, 1), entry(2, 1)], true).unwrap();
    let good = w.len();
    w.append(None, &[entry(3, 1), entry(4, 1)], true).unwrap();
    let end = w.len();
    drop(w);
    // The crash: only part of the last frame reached the disk.
    let path = only_segment(dir.path());
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    let cut = good + (end - good) / 2;
    f.write_all_at(&vec![0; (end - cut) as usize], cut).unwrap();
    drop(f);
    let (mut w, log) = Wal::open(dir.path()).unwrap().unwrap();
    assert_eq!(indexes(&log), vec![(1, 1), (2, 1)]);
    assert_eq!(w.len(), good);
    // The next append goes where the torn one was.
    w.append(None, &[entry(3, 2)], true).unwrap();
    drop(w);
    let (_, log) = Wal::open(dir.path()).unwrap().unwrap();
    assert_eq!(indexes(&log), vec![(1, 1), (2, 1), (3, 2)]);
}

#[test]
fn a_damaged_frame_with_data_after_it_is_reported_not_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = Wal::create(dir.path(), &Log::default()).unwrap();
    let at = w.len();
    w.append(None, &[entry(1, 1)], true).unwrap();
    w.append(None, &[entry(2, 1)], true).unwrap();
    drop(w);
    let path = only_segment(dir.path());
    let mut data = fs::read(&path).unwrap();
    data[at as usize + FRAME_HEADER + 3] ^= 0xff;
    fs::write(&path, &data).unwrap();
    let err = Wal::open(dir.path())
        .err()
        .expect("damage must be reported");
    let msg = err.to_string();
    assert!(
        msg.contains("does not check out, and a whole frame follows"),
        "{msg}"
    );
    // Reporting changed nothing.
    assert_eq!(fs::read(&path).unwrap(), data);
}

#[test]
fn a_new_segment_replaces_the_old_and_leftovers_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = Wal::create(dir.path(), &Log::default()).unwrap();
    w.append(None, &[entry(1, 1), entry(2, 1), entry(3, 1)], true)
        .unwrap();
    w.rotate(&Log {
        start: (2, 1),
        hard: hs(1, 0, 2),
        entries: vec![entry(3, 1)],
    })
    .unwrap();
    w.append(None, &[entry(4, 1)], true).unwrap();
    drop(w);
    // A replacement interrupted before its rename.
    fs::write(dir.path().join("0000000000000009.tmp"), b"partial").unwrap();
    let (_, log) = Wal::open(dir.path()).unwrap().unwrap();
    assert_eq!(log.start, (2, 1));
    assert_eq!(indexes(&log), vec![(3, 1), (4, 1)]);
    assert_eq!(
        only_segment(dir.path()).file_name().unwrap(),
        "0000000000000002.wal"
    );
}

#[test]
fn a_segment_grows_its_preallocation_as_appends_pass_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = Wal::create(dir.path(), &Log::default()).unwrap();
    let big: Vec<Entry> = (1..=3)
        .map(|i| {
            let mut e = entry(i, 1);
            e.data = vec![7u8; 3 << 20].into();
            e
        })
        .collect();
    for e in &big {
        w.append(None, std::slice::from_ref(e), true).unwrap();
    }
    let path = only_segment(dir.path());
    let len = fs::metadata(&path).unwrap().len();
    assert!(len >= w.len() && len.is_multiple_of(PREALLOCATE), "{len}");
    drop(w);
    let (_, log) = Wal::open(dir.path()).unwrap().unwrap();
    assert_eq!(log.entries.len(), 3);
    assert_eq!(log.entries[2].data.len(), 3 << 20);
}

#[test]
fn an_append_that_skips_entries_is_damage() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = Wal::create(dir.path(), &Log::default()).unwrap();
    w.append(None, &[entry(1, 1)], true).unwrap();
    // The storage never writes this; a file that holds it is damaged.
    w.append(None, &[entry(3, 1)], true).unwrap();
    drop(w);
    let err = Wal::open(dir.path()).err().unwrap().to_string();
    assert!(err.contains("entry 3"), "{err}");
}

#[test]
fn a_torn_append_with_a_zero_header_is_dropped_and_its_bytes_cleared() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = Wal::create(dir.path(), &Log::default()).unwrap();
    w.append(None, &[entry(1, 1)], true).unwrap();
    let good = w.len();
    let mut big = entry(2, 1);
    big.data = vec![9u8; 20_000].into();
    w.append(None, &[big], true).unwrap();
    drop(w);
    // The crash: the header's page never reached the disk, a later one did.
    let path = only_segment(dir.path());
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[0; 4096], good).unwrap();
    drop(f);
    let (mut w, log) = Wal::open(dir.path()).unwrap().unwrap();
    assert_eq!(indexes(&log), vec![(1, 1)]);
    // A shorter append over the dropped one, then another crash-free
    // reopen: no stale byte of the dropped append may follow it.
    w.append(None, &[entry(2, 2)], true).unwrap();
    drop(w);
    let (_, log) = Wal::open(dir.path()).unwrap().unwrap();
    assert_eq!(indexes(&log), vec![(1, 1), (2, 2)]);
    let data = fs::read(&path).unwrap();
    assert!(data[good as usize + 200..].iter().all(|b| *b == 0));
}
