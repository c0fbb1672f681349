//! One journal record: a fixed 64-byte header followed by a payload padded to 64 bytes.
//!
//! The header carries two CRC32C values: `payload_crc` over the payload bytes and `header_crc`
//! over the header itself (with that field zeroed). A header can so be validated on its own,
//! which lets `open` walk the journal by headers without reading every payload. The layout is
//! documented, field by field, in docs/format.md.

use crate::Seq;

pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"RWJR");
pub const HEADER_LEN: usize = 64;
/// Payloads start and end on this boundary so that copies of guest data stay cache-line aligned.
pub const ALIGN: u64 = 64;
/// Larger payloads are refused: no virtio request comes close, and a bound keeps a corrupt
/// length field from sending the scanner off into gigabytes.
pub const MAX_PAYLOAD: u32 = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    Write = 1,
    WriteZeroes = 2,
    Discard = 3,
    Marker = 4,
    Snapshot = 5,
}

impl RecordKind {
    pub fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::Write,
            2 => Self::WriteZeroes,
            3 => Self::Discard,
            4 => Self::Marker,
            5 => Self::Snapshot,
            _ => return None,
        })
    }

    /// Whether the record changes volume contents.
    pub fn modifies_volume(self) -> bool {
        matches!(self, Self::Write | Self::WriteZeroes | Self::Discard)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub seq: Seq,
    pub timestamp_ns: u64,
    /// Volume byte offset for volume records; zero otherwise.
    pub offset: u64,
    /// Volume byte length for volume records; zero otherwise.
    pub length: u64,
    pub payload_len: u32,
    pub payload_crc: u32,
}

/// Why a header did not decode; the scanner decides whether that is a torn tail or damage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderFault {
    /// No record starts here: zeroes or unrelated bytes.
    NoMagic,
    BadChecksum,
    BadField(&'static str),
}

impl std::fmt::Display for HeaderFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoMagic => write!(f, "no record magic"),
            Self::BadChecksum => write!(f, "header checksum mismatch"),
            Self::BadField(field) => write!(f, "invalid header field {field}"),
        }
    }
}

pub fn padded_len(payload_len: u64) -> u64 {
    payload_len.div_ceil(ALIGN) * ALIGN
}

impl RecordHeader {
    /// Bytes the whole record occupies in a segment.
    pub fn record_len(&self) -> u64 {
        HEADER_LEN as u64 + padded_len(self.payload_len as u64)
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut buf = [0u8; HEADER_LEN];
        buf[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        buf[4] = self.kind as u8;
        buf[8..16].copy_from_slice(&self.seq.to_le_bytes());
        buf[16..24].copy_from_slice(&self.timestamp_ns.to_le_bytes());
        buf[24..32].copy_from_slice(&self.offset.to_le_bytes());
        buf[32..40].copy_from_slice(&self.length.to_le_bytes());
        buf[40..44].copy_from_slice(&self.payload_len.to_le_bytes());
        buf[44..48].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32c::crc32c(&buf);
        buf[48..52].copy_from_slice(&crc.to_le_bytes());
        buf
    }

    pub fn decode(buf: &[u8; HEADER_LEN]) -> Result<Self, HeaderFault> {
        if read_u32(buf, 0) != RECORD_MAGIC {
            return Err(HeaderFault::NoMagic);
        }
        let stored_crc = read_u32(buf, 48);
        let mut zeroed = *buf;
        zeroed[48..52].fill(0);
        if crc32c::crc32c(&zeroed) != stored_crc {
            return Err(HeaderFault::BadChecksum);
        }
        let kind = RecordKind::from_u8(buf[4]).ok_or(HeaderFault::BadField("kind"))?;
        let header = Self {
            kind,
            seq: read_u64(buf, 8),
            timestamp_ns: read_u64(buf, 16),
            offset: read_u64(buf, 24),
            length: read_u64(buf, 32),
            payload_len: read_u32(buf, 40),
            payload_crc: read_u32(buf, 44),
        };
        if header.payload_len > MAX_PAYLOAD {
            return Err(HeaderFault::BadField("payload_len"));
        }
        if kind == RecordKind::Write && header.length != header.payload_len as u64 {
            return Err(HeaderFault::BadField("length"));
        }
        Ok(header)
    }
}

fn read_u32(buf: &[u8], at: usize) -> u32 {
    let mut bytes = [0u8; 4];
    bytes.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(bytes)
}

fn read_u64(buf: &[u8], at: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(bytes)
}

/// CRC32C over a payload given as scattered pieces.
pub fn payload_crc(pieces: &[&[u8]]) -> u32 {
    pieces.iter().fold(0, |crc, piece| crc32c::crc32c_append(crc, piece))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RecordHeader {
        RecordHeader {
            kind: RecordKind::Write,
            seq: 42,
            timestamp_ns: 1_700_000_000_000_000_000,
            offset: 8192,
            length: 4096,
            payload_len: 4096,
            payload_crc: 0xdead_beef,
        }
    }

    #[test]
    fn header_round_trips() {
        let header = sample();
        assert_eq!(RecordHeader::decode(&header.encode()), Ok(header));
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let encoded = sample().encode();
        for bit in 0..HEADER_LEN * 8 {
            let mut damaged = encoded;
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(RecordHeader::decode(&damaged).is_err(), "bit {bit} flip went unnoticed");
        }
    }

    #[test]
    fn zeroes_are_not_a_record() {
        assert_eq!(RecordHeader::decode(&[0u8; HEADER_LEN]), Err(HeaderFault::NoMagic));
    }

    #[test]
    fn record_lengths_are_aligned_and_overhead_is_small() {
        let header = sample();
        assert_eq!(header.record_len(), 64 + 4096);
        assert_eq!(header.record_len() % ALIGN, 0);
        // Journal metadata overhead for a 4 KiB write stays under 2%.
        assert!((header.record_len() - 4096) * 50 < 4096);
        assert_eq!(padded_len(1), 64);
        assert_eq!(padded_len(0), 0);
    }

    #[test]
    fn oversized_payload_length_is_rejected() {
        let mut header = sample();
        header.kind = RecordKind::Marker;
        header.payload_len = MAX_PAYLOAD + 1;
        assert_eq!(RecordHeader::decode(&header.encode()), Err(HeaderFault::BadField("payload_len")));
    }
}
