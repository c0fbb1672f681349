//! The virtio-blk request parser over an arbitrary descriptor chain in guest memory of two
//! regions with a hole between them. On success the request must respect every limit: buffers
//! in guest memory, lengths and counts within the limits, ranges inside the disk.

#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rewind::virtio_blk::{parse, total_len, Desc, Limits, Request};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const REGION: usize = 64 << 10;
/// Guest memory: [0, 64 KiB) and [128 KiB, 192 KiB).
const REGIONS: [u64; 2] = [0, 2 * REGION as u64];

fn memory() -> &'static GuestMemoryMmap {
    static MEM: OnceLock<GuestMemoryMmap> = OnceLock::new();
    MEM.get_or_init(|| {
        GuestMemoryMmap::from_ranges(&REGIONS.map(|start| (GuestAddress(start), REGION))).expect("guest memory")
    })
}

#[derive(Arbitrary, Debug)]
struct FuzzLimits {
    capacity_sectors: u32,
    huge_capacity: bool,
    seg_max: u8,
    max_transfer_sectors: u16,
    max_discard_sectors: u32,
    max_discard_segments: u8,
    read_only: bool,
}

#[derive(Arbitrary, Debug)]
struct FuzzDesc {
    /// Mostly inside or near guest memory; `far` places it anywhere.
    addr: u32,
    far: Option<u64>,
    len: u32,
    write_only: bool,
    has_next: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    limits: FuzzLimits,
    descs: Vec<FuzzDesc>,
    /// Bytes written at guest addresses (in order, each at its own address).
    writes: Vec<(u32, Vec<u8>)>,
}

fn limits(l: &FuzzLimits) -> Limits {
    Limits {
        capacity_bytes: if l.huge_capacity { u64::MAX - 511 } else { u64::from(l.capacity_sectors) * 512 },
        seg_max: u32::from(l.seg_max),
        max_transfer: u64::from(l.max_transfer_sectors) * 512,
        max_discard_sectors: l.max_discard_sectors,
        max_discard_segments: u32::from(l.max_discard_segments),
        read_only: l.read_only,
    }
}

fn in_memory(mem: &GuestMemoryMmap, (addr, len): (GuestAddress, u32)) -> bool {
    mem.check_range(addr, len as usize)
}

fn within(offset: u64, len: u64, capacity: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= capacity)
}

fuzz_target!(|input: Input| {
    let mem = memory();
    for start in REGIONS {
        mem.write_slice(&[0u8; REGION], GuestAddress(start)).expect("clearing guest memory");
    }
    for (addr, bytes) in &input.writes {
        // Writes that leave guest memory are cut short, as a guest's could never be.
        let addr = u64::from(*addr) % (3 * REGION as u64);
        let _ = mem.write_slice(&bytes[..bytes.len().min(REGION)], GuestAddress(addr));
    }
    let limits = limits(&input.limits);
    let descs: Vec<Desc> = input
        .descs
        .iter()
        .take(1024)
        .map(|d| Desc {
            addr: GuestAddress(d.far.unwrap_or(u64::from(d.addr) % (4 * REGION as u64))),
            len: d.len,
            write_only: d.write_only,
            has_next: d.has_next,
        })
        .collect();
    let Ok(parsed) = parse(&descs, mem, &limits) else { return };
    assert!(mem.check_range(parsed.status, 1), "status byte outside guest memory");
    let data_descs = descs.len() - 2;
    assert!(data_descs <= limits.seg_max as usize, "more data descriptors than seg_max");
    match &parsed.request {
        Request::Read { offset, buffers } | Request::Write { offset, buffers } => {
            let len = total_len(buffers);
            assert!(buffers.iter().all(|&b| in_memory(mem, b)), "buffer outside guest memory");
            assert!(len > 0 && len % 512 == 0 && offset % 512 == 0, "unaligned transfer {offset}+{len}");
            assert!(len <= limits.max_transfer, "transfer of {len} over the limit");
            assert!(within(*offset, len, limits.capacity_bytes), "transfer {offset}+{len} past the disk");
            assert!(
                !(limits.read_only && matches!(parsed.request, Request::Write { .. })),
                "write on a read-only disk"
            );
        }
        Request::GetId { buffers } => assert!(buffers.iter().all(|&b| in_memory(mem, b))),
        Request::Discard { ranges } | Request::WriteZeroes { ranges, .. } => {
            assert!(!limits.read_only, "discard on a read-only disk");
            assert!(!ranges.is_empty() && ranges.len() <= limits.max_discard_segments as usize);
            for &(offset, len) in ranges {
                assert!(len > 0 && len <= u64::from(limits.max_discard_sectors) * 512, "range of {len} bytes");
                assert!(offset % 512 == 0 && within(offset, len, limits.capacity_bytes), "range {offset}+{len}");
            }
        }
        Request::MarkerAdd { name } => assert!(name.len() <= 64 << 10),
        Request::MarkerGet { name, reply } => {
            assert!(name.as_ref().is_none_or(|n| n.len() <= 64 << 10));
            assert!(!reply.is_empty() && reply.iter().all(|&b| in_memory(mem, b)), "reply buffer");
        }
        Request::Flush | Request::Unsupported { .. } => {}
    }
});
