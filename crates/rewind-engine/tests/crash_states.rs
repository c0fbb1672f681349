//! What a crash can leave of the journal's files, built by hand: segments started, reused or
//! created after the last durable record (full of zeroes, empty, holding a reused segment's
//! stale header), a first segment whose header never reached the disk, stray files that look
//! like segments, and forged records. The store must open whenever no durable record is
//! missing, drop exactly what was never made durable, and refuse (without panicking) what
//! only damage explains.

use std::fs;
use std::path::{Path, PathBuf};

use rewind_engine::journal::segment::{Segment, SEGMENT_HEADER_LEN};
use rewind_engine::journal::{Journal, NewRecord, Payloads, RecordKind};
use rewind_engine::{CreateOptions, Error, Store};

const VOLUME: u64 = 256 * 1024;
const SEGMENT: u64 = 8192;

struct Fixture {
    _dir: tempfile::TempDir,
    image: PathBuf,
    /// The volume after each write.
    states: Vec<Vec<u8>>,
}

impl Fixture {
    /// `count` writes of 2 KiB in 8 KiB segments (three to a segment), closed cleanly.
    fn new(count: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        let options = CreateOptions { size: Some(VOLUME), segment_capacity: SEGMENT, ..Default::default() };
        let (store, _) = Store::create(&image, None, &options, &mut |_, _| {}).unwrap();
        let mut states = vec![vec![0u8; VOLUME as usize]];
        for i in 0..count {
            let data: Vec<u8> = (0..2048).map(|k| (i * 13 + k) as u8 | 1).collect();
            let offset = (i as u64 * 5 * 4096) % (VOLUME - 2048);
            store.write(offset, &data).unwrap();
            let mut next = states.last().unwrap().clone();
            next[offset as usize..][..2048].copy_from_slice(&data);
            states.push(next);
        }
        store.close().unwrap();
        Self { _dir: dir, image, states }
    }

    fn journal_dir(&self) -> PathBuf {
        rewind_engine::store::default_store_dir(&self.image).join("journal")
    }

    fn segment_path(&self, index: u64) -> PathBuf {
        self.journal_dir().join(Segment::file_name(index))
    }

    fn segment_indexes(&self) -> Vec<u64> {
        let mut indexes: Vec<u64> = fs::read_dir(self.journal_dir())
            .unwrap()
            .filter_map(|e| Segment::parse_file_name(&e.unwrap().file_name().to_string_lossy()))
            .collect();
        indexes.sort();
        indexes
    }

    /// Opens the store and checks that it holds exactly the state after `head` writes.
    fn assert_opens_at(&self, head: usize, expect_repair: bool) {
        let (store, report) = Store::open(&self.image, None).unwrap();
        assert_eq!(store.head(), head as u64);
        assert_eq!(report.tail_repair.is_some(), expect_repair, "{report:?}");
        let mut volume = vec![0u8; VOLUME as usize];
        store.read(0, &mut volume).unwrap();
        assert!(volume == self.states[head], "the volume is the state after {head} writes");
        // The store goes on: a write, and a clean reopen with nothing to repair.
        store.write(0, &[7u8; 512]).unwrap();
        store.close().unwrap();
        let (store, report) = Store::open(&self.image, None).unwrap();
        assert_eq!(store.head(), head as u64 + 1);
        assert!(report.tail_repair.is_none() && report.volume_rebuilt.is_none(), "{report:?}");
        store.close().unwrap();
    }
}

fn zeroes(path: &Path, len: u64) {
    fs::write(path, vec![0u8; len as usize]).unwrap();
}

#[test]
fn segments_started_after_the_last_durable_record_are_dropped() {
    let fixture = Fixture::new(8);
    let last = *fixture.segment_indexes().last().unwrap();
    // A zero-filled spare renamed in whose header never reached the disk, a new file whose
    // data never did, and a freed segment reused whose new header never did.
    zeroes(&fixture.segment_path(last + 1), SEGMENT);
    fs::write(fixture.segment_path(last + 2), b"").unwrap();
    fs::copy(fixture.segment_path(0), fixture.segment_path(last + 3)).unwrap();
    fixture.assert_opens_at(8, true);
    assert_eq!(*fixture.segment_indexes().last().unwrap(), last, "the dropped files are gone");
}

#[test]
fn a_torn_record_followed_by_torn_segment_starts_is_one_torn_tail() {
    let fixture = Fixture::new(8);
    let last = *fixture.segment_indexes().last().unwrap();
    // The last record's second half never reached the disk.
    let active = fixture.segment_path(last);
    let bytes = fs::read(&active).unwrap();
    let last_record_end = bytes.chunks(64).rposition(|c| c.iter().any(|&b| b != 0)).unwrap() as u64 * 64 + 64;
    let torn_at = last_record_end - 1024;
    fs::write(&active, &bytes[..torn_at as usize]).unwrap();
    zeroes(&fixture.segment_path(last + 1), SEGMENT);
    fixture.assert_opens_at(7, true);
}

#[test]
fn a_lost_header_with_durable_records_behind_it_is_damage() {
    let fixture = Fixture::new(8);
    let indexes = fixture.segment_indexes();
    assert!(indexes.len() >= 3, "{indexes:?}");
    let middle = fixture.segment_path(indexes[1]);
    let mut bytes = fs::read(&middle).unwrap();
    bytes[..SEGMENT_HEADER_LEN as usize].fill(0);
    fs::write(&middle, bytes).unwrap();
    match Store::open(&fixture.image, None) {
        Err(Error::JournalCorrupt { segment, offset: 0, .. }) => assert_eq!(segment, middle),
        other => panic!("expected damage in {}: {:?}", middle.display(), other.map(|_| ())),
    }
}

#[test]
fn a_new_store_opens_whatever_became_of_its_first_segment() {
    for damage in ["header zeroed", "file empty"] {
        let fixture = Fixture::new(0);
        let first = fixture.segment_path(0);
        match damage {
            "header zeroed" => zeroes(&first, SEGMENT),
            _ => fs::write(&first, b"").unwrap(),
        }
        fixture.assert_opens_at(0, true);
    }
}

#[test]
fn a_store_with_durable_records_refuses_to_lose_its_oldest_segment() {
    let fixture = Fixture::new(2);
    zeroes(&fixture.segment_path(0), SEGMENT);
    assert!(matches!(Store::open(&fixture.image, None), Err(Error::JournalCorrupt { .. })));
}

#[test]
fn a_clean_reopen_after_a_segment_was_reused_needs_no_repair() {
    let dir = tempfile::tempdir().unwrap();
    let uuid = [9u8; 16];
    let mut journal = Journal::create(dir.path(), uuid, 8192, 1).unwrap();
    let append = |journal: &mut Journal, len: usize| {
        let payload = vec![0x5a; len];
        let pieces: [&[u8]; 1] = [&payload];
        journal
            .append(&[NewRecord { kind: RecordKind::Write, offset: 0, length: len as u64, payload: &pieces }])
            .unwrap();
    };
    for _ in 0..8 {
        append(&mut journal, 3000);
    }
    journal.free_oldest(journal.segments().len() - 1).unwrap();
    // Large records fill the active segment; the next roll-over reuses a freed one, where small
    // records end inside the payload of that segment's earlier life.
    while journal.segments().last().unwrap().first_seq == journal.first_seq() {
        append(&mut journal, 3000);
    }
    for _ in 0..3 {
        append(&mut journal, 100);
    }
    let head = journal.next_seq() - 1;
    for file in journal.sync_targets() {
        file.sync_data().unwrap();
    }
    drop(journal);
    let (journal, repair) = Journal::open(dir.path(), uuid, 8192, head, Payloads::Skip, |_| Ok(())).unwrap();
    assert_eq!(repair, None);
    assert_eq!(journal.next_seq() - 1, head);
}

#[test]
fn stray_files_that_look_like_segments_are_ignored() {
    let fixture = Fixture::new(4);
    for stray in ["0.seg", "+0.seg", "000000000000000A.seg", "0000000000000000.SEG", "00000000000000000.seg"] {
        fs::copy(fixture.segment_path(0), fixture.journal_dir().join(stray)).unwrap();
    }
    fixture.assert_opens_at(4, false);
}

#[test]
fn the_last_segment_index_is_refused_without_overflow() {
    let fixture = Fixture::new(1);
    fs::copy(fixture.segment_path(0), fixture.segment_path(u64::MAX)).unwrap();
    assert!(matches!(Store::open(&fixture.image, None), Err(Error::JournalCorrupt { .. })));
}

#[test]
fn a_segment_header_near_the_end_of_numbering_is_refused_without_overflow() {
    let fixture = Fixture::new(4);
    let last = *fixture.segment_indexes().last().unwrap();
    let uuid: [u8; 16] = fs::read(fixture.segment_path(0)).unwrap()[16..32].try_into().unwrap();
    let header =
        rewind_engine::journal::segment::SegmentHeader { store_uuid: uuid, index: last + 1, first_seq: u64::MAX };
    let mut bytes = header.encode().to_vec();
    bytes.resize(SEGMENT as usize, 0);
    fs::write(fixture.segment_path(last + 1), bytes).unwrap();
    // Nothing of this life follows: a torn start, dropped.
    fixture.assert_opens_at(4, true);
}

#[test]
fn a_record_outside_the_volume_is_refused_rather_than_growing_the_image() {
    let fixture = Fixture::new(2);
    let uuid: [u8; 16] = fs::read(fixture.segment_path(0)).unwrap()[16..32].try_into().unwrap();
    let (mut journal, _) = Journal::open(&fixture.journal_dir(), uuid, SEGMENT, 2, Payloads::Skip, |_| Ok(())).unwrap();
    let payload = [1u8; 512];
    let pieces: [&[u8]; 1] = [&payload];
    journal.append(&[NewRecord { kind: RecordKind::Write, offset: VOLUME, length: 512, payload: &pieces }]).unwrap();
    for file in journal.sync_targets() {
        file.sync_data().unwrap();
    }
    drop(journal);
    assert!(matches!(Store::open(&fixture.image, None), Err(Error::JournalCorrupt { .. })));
    assert_eq!(fs::metadata(&fixture.image).unwrap().len(), VOLUME, "the image did not grow");
}

#[test]
fn segment_sizes_that_are_not_a_multiple_of_the_record_alignment_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let options = CreateOptions { size: Some(VOLUME), segment_capacity: 4100, ..Default::default() };
    let created = Store::create(&dir.path().join("disk.img"), None, &options, &mut |_, _| {});
    assert!(matches!(created, Err(Error::BadMetadata { .. })));
}

#[test]
fn a_snapshot_manifest_with_impossible_numbers_is_refused_or_summed_without_overflow() {
    let fixture = Fixture::new(2);
    let (store, _) = Store::open(&fixture.image, None).unwrap();
    store.take_snapshot().unwrap();
    store.write(0, &[3u8; 512]).unwrap();
    store.take_snapshot().unwrap();
    store.close().unwrap();
    let manifest_path = rewind_engine::store::default_store_dir(&fixture.image).join("snapshots/manifest.json");
    let original: serde_json::Value = serde_json::from_slice(&fs::read(&manifest_path).unwrap()).unwrap();

    let mut huge = original.clone();
    huge["base"]["data-bytes"] = u64::MAX.into();
    for delta in huge["deltas"].as_array_mut().unwrap() {
        delta["data-bytes"] = u64::MAX.into();
    }
    fs::write(&manifest_path, serde_json::to_vec(&huge).unwrap()).unwrap();
    let (store, _) = Store::open(&fixture.image, None).unwrap();
    assert_eq!(store.status().snapshot_bytes, u64::MAX);
    store.close().unwrap();

    let mut reordered = original.clone();
    reordered["deltas"].as_array_mut().unwrap().reverse();
    fs::write(&manifest_path, serde_json::to_vec(&reordered).unwrap()).unwrap();
    assert!(matches!(Store::open(&fixture.image, None), Err(Error::BadMetadata { .. })));
}

/// Found by fuzzing (fuzz/fuzz_targets/store_open.rs): a manifest naming a snapshot past the
/// journal's head made the volume rebuild at open count past u64::MAX (a panic in debug builds,
/// a replay of the whole journal over the wrong snapshot in release builds).
#[test]
fn a_snapshot_chain_past_the_journal_head_is_refused() {
    let fixture = Fixture::new(2);
    let (store, _) = Store::open(&fixture.image, None).unwrap();
    store.take_snapshot().unwrap();
    store.close().unwrap();
    let store_dir = rewind_engine::store::default_store_dir(&fixture.image);
    let manifest_path = store_dir.join("snapshots/manifest.json");
    let original: serde_json::Value = serde_json::from_slice(&fs::read(&manifest_path).unwrap()).unwrap();
    let head = original["deltas"][0]["seq"].as_u64().unwrap();
    // The machine went down with the store open: open rebuilds the volume from the chain.
    let meta_path = store_dir.join("meta.json");
    let mut meta: serde_json::Value = serde_json::from_slice(&fs::read(&meta_path).unwrap()).unwrap();
    meta["open-in-boot"] = "another boot".into();
    fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
    for (field, seq) in [("deltas", head + 1), ("deltas", u64::MAX), ("base", u64::MAX)] {
        let mut forged = original.clone();
        if field == "base" {
            forged["base"]["seq"] = seq.into();
            forged["deltas"] = serde_json::json!([]);
        } else {
            forged["deltas"][0]["seq"] = seq.into();
        }
        fs::write(&manifest_path, serde_json::to_vec(&forged).unwrap()).unwrap();
        let opened = Store::open(&fixture.image, None);
        assert!(matches!(opened, Err(Error::BadMetadata { .. })), "{field} at {seq}: {:?}", opened.err());
    }
    fs::write(&manifest_path, serde_json::to_vec(&original).unwrap()).unwrap();
    let (store, report) = Store::open(&fixture.image, None).unwrap();
    assert!(report.volume_rebuilt.is_some());
    let mut volume = vec![0u8; VOLUME as usize];
    store.read(0, &mut volume).unwrap();
    assert!(volume == *fixture.states.last().unwrap());
}

/// A journal of ten 4 KiB writes in `dir`, with the volume after each (index 0: before any).
/// The first five writes go to blocks of their own, the last five to two of them.
fn ten_writes(dir: &Path) -> (Journal, Vec<Vec<u8>>) {
    let mut journal = Journal::create(&dir.join("journal"), [7; 16], SEGMENT, 1).unwrap();
    let mut states = vec![vec![0u8; VOLUME as usize]];
    for i in 0..10u64 {
        let data = vec![i as u8 + 1; 4096];
        let offset = if i < 5 { i * 8192 } else { (i % 2) * 8192 };
        journal.append(&[NewRecord { kind: RecordKind::Write, offset, length: 4096, payload: &[&data] }]).unwrap();
        let mut next = states.last().unwrap().clone();
        next[offset as usize..][..4096].copy_from_slice(&data);
        states.push(next);
    }
    (journal, states)
}

/// The volume at snapshot `seq` of the snapshot area in `dir`, opened as after a crash.
fn materialized(dir: &Path, seq: u64) -> Result<Vec<u8>, Error> {
    let snapshots = rewind_engine::snapshot::SnapshotStore::open(dir, VOLUME, 10)?;
    let output = tempfile::tempfile().unwrap();
    output.set_len(VOLUME).unwrap();
    snapshots.materialize(seq, &output, &mut |_, _| {}, &std::sync::atomic::AtomicBool::new(false))?;
    let mut bytes = vec![0u8; VOLUME as usize];
    std::os::unix::fs::FileExt::read_exact_at(&output, &mut bytes, 0).unwrap();
    Ok(bytes)
}

/// Found by the power-loss torture with retention working hard: a snapshot inserted before the
/// newest one splits that one's delta in two. The delta after it was rewritten before the
/// manifest listed the new snapshot, so a crash in between left a chain whose last delta
/// started at the new (unlisted) snapshot, and recovery silently missed the writes before it.
/// Now every state a crash can leave recovers exactly, and a chain with such a gap is refused.
#[test]
fn a_crash_while_a_snapshot_splits_a_delta_leaves_an_exact_chain_or_a_refused_one() {
    use rewind_engine::snapshot::{SnapshotOrigin, SnapshotStore};

    let dir = tempfile::tempdir().unwrap();
    let (journal, states) = ten_writes(dir.path());
    let snapshot_dir = dir.path().join("snapshots");
    let mut snapshots = SnapshotStore::create(&snapshot_dir, VOLUME, None, &mut |_, _| {}).unwrap();
    snapshots.insert(&journal.view(), 10, SnapshotOrigin::Requested).unwrap();
    let (manifest_path, delta_path) = (snapshot_dir.join("manifest.json"), snapshot_dir.join("000000000000000a.delta"));
    let (manifest_before, whole_delta) = (fs::read(&manifest_path).unwrap(), fs::read(&delta_path).unwrap());
    snapshots.insert(&journal.view(), 5, SnapshotOrigin::Requested).unwrap();
    let (manifest_after, rest_delta) = (fs::read(&manifest_path).unwrap(), fs::read(&delta_path).unwrap());
    assert!(rest_delta.len() < whole_delta.len(), "the split rewrote the later delta");

    assert!(materialized(&snapshot_dir, 10).unwrap() == states[10], "the split chain");
    // The crash after the manifest listed the new snapshot, before the later delta was rewritten.
    fs::write(&delta_path, &whole_delta).unwrap();
    assert!(materialized(&snapshot_dir, 10).unwrap() == states[10], "the new snapshot, the whole later delta");
    assert!(materialized(&snapshot_dir, 5).unwrap() == states[5], "the new snapshot");
    // The state the old order could leave: the later delta rewritten, the manifest not yet.
    fs::write(&delta_path, &rest_delta).unwrap();
    fs::write(&manifest_path, &manifest_before).unwrap();
    assert!(matches!(materialized(&snapshot_dir, 10), Err(Error::SnapshotCorrupt { .. })));
    fs::write(&manifest_path, &manifest_after).unwrap();
}

/// A crash while a delta is folded into the base leaves a base holding part of it: the manifest
/// says so first, and open finishes the merge, so no point recovers from a half-merged base.
#[test]
fn a_crash_while_a_delta_is_merged_into_the_base_is_finished_at_open() {
    use rewind_engine::snapshot::{SnapshotOrigin, SnapshotStore};

    let dir = tempfile::tempdir().unwrap();
    let (journal, states) = ten_writes(dir.path());
    let snapshot_dir = dir.path().join("snapshots");
    let mut snapshots = SnapshotStore::create(&snapshot_dir, VOLUME, None, &mut |_, _| {}).unwrap();
    snapshots.insert(&journal.view(), 5, SnapshotOrigin::Requested).unwrap();
    snapshots.insert(&journal.view(), 10, SnapshotOrigin::Requested).unwrap();
    drop(snapshots);
    let manifest_path = snapshot_dir.join("manifest.json");
    let original: serde_json::Value = serde_json::from_slice(&fs::read(&manifest_path).unwrap()).unwrap();

    let mut naming_the_second = original.clone();
    naming_the_second["merging-into-base"] = 10.into();
    fs::write(&manifest_path, serde_json::to_vec(&naming_the_second).unwrap()).unwrap();
    assert!(matches!(materialized(&snapshot_dir, 10), Err(Error::BadMetadata { .. })));

    // The crash came when one block of the first delta had reached the base.
    let mut merging = original.clone();
    merging["merging-into-base"] = 5.into();
    fs::write(&manifest_path, serde_json::to_vec(&merging).unwrap()).unwrap();
    let base = fs::OpenOptions::new().write(true).open(snapshot_dir.join("base.img")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&base, &states[5][..4096], 0).unwrap();
    assert!(materialized(&snapshot_dir, 10).unwrap() == states[10]);
    let snapshots = SnapshotStore::open(&snapshot_dir, VOLUME, 10).unwrap();
    let seqs: Vec<u64> = snapshots.list().iter().map(|s| s.seq).collect();
    assert_eq!(seqs, [5, 10], "the base is now the merged snapshot");
    assert!(materialized(&snapshot_dir, 5).unwrap() == states[5]);
}

#[test]
fn an_open_interrupted_while_it_rebuilt_the_volume_is_redone_by_the_next_one() {
    let fixture = Fixture::new(6);
    let meta_path = rewind_engine::store::default_store_dir(&fixture.image).join("meta.json");
    // An open after a kill -9 in this boot had cut the journal's torn tail (so nothing is left
    // to cut) and was clearing the volume to rebuild it when it was killed in turn.
    let mut meta: serde_json::Value = serde_json::from_slice(&fs::read(&meta_path).unwrap()).unwrap();
    let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    meta["open-in-boot"] = boot.trim().into();
    meta["open-unfinished"] = true.into();
    fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
    let volume = fs::OpenOptions::new().write(true).open(&fixture.image).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&volume, &vec![0u8; 64 << 10], 0).unwrap();
    fixture.assert_opens_at(6, false);
    let meta: serde_json::Value = serde_json::from_slice(&fs::read(&meta_path).unwrap()).unwrap();
    assert!(meta.get("open-unfinished").is_none(), "{meta}");
}
