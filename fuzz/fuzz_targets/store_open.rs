//! `Store::open` over a store whose journal segments, checkpoint, snapshot base and archived
//! markers are fuzzed (the metadata and the rest of the layout are a valid store's): the
//! checks open makes on what the journal holds (records outside the volume, marker records),
//! the replay and the volume rebuild. Open must return, never panic; a store it opens must
//! serve the usual operations without panicking, keep its image at the volume size, close,
//! and open again with nothing to repair or rebuild.

#![no_main]

use std::fs;
use std::path::PathBuf;
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rewind_engine::marker::MarkerSource;
use rewind_engine::recovery::RecoveryTarget;
use rewind_engine::retention::RetentionPolicy;
use rewind_engine::{Store, VolumeOp};
use rewind_fuzz::{fresh, scratch, write_segments, SegmentSpec, SeqChoice, UUID};
use serde_json::json;

const VOLUME_SIZE: u64 = 64 << 10;

#[derive(Arbitrary, Debug)]
struct Input {
    segments: Vec<SegmentSpec>,
    capacity: u8,
    applied_seq: u8,
    other_boot: bool,
    base_seq: SeqChoice,
    archive: Vec<(u64, String, u64, bool)>,
    recover_to: u8,
    marker: Option<String>,
    retention_bytes: Option<u16>,
    write_at: u16,
}

fn root() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| scratch("store"))
}

fn uuid_text(bytes: [u8; 16]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

fuzz_target!(|input: Input| {
    if input.segments.is_empty() {
        return;
    }
    let root = root();
    fresh(root);
    let image = root.join("disk.img");
    let dir = root.join("disk.img.rewind");
    fs::File::create(&image).and_then(|f| f.set_len(VOLUME_SIZE)).expect("image");
    fs::create_dir_all(dir.join("snapshots")).expect("store dir");
    let capacity = [4096u64, 65536][input.capacity as usize % 2];
    let meta = json!({
        "format-version": rewind_engine::FORMAT_VERSION,
        "uuid": uuid_text(UUID),
        "volume-size": VOLUME_SIZE,
        "block-size": 4096,
        "segment-capacity": capacity,
        "applied-seq": input.applied_seq,
        "retention": {"max-bytes": input.retention_bytes, "max-age-secs": null, "keep-marker-snapshots": false},
        "open-in-boot": if input.other_boot { json!("another-boot") } else { json!(null) },
    });
    fs::write(dir.join("meta.json"), meta.to_string()).expect("meta");
    fs::File::create(dir.join("snapshots/base.img")).and_then(|f| f.set_len(VOLUME_SIZE)).expect("base");
    let manifest = json!({
        "format-version": rewind_engine::FORMAT_VERSION,
        "base": {"seq": input.base_seq.resolve(0), "origin": "initial", "created-ns": 0, "data-bytes": 0, "extents": 0},
        "deltas": [],
    });
    fs::write(dir.join("snapshots/manifest.json"), manifest.to_string()).expect("manifest");
    if !input.archive.is_empty() {
        let markers: Vec<_> = input
            .archive
            .iter()
            .take(8)
            .map(|(id, name, seq, guest)| {
                json!({"id": id, "name": name, "seq": seq, "time-ns": 0, "source": if *guest { "guest" } else { "host" }})
            })
            .collect();
        fs::write(dir.join("markers.json"), serde_json::to_vec(&markers).expect("json")).expect("markers");
    }
    write_segments(&dir.join("journal"), &input.segments, 4);

    let Ok((store, _report)) = Store::open(&image, Some(&dir)) else { return };
    let image_len = || fs::metadata(&image).expect("image").len();
    assert_eq!(image_len(), VOLUME_SIZE, "open changed the image's size");
    let status = store.status();
    assert!(status.first_seq <= status.head + 1, "{status:?}");
    let _ = store.markers();
    let _ = store.newest_marker();
    let _ = store.snapshots();
    let out = root.join("recovered.img");
    let _ = store.recover(&RecoveryTarget::Seq(u64::from(input.recover_to)), &out, &mut |_, _| {});
    if let Some(name) = &input.marker {
        let _ = store.recover(&RecoveryTarget::Marker(name.clone()), &root.join("m.img"), &mut |_, _| {});
        let _ = store.add_marker(name, None, MarkerSource::Guest);
    }
    if let Ok(recovered) = fs::metadata(&out) {
        assert_eq!(recovered.len(), VOLUME_SIZE, "a recovery of the wrong size");
    }
    let _ = store.verify(&mut |_, _| {});
    let offset = u64::from(input.write_at) * 512 % VOLUME_SIZE;
    let _ = store.write(offset, &[0xa5; 512][..(VOLUME_SIZE - offset).min(512) as usize]);
    let _ = store.submit(&[VolumeOp::Discard { offset: 0, len: 4096 }]);
    let _ = store.take_snapshot();
    if input.retention_bytes.is_some() {
        let _ = store.set_retention(RetentionPolicy { max_bytes: Some(0), ..RetentionPolicy::default() });
        let _ = store.enforce_retention();
    }
    let mut buf = [0u8; 4096];
    let _ = store.read(0, &mut buf);
    assert_eq!(image_len(), VOLUME_SIZE, "the image grew");
    if store.close().is_err() {
        return;
    }
    let (store, report) = Store::open(&image, Some(&dir)).expect("a store that closed reopens");
    assert!(report.tail_repair.is_none(), "a closed store reopened with a repair: {:?}", report.tail_repair);
    assert!(report.volume_rebuilt.is_none(), "a closed store was rebuilt: {:?}", report.volume_rebuilt);
    drop(store);
});
