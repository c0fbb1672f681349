//! The kernel's caches: after a crash, nothing read through the mount may show dropped bytes,
//! sizes or names, not even through a file descriptor or a mapping opened before the crash.

mod common;

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use common::*;
use crashfs::Model;

const LEN: usize = 64 * 1024;

fn read_all_at(file: &File, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len + 1];
    let mut done = 0;
    loop {
        match file.read_at(&mut buf[done..], done as u64).unwrap() {
            0 => break,
            n => done += n,
        }
    }
    buf.truncate(done);
    buf
}

#[test]
fn cached_pages_are_dropped_by_a_crash() {
    let Some(fx) = Fixture::new(Model::DataAndMetadata) else { return };
    let path = fx.path("f");
    // Same size: a size change alone would make the kernel drop its pages at the next getattr.
    let (old, new) = (pattern(1, LEN), pattern(2, LEN));
    fs::write(&path, &old).unwrap();
    fsync(&path);
    fsync_dir(&fx.path(""));

    let held = File::open(&path).unwrap();
    assert!(read_all_at(&held, LEN) == old, "pages now cached");
    // SAFETY: a fresh shared read-only mapping of an open file; unmapped below, read only
    // inside its length.
    let map = unsafe { libc::mmap(std::ptr::null_mut(), LEN, libc::PROT_READ, libc::MAP_SHARED, held.as_raw_fd(), 0) };
    assert_ne!(map, libc::MAP_FAILED);
    // SAFETY: `map` is LEN readable bytes until munmap.
    let mapped = || unsafe { std::slice::from_raw_parts(map as *const u8, LEN) }.to_vec();
    assert!(mapped() == old);

    write_at(&path, 0, &new);
    assert!(read_all_at(&held, LEN) == new, "the cache holds the new bytes");
    assert!(mapped() == new);

    fx.mount.crash().unwrap();
    assert!(read_all_at(&held, LEN) == old, "bytes through the old descriptor");
    assert!(mapped() == old, "bytes through the old mapping");
    assert!(fs::read(&path).unwrap() == old, "bytes through a new descriptor");
    // SAFETY: mapped above with this length, not used after.
    assert_eq!(unsafe { libc::munmap(map, LEN) }, 0);
}

#[test]
fn cached_sizes_are_dropped_by_a_crash() {
    let Some(fx) = Fixture::new(Model::DataAndMetadata) else { return };
    let path = fx.path("f");
    fs::write(&path, pattern(3, LEN)).unwrap();
    fsync(&path);
    fsync_dir(&fx.path(""));
    let held = File::open(&path).unwrap();
    write_at(&path, LEN as u64, b"appended");
    assert_eq!(held.metadata().unwrap().len(), LEN as u64 + 8);
    assert_eq!(read_all_at(&held, LEN + 8)[LEN..], b"appended"[..]);
    fx.mount.crash().unwrap();
    assert_eq!(held.metadata().unwrap().len(), LEN as u64, "size through the old descriptor");
    assert!(read_all_at(&held, LEN + 8) == pattern(3, LEN), "bytes through the old descriptor");
}

#[test]
fn cached_names_are_dropped_by_a_crash() {
    let Some(fx) = Fixture::new(Model::DataAndMetadata) else { return };
    fs::write(fx.path("durable"), b"d").unwrap();
    fsync_dir(&fx.path(""));
    fs::write(fx.path("new"), b"n").unwrap();
    fs::rename(fx.path("durable"), fx.path("renamed")).unwrap();
    assert!(fx.path("new").exists() && fx.path("renamed").exists() && !fx.path("durable").exists());
    fx.mount.crash().unwrap();
    assert!(!fx.path("new").exists());
    assert!(!fx.path("renamed").exists());
    assert_eq!(fs::read(fx.path("durable")).unwrap(), b"");
}

#[test]
fn unsynced_writes_through_a_mapping_are_dropped_too() {
    // Dirty pages of a shared mapping reach crashfs when the kernel writes them back, at the
    // latest when the mapping goes away (as it does when the workload is killed).
    let Some(fx) = Fixture::new(Model::DataAndMetadata) else { return };
    let path = fx.path("f");
    fs::write(&path, pattern(4, LEN)).unwrap();
    fsync(&path);
    fsync_dir(&fx.path(""));
    let file = fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    write_through_mapping_in_child(file, &pattern(5, LEN));
    assert!(fs::read(&path).unwrap() == pattern(5, LEN), "the mapping's writes reached the file");
    fx.mount.crash().unwrap();
    assert!(fs::read(&path).unwrap() == pattern(4, LEN), "the mapping's writes came back after the crash");
}

/// Writes `data` through a shared mapping of `file` (closed first: close(2) would flush the
/// writes to crashfs) and unmaps it, in a child process. Not in this one: unmapping writes the
/// dirty pages back while holding the process's memory map lock, and crashfs serves that write
/// from this process's threads, which may need the same lock (an allocator's mprotect did, and
/// both waited for ever).
fn write_through_mapping_in_child(file: File, data: &[u8]) {
    // SAFETY: the child makes only system calls and a copy (no allocation, no lock another
    // thread could hold at the fork) before _exit.
    let child = unsafe { libc::fork() };
    assert!(child >= 0, "fork: {}", std::io::Error::last_os_error());
    if child == 0 {
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: a fresh shared mapping of an open file, written only inside its length, then
        // unmapped; the child exits without returning into the test.
        unsafe {
            let map = libc::mmap(std::ptr::null_mut(), data.len(), prot, libc::MAP_SHARED, file.as_raw_fd(), 0);
            if map == libc::MAP_FAILED {
                libc::_exit(2);
            }
            libc::close(file.as_raw_fd());
            std::ptr::copy_nonoverlapping(data.as_ptr(), map.cast::<u8>(), data.len());
            libc::_exit(if libc::munmap(map, data.len()) == 0 { 0 } else { 3 });
        }
    }
    let mut status = 0;
    // SAFETY: waits for the child forked above.
    assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
    // Only now: a close while the child wrote would have flushed some of its pages.
    drop(file);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the child writing through a mapping failed: status {status:#x}"
    );
}
