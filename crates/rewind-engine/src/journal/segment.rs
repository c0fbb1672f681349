//! Journal segment files: a 64-byte header naming the store and the first sequence number,
//! then records back to back. Segments are reused once retention frees them, so a segment may
//! hold stale records of an earlier life past its logical end; their sequence numbers are lower
//! than anything the segment's current life expects, which is how the scanner tells them apart.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, IoContext, Result};
use crate::{Seq, FORMAT_VERSION};

pub const SEGMENT_MAGIC: [u8; 8] = *b"RWJSEG\0\0";
pub const SEGMENT_HEADER_LEN: u64 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub store_uuid: [u8; 16],
    pub index: u64,
    pub first_seq: Seq,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN as usize] {
        let mut buf = [0u8; SEGMENT_HEADER_LEN as usize];
        buf[0..8].copy_from_slice(&SEGMENT_MAGIC);
        buf[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        buf[16..32].copy_from_slice(&self.store_uuid);
        buf[32..40].copy_from_slice(&self.index.to_le_bytes());
        buf[40..48].copy_from_slice(&self.first_seq.to_le_bytes());
        let crc = crc32c::crc32c(&buf[0..48]);
        buf[48..52].copy_from_slice(&crc.to_le_bytes());
        buf
    }

    pub fn decode(buf: &[u8; SEGMENT_HEADER_LEN as usize], path: &Path) -> Result<Self> {
        let corrupt =
            |reason: &str| Error::JournalCorrupt { segment: path.to_path_buf(), offset: 0, reason: reason.to_string() };
        if buf[0..8] != SEGMENT_MAGIC {
            return Err(corrupt("segment header magic missing"));
        }
        let stored_crc = u32::from_le_bytes(buf[48..52].try_into().expect("4-byte slice"));
        if crc32c::crc32c(&buf[0..48]) != stored_crc {
            return Err(corrupt("segment header checksum mismatch"));
        }
        let version = u32::from_le_bytes(buf[8..12].try_into().expect("4-byte slice"));
        if version != FORMAT_VERSION {
            return Err(Error::UnsupportedVersion {
                path: path.to_path_buf(),
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        Ok(Self {
            store_uuid: buf[16..32].try_into().expect("16-byte slice"),
            index: u64::from_le_bytes(buf[32..40].try_into().expect("8-byte slice")),
            first_seq: u64::from_le_bytes(buf[40..48].try_into().expect("8-byte slice")),
        })
    }
}

/// What the rest of the store needs to know of one segment: where it is, which records it
/// holds and where its last record ends.
#[derive(Debug, Clone)]
pub struct Segment {
    pub index: u64,
    pub path: PathBuf,
    pub file: Arc<File>,
    pub first_seq: Seq,
    /// Sequence number after the last record (== first_seq when empty).
    pub next_seq: Seq,
    /// Byte offset after the last record.
    pub end: u64,
    /// Timestamps of the first and last record; zero while empty.
    pub first_timestamp_ns: u64,
    pub last_timestamp_ns: u64,
}

impl Segment {
    pub fn file_name(index: u64) -> String {
        format!("{index:016x}.seg")
    }

    /// The index a file name stands for, if it is exactly a name [`Self::file_name`] makes.
    pub fn parse_file_name(name: &str) -> Option<u64> {
        let hex = name.strip_suffix(".seg")?;
        let canonical = hex.len() == 16 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        canonical.then(|| u64::from_str_radix(hex, 16).ok()).flatten()
    }

    pub fn is_empty(&self) -> bool {
        self.next_seq == self.first_seq
    }

    /// Sequence number of the last record, if any.
    pub fn last_seq(&self) -> Option<Seq> {
        (!self.is_empty()).then(|| self.next_seq - 1)
    }

    /// Bytes of records in this segment, header included.
    pub fn used_bytes(&self) -> u64 {
        self.end
    }
}

/// Reads a file through a large buffer, so that walking many small records costs few syscalls.
pub struct ChunkReader<'a> {
    file: &'a File,
    path: &'a Path,
    /// Bytes worth reading: read-ahead stops here.
    len: u64,
    buf: Vec<u8>,
    buf_start: u64,
    buf_len: usize,
    read_ahead: usize,
}

const CHUNK: usize = 1 << 20;

impl<'a> ChunkReader<'a> {
    pub fn new(file: &'a File, path: &'a Path, len: u64) -> Self {
        Self { file, path, len, buf: Vec::new(), buf_start: 0, buf_len: 0, read_ahead: CHUNK }
    }

    /// Reads ahead only as far as each read asks, or (`true`, the default) a whole chunk: a
    /// walk that skips large payloads would otherwise read all of them to find the headers.
    pub fn read_ahead(&mut self, whole_chunks: bool) {
        self.read_ahead = if whole_chunks { CHUNK } else { 0 };
    }

    /// Returns `len` bytes at `pos`, or fewer if the file ends first.
    pub fn read_at(&mut self, pos: u64, len: usize) -> Result<&[u8]> {
        let cached = pos >= self.buf_start && pos + len as u64 <= self.buf_start + self.buf_len as u64;
        if !cached {
            let want = len.max(self.read_ahead.min(self.len.saturating_sub(pos) as usize));
            if self.buf.len() < want {
                self.buf = vec![0; want];
            }
            let filled = crate::fsutil::read_up_to_at(self.file, &mut self.buf[..want], pos)
                .context(|| format!("reading {}", self.path.display()))?;
            self.buf_start = pos;
            self.buf_len = filled;
        }
        let from = (pos - self.buf_start) as usize;
        let to = (from + len).min(self.buf_len);
        Ok(&self.buf[from.min(to)..to])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_header_round_trips_and_detects_damage() {
        let header = SegmentHeader { store_uuid: [7; 16], index: 3, first_seq: 1234 };
        let path = Path::new("x.seg");
        let encoded = header.encode();
        assert_eq!(SegmentHeader::decode(&encoded, path).unwrap(), header);
        for byte in 0..52 {
            let mut damaged = encoded;
            damaged[byte] ^= 0x10;
            assert!(SegmentHeader::decode(&damaged, path).is_err(), "byte {byte}");
        }
    }

    #[test]
    fn chunk_reader_serves_reads_across_and_past_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..3 * CHUNK + 17).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        let mut reader = ChunkReader::new(&file, &path, data.len() as u64);
        for (pos, len) in [(0, 10), (CHUNK - 5, 10), (5, 2 * CHUNK), (3 * CHUNK, 100)] {
            let got = reader.read_at(pos as u64, len).unwrap().to_vec();
            let end = (pos + len).min(data.len());
            assert_eq!(got, data[pos..end]);
        }
    }
}
