//! A queue's worker: one pass takes the requests off the ring, parses them (virtio_blk) and
//! executes them in order. Consecutive volume writes go to the journal as one batch and on to
//! the queue's applier ([`applier`](super::applier)); reads go to the volume, shared with the
//! applier when it is idle; FLUSH, GET_ID and the marker requests complete here.
//!
//! The decisions that make the 4 KiB random write and read path fast are the policies below,
//! each measured (README, Benchmarks): [`BATCH_BYTES`], [`applies_inline`], [`shared_reads`],
//! [`watches_ring`] with [`POLL_BEFORE_SLEEP`], and the applier's `SIGNAL_EVERY`
//! ([`completion`](super::completion)).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

use super::applier::{read_request, with_volume_ops, Applier, ApplyJob, BatchOp, BatchRequest, Job, ReadJob};
use super::completion::{Completer, Completion, ExecError};
use super::counters::Counters;
use super::guest_memory::{GuestBuffers, Memory};
use super::inflight::QueueTracker;
use super::ring::{self, RingFault};
use super::source::BlockSource;
use crate::marker::MarkerSource;
use crate::virtio_blk::{self, Limits, Parsed, Request, RequestError};

/// Batching policy: a pass's consecutive volume writes go to the journal together (one
/// append) until they hold about this many bytes. Small writes share the append; large ones
/// gain nothing from waiting for each other, and their completions would be held back.
pub const BATCH_BYTES: u64 = 256 << 10;

/// Polling policy: how long a queue's worker watches the ring for more requests before it
/// sleeps until the driver's next kick: a sleep and wake-up cost more than a request on a
/// virtual machine, and a busy driver adds requests within microseconds of seeing completions.
pub const POLL_BEFORE_SLEEP: Duration = Duration::from_micros(50);

/// Inline-apply policy: a journaled batch is applied on the worker itself, not handed to the
/// applier, when it is all the pass took off the ring and the applier is idle. A lone request
/// gains nothing from the applier and would pay for waking it (QD1 write + flush).
fn applies_inline(pass_requests: usize, applier: &Applier) -> bool {
    pass_requests == 1 && applier.is_idle()
}

/// Read-sharing policy: of a run of `reads` consecutive reads, how many the applier takes (the
/// first half, when there are two or more and it is idle, so two threads serve them); the
/// worker does the rest.
fn shared_reads(reads: usize, applier: &Applier) -> usize {
    if reads >= 2 && applier.is_idle() {
        reads / 2
    } else {
        0
    }
}

/// Polling policy: whether the worker watches the ring after a pass (for up to
/// [`POLL_BEFORE_SLEEP`], kicks still off) rather than going to sleep. Only with EVENT_IDX, and
/// not while the applier has work: on a machine with few cores it needs the CPU.
fn watches_ring(event_idx: bool, applier: &Applier) -> bool {
    event_idx && applier.is_idle()
}

/// Watches the available ring, with the driver's kicks off, for up to [`POLL_BEFORE_SLEEP`].
fn more_requests_soon(vring: &VringRwLock, mem: &GuestMemoryMmap) -> bool {
    let start = Instant::now();
    loop {
        let state = vring.get_ref();
        let queue = state.get_queue();
        match queue.avail_idx(mem, Ordering::Acquire) {
            Ok(avail) if avail.0 != queue.next_avail() => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
        drop(state);
        if start.elapsed() >= POLL_BEFORE_SLEEP {
            return false;
        }
        // Any other thread that wants this CPU (the applier, the control socket) gets it.
        std::thread::yield_now();
    }
}

/// What every queue of the device shares.
pub struct Device {
    pub source: BlockSource,
    pub counters: Arc<Counters>,
    pub limits: Limits,
    pub serial: [u8; virtio_blk::ID_BYTES],
    /// The frontend's guest memory, once it has sent it.
    pub memory: Mutex<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    pub event_idx: AtomicBool,
    /// The driver's cache mode: write-back, or write-through (each write durable before it
    /// completes).
    pub writeback: AtomicBool,
    /// Set for a clean exit: no queue takes more requests off its ring.
    pub finishing: AtomicBool,
}

type ParsedChain = Result<Parsed, RequestError>;

/// A started queue's inflight tracking, and the chains a previous backend left unfinished.
#[derive(Default)]
struct Tracking {
    tracker: Option<Arc<QueueTracker>>,
    resubmit: Vec<u16>,
}

/// One virtqueue as its worker serves it: its applier, whether its ring is broken, and its
/// inflight tracking.
pub struct BlkQueue {
    index: usize,
    applier: Applier,
    /// Set when its ring was found in a state no correct driver produces.
    broken: AtomicBool,
    tracking: Mutex<Tracking>,
}

impl BlkQueue {
    pub fn new(index: usize, source: BlockSource) -> Self {
        Self {
            index,
            applier: Applier::spawn(index, source),
            broken: AtomicBool::new(false),
            tracking: Mutex::default(),
        }
    }

    fn tracking(&self) -> std::sync::MutexGuard<'_, Tracking> {
        self.tracking.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The queue starts, tracked in an inflight region (with the chains to resubmit) or not.
    pub fn start(&self, tracking: Option<(Arc<QueueTracker>, Vec<u16>)>) {
        *self.tracking() = match tracking {
            Some((tracker, resubmit)) => Tracking { tracker: Some(tracker), resubmit },
            None => Tracking::default(),
        };
    }

    /// The queue stopped: chains not resubmitted yet stay flagged in the region, for the next
    /// start to find.
    pub fn stop(&self) {
        *self.tracking() = Tracking::default();
    }

    /// Serves the ring until it is empty (and, with EVENT_IDX, stays empty for a moment).
    pub fn process(&self, device: &Device, vring: &VringRwLock) -> io::Result<()> {
        if self.broken.load(Ordering::Acquire) {
            return Ok(());
        }
        let memory = device.memory.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(memory) = memory else { return Ok(()) };
        let _pass = self.applier.begin_pass();
        let queue_error = |e: virtio_queue::Error| io::Error::other(e.to_string());
        let (tracker, resubmit) = {
            let mut tracking = self.tracking();
            (tracking.tracker.clone(), std::mem::take(&mut tracking.resubmit))
        };
        if !resubmit.is_empty() {
            device.counters.resubmitted.fetch_add(resubmit.len() as u64, Ordering::Relaxed);
            let resubmitted = ring::chains_at(vring.get_ref().get_queue(), &memory, &resubmit);
            let event_idx = device.event_idx.load(Ordering::Relaxed);
            if !self.run_pass(device, vring, resubmitted, tracker.as_ref(), event_idx)? {
                return Ok(());
            }
        }
        loop {
            if device.finishing.load(Ordering::SeqCst) {
                return Ok(());
            }
            let event_idx = device.event_idx.load(Ordering::Relaxed);
            if event_idx {
                vring.disable_notification().map_err(queue_error)?;
            }
            // A fresh view of guest memory each pass, loaded after the available index (see
            // `pop_chains`): the frontend may add regions while this loop runs.
            let popped = ring::pop_chains(vring.get_mut().get_queue_mut(), &memory);
            let mem = popped.mem.clone();
            if let Some(tracker) = &tracker {
                // Only an access outside the region fails, and its bounds were checked when the
                // queue started; the requests still run, untracked, rather than hang.
                if let Err(e) = tracker.taken(popped.chains.iter().map(|(head, _)| *head)) {
                    log::error!("queue {}: cannot flag requests in the inflight region: {e}", self.index);
                }
            }
            if !self.run_pass(device, vring, popped, tracker.as_ref(), event_idx)? {
                return Ok(());
            }
            if watches_ring(event_idx, &self.applier) && more_requests_soon(vring, &mem) {
                continue;
            }
            if !event_idx || !vring.enable_notification().map_err(queue_error)? {
                return Ok(());
            }
        }
    }

    /// Executes the chains of one look at the ring or of the resubmit list; returns false if
    /// the queue broke down.
    fn run_pass(
        &self,
        device: &Device,
        vring: &VringRwLock,
        popped: ring::Popped,
        tracker: Option<&Arc<QueueTracker>>,
        event_idx: bool,
    ) -> io::Result<bool> {
        let mem = popped.mem;
        let parsed: Vec<(u16, ParsedChain)> = popped
            .chains
            .into_iter()
            .map(|(head, descs)| (head, virtio_blk::parse(&descs, &mem, &device.limits)))
            .collect();
        let completer = Completer::new(vring.clone(), event_idx, Arc::clone(&device.counters), tracker.cloned());
        let pass = Pass { device, applier: &self.applier, mem: &mem, completer: &completer, taken: parsed.len() };
        pass.execute(&parsed)?;
        if let Some(fault) = popped.fault {
            self.break_down(&device.counters, &fault);
            return Ok(false);
        }
        Ok(true)
    }

    /// Waits for the worker's current pass and every job of the applier to complete.
    pub fn quiesce(&self) {
        self.applier.quiesce();
    }

    /// Stops serving a queue whose ring no correct driver could have produced, until the
    /// frontend sets it up again (`stop_vring`) or reconnects. The requests taken before the
    /// fault still complete.
    fn break_down(&self, counters: &Counters, fault: &RingFault) {
        self.broken.store(true, Ordering::Release);
        counters.broken_queues.fetch_add(1, Ordering::Relaxed);
        log::error!("queue {} is broken and no longer served until the driver resets it: {fault}", self.index);
    }

    /// Serves the queue again once its ring is set up afresh: after the frontend took it back,
    /// reset the device or went away (`why`).
    pub fn mend(&self, counters: &Counters, why: &str) {
        if self.broken.swap(false, Ordering::AcqRel) {
            counters.broken_queues.fetch_sub(1, Ordering::Relaxed);
            log::info!("queue {} is no longer broken: {why}", self.index);
        }
    }
}

/// One pass over the requests a worker took off its ring.
struct Pass<'a> {
    device: &'a Device,
    applier: &'a Applier,
    mem: &'a Memory,
    completer: &'a Completer,
    /// How many requests the pass took (for [`applies_inline`]).
    taken: usize,
}

impl Pass<'_> {
    /// Executes the parsed requests of one pass in order. Consecutive volume writes go to the
    /// journal as one batch and on to the applier; consecutive reads are shared with the
    /// applier when it is idle; everything else completes here. Each request completes as soon
    /// as its own I/O is done, so the driver can refill the queue while the rest of the pass
    /// runs.
    fn execute(&self, parsed: &[(u16, ParsedChain)]) -> io::Result<()> {
        let mut batch: Vec<(u16, &Parsed)> = Vec::new();
        let mut batch_bytes = 0;
        let mut reads: Vec<(u16, &Parsed)> = Vec::new();
        for (head, result) in parsed {
            let p = match result {
                Ok(p) => p,
                Err(e) => {
                    let completion = Completion::failed(&ExecError::Refused(e.clone()));
                    self.completer.complete(self.mem, *head, e.status, &completion)?;
                    continue;
                }
            };
            self.device.counters.requests.fetch_add(1, Ordering::Relaxed);
            match &p.request {
                Request::Write { .. } | Request::Discard { .. } | Request::WriteZeroes { .. } => {
                    self.run_reads(&mut reads)?;
                    batch.push((*head, p));
                    if let Request::Write { buffers, .. } = &p.request {
                        batch_bytes += virtio_blk::total_len(buffers);
                    }
                    if batch_bytes >= BATCH_BYTES {
                        self.submit_batch(&mut batch)?;
                        batch_bytes = 0;
                    }
                }
                // Reads wait in the store for the batches journaled before them that they
                // overlap.
                Request::Read { .. } => {
                    self.submit_batch(&mut batch)?;
                    batch_bytes = 0;
                    reads.push((*head, p));
                }
                // FLUSH covers every batch journaled so far; markers are numbered after them.
                _ => {
                    self.submit_batch(&mut batch)?;
                    batch_bytes = 0;
                    self.run_reads(&mut reads)?;
                    self.completer.complete(self.mem, *head, Some(p.status), &self.execute_one(&p.request))?;
                }
            }
        }
        self.submit_batch(&mut batch)?;
        self.run_reads(&mut reads)
    }

    /// Carries out consecutive reads: the first ones on the applier ([`shared_reads`]), the
    /// rest here.
    fn run_reads(&self, reads: &mut Vec<(u16, &Parsed)>) -> io::Result<()> {
        if reads.is_empty() {
            return Ok(());
        }
        let source = &self.device.source;
        let shared = shared_reads(reads.len(), self.applier);
        // A shared read whose buffers are outside guest memory is done here instead, and
        // fails here with the error logged.
        let mut unshared = Vec::new();
        if shared > 0 {
            let buffers = GuestBuffers::owning(self.mem.clone());
            let mut job = ReadJob::new(source.read_fence(), buffers, self.completer.clone());
            for &(head, p) in &reads[..shared] {
                let Request::Read { offset, buffers } = &p.request else { unreachable!("only reads are gathered") };
                if job.add(head, p.status, *offset, buffers).is_err() {
                    unshared.push((head, p));
                }
            }
            if !job.is_empty() {
                self.applier.hand_over(Job::Read(job), source);
            }
        }
        let mut buffers = GuestBuffers::borrowing(self.mem);
        for &(head, p) in unshared.iter().chain(&reads[shared..]) {
            let Request::Read { offset, buffers: bufs } = &p.request else { unreachable!("only reads are gathered") };
            buffers.clear();
            let completion = buffers
                .map(bufs)
                .map_err(ExecError::GuestMemory)
                .and_then(|span| {
                    read_request(source, &self.device.counters, source.read_fence(), *offset, &mut buffers, span)
                })
                .unwrap_or_else(|e| Completion::failed(&e));
            self.completer.complete(self.mem, head, Some(p.status), &completion)?;
        }
        reads.clear();
        Ok(())
    }

    /// Journals a batch and hands it to the applier (or applies it here, [`applies_inline`]);
    /// if it cannot be journaled, fails it here.
    fn submit_batch(&self, batch: &mut Vec<(u16, &Parsed)>) -> io::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        match self.journal_batch(batch) {
            Ok(job) => {
                if applies_inline(self.taken, self.applier) {
                    job.run(&self.device.source);
                } else {
                    self.applier.hand_over(Job::Apply(job), &self.device.source);
                }
            }
            Err(e) => {
                let failed = Completion::failed(&e);
                for &(head, p) in batch.iter() {
                    self.completer.complete(self.mem, head, Some(p.status), &failed)?;
                }
            }
        }
        batch.clear();
        Ok(())
    }

    /// Appends a batch's writes to the journal; returns the job that applies them.
    fn journal_batch(&self, batch: &[(u16, &Parsed)]) -> Result<ApplyJob, ExecError> {
        let mut buffers = GuestBuffers::owning(self.mem.clone());
        let mut ops = Vec::new();
        let mut requests = Vec::with_capacity(batch.len());
        for &(head, p) in batch {
            let mut bytes = 0;
            match &p.request {
                Request::Write { offset, buffers: bufs } => {
                    let data = buffers.map(bufs).map_err(ExecError::GuestMemory)?;
                    ops.push(BatchOp::Write { offset: *offset, data });
                    bytes = virtio_blk::total_len(bufs);
                }
                Request::Discard { ranges } => {
                    ops.extend(ranges.iter().map(|&(offset, len)| BatchOp::Discard { offset, len }))
                }
                Request::WriteZeroes { ranges, .. } => {
                    ops.extend(ranges.iter().map(|&(offset, len)| BatchOp::WriteZeroes { offset, len }))
                }
                _ => unreachable!("only volume writes are batched"),
            }
            // Parsing guarantees at least one range per request, so this request's ops end here.
            requests.push(BatchRequest { head, status_at: p.status, last_op: ops.len() - 1, bytes });
        }
        let journaled = with_volume_ops(&buffers, &ops, |volume_ops| self.device.source.journal(volume_ops))
            .map_err(ExecError::Journal)?;
        // Without a write-back cache each write must be durable before it completes.
        let durable_first = !self.device.writeback.load(Ordering::Relaxed);
        Ok(ApplyJob { journaled, requests, durable_first, buffers, completer: self.completer.clone() })
    }

    fn execute_one(&self, request: &Request) -> Completion {
        self.try_execute(request).unwrap_or_else(|e| Completion::failed(&e))
    }

    fn try_execute(&self, request: &Request) -> Result<Completion, ExecError> {
        let source = &self.device.source;
        Ok(match request {
            Request::Flush => {
                source.sync()?;
                self.device.counters.flushes.fetch_add(1, Ordering::Relaxed);
                Completion::ok(0)
            }
            Request::GetId { buffers } => Completion::ok(copy_to_buffers(self.mem, &self.device.serial, buffers)?),
            Request::MarkerAdd { name } => {
                let name = crate::marker::validate_name(name)?;
                let marker = source.add_marker(name, MarkerSource::Guest)?;
                log::info!("guest marker {:?} at seq {}", marker.name, marker.seq);
                Completion::ok(0)
            }
            Request::MarkerGet { name, reply } => {
                let name = name.as_deref().map(crate::marker::validate_name).transpose()?;
                let marker = source.marker(name)?.ok_or(ExecError::NoMarkers)?;
                let bytes = virtio_blk::encode_marker_reply(&marker.marker);
                if virtio_blk::total_len(reply) < bytes.len() as u64 {
                    return Err(ExecError::ReplyTooSmall(bytes.len()));
                }
                Completion::ok(copy_to_buffers(self.mem, &bytes, reply)?)
            }
            Request::Unsupported { request_type } => return Err(ExecError::Unsupported(*request_type)),
            Request::Read { .. } => unreachable!("reads are run by run_reads"),
            Request::Write { .. } | Request::Discard { .. } | Request::WriteZeroes { .. } => {
                unreachable!("volume writes are batched")
            }
        })
    }
}

/// Copies `bytes` into the buffers, as far as they reach; returns the bytes copied.
fn copy_to_buffers(mem: &GuestMemoryMmap, bytes: &[u8], buffers: &[(GuestAddress, u32)]) -> Result<u32, ExecError> {
    let mut done = 0;
    for &(addr, len) in buffers {
        let n = (bytes.len() - done).min(len as usize);
        mem.write_slice(&bytes[done..done + n], addr).map_err(ExecError::GuestMemory)?;
        done += n;
    }
    Ok(done as u32)
}
