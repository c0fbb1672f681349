//! Thin wrappers over the file-system calls std does not offer: vectored positional writes,
//! hole punching, sparse-aware copies, directory syncs and atomic replacement of small files;
//! and the priority and CPUs of housekeeping threads.

use std::fs::{self, File};
use std::io::{self, IoSlice};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{IoContext, Result};

/// The CPUs housekeeping threads run on, when the daemon was asked to keep them off the cores
/// that serve guest I/O; unset, they run wherever the scheduler puts them.
static HOUSEKEEPING_CPUS: OnceLock<libc::cpu_set_t> = OnceLock::new();

/// Runs every housekeeping thread started from now on (replication, spare segments, dropping
/// cached pages) on `cpus` only. Set once per process, before the store opens; the set is
/// tried on a thread of its own first, so that CPUs the process may not use are an error here
/// rather than a silent no-op later.
pub fn set_housekeeping_cpus(cpus: &[usize]) -> io::Result<()> {
    let invalid = |reason: String| io::Error::new(io::ErrorKind::InvalidInput, reason);
    if cpus.is_empty() {
        return Err(invalid("no CPU given".into()));
    }
    // SAFETY: cpu_set_t is a plain bit array, for which all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let capacity = 8 * std::mem::size_of::<libc::cpu_set_t>();
    for &cpu in cpus {
        if cpu >= capacity {
            return Err(invalid(format!("CPU {cpu} is beyond the {capacity} a CPU set holds")));
        }
        // SAFETY: `cpu` is within the set, checked above.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    std::thread::spawn(move || set_thread_affinity(&set))
        .join()
        .map_err(|_| io::Error::other("the thread trying the CPU set panicked"))??;
    HOUSEKEEPING_CPUS
        .set(set)
        .map_err(|_| io::Error::new(io::ErrorKind::AlreadyExists, "housekeeping CPUs are set already"))
}

fn set_thread_affinity(set: &libc::cpu_set_t) -> io::Result<()> {
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes the calling thread a housekeeping thread: a lower CPU priority, so that it does not
/// delay the write path or the control socket on a machine with few cores, and the CPUs of
/// [`set_housekeeping_cpus`] if set. Threads it starts inherit both. Best effort: a failure
/// only logs.
pub fn enter_housekeeping() {
    // SAFETY: gettid has no preconditions; setpriority on our own thread only ever lowers it.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10) };
    if rc != 0 {
        log::debug!("cannot lower a housekeeping thread's priority: {}", io::Error::last_os_error());
    }
    if let Some(set) = HOUSEKEEPING_CPUS.get() {
        if let Err(e) = set_thread_affinity(set) {
            log::warn!("cannot move a housekeeping thread to its CPUs: {e}");
        }
    }
}

pub fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// `pwritev` until every byte of `slices` is written at `offset`.
pub fn write_all_vectored_at(file: &File, slices: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
    const IOV_MAX: usize = 1024;
    let mut owned: Vec<IoSlice<'_>> = slices.to_vec();
    let mut remaining: &mut [IoSlice<'_>] = &mut owned;
    let mut offset = offset;
    while !remaining.is_empty() {
        let batch = remaining.len().min(IOV_MAX);
        // SAFETY: IoSlice is ABI-compatible with iovec, and every slice outlives the call.
        let written = unsafe {
            libc::pwritev(file.as_raw_fd(), remaining.as_ptr().cast(), batch as libc::c_int, offset as libc::off_t)
        };
        if written < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if written == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "pwritev wrote nothing"));
        }
        offset += written as u64;
        IoSlice::advance_slices(&mut remaining, written as usize);
    }
    Ok(())
}

/// Makes `[offset, offset+len)` read as zeroes, deallocating it where the file system can.
pub fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: plain syscall on an owned fd.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(err);
    }
    write_zeroes(file, offset, len)
}

/// Reserves blocks for `[0, len)` so that later writes into it need no block allocation.
/// Unsupported or refused (no space) reservations are not errors: writes then allocate as usual.
pub fn preallocate(file: &File, len: u64) {
    // SAFETY: plain syscall on an owned fd.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
    if rc != 0 {
        log::debug!("preallocating {len} bytes: {}", io::Error::last_os_error());
    }
}

/// Creates `path` holding `len` zero bytes that are really written, not just reserved, and
/// durable: later overwrites and their `fdatasync` then change no file-system metadata, which
/// makes each sync about a third cheaper on ext4. The zeroes go through the page cache and
/// stay there: a later write that covers part of an uncached page of written blocks would
/// have to read it from the disk first. Returns false, creating nothing, on file systems in
/// memory (tmpfs), where it would not help. `between_chunks` runs after every MiB: it may
/// pause, or stop the work with an error (the file is then removed).
pub fn create_zeroed(path: &Path, len: u64, mut between_chunks: impl FnMut() -> io::Result<()>) -> io::Result<bool> {
    use std::os::unix::fs::FileExt;
    const CHUNK: u64 = 1 << 20;
    if in_memory(parent_dir(path))? {
        return Ok(false);
    }
    let file = fs::OpenOptions::new().write(true).create_new(true).open(path)?;
    let filled = (|| {
        preallocate(&file, len);
        let zeroes = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK) as usize;
            file.write_all_at(&zeroes[..n], done)?;
            done += n as u64;
            between_chunks()?;
        }
        file.sync_all()
    })();
    if let Err(e) = filled {
        let _ = fs::remove_file(path);
        return Err(e);
    }
    Ok(true)
}

fn in_memory(dir: &Path) -> io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // ramfs's magic number, which libc does not name.
    const RAMFS_MAGIC: libc::c_long = 0x8584_58f6;
    Ok(stat.f_type == libc::TMPFS_MAGIC || stat.f_type == RAMFS_MAGIC)
}

/// Writes `[0, len)` of `file` back to the disk, waits for it, and drops those pages from the
/// page cache.
pub fn write_back_and_uncache(file: &File, len: u64) -> io::Result<()> {
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: plain syscalls on an owned fd.
    if unsafe { libc::sync_file_range(file.as_raw_fd(), 0, len as libc::off64_t, flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    drop_from_cache(file, len)
}

/// Drops the clean pages of `[0, len)` of `file` from the page cache (dirty ones stay).
pub fn drop_from_cache(file: &File, len: u64) -> io::Result<()> {
    // SAFETY: a plain syscall on an owned fd; posix_fadvise returns the error number instead of
    // setting errno.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, len as libc::off_t, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Starts reading `[from, len)` of `file` into the page cache, without waiting for it.
///
/// Journal appends rarely end on a page boundary, and the kernel must read an uncached page of
/// written blocks before it can change part of it: an append into a reused segment whose pages
/// were dropped, or into a zero-filled one evicted since, would wait for that read (measured:
/// 3–30 ms under write load, holding the writer lock). Pages read ahead of time are overwritten
/// in memory instead; pages already cached cost nothing here.
pub fn prefetch(file: &File, from: u64, len: u64) -> io::Result<()> {
    // One call reads ahead at most about twice the device's read-ahead window (8 MiB of a
    // 64 MiB range here), so the range goes in pieces.
    const PIECE: u64 = 4 << 20;
    let end = from.saturating_add(len);
    let mut at = from;
    while at < end {
        let n = (end - at).min(PIECE);
        // SAFETY: a plain syscall on an owned fd; posix_fadvise returns the error number.
        let rc = unsafe {
            libc::posix_fadvise(file.as_raw_fd(), at as libc::off_t, n as libc::off_t, libc::POSIX_FADV_WILLNEED)
        };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        at += n;
    }
    Ok(())
}

fn write_zeroes(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let zeroes = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeroes.len() as u64) as usize;
        file.write_all_at(&zeroes[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

fn seek_data_or_hole(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    // SAFETY: plain syscall on an owned fd.
    let pos = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if pos < 0 {
        let err = io::Error::last_os_error();
        return if err.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(err) };
    }
    Ok(Some(pos as u64))
}

/// The data (non-hole) ranges of `file` below `len`, as the file system reports them.
pub fn data_ranges(file: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut ranges = Vec::new();
    let mut pos = 0;
    while pos < len {
        let Some(start) = seek_data_or_hole(file, pos, libc::SEEK_DATA)? else { break };
        if start >= len {
            break;
        }
        let end = seek_data_or_hole(file, start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        ranges.push((start, end - start));
        pos = end;
    }
    Ok(ranges)
}

/// Copies `len` bytes from `src` at `src_offset` to `dst` at `dst_offset` inside the kernel.
pub fn copy_range(src: &File, src_offset: u64, dst: &File, dst_offset: u64, len: u64) -> io::Result<()> {
    let mut src_off = src_offset as libc::loff_t;
    let mut dst_off = dst_offset as libc::loff_t;
    let mut left = len;
    while left > 0 {
        let chunk = left.min(1 << 30) as usize;
        // SAFETY: both fds are open for the call's duration; offsets are passed by pointer.
        let n =
            unsafe { libc::copy_file_range(src.as_raw_fd(), &mut src_off, dst.as_raw_fd(), &mut dst_off, chunk, 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if matches!(err.raw_os_error(), Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL)) {
                return copy_range_by_reading(src, src_off as u64, dst, dst_off as u64, left);
            }
            return Err(err);
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "source ended during copy"));
        }
        left -= n as u64;
    }
    Ok(())
}

fn copy_range_by_reading(src: &File, src_offset: u64, dst: &File, dst_offset: u64, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], src_offset + done)?;
        dst.write_all_at(&buf[..n], dst_offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Copies the data ranges of `src` into `dst` (already sized), leaving holes as holes.
/// `progress` is told the offset reached at least every 64 MiB copied; an error from it stops
/// the copy (that is how a long copy is cancelled).
pub fn copy_sparse(
    src: &File,
    dst: &File,
    len: u64,
    mut progress: impl FnMut(u64) -> io::Result<()>,
) -> io::Result<u64> {
    const PIECE: u64 = 64 << 20;
    let mut copied = 0;
    for (start, range_len) in data_ranges(src, len)? {
        let end = start + range_len;
        let mut at = start;
        while at < end {
            let piece = (end - at).min(PIECE);
            copy_range(src, at, dst, at, piece)?;
            copied += piece;
            at += piece;
            progress(at)?;
        }
    }
    Ok(copied)
}

/// The directory holding `path` ("." for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// Reads into `buf` from `offset` until it is full or the file ends; returns the bytes read.
pub fn read_up_to_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    sync_dir_entries(dir).context(|| format!("syncing directory {}", dir.display()))
}

/// Makes a directory's entries (new files, renames, removals) durable.
pub fn sync_dir_entries(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replaces `path` with `contents` so that a crash leaves either the old or the new file.
pub fn write_atomically(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let write = || -> io::Result<()> {
        let file = File::create(&tmp)?;
        use std::io::Write;
        (&file).write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().context(|| format!("writing {}", path.display()))?;
    sync_dir(parent_dir(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn sparse_copy_keeps_holes_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let src_path = dir.path().join("src");
        let src = File::create(&src_path).unwrap();
        let len = 8 << 20;
        src.set_len(len).unwrap();
        src.write_all_at(&[0xab; 5000], 1 << 20).unwrap();
        src.write_all_at(&[0xcd; 100], len - 100).unwrap();
        let src = File::open(&src_path).unwrap();
        let dst_path = dir.path().join("dst");
        let dst = File::create(&dst_path).unwrap();
        dst.set_len(len).unwrap();
        copy_sparse(&src, &dst, len, |_| Ok(())).unwrap();
        assert_eq!(fs::read(&src_path).unwrap(), fs::read(&dst_path).unwrap());
        let copied: u64 = data_ranges(&dst, len).unwrap().iter().map(|r| r.1).sum();
        assert!(copied < len / 2, "destination is not sparse: {copied} bytes of data");
    }

    #[test]
    fn zero_range_reads_back_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        file.write_all_at(&[0xff; 3 * 4096], 0).unwrap();
        zero_range(&file, 1000, 5000).unwrap();
        let data = fs::read(&path).unwrap();
        assert!(data[..1000].iter().all(|&b| b == 0xff));
        assert!(data[1000..6000].iter().all(|&b| b == 0));
        assert!(data[6000..].iter().all(|&b| b == 0xff));
    }

    #[test]
    fn vectored_write_lands_every_piece_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = File::create(&path).unwrap();
        let pieces: Vec<Vec<u8>> = (0..2000u32).map(|i| vec![(i % 256) as u8; (i % 7 + 1) as usize]).collect();
        let slices: Vec<IoSlice<'_>> = pieces.iter().map(|p| IoSlice::new(p)).collect();
        write_all_vectored_at(&file, &slices, 10).unwrap();
        let expected: Vec<u8> = std::iter::repeat_n(0, 10).chain(pieces.concat()).collect();
        assert_eq!(fs::read(&path).unwrap(), expected);
    }
}
