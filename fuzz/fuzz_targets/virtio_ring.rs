//! Taking descriptor chains off a split virtqueue whose set-up and memory the guest chose
//! (`rewind::vhost_user::ring::pop_chains`), then parsing each chain as the daemon does. A pass
//! takes at most a queue's worth of chains, each ending in a descriptor without "next", and a
//! second pass over unchanged memory finds nothing new.

#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rewind::vhost_user::ring::pop_chains;
use rewind::virtio_blk::{parse, Limits};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap};

const REGION: usize = 64 << 10;
const REGIONS: [u64; 2] = [0, 2 * REGION as u64];
const SPAN: u64 = 4 * REGION as u64;

/// Guest memory as the daemon holds it: behind an atomic a frontend's messages replace.
fn memory() -> &'static GuestMemoryAtomic<GuestMemoryMmap> {
    static MEM: OnceLock<GuestMemoryAtomic<GuestMemoryMmap>> = OnceLock::new();
    MEM.get_or_init(|| {
        let regions = GuestMemoryMmap::from_ranges(&REGIONS.map(|start| (GuestAddress(start), REGION)));
        GuestMemoryAtomic::new(regions.expect("guest memory"))
    })
}

#[derive(Arbitrary, Debug)]
struct Descriptor {
    addr: u32,
    len: u32,
    flags: u16,
    next: u16,
}

#[derive(Arbitrary, Debug)]
enum Address {
    /// Near guest memory (so mostly inside it).
    Near(u32),
    Any(u64),
}

impl Address {
    fn get(&self) -> u64 {
        match *self {
            Self::Near(a) => u64::from(a) % SPAN,
            Self::Any(a) => a,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// log2 of the queue size (anything else the queue refuses), or a raw size.
    size_log2: u8,
    raw_size: Option<u16>,
    desc_table: Address,
    avail_ring: Address,
    used_ring: Address,
    next_avail: u16,
    event_idx: bool,
    descriptors: Vec<Descriptor>,
    avail_idx: u16,
    avail_entries: Vec<u16>,
    /// Other bytes of guest memory: request headers, payloads, indirect tables.
    writes: Vec<(u32, Vec<u8>)>,
}

fn le16(v: u16) -> [u8; 2] {
    v.to_le_bytes()
}

fuzz_target!(|input: Input| {
    let atomic = memory();
    let mem = &*atomic.memory();
    for start in REGIONS {
        mem.write_slice(&[0u8; REGION], GuestAddress(start)).expect("clearing guest memory");
    }
    for (addr, bytes) in &input.writes {
        let _ = mem.write_slice(&bytes[..bytes.len().min(REGION)], GuestAddress(u64::from(*addr) % SPAN));
    }
    let mut queue = Queue::new(256).expect("a queue of 256");
    queue.set_size(input.raw_size.unwrap_or(1 << (input.size_log2 % 9)));
    let (desc, avail, used) = (input.desc_table.get(), input.avail_ring.get(), input.used_ring.get());
    queue.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
    queue.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
    queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
    queue.set_event_idx(input.event_idx);
    queue.set_next_avail(input.next_avail);
    queue.set_ready(true);
    // The table and ring as the guest wrote them, where the queue says they are.
    for (i, d) in input.descriptors.iter().take(256).enumerate() {
        let mut bytes = [0u8; 16];
        bytes[0..8].copy_from_slice(&u64::from(d.addr).to_le_bytes());
        bytes[8..12].copy_from_slice(&d.len.to_le_bytes());
        bytes[12..14].copy_from_slice(&le16(d.flags));
        bytes[14..16].copy_from_slice(&le16(d.next));
        if let Some(at) = queue.desc_table().checked_add(16 * i as u64) {
            let _ = mem.write_slice(&bytes, GuestAddress(at));
        }
    }
    let avail_base = queue.avail_ring();
    if let Some(at) = avail_base.checked_add(2) {
        let _ = mem.write_slice(&le16(input.avail_idx), GuestAddress(at));
    }
    for (i, entry) in input.avail_entries.iter().take(256).enumerate() {
        let position = input.next_avail.wrapping_add(i as u16) % queue.size().max(1);
        if let Some(at) = avail_base.checked_add(4 + 2 * u64::from(position)) {
            let _ = mem.write_slice(&le16(*entry), GuestAddress(at));
        }
    }

    let size = queue.size();
    let before = queue.next_avail();
    let popped = pop_chains(&mut queue, atomic);
    assert!(popped.chains.len() <= usize::from(size), "{} chains from a queue of {size}", popped.chains.len());
    let taken = queue.next_avail().wrapping_sub(before);
    assert!(usize::from(taken) >= popped.chains.len(), "next_avail moved by {taken}");
    let limits = Limits {
        capacity_bytes: 1 << 30,
        seg_max: 126,
        max_transfer: 32 << 20,
        max_discard_sectors: 1 << 22,
        max_discard_segments: 1,
        read_only: false,
    };
    for (head, descs) in &popped.chains {
        assert!(*head < size, "head {head} outside a table of {size}");
        assert!(descs.last().is_some_and(|last| !last.has_next), "chain without an end");
        if let Ok(parsed) = parse(descs, mem, &limits) {
            assert!(mem.check_range(parsed.status, 1));
        }
    }
    if popped.fault.is_none() {
        let again = pop_chains(&mut queue, atomic);
        assert!(again.chains.is_empty() && again.fault.is_none(), "a second pass found more");
    }
});
