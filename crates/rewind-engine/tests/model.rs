//! The engine against a reference model: an in-memory volume and its full history. After any
//! mix of writes, zeroes, discards, markers, snapshots, retention, syncs, clean reopenings and
//! crashes, the live volume equals the model's newest state, recovery to every retained marker
//! and to random sequence numbers gives the model's bytes at that point, and points outside the
//! recoverable range are refused with an error naming the range.

use std::collections::BTreeMap;
use std::path::Path;

use proptest::prelude::*;
use rewind_engine::journal::Seq;
use rewind_engine::marker::MarkerSource;
use rewind_engine::recovery::RecoveryTarget;
use rewind_engine::retention::RetentionPolicy;
use rewind_engine::{CreateOptions, Error, Store, VolumeOp};

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
    /// Several writes journaled as one batch.
    Batch(Vec<(u64, u64, u8)>),
    WriteZeroes {
        sector: u64,
        sectors: u64,
    },
    Discard {
        sector: u64,
        sectors: u64,
    },
    Marker,
    Snapshot,
    Retention {
        max_bytes: u64,
    },
    Sync,
    Reopen,
    /// Drop the store without closing it: what kill -9 leaves (the page cache survives).
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (range(), any::<u8>()).prop_map(|((sector, sectors), seed)| Op::Write { sector, sectors, seed }),
        2 => proptest::collection::vec((range(), any::<u8>()).prop_map(|((a, b), c)| (a, b, c)), 1..5).prop_map(Op::Batch),
        2 => range().prop_map(|(sector, sectors)| Op::WriteZeroes { sector, sectors }),
        2 => range().prop_map(|(sector, sectors)| Op::Discard { sector, sectors }),
        2 => Just(Op::Marker),
        1 => Just(Op::Snapshot),
        2 => (0u64..40_000).prop_map(|max_bytes| Op::Retention { max_bytes }),
        1 => Just(Op::Sync),
        1 => Just(Op::Reopen),
        1 => Just(Op::Crash),
    ]
}

/// What the model knows: the volume after every sequence number.
struct Model {
    /// states[s] is the volume after record s; states[0] is the initial volume.
    states: Vec<Vec<u8>>,
    markers: BTreeMap<String, Seq>,
}

impl Model {
    fn new() -> Self {
        Self { states: vec![vec![0u8; VOLUME as usize]], markers: BTreeMap::new() }
    }

    fn head(&self) -> Seq {
        self.states.len() as Seq - 1
    }

    /// Records a record that does not change the volume (a marker or a snapshot).
    fn record_point(&mut self) -> Seq {
        let last = self.states.last().expect("initial state").clone();
        self.states.push(last);
        self.head()
    }

    fn record_change(&mut self, offset: u64, bytes: &[u8]) -> Seq {
        let mut next = self.states.last().expect("initial state").clone();
        next[offset as usize..offset as usize + bytes.len()].copy_from_slice(bytes);
        self.states.push(next);
        self.head()
    }
}

fn open(image: &Path) -> Store {
    Store::open(image, None).expect("open").0
}

fn check_recovery(store: &Store, model: &Model, dir: &Path, target: RecoveryTarget, seq: Seq, counter: &mut u32) {
    *counter += 1;
    let output = dir.join(format!("recovered-{counter}.img"));
    let status = store.status();
    let pinned = status.snapshots.iter().any(|s| s.seq == seq);
    let recoverable = seq <= status.head && (seq >= status.oldest_recoverable || pinned);
    match store.recover(&target, &output, &mut |_, _| {}) {
        Ok(report) => {
            assert!(recoverable, "{target} recovered although outside {}..={}", status.oldest_recoverable, status.head);
            assert_eq!(report.seq, seq);
            let bytes = std::fs::read(&output).unwrap();
            assert!(bytes == model.states[seq as usize], "recovery to {target} (seq {seq}) differs from the model");
            std::fs::remove_file(&output).unwrap();
        }
        Err(Error::Unrecoverable { oldest, head, .. }) => {
            assert!(!recoverable, "{target} refused although inside {oldest}..={head}");
            assert_eq!((oldest, head), (status.oldest_recoverable, status.head));
            assert!(!output.exists(), "a refused recovery left an output file");
        }
        Err(other) => panic!("recovery to {target} failed: {other}"),
    }
}

fn run(ops: Vec<Op>, keep_marker_snapshots: bool, probes: Vec<u64>) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let options = CreateOptions {
        size: Some(VOLUME),
        segment_capacity: 8192,
        retention: RetentionPolicy { keep_marker_snapshots, ..Default::default() },
    };
    let mut store = Some(Store::create(&image, None, &options, &mut |_, _| {}).unwrap().0);
    let mut model = Model::new();
    let mut oldest_seen = 0;
    for (i, op) in ops.into_iter().enumerate() {
        let s = store.as_ref().unwrap();
        match op {
            Op::Write { sector, sectors, seed } => {
                let data = pattern(seed, (sectors * SECTOR) as usize, i as u64);
                let seq = s.write(sector * SECTOR, &data).unwrap();
                assert_eq!(seq, model.record_change(sector * SECTOR, &data));
            }
            Op::Batch(writes) => {
                let datas: Vec<(u64, Vec<u8>)> = writes
                    .iter()
                    .map(|&(sector, sectors, seed)| {
                        (sector * SECTOR, pattern(seed, (sectors * SECTOR) as usize, i as u64))
                    })
                    .collect();
                // Split each write's data in two pieces, as a scattered guest buffer would be.
                let pieces: Vec<[&[u8]; 2]> = datas
                    .iter()
                    .map(|(_, d)| {
                        let (a, b) = d.split_at(d.len() / 2);
                        [a, b]
                    })
                    .collect();
                let ops: Vec<VolumeOp<'_>> = datas
                    .iter()
                    .zip(&pieces)
                    .map(|((offset, _), p)| VolumeOp::Write { offset: *offset, data: p })
                    .collect();
                let last = s.submit(&ops).unwrap();
                for (offset, data) in &datas {
                    model.record_change(*offset, data);
                }
                assert_eq!(last, model.head());
            }
            Op::WriteZeroes { sector, sectors } => {
                let seq = s.write_zeroes(sector * SECTOR, sectors * SECTOR).unwrap();
                assert_eq!(seq, model.record_change(sector * SECTOR, &vec![0; (sectors * SECTOR) as usize]));
            }
            Op::Discard { sector, sectors } => {
                let seq = s.discard(sector * SECTOR, sectors * SECTOR).unwrap();
                assert_eq!(seq, model.record_change(sector * SECTOR, &vec![0; (sectors * SECTOR) as usize]));
            }
            Op::Marker => {
                let name = format!("marker-{i}");
                let marker = s.add_marker(&name, Some("from the model test"), MarkerSource::Host).unwrap();
                assert_eq!(marker.seq, model.record_point());
                model.markers.insert(name, marker.seq);
            }
            Op::Snapshot => {
                let info = s.take_snapshot().unwrap();
                assert_eq!(info.seq, model.record_point());
            }
            Op::Retention { max_bytes } => {
                let mut policy = s.retention();
                policy.max_bytes = Some(max_bytes);
                s.set_retention(policy).unwrap();
                s.enforce_retention().unwrap();
            }
            Op::Sync => {
                assert_eq!(s.sync().unwrap(), model.head());
            }
            Op::Reopen => {
                store.take().unwrap().close().unwrap();
                store = Some(open(&image));
            }
            Op::Crash => {
                drop(store.take());
                store = Some(open(&image));
            }
        }
        let s = store.as_ref().unwrap();
        let status = s.status();
        assert_eq!(status.head, model.head());
        assert!(status.oldest_recoverable >= oldest_seen, "the oldest recoverable point moved back");
        oldest_seen = status.oldest_recoverable;
    }

    let s = store.take().unwrap();
    let volume = std::fs::read(&image).unwrap();
    assert!(volume == *model.states.last().unwrap(), "the live volume differs from the model's newest state");

    let status = s.status();
    let mut counter = 0;
    for listed in s.markers() {
        let seq = model.markers[&listed.marker.name];
        assert_eq!(listed.marker.seq, seq);
        let pinned = status.snapshots.iter().any(|snap| snap.seq == seq);
        assert_eq!(
            listed.expired,
            seq < status.oldest_recoverable && !pinned,
            "expired flag of {}",
            listed.marker.name
        );
        if keep_marker_snapshots {
            assert!(!listed.expired, "marker {} expired although marker snapshots are kept", listed.marker.name);
        }
        check_recovery(&s, &model, dir.path(), RecoveryTarget::Marker(listed.marker.name.clone()), seq, &mut counter);
    }
    assert_eq!(s.markers().len(), model.markers.len());
    for probe in probes {
        let seq = probe % (model.head() + 2);
        if seq > model.head() {
            let err =
                s.recover(&RecoveryTarget::Seq(seq), &dir.path().join("past-head.img"), &mut |_, _| {}).unwrap_err();
            assert!(matches!(err, Error::Unrecoverable { .. }), "{err}");
            continue;
        }
        check_recovery(&s, &model, dir.path(), RecoveryTarget::Seq(seq), seq, &mut counter);
    }
    check_recovery(
        &s,
        &model,
        dir.path(),
        RecoveryTarget::Seq(status.oldest_recoverable),
        status.oldest_recoverable,
        &mut counter,
    );
    let report = s.verify(&mut |_, _| {}).unwrap();
    assert_eq!(report.head, model.head());
    s.close().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, .. ProptestConfig::default() })]

    #[test]
    fn engine_matches_the_model(ops in proptest::collection::vec(op(), 1..60), probes in proptest::collection::vec(any::<u64>(), 6)) {
        run(ops, false, probes);
    }

    #[test]
    fn markers_outlive_the_journal_when_marker_snapshots_are_kept(ops in proptest::collection::vec(op(), 1..60), probes in proptest::collection::vec(any::<u64>(), 4)) {
        run(ops, true, probes);
    }
}
