//! The replica's error type: every variant names the remote object or the URL it is about, so
//! that an operator can find it in the bucket.

use rewind_engine::Seq;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid replica URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },

    #[error("cannot reach the object store at {url}: {reason}")]
    Store { url: String, reason: String },

    #[error("{operation} {key} failed: {reason}")]
    Request { operation: &'static str, key: String, reason: String },

    #[error("{operation} {key} timed out after {seconds} s")]
    Timeout { operation: &'static str, key: String, seconds: u64 },

    #[error("remote object {key} is missing")]
    Missing { key: String },

    #[error("remote object {key} is damaged: {reason}")]
    Corrupt { key: String, reason: String },

    #[error("no rewind replica at {0} (no manifest; has `rewind serve --replicate` shipped to it?)")]
    NoReplica(String),

    #[error("the replica at {url} belongs to store {remote}, not to this store ({local})")]
    OtherStore { url: String, remote: uuid::Uuid, local: uuid::Uuid },

    #[error("the replica at {url} has records up to seq {remote}, past this store's last record {local}: it is not this store's history (restored from an older copy?)")]
    Diverged { url: String, remote: Seq, local: Seq },

    #[error("unsupported replica format version {found} in {key} (this build reads versions up to {supported})")]
    UnsupportedVersion { key: String, found: u32, supported: u32 },

    #[error("the replica's journal has no object holding seq {seq} (the history in the bucket has a gap)")]
    Gap { seq: Seq },

    #[error("{0} was stopped before it finished")]
    Stopped(&'static str),

    #[error("{0} ended abnormally (its thread panicked)")]
    ThreadDied(&'static str),

    #[error(transparent)]
    Engine(#[from] rewind_engine::Error),

    #[error("{context}: {cause}")]
    Io { context: String, cause: std::io::Error },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches a description of the local file operation to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|cause| Error::Io { context: what(), cause })
    }
}
