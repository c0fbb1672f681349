//! Damage: torn tails at every byte offset, bit flips at the tail and in the middle, a full
//! disk. The store must cut a torn tail back to the last good record (losing nothing before
//! it), refuse damage in the middle with the segment and offset, and never lose acknowledged
//! data to a failed append.

use std::fs;
use std::path::{Path, PathBuf};

use rewind_engine::journal::record::{padded_len, HEADER_LEN};
use rewind_engine::journal::segment::SEGMENT_HEADER_LEN;
use rewind_engine::journal::Seq;
use rewind_engine::recovery::RecoveryTarget;
use rewind_engine::{CreateOptions, Error, Store};

const VOLUME: u64 = 64 * 1024;

/// A store with a history of writes of different sizes, and the volume after each of them.
struct Fixture {
    _dir: tempfile::TempDir,
    image: PathBuf,
    states: Vec<Vec<u8>>,
    /// Byte offset of each record in the (single) segment, in order.
    record_offsets: Vec<u64>,
    /// Where the last record ends (segments are preallocated, so the file goes on).
    journal_end: u64,
}

impl Fixture {
    /// Writes `count` records; `clean` closes the store, otherwise it is dropped as in a crash.
    fn new(count: usize, segment_capacity: u64, clean: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        let options = CreateOptions { size: Some(VOLUME), segment_capacity, ..Default::default() };
        let (store, _) = Store::create(&image, None, &options, &mut |_, _| {}).unwrap();
        let mut states = vec![vec![0u8; VOLUME as usize]];
        let mut record_offsets = Vec::new();
        let mut position = SEGMENT_HEADER_LEN;
        for i in 0..count {
            let len = 512 * (1 + i % 5);
            let offset = (i as u64 * 3 * 512) % (VOLUME - len as u64);
            let data: Vec<u8> = (0..len).map(|k| (i * 7 + k) as u8 | 0x80).collect();
            store.write(offset, &data).unwrap();
            let mut next = states.last().unwrap().clone();
            next[offset as usize..offset as usize + len].copy_from_slice(&data);
            states.push(next);
            record_offsets.push(position);
            position += HEADER_LEN as u64 + padded_len(len as u64);
        }
        if clean {
            store.close().unwrap();
        } else {
            drop(store);
        }
        Self { _dir: dir, image, states, record_offsets, journal_end: position }
    }

    fn store_dir(&self) -> PathBuf {
        rewind_engine::store::default_store_dir(&self.image)
    }

    fn segments(&self) -> Vec<PathBuf> {
        let mut segments: Vec<PathBuf> = fs::read_dir(self.store_dir().join("journal"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.extension().is_some_and(|e| e == "seg")
                    && !p.file_name().unwrap().to_string_lossy().starts_with("spare")
            })
            .collect();
        segments.sort();
        segments
    }

    /// A copy of the image and store to damage without touching the original.
    fn copy(&self) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        fs::copy(&self.image, &image).unwrap();
        copy_dir(&self.store_dir(), &rewind_engine::store::default_store_dir(&image));
        (dir, image)
    }
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Makes the store look as if the machine went down while it was open: unsynced data may be
/// lost, which is what truncating or damaging the journal tail stands for.
fn simulate_power_loss(image: &Path) {
    let meta_path = rewind_engine::store::default_store_dir(image).join("meta.json");
    let mut meta: serde_json::Value = serde_json::from_slice(&fs::read(&meta_path).unwrap()).unwrap();
    assert!(meta.get("open-in-boot").is_some(), "the store was closed cleanly");
    meta["open-in-boot"] = serde_json::Value::String("an-earlier-boot".into());
    fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
}

fn flip_bit(path: &Path, offset: u64, bit: u8) {
    let mut bytes = fs::read(path).unwrap();
    bytes[offset as usize] ^= 1 << bit;
    fs::write(path, bytes).unwrap();
}

fn recover_bytes(store: &Store, seq: Seq, dir: &Path) -> Vec<u8> {
    let output = dir.join(format!("recovered-{seq}.img"));
    store.recover(&RecoveryTarget::Seq(seq), &output, &mut |_, _| {}).unwrap();
    let bytes = fs::read(&output).unwrap();
    fs::remove_file(&output).unwrap();
    bytes
}

/// Opens a damaged copy and checks it holds exactly the first `expected_head` records.
fn assert_cut_back_to(image: &Path, fixture: &Fixture, expected_head: Seq, what: &str) {
    let (store, report) = Store::open(image, None).unwrap_or_else(|e| panic!("{what}: open failed: {e}"));
    assert!(report.volume_rebuilt.is_some(), "{what}: the volume was not rebuilt");
    assert_eq!(store.head(), expected_head, "{what}");
    let volume = fs::read(image).unwrap();
    assert!(volume == fixture.states[expected_head as usize], "{what}: volume is not the state at {expected_head}");
    if expected_head > 0 {
        let mid = expected_head / 2;
        assert!(recover_bytes(&store, mid, image.parent().unwrap()) == fixture.states[mid as usize], "{what}");
    }
    // The store goes on: the next write takes the next number and survives a reopen.
    let seq = store.write(0, &[0x5a; 512]).unwrap();
    assert_eq!(seq, expected_head + 1, "{what}");
    store.close().unwrap();
    let (store, report) = Store::open(image, None).unwrap();
    assert!(report.tail_repair.is_none() && report.volume_rebuilt.is_none(), "{what}: the repair did not stick");
    assert_eq!(store.head(), expected_head + 1);
    store.verify(&mut |_, _| {}).unwrap();
}

#[test]
fn truncation_at_every_byte_of_the_last_records_cuts_back_to_the_last_whole_record() {
    for clean in [false, true] {
        let fixture = Fixture::new(12, 1 << 20, clean);
        let segment = fixture.segments().pop().unwrap();
        let full_len = fixture.journal_end;
        let first_cut = fixture.record_offsets[9];
        // Every byte truncated (a file system that does not preallocate); every 61st byte
        // zeroed to the end with the file's length kept (pages of a preallocated segment that
        // never reached the disk).
        let truncations = (first_cut..full_len).map(|cut| (cut, false));
        let zeroings = (first_cut..full_len).step_by(61).map(|cut| (cut, true));
        for (cut, zeroed) in truncations.chain(zeroings) {
            let (_dir, image) = fixture.copy();
            let damaged =
                rewind_engine::store::default_store_dir(&image).join("journal").join(segment.file_name().unwrap());
            let file = fs::OpenOptions::new().write(true).open(&damaged).unwrap();
            if zeroed {
                std::os::unix::fs::FileExt::write_all_at(&file, &vec![0; (full_len - cut) as usize], cut).unwrap();
            } else {
                file.set_len(cut).unwrap();
            }
            if !clean {
                simulate_power_loss(&image);
            }
            let whole_records = fixture.record_offsets.iter().filter(|&&start| {
                let index = fixture.record_offsets.iter().position(|&s| s == start).unwrap();
                let end = fixture.record_offsets.get(index + 1).copied().unwrap_or(full_len);
                end <= cut
            });
            let expected_head = whole_records.count() as Seq;
            let what = format!("{} at {cut} (clean close: {clean})", if zeroed { "zeroed" } else { "cut" });
            assert_cut_back_to(&image, &fixture, expected_head, &what);
        }
    }
}

#[test]
fn bit_flips_in_the_last_record_are_a_torn_tail() {
    let fixture = Fixture::new(8, 1 << 20, false);
    let segment = fixture.segments().pop().unwrap();
    let last = *fixture.record_offsets.last().unwrap();
    for at in [last, last + 9, last + 40, last + HEADER_LEN as u64 + 3, last + HEADER_LEN as u64 + 500] {
        let (_dir, image) = fixture.copy();
        let damaged =
            rewind_engine::store::default_store_dir(&image).join("journal").join(segment.file_name().unwrap());
        flip_bit(&damaged, at, 3);
        simulate_power_loss(&image);
        assert_cut_back_to(&image, &fixture, 7, &format!("flip at {at}"));
    }
}

#[test]
fn bit_flips_in_the_middle_stop_the_open_naming_segment_and_offset() {
    let fixture = Fixture::new(8, 1 << 20, true);
    let segment = fixture.segments().pop().unwrap();
    let victim = fixture.record_offsets[3];
    for at in [victim + 1, victim + 20, victim + HEADER_LEN as u64 + 100] {
        let (_dir, image) = fixture.copy();
        let damaged =
            rewind_engine::store::default_store_dir(&image).join("journal").join(segment.file_name().unwrap());
        flip_bit(&damaged, at, 0);
        match Store::open(&image, None) {
            Err(Error::JournalCorrupt { segment: named, offset, .. }) => {
                assert_eq!(named, damaged, "flip at {at}");
                assert_eq!(offset, victim, "flip at {at}");
            }
            Err(other) => panic!("flip at {at}: unexpected error {other}"),
            Ok(_) => panic!("flip at {at}: damage in the middle went unnoticed"),
        }
    }
}

#[test]
fn damage_in_an_older_segment_is_reported_by_open_or_verify_and_recovery() {
    // Small segments: the records spread over several files.
    let fixture = Fixture::new(30, 8192, true);
    let segments = fixture.segments();
    assert!(segments.len() >= 3, "expected several segments, got {}", segments.len());
    let first = &segments[0];
    let record = SEGMENT_HEADER_LEN;

    // A header flip breaks the chain of sequence numbers: open refuses.
    let (_dir, image) = fixture.copy();
    let damaged = rewind_engine::store::default_store_dir(&image).join("journal").join(first.file_name().unwrap());
    flip_bit(&damaged, record + 8, 2);
    match Store::open(&image, None) {
        Err(Error::JournalCorrupt { segment, offset, .. }) => assert_eq!((segment, offset), (damaged.clone(), record)),
        other => panic!("header damage: {:?}", other.map(|_| ())),
    }

    // A payload flip in a checkpointed, sealed segment is found by verify and by recovery.
    let (_dir, image) = fixture.copy();
    let damaged = rewind_engine::store::default_store_dir(&image).join("journal").join(first.file_name().unwrap());
    flip_bit(&damaged, record + HEADER_LEN as u64 + 10, 5);
    let (store, _) = Store::open(&image, None).unwrap();
    match store.verify(&mut |_, _| {}) {
        Err(Error::JournalCorrupt { segment, offset, .. }) => assert_eq!((segment, offset), (damaged.clone(), record)),
        other => panic!("verify: {other:?}"),
    }
    let output = image.with_file_name("out.img");
    match store.recover(&RecoveryTarget::Seq(5), &output, &mut |_, _| {}) {
        Err(Error::JournalCorrupt { segment, .. }) => assert_eq!(segment, damaged),
        other => panic!("recover: {other:?}"),
    }
    assert!(!output.exists(), "a failed recovery left its output behind");
}

#[test]
fn a_snapshot_refuses_a_damaged_payload_it_would_keep_naming_the_record() {
    // Small segments: the damaged records are in a sealed, checkpointed one that open leaves
    // to verify. Record 0 is still the volume's whole at the head; record 3 only in part (the
    // next write covers its end), so its whole payload is read again to check it.
    let fixture = Fixture::new(30, 8192, true);
    for index in [0, 3] {
        let (_dir, image) = fixture.copy();
        let segment = fixture.segments()[0].file_name().unwrap().to_owned();
        let damaged = rewind_engine::store::default_store_dir(&image).join("journal").join(segment);
        let record = fixture.record_offsets[index];
        flip_bit(&damaged, record + HEADER_LEN as u64 + 7, 3);
        let (store, _) = Store::open(&image, None).unwrap();
        let before = store.snapshots();
        match store.take_snapshot() {
            Err(Error::JournalCorrupt { segment, offset, reason }) => {
                assert_eq!((segment, offset), (damaged, record), "record {index}: {reason}")
            }
            other => panic!("a snapshot over damaged record {index}: {other:?}"),
        }
        assert_eq!(store.snapshots(), before, "no snapshot was added");
    }
}

#[test]
fn a_kept_range_is_read_only_from_the_write_the_header_index_names() {
    let fixture = Fixture::new(6, 1 << 20, true);
    let (store, _) = Store::open(&fixture.image, None).unwrap();
    let view = store.journal_view();
    let head = view.next_seq() - 1;
    let effect = rewind_engine::snapshot::net_effect(&view, 0, head, &Default::default()).unwrap();
    let (offset, len, source) = effect.iter().find(|e| e.2 != rewind_engine::snapshot::Source::Zero).unwrap();
    let mut kept = rewind_engine::snapshot::KeptRanges::new(&view, 4096);
    let mut read = Vec::new();
    let mut read_at = |at: u64, read: &mut Vec<u8>| {
        kept.read::<Error>(at, source, len, |_, piece| {
            read.extend_from_slice(piece);
            Ok(())
        })
    };
    read_at(offset, &mut read).unwrap();
    let at_head = fixture.states.last().unwrap();
    assert_eq!(read, at_head[offset as usize..(offset + len) as usize]);
    // The same bytes claimed for another place of the volume: not what the record wrote.
    match read_at(offset + 512, &mut Vec::new()) {
        Err(Error::JournalCorrupt { reason, .. }) => assert!(reason.contains("header index"), "{reason}"),
        other => panic!("a range read for the wrong volume offset: {other:?}"),
    }
}
