//! Header indexes of sealed segments: where each record of a segment is and what it changes,
//! without its payload, so a point-in-time view finds the records after its snapshot by reading
//! a few bytes a record instead of the segment (whose headers sit between the payloads).
//!
//! `{index:016x}.idx` beside the segment, written when the segment is sealed. It is derived
//! data: never synced, checked on every use (checksum, and the segment it describes), and a
//! segment without a usable index is walked instead. Segments whose records this process did
//! not all append (the first of a new journal, the one active when the store was opened) are
//! sealed without one; the first view that walks such a segment writes it
//! (`JournalView::for_each_header`).
//!
//! Layout (little-endian): magic `RWSEGIX\0`, format version (u32), reserved (u32), segment
//! index, first seq, next seq, end (u64 each), CRC32C of the entries (u32), CRC32C of the bytes
//! before it (u32); then one 32-byte entry per record in seq order: volume offset, length,
//! payload position in the segment (u64 each), kind (u8), 7 reserved bytes.

use std::fs;
use std::path::{Path, PathBuf};

use super::record::RecordKind;
use super::segment::Segment;
use crate::{Seq, FORMAT_VERSION};

const MAGIC: [u8; 8] = *b"RWSEGIX\0";
const HEADER_LEN: usize = 56;
const ENTRY_LEN: usize = 32;

/// One record as the index holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexedRecord {
    pub seq: Seq,
    pub kind: RecordKind,
    pub offset: u64,
    pub length: u64,
    pub payload_position: u64,
}

/// The entries of the active segment, gathered as records are appended.
#[derive(Default)]
pub struct IndexBuilder {
    /// None when the segment held records before this process appended to it (it was opened):
    /// those are not known here, so the segment gets no index.
    entries: Option<Vec<u8>>,
}

impl IndexBuilder {
    /// For a segment started empty by this process.
    pub fn complete() -> Self {
        Self { entries: Some(Vec::new()) }
    }

    pub fn push(&mut self, kind: RecordKind, offset: u64, length: u64, payload_position: u64) {
        if let Some(entries) = &mut self.entries {
            entries.extend_from_slice(&offset.to_le_bytes());
            entries.extend_from_slice(&length.to_le_bytes());
            entries.extend_from_slice(&payload_position.to_le_bytes());
            entries.push(kind as u8);
            entries.extend_from_slice(&[0u8; 7]);
        }
    }

    /// Writes the index of `sealed`, if every record of it is known. A failure only costs
    /// views a walk of the segment, so it is logged, not returned.
    pub fn write(self, sealed: &Segment) {
        let Some(entries) = self.entries else { return };
        if entries.len() as u64 != (sealed.next_seq - sealed.first_seq) * ENTRY_LEN as u64 {
            log::warn!("journal: not indexing {}: records missing from its index", sealed.path.display());
            return;
        }
        let mut header = [0u8; HEADER_LEN];
        header[0..8].copy_from_slice(&MAGIC);
        header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        for (at, value) in [(16, sealed.index), (24, sealed.first_seq), (32, sealed.next_seq), (40, sealed.end)] {
            header[at..at + 8].copy_from_slice(&value.to_le_bytes());
        }
        header[48..52].copy_from_slice(&crc32c::crc32c(&entries).to_le_bytes());
        let header_crc = crc32c::crc32c(&header[..52]);
        header[52..56].copy_from_slice(&header_crc.to_le_bytes());
        let mut bytes = Vec::with_capacity(HEADER_LEN + entries.len());
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(&entries);
        if let Err(e) = fs::write(index_path(&sealed.path), bytes) {
            log::warn!("journal: cannot write the header index of {}: {e}", sealed.path.display());
        }
    }
}

/// Where the index of the segment at `segment_path` is.
pub fn index_path(segment_path: &Path) -> PathBuf {
    segment_path.with_extension("idx")
}

/// The records of `segment` from its index, if it has a usable one.
pub fn read(segment: &Segment) -> Option<Vec<IndexedRecord>> {
    let bytes = fs::read(index_path(&segment.path)).ok()?;
    let (header, entries) = bytes.split_at_checked(HEADER_LEN)?;
    let field = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
    let crc_at = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    let describes_segment = header[0..8] == MAGIC
        && crc_at(52) == crc32c::crc32c(&header[..52])
        && u32::from_le_bytes(header[8..12].try_into().expect("4 bytes")) == FORMAT_VERSION
        && (field(16), field(24), field(32), field(40))
            == (segment.index, segment.first_seq, segment.next_seq, segment.end)
        && entries.len() as u64 == (segment.next_seq - segment.first_seq) * ENTRY_LEN as u64
        && crc_at(48) == crc32c::crc32c(entries);
    if !describes_segment {
        log::warn!("journal: ignoring the header index of {}: it does not match", segment.path.display());
        return None;
    }
    entries
        .chunks_exact(ENTRY_LEN)
        .zip(segment.first_seq..)
        .map(|(e, seq)| {
            let value = |at: usize| u64::from_le_bytes(e[at..at + 8].try_into().expect("8 bytes"));
            Some(IndexedRecord {
                seq,
                kind: RecordKind::from_u8(e[24])?,
                offset: value(0),
                length: value(8),
                payload_position: value(16),
            })
        })
        .collect()
}

/// Removes the index of the segment at `segment_path`, if it has one.
pub fn remove(segment_path: &Path) {
    let path = index_path(segment_path);
    if let Err(e) = fs::remove_file(&path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!("journal: cannot remove {}: {e}", path.display());
        }
    }
}
