//! Engine benchmark: every figure is a ratio against a peer measured in the same run, runs
//! alternating between the two, medians reported (this kind of machine is noisy).
//!
//!   cargo bench --bench engine            # full run, writes target/bench/engine.{md,json}
//!   REWIND_BENCH_QUICK=1 cargo bench ...  # a smaller, faster run
//!
//! - journal append: batches of 32 writes + one sync, against pwrite of the same data at the
//!   same offsets + one fdatasync per 32 writes on the same disk;
//! - snapshot time against volume size with the same dirtied bytes (must stay flat);
//! - recovery throughput against `cp --sparse=always` of the same image.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use rewind_engine::recovery::RecoveryTarget;
use rewind_engine::{CreateOptions, Store, VolumeOp};

const BATCH: usize = 32;

struct Row {
    name: String,
    ours: String,
    peer: String,
    ratio: f64,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[values.len() / 2]
}

#[path = "../tests/common/rng.rs"]
mod rng;
use rng::Rng;

fn offsets(count: usize, block: u64, volume: u64, seed: u64) -> Vec<u64> {
    let mut rng = Rng(seed);
    (0..count).map(|_| (rng.next() % (volume / block)) * block).collect()
}

fn sparse_file(path: &Path, size: u64) -> File {
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).unwrap();
    file.set_len(size).unwrap();
    file
}

fn bench_append(dir: &Path, block: usize, total: u64, rounds: usize) -> Row {
    let volume = 1u64 << 30;
    let count = (total / block as u64) as usize;
    let data: Vec<u8> = (0..block).map(|i| (i * 7) as u8).collect();
    let mut ours = Vec::new();
    let mut peer = Vec::new();
    for round in 0..rounds {
        let places = offsets(count, block as u64, volume, round as u64 + 1);

        let image = dir.join("append.img");
        let _ = fs::remove_dir_all(rewind_engine::store::default_store_dir(&image));
        let _ = fs::remove_file(&image);
        let options = CreateOptions { size: Some(volume), ..Default::default() };
        let (store, _) = Store::create(&image, None, &options, &mut |_, _| {}).unwrap();
        let start = Instant::now();
        for chunk in places.chunks(BATCH) {
            let pieces: [&[u8]; 1] = [&data];
            let ops: Vec<VolumeOp<'_>> =
                chunk.iter().map(|&offset| VolumeOp::Write { offset, data: &pieces }).collect();
            store.submit(&ops).unwrap();
            store.sync().unwrap();
        }
        ours.push(total as f64 / start.elapsed().as_secs_f64());
        store.close().unwrap();
        fs::remove_dir_all(rewind_engine::store::default_store_dir(&image)).unwrap();
        fs::remove_file(&image).unwrap();

        let raw = dir.join("raw.img");
        let file = sparse_file(&raw, volume);
        let start = Instant::now();
        for chunk in places.chunks(BATCH) {
            for &offset in chunk {
                file.write_all_at(&data, offset).unwrap();
            }
            file.sync_data().unwrap();
        }
        peer.push(total as f64 / start.elapsed().as_secs_f64());
        fs::remove_file(&raw).unwrap();
    }
    let (ours, peer) = (median(ours), median(peer));
    Row {
        name: format!("journaled write, {} KiB, sync every {BATCH}", block / 1024),
        ours: format!("{:.0} MiB/s", ours / (1 << 20) as f64),
        peer: format!("{:.0} MiB/s (pwrite + fdatasync)", peer / (1 << 20) as f64),
        ratio: ours / peer,
    }
}

fn bench_snapshot(dir: &Path, sizes_gib: &[u64], dirty: u64, rounds: usize) -> Vec<Row> {
    let mut times: Vec<(u64, f64)> = Vec::new();
    for &gib in sizes_gib {
        let volume = gib << 30;
        let mut samples = Vec::new();
        for round in 0..rounds {
            let image = dir.join(format!("snap-{gib}.img"));
            let _ = fs::remove_dir_all(rewind_engine::store::default_store_dir(&image));
            let _ = fs::remove_file(&image);
            let options = CreateOptions { size: Some(volume), ..Default::default() };
            let (store, _) = Store::create(&image, None, &options, &mut |_, _| {}).unwrap();
            let block = [0x3cu8; 4096];
            for offset in offsets((dirty / 4096) as usize, 4096, volume, round as u64 + 7) {
                store.write(offset, &block).unwrap();
            }
            let start = Instant::now();
            store.take_snapshot().unwrap();
            samples.push(start.elapsed().as_secs_f64());
            store.close().unwrap();
            fs::remove_dir_all(rewind_engine::store::default_store_dir(&image)).unwrap();
            fs::remove_file(&image).unwrap();
        }
        times.push((gib, median(samples)));
    }
    let smallest = times[0].1;
    times
        .iter()
        .map(|&(gib, secs)| Row {
            name: format!("snapshot, {} MiB dirtied, {gib} GiB volume", dirty >> 20),
            ours: format!("{:.0} ms", secs * 1000.0),
            peer: format!("{:.0} ms (same, {} GiB volume)", smallest * 1000.0, sizes_gib[0]),
            ratio: smallest / secs,
        })
        .collect()
}

fn bench_recovery(dir: &Path, volume: u64, data: u64, journaled: u64, rounds: usize) -> Row {
    // An adopted image with `data` bytes (the base snapshot), then `journaled` bytes of writes.
    let image = dir.join("recover.img");
    let _ = fs::remove_dir_all(rewind_engine::store::default_store_dir(&image));
    let file = sparse_file(&image, volume);
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 253) as u8 + 1).collect();
    for i in 0..data >> 20 {
        file.write_all_at(&chunk, i * (volume / (data >> 20))).unwrap();
    }
    file.sync_all().unwrap();
    drop(file);
    let (store, _) = Store::create(&image, None, &CreateOptions::default(), &mut |_, _| {}).unwrap();
    let block = [0x77u8; 65536];
    for offset in offsets((journaled / 65536) as usize, 65536, volume, 99) {
        store.write(offset, &block).unwrap();
    }
    let head = store.head();
    let mut ours = Vec::new();
    let mut peer = Vec::new();
    let output = dir.join("recovered.img");
    let copy = dir.join("copied.img");
    for _ in 0..rounds {
        let _ = fs::remove_file(&output);
        let start = Instant::now();
        store.recover(&RecoveryTarget::Seq(head), &output, &mut |_, _| {}).unwrap();
        ours.push(start.elapsed().as_secs_f64());

        let _ = fs::remove_file(&copy);
        let start = Instant::now();
        let status = Command::new("cp").arg("--sparse=always").arg(&image).arg(&copy).status().unwrap();
        assert!(status.success());
        File::open(&copy).unwrap().sync_all().unwrap();
        peer.push(start.elapsed().as_secs_f64());
    }
    assert!(fs::read(&output).unwrap() == fs::read(&image).unwrap(), "recovery is not byte-exact");
    store.close().unwrap();
    for path in [&output, &copy, &image] {
        fs::remove_file(path).unwrap();
    }
    fs::remove_dir_all(rewind_engine::store::default_store_dir(&image)).unwrap();
    let (ours, peer) = (median(ours), median(peer));
    let bytes = (data + journaled) as f64 / (1 << 20) as f64;
    Row {
        name: format!(
            "recovery, {} MiB base + {} MiB journal, {} GiB volume",
            data >> 20,
            journaled >> 20,
            volume >> 30
        ),
        ours: format!("{:.0} ms ({:.0} MiB/s)", ours * 1000.0, bytes / ours),
        peer: format!("{:.0} ms (cp --sparse=always + sync)", peer * 1000.0),
        ratio: peer / ours,
    }
}

/// Journal bytes per 4 KiB write: record header and alignment over the payload.
fn bench_journal_overhead(dir: &Path) -> Row {
    let image = dir.join("overhead.img");
    let _ = fs::remove_dir_all(rewind_engine::store::default_store_dir(&image));
    let _ = fs::remove_file(&image);
    let options = CreateOptions { size: Some(64 << 20), ..Default::default() };
    let (store, _) = Store::create(&image, None, &options, &mut |_, _| {}).unwrap();
    let before = store.status().journal_bytes;
    let count = 1000u64;
    for i in 0..count {
        store.write((i % 16000) * 4096, &[7u8; 4096]).unwrap();
    }
    let per_write = (store.status().journal_bytes - before) as f64 / count as f64;
    store.close().unwrap();
    fs::remove_dir_all(rewind_engine::store::default_store_dir(&image)).unwrap();
    fs::remove_file(&image).unwrap();
    Row {
        name: "journal bytes per 4 KiB write".into(),
        ours: format!("{per_write:.0} B ({:.2}% metadata)", (per_write - 4096.0) / 4096.0 * 100.0),
        peer: "4096 B (the data alone)".into(),
        ratio: 4096.0 / per_write,
    }
}

fn main() {
    // `cargo test --benches` runs this with --test: nothing to measure there.
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    // Cargo runs a bench in its own package's directory; relative paths (the default work
    // directory, a relative REWIND_BENCH_DIR, target/bench for the report) are meant from the
    // workspace's top, where scripts/bench looks for engine.md.
    std::env::set_current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).unwrap();
    let quick = std::env::var_os("REWIND_BENCH_QUICK").is_some();
    let rounds = if quick { 3 } else { 5 };
    let work = PathBuf::from(std::env::var("REWIND_BENCH_DIR").unwrap_or_else(|_| "target/bench/work".into()));
    fs::create_dir_all(&work).unwrap();
    let total = if quick { 32 << 20 } else { 128 << 20 };
    let mut rows = vec![
        bench_journal_overhead(&work),
        bench_append(&work, 4096, total, rounds),
        bench_append(&work, 65536, total * 2, rounds),
    ];
    let sizes: &[u64] = if quick { &[1, 4] } else { &[1, 4, 16] };
    rows.extend(bench_snapshot(&work, sizes, 40 << 20, rounds));
    rows.push(bench_recovery(&work, 1 << 30, if quick { 64 << 20 } else { 256 << 20 }, 64 << 20, rounds));

    let mut md = String::from("| benchmark | rewind | peer | ratio |\n|---|---|---|---|\n");
    for row in &rows {
        md.push_str(&format!("| {} | {} | {} | {:.2}× |\n", row.name, row.ours, row.peer, row.ratio));
    }
    print!("{md}");
    let json: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| serde_json::json!({"benchmark": r.name, "rewind": r.ours, "peer": r.peer, "ratio": r.ratio}))
        .collect();
    let out = Path::new("target/bench");
    fs::create_dir_all(out).unwrap();
    fs::write(out.join("engine.md"), &md).unwrap();
    fs::write(out.join("engine.json"), serde_json::to_string_pretty(&json).unwrap()).unwrap();
    let _ = fs::remove_dir_all(&work);
}
