//! Point-in-time views against a reference model and against recovery: after any mix of
//! writes, zeroes, discards, snapshots and retention, a view of any recoverable point reads the
//! model's bytes at that point (whole and in random pieces), equal to what recovery writes; and
//! views held open while the store goes on (more writes, snapshots, retention that would free
//! and merge what they read) still read their point's bytes, until they are dropped.

use proptest::prelude::*;
use rewind_engine::journal::Seq;
use rewind_engine::recovery::RecoveryTarget;
use rewind_engine::retention::RetentionPolicy;
use rewind_engine::view::PointView;
use rewind_engine::{CreateOptions, Error, Store};

#[path = "common/small_volume.rs"]
mod small_volume;
use small_volume::{pattern, range, SECTOR, VOLUME};

#[derive(Debug, Clone)]
enum Op {
    Write {
        sector: u64,
        sectors: u64,
        seed: u8,
    },
    WriteZeroes {
        sector: u64,
        sectors: u64,
    },
    Discard {
        sector: u64,
        sectors: u64,
    },
    Snapshot,
    Retention {
        max_bytes: u64,
    },
    /// Open a view of a point chosen by `probe` and keep it to the end.
    OpenView {
        probe: u64,
    },
    /// Drop the oldest view kept so far.
    CloseView,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (range(), any::<u8>()).prop_map(|((sector, sectors), seed)| Op::Write { sector, sectors, seed }),
        2 => range().prop_map(|(sector, sectors)| Op::WriteZeroes { sector, sectors }),
        2 => range().prop_map(|(sector, sectors)| Op::Discard { sector, sectors }),
        2 => Just(Op::Snapshot),
        3 => (0u64..40_000).prop_map(|max_bytes| Op::Retention { max_bytes }),
        2 => any::<u64>().prop_map(|probe| Op::OpenView { probe }),
        1 => Just(Op::CloseView),
    ]
}

/// The volume after every sequence number: states[s] is the volume after record s.
struct Model {
    states: Vec<Vec<u8>>,
}

impl Model {
    fn change(&mut self, offset: u64, bytes: &[u8]) -> Seq {
        let mut next = self.states.last().expect("initial state").clone();
        next[offset as usize..offset as usize + bytes.len()].copy_from_slice(bytes);
        self.states.push(next);
        self.states.len() as Seq - 1
    }

    fn point(&mut self) -> Seq {
        let same = self.states.last().expect("initial state").clone();
        self.states.push(same);
        self.states.len() as Seq - 1
    }
}

/// Reads the whole view, and random pieces of it, against `expected`.
fn check_view(view: &PointView, expected: &[u8], salt: u64) {
    let mut whole = vec![0u8; VOLUME as usize];
    view.read(0, &mut whole).unwrap();
    assert!(whole == expected, "view of seq {} differs from the model", view.seq());
    let mut x = salt | 1;
    for _ in 0..16 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let offset = x % VOLUME;
        let len = (x >> 20) % (VOLUME - offset) + 1;
        let mut piece = vec![0u8; len as usize];
        view.read(offset, &mut piece).unwrap();
        assert!(
            piece == expected[offset as usize..(offset + len) as usize],
            "piece {offset}+{len} of seq {}",
            view.seq()
        );
    }
    assert!(matches!(view.read(VOLUME - 1, &mut [0u8; 2]), Err(Error::OutOfRange { .. })));
}

fn recoverable(store: &Store, seq: Seq) -> bool {
    let status = store.status();
    seq <= status.head && (seq >= status.oldest_recoverable || status.snapshots.iter().any(|s| s.seq == seq))
}

fn run(ops: Vec<Op>, probes: Vec<u64>) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let options = CreateOptions { size: Some(VOLUME), segment_capacity: 8192, retention: RetentionPolicy::default() };
    let store = Store::create(&image, None, &options, &mut |_, _| {}).unwrap().0;
    let mut model = Model { states: vec![vec![0; VOLUME as usize]] };
    let mut held: Vec<PointView> = Vec::new();
    for (i, op) in ops.into_iter().enumerate() {
        match op {
            Op::Write { sector, sectors, seed } => {
                let data = pattern(seed, (sectors * SECTOR) as usize, i as u64);
                assert_eq!(store.write(sector * SECTOR, &data).unwrap(), model.change(sector * SECTOR, &data));
            }
            Op::WriteZeroes { sector, sectors } => {
                let seq = store.write_zeroes(sector * SECTOR, sectors * SECTOR).unwrap();
                assert_eq!(seq, model.change(sector * SECTOR, &vec![0; (sectors * SECTOR) as usize]));
            }
            Op::Discard { sector, sectors } => {
                let seq = store.discard(sector * SECTOR, sectors * SECTOR).unwrap();
                assert_eq!(seq, model.change(sector * SECTOR, &vec![0; (sectors * SECTOR) as usize]));
            }
            Op::Snapshot => assert_eq!(store.take_snapshot().unwrap().seq, model.point()),
            Op::Retention { max_bytes } => {
                let mut policy = store.retention();
                policy.max_bytes = Some(max_bytes);
                store.set_retention(policy).unwrap();
                store.enforce_retention().unwrap();
                let status = store.status();
                for view in held.iter().filter(|v| v.seq() > v.snapshot_seq()) {
                    assert!(status.first_seq <= view.snapshot_seq() + 1, "retention freed records a view reads");
                }
            }
            Op::OpenView { probe } => {
                let seq = probe % (store.head() + 1);
                match store.point_view(&RecoveryTarget::Seq(seq)) {
                    Ok(view) => held.push(view),
                    Err(Error::Unrecoverable { .. }) => assert!(!recoverable(&store, seq), "seq {seq} refused"),
                    Err(e) => panic!("view of seq {seq}: {e}"),
                }
            }
            Op::CloseView => {
                if !held.is_empty() {
                    held.remove(0);
                }
            }
        }
        assert_eq!(store.status().view_pins.len(), held.len());
    }
    for (i, view) in held.iter().enumerate() {
        check_view(view, &model.states[view.seq() as usize], i as u64);
    }
    drop(held);
    assert!(store.status().view_pins.is_empty(), "dropped views still pin the store");
    for (i, probe) in probes.into_iter().enumerate() {
        let seq = probe % (store.head() + 2);
        let view = match store.point_view(&RecoveryTarget::Seq(seq)) {
            Ok(view) => view,
            Err(Error::Unrecoverable { .. }) => {
                assert!(!recoverable(&store, seq), "seq {seq} refused although recoverable");
                continue;
            }
            Err(e) => panic!("view of seq {seq}: {e}"),
        };
        check_view(&view, &model.states[seq as usize], probe);
        let output = dir.path().join(format!("recovered-{i}.img"));
        store.recover(&RecoveryTarget::Seq(seq), &output, &mut |_, _| {}).unwrap();
        let mut through_view = vec![0u8; VOLUME as usize];
        view.read(0, &mut through_view).unwrap();
        assert!(std::fs::read(&output).unwrap() == through_view, "view and recovery of seq {seq} differ");
    }
    store.close().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, .. ProptestConfig::default() })]

    #[test]
    fn views_read_the_model_and_equal_recovery(
        ops in proptest::collection::vec(op(), 1..60),
        probes in proptest::collection::vec(any::<u64>(), 6),
    ) {
        run(ops, probes);
    }
}

/// An open view keeps the journal after its snapshot and stops merges into the base; closing
/// it lets retention free and merge again.
#[test]
fn retention_keeps_what_an_open_view_reads_until_it_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let options = CreateOptions { size: Some(VOLUME), segment_capacity: 8192, retention: RetentionPolicy::default() };
    let store = Store::create(&image, None, &options, &mut |_, _| {}).unwrap().0;
    let mut model = Model { states: vec![vec![0; VOLUME as usize]] };
    for i in 0..40u64 {
        let data = pattern(i as u8, 4096, i);
        store.write((i % 16) * 4096, &data).unwrap();
        model.change((i % 16) * 4096, &data);
    }
    store.take_snapshot().unwrap();
    model.point();
    let point = store.head();
    let view = store.point_view(&RecoveryTarget::Seq(point)).unwrap();
    let pins = store.status().view_pins;
    assert_eq!(pins.len(), 1);
    assert_eq!((pins[0].seq, pins[0].snapshot_seq), (point, point));
    // A view of a point between snapshots, which reads records from the journal too.
    let mid_point = point - 5;
    let mid_view = store.point_view(&RecoveryTarget::Seq(mid_point)).unwrap();
    assert!(mid_view.snapshot_seq() < mid_point);

    for i in 0..80u64 {
        let data = pattern(200u8.wrapping_add(i as u8), 4096, i);
        store.write((i % 16) * 4096, &data).unwrap();
        model.change((i % 16) * 4096, &data);
        if i % 20 == 19 {
            store.take_snapshot().unwrap();
            model.point();
        }
    }
    let mut policy = store.retention();
    policy.max_bytes = Some(0);
    store.set_retention(policy.clone()).unwrap();
    let report = store.enforce_retention().unwrap();
    assert_eq!(report.merged_into_base, 0, "merged into the base under an open view");
    let status = store.status();
    assert!(status.first_seq <= mid_view.snapshot_seq() + 1, "freed records an open view reads");
    check_view(&view, &model.states[point as usize], 1);
    check_view(&mid_view, &model.states[mid_point as usize], 2);

    drop(view);
    drop(mid_view);
    assert!(store.status().view_pins.is_empty());
    let report = store.enforce_retention().unwrap();
    assert!(report.freed_segments > 0 && report.merged_into_base > 0, "closing the views released nothing: {report:?}");
    store.close().unwrap();
}

/// Writes to an export land in its overlay only: reads see them over the point, the live
/// volume and the store are unchanged, promote writes exactly what the export reads, and the
/// overlay file goes with the export.
#[test]
fn an_export_writes_to_its_overlay_only_and_promotes_to_what_it_reads() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let options = CreateOptions { size: Some(VOLUME), segment_capacity: 8192, retention: RetentionPolicy::default() };
    let store = Store::create(&image, None, &options, &mut |_, _| {}).unwrap().0;
    let mut model = Model { states: vec![vec![0; VOLUME as usize]] };
    for i in 0..20u64 {
        let data = pattern(i as u8, 8192, i);
        store.write((i * 4096) % (VOLUME - 8192), &data).unwrap();
        model.change((i * 4096) % (VOLUME - 8192), &data);
    }
    let point = store.head() - 3;
    let overlay = dir.path().join("export.overlay");
    let export =
        rewind_engine::export::PointExport::create(store.point_view(&RecoveryTarget::Seq(point)).unwrap(), &overlay)
            .unwrap();
    let mut expected = model.states[point as usize].clone();
    let written = pattern(77, 3 * 512, 5);
    let (first, second) = written.split_at(1000);
    export.write(&[rewind_engine::VolumeOp::Write { offset: 1536, data: &[first, second] }]).unwrap();
    expected[1536..1536 + written.len()].copy_from_slice(&written);
    export.write(&[rewind_engine::VolumeOp::Discard { offset: 16384, len: 4096 }]).unwrap();
    expected[16384..20480].fill(0);
    assert!(matches!(
        export.write(&[rewind_engine::VolumeOp::WriteZeroes { offset: VOLUME - 512, len: 1024 }]),
        Err(Error::OutOfRange { .. })
    ));
    let mut got = vec![0u8; VOLUME as usize];
    export.read(0, &mut got).unwrap();
    assert!(got == expected, "the export does not read the point with its writes over it");
    let mut piece = vec![0u8; 2048];
    export.read(1024, &mut piece).unwrap();
    assert!(piece == expected[1024..3072]);
    assert_eq!(export.overlay_bytes(), written.len() as u64 + 4096);

    let promoted = dir.path().join("promoted.img");
    export.promote(&promoted, &mut |_, _| {}, &std::sync::atomic::AtomicBool::new(false)).unwrap();
    assert!(std::fs::read(&promoted).unwrap() == expected, "promote differs from the export");
    assert!(matches!(
        export.promote(&promoted, &mut |_, _| {}, &std::sync::atomic::AtomicBool::new(false)),
        Err(Error::OutputExists(_))
    ));
    let stopped = dir.path().join("stopped.img");
    assert!(matches!(
        export.promote(&stopped, &mut |_, _| {}, &std::sync::atomic::AtomicBool::new(true)),
        Err(Error::Cancelled)
    ));
    assert!(!stopped.exists());

    assert!(std::fs::read(&image).unwrap() == *model.states.last().unwrap(), "the live volume changed");
    assert_eq!(store.head(), model.states.len() as Seq - 1, "the export journaled something");
    drop(export);
    assert!(!overlay.exists(), "the overlay outlived its export");
    store.verify(&mut |_, _| {}).unwrap();
    store.close().unwrap();
}

/// A new store on the small volume whose journal segments hold a few records each, and its
/// model.
fn small_segment_store(dir: &std::path::Path) -> (std::path::PathBuf, Store, Model) {
    let image = dir.join("disk.img");
    let options = CreateOptions { size: Some(VOLUME), segment_capacity: 8192, retention: RetentionPolicy::default() };
    let store = Store::create(&image, None, &options, &mut |_, _| {}).unwrap().0;
    (image, store, Model { states: vec![vec![0; VOLUME as usize]] })
}

/// The `i`th of a run of 1.5 KiB writes, each overlapping the one before.
fn write_nth(store: &Store, model: &mut Model, i: u64) {
    let data = pattern(i as u8, 1536, i);
    let offset = (i * 1024) % (VOLUME - 1536);
    assert_eq!(store.write(offset, &data).unwrap(), model.change(offset, &data));
}

/// The header indexes of a store's journal directory, by path, with their bytes.
fn header_indexes(image: &std::path::Path) -> std::collections::BTreeMap<std::path::PathBuf, Vec<u8>> {
    let journal = image.with_file_name("disk.img.rewind").join("journal");
    std::fs::read_dir(journal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "idx"))
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect()
}

/// A sealed segment without a header index gets one from the first view that walks it: the
/// same bytes as the index written when a segment is sealed, and views read the model through
/// it. That covers the segment that was active when the store was opened (sealed with no
/// index, its earlier records unknown to the new process) and indexes removed or damaged.
#[test]
fn views_index_the_sealed_segments_they_walk() {
    let dir = tempfile::tempdir().unwrap();
    let (image, store, mut model) = small_segment_store(dir.path());
    for i in 0..42 {
        write_nth(&store, &mut model, i);
    }
    // Indexes written at sealing, removed: a view of a point inside the journal (so the walk
    // of its last segment goes past the point) writes them again, byte for byte.
    let sealed_indexes = header_indexes(&image);
    assert!(sealed_indexes.len() >= 4, "segments sealed by this process are indexed: {sealed_indexes:?}");
    for path in sealed_indexes.keys() {
        std::fs::remove_file(path).unwrap();
    }
    let view = store.point_view(&RecoveryTarget::Seq(20)).unwrap();
    check_view(&view, &model.states[20], 1);
    drop(view);
    // (The first segment of a new journal is sealed without one.)
    let rewritten = header_indexes(&image);
    let compared: Vec<_> =
        rewritten.iter().filter_map(|(path, bytes)| Some((path, bytes, sealed_indexes.get(path)?))).collect();
    assert!(!compared.is_empty(), "the view indexed the segments it walked: {:?}", rewritten.keys());
    for (path, bytes, at_sealing) in compared {
        assert_eq!(bytes, at_sealing, "{} as written at sealing", path.display());
    }
    store.close().unwrap();

    // The segment active at the reopen is sealed without an index; the next view indexes it.
    let store = Store::open(&image, None).unwrap().0;
    for i in 42..90 {
        write_nth(&store, &mut model, i);
    }
    let head = store.head();
    let view = store.point_view(&RecoveryTarget::Seq(head)).unwrap();
    check_view(&view, &model.states[head as usize], 2);
    drop(view);
    let after = header_indexes(&image);
    let journal = image.with_file_name("disk.img.rewind").join("journal");
    let segments = std::fs::read_dir(journal)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".seg") && !name.starts_with("spare"))
        .count();
    assert_eq!(after.len(), segments - 1, "every sealed segment is indexed (not the active one): {:?}", after.keys());
    // The view over every segment now uses indexes only; damage one and it is walked (and
    // indexed) again, with the same bytes.
    let (damaged, bytes) = after.iter().next().unwrap();
    let mut bytes = bytes.clone();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(damaged, &bytes).unwrap();
    for seq in [1, 20, 45, 70, head] {
        let view = store.point_view(&RecoveryTarget::Seq(seq)).unwrap();
        check_view(&view, &model.states[seq as usize], 3 + seq);
    }
    assert_eq!(header_indexes(&image), after, "the damaged index was written again");
    store.close().unwrap();
}

/// Views find records through the segments' header indexes where they are usable and by
/// walking the segments where they are not (active when the store was reopened, damaged,
/// missing), with the same bytes either way.
#[test]
fn views_read_the_same_with_header_indexes_missing_or_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let (image, store, mut model) = small_segment_store(dir.path());
    for i in 0..40 {
        write_nth(&store, &mut model, i);
    }
    store.close().unwrap();
    let store = Store::open(&image, None).unwrap().0;
    for i in 40..80 {
        write_nth(&store, &mut model, i);
    }
    let indexes = || -> Vec<std::path::PathBuf> { header_indexes(&image).into_keys().collect() };
    assert!(indexes().len() >= 2, "segments sealed by this process are indexed: {:?}", indexes());
    let check = |salt: u64| {
        for seq in [1, 20, 45, 60, store.head()] {
            let view = store.point_view(&RecoveryTarget::Seq(seq)).unwrap();
            check_view(&view, &model.states[seq as usize], salt + seq);
        }
    };
    check(0);
    let damaged = &indexes()[0];
    let mut bytes = std::fs::read(damaged).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(damaged, bytes).unwrap();
    std::fs::remove_file(&indexes()[1]).unwrap();
    check(100);
    store.close().unwrap();
}
