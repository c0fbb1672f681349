//! A queue's applier thread and its jobs: journaled batches to write to the volume
//! ([`ApplyJob`]) and reads to share with the worker ([`ReadJob`]). A job holds its guest
//! buffers ([`GuestBuffers`], which keep their memory mapped) and completes its own requests.

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use vm_memory::GuestAddress;

use super::completion::{Completer, Completion, Completions, ExecError};
use super::counters::Counters;
use super::guest_memory::{GuestBuffers, Span};
use crate::store::{Journaled, ReadFence, Store, VolumeOp};

/// A volume write of a batch, with its data still in guest memory: a write's `data` is the
/// span of its buffers in the job's [`GuestBuffers`].
#[derive(Clone, Copy)]
pub enum BatchOp {
    Write { offset: u64, data: Span },
    WriteZeroes { offset: u64, len: u64 },
    Discard { offset: u64, len: u64 },
}

/// Calls `f` with the store's view of `ops`, whose data is in `buffers`.
pub fn with_volume_ops<R>(buffers: &GuestBuffers<'_>, ops: &[BatchOp], f: impl FnOnce(&[VolumeOp<'_>]) -> R) -> R {
    let pieces = buffers.all();
    let volume_ops: Vec<VolumeOp<'_>> = ops
        .iter()
        .map(|op| match *op {
            BatchOp::Write { offset, data } => VolumeOp::Write { offset, data: &pieces[data.indices()] },
            BatchOp::WriteZeroes { offset, len } => VolumeOp::WriteZeroes { offset, len },
            BatchOp::Discard { offset, len } => VolumeOp::Discard { offset, len },
        })
        .collect();
    f(&volume_ops)
}

/// Reads `offset..` into a request's device-writable buffers (`span` of `buffers`) and counts
/// the bytes.
pub fn read_request(
    store: &Store,
    counters: &Counters,
    fence: ReadFence,
    offset: u64,
    buffers: &mut GuestBuffers<'_>,
    span: Span,
) -> Result<Completion, ExecError> {
    let mut at = offset;
    for index in span.indices() {
        let bytes = buffers.bytes_mut(index);
        let len = bytes.len() as u64;
        store.read_after(fence, at, bytes)?;
        at += len;
    }
    counters.bytes_read.fetch_add(at - offset, Ordering::Relaxed);
    Ok(Completion::ok((at - offset) as u32))
}

/// A read handed to the applier: where to complete it, and what to read where.
struct SharedRead {
    head: u16,
    status_at: GuestAddress,
    offset: u64,
    span: Span,
}

/// Reads handed to the applier while it has nothing else to do, so both threads serve them.
pub struct ReadJob {
    reads: Vec<SharedRead>,
    fence: ReadFence,
    buffers: GuestBuffers<'static>,
    completer: Completer,
}

impl ReadJob {
    /// An empty job whose reads see every batch journaled before `fence`.
    pub fn new(fence: ReadFence, buffers: GuestBuffers<'static>, completer: Completer) -> Self {
        Self { reads: Vec::new(), fence, buffers, completer }
    }

    /// Adds a read of `offset..` into `buffers`; fails (adding nothing) if they are not all
    /// in guest memory.
    pub fn add(
        &mut self,
        head: u16,
        status_at: GuestAddress,
        offset: u64,
        buffers: &[(GuestAddress, u32)],
    ) -> Result<(), ExecError> {
        let span = self.buffers.map(buffers).map_err(ExecError::GuestMemory)?;
        self.reads.push(SharedRead { head, status_at, offset, span });
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.reads.is_empty()
    }

    fn run(self, store: &Store) {
        let Self { reads, fence, mut buffers, completer } = self;
        for read in reads {
            let completion = read_request(store, completer.counters(), fence, read.offset, &mut buffers, read.span)
                .unwrap_or_else(|e| Completion::failed(&e));
            if let Err(e) = completer.complete(buffers.memory(), read.head, Some(read.status_at), &completion) {
                log::warn!("cannot complete a request: {e}");
            }
        }
    }
}

/// A request of a batch: where to complete it and which ops it consists of.
pub struct BatchRequest {
    pub head: u16,
    pub status_at: GuestAddress,
    /// Index of its last op in the batch.
    pub last_op: usize,
    pub bytes: u64,
}

/// A journaled batch on its way to the volume: the applier writes it and completes each
/// request as soon as its ops are written.
pub struct ApplyJob {
    pub journaled: Journaled,
    pub requests: Vec<BatchRequest>,
    /// Write-through: the journal is synced after the batch is applied (never while it holds
    /// its place in the apply order, which a catch-up under the writer lock may wait for), and
    /// only then are its requests completed.
    pub durable_first: bool,
    /// The memory for the status bytes.
    pub buffers: GuestBuffers<'static>,
    pub completer: Completer,
}

impl ApplyJob {
    pub fn run(self, store: &Store) {
        let Self { journaled, requests, durable_first, buffers, completer } = self;
        let mut requests = requests.into_iter().peekable();
        let mut completions = Completions::new(&completer, buffers.memory());
        let mut complete = |request: BatchRequest, completion: &Completion| {
            if completion.is_ok() {
                completer.counters().bytes_written.fetch_add(request.bytes, Ordering::Relaxed);
            }
            if let Err(e) = completions.complete(request.head, Some(request.status_at), completion) {
                log::warn!("cannot complete a request: {e}");
            }
        };
        let written = Completion::ok(0);
        let on_applied = |op: usize| {
            while let Some(request) = requests.next_if(|r| !durable_first && r.last_op == op) {
                complete(request, &written);
            }
        };
        let applied = store.apply(journaled, on_applied);
        let outcome = match applied {
            Ok(_) if durable_first => store.sync().map(drop).map_err(ExecError::WriteThrough),
            Ok(_) => Ok(()),
            Err(e) => Err(ExecError::Apply(e)),
        };
        // Write-through requests complete now; after an error, whatever was not completed as
        // applied fails.
        let rest = match outcome {
            Ok(()) => written,
            Err(e) => Completion::failed(&e),
        };
        for request in requests {
            complete(request, &rest);
        }
    }
}

/// Work for a queue's applier thread.
pub enum Job {
    Apply(ApplyJob),
    Read(ReadJob),
}

impl Job {
    fn run(self, store: &Store) {
        match self {
            Self::Apply(job) => job.run(store),
            Self::Read(job) => job.run(store),
        }
    }
}

/// Jobs handed to an applier and not yet completed.
#[derive(Default)]
struct PendingJobs {
    count: Mutex<(usize, bool)>,
    /// Signalled when the count drops to zero while someone waits (the bool above).
    drained: Condvar,
}

impl PendingJobs {
    fn add(&self) {
        self.count.lock().unwrap_or_else(|p| p.into_inner()).0 += 1;
    }

    fn is_idle(&self) -> bool {
        self.count.lock().unwrap_or_else(|p| p.into_inner()).0 == 0
    }

    fn done(&self) {
        let mut count = self.count.lock().unwrap_or_else(|p| p.into_inner());
        count.0 -= 1;
        if count.0 == 0 && count.1 {
            self.drained.notify_all();
        }
    }

    fn wait_drained(&self) {
        let mut count = self.count.lock().unwrap_or_else(|p| p.into_inner());
        while count.0 > 0 {
            count.1 = true;
            count = self.drained.wait(count).unwrap_or_else(|p| p.into_inner());
        }
        count.1 = false;
    }
}

/// A queue's applier thread and what waits for it.
pub struct Applier {
    /// None only while dropping.
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    pending: Arc<PendingJobs>,
    /// Held by the queue's worker for a whole pass, so stopping the queue can wait for it.
    pass: Mutex<()>,
}

impl Applier {
    pub fn spawn(queue: usize, store: Arc<Store>) -> Self {
        let (jobs, inbox) = mpsc::channel::<Job>();
        let pending: Arc<PendingJobs> = Arc::default();
        let done = Arc::clone(&pending);
        let spawned = std::thread::Builder::new().name(format!("rewind-apply-{queue}")).spawn(move || {
            for job in inbox {
                job.run(&store);
                done.done();
            }
        });
        let thread = spawned
            // Jobs then run on the queue's worker (see `hand_over`).
            .map_err(|e| log::warn!("cannot start the applier thread of queue {queue}: {e}"))
            .ok();
        Self { jobs: Some(jobs), thread, pending, pass: Mutex::new(()) }
    }

    /// Whether every job handed over has completed.
    pub fn is_idle(&self) -> bool {
        self.pending.is_idle()
    }

    /// Marks a pass of the queue's worker, for [`quiesce`](Self::quiesce) to wait for.
    pub fn begin_pass(&self) -> MutexGuard<'_, ()> {
        self.pass.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands a job to the applier thread, or runs it here if that thread is gone.
    pub fn hand_over(&self, job: Job, store: &Store) {
        self.pending.add();
        let sent = match &self.jobs {
            Some(jobs) => jobs.send(job),
            None => Err(mpsc::SendError(job)),
        };
        if let Err(mpsc::SendError(job)) = sent {
            job.run(store);
            self.pending.done();
        }
    }

    /// Waits for the worker's current pass and every job handed over to complete.
    /// (Dropping an applier also finishes its jobs, and its thread lets go of the store.)
    pub fn quiesce(&self) {
        let _pass = self.begin_pass();
        self.pending.wait_drained();
    }
}

impl Drop for Applier {
    fn drop(&mut self) {
        // Closing the channel ends the thread once it has run the jobs already sent.
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("an applier thread panicked");
            }
        }
    }
}
