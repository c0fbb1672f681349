//! Taking descriptor chains off a split virtqueue, with the ring itself treated as untrusted
//! guest input. The guest driver writes the available index, the ring entries and the
//! descriptors; a state no correct driver can produce (the index jumping by more than the
//! queue size, a head or a chain outside the table, a loop, ring memory outside guest memory)
//! is a [`RingFault`]. The queue is then broken, as the virtio spec's DEVICE_NEEDS_RESET
//! intends, rather than retried: retrying an impossible state is what turns into a spinning
//! daemon.

use std::num::Wrapping;

use std::sync::atomic::Ordering;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryLoadGuard,
    GuestMemoryMmap,
};

use crate::virtio_blk::Desc;

/// Bytes of a split ring's parts, per the virtio spec (flags, index, entries, event field).
const DESC_BYTES: u64 = 16;
const AVAIL_BYTES: (u64, u64) = (6, 2);
const USED_BYTES: (u64, u64) = (6, 8);

/// Why a queue cannot be served until the driver sets it up again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingFault {
    #[error("its {part} ({len} bytes at guest address {addr:#x}) is not all in guest memory")]
    Unmapped { part: &'static str, addr: u64, len: u64 },
    #[error(
        "the available index {avail} is {} entries ahead of the next entry {next_avail}, more than the queue size {size}",
        avail.wrapping_sub(*next_avail)
    )]
    AvailJump { avail: u16, next_avail: u16, size: u16 },
    #[error("available entry {position} names descriptor {head}, outside a table of {size}")]
    HeadOutOfRange { position: u16, head: u16, size: u16 },
    #[error(
        "the chain at descriptor {head} loops, runs past the queue size {size}, names a descriptor outside the \
         table or has an unusable indirect table"
    )]
    BadChain { head: u16, size: u16 },
}

/// What one look at the available ring found: the chains before any fault, then the fault,
/// and the guest memory the chains are to be read in.
pub struct Popped {
    /// Each chain's head index and descriptors, in ring order.
    pub chains: Vec<(u16, Vec<Desc>)>,
    pub fault: Option<RingFault>,
    pub mem: GuestMemoryLoadGuard<GuestMemoryMmap>,
}

/// Takes every chain the driver had made available when the available index was read. A queue
/// that is not set up (stopped by GET_VRING_BASE, or not yet started) yields nothing.
///
/// The guest memory the chains are read in is loaded after the index: a driver may add a
/// memory region (ADD_MEM_REG) and, once acknowledged, make requests available that use it, so
/// a view loaded before the index was read could lack the region those requests point into.
/// Entries made available after the index was read wait for the next look.
pub fn pop_chains(queue: &mut Queue, memory: &GuestMemoryAtomic<GuestMemoryMmap>) -> Popped {
    let mut popped = Popped { chains: Vec::new(), fault: None, mem: memory.memory() };
    if !queue.ready() {
        return popped;
    }
    let size = queue.size();
    if let Err(fault) = check_ring_memory(queue, &popped.mem) {
        popped.fault = Some(fault);
        return popped;
    }
    let next_avail = queue.next_avail();
    let avail = match queue.avail_idx(&*popped.mem, Ordering::Acquire) {
        Ok(avail) => avail.0,
        // The ring was checked to be in guest memory just now.
        Err(_) => return popped,
    };
    let available = (Wrapping(avail) - Wrapping(next_avail)).0;
    if available > size {
        popped.fault = Some(RingFault::AvailJump { avail, next_avail, size });
        return popped;
    }
    popped.mem = memory.memory();
    // A region may also have been removed meanwhile.
    if let Err(fault) = check_ring_memory(queue, &popped.mem) {
        popped.fault = Some(fault);
        return popped;
    }
    let mem = popped.mem.clone();
    let chains = match queue.iter(mem) {
        Ok(chains) => chains,
        // Only a driver that moved the index between the two reads gets here.
        Err(_) => {
            let avail = queue.avail_idx(&*popped.mem, Ordering::Acquire).map_or(avail, |a| a.0);
            popped.fault = Some(RingFault::AvailJump { avail, next_avail, size });
            return popped;
        }
    };
    for (taken, chain) in chains.take(usize::from(available)).enumerate() {
        let head = chain.head_index();
        let position = next_avail.wrapping_add(taken as u16);
        if head >= size {
            popped.fault = Some(RingFault::HeadOutOfRange { position, head, size });
            break;
        }
        let descs: Vec<Desc> = chain.map(|d| desc(&d)).collect();
        // The chain iterator stops early, on a descriptor that still says "next", when the
        // chain loops or leaves the table; it yields nothing for an unusable indirect table.
        if descs.last().is_none_or(|last| last.has_next) {
            popped.fault = Some(RingFault::BadChain { head, size });
            break;
        }
        popped.chains.push((head, descs));
    }
    popped
}

/// The chains at `heads` of the descriptor table, for requests a previous backend took off the
/// ring and did not complete (their heads come from the inflight region). They are walked here,
/// not by virtio-queue, which only walks chains from the available ring, under the same rules:
/// a loop, an index outside the table, a nested or unusable indirect table is a fault.
pub fn chains_at(queue: &Queue, memory: &GuestMemoryAtomic<GuestMemoryMmap>, heads: &[u16]) -> Popped {
    let mut popped = Popped { chains: Vec::new(), fault: None, mem: memory.memory() };
    if let Err(fault) = check_ring_memory(queue, &popped.mem) {
        popped.fault = Some(fault);
        return popped;
    }
    for &head in heads {
        match chain_at(queue, &popped.mem, head) {
            Some(descs) => popped.chains.push((head, descs)),
            None => {
                popped.fault = Some(RingFault::BadChain { head, size: queue.size() });
                break;
            }
        }
    }
    popped
}

/// What parsing needs of a descriptor.
fn desc(d: &Descriptor) -> Desc {
    Desc { addr: d.addr(), len: d.len(), write_only: d.is_write_only(), has_next: d.has_next() }
}

fn chain_at(queue: &Queue, mem: &GuestMemoryMmap, head: u16) -> Option<Vec<Desc>> {
    let mut table = queue.desc_table();
    let mut table_len = queue.size();
    // Descriptors left before the chain is too long to be anything but a loop.
    let mut budget = table_len;
    let mut index = head;
    let mut indirect = false;
    let mut descs = Vec::new();
    loop {
        if index >= table_len || budget == 0 {
            return None;
        }
        budget -= 1;
        let at = table.checked_add(u64::from(index) * DESC_BYTES)?;
        let desc: Descriptor = mem.read_obj(GuestAddress(at)).ok()?;
        if desc.refers_to_indirect_table() {
            let entries = u64::from(desc.len()) / DESC_BYTES;
            if indirect || u64::from(desc.len()) % DESC_BYTES != 0 || entries == 0 || entries > u64::from(u16::MAX) {
                return None;
            }
            indirect = true;
            table = desc.addr().0;
            table_len = entries as u16;
            budget = table_len;
            index = 0;
            continue;
        }
        descs.push(self::desc(&desc));
        if !desc.has_next() {
            return Some(descs);
        }
        index = desc.next();
    }
}

/// Checks that the descriptor table and both rings lie in guest memory, so that no read of
/// them can fail part-way through a pass (and the crate never logs such a failure itself).
fn check_ring_memory(queue: &Queue, mem: &GuestMemoryMmap) -> Result<(), RingFault> {
    let entries = u64::from(queue.size());
    let parts = [
        ("descriptor table", queue.desc_table(), DESC_BYTES * entries),
        ("available ring", queue.avail_ring(), AVAIL_BYTES.0 + AVAIL_BYTES.1 * entries),
        ("used ring", queue.used_ring(), USED_BYTES.0 + USED_BYTES.1 * entries),
    ];
    for (part, addr, len) in parts {
        if !mem.check_range(GuestAddress(addr), len as usize) {
            return Err(RingFault::Unmapped { part, addr, len });
        }
    }
    Ok(())
}
