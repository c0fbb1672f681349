//! The snapshot area over a fuzzed `manifest.json` (raw bytes or a built chain), base image and
//! delta files (headers and extent tables checksummed or not). Opening, listing, verifying,
//! materializing and merging must return, never panic, never write outside the volume; and
//! when every delta verifies, merging deltas into the base must not change what the newest
//! snapshot materializes to.

#![no_main]

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rewind_engine::snapshot::SnapshotStore;
use rewind_engine::FORMAT_VERSION;
use rewind_fuzz::{fresh, scratch};
use serde_json::{json, Value};

#[derive(Arbitrary, Debug)]
struct InfoSpec {
    seq: u64,
    /// Small steps, so chains are mostly in order.
    step: Option<u8>,
    origin: u8,
    created_ns: u64,
    data_bytes: u64,
    extents: u64,
}

#[derive(Arbitrary, Debug)]
enum ManifestSpec {
    Raw(Vec<u8>),
    Built { bad_version: bool, snake_case: bool, unknown_key: bool, base: InfoSpec, deltas: Vec<InfoSpec> },
}

#[derive(Arbitrary, Debug)]
struct ExtentSpec {
    /// In sectors, unless `raw` says otherwise.
    offset: u16,
    sectors: u8,
    raw: Option<(u64, u64)>,
    zero: bool,
    data_position: Option<u64>,
    bad_crc: bool,
}

#[derive(Arbitrary, Debug)]
struct DeltaSpec {
    /// Which listed delta it is the file of (or an unlisted one).
    listed: Option<u8>,
    unlisted_seq: u64,
    bad_magic: bool,
    bad_header_crc: bool,
    bad_table_crc: bool,
    to: Option<u64>,
    count: Option<u64>,
    extents: Vec<ExtentSpec>,
    data: Vec<u8>,
    truncate: Option<u16>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    volume_sectors: u8,
    base_len: Option<u16>,
    base_writes: Vec<(u16, Vec<u8>)>,
    manifest: ManifestSpec,
    deltas: Vec<DeltaSpec>,
    query: u64,
    keep_from: u64,
    /// The journal's last record (none: no limit).
    head: Option<u64>,
}

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| scratch("snapshot"))
}

fn info_json(info: &InfoSpec, seq: u64, snake_case: bool) -> Value {
    let origin = ["initial", "requested", "retention", "marker", "other"][info.origin as usize % 5];
    let (created, data) = if snake_case { ("created_ns", "data_bytes") } else { ("created-ns", "data-bytes") };
    json!({"seq": seq, "origin": origin, created: info.created_ns, data: info.data_bytes, "extents": info.extents})
}

/// The manifest's text and the delta sequence numbers it lists (when built).
fn manifest(spec: &ManifestSpec) -> (Vec<u8>, Vec<u64>) {
    match spec {
        ManifestSpec::Raw(bytes) => (bytes.clone(), Vec::new()),
        ManifestSpec::Built { bad_version, snake_case, unknown_key, base, deltas } => {
            let base_seq = base.step.map_or(base.seq, u64::from);
            let mut seq = base_seq;
            let mut seqs = Vec::new();
            let deltas: Vec<Value> = deltas
                .iter()
                .take(8)
                .map(|d| {
                    seq = d.step.map_or(d.seq, |s| seq.saturating_add(u64::from(s)));
                    seqs.push(seq);
                    info_json(d, seq, *snake_case)
                })
                .collect();
            let version = if *bad_version { FORMAT_VERSION + 1 } else { FORMAT_VERSION };
            let mut m = json!({"base": info_json(base, base_seq, *snake_case), "deltas": deltas});
            m[if *snake_case { "format_version" } else { "format-version" }] = json!(version);
            if *unknown_key {
                m["extra"] = json!(1);
            }
            (serde_json::to_vec(&m).expect("json"), seqs)
        }
    }
}

fn delta_file(spec: &DeltaSpec, seq: u64, volume_size: u64) -> Vec<u8> {
    let extents = &spec.extents[..spec.extents.len().min(64)];
    let table_len = 32 * extents.len() as u64;
    let data_start = (64 + table_len).div_ceil(4096) * 4096;
    let mut table = Vec::new();
    let mut data = Vec::new();
    let mut source = spec.data.iter().copied().cycle();
    for e in extents {
        let (offset, len) = e.raw.unwrap_or((u64::from(e.offset) * 512, u64::from(e.sectors) * 512));
        let len_in_file = len.min(volume_size) as usize;
        let position = if e.zero { u64::MAX } else { data_start + data.len() as u64 };
        let bytes: Vec<u8> = if e.zero || spec.data.is_empty() {
            vec![0; len_in_file]
        } else {
            source.by_ref().take(len_in_file).collect()
        };
        let crc = crc32c::crc32c(if e.zero { &[] } else { &bytes }) ^ u32::from(e.bad_crc);
        if !e.zero {
            data.extend_from_slice(&bytes);
        }
        table.extend_from_slice(&offset.to_le_bytes());
        table.extend_from_slice(&len.to_le_bytes());
        table.extend_from_slice(&e.data_position.unwrap_or(position).to_le_bytes());
        table.extend_from_slice(&(if e.zero { 0 } else { crc }).to_le_bytes());
        table.extend_from_slice(&[0; 4]);
    }
    let mut header = [0u8; 64];
    header[0..8].copy_from_slice(if spec.bad_magic { b"RWSNAPX\0" } else { b"RWSNAPD\0" });
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[24..32].copy_from_slice(&spec.to.unwrap_or(seq).to_le_bytes());
    header[32..40].copy_from_slice(&spec.count.unwrap_or(extents.len() as u64).to_le_bytes());
    header[40..44].copy_from_slice(&(crc32c::crc32c(&table) ^ u32::from(spec.bad_table_crc)).to_le_bytes());
    let crc = crc32c::crc32c(&header[0..44]) ^ u32::from(spec.bad_header_crc);
    header[44..48].copy_from_slice(&crc.to_le_bytes());
    let mut file = header.to_vec();
    file.extend_from_slice(&table);
    file.resize(data_start as usize, 0);
    file.extend_from_slice(&data);
    if let Some(len) = spec.truncate {
        file.truncate(usize::from(len));
    }
    file
}

/// Materializes snapshot `seq` into a new file; returns its bytes when that worked.
fn materialize(store: &SnapshotStore, seq: u64, volume_size: u64, out: &Path) -> Option<Vec<u8>> {
    let _ = fs::remove_file(out);
    let file = OpenOptions::new().read(true).write(true).create_new(true).open(out).expect("output");
    file.set_len(volume_size).expect("sizing the output");
    let result = store.materialize(seq, &file, &mut |_, _| {}, &std::sync::atomic::AtomicBool::new(false));
    let len = file.metadata().expect("output size").len();
    assert_eq!(len, volume_size, "materialize changed the output's size");
    result.ok()?;
    let mut bytes = vec![0; volume_size as usize];
    file.read_exact_at(&mut bytes, 0).expect("reading the output");
    Some(bytes)
}

fuzz_target!(|input: Input| {
    let root = dir();
    fresh(root);
    let snaps = root.join("snapshots");
    fs::create_dir(&snaps).expect("snapshot dir");
    let volume_size = (u64::from(input.volume_sectors) + 1) * 512;
    let base = File::create(snaps.join("base.img")).expect("base");
    let base_len = input.base_len.map_or(volume_size, u64::from);
    base.set_len(base_len).expect("sizing the base");
    for (at, bytes) in input.base_writes.iter().take(8) {
        // Inside the base as it was made: the merge's own growth is what is checked below.
        let at = u64::from(*at) % base_len.max(1);
        let len = (bytes.len() as u64).min(4096).min(base_len - at) as usize;
        base.write_all_at(&bytes[..len], at).expect("base data");
    }
    drop(base);
    let (text, listed) = manifest(&input.manifest);
    fs::write(snaps.join("manifest.json"), text).expect("manifest");
    for spec in input.deltas.iter().take(8) {
        let seq = match spec.listed {
            Some(i) if !listed.is_empty() => listed[i as usize % listed.len()],
            _ => spec.unlisted_seq,
        };
        fs::write(snaps.join(format!("{seq:016x}.delta")), delta_file(spec, seq, volume_size)).expect("delta");
    }

    let head = input.head.unwrap_or(u64::MAX);
    let Ok(store) = SnapshotStore::open(&snaps, volume_size, head) else { return };
    assert!(store.newest_seq() <= head, "a chain past the head opened");
    let list = store.list();
    assert!(list.windows(2).all(|w| w[0].seq < w[1].seq), "chain out of order");
    assert_eq!(store.newest_seq(), list.last().expect("a base").seq);
    let _ = store.stored_bytes();
    for q in [input.query, 0, u64::MAX] {
        if let Some(s) = store.newest_at_or_before(q) {
            assert!(s <= q);
        }
        if let Some(s) = store.oldest_at_or_after(q) {
            assert!(s >= q);
        }
    }
    let out = root.join("out.img");
    let _ = materialize(&store, input.query, volume_size, &out);
    let verified = store.verify().is_ok();
    let newest = store.newest_seq();
    let before = materialize(&store, newest, volume_size, &out);
    drop(store);

    let mut store = SnapshotStore::open(&snaps, volume_size, head).expect("the snapshot area reopens");
    let merged = store.merge_into_base(|base| base >= input.keep_from);
    let base_len = fs::metadata(snaps.join("base.img")).expect("base").len();
    assert!(
        base_len <= volume_size.max(input.base_len.map_or(0, u64::from)),
        "merging grew the base to {base_len} bytes"
    );
    if merged.is_err() {
        return;
    }
    drop(store);
    let store = SnapshotStore::open(&snaps, volume_size, head).expect("the snapshot area reopens after a merge");
    assert_eq!(store.newest_seq(), newest);
    if verified {
        store.verify().expect("deltas that verified still verify after a merge");
        let after = materialize(&store, newest, volume_size, &out);
        assert!(before.is_some() && after.is_some(), "a verified chain materializes");
        assert!(before == after, "merging changed the newest snapshot's content");
    }
});
