//! The vhost-user-blk glue: features, config space and the virtqueue loop. Each kick's requests
//! are parsed (virtio_blk), then executed against the store: consecutive writes go to the
//! journal as one batch (one journal write) and are handed to the queue's applier thread, which
//! writes them to the volume and completes them while the queue's worker goes on with the next
//! batch. Reads go straight to the volume, FLUSH syncs the journal, and every request
//! completes with a status.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};

use serde::Serialize;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryLoadGuard,
    GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

use crate::marker::MarkerSource;
use crate::store::{Journaled, ReadFence, Store, VolumeOp};
use crate::virtio_blk::{self, ConfigSpace, Limits, Parsed, Request, STATUS_IOERR, STATUS_OK, STATUS_UNSUPP};

// Public for the fuzz targets (fuzz/), not an API.
#[doc(hidden)]
pub mod ring;
use ring::RingFault;

/// Data descriptors per request: Linux's default for a 256-entry queue, less header and status.
pub const SEG_MAX: u32 = 126;
const MAX_TRANSFER: u64 = 32 << 20;
const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// The applier signals the driver once per this many completions of a batch (and at its end).
const SIGNAL_EVERY: usize = 8;
/// A queue pass's writes go to the journal in batches of about this many bytes.
const BATCH_BYTES: u64 = 256 << 10;
/// How long a queue's worker watches the ring for more requests before it sleeps until the
/// driver's next kick: a sleep and wake-up cost more than a request on a virtual machine, and a
/// busy driver adds requests within microseconds of seeing completions.
const POLL_BEFORE_SLEEP: std::time::Duration = std::time::Duration::from_micros(50);

#[derive(Debug, Clone)]
pub struct BlkOptions {
    pub num_queues: usize,
    pub queue_size: usize,
    pub serial: [u8; virtio_blk::ID_BYTES],
    pub read_only: bool,
}

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
}

pub struct BlkBackend {
    store: Arc<Store>,
    options: BlkOptions,
    limits: Limits,
    memory: Mutex<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    event_idx: AtomicBool,
    writeback: AtomicBool,
    /// Exit notifiers handed to the current connection's worker threads.
    exit_notifiers: Mutex<Vec<EventNotifier>>,
    /// One per queue.
    appliers: Vec<Applier>,
    /// One per queue: set when its ring was found in a state no correct driver produces.
    broken: Vec<AtomicBool>,
    pub counters: Arc<Counters>,
    /// Whether a frontend is connected now.
    pub connected: AtomicBool,
}

/// A guest buffer as the host sees it.
#[derive(Clone, Copy)]
struct GuestSlice {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a GuestSlice only travels inside an ApplyJob together with the memory guard that
// keeps its mapping alive; the bytes behind it are guest memory, shared by design.
unsafe impl Send for GuestSlice {}

impl GuestSlice {
    /// # Safety
    /// The mapping the slice points into must still be alive (its memory guard held).
    unsafe fn bytes<'a>(self) -> &'a [u8] {
        // SAFETY: as the caller promises; the guest may change the bytes meanwhile, as with
        // any device doing DMA, which only affects what gets written.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// # Safety
    /// As for `bytes`, and the buffer must be device-writable.
    #[allow(clippy::mut_from_ref)]
    unsafe fn bytes_mut<'a>(self) -> &'a mut [u8] {
        // SAFETY: as the caller promises.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

/// Host views of guest buffers. The pointers stay valid while the memory guard they came from
/// is alive.
fn host_slices(mem: &GuestMemoryMmap, buffers: &[(GuestAddress, u32)]) -> io::Result<Vec<GuestSlice>> {
    let mut out = Vec::with_capacity(buffers.len());
    for &(addr, len) in buffers {
        for slice in mem.get_slices(addr, len as usize) {
            let slice = slice.map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
            out.push(GuestSlice { ptr: slice.ptr_guard_mut().as_ptr(), len: slice.len() });
        }
    }
    Ok(out)
}

/// A volume write of a batch, with its data still in guest memory.
enum BatchOp {
    Write { offset: u64, data: Vec<GuestSlice> },
    WriteZeroes { offset: u64, len: u64 },
    Discard { offset: u64, len: u64 },
}

/// Calls `f` with the store's view of `ops`.
///
/// # Safety
/// The guest memory the ops' slices point into must stay mapped for the call.
unsafe fn with_volume_ops<R>(ops: &[BatchOp], f: impl FnOnce(&[VolumeOp<'_>]) -> R) -> R {
    let pieces: Vec<Vec<&[u8]>> = ops
        .iter()
        .map(|op| match op {
            // SAFETY: the caller keeps the mapping alive.
            BatchOp::Write { data, .. } => data.iter().map(|s| unsafe { s.bytes() }).collect(),
            _ => Vec::new(),
        })
        .collect();
    let volume_ops: Vec<VolumeOp<'_>> = ops
        .iter()
        .zip(&pieces)
        .map(|(op, data)| match *op {
            BatchOp::Write { offset, .. } => VolumeOp::Write { offset, data },
            BatchOp::WriteZeroes { offset, len } => VolumeOp::WriteZeroes { offset, len },
            BatchOp::Discard { offset, len } => VolumeOp::Discard { offset, len },
        })
        .collect();
    f(&volume_ops)
}

/// Where a request's completion goes.
#[derive(Clone)]
struct Completer {
    mem: GuestMemoryLoadGuard<GuestMemoryMmap>,
    vring: VringRwLock,
    event_idx: bool,
    counters: Arc<Counters>,
}

impl Completer {
    /// Writes the status byte (when the chain has one), puts the chain on the used ring and
    /// signals the driver if it wants to be.
    fn complete(&self, head: u16, status_at: Option<GuestAddress>, completion: &Completion) -> io::Result<()> {
        self.complete_unsignalled(head, status_at, completion)?;
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
        head: u16,
        status_at: Option<GuestAddress>,
        completion: &Completion,
    ) -> io::Result<()> {
        if completion.status != STATUS_OK as u8 {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        let used = status_at.map_or(0, |at| match self.mem.write_obj(completion.status, at) {
            Ok(()) => completion.written + 1,
            Err(e) => {
                log::warn!("cannot write a request status: {e}");
                0
            }
        });
        self.vring.add_used(head, used).map_err(|e| io::Error::other(e.to_string()))
    }
}

/// Completes a run of requests, signalling the driver once per [`SIGNAL_EVERY`] completions
/// and at the end: each signal is an eventfd write and usually a wake-up of the driver, which
/// costs far more than the completion itself on a virtual machine.
struct Completions<'a> {
    completer: &'a Completer,
    unsignalled: usize,
}

impl<'a> Completions<'a> {
    fn new(completer: &'a Completer) -> Self {
        Self { completer, unsignalled: 0 }
    }

    fn complete(&mut self, head: u16, status_at: Option<GuestAddress>, completion: &Completion) -> io::Result<()> {
        self.completer.complete_unsignalled(head, status_at, completion)?;
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

/// Watches the available ring, with the driver's kicks off, for up to [`POLL_BEFORE_SLEEP`].
fn more_requests_soon(vring: &VringRwLock, mem: &GuestMemoryMmap) -> bool {
    let start = std::time::Instant::now();
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

/// Reads `offset..` into device-writable guest buffers and counts the bytes.
///
/// # Safety
/// The guest memory the slices point into must stay mapped for the call.
unsafe fn read_request(
    store: &Store,
    counters: &Counters,
    fence: ReadFence,
    offset: u64,
    buffers: &[GuestSlice],
) -> io::Result<Completion> {
    let mut at = offset;
    for &slice in buffers {
        // SAFETY: the caller keeps the mapping alive; reads target device-writable buffers.
        store.read_after(fence, at, unsafe { slice.bytes_mut() }).map_err(io::Error::other)?;
        at += slice.len as u64;
    }
    counters.bytes_read.fetch_add(at - offset, Ordering::Relaxed);
    Ok(Completion::ok((at - offset) as u32))
}

/// Reads handed to the applier while it has nothing else to do, so both threads serve them.
struct ReadJob {
    /// Each read's descriptor head, status byte, offset and buffers.
    reads: Vec<(u16, GuestAddress, u64, Vec<GuestSlice>)>,
    fence: ReadFence,
    completer: Completer,
}

impl ReadJob {
    fn run(self, store: &Store) {
        for (head, status_at, offset, buffers) in self.reads {
            let counters = &self.completer.counters;
            // SAFETY: `completer.mem` keeps the mapping alive until the job is dropped.
            let completion =
                unsafe { read_request(store, counters, self.fence, offset, &buffers) }.unwrap_or_else(|e| {
                    log::warn!("request failed: {e}");
                    Completion::ioerr()
                });
            if let Err(e) = self.completer.complete(head, Some(status_at), &completion) {
                log::warn!("cannot complete a request: {e}");
            }
        }
    }
}

/// Work for a queue's applier thread.
enum Job {
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

/// A request of a batch: where to complete it and which ops it consists of.
struct BatchRequest {
    head: u16,
    status_at: GuestAddress,
    /// Index of its last op in the batch.
    last_op: usize,
    bytes: u64,
}

/// A journaled batch on its way to the volume: the applier writes it and completes each
/// request as soon as its ops are written.
struct ApplyJob {
    journaled: Journaled,
    ops: Vec<BatchOp>,
    requests: Vec<BatchRequest>,
    /// Write-through: the journal is synced after the batch is applied (never while it holds
    /// its place in the apply order, which a catch-up under the writer lock may wait for), and
    /// only then are its requests completed.
    durable_first: bool,
    /// Holds the guest memory the ops point into.
    completer: Completer,
}

impl ApplyJob {
    fn run(self, store: &Store) {
        let Self { journaled, ops, requests, durable_first, completer } = self;
        let mut requests = requests.into_iter().peekable();
        let mut completions = Completions::new(&completer);
        let mut complete = |request: BatchRequest, ok: bool| {
            let completion = if ok { Completion::ok(0) } else { Completion::ioerr() };
            if ok {
                completer.counters.bytes_written.fetch_add(request.bytes, Ordering::Relaxed);
            }
            if let Err(e) = completions.complete(request.head, Some(request.status_at), &completion) {
                log::warn!("cannot complete a request: {e}");
            }
        };
        let on_applied = |op: usize| {
            while let Some(request) = requests.next_if(|r| !durable_first && r.last_op == op) {
                complete(request, true);
            }
        };
        // SAFETY: `completer.mem` keeps the mapping alive until the job is dropped.
        let applied = unsafe { with_volume_ops(&ops, |volume_ops| store.apply(journaled, volume_ops, on_applied)) };
        let ok = match applied {
            Ok(_) if durable_first => store.sync().map_err(|e| log::error!("write-through sync failed: {e}")).is_ok(),
            Ok(_) => true,
            Err(e) => {
                log::error!("journaled write not applied to the volume: {e}");
                false
            }
        };
        // Write-through requests complete now; after an error, whatever was not completed as
        // applied fails.
        for request in requests {
            complete(request, ok);
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
struct Applier {
    /// None only while dropping.
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    pending: Arc<PendingJobs>,
    /// Held by the queue's worker for a whole pass, so stopping the queue can wait for it.
    pass: Mutex<()>,
}

impl Applier {
    fn spawn(queue: usize, store: Arc<Store>) -> Self {
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

    /// Hands a job to the applier thread, or runs it here if that thread is gone.
    fn hand_over(&self, job: Job, store: &Store) {
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
    fn quiesce(&self) {
        let _pass = self.pass.lock().unwrap_or_else(|p| p.into_inner());
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

/// How one request ended: its status and the bytes it wrote into device-writable buffers.
struct Completion {
    status: u8,
    written: u32,
}

impl Completion {
    fn ok(written: u32) -> Self {
        Self { status: STATUS_OK as u8, written }
    }

    fn ioerr() -> Self {
        Self { status: STATUS_IOERR as u8, written: 0 }
    }
}

type ParsedChain = Result<Parsed, virtio_blk::RequestError>;

impl BlkBackend {
    pub fn new(store: Arc<Store>, options: BlkOptions) -> Self {
        let limits = Limits {
            capacity_bytes: store.volume_size(),
            seg_max: SEG_MAX,
            max_transfer: MAX_TRANSFER,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_discard_segments: 1,
            read_only: options.read_only,
        };
        let appliers = (0..options.num_queues).map(|q| Applier::spawn(q, Arc::clone(&store))).collect();
        let broken = (0..options.num_queues).map(|_| AtomicBool::new(false)).collect();
        Self {
            store,
            options,
            limits,
            memory: Mutex::new(None),
            event_idx: AtomicBool::new(false),
            writeback: AtomicBool::new(true),
            exit_notifiers: Mutex::new(Vec::new()),
            appliers,
            broken,
            counters: Arc::default(),
            connected: AtomicBool::new(false),
        }
    }

    pub fn options(&self) -> &BlkOptions {
        &self.options
    }

    /// Ends what belonged to a frontend's connection: its worker threads exit (after their
    /// current pass), and its queues, broken or not, are set up afresh by the next frontend.
    pub fn disconnected(&self) {
        for notifier in self.exit_notifiers.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            let _ = notifier.notify();
        }
        (0..self.broken.len()).for_each(|queue| self.mend_queue(queue, "the frontend disconnected"));
    }

    fn config_space(&self) -> ConfigSpace {
        ConfigSpace {
            capacity_sectors: self.store.volume_size() / crate::store::SECTOR_SIZE,
            seg_max: SEG_MAX,
            blk_size: crate::store::SECTOR_SIZE as u32,
            physical_block_size: 4096,
            writeback: self.writeback.load(Ordering::Relaxed),
            num_queues: self.options.num_queues as u16,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_discard_segments: 1,
        }
    }

    fn process_queue(&self, queue: usize, vring: &VringRwLock) -> io::Result<()> {
        if self.broken[queue].load(Ordering::Acquire) {
            return Ok(());
        }
        let memory = self.memory.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(memory) = memory else { return Ok(()) };
        let applier = &self.appliers[queue];
        let _pass = applier.pass.lock().unwrap_or_else(|p| p.into_inner());
        let queue_error = |e: virtio_queue::Error| io::Error::other(e.to_string());
        loop {
            // A fresh view each pass: the frontend may add memory regions (ADD_MEM_REG) while
            // this loop runs, and requests may use them as soon as it has its reply.
            let mem = memory.memory();
            let event_idx = self.event_idx.load(Ordering::Relaxed);
            if event_idx {
                vring.disable_notification().map_err(queue_error)?;
            }
            let popped = ring::pop_chains(vring.get_mut().get_queue_mut(), &mem);
            let parsed: Vec<(u16, ParsedChain)> = popped
                .chains
                .into_iter()
                .map(|(head, descs)| (head, virtio_blk::parse(&descs, &mem, &self.limits)))
                .collect();
            let completer = Completer { mem, vring: vring.clone(), event_idx, counters: Arc::clone(&self.counters) };
            self.execute(applier, &completer, &parsed)?;
            if let Some(fault) = popped.fault {
                self.break_queue(queue, &fault);
                return Ok(());
            }
            // Not while the applier has work: on a machine with few cores it needs the CPU.
            if event_idx && applier.pending.is_idle() && more_requests_soon(vring, &completer.mem) {
                continue;
            }
            if !event_idx || !vring.enable_notification().map_err(queue_error)? {
                return Ok(());
            }
        }
    }

    /// Stops serving a queue whose ring no correct driver could have produced, until the
    /// frontend sets it up again (`stop_vring`) or reconnects. The requests taken before the
    /// fault still complete.
    fn break_queue(&self, queue: usize, fault: &RingFault) {
        self.broken[queue].store(true, Ordering::Release);
        self.counters.broken_queues.fetch_add(1, Ordering::Relaxed);
        log::error!("queue {queue} is broken and no longer served until the driver resets it: {fault}");
    }

    /// Serves a queue again once its ring is set up afresh: after the frontend took it back,
    /// reset the device or went away (`why`).
    fn mend_queue(&self, queue: usize, why: &str) {
        if self.broken.get(queue).is_some_and(|broken| broken.swap(false, Ordering::AcqRel)) {
            self.counters.broken_queues.fetch_sub(1, Ordering::Relaxed);
            log::info!("queue {queue} is no longer broken: {why}");
        }
    }

    /// Executes the parsed requests of one pass in order. Consecutive volume writes go to the
    /// journal as one batch and on to the applier; consecutive reads are shared with the
    /// applier when it is idle; everything else completes here. Each request completes as soon
    /// as its own I/O is done, so the driver can refill the queue while the rest of the pass
    /// runs.
    fn execute(&self, applier: &Applier, completer: &Completer, parsed: &[(u16, ParsedChain)]) -> io::Result<()> {
        let mut batch: Vec<(u16, &Parsed)> = Vec::new();
        let mut batch_bytes = 0;
        let mut reads: Vec<(u16, &Parsed)> = Vec::new();
        // A lone request gains nothing from the applier and would pay for waking it.
        let alone = parsed.len() == 1;
        for (head, result) in parsed {
            let p = match result {
                Ok(p) => p,
                Err(e) => {
                    log::warn!("refused a request: {e}");
                    completer.complete(*head, e.status, &Completion::ioerr())?;
                    continue;
                }
            };
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            match &p.request {
                Request::Write { .. } | Request::Discard { .. } | Request::WriteZeroes { .. } => {
                    self.run_reads(applier, completer, &mut reads)?;
                    batch.push((*head, p));
                    if let Request::Write { buffers, .. } = &p.request {
                        batch_bytes += virtio_blk::total_len(buffers);
                    }
                    // Small writes share one journal append; large ones gain nothing from
                    // waiting for each other, and their completions would be held back.
                    if batch_bytes >= BATCH_BYTES {
                        self.submit_batch(applier, completer, &mut batch, alone)?;
                        batch_bytes = 0;
                    }
                }
                // Reads wait in the store for the batches journaled before them that they
                // overlap.
                Request::Read { .. } => {
                    self.submit_batch(applier, completer, &mut batch, alone)?;
                    batch_bytes = 0;
                    reads.push((*head, p));
                }
                // FLUSH covers every batch journaled so far; markers are numbered after them.
                _ => {
                    self.submit_batch(applier, completer, &mut batch, alone)?;
                    batch_bytes = 0;
                    self.run_reads(applier, completer, &mut reads)?;
                    completer.complete(*head, Some(p.status), &self.execute_one(&completer.mem, &p.request))?;
                }
            }
        }
        self.submit_batch(applier, completer, &mut batch, alone)?;
        self.run_reads(applier, completer, &mut reads)
    }

    /// Carries out consecutive reads: the first half on the applier if it is idle (so two
    /// threads serve them), the rest here.
    fn run_reads(&self, applier: &Applier, completer: &Completer, reads: &mut Vec<(u16, &Parsed)>) -> io::Result<()> {
        let shared = if reads.len() >= 2 && applier.pending.is_idle() { reads.len() / 2 } else { 0 };
        let mut job = ReadJob { reads: Vec::new(), fence: self.store.read_fence(), completer: completer.clone() };
        let mut here = Vec::new();
        for (i, &(head, p)) in reads.iter().enumerate() {
            let Request::Read { offset, buffers } = &p.request else { unreachable!("only reads are gathered") };
            // Reads done here map their buffers in execute_one; a shared read whose buffers
            // are outside guest memory is done here too, and fails there with the error logged.
            match (i < shared).then(|| host_slices(&completer.mem, buffers)) {
                Some(Ok(slices)) => job.reads.push((head, p.status, *offset, slices)),
                _ => here.push((head, p)),
            }
        }
        if !job.reads.is_empty() {
            applier.hand_over(Job::Read(job), &self.store);
        }
        for (head, p) in here {
            completer.complete(head, Some(p.status), &self.execute_one(&completer.mem, &p.request))?;
        }
        reads.clear();
        Ok(())
    }

    /// Journals a batch and hands it to the applier (or, `inline` and with the applier idle,
    /// applies it here); if it cannot be journaled, fails it here.
    fn submit_batch(
        &self,
        applier: &Applier,
        completer: &Completer,
        batch: &mut Vec<(u16, &Parsed)>,
        inline: bool,
    ) -> io::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        match self.journal_batch(&completer.mem, batch) {
            Ok((journaled, ops, requests)) => {
                // Without a write-back cache each write must be durable before it completes.
                let durable_first = !self.writeback.load(Ordering::Relaxed);
                let job = ApplyJob { journaled, ops, requests, durable_first, completer: completer.clone() };
                if inline && applier.pending.is_idle() {
                    job.run(&self.store);
                } else {
                    applier.hand_over(Job::Apply(job), &self.store);
                }
            }
            Err(e) => {
                log::error!("journaled write failed: {e}");
                for &(head, p) in batch.iter() {
                    completer.complete(head, Some(p.status), &Completion::ioerr())?;
                }
            }
        }
        batch.clear();
        Ok(())
    }

    /// Appends a batch's writes to the journal; returns the ticket, the ops and the requests.
    fn journal_batch(
        &self,
        mem: &GuestMemoryMmap,
        batch: &[(u16, &Parsed)],
    ) -> io::Result<(Journaled, Vec<BatchOp>, Vec<BatchRequest>)> {
        let mut ops = Vec::new();
        let mut requests = Vec::with_capacity(batch.len());
        for &(head, p) in batch {
            let mut bytes = 0;
            match &p.request {
                Request::Write { offset, buffers } => {
                    ops.push(BatchOp::Write { offset: *offset, data: host_slices(mem, buffers)? });
                    bytes = virtio_blk::total_len(buffers);
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
        // SAFETY: the caller holds the memory guard `mem` comes from.
        let journaled = unsafe { with_volume_ops(&ops, |volume_ops| self.store.journal(volume_ops)) };
        Ok((journaled.map_err(io::Error::other)?, ops, requests))
    }

    fn execute_one(&self, mem: &GuestMemoryMmap, request: &Request) -> Completion {
        match self.try_execute(mem, request) {
            Ok(completion) => completion,
            Err(e) => {
                log::warn!("request failed: {e}");
                Completion::ioerr()
            }
        }
    }

    fn try_execute(&self, mem: &GuestMemoryMmap, request: &Request) -> io::Result<Completion> {
        Ok(match request {
            Request::Read { offset, buffers } => {
                let slices = host_slices(mem, buffers)?;
                // SAFETY: the pass holds the memory guard `mem` comes from.
                unsafe { read_request(&self.store, &self.counters, self.store.read_fence(), *offset, &slices)? }
            }
            Request::Flush => {
                self.store.sync().map_err(io::Error::other)?;
                self.counters.flushes.fetch_add(1, Ordering::Relaxed);
                Completion::ok(0)
            }
            Request::GetId { buffers } => Completion::ok(copy_to_buffers(mem, &self.options.serial, buffers)?),
            Request::MarkerAdd { name } => {
                let name = crate::marker::validate_name(name).map_err(io::Error::other)?;
                let marker = self.store.add_marker(name, None, MarkerSource::Guest).map_err(io::Error::other)?;
                log::info!("guest marker {:?} at seq {}", marker.name, marker.seq);
                Completion::ok(0)
            }
            Request::MarkerGet { name, reply } => {
                let marker = match name {
                    Some(name) => {
                        let name = crate::marker::validate_name(name).map_err(io::Error::other)?;
                        self.store.marker(name).map_err(io::Error::other)?
                    }
                    None => self.store.newest_marker().ok_or_else(|| io::Error::other("there are no markers yet"))?,
                };
                let bytes = virtio_blk::encode_marker_reply(&marker.marker);
                if virtio_blk::total_len(reply) < bytes.len() as u64 {
                    return Err(io::Error::other(format!(
                        "MARKER_GET reply buffer smaller than {} bytes",
                        bytes.len()
                    )));
                }
                Completion::ok(copy_to_buffers(mem, &bytes, reply)?)
            }
            Request::Unsupported { request_type } => {
                log::debug!("unsupported request type {request_type}");
                Completion { status: STATUS_UNSUPP as u8, written: 0 }
            }
            Request::Write { .. } | Request::Discard { .. } | Request::WriteZeroes { .. } => {
                unreachable!("volume writes are batched")
            }
        })
    }
}

/// Copies `bytes` into the buffers, as far as they reach; returns the bytes copied.
fn copy_to_buffers(mem: &GuestMemoryMmap, bytes: &[u8], buffers: &[(GuestAddress, u32)]) -> io::Result<u32> {
    let mut done = 0;
    for &(addr, len) in buffers {
        let n = (bytes.len() - done).min(len as usize);
        mem.write_slice(&bytes[done..done + n], addr).map_err(|e| io::Error::other(e.to_string()))?;
        done += n;
    }
    Ok(done as u32)
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.options.num_queues
    }

    fn max_queue_size(&self) -> usize {
        self.options.queue_size
    }

    fn features(&self) -> u64 {
        let bits = [
            VIRTIO_F_VERSION_1,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_CONFIG_WCE,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_MQ,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
        ];
        let mut features = bits.iter().fold(0u64, |f, &bit| f | 1 << bit);
        if self.options.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        // Without CONFIG_WCE the cache mode follows FLUSH: a driver that cannot flush gets
        // write-through, so every write is durable when it completes.
        let flush = features & (1 << VIRTIO_BLK_F_FLUSH) != 0;
        self.writeback.store(flush, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn reset_device(&self) {
        self.writeback.store(true, Ordering::Relaxed);
        (0..self.broken.len()).for_each(|queue| self.mend_queue(queue, "the device was reset"));
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.config_space().to_bytes();
        let start = (offset as usize).min(bytes.len());
        let end = start.saturating_add(size as usize).min(bytes.len());
        let mut out = bytes[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // The writeback byte is the only field a driver may change.
        if offset as usize != virtio_blk::CONFIG_WRITEBACK_OFFSET || buf.len() != 1 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "only the writeback field is writable"));
        }
        let writeback = buf[0] != 0;
        log::info!("guest switched the cache to {}", if writeback { "write-back" } else { "write-through" });
        if !writeback {
            // Writes completed so far become durable now, as a write-through disk promises.
            self.store.sync().map_err(io::Error::other)?;
        }
        self.writeback.store(writeback, Ordering::Relaxed);
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        *self.memory.lock().unwrap_or_else(|p| p.into_inner()) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.options.num_queues).map(|q| 1u64 << q).collect()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // After GET_VRING_BASE the frontend owns the ring again: nothing may complete later.
        if let Some(applier) = self.appliers.get(queue_index as usize) {
            applier.quiesce();
        }
        self.mend_queue(queue_index as usize, "the frontend took the ring back (GET_VRING_BASE)");
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()?;
        let ours = notifier.try_clone().ok()?;
        self.exit_notifiers.lock().unwrap_or_else(|p| p.into_inner()).push(ours);
        Some((consumer, notifier))
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        // `vrings` are this thread's and `device_event` indexes them; thread N serves queue N
        // alone (queues_per_thread), so the queue is the thread's.
        let vring = vrings
            .get(device_event as usize)
            .filter(|_| device_event == 0 && thread < self.appliers.len())
            .ok_or_else(|| io::Error::other(format!("event {device_event} on thread {thread} names no queue")))?;
        self.process_queue(thread, vring)
    }
}
