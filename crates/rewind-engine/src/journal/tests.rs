use super::*;

fn records(n: usize) -> Vec<Vec<u8>> {
    (0..n).map(|i| vec![i as u8; 100 + i * 300]).collect()
}

#[test]
fn appended_records_read_back_in_order_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = Journal::create(dir.path(), [1; 16], 4096, 1).unwrap();
    let payloads = records(20);
    for (i, payload) in payloads.iter().enumerate() {
        let pieces: [&[u8]; 1] = [payload];
        let seq = journal
            .append(&[NewRecord {
                kind: RecordKind::Write,
                offset: i as u64 * 512,
                length: payload.len() as u64,
                payload: &pieces,
            }])
            .unwrap();
        assert_eq!(seq, i as u64 + 1);
    }
    assert!(journal.segments().len() > 2);
    let mut seen = Vec::new();
    journal
        .view()
        .for_each(1, 20, Payloads::All, |rec| {
            seen.push((rec.header.seq, rec.header.offset, rec.payload.unwrap().to_vec()));
            Ok(())
        })
        .unwrap();
    let expected: Vec<_> =
        payloads.iter().enumerate().map(|(i, p)| (i as u64 + 1, i as u64 * 512, p.clone())).collect();
    assert_eq!(seen, expected);

    // Reopening finds the same records.
    drop(journal);
    let mut count = 0;
    let (journal, repair) = Journal::open(dir.path(), [1; 16], 4096, 0, Payloads::All, |_| {
        count += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!((count, journal.next_seq(), repair), (20, 21, None));
}

#[test]
fn a_batch_is_one_append_and_freed_segments_are_reused() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = Journal::create(dir.path(), [2; 16], 8192, 1).unwrap();
    let payload = vec![9u8; 1000];
    for _ in 0..10 {
        let pieces: [&[u8]; 2] = [&payload[..300], &payload[300..]];
        let batch: Vec<NewRecord<'_>> =
            (0..4).map(|_| NewRecord { kind: RecordKind::Write, offset: 0, length: 1000, payload: &pieces }).collect();
        journal.append(&batch).unwrap();
    }
    assert_eq!(journal.next_seq(), 41);
    let segments_before = journal.segments().len();
    journal.free_oldest(2).unwrap();
    assert_eq!(journal.segments().len(), segments_before - 2);
    let spares = fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with(SPARE_PREFIX))
        .count();
    assert_eq!(spares, 2);
    // Fill until a new segment is needed: it comes from the spares, and the stale records in
    // it are not mistaken for new ones on reopen.
    while fs::read_dir(dir.path()).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().starts_with(SPARE_PREFIX))
    {
        let pieces: [&[u8]; 1] = [&payload];
        journal.append(&[NewRecord { kind: RecordKind::Write, offset: 0, length: 1000, payload: &pieces }]).unwrap();
    }
    let next = journal.next_seq();
    let first = journal.first_seq();
    drop(journal);
    let (journal, repair) = Journal::open(dir.path(), [2; 16], 8192, 0, Payloads::Skip, |_| Ok(())).unwrap();
    assert_eq!((journal.first_seq(), journal.next_seq(), repair), (first, next, None));
}

/// Found by fuzzing (fuzz/fuzz_targets/journal_open.rs): a journal whose oldest segment starts
/// at the highest number allowed opened, but its next segment, numbered on from there, was
/// then refused as starting at an impossible number, and the journal no longer opened.
#[test]
fn segments_numbered_on_from_the_highest_first_number_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = Journal::create(dir.path(), [3; 16], 4096, MAX_FIRST_SEQ).unwrap();
    let payload = vec![7u8; 3000];
    let pieces: [&[u8]; 1] = [&payload];
    for _ in 0..3 {
        journal.append(&[NewRecord { kind: RecordKind::Write, offset: 0, length: 3000, payload: &pieces }]).unwrap();
    }
    assert_eq!(journal.segments().len(), 3);
    drop(journal);
    let (journal, repair) = Journal::open(dir.path(), [3; 16], 4096, 0, Payloads::All, |_| Ok(())).unwrap();
    assert_eq!((journal.first_seq(), journal.next_seq(), repair), (MAX_FIRST_SEQ, MAX_FIRST_SEQ + 3, None));

    // The oldest segment alone is held to the limit.
    let dir = tempfile::tempdir().unwrap();
    drop(Journal::create(dir.path(), [3; 16], 4096, MAX_FIRST_SEQ + 1).unwrap());
    let refused = Journal::open(dir.path(), [3; 16], 4096, 1, Payloads::All, |_| Ok(()));
    assert!(matches!(refused, Err(Error::JournalCorrupt { .. })));
}

/// Found by fuzzing (fuzz/fuzz_targets/journal_open.rs): bytes past a segment's capacity and
/// past its last record (here a torn write's, or a reused segment's oversized record's) were
/// left in place, and an append that then filled the segment, with no room for the zeroed
/// header that ends the records, made the next open find them after its record: a torn tail.
#[test]
fn bytes_past_the_capacity_never_follow_a_full_segment_s_last_record() {
    let append_to_capacity = |journal: &mut Journal| {
        let payload = vec![5u8; (4096 - journal.active().end - HEADER_LEN as u64) as usize];
        let pieces: [&[u8]; 1] = [&payload];
        let record = NewRecord { kind: RecordKind::Write, offset: 0, length: payload.len() as u64, payload: &pieces };
        journal.append(&[record]).unwrap();
        assert_eq!(journal.active().end, 4096);
        journal.next_seq()
    };
    let reopen = |dir: &Path| Journal::open(dir, [4; 16], 4096, 0, Payloads::All, |_| Ok(())).unwrap();

    // The active segment: junk past its capacity, after zeroes that end its records.
    let dir = tempfile::tempdir().unwrap();
    drop(Journal::create(dir.path(), [4; 16], 4096, 1).unwrap());
    let path = dir.path().join(Segment::file_name(0));
    let mut bytes = fs::read(&path).unwrap();
    bytes.resize(4096, 0);
    bytes.extend_from_slice(&[0xff; 67]);
    fs::write(&path, &bytes).unwrap();
    let (mut journal, repair) = reopen(dir.path());
    assert_eq!(repair, None);
    let next = append_to_capacity(&mut journal);
    drop(journal);
    let (journal, repair) = reopen(dir.path());
    assert_eq!((journal.next_seq(), repair), (next, None));

    // A spare longer than the capacity, reused for the next segment.
    fs::write(dir.path().join(format!("{SPARE_PREFIX}0000000000000009.seg")), vec![0xee; 6000]).unwrap();
    let mut journal = journal;
    let payload = [1u8; 100];
    let pieces: [&[u8]; 1] = [&payload];
    journal.append(&[NewRecord { kind: RecordKind::Write, offset: 0, length: 100, payload: &pieces }]).unwrap();
    assert_eq!(journal.active().index, 1, "rolled over into the spare");
    let next = append_to_capacity(&mut journal);
    drop(journal);
    let (journal, repair) = reopen(dir.path());
    assert_eq!((journal.next_seq(), repair), (next, None));
}

#[test]
fn a_segment_of_another_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(Journal::create(dir.path(), [3; 16], 8192, 1).unwrap());
    let result = Journal::open(dir.path(), [4; 16], 8192, 0, Payloads::Skip, |_| Ok(()));
    assert!(matches!(result, Err(Error::JournalCorrupt { .. })));
}

#[test]
fn time_lookup_uses_record_timestamps() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = Journal::create(dir.path(), [5; 16], 1 << 20, 1).unwrap();
    let mut times = Vec::new();
    for _ in 0..5 {
        journal.append(&[NewRecord { kind: RecordKind::Marker, offset: 0, length: 0, payload: &[] }]).unwrap();
        times.push(journal.active().last_timestamp_ns);
    }
    let view = journal.view();
    assert_eq!(view.last_at_or_before(times[0] - 1).unwrap(), None);
    assert_eq!(view.last_at_or_before(u64::MAX).unwrap(), Some(5));
    let found = view.last_at_or_before(times[2]).unwrap().unwrap();
    assert!(found >= 3 && times[found as usize - 1] <= times[2]);
}

#[test]
fn sealed_segments_stay_sync_targets_until_synced() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = Journal::create(dir.path(), [6; 16], 4096, 1).unwrap();
    let payload = vec![1u8; 3000];
    for _ in 0..3 {
        let pieces: [&[u8]; 1] = [&payload];
        journal.append(&[NewRecord { kind: RecordKind::Write, offset: 0, length: 3000, payload: &pieces }]).unwrap();
    }
    // Three records of ~3 KiB in 4 KiB segments: two sealed segments, the directory once per
    // segment added after the first (which `create` made durable), and the active segment.
    let targets = journal.sync_targets();
    assert_eq!(targets.len(), 5);
    assert!(Arc::ptr_eq(targets.last().unwrap(), &journal.active_file()));
    journal.mark_synced(&targets[..4]);
    assert_eq!(journal.sync_targets().len(), 1, "only the active segment is left to sync");
    // Freed segments are no longer sync targets either.
    let pieces: [&[u8]; 1] = [&payload];
    journal.append(&[NewRecord { kind: RecordKind::Write, offset: 0, length: 3000, payload: &pieces }]).unwrap();
    assert_eq!(journal.sync_targets().len(), 3, "the sealed segment, the directory, the active one");
    journal.free_oldest(journal.segments().len() - 1).unwrap();
    assert_eq!(journal.sync_targets().len(), 2, "the freed segment is no target; the directory still is");
}

#[test]
fn zero_filled_spares_are_used_in_order_and_uncached_segments_read_back() {
    // On the disk the project is built on, not in memory, where spares are not zero-filled.
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    let on_disk = !fsutil_in_memory(dir.path());
    let mut journal = Journal::create(dir.path(), [9; 16], 4096, 1).unwrap();
    let preparer = SparePreparer::spawn(dir.path(), 4096);
    journal.use_preparer(&preparer);
    // Sealed segments are also written back and dropped from the cache: they must read back.
    let dropper = CacheDropper::spawn(Arc::new(AtomicU64::new(Seq::MAX)));
    journal.use_cache_dropper(&dropper);
    // Records across many segments, some of them zero-filled spares made meanwhile.
    let payloads = records(12);
    for payload in &payloads {
        let pieces: [&[u8]; 1] = [payload];
        let record = NewRecord { kind: RecordKind::Write, offset: 0, length: payload.len() as u64, payload: &pieces };
        journal.append(&[record]).unwrap();
    }
    drop(preparer);
    drop(dropper);
    for segment in journal.segments() {
        fsutil::write_back_and_uncache(&segment.file, segment.end).unwrap();
    }
    let mut seen = Vec::new();
    journal
        .view()
        .for_each(1, 12, Payloads::All, |rec| {
            seen.push(rec.payload.unwrap().to_vec());
            Ok(())
        })
        .unwrap();
    assert_eq!(seen, payloads);
    // With no spare left, one is reserved, then one is zero-filled (on disk); roll-overs take
    // a freed segment first, then a zero-filled one, then a reserved one.
    for spare in spare_paths(dir.path()).unwrap() {
        fs::remove_file(spare).unwrap();
    }
    assert!(reserve_spare(dir.path(), 4096).unwrap());
    assert!(!reserve_spare(dir.path(), 4096).unwrap(), "no second reserved spare");
    assert_eq!(zero_fill_spare(dir.path(), 4096, || Ok(())).unwrap(), on_disk);
    assert!(!zero_fill_spare(dir.path(), 4096, || Ok(())).unwrap(), "no second zero-filled spare");
    journal.free_oldest(1).unwrap();
    let spares: Vec<String> = spare_paths(dir.path())
        .unwrap()
        .iter()
        .map(|s| s.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(spares.len(), 2 + on_disk as usize, "{spares:?}");
    assert!(spares[0].starts_with("spare-0"), "{spares:?}");
    assert!(spares[spares.len() - 1].starts_with("spare-zz"), "{spares:?}");
    if on_disk {
        assert!(spares[1].starts_with("spare-z") && !spares[1].starts_with("spare-zz"), "{spares:?}");
    }
    // Stopped half-way, a preparation leaves nothing behind.
    for spare in spare_paths(dir.path()).unwrap() {
        fs::remove_file(spare).unwrap();
    }
    let stop = || Err(std::io::Error::new(std::io::ErrorKind::Interrupted, "stop"));
    assert_eq!(zero_fill_spare(dir.path(), 4 << 20, stop).is_err(), on_disk);
    assert!(spare_paths(dir.path()).unwrap().is_empty());
    let leftovers = fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with(PREPARING_PREFIX));
    assert_eq!(leftovers.count(), 0);
    let reopened = Journal::open(dir.path(), [9; 16], 4096, 0, Payloads::All, |_| Ok(())).unwrap().0;
    assert_eq!(reopened.next_seq(), 13);
}

fn fsutil_in_memory(dir: &Path) -> bool {
    let probe = dir.join("probe");
    let made = fsutil::create_zeroed(&probe, 4096, || Ok(())).unwrap();
    let _ = fs::remove_file(probe);
    !made
}
