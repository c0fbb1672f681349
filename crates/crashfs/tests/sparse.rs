//! Large and sparse files: the cost of tracking and of a crash follows what was written, not
//! the size of the file, and holes stay holes.

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::time::{Duration, Instant};

use common::*;
use crashfs::Model;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn read_at(file: &File, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    file.read_exact_at(&mut buf, offset).unwrap();
    buf
}

fn allocated(path: &std::path::Path) -> u64 {
    fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn a_one_gib_sparse_image() {
    let Some(fx) = Fixture::new(Model::DataAndMetadata) else { return };
    let path = fx.path("image");
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    file.set_len(GIB).unwrap();
    let synced = [(0, pattern(1, MIB as usize)), (GIB / 2, pattern(2, MIB as usize)), (GIB - 4096, pattern(3, 4096))];
    for (offset, data) in &synced {
        file.write_all_at(data, *offset).unwrap();
    }
    file.sync_all().unwrap();
    fsync_dir(&fx.path(""));

    let started = Instant::now();
    file.write_all_at(&pattern(4, 4096), 100 * MIB).unwrap(); // into a hole
    file.write_all_at(&pattern(5, MIB as usize), GIB / 2 + 4096).unwrap(); // over synced data and a hole
    file.write_all_at(&pattern(6, 100), 2 * GIB).unwrap(); // far past the end
    file.set_len(GIB + 12345).unwrap();
    let stats = fx.mount.stats().unwrap();
    assert!(stats.unsynced_bytes < 2 * MIB + 20_000, "{stats}");
    let report = fx.mount.crash().unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_eq!(report.sizes_reverted, 1, "{report}");
    assert!(report.bytes_restored <= MIB + 2 * 4096, "{report}");

    drop(file);
    let file = File::open(&path).unwrap();
    assert_eq!(file.metadata().unwrap().len(), GIB);
    for (offset, data) in &synced {
        assert!(read_at(&file, *offset, data.len()) == *data, "synced data at {offset}");
    }
    assert!(read_at(&file, 100 * MIB, 4096).iter().all(|&b| b == 0), "the hole is a hole again");
    assert!(read_at(&file, GIB / 2 + MIB, 4096).iter().all(|&b| b == 0));
    assert!(allocated(&fx.backing("image")) < 8 * MIB, "{} bytes allocated", allocated(&fx.backing("image")));
}

#[test]
fn a_preallocated_64_mib_segment_written_in_place() {
    // The journal's pattern: a segment reserved and synced, then filled by appends in place,
    // each batch synced; the last unsynced batch is lost.
    let Some(fx) = Fixture::new(Model::Data) else { return };
    let path = fx.path("segment");
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    // SAFETY: plain syscall on an open fd.
    assert_eq!(unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, 64 * MIB as i64) }, 0);
    file.sync_all().unwrap();
    let started = Instant::now();
    for i in 0..60 {
        file.write_all_at(&pattern(i, MIB as usize), i * MIB).unwrap();
        if i < 40 {
            file.sync_data().unwrap();
        }
    }
    let report = fx.mount.crash().unwrap();
    assert_eq!(report.bytes_restored, 20 * MIB, "{report}");
    drop(file);
    let file = File::open(&path).unwrap();
    assert_eq!(file.metadata().unwrap().len(), 64 * MIB);
    for i in 0..40 {
        assert!(read_at(&file, i * MIB, MIB as usize) == pattern(i, MIB as usize), "MiB {i}");
    }
    assert!(read_at(&file, 40 * MIB, 24 * MIB as usize).iter().all(|&b| b == 0));
    let took = started.elapsed();
    assert!(took < Duration::from_secs(20), "took {took:?}");
}
