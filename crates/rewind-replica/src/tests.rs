//! The shipper and the replica reader against object_store's in-memory backend: what a store
//! ships is what a recovery from the replica alone rebuilds, byte for byte.

use std::path::Path;
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::memory::InMemory;
use object_store::throttle::{ThrottleConfig, ThrottledStore};
use object_store::ObjectStore;
use rewind_engine::marker::MarkerSource;
use rewind_engine::recovery::RecoveryTarget;
use rewind_engine::retention::RetentionPolicy;
use rewind_engine::store::CreateOptions;
use rewind_engine::Store;

use crate::layout::{self, PartOf, MANIFEST_KEY};
use crate::restore::list_journal;
use crate::ship::Rebase;
use crate::{Error, Remote, Replica, ReplicationEvent, Shipper, ShipperConfig};

const VOLUME: u64 = 1 << 20;
const BLOCK: usize = 4096;

fn remote(objects: &Arc<InMemory>) -> Remote {
    let store: Arc<dyn ObjectStore> = Arc::clone(objects) as Arc<dyn ObjectStore>;
    Remote::with_store("memory:///", store, Duration::from_secs(5)).unwrap()
}

fn new_store(dir: &Path, segment_capacity: u64) -> Store {
    let options = CreateOptions { size: Some(VOLUME), segment_capacity, ..Default::default() };
    Store::create(&dir.join("disk.img"), None, &options, &mut |_, _| {}).unwrap().0
}

/// A shipper whose events arrive on the returned channel.
fn ship(store: &Arc<Store>, objects: &Arc<InMemory>, config: ShipperConfig) -> (Shipper, Receiver<ReplicationEvent>) {
    let (sender, events) = mpsc::channel();
    let sink = Box::new(move |event| {
        let _ = sender.send(event);
    });
    (Shipper::start(Arc::clone(store), remote(objects), config, sink).unwrap(), events)
}

/// Writes `count` blocks (seed 1) while a shipper without deltas runs, ships them all, stops it.
fn ship_blocks_then_stop(store: &Arc<Store>, objects: &Arc<InMemory>, model: &mut [u8], count: u64) {
    let (shipper, _events) = ship(store, objects, ShipperConfig::default());
    let last = write_blocks(store, model, 1, count);
    store.sync().unwrap();
    wait_for_shipped(&shipper, last);
    shipper.stop();
}

fn wait_for_shipped(shipper: &Shipper, seq: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while shipper.status().shipped_seq < seq {
        assert!(Instant::now() < deadline, "seq {seq} not shipped: {:?}", shipper.status());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Writes `count` blocks of seeded content into the store and a reference copy of the volume.
fn write_blocks(store: &Store, model: &mut [u8], seed: u64, count: u64) -> u64 {
    let mut last = 0;
    for i in 0..count {
        let block = ((seed * 7919 + i * 104_729) % (VOLUME / BLOCK as u64)) as usize;
        let fill = (seed + i) as u8;
        let data = vec![fill; BLOCK];
        last = store.write((block * BLOCK) as u64, &data).unwrap();
        model[block * BLOCK..(block + 1) * BLOCK].copy_from_slice(&data);
    }
    last
}

fn recover_bytes(objects: &Arc<InMemory>, target: RecoveryTarget, dir: &Path) -> Vec<u8> {
    let output = dir.join(format!("out-{}", rand_name()));
    let replica = Replica::from_remote(remote(objects)).unwrap();
    replica.recover(&target, &output, &mut |_, _| {}).unwrap();
    std::fs::read(&output).unwrap()
}

fn rand_name() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

#[test]
fn markers_and_writes_are_recovered_byte_exact_from_the_replica_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(new_store(dir.path(), 64 << 10));
    let objects = Arc::new(InMemory::new());
    let mut model = vec![0u8; VOLUME as usize];
    write_blocks(&store, &mut model, 1, 40);
    let (shipper, events) = ship(&store, &objects, ShipperConfig { max_object_bytes: 20_000, ..Default::default() });
    let first = model.clone();
    store.add_marker("first", Some("forty blocks"), MarkerSource::Host).unwrap();
    write_blocks(&store, &mut model, 2, 100);
    let second = model.clone();
    let marker = store.add_marker("second", None, MarkerSource::Guest).unwrap();
    let last = write_blocks(&store, &mut model, 3, 30);
    store.sync().unwrap();
    wait_for_shipped(&shipper, last);
    let caught_up = events.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(matches!(caught_up, ReplicationEvent::CaughtUp(_)), "{caught_up:?}");
    shipper.stop();

    let replica = Replica::from_remote(remote(&objects)).unwrap();
    let names: Vec<String> = replica.markers().iter().map(|m| m.marker.name.clone()).collect();
    assert_eq!(names, ["first", "second"]);
    assert_eq!(replica.manifest().shipped_seq, last);
    assert!(list_journal(&remote(&objects)).unwrap().len() > 3, "objects are cut by size");
    assert_eq!(recover_bytes(&objects, RecoveryTarget::Marker("first".into()), dir.path()), first);
    assert_eq!(recover_bytes(&objects, RecoveryTarget::Marker("second".into()), dir.path()), second);
    assert_eq!(recover_bytes(&objects, RecoveryTarget::Seq(last), dir.path()), model);
    assert_eq!(recover_bytes(&objects, RecoveryTarget::Time(marker.time_ns), dir.path()), second);
    // The same points recovered locally give the same bytes.
    let local = dir.path().join("local");
    store.recover(&RecoveryTarget::Marker("second".into()), &local, &mut |_, _| {}).unwrap();
    assert_eq!(std::fs::read(&local).unwrap(), second);
}

#[test]
fn records_larger_than_an_object_go_alone_and_the_rest_are_cut_at_record_boundaries() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(new_store(dir.path(), 512 << 10));
    let objects = Arc::new(InMemory::new());
    let mut model = vec![0u8; VOLUME as usize];
    let max_object_bytes = 20_000;
    let (shipper, _events) = ship(&store, &objects, ShipperConfig { max_object_bytes, ..Default::default() });
    let mut last = 0;
    for (i, blocks) in [1usize, 16, 1, 1, 3, 32, 1, 5, 1, 1, 1, 16].into_iter().enumerate() {
        let offset = (i * 20 * BLOCK) as u64;
        let data: Vec<u8> = (0..blocks * BLOCK).map(|b| (b * 31 + i) as u8).collect();
        last = store.write(offset, &data).unwrap();
        model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
    }
    wait_for_shipped(&shipper, last);
    shipper.stop();
    let remote = remote(&objects);
    let journal = list_journal(&remote).unwrap();
    for object in &journal {
        let body = object.size as usize - layout::OBJECT_HEADER_LEN;
        assert!(body <= max_object_bytes || object.first == object.last, "{object:?} holds more than one large record");
    }
    assert!(journal.iter().any(|o| o.size as usize > max_object_bytes), "a record larger than an object was shipped");
    assert_eq!(recover_bytes(&objects, RecoveryTarget::Seq(last), dir.path()), model);
}

#[test]
fn a_walk_ships_only_the_records_durable_when_it_started() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(new_store(dir.path(), 1 << 20));
    let objects = Arc::new(InMemory::new());
    let mut model = vec![0u8; VOLUME as usize];
    let durable = write_blocks(&store, &mut model, 1, 20);
    store.sync().unwrap();
    // Appended, not synced: a crash could lose them and number other records the same.
    let last = write_blocks(&store, &mut model, 2, 20);
    assert_eq!(store.durable_seq(), durable);
    let (shipper, _events) = ship(&store, &objects, ShipperConfig::default());
    wait_for_shipped(&shipper, last);
    shipper.stop();
    // The first walk stopped at the durable record (the next walk shipped the rest once the
    // syncer had made them durable), although the journal it read held more.
    let journal = list_journal(&remote(&objects)).unwrap();
    assert!(journal.iter().any(|o| o.last == durable), "no object ends at the durable seq {durable}: {journal:?}");
    assert_eq!(recover_bytes(&objects, RecoveryTarget::Seq(last), dir.path()), model);
}

#[test]
fn shipping_resumes_from_the_manifest_without_gaps_or_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(new_store(dir.path(), 64 << 10));
    let objects = Arc::new(InMemory::new());
    let mut model = vec![0u8; VOLUME as usize];
    ship_blocks_then_stop(&store, &objects, &mut model, 50);
    // An upload cut short by a crash: an object past the manifest's shipped point.
    let remote = remote(&objects);
    let manifest = crate::restore::read_manifest(&remote).unwrap().unwrap();
    let stale = layout::journal_key(manifest.shipped_seq + 1, manifest.shipped_seq + 500);
    remote.put(&stale, b"cut short".to_vec()).unwrap();

    let last = write_blocks(&store, &mut model, 2, 50);
    let (shipper, _events) = ship(&store, &objects, ShipperConfig::default());
    wait_for_shipped(&shipper, last);
    shipper.stop();
    let journal = list_journal(&remote).unwrap();
    assert!(journal.iter().all(|o| o.key != stale), "the stale object was removed");
    let mut next = manifest.base.seq + 1;
    for object in &journal {
        assert_eq!(object.first, next, "objects follow each other: {journal:?}");
        next = object.last + 1;
    }
    assert_eq!(next, last + 1);
    assert_eq!(recover_bytes(&objects, RecoveryTarget::Seq(last), dir.path()), model);
}

#[test]
fn a_store_with_freed_journal_ships_a_base_and_retention_waits_for_shipping() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(new_store(dir.path(), 16 << 10));
    let mut model = vec![0u8; VOLUME as usize];
    write_blocks(&store, &mut model, 1, 60);
    store.set_retention(RetentionPolicy { max_bytes: Some(20 << 10), ..Default::default() }).unwrap();
    store.enforce_retention().unwrap();
    let oldest = store.status().oldest_recoverable;
    assert!(oldest > 0, "retention freed the start of the journal");
    let objects = Arc::new(InMemory::new());
    let (shipper, _events) =
        ship(&store, &objects, ShipperConfig { interval: Duration::from_secs(3600), ..Default::default() });
    // The first tick (at start) ships what is durable; later writes wait for the next tick.
    let deadline = Instant::now() + Duration::from_secs(20);
    while shipper.status().remote_oldest_seq == 0 && shipper.status().shipped_seq < oldest {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    let before = model.clone();
    let head = store.head();
    wait_for_shipped(&shipper, head);
    write_blocks(&store, &mut model, 2, 60);
    store.enforce_retention().unwrap();
    let status = store.status();
    assert!(status.first_seq <= head + 1, "retention keeps what is not shipped: {status:?}");
    assert!(status.journal_bytes > 20 << 10, "the unshipped records outgrow the limit: {status:?}");
    shipper.stop();
    assert_eq!(recover_bytes(&objects, RecoveryTarget::Seq(head), dir.path()), before);
}

#[test]
fn missing_and_corrupt_objects_are_named_and_leave_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(new_store(dir.path(), 64 << 10));
    let objects = Arc::new(InMemory::new());
    let mut model = vec![0u8; VOLUME as usize];
    let (shipper, _events) = ship(&store, &objects, ShipperConfig { max_object_bytes: 10_000, ..Default::default() });
    let last = write_blocks(&store, &mut model, 1, 20);
    store.sync().unwrap();
    wait_for_shipped(&shipper, last);
    shipper.stop();
    let bucket = remote(&objects);
    let journal = list_journal(&bucket).unwrap();
    let victim = &journal[journal.len() / 2];
    let mut bytes = bucket.get(&victim.key).unwrap().to_vec();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    bucket.put(&victim.key, bytes).unwrap();
    let output = dir.path().join("out");
    let replica = Replica::from_remote(remote(&objects)).unwrap();
    match replica.recover(&RecoveryTarget::Seq(last), &output, &mut |_, _| {}) {
        Err(Error::Corrupt { key, .. }) => assert_eq!(key, victim.key),
        other => panic!("expected a corrupt object error, got {other:?}"),
    }
    assert!(!output.exists());
    assert_eq!(
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("partial"))
            .count(),
        0
    );
    bucket.delete(&victim.key).unwrap();
    match replica.recover(&RecoveryTarget::Seq(last), &output, &mut |_, _| {}) {
        Err(Error::Gap { seq }) => assert_eq!(seq, victim.first),
        other => panic!("expected a gap error, got {other:?}"),
    }
    bucket.delete(MANIFEST_KEY).unwrap();
    assert!(matches!(Replica::from_remote(remote(&objects)), Err(Error::NoReplica(_))));
}

#[test]
fn a_replica_of_another_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let objects = Arc::new(InMemory::new());
    let one = Arc::new(new_store(&dir.path().join("a").tap_create(), 64 << 10));
    let (shipper, _events) = ship(&one, &objects, ShipperConfig::default());
    wait_for_shipped(&shipper, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while crate::restore::read_manifest(&remote(&objects)).unwrap().is_none() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    shipper.stop();
    let other = Arc::new(new_store(&dir.path().join("b").tap_create(), 64 << 10));
    let (shipper, events) = ship(&other, &objects, ShipperConfig::default());
    match events.recv_timeout(Duration::from_secs(10)).unwrap() {
        ReplicationEvent::Error(e) => assert!(e.error.contains("belongs to store"), "{}", e.error),
        other => panic!("expected an error event, got {other:?}"),
    }
    assert!(shipper.status().failing);
    // Guest writes go on meanwhile.
    other.write(0, &[1; 4096]).unwrap();
    shipper.stop();
}

trait TapCreate {
    fn tap_create(self) -> Self;
}

impl TapCreate for std::path::PathBuf {
    fn tap_create(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

#[test]
fn remote_retention_rebases_and_keeps_every_later_point_recoverable() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(new_store(dir.path(), 64 << 10));
    let objects = Arc::new(InMemory::new());
    let mut model = vec![0u8; VOLUME as usize];
    let config = ShipperConfig {
        interval: Duration::from_millis(50),
        max_object_bytes: 20_000,
        max_age: Some(Duration::from_secs(1)),
        delta_every: Some(32 << 10),
    };
    let (shipper, _events) = ship(&store, &objects, config);
    write_blocks(&store, &mut model, 1, 30);
    let old = store.add_marker("old", None, MarkerSource::Host).unwrap();
    write_blocks(&store, &mut model, 2, 30);
    store.sync().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while shipper.status().remote_oldest_seq <= old.seq {
        assert!(Instant::now() < deadline, "no rebase: {:?}", shipper.status());
        std::thread::sleep(Duration::from_millis(20));
    }
    let newer = write_blocks(&store, &mut model, 3, 30);
    store.sync().unwrap();
    wait_for_shipped(&shipper, newer);
    shipper.stop();

    let bucket = remote(&objects);
    let replica = Replica::from_remote(remote(&objects)).unwrap();
    let base = replica.manifest().base.clone();
    assert!(base.seq > old.seq);
    assert_eq!(replica.manifest().max_age_secs, Some(1));
    assert!(replica.markers().iter().all(|m| m.expired), "the old marker is listed as expired");
    assert!(bucket.list("base").unwrap().iter().all(|o| PartOf::Base.parse_key(&o.key) == Some(base.seq)));
    // Deltas before the new base went with the journal they stood for; later ones follow it.
    let deltas = &replica.manifest().deltas;
    assert!(deltas.iter().all(|d| d.seq > base.seq), "{deltas:?}");
    assert_only_listed_parts(&bucket, replica.manifest());
    assert!(list_journal(&bucket).unwrap().iter().all(|o| o.last > base.seq), "freed objects are deleted");
    let output = dir.path().join("old.img");
    match replica.recover(&RecoveryTarget::Marker("old".into()), &output, &mut |_, _| {}) {
        Err(Error::Engine(rewind_engine::Error::Unrecoverable { .. })) => {}
        other => panic!("expected the old marker to be unrecoverable, got {other:?}"),
    }
    // The new base holds what the local store recovers at its point.
    let local = dir.path().join("local-base");
    store.recover(&RecoveryTarget::Seq(base.seq), &local, &mut |_, _| {}).unwrap();
    assert_eq!(recover_bytes(&objects, RecoveryTarget::Seq(base.seq), dir.path()), std::fs::read(local).unwrap());
    assert_eq!(recover_bytes(&objects, RecoveryTarget::Seq(newer), dir.path()), model);
}

#[test]
fn a_walk_from_a_remembered_position_sees_what_a_walk_from_the_start_sees() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 64 << 10);
    let mut model = vec![0u8; VOLUME as usize];
    let head = write_blocks(&store, &mut model, 1, 60);
    let view = store.journal_view();
    let all_from = |from: u64| {
        let mut seen = Vec::new();
        view.for_each(from, head, rewind_engine::journal::Payloads::All, |rec| {
            seen.push((rec.header.seq, rec.payload.map(<[u8]>::to_vec)));
            Ok(())
        })
        .unwrap();
        seen
    };
    let mut positions = Vec::new();
    view.for_each(1, head, rewind_engine::journal::Payloads::Skip, |rec| {
        positions.push((rec.header.seq, rec.segment.index, rec.position));
        Ok(())
    })
    .unwrap();
    assert!(positions.iter().any(|p| p.1 != positions[0].1), "the records span segments");
    for &(seq, segment, position) in positions.iter().step_by(7) {
        let mut seen = Vec::new();
        view.for_each_from_position(seq, (segment, position), head, rewind_engine::journal::Payloads::All, |rec| {
            seen.push((rec.header.seq, rec.payload.map(<[u8]>::to_vec)));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, all_from(seq), "from seq {seq}");
    }
    // A position that does not hold the record is damage, not a silent skip.
    let (seq, segment, position) = positions[3];
    let wrong =
        view.for_each_from_position(seq + 1, (segment, position), head, rewind_engine::journal::Payloads::Skip, |_| {
            Ok(())
        });
    assert!(matches!(wrong, Err(rewind_engine::Error::JournalCorrupt { .. })));
}

/// Waits until the replica's manifest lists `count` deltas; returns it.
fn wait_for_deltas(objects: &Arc<InMemory>, count: usize) -> layout::Manifest {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let manifest = crate::restore::read_manifest(&remote(objects)).unwrap();
        if let Some(manifest) = manifest.filter(|m| m.deltas.len() >= count) {
            return manifest;
        }
        assert!(Instant::now() < deadline, "fewer than {count} deltas were listed");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn deltas_spare_recovery_the_journal_before_them_and_every_point_stays_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(new_store(dir.path(), 64 << 10));
    let objects = Arc::new(InMemory::new());
    let mut model = vec![0u8; VOLUME as usize];
    let config = ShipperConfig { max_object_bytes: 20_000, delta_every: Some(100 << 10), ..Default::default() };
    let (shipper, _events) = ship(&store, &objects, config.clone());
    // Rounds of writes, zeroing and discards, each ending at a marker; the deltas fall
    // between and inside them.
    let mut points = Vec::new();
    for round in 0..6u64 {
        write_blocks(&store, &mut model, round + 1, 20);
        let (offset, len) = (round * 24 * BLOCK as u64, 3 * BLOCK as u64);
        if round % 2 == 0 {
            store.write_zeroes(offset, len).unwrap();
        } else {
            store.discard(offset, len).unwrap();
        }
        model[offset as usize..(offset + len) as usize].fill(0);
        let marker = store.add_marker(&format!("round-{round}"), None, MarkerSource::Host).unwrap();
        store.sync().unwrap();
        wait_for_shipped(&shipper, marker.seq);
        points.push((marker, model.clone()));
    }
    wait_for_deltas(&objects, 2);
    let last = write_blocks(&store, &mut model, 9, 5);
    store.sync().unwrap();
    wait_for_shipped(&shipper, last);
    shipper.stop();

    let manifest = crate::restore::read_manifest(&remote(&objects)).unwrap().unwrap();
    let newest = manifest.deltas.last().unwrap().clone();
    assert!(newest.data_bytes > 0 && newest.data_bytes < 140 << 10, "a delta holds the net effect: {newest:?}");
    for (marker, expected) in &points {
        let bytes = recover_bytes(&objects, RecoveryTarget::Marker(marker.name.clone()), dir.path());
        assert!(bytes == *expected, "marker {} (seq {}) with deltas {:?}", marker.name, marker.seq, manifest.deltas);
        assert_eq!(recover_bytes(&objects, RecoveryTarget::Time(marker.time_ns), dir.path()), *expected);
    }
    assert_eq!(recover_bytes(&objects, RecoveryTarget::Seq(last), dir.path()), model);
    // At a delta's own point nothing is replayed.
    let replica = Replica::from_remote(remote(&objects)).unwrap();
    let at_delta = dir.path().join("at-delta");
    let report = replica.recover(&RecoveryTarget::Seq(newest.seq), &at_delta, &mut |_, _| {}).unwrap();
    assert_eq!((report.snapshot_seq, report.records_replayed), (newest.seq, 0));
    let local = dir.path().join("local-at-delta");
    store.recover(&RecoveryTarget::Seq(newest.seq), &local, &mut |_, _| {}).unwrap();
    assert_eq!(std::fs::read(&at_delta).unwrap(), std::fs::read(&local).unwrap());

    // Without the journal objects the newest delta covers, the points after it still come
    // back exact (so recovery took them from the deltas), and the points they held do not.
    let bucket = remote(&objects);
    for object in list_journal(&bucket).unwrap().iter().filter(|o| o.last <= newest.seq) {
        bucket.delete(&object.key).unwrap();
    }
    assert_eq!(recover_bytes(&objects, RecoveryTarget::Seq(last), dir.path()), model);
    let before = manifest.deltas[0].seq.max(manifest.base.seq + 1);
    let output = dir.path().join("gone");
    match replica.recover(&RecoveryTarget::Seq(before + 1), &output, &mut |_, _| {}) {
        Err(Error::Gap { .. }) => {}
        other => panic!("expected a gap once the journal before the delta is gone, got {other:?}"),
    }

    // A damaged delta part is named, and nothing is left at the output.
    let part = PartOf::Delta.key(newest.seq, 0);
    let mut bytes = bucket.get(&part).unwrap().to_vec();
    let at = bytes.len() - 1;
    bytes[at] ^= 0x20;
    bucket.put(&part, bytes).unwrap();
    match replica.recover(&RecoveryTarget::Seq(last), &output, &mut |_, _| {}) {
        Err(Error::Corrupt { key, .. }) => assert_eq!(key, part),
        other => panic!("expected the damaged delta part to be named, got {other:?}"),
    }
    assert!(!output.exists());

    // A delta part the manifest does not list (an upload cut short) is deleted at the next
    // start, and shipping goes on from the newest delta.
    let stray = PartOf::Delta.key(last, 0);
    bucket.put(&stray, b"cut short".to_vec()).unwrap();
    let (shipper, _events) = ship(&store, &objects, config);
    let after = write_blocks(&store, &mut model, 10, 5);
    store.sync().unwrap();
    wait_for_shipped(&shipper, after);
    shipper.stop();
    assert!(bucket.list("delta").unwrap().iter().all(|o| o.key != stray), "the stray part was removed");
}

#[test]
fn deltas_hold_the_local_journal_only_until_they_are_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(new_store(dir.path(), 16 << 10));
    let objects = Arc::new(InMemory::new());
    let mut model = vec![0u8; VOLUME as usize];
    // Far apart by size: local retention's limit brings them on (at half of it).
    let config = ShipperConfig { delta_every: Some(1 << 40), ..Default::default() };
    store.set_retention(RetentionPolicy { max_bytes: Some(64 << 10), ..Default::default() }).unwrap();
    let (shipper, _events) = ship(&store, &objects, config);
    let mut last = 0;
    for round in 0..4 {
        last = write_blocks(&store, &mut model, round, 12);
        store.sync().unwrap();
        wait_for_shipped(&shipper, last);
    }
    let manifest = wait_for_deltas(&objects, 1);
    // Once shipped and in a delta, records may be freed locally.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        store.enforce_retention().unwrap();
        let first_seq = store.status().first_seq;
        // Never past the replica's newest snapshot: the next delta is made from what follows.
        let newest_point = crate::restore::read_manifest(&remote(&objects)).unwrap().unwrap().newest_point();
        assert!(first_seq <= newest_point + 1, "seq {first_seq} onwards kept, the newest delta is at {newest_point}");
        if first_seq > manifest.deltas[0].from + 1 {
            break;
        }
        assert!(Instant::now() < deadline, "retention freed nothing: {:?}", store.status());
        std::thread::sleep(Duration::from_millis(20));
    }
    shipper.stop();
    assert_eq!(recover_bytes(&objects, RecoveryTarget::Seq(last), dir.path()), model);
}

#[test]
fn once_the_deltas_hold_a_volume_of_data_a_full_snapshot_replaces_the_newest_and_recovery_starts_there() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(new_store(dir.path(), 64 << 10));
    let objects = Arc::new(InMemory::new());
    let mut model = vec![0u8; VOLUME as usize];
    let config = ShipperConfig { max_object_bytes: 64 << 10, delta_every: Some(128 << 10), ..Default::default() };
    let (shipper, _events) = ship(&store, &objects, config);
    let mut points = Vec::new();
    let mut round = 0u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    let full = loop {
        write_blocks(&store, &mut model, round + 1, 40);
        let marker = store.add_marker(&format!("m{round}"), None, MarkerSource::Host).unwrap();
        store.sync().unwrap();
        wait_for_shipped(&shipper, marker.seq);
        points.push((marker, model.clone()));
        round += 1;
        let manifest = crate::restore::read_manifest(&remote(&objects)).unwrap().unwrap();
        if let Some(full) = manifest.deltas.iter().find(|d| d.full) {
            break full.clone();
        }
        assert!(Instant::now() < deadline, "no full snapshot: {:?}", manifest.deltas);
    };
    let last = write_blocks(&store, &mut model, 99, 10);
    store.sync().unwrap();
    wait_for_shipped(&shipper, last);
    shipper.stop();

    let bucket = remote(&objects);
    let manifest = crate::restore::read_manifest(&bucket).unwrap().unwrap();
    let before_full: Vec<_> = manifest.deltas.iter().take_while(|d| d.seq < full.seq).collect();
    // The deltas before it (and the one it replaced) held at least a volume of data.
    assert!(before_full.len() >= 2 && full.data_bytes <= VOLUME, "{:?}", manifest.deltas);
    assert!(
        bucket.list("delta").unwrap().iter().all(|o| PartOf::Delta.parse_key(&o.key) != Some(full.seq)),
        "the delta the full snapshot replaced is deleted"
    );
    for (marker, expected) in &points {
        let bytes = recover_bytes(&objects, RecoveryTarget::Marker(marker.name.clone()), dir.path());
        assert!(bytes == *expected, "marker {} (seq {}) with snapshots {:?}", marker.name, marker.seq, manifest.deltas);
    }
    assert_eq!(recover_bytes(&objects, RecoveryTarget::Seq(last), dir.path()), model);
    // Recovery of a later point starts at the full snapshot: it needs neither the base nor
    // the deltas before it.
    for part in 0..manifest.base.parts {
        bucket.delete(&PartOf::Base.key(manifest.base.seq, part)).unwrap();
    }
    for delta in &before_full {
        for part in 0..delta.parts {
            bucket.delete(&delta.parts_of().key(delta.seq, part)).unwrap();
        }
    }
    assert_eq!(recover_bytes(&objects, RecoveryTarget::Seq(last), dir.path()), model);
    let replica = Replica::from_remote(remote(&objects)).unwrap();
    let output = dir.path().join("before-full");
    let early = &points[0].0;
    match replica.recover(&RecoveryTarget::Marker(early.name.clone()), &output, &mut |_, _| {}) {
        Err(Error::Missing { .. }) => {}
        other => panic!("expected the deleted base to be missing, got {other:?}"),
    }
}

#[test]
fn when_the_local_records_after_the_newest_remote_snapshot_are_gone_a_full_snapshot_is_rebuilt_from_the_replica() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(new_store(dir.path(), 16 << 10));
    let objects = Arc::new(InMemory::new());
    let mut model = vec![0u8; VOLUME as usize];
    // Shipped without deltas: the store frees what is shipped.
    ship_blocks_then_stop(&store, &objects, &mut model, 40);
    store.set_retention(RetentionPolicy { max_bytes: Some(20 << 10), ..Default::default() }).unwrap();
    store.enforce_retention().unwrap();
    assert!(store.status().first_seq > 1, "retention freed shipped records: {:?}", store.status());

    let (shipper, _events) =
        ship(&store, &objects, ShipperConfig { delta_every: Some(16 << 10), ..Default::default() });
    let last = write_blocks(&store, &mut model, 2, 10);
    store.sync().unwrap();
    wait_for_shipped(&shipper, last);
    let manifest = wait_for_deltas(&objects, 1);
    shipper.stop();
    let first = &manifest.deltas[0];
    assert!(first.full && first.seq > manifest.base.seq, "{:?}", manifest.deltas);
    let local = dir.path().join("local");
    store.recover(&RecoveryTarget::Seq(first.seq), &local, &mut |_, _| {}).unwrap();
    assert_eq!(recover_bytes(&objects, RecoveryTarget::Seq(first.seq), dir.path()), std::fs::read(local).unwrap());
    assert_eq!(recover_bytes(&objects, RecoveryTarget::Seq(last), dir.path()), model);
}

#[test]
fn a_remote_snapshot_that_keeps_failing_is_reported_and_neither_stalls_shipping_nor_holds_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(new_store(dir.path(), 16 << 10));
    let objects = Arc::new(InMemory::new());
    let mut model = vec![0u8; VOLUME as usize];
    write_blocks(&store, &mut model, 1, 8);
    // A payload damaged on the local disk after it was written: a delta compacted from it
    // must fail rather than store the damage under checksums of its own.
    let view = store.journal_view();
    let mut damaged = None;
    view.for_each(3, 3, rewind_engine::journal::Payloads::Skip, |rec| {
        damaged = Some((rec.segment.path.clone(), rec.payload_position()));
        Ok(())
    })
    .unwrap();
    let (path, position) = damaged.unwrap();
    let segment = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut byte = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&segment, &mut byte, position + 100).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&segment, &[byte[0] ^ 0xff], position + 100).unwrap();

    let config = ShipperConfig { delta_every: Some(8 << 10), ..Default::default() };
    let (shipper, events) = ship(&store, &objects, config);
    loop {
        match events.recv_timeout(Duration::from_secs(10)).unwrap() {
            ReplicationEvent::Error(e) => break assert!(e.error.contains("remote snapshot"), "{}", e.error),
            ReplicationEvent::CaughtUp(_) => {}
        }
    }
    // The journal goes on shipping; the local journal is held for the next snapshot only until
    // the third failure in a row (back-offs of 0.5, 1 and 2 s).
    assert_eq!(store.journal_kept_from(), 1, "held from the base on while snapshots are tried");
    let deadline = Instant::now() + Duration::from_secs(30);
    let last = loop {
        let last = write_blocks(&store, &mut model, 2, 8);
        store.sync().unwrap();
        wait_for_shipped(&shipper, last);
        if store.journal_kept_from() > 1 {
            break last;
        }
        assert!(Instant::now() < deadline, "the journal is still held for a snapshot: {:?}", shipper.status());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(store.journal_kept_from() > 3, "held from the shipped point on, past the damaged record");
    let status = shipper.status();
    assert!(
        !status.failing && status.last_error.as_deref().is_some_and(|e| e.contains("remote snapshot")),
        "{status:?}"
    );
    shipper.stop();
    let manifest = crate::restore::read_manifest(&remote(&objects)).unwrap().unwrap();
    assert!(manifest.deltas.is_empty(), "no snapshot holds the damaged record: {:?}", manifest.deltas);
    assert!(manifest.shipped_seq >= last);
}

#[test]
fn remote_retention_rebases_onto_a_full_snapshot_in_its_slack_and_rebuilds_otherwise() {
    const SEC: u64 = 1_000_000_000;
    let base = layout::BaseInfo { seq: 0, time_ns: 0, parts: 0, data_bytes: 0 };
    let mut manifest = layout::Manifest::new(uuid::Uuid::new_v4(), VOLUME, 4096, base);
    let delta =
        |from, seq, secs| layout::DeltaInfo { seq, from, time_ns: secs * SEC, parts: 1, data_bytes: 100, full: false };
    let full = |seq, secs| layout::DeltaInfo { full: true, ..delta(seq, seq, secs) };
    manifest.deltas = vec![delta(0, 10, 50), full(20, 80), delta(20, 30, 90), full(40, 110), delta(40, 50, 200)];
    manifest.shipped_seq = 60;
    let max_age = Duration::from_secs(100);
    let at = |secs| crate::ship::rebase_due(&manifest, max_age, secs * SEC);
    // Not before the base is older than the age by a quarter more.
    assert_eq!(at(125), None);
    // The newest full snapshot between 125 and 100 s old becomes the base...
    assert_eq!(at(200), Some(Rebase::OntoFull(&manifest.deltas[1])));
    assert_eq!(at(205), Some(Rebase::OntoFull(&manifest.deltas[1])));
    assert_eq!(at(215), Some(Rebase::OntoFull(&manifest.deltas[3])));
    // ...but never one younger than the age (points after the cutoff would go), one older than
    // the quarter (the next rebase would be due at once) or a delta.
    assert_eq!(at(179), Some(Rebase::Rebuild { cutoff: 79 * SEC }));
    assert_eq!(at(208), Some(Rebase::Rebuild { cutoff: 108 * SEC }));
    assert_eq!(at(300), Some(Rebase::Rebuild { cutoff: 200 * SEC }));
}

#[test]
fn a_rebase_onto_a_full_snapshot_keeps_its_parts_and_every_later_point_recoverable() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(new_store(dir.path(), 64 << 10));
    let objects = Arc::new(InMemory::new());
    let mut model = vec![0u8; VOLUME as usize];
    // Each round is one write of 40 blocks, and a delta is due once a block's worth is shipped
    // after the newest snapshot: every round ends at a delta of 40 blocks, and the seventh
    // brings the deltas to a volume of data, so a full snapshot replaces it with no record
    // after it.
    let config = ShipperConfig { max_object_bytes: 64 << 10, delta_every: Some(BLOCK as u64), ..Default::default() };
    let (shipper, _events) = ship(&store, &objects, config);
    let early = store.add_marker("early", None, MarkerSource::Host).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let round_bytes = 40 * BLOCK;
    let mut round = 0;
    let (full, at_full) = loop {
        round += 1;
        let offset = (round * round_bytes) % (VOLUME as usize - round_bytes);
        let data = vec![round as u8; round_bytes];
        let last = store.write(offset as u64, &data).unwrap();
        model[offset..offset + round_bytes].copy_from_slice(&data);
        store.sync().unwrap();
        let settled_at_last = |manifest: &layout::Manifest| {
            let full_due = manifest.deltas.last().is_some_and(|d| !d.full)
                && manifest.delta_bytes_since_full() >= manifest.volume_size;
            manifest.newest_point() == last && !full_due
        };
        let manifest = loop {
            // None until the shipper has connected.
            let manifest = crate::restore::read_manifest(&remote(&objects)).unwrap();
            if let Some(manifest) = manifest.filter(settled_at_last) {
                break manifest;
            }
            assert!(Instant::now() < deadline, "no snapshot settled at seq {last}");
            std::thread::sleep(Duration::from_millis(10));
        };
        if let Some(full) = manifest.deltas.last().filter(|d| d.full) {
            break (full.clone(), model.clone());
        }
    };
    shipper.stop();
    let base_parts = |bucket: &Remote| {
        let mut keys: Vec<String> = bucket.list("base").unwrap().into_iter().map(|o| o.key).collect();
        keys.sort();
        keys
    };
    let full_parts: Vec<String> = (0..full.parts).map(|part| PartOf::Base.key(full.seq, part)).collect();

    // The full snapshot is older than the age by a tenth of it: in the slack (from 1 to 1.25
    // times the age) while less than 1.125 times as old as now. Made 2 s old first, so that
    // the first retention check, at the shipper's start, has a quarter of a second to find it
    // there; later, a rebuild finds the same point (no record follows the full snapshot).
    let age = Duration::from_nanos(rewind_engine::fsutil::now_ns() - full.time_ns);
    std::thread::sleep(Duration::from_secs(2).saturating_sub(age));
    let age_ns = rewind_engine::fsutil::now_ns() - full.time_ns;
    let max_age = Duration::from_nanos(age_ns * 9 / 10);
    let config = ShipperConfig { max_age: Some(max_age), ..Default::default() };
    let (shipper, _events) = ship(&store, &objects, config);
    let deadline = Instant::now() + Duration::from_secs(20);
    while shipper.status().remote_oldest_seq < full.seq {
        assert!(Instant::now() < deadline, "no rebase: {:?}", shipper.status());
        std::thread::sleep(Duration::from_millis(10));
    }
    shipper.stop();

    let bucket = remote(&objects);
    let replica = Replica::from_remote(remote(&objects)).unwrap();
    assert_eq!(replica.manifest().base, full.as_base());
    assert!(replica.manifest().deltas.is_empty(), "{:?}", replica.manifest().deltas);
    assert_eq!(base_parts(&bucket), full_parts, "the full snapshot's parts are the base's, and only they");
    assert!(bucket.list("delta").unwrap().is_empty(), "the deltas before the base are deleted");
    assert!(list_journal(&bucket).unwrap().iter().all(|o| o.last > full.seq));
    let early_status = replica.markers().iter().find(|m| m.marker.name == early.name).unwrap().expired;
    assert!(early_status, "a marker before the base is listed as expired");
    assert_eq!(recover_bytes(&objects, RecoveryTarget::Seq(full.seq), dir.path()), at_full);

    // Shipping goes on from the new base.
    let (shipper, _events) = ship(&store, &objects, ShipperConfig::default());
    let later = write_blocks(&store, &mut model, 99, 30);
    store.sync().unwrap();
    wait_for_shipped(&shipper, later);
    shipper.stop();
    assert_eq!(recover_bytes(&objects, RecoveryTarget::Seq(later), dir.path()), model);
}

/// Every snapshot part in the bucket is one of a snapshot `manifest` lists.
fn assert_only_listed_parts(bucket: &Remote, manifest: &layout::Manifest) {
    for (of, dir) in [(PartOf::Delta, layout::DELTA_DIR), (PartOf::Base, layout::BASE_DIR)] {
        for part in bucket.list(dir).unwrap() {
            let seq = of.parse_key(&part.key);
            assert!(seq.is_some_and(|seq| manifest.counts_parts(of, seq)), "{} is not listed", part.key);
        }
    }
}

#[test]
fn a_stop_while_a_remote_snapshot_is_made_leaves_no_part_unlisted() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(new_store(dir.path(), 64 << 10));
    let objects = Arc::new(InMemory::new());
    let mut model = vec![0u8; VOLUME as usize];
    // Small parts, each stored in 5 ms: a snapshot of 200 scattered blocks takes about half a
    // second to store, and a stop finds it half stored.
    let config = ShipperConfig { max_object_bytes: 8 << 10, delta_every: Some(BLOCK as u64), ..Default::default() };
    let throttle = ThrottleConfig { wait_put_per_call: Duration::from_millis(5), ..Default::default() };
    let slow: Arc<dyn ObjectStore> =
        Arc::new(ThrottledStore::new(Arc::clone(&objects) as Arc<dyn ObjectStore>, throttle));
    let bucket = remote(&objects);
    for round in 1..=3 {
        let slow_remote = Remote::with_store("memory:///", Arc::clone(&slow), Duration::from_secs(5)).unwrap();
        let shipper = Shipper::start(Arc::clone(&store), slow_remote, config.clone(), Box::new(|_| {})).unwrap();
        let last = write_blocks(&store, &mut model, round, 200);
        store.sync().unwrap();
        wait_for_shipped(&shipper, last);
        // Stopped once a snapshot under way has stored a part that no manifest lists yet.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let manifest = crate::restore::read_manifest(&bucket).unwrap().unwrap();
            let parts = bucket.list(layout::DELTA_DIR).unwrap();
            let seqs = parts.iter().filter_map(|o| PartOf::Delta.parse_key(&o.key));
            if seqs.into_iter().any(|seq| !manifest.counts_parts(PartOf::Delta, seq)) {
                break;
            }
            assert!(Instant::now() < deadline, "no remote snapshot was stored: {:?}", shipper.status());
            std::thread::sleep(Duration::from_millis(1));
        }
        shipper.stop();
        let replica = Replica::from_remote(remote(&objects)).unwrap();
        assert_only_listed_parts(&bucket, replica.manifest());
        assert_eq!(recover_bytes(&objects, RecoveryTarget::Seq(last), dir.path()), model);
    }
}
