//! The FUSE side: each request is passed through to the backing directory, after `State`
//! has recorded what a crash would need to undo it.

use std::ffi::OsStr;
use std::fs::{self, File, FileTimes, Metadata, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use crate::faults::{Faults, Op};
use crate::state::{Handle, State};

/// No attribute or name is cached by the kernel: after a crash, what it would have cached
/// may be gone. File pages are cached (reads are much faster), and dropped after a crash.
const TTL: Duration = Duration::ZERO;

pub(crate) struct CrashFs {
    state: Arc<Mutex<State>>,
    faults: Arc<Mutex<Faults>>,
}

impl CrashFs {
    pub(crate) fn new(state: Arc<Mutex<State>>, faults: Arc<Mutex<Faults>>) -> CrashFs {
        CrashFs { state, faults }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        crate::lock(&self.state)
    }

    /// Counts an operation of kind `op`; an error if an injected fault fails it. Called before
    /// anything is changed, so that a failed operation changes nothing.
    fn fault(&self, op: Op) -> io::Result<()> {
        crate::lock(&self.faults).hit(op)
    }
}

fn errno(e: io::Error) -> Errno {
    Errno::from(e)
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    let since = |s: i64| Duration::new(s.unsigned_abs(), nsecs.clamp(0, 999_999_999) as u32);
    if secs >= 0 {
        UNIX_EPOCH + since(secs)
    } else {
        UNIX_EPOCH - since(secs)
    }
}

fn kind(file_type: fs::FileType) -> FileType {
    FileType::from_std(file_type).unwrap_or(FileType::RegularFile)
}

fn attr(ino: u64, md: &Metadata) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: md.len(),
        blocks: md.blocks(),
        atime: time(md.atime(), md.atime_nsec()),
        mtime: time(md.mtime(), md.mtime_nsec()),
        ctime: time(md.ctime(), md.ctime_nsec()),
        crtime: UNIX_EPOCH,
        kind: kind(md.file_type()),
        perm: (md.mode() & 0o7777) as u16,
        nlink: md.nlink() as u32,
        uid: md.uid(),
        gid: md.gid(),
        rdev: md.rdev() as u32,
        blksize: md.blksize() as u32,
        flags: 0,
    }
}

fn open_rw(path: &std::path::Path) -> io::Result<File> {
    // Always read-write, whatever the caller asked: saving the durable bytes before a write
    // needs to read them, and the kernel already checked the caller's access.
    OpenOptions::new().read(true).write(true).open(path)
}

fn off_t(value: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(value).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))
}

impl CrashFs {
    fn entry(&self, parent: u64, name: &OsStr) -> io::Result<FileAttr> {
        let (ino, md) = self.lock().lookup(parent, name)?;
        Ok(attr(ino, &md))
    }

    fn setattr_inner(
        &self,
        ino: u64,
        mode: Option<u32>,
        owner: (Option<u32>, Option<u32>),
        size: Option<u64>,
        times: (Option<TimeOrNow>, Option<TimeOrNow>),
        fh: Option<FileHandle>,
    ) -> io::Result<FileAttr> {
        if size.is_some() {
            self.fault(Op::Truncate)?;
        }
        let mut state = self.lock();
        let path = state.path(ino)?;
        if let Some(size) = size {
            let file = match fh {
                Some(fh) => state.file(fh.0)?,
                None => Arc::new(open_rw(&path)?),
            };
            state.track(ino, &file, size, u64::MAX)?;
            file.set_len(size)?;
        }
        if let Some(mode) = mode {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode & 0o7777))?;
        }
        if owner.0.is_some() || owner.1.is_some() {
            std::os::unix::fs::lchown(&path, owner.0, owner.1)?;
        }
        if times.0.is_some() || times.1.is_some() {
            let when = |t: TimeOrNow| match t {
                TimeOrNow::SpecificTime(t) => t,
                TimeOrNow::Now => SystemTime::now(),
            };
            let mut new = FileTimes::new();
            if let Some(t) = times.0 {
                new = new.set_accessed(when(t));
            }
            if let Some(t) = times.1 {
                new = new.set_modified(when(t));
            }
            File::open(&path)?.set_times(new)?;
        }
        Ok(attr(ino, &fs::symlink_metadata(&path)?))
    }

    fn create_inner(&self, parent: u64, name: &OsStr, mode: u32, flags: i32) -> io::Result<(FileAttr, u64)> {
        let mut state = self.lock();
        let path = state.child_path(parent, name)?;
        let mode = mode & 0o7777;
        let created = OpenOptions::new().read(true).write(true).create_new(true).mode(mode).open(&path);
        let (ino, file) = match created {
            Ok(file) => {
                // The daemon's own umask applied too: the caller's mode is what counts.
                file.set_permissions(fs::Permissions::from_mode(mode))?;
                (state.created(parent, name), file)
            }
            // Created by someone else since the kernel looked: open(2) opens it then.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && flags & libc::O_EXCL == 0 => {
                let (ino, _) = state.lookup(parent, name)?;
                let file = open_rw(&path)?;
                if flags & libc::O_TRUNC != 0 {
                    self.fault(Op::Truncate)?;
                    state.track(ino, &file, 0, u64::MAX)?;
                    file.set_len(0)?;
                }
                (ino, file)
            }
            Err(e) => return Err(e),
        };
        let attr = attr(ino, &file.metadata()?);
        let fh = state.open_handle(Handle::File(Arc::new(file)));
        Ok((attr, fh))
    }

    fn read_inner(&self, fh: u64, offset: u64, size: u32) -> io::Result<Vec<u8>> {
        let file = self.lock().file(fh)?;
        let mut buf = vec![0; size as usize];
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf.truncate(done);
        Ok(buf)
    }

    fn write_inner(&self, ino: u64, fh: u64, offset: u64, data: &[u8]) -> io::Result<u32> {
        self.fault(Op::Write)?;
        let len = u32::try_from(data.len()).map_err(|_| einval())?;
        // The lock covers the write too: a crash must never see a change without its undo.
        let mut state = self.lock();
        let file = state.file(fh)?;
        state.track(ino, &file, offset, offset + u64::from(len))?;
        file.write_all_at(data, offset)?;
        Ok(len)
    }

    fn fallocate_inner(&self, ino: u64, fh: u64, offset: u64, length: u64, mode: i32) -> io::Result<()> {
        self.fault(Op::Fallocate)?;
        let end = offset.checked_add(length).ok_or_else(einval)?;
        let changes_bytes = match mode & !libc::FALLOC_FL_KEEP_SIZE {
            0 => false,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE => true,
            _ => return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
        };
        let mut state = self.lock();
        let file = state.file(fh)?;
        if changes_bytes {
            state.track(ino, &file, offset, end)?;
        } else {
            // Only the size may change; `track` still records the durable one.
            state.track(ino, &file, 0, 0)?;
        }
        // SAFETY: plain syscall on an fd that `file` keeps open.
        if unsafe { libc::fallocate(file.as_raw_fd(), mode, off_t(offset)?, off_t(length)?) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn copy_inner(
        &self,
        fh_in: u64,
        offset_in: u64,
        ino_out: u64,
        fh_out: u64,
        offset_out: u64,
        len: u64,
    ) -> io::Result<u32> {
        // It writes, so it counts as a write: a workload using it would otherwise escape.
        self.fault(Op::Write)?;
        let len = len.min(1 << 30);
        let mut state = self.lock();
        let (src, dst) = (state.file(fh_in)?, state.file(fh_out)?);
        state.track(ino_out, &dst, offset_out, offset_out + len)?;
        let (mut off_in, mut off_out) = (off_t(offset_in)?, off_t(offset_out)?);
        // SAFETY: both fds stay open for the call; the offsets are ours, passed by pointer.
        let n = unsafe {
            libc::copy_file_range(src.as_raw_fd(), &mut off_in, dst.as_raw_fd(), &mut off_out, len as usize, 0)
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as u32)
    }

    fn statfs_inner(&self) -> io::Result<libc::statvfs> {
        let path = self.lock().path(crate::state::ROOT)?;
        let path = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))?;
        // SAFETY: statvfs only writes into the zeroed struct we own.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `path` is NUL-terminated and `st` is a valid out pointer, both live for the call.
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st)
    }
}

impl Filesystem for CrashFs {
    fn destroy(&mut self) {
        // Unmounted: what the hidden directory kept can no longer be needed.
        if let Err(e) = self.lock().remove_meta() {
            log::warn!("removing crashfs's hidden directory: {e}");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.entry(parent.0, name) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let md = (|| {
            let state = self.lock();
            match fh.map(|fh| state.file(fh.0)) {
                Some(Ok(file)) => file.metadata(),
                _ => fs::symlink_metadata(state.path(ino.0)?),
            }
        })();
        match md {
            Ok(md) => reply.attr(&TTL, &attr(ino.0, &md)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.setattr_inner(ino.0, mode, (uid, gid), size, (atime, mtime), fh) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let made = (|| {
            let mut state = self.lock();
            let path = state.child_path(parent.0, name)?;
            fs::DirBuilder::new().mode(mode & !umask).create(&path)?;
            // The daemon's own umask applied too: the caller's mode is what counts.
            fs::set_permissions(&path, fs::Permissions::from_mode(mode & !umask & 0o7777))?;
            let ino = state.created(parent.0, name);
            Ok::<_, io::Error>(attr(ino, &fs::symlink_metadata(&path)?))
        })();
        match made {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.lock().remove(parent.0, name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.lock().remove(parent.0, name, true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        new_parent: INodeNo,
        new_name: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if let Err(e) = self.fault(Op::Rename) {
            return reply.error(errno(e));
        }
        if !(flags - RenameFlags::RENAME_NOREPLACE).is_empty() {
            return reply.error(Errno::EINVAL);
        }
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        match self.lock().rename(parent.0, name, new_parent.0, new_name, no_replace) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // O_TRUNC needs nothing here: without FUSE_ATOMIC_O_TRUNC the kernel sends a setattr.
        let opened = (|| {
            let mut state = self.lock();
            let file = open_rw(&state.path(ino.0)?)?;
            Ok::<_, io::Error>(state.open_handle(Handle::File(Arc::new(file))))
        })();
        match opened {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.create_inner(parent.0, name, mode & !umask, flags) {
            Ok((attr, fh)) => reply.created(&TTL, &attr, Generation(0), FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.read_inner(fh.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.write_inner(ino.0, fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // close(2) makes nothing durable.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.lock().close_handle(fh.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        // A failed fsync leaves what was not durable as it was.
        if let Err(e) = self.fault(Op::sync(datasync)) {
            return reply.error(errno(e));
        }
        // fdatasync also makes the size durable (it is needed to read the data back); neither
        // makes the file's name durable. The backing file is not synced: crashfs is the model.
        self.lock().fsync_file(ino.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // The listing is taken once, so that offsets stay valid while the directory changes.
        let opened = (|| {
            let mut state = self.lock();
            let entries = state.entries(ino.0)?;
            Ok::<_, io::Error>(state.open_handle(Handle::Dir(entries)))
        })();
        match opened {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let state = self.lock();
        let entries = match state.handle(fh.0) {
            Ok(Handle::Dir(entries)) => entries,
            Ok(Handle::File(_)) => return reply.error(Errno::ENOTDIR),
            Err(e) => return reply.error(errno(e)),
        };
        for (i, entry) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(entry.ino), i as u64 + 1, kind(entry.kind), &entry.name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.lock().close_handle(fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        if let Err(e) = self.fault(Op::sync(datasync)) {
            return reply.error(errno(e));
        }
        match self.lock().fsync_dir(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: fuser::ReplyXattr) {
        // Extended attributes are not passed through; ENOSYS makes the kernel stop asking.
        reply.error(Errno::ENOSYS);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.statfs_inner() {
            Ok(st) => reply.statfs(
                st.f_blocks,
                st.f_bfree,
                st.f_bavail,
                st.f_files,
                st.f_ffree,
                st.f_bsize as u32,
                st.f_namemax as u32,
                st.f_frsize as u32,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.fallocate_inner(ino.0, fh.0, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn lseek(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        // Only SEEK_DATA and SEEK_HOLE come here; the kernel moves the file position itself.
        let sought = self.lock().file(fh.0).and_then(|file| {
            // SAFETY: plain syscall on an fd that `file` keeps open.
            match unsafe { libc::lseek(file.as_raw_fd(), offset, whence) } {
                pos if pos < 0 => Err(io::Error::last_os_error()),
                pos => Ok(pos),
            }
        });
        match sought {
            Ok(pos) => reply.offset(pos),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        match self.copy_inner(fh_in.0, offset_in, ino_out.0, fh_out.0, offset_out, len) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
        }
    }
}
