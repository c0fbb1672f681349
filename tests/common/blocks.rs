//! Blocks that name the write that left them, and a libblkio frontend that keeps several in
//! flight: for tests that must tell after a crash or a fault which write each block holds.

use std::path::Path;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

use super::Rng;

pub const BLOCK: u64 = 4096;
/// Requests in flight at most (each with its own buffer slot).
pub const DEPTH: usize = 16;
/// user_data of a FLUSH; writes use their slot index.
pub const FLUSH: usize = usize::MAX;

/// The bytes of block `block` as write `id` leaves them: the id, the block, then filler that
/// depends on both, so a torn or misplaced block never passes for a whole one.
pub fn block_bytes(id: u64, block: u64) -> Vec<u8> {
    let mut rng = Rng(id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ block.wrapping_add(1));
    let mut bytes = rng.bytes(BLOCK as usize);
    bytes[0..8].copy_from_slice(&id.to_le_bytes());
    bytes[8..16].copy_from_slice(&block.to_le_bytes());
    bytes
}

/// Which write a block holds: 0 for never written, None when it is no whole write at all.
pub fn write_in(bytes: &[u8], block: u64) -> Option<u64> {
    if bytes.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let id = u64::from_le_bytes(bytes[0..8].try_into().unwrap());
    (id != 0 && bytes == block_bytes(id, block)).then_some(id)
}

/// One queue, `DEPTH` buffer slots of a block each.
pub struct Frontend {
    /// Owns the connection the queue uses.
    _blkio: Blkio,
    pub queue: Blkioq,
    region: MemoryRegion,
}

impl Frontend {
    pub fn connect(socket: &Path) -> Self {
        let mut blkio = Blkio::new("virtio-blk-vhost-user").unwrap();
        blkio.set_str("path", socket.to_str().unwrap()).unwrap();
        blkio.connect().unwrap();
        blkio.set_i32("num-queues", 1).unwrap();
        let region = blkio.alloc_mem_region(DEPTH * BLOCK as usize).unwrap();
        let mut outcome = blkio.start().unwrap();
        blkio.map_mem_region(&region).unwrap();
        Self { queue: outcome.queues.remove(0), _blkio: blkio, region }
    }

    pub fn slot(&self, slot: usize) -> *mut u8 {
        (self.region.addr + slot * BLOCK as usize) as *mut u8
    }

    /// Starts write `id` of `block` from buffer `slot` (which no request may be using).
    pub fn start_write(&mut self, slot: usize, block: u64, id: u64) {
        let bytes = block_bytes(id, block);
        // SAFETY: the slot's buffer is ours while no request uses it.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.slot(slot), bytes.len()) };
        self.queue.write(block * BLOCK, self.slot(slot), BLOCK as usize, slot, ReqFlags::empty());
    }

    /// Completions within `wait`, or None when the daemon is gone (an error or silence).
    pub fn complete(&mut self, min: usize, wait: Duration) -> Option<Vec<(usize, i32)>> {
        let mut completions: Vec<std::mem::MaybeUninit<Completion>> =
            (0..DEPTH + 1).map(|_| std::mem::MaybeUninit::uninit()).collect();
        let mut timeout = wait;
        let n = self.queue.do_io(&mut completions, min, Some(&mut timeout), None).ok()?;
        if n < min {
            return None;
        }
        // SAFETY: do_io initialised the first n entries.
        Some(completions[..n].iter().map(|c| unsafe { c.assume_init_ref() }).map(|c| (c.user_data, c.ret)).collect())
    }

    /// One request alone: its result.
    fn only(&mut self) -> i32 {
        self.complete(1, Duration::from_secs(30)).expect("the request completes")[0].1
    }

    /// Write `id` of `block`, alone: its result.
    pub fn write(&mut self, block: u64, id: u64) -> i32 {
        self.start_write(0, block, id);
        self.only()
    }

    pub fn flush(&mut self) -> i32 {
        self.queue.flush(FLUSH, ReqFlags::empty());
        self.only()
    }

    /// Reads `block` alone: the result and the bytes.
    pub fn read(&mut self, block: u64) -> (i32, Vec<u8>) {
        self.queue.read(block * BLOCK, self.slot(0), BLOCK as usize, 0, ReqFlags::empty());
        let ret = self.only();
        // SAFETY: the region is ours and the read has completed.
        (ret, unsafe { std::slice::from_raw_parts(self.slot(0), BLOCK as usize) }.to_vec())
    }

    /// Reads the first `blocks` blocks (nothing else in flight).
    pub fn read_all(&mut self, blocks: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity((blocks * BLOCK) as usize);
        for block in 0..blocks {
            let (ret, bytes) = self.read(block);
            assert_eq!(ret, 0, "read of block {block}");
            out.extend_from_slice(&bytes);
        }
        out
    }
}
