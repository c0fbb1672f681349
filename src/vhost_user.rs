//! The vhost-user-blk glue: features, config space and the virtqueue loop. Each kick's requests
//! are parsed (virtio_blk), then executed against the store: consecutive writes go to the
//! journal as one batch (one journal write), reads go straight to the volume, FLUSH syncs the
//! journal, and every request completes with a status.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

use crate::marker::MarkerSource;
use crate::store::{Store, VolumeOp};
use crate::virtio_blk::{self, ConfigSpace, Desc, Limits, Parsed, Request, STATUS_IOERR, STATUS_OK, STATUS_UNSUPP};

/// Data descriptors per request: Linux's default for a 256-entry queue, less header and status.
pub const SEG_MAX: u32 = 126;
const MAX_TRANSFER: u64 = 32 << 20;
const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// A queue pass's writes go to the journal in batches of about this many bytes.
const BATCH_BYTES: u64 = 256 << 10;

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
    pub counters: Counters,
    /// Whether a frontend is connected now.
    pub connected: AtomicBool,
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

/// Host views of guest buffers. The pointers stay valid while the memory guard they came from
/// is alive, which is the whole of one queue pass.
fn host_slices(mem: &GuestMemoryMmap, buffers: &[(GuestAddress, u32)]) -> io::Result<Vec<(*mut u8, usize)>> {
    let mut out = Vec::with_capacity(buffers.len());
    for &(addr, len) in buffers {
        for slice in mem.get_slices(addr, len as usize) {
            let slice = slice.map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
            out.push((slice.ptr_guard_mut().as_ptr(), slice.len()));
        }
    }
    Ok(out)
}

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
        Self {
            store,
            options,
            limits,
            memory: Mutex::new(None),
            event_idx: AtomicBool::new(false),
            writeback: AtomicBool::new(true),
            exit_notifiers: Mutex::new(Vec::new()),
            counters: Counters::default(),
            connected: AtomicBool::new(false),
        }
    }

    pub fn options(&self) -> &BlkOptions {
        &self.options
    }

    /// Tells the worker threads of the current connection to exit (after their current pass).
    pub fn stop_workers(&self) {
        for notifier in self.exit_notifiers.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            let _ = notifier.notify();
        }
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

    fn process_queue(&self, vring: &VringRwLock) -> io::Result<()> {
        let memory = self.memory.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(memory) = memory else { return Ok(()) };
        let queue_error = |e: virtio_queue::Error| io::Error::other(e.to_string());
        loop {
            // A fresh view each pass: the frontend may add memory regions (ADD_MEM_REG) while
            // this loop runs, and requests may use them as soon as it has its reply.
            let mem = memory.memory();
            let event_idx = self.event_idx.load(Ordering::Relaxed);
            if event_idx {
                vring.disable_notification().map_err(queue_error)?;
            }
            let chains: Vec<(u16, Vec<Desc>)> = {
                let mut state = vring.get_mut();
                let queue = state.get_queue_mut();
                let mut chains = Vec::new();
                while let Some(chain) = queue.pop_descriptor_chain(mem.clone()) {
                    let head = chain.head_index();
                    let descs = chain
                        .map(|d| Desc {
                            addr: d.addr(),
                            len: d.len(),
                            write_only: d.is_write_only(),
                            has_next: d.has_next(),
                        })
                        .collect();
                    chains.push((head, descs));
                }
                chains
            };
            let parsed: Vec<Result<Parsed, virtio_blk::RequestError>> =
                chains.iter().map(|(_, descs)| virtio_blk::parse(descs, &mem, &self.limits)).collect();
            // Each request is completed as soon as its own I/O is done, so the driver can
            // refill the queue while the rest of the pass runs.
            let mut complete = |i: usize, completion: Completion| -> io::Result<()> {
                let used = match &parsed[i] {
                    Ok(p) => self.finish(&mem, p.status, &completion),
                    Err(e) => {
                        log::warn!("refused a request: {e}");
                        self.counters.errors.fetch_add(1, Ordering::Relaxed);
                        e.status.map_or(0, |status| self.finish(&mem, status, &completion))
                    }
                };
                vring.add_used(chains[i].0, used).map_err(queue_error)?;
                if !event_idx || vring.needs_notification().map_err(queue_error)? {
                    vring.signal_used_queue()?;
                }
                Ok(())
            };
            self.execute(&mem, &parsed, &mut complete)?;
            if !event_idx || !vring.enable_notification().map_err(queue_error)? {
                return Ok(());
            }
        }
    }

    /// Writes the status byte; returns the used length to report.
    fn finish(&self, mem: &GuestMemoryMmap, status: GuestAddress, completion: &Completion) -> u32 {
        if completion.status != STATUS_OK as u8 {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        match mem.write_obj(completion.status, status) {
            Ok(()) => completion.written + 1,
            Err(e) => {
                log::warn!("cannot write a request status: {e}");
                0
            }
        }
    }

    /// Executes the parsed requests of one pass, in order, batching consecutive volume writes
    /// into one journal append, and hands each result to `complete` as soon as it is known.
    fn execute(
        &self,
        mem: &GuestMemoryMmap,
        parsed: &[Result<Parsed, virtio_blk::RequestError>],
        complete: &mut dyn FnMut(usize, Completion) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut batch: Vec<usize> = Vec::new();
        let mut batch_bytes = 0;
        for (i, result) in parsed.iter().enumerate() {
            let Ok(p) = result else {
                complete(i, Completion::ioerr())?;
                continue;
            };
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            if matches!(p.request, Request::Write { .. } | Request::Discard { .. } | Request::WriteZeroes { .. }) {
                batch.push(i);
                if let Request::Write { buffers, .. } = &p.request {
                    batch_bytes += virtio_blk::total_len(buffers);
                }
                // Small writes share one journal append; large ones gain nothing from waiting
                // for each other, and their completions would be held back.
                if batch_bytes >= BATCH_BYTES {
                    self.submit_batch(mem, parsed, &mut batch, complete)?;
                    batch_bytes = 0;
                }
                continue;
            }
            // Everything else is ordered after the writes before it.
            self.submit_batch(mem, parsed, &mut batch, complete)?;
            batch_bytes = 0;
            complete(i, self.execute_one(mem, &p.request))?;
        }
        self.submit_batch(mem, parsed, &mut batch, complete)
    }

    fn submit_batch(
        &self,
        mem: &GuestMemoryMmap,
        parsed: &[Result<Parsed, virtio_blk::RequestError>],
        batch: &mut Vec<usize>,
        complete: &mut dyn FnMut(usize, Completion) -> io::Result<()>,
    ) -> io::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let outcome =
            self.write_batch(mem, batch.iter().map(|&i| &parsed[i].as_ref().expect("batched requests parsed").request));
        let ok = match outcome {
            Ok(bytes) => {
                self.counters.bytes_written.fetch_add(bytes, Ordering::Relaxed);
                true
            }
            Err(e) => {
                log::error!("journaled write failed: {e}");
                false
            }
        };
        for i in batch.drain(..) {
            complete(i, if ok { Completion::ok(0) } else { Completion::ioerr() })?;
        }
        Ok(())
    }

    fn write_batch<'r>(&self, mem: &GuestMemoryMmap, requests: impl Iterator<Item = &'r Request>) -> io::Result<u64> {
        let mut pieces: Vec<Vec<&[u8]>> = Vec::new();
        let mut shapes: Vec<(u64, Option<u64>, bool)> = Vec::new();
        let mut bytes = 0;
        for request in requests {
            match request {
                Request::Write { offset, buffers } => {
                    let slices = host_slices(mem, buffers)?
                        .into_iter()
                        // SAFETY: the guest memory mapping outlives this call (the caller holds the
                        // memory guard); the guest may change the bytes meanwhile, as with any
                        // device doing DMA, which only affects what it gets written.
                        .map(|(ptr, len)| unsafe { std::slice::from_raw_parts(ptr as *const u8, len) })
                        .collect();
                    pieces.push(slices);
                    shapes.push((*offset, None, false));
                    bytes += virtio_blk::total_len(buffers);
                }
                Request::Discard { ranges } => ranges.iter().for_each(|&(o, l)| shapes.push((o, Some(l), true))),
                Request::WriteZeroes { ranges, .. } => {
                    ranges.iter().for_each(|&(o, l)| shapes.push((o, Some(l), false)))
                }
                _ => unreachable!("only volume writes are batched"),
            }
        }
        let mut data = pieces.iter();
        let ops: Vec<VolumeOp<'_>> = shapes
            .iter()
            .map(|&(offset, len, discard)| match (len, discard) {
                (None, _) => VolumeOp::Write { offset, data: data.next().expect("one data list per write") },
                (Some(len), true) => VolumeOp::Discard { offset, len },
                (Some(len), false) => VolumeOp::WriteZeroes { offset, len },
            })
            .collect();
        self.store.submit(&ops).map_err(io::Error::other)?;
        // Without a write-back cache each write must be durable before it completes.
        if !self.writeback.load(Ordering::Relaxed) {
            self.store.sync().map_err(io::Error::other)?;
        }
        Ok(bytes)
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
                let mut at = *offset;
                for (ptr, len) in host_slices(mem, buffers)? {
                    // SAFETY: as in write_batch; the buffer is device-writable guest memory.
                    let buf = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
                    self.store.read(at, buf).map_err(io::Error::other)?;
                    at += len as u64;
                }
                let len = at - offset;
                self.counters.bytes_read.fetch_add(len, Ordering::Relaxed);
                Completion::ok(len as u32)
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
        _thread: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        let vring = vrings
            .get(device_event as usize)
            .ok_or_else(|| io::Error::other(format!("event for unknown queue {device_event}")))?;
        self.process_queue(vring)
    }
}
