use std::sync::Arc;

use super::*;

fn new_store(dir: &Path, size: u64) -> Store {
    let options = CreateOptions { size: Some(size), segment_capacity: 64 * 1024, ..Default::default() };
    Store::create(&dir.join("disk.img"), None, &options, &mut |_, _| {}).unwrap().0
}

#[test]
fn concurrent_writers_on_overlapping_ranges_keep_volume_and_journal_in_step() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(new_store(dir.path(), 256 * 1024));
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                for i in 0..300u64 {
                    // Every thread hits the same 16 KiB so that order matters.
                    let offset = (i * 512 * (t as u64 + 1)) % (16 * 1024);
                    let first = [t * 50 + (i % 50) as u8; 1024];
                    let second = [!first[0]; 8192];
                    // Two ops per batch, the second one large, so that applies (which run
                    // outside the writer lock) overlap in time and in range.
                    let ops = [
                        VolumeOp::Write { offset, data: &[&first] },
                        VolumeOp::Write { offset: (offset * 3) % (24 * 1024), data: &[&second] },
                    ];
                    store.submit(&ops).unwrap();
                    if i % 37 == 0 {
                        store.sync().unwrap();
                    }
                    if i % 101 == 0 {
                        store.discard(offset, 512).unwrap();
                    }
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    let store = Arc::into_inner(store).unwrap();
    // verify rebuilds state(head) from the journal alone and compares it with the volume.
    let report = store.verify(&mut |_, _| {}).unwrap();
    assert_eq!(report.head, 4 * 300 * 2 + 4 * 3);
    store.close().unwrap();
}

#[test]
fn a_second_opener_is_refused_with_the_owner_named() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 64 * 1024);
    match Store::open(&dir.path().join("disk.img"), None) {
        Err(Error::Locked { owner, .. }) => assert!(owner.contains(&format!("pid {}", std::process::id())), "{owner}"),
        other => panic!("expected a lock error, got {:?}", other.map(|_| ())),
    }
    store.close().unwrap();
    Store::open(&dir.path().join("disk.img"), None).unwrap().0.close().unwrap();
}

#[test]
fn recovery_by_time_finds_the_last_record_at_or_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 64 * 1024);
    store.write(0, &[1; 4096]).unwrap();
    let marker = store.add_marker("between", None, MarkerSource::Host).unwrap();
    store.write(0, &[2; 4096]).unwrap();
    // The clock may not move between two records; the target is the last at or before it.
    let output = dir.path().join("at-time.img");
    let report = store.recover(&RecoveryTarget::Time(marker.time_ns), &output, &mut |_, _| {}).unwrap();
    assert!(report.seq >= marker.seq);
    let bytes = fs::read(&output).unwrap();
    let after_second_write = report.seq == 3;
    assert_eq!(bytes[0], if after_second_write { 2 } else { 1 });
    match store.recover(&RecoveryTarget::Time(1), &dir.path().join("early.img"), &mut |_, _| {}) {
        Err(Error::TimeBeforeJournal(_)) => {}
        other => panic!("expected an early-time error, got {other:?}"),
    }
    store.close().unwrap();
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 64 * 1024);
    store.write(0, &[7; 512]).unwrap();
    assert!(matches!(store.write(64 * 1024 - 512, &[1; 1024]), Err(Error::OutOfRange { .. })));
    assert!(matches!(store.discard(u64::MAX - 10, 512), Err(Error::OutOfRange { .. })));
    assert!(matches!(store.add_marker("", None, MarkerSource::Host), Err(Error::InvalidMarkerName(_))));
    assert!(matches!(store.add_marker(&"x".repeat(129), None, MarkerSource::Host), Err(Error::InvalidMarkerName(_))));
    store.add_marker("once", None, MarkerSource::Guest).unwrap();
    assert!(matches!(store.add_marker("once", None, MarkerSource::Host), Err(Error::DuplicateMarker(_))));
    assert!(matches!(store.marker("never"), Err(Error::UnknownMarker(_))));
    assert_eq!(store.head(), 2);
    let existing = dir.path().join("exists.img");
    fs::write(&existing, b"keep me").unwrap();
    assert!(matches!(store.recover(&RecoveryTarget::Seq(1), &existing, &mut |_, _| {}), Err(Error::OutputExists(_))));
    assert_eq!(fs::read(&existing).unwrap(), b"keep me");
    assert_eq!(store.marker("once").unwrap().marker.source, MarkerSource::Guest);
    store.close().unwrap();
}

#[test]
fn an_adopted_image_is_the_state_before_the_first_record() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("existing.img");
    let content: Vec<u8> = (0..128 * 1024).map(|i| (i % 251) as u8).collect();
    fs::write(&image, &content).unwrap();
    let (store, _) = Store::create(&image, None, &CreateOptions::default(), &mut |_, _| {}).unwrap();
    store.write(4096, &[0; 4096]).unwrap();
    let output = dir.path().join("before.img");
    store.recover(&RecoveryTarget::Seq(0), &output, &mut |_, _| {}).unwrap();
    assert!(fs::read(&output).unwrap() == content);
    store.close().unwrap();
}

#[test]
fn snapshot_cost_follows_the_changed_bytes_not_the_volume_size() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 1 << 30);
    for i in 0..16u64 {
        store.write(i * (64 << 20), &[i as u8 + 1; 8192]).unwrap();
    }
    let info = store.take_snapshot().unwrap();
    assert_eq!(info.data_bytes, 16 * 8192);
    assert_eq!(info.extents, 16);
    store.close().unwrap();
}

#[test]
fn a_later_batch_waits_for_an_earlier_overlapping_one_and_reads_wait_for_both() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(new_store(dir.path(), 64 * 1024));
    let older = [1u8; 4096];
    let newer = [2u8; 4096];
    let older_ops = [VolumeOp::Write { offset: 0, data: &[&older] }];
    let first = store.journal(&older_ops).unwrap();
    let second = store.journal(&[VolumeOp::Write { offset: 2048, data: &[&newer] }]).unwrap();
    let disjoint = store.journal(&[VolumeOp::Write { offset: 32768, data: &[&newer] }]).unwrap();
    // A batch that overlaps nothing earlier applies at once.
    store.apply(disjoint, |_| {}).unwrap();
    let later = {
        let store = Arc::clone(&store);
        std::thread::spawn(move || store.apply(second, |_| {}).unwrap())
    };
    let reader = {
        let store = Arc::clone(&store);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 8192];
            store.read(0, &mut buf).unwrap();
            buf
        })
    };
    // Give a wrong early apply or read time to happen before the older batch is applied.
    std::thread::sleep(std::time::Duration::from_millis(50));
    store.apply(first, |_| {}).unwrap();
    assert_eq!(later.join().unwrap(), 2);
    let read = reader.join().unwrap();
    let mut expected = vec![0u8; 8192];
    expected[..2048].fill(1);
    expected[2048..6144].fill(2);
    assert!(read == expected, "the read saw the batches half applied or out of order");
    let mut volume = vec![0u8; 8192];
    store.read(0, &mut volume).unwrap();
    assert!(volume == expected, "the later batch was applied before the earlier one");
    Arc::into_inner(store).unwrap().verify(&mut |_, _| {}).unwrap();
}

#[test]
fn guest_markers_are_limited_in_rate_and_count_and_host_markers_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 64 * 1024);
    // No refill: exactly the burst gets through.
    lock_poisoned(store.writer.lock()).guest_marker_rate = TokenBucket::new(0.0, 5.0);
    for i in 0..5 {
        store.add_marker(&format!("g{i}"), None, MarkerSource::Guest).unwrap();
    }
    assert!(matches!(store.add_marker("g5", None, MarkerSource::Guest), Err(Error::GuestMarkerLimit(_))));
    store.add_marker("host-after-the-burst", None, MarkerSource::Host).unwrap();

    lock_poisoned(store.writer.lock()).guest_marker_rate = TokenBucket::new(0.0, f64::INFINITY);
    for i in 5..marker::MAX_GUEST_MARKERS {
        store.add_marker(&format!("g{i}"), None, MarkerSource::Guest).unwrap();
    }
    let refused = store.add_marker("one-too-many", None, MarkerSource::Guest);
    assert!(matches!(refused, Err(Error::GuestMarkerLimit(ref why)) if why.contains("10000")), "{refused:?}");
    store.add_marker("host-at-the-limit", None, MarkerSource::Host).unwrap();
    store.close().unwrap();

    // The count survives a reopen: it is the store's, not the process's.
    let (store, _) = Store::open(&dir.path().join("disk.img"), None).unwrap();
    assert!(matches!(store.add_marker("after-reopen", None, MarkerSource::Guest), Err(Error::GuestMarkerLimit(_))));
    assert_eq!(store.markers().len(), marker::MAX_GUEST_MARKERS + 2);
}

#[test]
fn markers_read_back_are_validated_and_ids_cannot_overflow() {
    let forged = marker::encode_payload(u64::MAX, MarkerSource::Guest, "fine", None);
    assert_eq!(marker::decode_payload(&forged, 1, 0), None, "an id with no room after it");
    let control = marker::encode_payload(1, MarkerSource::Guest, "bad\u{7}name", None);
    assert_eq!(marker::decode_payload(&control, 1, 0), None, "a control character");
    let long = "x".repeat(marker::MAX_NAME_LEN + 1);
    assert_eq!(marker::decode_payload(&marker::encode_payload(1, MarkerSource::Host, &long, None), 1, 0), None);

    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 64 * 1024);
    store.close().unwrap();
    let store_dir = default_store_dir(&dir.path().join("disk.img"));
    let archive = r#"[{"id": 18446744073709551615, "name": "old", "seq": 0, "time_ns": 1, "source": "host"}]"#;
    std::fs::write(store_dir.join("markers.json"), archive).unwrap();
    assert!(matches!(Store::open(&dir.path().join("disk.img"), None), Err(Error::BadMetadata { .. })));
}

#[test]
fn a_recovery_stops_soon_after_it_is_asked_to_and_leaves_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    // An adopted image full of data: the base snapshot is 192 MiB to copy, three pieces.
    std::fs::write(&image, vec![0x5au8; 192 << 20]).unwrap();
    let (store, _) = Store::create(&image, None, &CreateOptions::default(), &mut |_, _| {}).unwrap();
    let output = dir.path().join("recovered.img");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut reports = 0;
    let recovered = store.recover_unless_stopped(
        &RecoveryTarget::Seq(0),
        &output,
        &mut |_, _| {
            reports += 1;
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        },
        &stop,
    );
    assert!(matches!(recovered, Err(Error::Cancelled)), "{recovered:?}");
    assert_eq!(reports, 1, "it stopped after the first piece");
    assert!(!output.exists(), "the partial output is removed");
    // Not asked to stop, the same recovery completes.
    store.recover(&RecoveryTarget::Seq(0), &output, &mut |_, _| {}).unwrap();
    assert_eq!(std::fs::read(&output).unwrap(), std::fs::read(&image).unwrap());
}

/// Found while fixing what fuzzing found (a snapshot past the journal's head): a snapshot was
/// made durable with the journal records it was compacted from still in the page cache, so a
/// power loss could leave the snapshot area ahead of the journal.
#[test]
fn a_snapshot_is_taken_from_durable_records_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 64 * 1024);
    store.write(0, &[7u8; 4096]).unwrap();
    let info = store.take_snapshot().unwrap();
    assert!(*store.durable.lock().unwrap() >= info.seq, "the journal is durable through the snapshot");
}
