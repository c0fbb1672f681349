//! The library's error type. Every variant says what went wrong and where, so the CLI and the
//! daemon can report it without guessing.

use std::io;
use std::path::PathBuf;

use crate::Seq;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The cause is part of the message (not a `source`), so that it is printed once whether
    /// the error is shown alone or as a chain.
    #[error("{context}: {cause}")]
    Io { context: String, cause: io::Error },

    #[error("store {path} is in use by another process ({owner})")]
    Locked { path: PathBuf, owner: String },

    #[error("no rewind store at {0} (run `rewind init` first)")]
    NoStore(PathBuf),

    #[error("a rewind store already exists at {0}")]
    StoreExists(PathBuf),

    #[error("store metadata {path} is invalid: {reason}")]
    BadMetadata { path: PathBuf, reason: String },

    #[error("unsupported on-disk format version {found} in {path} (this build reads version {supported})")]
    UnsupportedVersion { path: PathBuf, found: u32, supported: u32 },

    #[error("journal is damaged in segment {segment} at byte offset {offset}: {reason}")]
    JournalCorrupt { segment: PathBuf, offset: u64, reason: String },

    #[error("snapshot file {path} is damaged: {reason}")]
    SnapshotCorrupt { path: PathBuf, reason: String },

    #[error("range {offset}+{len} is outside the volume ({volume_size} bytes)")]
    OutOfRange { offset: u64, len: u64, volume_size: u64 },

    #[error("invalid marker name: {0}")]
    InvalidMarkerName(String),

    #[error("a marker named {0:?} already exists")]
    DuplicateMarker(String),

    #[error("no marker named {0:?}")]
    UnknownMarker(String),

    #[error("the store can no longer make writes durable ({0}); restart the daemon (reopen the store) to go on from what the disk holds")]
    NotDurable(String),

    #[error("cancelled: the daemon is stopping")]
    Cancelled,

    #[error("guest marker refused: {0}")]
    GuestMarkerLimit(String),

    #[error("marker note is {len} bytes; at most {max} are allowed")]
    NoteTooLong { len: usize, max: usize },

    #[error("point {requested} is not recoverable: the recoverable range is {oldest}..={head}")]
    Unrecoverable { requested: String, oldest: Seq, head: Seq },

    #[error("no record at or before {0}: the journal starts later")]
    TimeBeforeJournal(String),

    #[error("output {0} already exists; remove it or choose another path")]
    OutputExists(PathBuf),

    #[error("the volume holds writes the journal could not apply (first at seq {0}); retry or reopen the store")]
    VolumeBehind(Seq),

    #[error("verification failed: {0}")]
    VerifyFailed(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches a human description of the operation to an `io::Error`.
pub trait IoContext<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|cause| Error::Io { context: what(), cause })
    }
}
