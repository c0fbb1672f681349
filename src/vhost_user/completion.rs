//! How requests end: the status byte, the used ring and the driver's notification, and the
//! one place where a failure becomes a virtio status ([`ExecError::status`]) and is logged
//! ([`Completion::failed`]).

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vhost_user_backend::{VringRwLock, VringT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::counters::Counters;
use super::inflight::QueueTracker;
use crate::virtio_blk::{RequestError, STATUS_IOERR, STATUS_OK, STATUS_UNSUPP};

/// Signalling policy: the applier signals the driver once per this many completions of a
/// batch (and at its end). Each signal is an eventfd write and usually a wake-up of the
/// driver through the hypervisor, which costs far more than the completion itself;
/// signalling every completion held one queue at 1.1–1.2× of the peer. Reads and requests
/// completed on the worker keep one signal each, which measured better.
pub const SIGNAL_EVERY: usize = 8;

/// Why a request failed. Each kind maps to a virtio status in [`status`](Self::status) and is
/// logged, once per failure, by [`Completion::failed`].
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The chain is not a request this device accepts (`virtio_blk::parse`).
    #[error("refused a request: {0}")]
    Refused(RequestError),
    /// A request type this device does not implement.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// A buffer is not all in guest memory.
    #[error("{0}")]
    GuestMemory(GuestMemoryError),
    /// The store could not read, flush, or add or find a marker.
    #[error("{0}")]
    Store(#[from] crate::Error),
    #[error("there are no markers yet")]
    NoMarkers,
    #[error("markers belong to the live disk; a point-in-time export has none")]
    NoMarkersOnExport,
    #[error("MARKER_GET reply buffer smaller than {0} bytes")]
    ReplyTooSmall(usize),
    /// A batch could not be appended to the journal: none of its writes happened.
    #[error("journaled write failed: {0}")]
    Journal(crate::Error),
    /// A journaled batch could not be written to the volume.
    #[error("journaled write not applied to the volume: {0}")]
    Apply(crate::Error),
    /// A write-through batch reached the volume, but the journal could not be synced.
    #[error("write-through sync failed: {0}")]
    WriteThrough(crate::Error),
}

impl ExecError {
    /// The status a request that failed so completes with: UNSUPP for a type this device does
    /// not know, IOERR for everything else (a malformed request, guest memory, the journal,
    /// the volume, the markers).
    pub fn status(&self) -> u8 {
        match self {
            Self::Unsupported(_) => STATUS_UNSUPP as u8,
            Self::Refused(_)
            | Self::GuestMemory(_)
            | Self::Store(_)
            | Self::NoMarkers
            | Self::NoMarkersOnExport
            | Self::ReplyTooSmall(_)
            | Self::Journal(_)
            | Self::Apply(_)
            | Self::WriteThrough(_) => STATUS_IOERR as u8,
        }
    }

    /// Logs the failure: the host's own failures (journal, volume) as errors, a guest's bad or
    /// failed request as a warning, an unsupported type only when debugging. Each kind logs
    /// from its own line, so the per-site rate limit (log_limit) keeps a flood of one kind
    /// from hiding another.
    fn log(&self) {
        match self {
            Self::Refused(_) => log::warn!("{self}"),
            Self::Unsupported(_) => log::debug!("{self}"),
            Self::Journal(_) => log::error!("{self}"),
            Self::Apply(_) => log::error!("{self}"),
            Self::WriteThrough(_) => log::error!("{self}"),
            Self::GuestMemory(_)
            | Self::Store(_)
            | Self::NoMarkers
            | Self::NoMarkersOnExport
            | Self::ReplyTooSmall(_) => {
                log::warn!("request failed: {self}")
            }
        }
    }
}

/// How one request ended: its status and the bytes it wrote into device-writable buffers.
pub struct Completion {
    status: u8,
    written: u32,
}

impl Completion {
    pub fn ok(written: u32) -> Self {
        Self { status: STATUS_OK as u8, written }
    }

    /// Logs why and returns the completion of the request(s) that failed so; a failure of a
    /// whole batch is passed here once and its completion reused for each request.
    pub fn failed(error: &ExecError) -> Self {
        error.log();
        Self { status: error.status(), written: 0 }
    }

    pub fn is_ok(&self) -> bool {
        self.status == STATUS_OK as u8
    }
}

/// Where a queue's completions go. The guest memory for the status bytes is the caller's:
/// the pass's, or a job's (see `GuestBuffers::memory`).
#[derive(Clone)]
pub struct Completer {
    vring: VringRwLock,
    event_idx: bool,
    counters: Arc<Counters>,
    /// The queue's inflight tracking, which each completion updates.
    tracker: Option<Arc<QueueTracker>>,
}

impl Completer {
    pub fn new(
        vring: VringRwLock,
        event_idx: bool,
        counters: Arc<Counters>,
        tracker: Option<Arc<QueueTracker>>,
    ) -> Self {
        Self { vring, event_idx, counters, tracker }
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Writes the status byte (when the chain has one), puts the chain on the used ring and
    /// signals the driver if it wants to be.
    pub fn complete(
        &self,
        mem: &GuestMemoryMmap,
        head: u16,
        status_at: Option<GuestAddress>,
        completion: &Completion,
    ) -> io::Result<()> {
        self.complete_unsignalled(mem, head, status_at, completion)?;
        self.signal()
    }

    /// Signals the driver if it wants to be told about the used ring's new entries.
    fn signal(&self) -> io::Result<()> {
        let queue_error = |e: virtio_queue::Error| io::Error::other(e.to_string());
        if !self.event_idx || self.vring.needs_notification().map_err(queue_error)? {
            self.vring.signal_used_queue()?;
        }
        Ok(())
    }

    /// `complete` without the signal: the caller signals once for several completions.
    fn complete_unsignalled(
        &self,
        mem: &GuestMemoryMmap,
        head: u16,
        status_at: Option<GuestAddress>,
        completion: &Completion,
    ) -> io::Result<()> {
        if !completion.is_ok() {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        let used = status_at.map_or(0, |at| match mem.write_obj(completion.status, at) {
            Ok(()) => completion.written + 1,
            Err(e) => {
                log::warn!("cannot write a request status: {e}");
                0
            }
        });
        let put_used = || self.vring.add_used(head, used).map_err(|e| io::Error::other(e.to_string()));
        match &self.tracker {
            Some(tracker) => tracker.complete(head, put_used),
            None => put_used(),
        }
    }
}

/// Completes a run of requests, signalling the driver once per [`SIGNAL_EVERY`] completions
/// and at the end.
pub struct Completions<'a> {
    completer: &'a Completer,
    mem: &'a GuestMemoryMmap,
    unsignalled: usize,
}

impl<'a> Completions<'a> {
    pub fn new(completer: &'a Completer, mem: &'a GuestMemoryMmap) -> Self {
        Self { completer, mem, unsignalled: 0 }
    }

    pub fn complete(&mut self, head: u16, status_at: Option<GuestAddress>, completion: &Completion) -> io::Result<()> {
        self.completer.complete_unsignalled(self.mem, head, status_at, completion)?;
        self.unsignalled += 1;
        if self.unsignalled >= SIGNAL_EVERY {
            self.flush()?;
        }
        Ok(())
    }

    /// Signals what is not signalled yet.
    fn flush(&mut self) -> io::Result<()> {
        if self.unsignalled > 0 {
            self.unsignalled = 0;
            self.completer.signal()?;
        }
        Ok(())
    }
}

impl Drop for Completions<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            log::warn!("cannot signal completions: {e}");
        }
    }
}
