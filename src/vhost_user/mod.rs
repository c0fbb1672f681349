//! The vhost-user-blk device: features, config space and what a frontend's requests do to it
//! (answered in `connection`). The work is done a layer down, each concern in its module:
//!
//! - `pipeline`: a queue's worker, one pass over the ring at a time (batching, inline apply,
//!   read sharing and ring polling, each a named policy);
//! - `applier`: the queue's applier thread and its jobs (journaled batches to write to the
//!   volume, reads shared with the worker);
//! - `completion`: status bytes, the used ring, signalling, and the one mapping from a
//!   failure to a virtio status;
//! - `source`: the disk served, the live store or a point-in-time export, behind one type;
//! - `guest_memory`: host views of guest buffers, the only `unsafe` code here;
//! - `ring`: taking chains off the ring, treating it as untrusted input;
//! - `connection`: a frontend's vhost-user requests and its queues' worker threads;
//! - `inflight`: the shared region that lets a restarted backend resubmit unfinished requests.
//!
//! Parsing and validating a chain is `virtio_blk`'s (pure, no I/O). Each layer uses only those
//! below it: connection → mod → pipeline → applier → source → completion → guest_memory, ring,
//! inflight and counters.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::VringRwLock;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::virtio_blk::{self, ConfigSpace, Limits};

mod applier;
mod completion;
mod connection;
mod counters;
mod guest_memory;
// Public for the fuzz targets (fuzz/), not an API.
#[doc(hidden)]
pub mod inflight;
mod pipeline;
mod source;
// Public for the fuzz targets (fuzz/), not an API.
#[doc(hidden)]
pub mod ring;

pub use connection::Connection;
pub use counters::Counters;
use inflight::QueueTracker;
use pipeline::{BlkQueue, Device};
pub use source::BlockSource;

/// Data descriptors per request: Linux's default for a 256-entry queue, less header and status.
pub const SEG_MAX: u32 = 126;
const MAX_TRANSFER: u64 = 32 << 20;
const MAX_DISCARD_SECTORS: u32 = 1 << 22;

#[derive(Debug, Clone)]
pub struct BlkOptions {
    pub num_queues: usize,
    pub queue_size: usize,
    pub serial: [u8; virtio_blk::ID_BYTES],
    pub read_only: bool,
}

pub struct BlkBackend {
    device: Device,
    options: BlkOptions,
    /// One per queue.
    queues: Vec<BlkQueue>,
    pub counters: Arc<Counters>,
    /// Whether a frontend is connected now.
    pub connected: AtomicBool,
}

impl BlkBackend {
    pub fn new(source: BlockSource, options: BlkOptions) -> Self {
        let limits = Limits {
            capacity_bytes: source.volume_size(),
            seg_max: SEG_MAX,
            max_transfer: MAX_TRANSFER,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_discard_segments: 1,
            read_only: options.read_only,
        };
        let queues = (0..options.num_queues).map(|q| BlkQueue::new(q, source.clone())).collect();
        let counters: Arc<Counters> = Arc::default();
        let device = Device {
            source,
            counters: Arc::clone(&counters),
            limits,
            serial: options.serial,
            memory: Mutex::new(None),
            event_idx: AtomicBool::new(false),
            writeback: AtomicBool::new(true),
            finishing: AtomicBool::new(false),
        };
        Self { device, options, queues, counters, connected: AtomicBool::new(false) }
    }

    pub fn options(&self) -> &BlkOptions {
        &self.options
    }

    /// The largest inflight region a frontend may ask for: (queues, entries per queue).
    fn queue_limits(&self) -> (usize, usize) {
        (self.options.num_queues, self.options.queue_size)
    }

    /// Ends what belonged to a frontend's connection: its queues, broken or not, are set up
    /// afresh by the next frontend.
    fn disconnected(&self) {
        self.queues.iter().for_each(|queue| queue.mend(&self.counters, "the frontend disconnected"));
    }

    /// For a clean exit: no queue takes another request off its ring, and every request taken
    /// completes before this returns. The frontend finds nothing in flight when it reconnects
    /// to the next daemon.
    pub fn finish_in_flight(&self) {
        self.device.finishing.store(true, Ordering::SeqCst);
        self.queues.iter().for_each(BlkQueue::quiesce);
    }

    fn config_space(&self) -> ConfigSpace {
        ConfigSpace {
            capacity_sectors: self.device.source.volume_size() / crate::store::SECTOR_SIZE,
            seg_max: SEG_MAX,
            blk_size: crate::store::SECTOR_SIZE as u32,
            physical_block_size: 4096,
            writeback: self.device.writeback.load(Ordering::Relaxed),
            num_queues: self.options.num_queues as u16,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_discard_segments: 1,
        }
    }
}

impl BlkBackend {
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

    fn set_features(&self, features: u64) {
        // Without CONFIG_WCE the cache mode follows FLUSH: a driver that cannot flush gets
        // write-through, so every write is durable when it completes.
        let flush = features & (1 << VIRTIO_BLK_F_FLUSH) != 0;
        self.device.writeback.store(flush, Ordering::Relaxed);
        self.device.event_idx.store(features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    fn reset_device(&self) {
        self.device.writeback.store(true, Ordering::Relaxed);
        self.queues.iter().for_each(|queue| queue.mend(&self.counters, "the device was reset"));
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
            self.device.source.sync().map_err(io::Error::other)?;
        }
        self.device.writeback.store(writeback, Ordering::Relaxed);
        Ok(())
    }

    fn set_memory(&self, memory: GuestMemoryAtomic<GuestMemoryMmap>) {
        *self.device.memory.lock().unwrap_or_else(|p| p.into_inner()) = Some(memory);
    }

    /// A queue starts (its ring is set up and kicked), tracked in an inflight region or not;
    /// the chains to resubmit run before anything new.
    fn start_queue(&self, index: usize, tracking: Option<(Arc<QueueTracker>, Vec<u16>)>) {
        if let Some(queue) = self.queues.get(index) {
            queue.start(tracking);
        }
    }

    /// After GET_VRING_BASE, or when the frontend goes, the frontend owns the ring again:
    /// nothing may complete later.
    fn stop_queue(&self, index: usize) {
        if let Some(queue) = self.queues.get(index) {
            queue.quiesce();
            queue.stop();
            queue.mend(&self.counters, "the frontend took the ring back");
        }
    }

    fn process_queue(&self, index: usize, vring: &VringRwLock) -> io::Result<()> {
        match self.queues.get(index) {
            Some(queue) => queue.process(&self.device, vring),
            None => Err(io::Error::other(format!("there is no queue {index}"))),
        }
    }
}
