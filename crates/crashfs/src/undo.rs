//! What a file held at its last sync, kept only for the pages changed since then.
//!
//! Before a range of a file changes for the first time after its last fsync, the durable
//! bytes of the pages it touches are copied into an anonymous undo file at the same offsets,
//! leaving holes as holes. A crash copies them back and restores the durable size; an fsync
//! just drops the undo file. Nothing is ever copied for bytes beyond the durable size: a crash
//! cuts them off.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// The unit of saving, and of survival in the `torn` model.
pub(crate) const PAGE: u64 = 4096;

/// A set of page numbers, kept as merged half-open ranges (start -> end).
#[derive(Default)]
struct PageSet(BTreeMap<u64, u64>);

impl PageSet {
    /// The parts of `[start, end)` not in the set, in order.
    fn gaps(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut gaps = Vec::new();
        if start >= end {
            return gaps;
        }
        let before = self.0.range(..=start).next_back();
        let mut pos = start;
        for (&s, &e) in before.into_iter().chain(self.0.range(start + 1..end)) {
            if s > pos {
                gaps.push((pos, s));
            }
            pos = pos.max(e);
            if pos >= end {
                return gaps;
            }
        }
        gaps.push((pos, end));
        gaps
    }

    fn insert(&mut self, start: u64, end: u64) {
        let (mut start, mut end) = (start, end);
        if let Some((&s, &e)) = self.0.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        let covered: Vec<u64> = self.0.range(start..=end).map(|(&s, _)| s).collect();
        for s in covered {
            if let Some(e) = self.0.remove(&s) {
                end = end.max(e);
            }
        }
        self.0.insert(start, end);
    }

    fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.0.iter().map(|(&s, &e)| (s, e))
    }
}

/// What a crash changed in one file.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reverted {
    pub bytes: u64,
    pub size_changed: bool,
    pub pages_kept: u64,
}

/// The unsynced state of one regular file.
pub(crate) struct Dirty {
    durable_size: u64,
    saved: PageSet,
    undo: Option<File>,
}

impl Dirty {
    pub(crate) fn new(durable_size: u64) -> Dirty {
        Dirty { durable_size, saved: PageSet::default(), undo: None }
    }

    /// Saves the durable bytes of every page of `[start, end)` not saved yet; called before
    /// the file changes there. `undo_name` names the undo file for the moment it is created.
    pub(crate) fn save(&mut self, file: &File, start: u64, end: u64, undo_name: &Path) -> io::Result<()> {
        let end = end.min(self.durable_size);
        if start >= end {
            return Ok(());
        }
        let gaps = self.saved.gaps(start / PAGE, end.div_ceil(PAGE));
        if gaps.is_empty() {
            return Ok(());
        }
        // Pages beyond the current size were cut by a truncation and so were saved before it.
        let limit = file.metadata()?.len().min(self.durable_size);
        let undo = match &mut self.undo {
            Some(undo) => undo,
            undo => undo.insert(anonymous_file(undo_name)?),
        };
        for (first, last) in gaps {
            copy_sparse(file, undo, first * PAGE, (last * PAGE).min(limit), false)?;
            self.saved.insert(first, last);
        }
        Ok(())
    }

    /// Bytes a crash would copy back.
    pub(crate) fn saved_bytes(&self) -> u64 {
        self.saved.ranges().map(|(s, e)| (e * PAGE).min(self.durable_size).saturating_sub(s * PAGE)).sum()
    }

    pub(crate) fn durable_size(&self) -> u64 {
        self.durable_size
    }

    /// Gives `file` back its durable size and the durable content of every saved page for which
    /// `keep` says no (a page it keeps shows what was written last, or zeroes past a truncation).
    pub(crate) fn revert(&self, file: &File, mut keep: impl FnMut(u64) -> bool) -> io::Result<Reverted> {
        let mut done = Reverted { size_changed: file.metadata()?.len() != self.durable_size, ..Reverted::default() };
        file.set_len(self.durable_size)?;
        let Some(undo) = &self.undo else { return Ok(done) };
        let mut restore = |first: u64, last: u64| {
            let (from, to) = (first * PAGE, (last * PAGE).min(self.durable_size));
            done.bytes += to.saturating_sub(from);
            copy_sparse(undo, file, from, to, true)
        };
        for (first, last) in self.saved.ranges() {
            let mut run = None;
            for page in first..last {
                if keep(page) {
                    done.pages_kept += 1;
                    if let Some(start) = run.take() {
                        restore(start, page)?;
                    }
                } else if run.is_none() {
                    run = Some(page);
                }
            }
            if let Some(start) = run {
                restore(start, last)?;
            }
        }
        Ok(done)
    }
}

/// A new file with no name, so that nothing is left behind whatever happens to the process.
fn anonymous_file(name: &Path) -> io::Result<File> {
    let file = fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(name)?;
    fs::remove_file(name)?;
    Ok(file)
}

/// Copies `[from, to)` from `src` to the same offsets in `dst`, data ranges only. Holes of
/// `src` become holes in `dst` when `zero_holes`, and are left alone otherwise.
fn copy_sparse(src: &File, dst: &File, from: u64, to: u64, zero_holes: bool) -> io::Result<()> {
    let mut pos = from;
    while pos < to {
        let data = seek(src, pos, libc::SEEK_DATA)?.unwrap_or(to).min(to);
        if zero_holes && data > pos {
            punch(dst, pos, data - pos)?;
        }
        if data >= to {
            break;
        }
        let hole = seek(src, data, libc::SEEK_HOLE)?.unwrap_or(to).min(to);
        copy_range(src, dst, data, hole)?;
        pos = hole;
    }
    Ok(())
}

/// `lseek` for SEEK_DATA / SEEK_HOLE; None where there is no more data (ENXIO).
fn seek(file: &File, offset: u64, whence: i32) -> io::Result<Option<u64>> {
    let offset = libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: plain syscall on an fd that `file` keeps open.
    let pos = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if pos < 0 {
        let err = io::Error::last_os_error();
        return if err.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(err) };
    }
    Ok(Some(pos as u64))
}

fn copy_range(src: &File, dst: &File, from: u64, to: u64) -> io::Result<()> {
    let mut src_off = libc::loff_t::try_from(from).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    let mut dst_off = src_off;
    let mut left = to - from;
    while left > 0 {
        let chunk = left.min(1 << 30) as usize;
        // SAFETY: both fds stay open for the call; the offsets are ours, passed by pointer.
        let n =
            unsafe { libc::copy_file_range(src.as_raw_fd(), &mut src_off, dst.as_raw_fd(), &mut dst_off, chunk, 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file ended during copy"));
        }
        left -= n as u64;
    }
    Ok(())
}

/// Makes `[offset, offset+len)` of `file` a hole without changing its size.
fn punch(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EFBIG));
    };
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: plain syscall on an fd that `file` keeps open.
    if unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_set_gaps_and_merges() {
        let mut set = PageSet::default();
        assert_eq!(set.gaps(0, 10), vec![(0, 10)]);
        set.insert(2, 4);
        set.insert(6, 8);
        assert_eq!(set.gaps(0, 10), vec![(0, 2), (4, 6), (8, 10)]);
        assert_eq!(set.gaps(3, 7), vec![(4, 6)]);
        assert_eq!(set.gaps(2, 4), vec![]);
        set.insert(4, 6);
        assert_eq!(set.ranges().collect::<Vec<_>>(), vec![(2, 8)]);
        set.insert(0, 1);
        set.insert(1, 2);
        assert_eq!(set.ranges().collect::<Vec<_>>(), vec![(0, 8)]);
        set.insert(20, 30);
        set.insert(10, 25);
        assert_eq!(set.ranges().collect::<Vec<_>>(), vec![(0, 8), (10, 30)]);
        assert_eq!(set.gaps(5, 12), vec![(8, 10)]);
        assert_eq!(set.gaps(5, 5), vec![]);
    }
}
