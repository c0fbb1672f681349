//! File contents and sizes: after a crash, a file holds exactly what it held at its last
//! fsync, in every model (names are made durable first where the model reverts them).

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

use common::*;
use crashfs::Model;

const MODELS: [Model; 2] = [Model::Data, Model::DataAndMetadata];

/// A synced file `f` holding `content`, its name durable too.
fn durable_file(fx: &Fixture, content: &[u8]) -> std::path::PathBuf {
    let path = fx.path("f");
    fs::write(&path, content).unwrap();
    fsync(&path);
    fsync_dir(&fx.path(""));
    path
}

#[test]
fn writes_after_the_last_fsync_are_dropped() {
    for model in MODELS {
        let Some(fx) = Fixture::new(model) else { return };
        let first = pattern(1, 10_000);
        let path = durable_file(&fx, &first);
        // Overwrite inside, across the end, and far past it.
        write_at(&path, 100, &pattern(2, 5000));
        let mut synced = first.clone();
        synced[100..5100].copy_from_slice(&pattern(2, 5000));
        fsync(&path);
        write_at(&path, 4000, &pattern(3, 9000));
        write_at(&path, 3, &pattern(4, 1));
        write_at(&path, 50_000, b"far");
        assert_eq!(fs::metadata(&path).unwrap().len(), 50_003);

        let report = fx.mount.crash().unwrap();
        assert_eq!(report.files_reverted, 1, "{model}: {report}");
        assert_eq!(report.sizes_reverted, 1, "{model}: {report}");
        assert_eq!(fs::read(&path).unwrap(), synced, "{model}");
        assert_eq!(fs::read(fx.backing("f")).unwrap(), synced, "{model}: backing file");
    }
}

#[test]
fn fdatasync_makes_data_and_size_durable() {
    for model in MODELS {
        let Some(fx) = Fixture::new(model) else { return };
        let path = durable_file(&fx, b"old");
        write_at(&path, 0, &pattern(5, 7000));
        fdatasync(&path);
        let report = fx.mount.crash().unwrap();
        assert_eq!(report.files_reverted, 0, "{model}: {report}");
        assert_eq!(fs::read(&path).unwrap(), pattern(5, 7000), "{model}");
    }
}

#[test]
fn truncations_and_extensions_are_reverted() {
    let synced = pattern(6, 20_000);
    type Change = fn(&File);
    let changes: [(&str, Change); 6] = [
        ("truncate down", |f| f.set_len(5000).unwrap()),
        ("truncate to zero then write", |f| {
            f.set_len(0).unwrap();
            f.write_all_at(b"new", 0).unwrap();
        }),
        ("truncate down then up", |f| {
            f.set_len(100).unwrap();
            f.set_len(30_000).unwrap();
        }),
        ("truncate up", |f| f.set_len(1 << 20).unwrap()),
        ("write past the end", |f| f.write_all_at(b"x", 100_000).unwrap()),
        ("fallocate extend", |f| {
            // SAFETY: plain syscall on an open fd.
            assert_eq!(unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 1 << 20) }, 0);
        }),
    ];
    for model in MODELS {
        for (what, change) in changes {
            let Some(fx) = Fixture::new(model) else { return };
            let path = durable_file(&fx, &synced);
            change(&OpenOptions::new().read(true).write(true).open(&path).unwrap());
            assert_ne!(fs::read(&path).unwrap(), synced, "{model}, {what}: the change happened");
            fx.mount.crash().unwrap();
            assert_eq!(fs::read(&path).unwrap(), synced, "{model}, {what}");
        }
    }
}

#[test]
fn punched_and_zeroed_ranges_are_restored_and_keep_size_reservations_dropped() {
    for model in MODELS {
        let Some(fx) = Fixture::new(model) else { return };
        let synced = pattern(7, 64 * 1024);
        let path = durable_file(&fx, &synced);
        let file = OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: plain syscalls on an open fd.
        unsafe {
            assert_eq!(libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | keep, 4096, 8192), 0);
            // tmpfs (where scripts/test keeps scratch files) has no ZERO_RANGE; ext4 has.
            let zeroed = libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_ZERO_RANGE, 30_000, 100);
            let unsupported = std::io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP);
            assert!(zeroed == 0 || unsupported, "{}", std::io::Error::last_os_error());
            assert_eq!(libc::fallocate(file.as_raw_fd(), keep, 0, 1 << 20), 0);
        }
        drop(file);
        let now = fs::read(&path).unwrap();
        assert_eq!(now.len(), synced.len());
        assert!(now[4096..12288].iter().all(|&b| b == 0));
        fx.mount.crash().unwrap();
        assert_eq!(fs::read(&path).unwrap(), synced, "{model}");
    }
}

#[test]
fn open_with_o_trunc_is_reverted() {
    for model in MODELS {
        let Some(fx) = Fixture::new(model) else { return };
        let path = durable_file(&fx, &pattern(8, 9000));
        let file = OpenOptions::new().write(true).truncate(true).open(&path).unwrap();
        file.write_all_at(b"short", 0).unwrap();
        drop(file);
        assert_eq!(fs::read(&path).unwrap(), b"short");
        fx.mount.crash().unwrap();
        assert_eq!(fs::read(&path).unwrap(), pattern(8, 9000), "{model}");
    }
}

#[test]
fn o_dsync_writes_are_durable_when_they_return() {
    for model in MODELS {
        let Some(fx) = Fixture::new(model) else { return };
        let path = durable_file(&fx, b"old");
        let file = OpenOptions::new().write(true).custom_flags(libc::O_DSYNC).open(&path).unwrap();
        file.write_all_at(b"synchronous", 0).unwrap();
        drop(file);
        fx.mount.crash().unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"synchronous", "{model}");
    }
}

#[test]
fn copy_file_range_into_a_file_is_reverted() {
    for model in MODELS {
        let Some(fx) = Fixture::new(model) else { return };
        let path = durable_file(&fx, &pattern(9, 20_000));
        let src = fx.path("src");
        fs::write(&src, pattern(10, 20_000)).unwrap();
        let (from, to) = (File::open(&src).unwrap(), OpenOptions::new().write(true).open(&path).unwrap());
        let (mut off_in, mut off_out): (i64, i64) = (0, 5000);
        // SAFETY: both fds are open; the offsets are ours.
        let n =
            unsafe { libc::copy_file_range(from.as_raw_fd(), &mut off_in, to.as_raw_fd(), &mut off_out, 10_000, 0) };
        assert_eq!(n, 10_000);
        drop((from, to));
        assert_eq!(fs::read(&path).unwrap()[5000..15_000], pattern(10, 10_000)[..]);
        fx.mount.crash().unwrap();
        assert_eq!(fs::read(&path).unwrap(), pattern(9, 20_000), "{model}");
    }
}

#[test]
fn data_model_keeps_an_unsynced_new_file_but_empty() {
    let Some(fx) = Fixture::new(Model::Data) else { return };
    fs::write(fx.path("new"), b"never synced").unwrap();
    let report = fx.mount.crash().unwrap();
    assert_eq!(report.entries_reverted, 0, "{report}");
    assert_eq!(fs::read(fx.path("new")).unwrap(), b"");
}

#[test]
fn files_present_before_the_mount_are_durable() {
    let Some(fx) = Fixture::with_backing(Model::DataAndMetadata, |backing| {
        fs::create_dir(backing.join("d")).unwrap();
        fs::write(backing.join("d/old"), pattern(11, 5000)).unwrap();
    }) else {
        return;
    };
    let path = fx.path("d/old");
    write_at(&path, 10, b"changed");
    fs::rename(&path, fx.path("d/renamed")).unwrap();
    fx.mount.crash().unwrap();
    assert_eq!(tree(&fx.path("")), [("d".into(), None), ("d/old".into(), Some(pattern(11, 5000)))].into());
}

#[test]
fn torn_model_keeps_each_page_whole_old_or_whole_new_reproducibly() {
    let run = |seed: u64| {
        let fx = Fixture::new(Model::Torn { seed })?;
        let path = durable_file(&fx, &pattern(12, 64 * 4096));
        write_at(&path, 0, &pattern(13, 64 * 4096));
        let report = fx.mount.crash().unwrap();
        let after = fs::read(&path).unwrap();
        let (old, new) = (pattern(12, 64 * 4096), pattern(13, 64 * 4096));
        let mut kept = 0;
        for page in 0..64 {
            let range = page * 4096..(page + 1) * 4096;
            if after[range.clone()] == new[range.clone()] {
                kept += 1;
            } else {
                assert_eq!(after[range.clone()], old[range], "page {page} is neither old nor new");
            }
        }
        assert_eq!(report.pages_kept, kept, "{report}");
        Some((kept, after))
    };
    let Some((kept, first)) = run(42) else { return };
    assert!(kept > 0 && kept < 64, "{kept} of 64 pages kept: expected some of each");
    assert_eq!(run(42).unwrap().1, first, "same seed, same pages");
    assert_ne!(run(43).unwrap().1, first, "another seed, other pages");
}

#[test]
fn stats_and_sync_all() {
    let Some(fx) = Fixture::new(Model::DataAndMetadata) else { return };
    let path = durable_file(&fx, &pattern(14, 8192));
    assert_eq!(fx.mount.stats().unwrap(), crashfs::Stats::default());
    write_at(&path, 0, b"a");
    write_at(&path, 8192, &[1; 100]);
    fs::write(fx.path("other"), b"x").unwrap();
    let stats = fx.mount.stats().unwrap();
    assert_eq!((stats.unsynced_files, stats.pending_entries), (2, 1), "{stats}");
    assert_eq!(stats.unsynced_bytes, 4096 + 100 + 1, "{stats}");
    fx.mount.sync_all().unwrap();
    assert_eq!(fx.mount.stats().unwrap(), crashfs::Stats::default());
    let report = fx.mount.crash().unwrap();
    assert_eq!((report.files_reverted, report.entries_reverted), (0, 0), "{report}");
    assert_eq!(fs::read(fx.path("other")).unwrap(), b"x");
}
