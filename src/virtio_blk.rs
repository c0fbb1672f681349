//! The virtio-blk request layer: turning a descriptor chain into a validated request, before
//! any I/O. Parsing is a pure function of the descriptors and the guest memory they point to,
//! so it is tested (and can be fuzzed) on its own. Also the device's config space.
//!
//! Vendor request types (docs/virtio.md): `MARKER_ADD` records a guest marker, `MARKER_GET`
//! reads one back, GET_ID-style.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::store::SECTOR_SIZE;

pub use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR as STATUS_IOERR, VIRTIO_BLK_S_OK as STATUS_OK, VIRTIO_BLK_S_UNSUPP as STATUS_UNSUPP,
};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};

/// "RW" in the top half: far from every type the virtio spec defines (all below 0x100).
pub const VIRTIO_BLK_T_REWIND_MARKER_ADD: u32 = 0x5257_0001;
pub const VIRTIO_BLK_T_REWIND_MARKER_GET: u32 = 0x5257_0002;
pub const ID_BYTES: usize = 20;
const HEADER_LEN: u32 = 16;
const DISCARD_SEGMENT_LEN: u32 = 16;
const WRITE_ZEROES_UNMAP: u32 = 1;

/// Limits advertised in the config space and enforced on every request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub capacity_bytes: u64,
    /// Most data descriptors in one request.
    pub seg_max: u32,
    /// Most bytes in one read or write.
    pub max_transfer: u64,
    pub max_discard_sectors: u32,
    pub max_discard_segments: u32,
    pub read_only: bool,
}

/// One descriptor of a chain, as the device sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    pub addr: GuestAddress,
    pub len: u32,
    pub write_only: bool,
    /// Set on the last descriptor of a chain that was cut short: it loops, or runs past the
    /// queue size.
    pub has_next: bool,
}

/// Buffers in guest memory, in order.
pub type Buffers = Vec<(GuestAddress, u32)>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Read {
        offset: u64,
        buffers: Buffers,
    },
    Write {
        offset: u64,
        buffers: Buffers,
    },
    Flush,
    GetId {
        buffers: Buffers,
    },
    /// Ranges (byte offset, byte length) to discard or zero.
    Discard {
        ranges: Vec<(u64, u64)>,
    },
    WriteZeroes {
        ranges: Vec<(u64, u64)>,
        unmap: bool,
    },
    MarkerAdd {
        name: Vec<u8>,
    },
    MarkerGet {
        name: Option<Vec<u8>>,
        reply: Buffers,
    },
    Unsupported {
        request_type: u32,
    },
}

/// A parsed chain: the request and where its status byte goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub request: Request,
    pub status: GuestAddress,
}

/// Why a chain was refused. `status` says where to report IOERR, when the chain has a usable
/// status descriptor at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct RequestError {
    pub status: Option<GuestAddress>,
    pub reason: String,
}

pub fn total_len(buffers: &[(GuestAddress, u32)]) -> u64 {
    buffers.iter().map(|b| b.1 as u64).sum()
}

/// Validates `descs` (the whole chain, in order) and reads the request out of guest memory.
pub fn parse(descs: &[Desc], mem: &GuestMemoryMmap, limits: &Limits) -> Result<Parsed, RequestError> {
    let fail = |status: Option<GuestAddress>, reason: String| RequestError { status, reason };
    let (last, rest) = descs.split_last().ok_or_else(|| fail(None, "empty chain".into()))?;
    if last.has_next {
        return Err(fail(None, "the descriptor chain loops or is longer than the queue".into()));
    }
    if !last.write_only || last.len < 1 || !mem.check_range(last.addr, 1) {
        return Err(fail(None, "no writable status byte at the end of the chain".into()));
    }
    let status = Some(last.addr);
    let (header_desc, data) = rest.split_first().ok_or_else(|| fail(status, "no request header".into()))?;
    if header_desc.write_only || header_desc.len < HEADER_LEN {
        return Err(fail(status, "request header is not a readable 16-byte buffer".into()));
    }
    let mut header = [0u8; HEADER_LEN as usize];
    mem.read_slice(&mut header, header_desc.addr)
        .map_err(|e| fail(status, format!("request header unreadable: {e}")))?;
    let request_type = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    if data.len() > limits.seg_max as usize {
        return Err(fail(status, format!("{} data segments, at most {} allowed", data.len(), limits.seg_max)));
    }
    for d in data {
        if !mem.check_range(d.addr, d.len as usize) {
            return Err(fail(status, format!("buffer {:#x}+{} is outside guest memory", d.addr.0, d.len)));
        }
    }
    let buffers = |write_only: bool| -> Result<Buffers, RequestError> {
        if let Some(d) = data.iter().find(|d| d.write_only != write_only) {
            let wanted = if write_only { "device-writable" } else { "device-readable" };
            return Err(fail(status, format!("buffer {:#x} is not {wanted}", d.addr.0)));
        }
        Ok(data.iter().map(|d| (d.addr, d.len)).collect())
    };
    let sector_range = |len: u64| -> Result<u64, RequestError> {
        if len == 0 || len % SECTOR_SIZE != 0 {
            return Err(fail(status, format!("data length {len} is not a positive multiple of 512")));
        }
        if len > limits.max_transfer {
            return Err(fail(status, format!("data length {len} is over the {} byte limit", limits.max_transfer)));
        }
        let offset = sector
            .checked_mul(SECTOR_SIZE)
            .filter(|o| o.checked_add(len).is_some_and(|end| end <= limits.capacity_bytes));
        offset.ok_or_else(|| fail(status, format!("sector {sector} + {len} bytes is past the end of the disk")))
    };
    let request = match request_type {
        VIRTIO_BLK_T_IN => {
            let buffers = buffers(true)?;
            Request::Read { offset: sector_range(total_len(&buffers))?, buffers }
        }
        VIRTIO_BLK_T_OUT => {
            let buffers = buffers(false)?;
            if limits.read_only {
                return Err(fail(status, "write to a read-only disk".into()));
            }
            Request::Write { offset: sector_range(total_len(&buffers))?, buffers }
        }
        VIRTIO_BLK_T_FLUSH => Request::Flush,
        VIRTIO_BLK_T_GET_ID => Request::GetId { buffers: buffers(true)? },
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if limits.read_only {
                return Err(fail(status, "discard or write-zeroes on a read-only disk".into()));
            }
            let payload = read_all(mem, &buffers(false)?).map_err(|reason| fail(status, reason))?;
            let (ranges, unmap) = parse_segments(&payload, limits).map_err(|reason| fail(status, reason))?;
            if request_type == VIRTIO_BLK_T_DISCARD {
                Request::Discard { ranges }
            } else {
                Request::WriteZeroes { ranges, unmap }
            }
        }
        VIRTIO_BLK_T_REWIND_MARKER_ADD => {
            let name = read_all(mem, &buffers(false)?).map_err(|reason| fail(status, reason))?;
            Request::MarkerAdd { name }
        }
        VIRTIO_BLK_T_REWIND_MARKER_GET => {
            let split = data.iter().position(|d| d.write_only).unwrap_or(data.len());
            let (readable, writable) = data.split_at(split);
            if writable.iter().any(|d| !d.write_only) || writable.is_empty() {
                return Err(fail(status, "MARKER_GET needs an optional name, then a writable reply buffer".into()));
            }
            let readable: Buffers = readable.iter().map(|d| (d.addr, d.len)).collect();
            let name = if readable.is_empty() {
                None
            } else {
                Some(read_all(mem, &readable).map_err(|reason| fail(status, reason))?)
            };
            Request::MarkerGet { name, reply: writable.iter().map(|d| (d.addr, d.len)).collect() }
        }
        other => Request::Unsupported { request_type: other },
    };
    Ok(Parsed { request, status: last.addr })
}

/// Reads small driver-provided payloads (marker names, discard segments) into one buffer.
fn read_all(mem: &GuestMemoryMmap, buffers: &[(GuestAddress, u32)]) -> Result<Vec<u8>, String> {
    const MAX: u64 = 64 * 1024;
    let total = total_len(buffers);
    if total > MAX {
        return Err(format!("payload of {total} bytes is over the {MAX} byte limit"));
    }
    let mut out = vec![0u8; total as usize];
    let mut at = 0;
    for &(addr, len) in buffers {
        mem.read_slice(&mut out[at..at + len as usize], addr).map_err(|e| format!("payload unreadable: {e}"))?;
        at += len as usize;
    }
    Ok(out)
}

fn parse_segments(payload: &[u8], limits: &Limits) -> Result<(Vec<(u64, u64)>, bool), String> {
    if payload.is_empty() || payload.len() % DISCARD_SEGMENT_LEN as usize != 0 {
        return Err(format!("{} bytes is not a whole number of 16-byte segments", payload.len()));
    }
    let count = payload.len() / DISCARD_SEGMENT_LEN as usize;
    if count > limits.max_discard_segments as usize {
        return Err(format!("{count} segments, at most {} allowed", limits.max_discard_segments));
    }
    let mut ranges = Vec::with_capacity(count);
    let mut unmap = true;
    for segment in payload.chunks_exact(DISCARD_SEGMENT_LEN as usize) {
        let sector = u64::from_le_bytes(segment[0..8].try_into().expect("8 bytes"));
        let sectors = u32::from_le_bytes(segment[8..12].try_into().expect("4 bytes"));
        let flags = u32::from_le_bytes(segment[12..16].try_into().expect("4 bytes"));
        if sectors == 0 || sectors > limits.max_discard_sectors {
            return Err(format!("segment of {sectors} sectors (1 to {} allowed)", limits.max_discard_sectors));
        }
        if flags & !WRITE_ZEROES_UNMAP != 0 {
            return Err(format!("unknown segment flags {flags:#x}"));
        }
        unmap &= flags & WRITE_ZEROES_UNMAP != 0;
        let len = sectors as u64 * SECTOR_SIZE;
        let offset = sector
            .checked_mul(SECTOR_SIZE)
            .filter(|o| o.checked_add(len).is_some_and(|end| end <= limits.capacity_bytes))
            .ok_or_else(|| format!("sector {sector} + {sectors} sectors is past the end of the disk"))?;
        ranges.push((offset, len));
    }
    Ok((ranges, unmap))
}

/// The reply to MARKER_GET: id u64, seq u64, time ns u64, source u8 (0 host, 1 guest), name
/// length u8, then the name.
pub fn encode_marker_reply(marker: &crate::marker::Marker) -> Vec<u8> {
    let mut reply = Vec::with_capacity(26 + marker.name.len());
    reply.extend_from_slice(&marker.id.to_le_bytes());
    reply.extend_from_slice(&marker.seq.to_le_bytes());
    reply.extend_from_slice(&marker.time_ns.to_le_bytes());
    reply.push(match marker.source {
        crate::marker::MarkerSource::Host => 0,
        crate::marker::MarkerSource::Guest => 1,
    });
    // Names are at most 128 bytes wherever they come from (the store validates them, read
    // back from disk too); the cut only keeps the length byte and the name in agreement.
    let name = &marker.name.as_bytes()[..marker.name.len().min(u8::MAX as usize)];
    reply.push(name.len() as u8);
    reply.extend_from_slice(name);
    reply
}

/// The virtio-blk config space (virtio 1.2, 5.2.4), little-endian, 60 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigSpace {
    pub capacity_sectors: u64,
    pub seg_max: u32,
    /// Logical block size the guest addresses the disk in.
    pub blk_size: u32,
    /// Physical block size reported through the topology: the unit worth writing whole.
    pub physical_block_size: u32,
    pub writeback: bool,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_segments: u32,
}

pub const CONFIG_LEN: usize = 60;
/// Offset of the `writeback` byte, the only field a driver may write.
pub const CONFIG_WRITEBACK_OFFSET: usize = 32;

impl ConfigSpace {
    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        b[0..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        b[12..16].copy_from_slice(&self.seg_max.to_le_bytes());
        b[20..24].copy_from_slice(&self.blk_size.to_le_bytes());
        // Topology, in logical blocks: physical_block_exp, alignment_offset 0, min_io_size one
        // physical block, opt_io_size 0 (none).
        let per_physical = self.physical_block_size / self.blk_size;
        b[24] = per_physical.trailing_zeros() as u8;
        b[26..28].copy_from_slice(&(per_physical as u16).to_le_bytes());
        b[CONFIG_WRITEBACK_OFFSET] = u8::from(self.writeback);
        b[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        b[36..40].copy_from_slice(&self.max_discard_sectors.to_le_bytes());
        b[40..44].copy_from_slice(&self.max_discard_segments.to_le_bytes());
        b[44..48].copy_from_slice(&(self.physical_block_size / SECTOR_SIZE as u32).to_le_bytes());
        b[48..52].copy_from_slice(&self.max_discard_sectors.to_le_bytes());
        b[52..56].copy_from_slice(&self.max_discard_segments.to_le_bytes());
        b[56] = 1; // write_zeroes_may_unmap
        b
    }
}

#[cfg(test)]
mod tests;
