//! What the device has done, for status reports (the control socket's query-status).

use std::sync::atomic::AtomicU64;

use serde::Serialize;

/// What the device has done, for status reports.
#[derive(Debug, Default, Serialize)]
pub struct Counters {
    pub requests: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub flushes: AtomicU64,
    pub errors: AtomicU64,
    /// Queues not served now because their ring state was impossible.
    pub broken_queues: AtomicU64,
    /// Requests a previous daemon left in flight, run again after a restart (docs/virtio.md,
    /// "Restarts").
    pub resubmitted: AtomicU64,
}
