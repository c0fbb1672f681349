//! crashfs: a FUSE pass-through file system that remembers what was written since the last
//! fsync and, on command, drops what a power loss would have lost. It can also fail the n-th
//! write, fsync, fdatasync, fallocate, rename or truncation with a chosen errno
//! ([`Mount::inject`]). See README.md for the models, the faults and their exact rules.
//!
//! ```no_run
//! use crashfs::{Model, Mount};
//! let mount = Mount::start("/tmp/backing", "/tmp/mnt", Model::DataAndMetadata)?;
//! // ... run a workload on /tmp/mnt, kill it ...
//! let report = mount.crash()?;
//! println!("{report}");
//! # Ok::<(), crashfs::Error>(())
//! ```

mod control;
mod faults;
mod fs;
mod state;
mod undo;

use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use fuser::{BackgroundSession, Config, INodeNo, MountOption, Notifier};

pub use control::request;
use faults::Faults;
pub use faults::{Fault, Op, OpCounts, Persist};
use state::State;

/// What a crash keeps of the changes not yet made durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Model {
    /// LazyFS: unsynced bytes and size changes are lost, directory operations are kept.
    Data,
    /// Unsynced bytes, size changes and directory operations are all lost.
    #[default]
    DataAndMetadata,
    /// Like `Data`, but each changed 4 KiB page inside the durable size independently keeps
    /// its new content or goes back to its durable one; `seed` makes the choice reproducible.
    Torn { seed: u64 },
}

impl fmt::Display for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Model::Data => f.write_str("data"),
            Model::DataAndMetadata => f.write_str("data-and-metadata"),
            Model::Torn { seed } => write!(f, "torn:{seed}"),
        }
    }
}

impl FromStr for Model {
    type Err = Error;

    /// `data`, `data-and-metadata`, `torn` (seed 0) or `torn:SEED`.
    fn from_str(s: &str) -> Result<Model, Error> {
        match s {
            "data" => Ok(Model::Data),
            "data-and-metadata" => Ok(Model::DataAndMetadata),
            "torn" => Ok(Model::Torn { seed: 0 }),
            _ => s
                .strip_prefix("torn:")
                .and_then(|seed| seed.parse().ok())
                .map(|seed| Model::Torn { seed })
                .ok_or_else(|| Error::UnknownModel(s.to_string())),
        }
    }
}

/// What one crash dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CrashReport {
    pub model: Model,
    /// Names created, renamed or removed since their directory's last fsync and put back.
    pub entries_reverted: u64,
    /// Files whose unsynced bytes or size were dropped.
    pub files_reverted: u64,
    /// Bytes copied back from what the files held at their last fsync.
    pub bytes_restored: u64,
    /// Files whose size went back to its durable value.
    pub sizes_reverted: u64,
    /// `torn` only: changed pages that kept their new content.
    pub pages_kept: u64,
}

impl fmt::Display for CrashReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "model={} entries-reverted={} files-reverted={} bytes-restored={} sizes-reverted={} pages-kept={}",
            self.model,
            self.entries_reverted,
            self.files_reverted,
            self.bytes_restored,
            self.sizes_reverted,
            self.pages_kept
        )
    }
}

/// What a crash would drop now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Files written, truncated or extended since their last fsync.
    pub unsynced_files: usize,
    /// Bytes those files would lose: changed bytes inside the durable size, growth beyond it.
    pub unsynced_bytes: u64,
    /// Names created, renamed or removed since their directory's last fsync.
    pub pending_entries: usize,
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unsynced-files={} unsynced-bytes={} pending-entries={}",
            self.unsynced_files, self.unsynced_bytes, self.pending_entries
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("/dev/fuse is missing: FUSE is not available here")]
    NoFuse,
    #[error("{what} {}: {source}", path.display())]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error("the mount point {} is inside the backing directory {}", mountpoint.display(), backing.display())]
    Nested { mountpoint: PathBuf, backing: PathBuf },
    #[error("unknown crash model {0:?} (data, data-and-metadata, torn or torn:SEED)")]
    UnknownModel(String),
    #[error("crashing: {0} (the mount's state is undefined now)")]
    Crash(io::Error),
    #[error("telling the kernel to drop its cache: {0}")]
    Invalidate(io::Error),
    #[error("reading or updating crashfs's record: {0}")]
    State(io::Error),
    #[error("unknown operation {0:?} (write, fsync, fdatasync, fallocate, rename or truncate)")]
    UnknownOp(String),
    #[error("invalid fault: {0}")]
    BadFault(String),
    #[error("invalid operation counts {0:?}")]
    BadCounts(String),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { what, path, source }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in one request must not take every later request down with it.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the control socket and the library API act on.
struct Control {
    state: Arc<Mutex<State>>,
    faults: Arc<Mutex<Faults>>,
    notifier: Notifier,
    model: Model,
}

impl Control {
    fn crash(&self, model: Model) -> Result<CrashReport, Error> {
        let crash = lock(&self.state).crash(model).map_err(Error::Crash)?;
        // Outside the lock: the kernel may wait on requests that need it before it answers.
        for ino in crash.inodes {
            self.notifier.inval_inode(INodeNo(ino), 0, 0).map_err(Error::Invalidate)?;
        }
        for (parent, name) in crash.entries {
            self.notifier.inval_entry(INodeNo(parent), &name).map_err(Error::Invalidate)?;
        }
        Ok(crash.report)
    }

    fn stats(&self) -> Result<Stats, Error> {
        lock(&self.state).stats().map_err(Error::State)
    }

    fn sync_all(&self) -> Result<(), Error> {
        lock(&self.state).sync_all().map_err(Error::State)
    }

    fn inject(&self, fault: Fault) -> Result<(), Error> {
        lock(&self.faults).inject(fault)
    }

    fn clear_faults(&self) {
        lock(&self.faults).clear();
    }

    fn op_counts(&self) -> OpCounts {
        lock(&self.faults).counts()
    }
}

/// A mounted crashfs. Dropping it unmounts; files still open on it then fail with ENOTCONN.
pub struct Mount {
    control: Arc<Control>,
    session: Option<BackgroundSession>,
    listener: Option<control::Listener>,
    mountpoint: PathBuf,
}

impl Mount {
    /// Mounts `backing` on `mountpoint`, taking what `backing` holds now as durable. `model`
    /// is what `crash` applies. A dead crashfs mount left on `mountpoint` is detached first.
    pub fn start(backing: impl AsRef<Path>, mountpoint: impl AsRef<Path>, model: Model) -> Result<Mount, Error> {
        if !Path::new("/dev/fuse").exists() {
            return Err(Error::NoFuse);
        }
        let mountpoint = mountpoint.as_ref();
        if let Err(e) = std::fs::metadata(mountpoint) {
            if e.raw_os_error() != Some(libc::ENOTCONN) {
                return Err(io_err("mount point", mountpoint)(e));
            }
            umount2(mountpoint, libc::MNT_DETACH).map_err(io_err("detaching the dead mount on", mountpoint))?;
        }
        let backing = backing.as_ref().canonicalize().map_err(io_err("backing directory", backing.as_ref()))?;
        let mountpoint = mountpoint.canonicalize().map_err(io_err("mount point", mountpoint))?;
        if mountpoint.starts_with(&backing) {
            // Our own requests would come back to us, with the state locked.
            return Err(Error::Nested { mountpoint, backing });
        }
        let state = Arc::new(Mutex::new(State::new(backing.clone()).map_err(io_err("preparing", &backing))?));
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName(format!("crashfs:{}", backing.display())),
            MountOption::Subtype("crashfs".into()),
            MountOption::DefaultPermissions,
        ];
        config.n_threads = Some(4);
        config.clone_fd = true;
        let faults = Arc::new(Mutex::new(Faults::default()));
        let session = fuser::Session::new(fs::CrashFs::new(state.clone(), faults.clone()), &mountpoint, &config)
            .map_err(io_err("mounting on", &mountpoint))?;
        let notifier = session.notifier();
        let session = session.spawn().map_err(io_err("serving", &mountpoint))?;
        Ok(Mount {
            control: Arc::new(Control { state, faults, notifier, model }),
            session: Some(session),
            listener: None,
            mountpoint,
        })
    }

    /// Serves the line protocol (see README.md) on a Unix socket at `path`.
    pub fn listen(&mut self, path: impl AsRef<Path>) -> Result<(), Error> {
        let path = path.as_ref();
        self.listener = Some(control::listen(path, self.control.clone()).map_err(io_err("listening on", path))?);
        Ok(())
    }

    /// Drops everything not durable under the mount's model.
    pub fn crash(&self) -> Result<CrashReport, Error> {
        self.control.crash(self.control.model)
    }

    /// Drops everything not durable under `model`.
    pub fn crash_with(&self, model: Model) -> Result<CrashReport, Error> {
        self.control.crash(model)
    }

    pub fn stats(&self) -> Result<Stats, Error> {
        self.control.stats()
    }

    /// Makes everything durable, as if every file and directory had been synced.
    pub fn sync_all(&self) -> Result<(), Error> {
        self.control.sync_all()
    }

    /// Arms `fault`: the `nth` operation of its kind from now on (1 = the next one) fails with
    /// `errno` without being carried out; with `Persist::Forever`, every one after it fails
    /// too, until `clear_faults`. Replaces any fault armed before. Fails for `nth` 0, an errno
    /// outside 1..512, and ENOSYS (the kernel would stop sending the operation for good).
    pub fn inject(&self, fault: Fault) -> Result<(), Error> {
        self.control.inject(fault)
    }

    /// Disarms the fault, if any: every operation is carried out again.
    pub fn clear_faults(&self) -> Result<(), Error> {
        self.control.clear_faults();
        Ok(())
    }

    /// The operations counted since the mount, whether they were carried out or failed.
    pub fn op_counts(&self) -> Result<OpCounts, Error> {
        Ok(self.control.op_counts())
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// False once the file system is gone, e.g. unmounted from outside.
    pub fn is_mounted(&self) -> bool {
        self.session.as_ref().is_some_and(|session| !session.guard.is_finished())
    }

    pub fn unmount(mut self) -> Result<(), Error> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), Error> {
        if let Some(listener) = self.listener.take() {
            listener.stop();
        }
        let Some(session) = self.session.take() else { return Ok(()) };
        if session.umount_and_join().is_ok() {
            return Ok(());
        }
        // Busy: files are still open on it. A forced unmount makes FUSE abort the connection,
        // so that those files fail (ENOTCONN) instead of waiting forever for a server that is
        // going away; that includes this very process, whose exit would otherwise hang closing
        // them. It stays busy, so it is then detached.
        if let Err(e) = umount2(&self.mountpoint, libc::MNT_FORCE) {
            log::debug!("forced unmount of {}: {e}", self.mountpoint.display());
        }
        match umount2(&self.mountpoint, libc::MNT_DETACH) {
            Err(e) if e.raw_os_error() != Some(libc::EINVAL) => Err(io_err("unmounting", &self.mountpoint)(e)),
            _ => Ok(()),
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            log::error!("{e}");
        }
    }
}

fn umount2(mountpoint: &Path, flags: i32) -> io::Result<()> {
    let path = CString::new(mountpoint.as_os_str().as_bytes())?;
    // SAFETY: `path` is NUL-terminated and outlives the call.
    if unsafe { libc::umount2(path.as_ptr(), flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
