//! Fault injection: the n-th write, fsync, fdatasync, fallocate, rename or truncate fails
//! with the chosen errno, changes nothing, and (fsync, fdatasync) leaves what was not durable
//! as it was; every operation is counted.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;

use common::*;
use crashfs::{Fault, Model, Op, OpCounts, Persist};

const PAGE: usize = 4096;
const BIN: &str = env!("CARGO_BIN_EXE_crashfs");

fn fault(op: Op, nth: u64, errno: i32, persist: Persist) -> Fault {
    Fault { op, nth, errno, persist }
}

/// The errno of a failed call; panics if it did not fail.
fn errno_of<T: std::fmt::Debug>(result: io::Result<T>) -> i32 {
    result.expect_err("the call should have failed").raw_os_error().expect("an OS error")
}

fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on an fd that `file` keeps open.
    if unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as libc::off_t, len as libc::off_t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn open_rw(path: &Path) -> File {
    OpenOptions::new().read(true).write(true).open(path).unwrap()
}

/// A fixture whose backing directory holds `f` with `content`, durable from the start.
fn with_file(model: Model, content: &[u8]) -> Option<Fixture> {
    Fixture::with_backing(model, |backing| fs::write(backing.join("f"), content).unwrap())
}

/// Both through the mount and in the backing directory.
fn assert_content(fx: &Fixture, rel: &str, expected: &[u8], what: &str) {
    assert!(fs::read(fx.path(rel)).unwrap() == expected, "{what}: {rel} through the mount");
    assert!(fs::read(fx.backing(rel)).unwrap() == expected, "{what}: {rel} in the backing directory");
}

#[test]
fn the_kth_write_fails_with_its_errno_and_changes_nothing() {
    for errno in [libc::EIO, libc::ENOSPC] {
        for k in 1..=4u64 {
            let old = pattern(0, 4 * PAGE);
            let Some(fx) = with_file(Model::Data, &old) else { return };
            let before = fx.mount.op_counts().unwrap();
            let file = open_rw(&fx.path("f"));
            fx.mount.inject(fault(Op::Write, k, errno, Persist::Once)).unwrap();
            let mut expected = old.clone();
            for i in 1..=4u64 {
                let page = pattern(10 + i, PAGE);
                let offset = (i - 1) * PAGE as u64;
                let written = file.write_at(&page, offset);
                let what = format!("errno {errno}, fault on write {k}, write {i}");
                if i == k {
                    assert_eq!(errno_of(written), errno, "{what}");
                } else {
                    assert_eq!(written.unwrap(), PAGE, "{what}");
                    expected[offset as usize..][..PAGE].copy_from_slice(&page);
                }
            }
            assert_content(&fx, "f", &expected, &format!("errno {errno}, k {k}"));
            let after = fx.mount.op_counts().unwrap();
            assert_eq!(after.write - before.write, 4, "each pwrite of a page is one write");
        }
    }
}

#[test]
fn forever_fails_every_later_write_until_cleared() {
    let old = pattern(1, 2 * PAGE);
    let Some(fx) = with_file(Model::Data, &old) else { return };
    let file = open_rw(&fx.path("f"));
    fx.mount.inject(fault(Op::Write, 2, libc::ENOSPC, Persist::Forever)).unwrap();
    file.write_all_at(&pattern(2, PAGE), 0).unwrap();
    let mut expected = old.clone();
    expected[..PAGE].copy_from_slice(&pattern(2, PAGE));
    for attempt in 0..5 {
        // Over the second page, then appends: none of them is carried out.
        let offset = (1 + attempt) * PAGE as u64;
        assert_eq!(errno_of(file.write_at(&pattern(3, PAGE), offset)), libc::ENOSPC, "attempt {attempt}");
        assert_eq!(file.metadata().unwrap().len(), 2 * PAGE as u64, "a failed append leaves the size");
    }
    assert_content(&fx, "f", &expected, "while failing");
    fx.mount.clear_faults().unwrap();
    file.write_all_at(&pattern(4, PAGE), 2 * PAGE as u64).unwrap();
    expected.extend_from_slice(&pattern(4, PAGE));
    assert_content(&fx, "f", &expected, "after clear");
}

#[test]
fn nth_counts_from_inject_and_a_new_fault_replaces_the_old() {
    let Some(fx) = with_file(Model::Data, &pattern(5, PAGE)) else { return };
    let file = open_rw(&fx.path("f"));
    for _ in 0..3 {
        file.write_all_at(b"x", 0).unwrap();
    }
    fx.mount.inject(fault(Op::Fsync, 1, libc::EIO, Persist::Forever)).unwrap();
    fx.mount.inject(fault(Op::Write, 2, libc::EIO, Persist::Once)).unwrap();
    file.sync_all().unwrap();
    file.write_all_at(b"y", 0).unwrap();
    assert_eq!(errno_of(file.write_at(b"z", 0)), libc::EIO);
    file.write_all_at(b"w", 0).unwrap();
    file.sync_all().unwrap();
    assert_eq!(&fs::read(fx.path("f")).unwrap()[..1], b"w");
}

#[test]
fn a_failed_fsync_or_fdatasync_leaves_the_data_undurable() {
    type Sync = fn(&File) -> io::Result<()>;
    let syncs: [(Op, Sync); 2] = [(Op::Fsync, File::sync_all), (Op::Fdatasync, File::sync_data)];
    for (op, sync) in syncs {
        for model in [Model::Data, Model::DataAndMetadata] {
            let old = pattern(6, 3 * PAGE);
            let Some(fx) = with_file(model, &old) else { return };
            let file = open_rw(&fx.path("f"));
            let new = pattern(7, 5 * PAGE);
            file.write_all_at(&new, 0).unwrap();
            fx.mount.inject(fault(op, 1, libc::EIO, Persist::Once)).unwrap();
            assert_eq!(errno_of(sync(&file)), libc::EIO, "{op} {model}");
            assert_eq!(fx.mount.stats().unwrap().unsynced_files, 1, "{op} {model}: still unsynced");
            let report = fx.mount.crash().unwrap();
            assert_eq!(report.files_reverted, 1, "{op} {model}: {report}");
            assert_content(&fx, "f", &old, &format!("{op} {model}: crash after the failed sync"));

            // Once: the next sync goes through and makes what it finds durable.
            file.write_all_at(&new, 0).unwrap();
            sync(&file).unwrap();
            let report = fx.mount.crash().unwrap();
            assert_eq!(report.files_reverted, 0, "{op} {model}: {report}");
            assert_content(&fx, "f", &new, &format!("{op} {model}: crash after the good sync"));
        }
    }
}

#[test]
fn fsync_and_fdatasync_are_counted_apart() {
    let Some(fx) = with_file(Model::Data, b"old") else { return };
    let file = open_rw(&fx.path("f"));
    file.write_all_at(b"new", 0).unwrap();
    fx.mount.inject(fault(Op::Fsync, 1, libc::EIO, Persist::Forever)).unwrap();
    file.sync_data().unwrap();
    assert_eq!(errno_of(file.sync_all()), libc::EIO);
    fx.mount.inject(fault(Op::Fdatasync, 1, libc::EIO, Persist::Forever)).unwrap();
    file.sync_all().unwrap();
    assert_eq!(errno_of(file.sync_data()), libc::EIO);
}

#[test]
fn a_failed_directory_fsync_leaves_the_new_name_undurable() {
    let Some(fx) = Fixture::new(Model::DataAndMetadata) else { return };
    let root = File::open(fx.path("")).unwrap();
    fs::write(fx.path("new"), b"content").unwrap();
    fsync(&fx.path("new"));
    // A directory fsync counts as an fsync (fdatasync of a directory as an fdatasync).
    fx.mount.inject(fault(Op::Fsync, 2, libc::EIO, Persist::Once)).unwrap();
    root.sync_all().unwrap();
    fs::write(fx.path("newer"), b"content").unwrap();
    assert_eq!(errno_of(root.sync_all()), libc::EIO);
    fx.mount.crash().unwrap();
    assert!(fx.path("new").exists(), "the first directory fsync went through");
    assert!(!fx.path("newer").exists(), "the failed one made nothing durable");

    fs::write(fx.path("newer"), b"content").unwrap();
    fx.mount.inject(fault(Op::Fdatasync, 1, libc::EIO, Persist::Once)).unwrap();
    assert_eq!(errno_of(root.sync_data()), libc::EIO);
    fx.mount.crash().unwrap();
    assert!(!fx.path("newer").exists());
    fs::write(fx.path("newer"), b"content").unwrap();
    root.sync_data().unwrap();
    fx.mount.crash().unwrap();
    assert!(fx.path("newer").exists());
}

#[test]
fn a_failed_fallocate_changes_neither_size_nor_bytes() {
    let old = pattern(8, 3 * PAGE);
    let Some(fx) = with_file(Model::Data, &old) else { return };
    let file = open_rw(&fx.path("f"));
    fx.mount.inject(fault(Op::Fallocate, 1, libc::ENOSPC, Persist::Once)).unwrap();
    assert_eq!(errno_of(fallocate(&file, 0, 0, 1 << 20)), libc::ENOSPC);
    assert_eq!(file.metadata().unwrap().len(), old.len() as u64);
    fx.mount.inject(fault(Op::Fallocate, 1, libc::EIO, Persist::Once)).unwrap();
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    assert_eq!(errno_of(fallocate(&file, punch, 0, PAGE as u64)), libc::EIO);
    assert_content(&fx, "f", &old, "after the failed fallocates");
    assert_eq!(fx.mount.stats().unwrap().unsynced_files, 0, "nothing to undo");
    fallocate(&file, 0, 0, 1 << 20).unwrap();
    assert_eq!(file.metadata().unwrap().len(), 1 << 20);
}

#[test]
fn a_failed_rename_does_not_happen() {
    let Some(fx) = Fixture::with_backing(Model::DataAndMetadata, |backing| {
        fs::write(backing.join("a"), b"A").unwrap();
        fs::write(backing.join("b"), b"B").unwrap();
        fs::create_dir(backing.join("d")).unwrap();
    }) else {
        return;
    };
    fx.mount.inject(fault(Op::Rename, 1, libc::EIO, Persist::Forever)).unwrap();
    assert_eq!(errno_of(fs::rename(fx.path("a"), fx.path("b"))), libc::EIO);
    assert_eq!(errno_of(fs::rename(fx.path("a"), fx.path("d/a"))), libc::EIO);
    assert_eq!(errno_of(fs::rename(fx.path("a"), fx.path("c"))), libc::EIO);
    assert_content(&fx, "a", b"A", "after the failed renames");
    assert_content(&fx, "b", b"B", "after the failed renames");
    assert!(!fx.path("c").exists() && !fx.path("d/a").exists());
    assert_eq!(fx.mount.stats().unwrap().pending_entries, 0, "nothing to undo");
    fx.mount.clear_faults().unwrap();
    fs::rename(fx.path("a"), fx.path("b")).unwrap();
    assert_content(&fx, "b", b"A", "after the good rename");
    assert_eq!(fx.mount.op_counts().unwrap().rename, 4);
}

#[test]
fn a_failed_truncate_leaves_the_size() {
    let old = pattern(9, 10_000);
    let Some(fx) = with_file(Model::Data, &old) else { return };
    let file = open_rw(&fx.path("f"));
    fx.mount.inject(fault(Op::Truncate, 1, libc::EIO, Persist::Forever)).unwrap();
    assert_eq!(errno_of(file.set_len(100)), libc::EIO, "ftruncate down");
    assert_eq!(errno_of(file.set_len(1 << 20)), libc::EIO, "ftruncate up");
    let path = std::ffi::CString::new(fx.path("f").into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: `path` is NUL-terminated and outlives the call.
    assert_eq!(unsafe { libc::truncate(path.as_ptr(), 0) }, -1, "truncate");
    assert_eq!(io::Error::last_os_error().raw_os_error(), Some(libc::EIO));
    // open(O_TRUNC) goes through a size change too.
    assert_eq!(errno_of(File::create(fx.path("f"))), libc::EIO, "open with O_TRUNC");
    assert_eq!(file.metadata().unwrap().len(), old.len() as u64);
    assert_content(&fx, "f", &old, "after the failed truncations");
    assert_eq!(fx.mount.stats().unwrap().unsynced_files, 0, "nothing to undo");
    assert_eq!(fx.mount.op_counts().unwrap().truncate, 4);
    fx.mount.clear_faults().unwrap();
    file.set_len(100).unwrap();
    assert_content(&fx, "f", &old[..100], "after the good truncation");
}

#[test]
fn every_operation_is_counted_once() {
    let Some(fx) = Fixture::new(Model::Data) else { return };
    assert_eq!(fx.mount.op_counts().unwrap(), OpCounts::default());
    let mut expect = OpCounts::default();
    let check = |expect: &OpCounts, what: &str| assert_eq!(&fx.mount.op_counts().unwrap(), expect, "after {what}");

    fs::write(fx.path("f"), pattern(1, 3 * PAGE)).unwrap();
    expect.write += 1;
    check(&expect, "creating a file with one write");
    fs::write(fx.path("f"), pattern(2, 2 * PAGE)).unwrap();
    expect.truncate += 1;
    expect.write += 1;
    check(&expect, "rewriting it (O_TRUNC)");
    let file = open_rw(&fx.path("f"));
    file.set_len(PAGE as u64).unwrap();
    expect.truncate += 1;
    check(&expect, "ftruncate");
    file.sync_all().unwrap();
    expect.fsync += 1;
    file.sync_data().unwrap();
    expect.fdatasync += 1;
    let root = File::open(fx.path("")).unwrap();
    root.sync_all().unwrap();
    expect.fsync += 1;
    root.sync_data().unwrap();
    expect.fdatasync += 1;
    check(&expect, "fsync and fdatasync of a file and a directory");
    fallocate(&file, 0, 0, 4 * PAGE as u64).unwrap();
    expect.fallocate += 1;
    fs::rename(fx.path("f"), fx.path("g")).unwrap();
    expect.rename += 1;
    check(&expect, "fallocate and rename");
    let copy = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(fx.path("h")).unwrap();
    let (mut off_in, mut off_out) = (0i64, 0i64);
    // SAFETY: both fds are open for the call; the offsets are ours.
    let n = unsafe { libc::copy_file_range(file.as_raw_fd(), &mut off_in, copy.as_raw_fd(), &mut off_out, PAGE, 0) };
    assert_eq!(n, PAGE as isize);
    expect.write += 1;
    check(&expect, "copy_file_range (a write)");
    let dsync = OpenOptions::new().write(true).custom_flags(libc::O_DSYNC).open(fx.path("g")).unwrap();
    dsync.write_all_at(&pattern(3, PAGE), 0).unwrap();
    expect.write += 1;
    expect.fdatasync += 1;
    check(&expect, "an O_DSYNC write (the kernel sends an fdatasync)");
    let sync = OpenOptions::new().write(true).custom_flags(libc::O_SYNC).open(fx.path("g")).unwrap();
    sync.write_all_at(&pattern(3, PAGE), 0).unwrap();
    expect.write += 1;
    expect.fsync += 1;
    check(&expect, "an O_SYNC write (the kernel sends an fsync)");
    fx.mount.inject(fault(Op::Write, 1, libc::EIO, Persist::Once)).unwrap();
    assert_eq!(errno_of(file.write_at(b"x", 0)), libc::EIO);
    expect.write += 1;
    check(&expect, "a failed write");
    assert_eq!(
        expect.to_string(),
        format!(
            "write={} fsync={} fdatasync={} fallocate={} rename={} truncate={}",
            expect.get(Op::Write),
            expect.get(Op::Fsync),
            expect.get(Op::Fdatasync),
            expect.get(Op::Fallocate),
            expect.get(Op::Rename),
            expect.get(Op::Truncate)
        )
    );
}

/// A small workload of every kind of operation, deterministic in what it sends.
fn workload(dir: &Path) -> io::Result<()> {
    let db = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(dir.join("db"))?;
    db.write_all_at(&pattern(1, 2 * PAGE), 0)?;
    db.sync_data()?;
    fallocate(&db, 0, 0, 8 * PAGE as u64)?;
    db.write_all_at(&pattern(2, PAGE), 2 * PAGE as u64)?;
    db.sync_all()?;
    let tmp = File::create(dir.join("tmp"))?;
    tmp.write_all_at(&pattern(3, PAGE), 0)?;
    tmp.set_len(PAGE as u64 / 2)?;
    tmp.sync_all()?;
    fs::rename(dir.join("tmp"), dir.join("meta"))?;
    File::open(dir)?.sync_all()?;
    db.set_len(4 * PAGE as u64)?;
    db.sync_data()
}

#[test]
fn a_sweep_hits_every_operation_of_a_workload() {
    let Some(fx) = Fixture::new(Model::DataAndMetadata) else { return };
    workload(fx.mount.mountpoint()).unwrap();
    let total = fx.mount.op_counts().unwrap();
    drop(fx);
    assert_eq!(total, OpCounts { write: 3, fsync: 3, fdatasync: 2, fallocate: 1, rename: 1, truncate: 2 });
    for op in Op::ALL {
        for k in 1..=total.get(op) + 1 {
            for (persist, errno) in [(Persist::Once, libc::ENOSPC), (Persist::Forever, libc::EIO)] {
                let Some(fx) = Fixture::new(Model::DataAndMetadata) else { return };
                fx.mount.inject(fault(op, k, errno, persist)).unwrap();
                let result = workload(fx.mount.mountpoint());
                let counts = fx.mount.op_counts().unwrap();
                if k <= total.get(op) {
                    assert_eq!(errno_of(result), errno, "{op} #{k} {persist}");
                    assert_eq!(counts.get(op), k, "{op} #{k} {persist}: stopped at the failed one");
                } else {
                    result.unwrap();
                    assert_eq!(counts, total, "{op} #{k} {persist}: past the end, nothing fails");
                }
            }
        }
    }
}

#[test]
fn bad_faults_are_refused() {
    let Some(fx) = Fixture::new(Model::Data) else { return };
    for bad in [
        fault(Op::Write, 0, libc::EIO, Persist::Once),
        fault(Op::Write, 1, 0, Persist::Once),
        fault(Op::Write, 1, -5, Persist::Once),
        fault(Op::Write, 1, 512, Persist::Once),
        fault(Op::Fsync, 1, libc::ENOSYS, Persist::Once),
    ] {
        assert!(fx.mount.inject(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn the_control_socket_and_the_binary_arm_clear_and_count() {
    let Some(mut fx) = with_file(Model::Data, &pattern(1, PAGE)) else { return };
    let socket = fx.dir.0.join("sock");
    fx.mount.listen(&socket).unwrap();
    let ask = |command: &str| crashfs::request(&socket, command).unwrap();
    assert_eq!(ask("counts"), "ok write=0 fsync=0 fdatasync=0 fallocate=0 rename=0 truncate=0");

    let file = open_rw(&fx.path("f"));
    assert_eq!(ask("fail write 2 ENOSPC once"), "ok");
    file.write_all_at(b"a", 0).unwrap();
    assert_eq!(errno_of(file.write_at(b"b", 0)), libc::ENOSPC);
    file.write_all_at(b"c", 0).unwrap();
    assert_eq!(ask("fail fsync 1 5 forever"), "ok", "errno as a number");
    assert_eq!(errno_of(file.sync_all()), libc::EIO);
    assert_eq!(errno_of(file.sync_all()), libc::EIO);
    assert_eq!(ask("clear"), "ok");
    file.sync_all().unwrap();
    let counts = ask("counts");
    assert_eq!(counts, "ok write=3 fsync=3 fdatasync=0 fallocate=0 rename=0 truncate=0");
    assert_eq!(counts["ok ".len()..].parse::<OpCounts>().unwrap(), fx.mount.op_counts().unwrap());
    for bad in [
        "fail",
        "fail write 1 EIO",
        "fail sync 1 EIO once",
        "fail write 0 EIO once",
        "fail write 1 EWHAT once",
        "fail write 1 38 once",
        "fail write 1 EIO twice",
        "clear now",
    ] {
        assert!(ask(bad).starts_with("err "), "{bad}: {}", ask(bad));
    }

    // `crashfs ctl` passes them through.
    let ctl = |args: &[&str]| Command::new(BIN).arg("ctl").arg(&socket).args(args).output().unwrap();
    let out = ctl(&["fail", "rename", "1", "EIO", "once"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    assert_eq!(errno_of(fs::rename(fx.path("f"), fx.path("g"))), libc::EIO);
    let out = ctl(&["counts"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ok write=3 fsync=3 fdatasync=0 fallocate=0 rename=1 truncate=0"
    );
    let out = ctl(&["fail", "rename", "0", "EIO", "once"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("err "));
    assert_eq!(ctl(&["clear"]).status.code(), Some(0));
    fs::rename(fx.path("f"), fx.path("g")).unwrap();
}
