//! The remote layout (docs/format.md, "Replica"): object names, the manifest (version 2), and
//! the object formats (version 1): journal batches, and the parts of bases and deltas. Every object carries its own
//! CRC32C checksums and names the store it belongs to; the manifest is written after the
//! objects it counts, so an upload cut short is never taken for history.

use rewind_engine::journal::{RecordHeader, RecordKind, HEADER_LEN};
use rewind_engine::marker::{self, Marker};
use rewind_engine::Seq;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The objects' format version.
pub const FORMAT_VERSION: u32 = 1;
/// The manifest's: 2 added `deltas`. Version 1 manifests (no deltas) are still read.
pub const MANIFEST_VERSION: u32 = 2;
pub const MANIFEST_KEY: &str = "rewind-replica.json";
pub const JOURNAL_DIR: &str = "journal";
pub const BASE_DIR: &str = "base";
pub const DELTA_DIR: &str = "delta";
const JOURNAL_MAGIC: [u8; 8] = *b"RWREPJ\0\0";
/// Every object kind starts with a header of this many bytes.
pub const OBJECT_HEADER_LEN: usize = 64;
/// A part's table entry: volume offset, length, CRC32C, flags.
pub const EXTENT_ENTRY_LEN: usize = 24;
/// The flag of a part's range that reads as zeroes and has no data.
const ZEROES_FLAG: u32 = 1;
/// What `format` says in every manifest, so that a stray JSON file is not taken for one.
const FORMAT_NAME: &str = "rewind-replica";

/// `rewind-replica.json`: what the replica holds, complete. Replaced (never appended to) after
/// the objects it counts are stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub store_uuid: uuid::Uuid,
    pub volume_size: u64,
    pub block_size: u32,
    /// The volume at `base.seq`, in parts; the oldest remote point.
    pub base: BaseInfo,
    /// Later snapshots, oldest first, each the net effect of the records since the point
    /// before it (the base or the previous delta): recovery applies the base and the deltas up
    /// to a point, then replays only the journal after the last of them.
    #[serde(default)]
    pub deltas: Vec<DeltaInfo>,
    /// Every record in `base.seq + 1 ..= shipped_seq` is in the journal objects.
    pub shipped_seq: Seq,
    /// Timestamp of record `shipped_seq` (ns since the epoch).
    pub shipped_time_ns: u64,
    /// Markers shipped, in sequence order; those below the base are expired.
    pub markers: Vec<Marker>,
    /// Remote retention: points older than this many seconds are freed (none: keep all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_secs: Option<u64>,
    /// When the manifest was written (ns since the epoch).
    pub updated_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BaseInfo {
    pub seq: Seq,
    /// Timestamp of the record at `seq` (0 for the store's initial state).
    pub time_ns: u64,
    pub parts: u64,
    /// Data bytes held by the parts (holes are not stored).
    pub data_bytes: u64,
}

/// A remote snapshot after the base: the net effect of the records in `from + 1 ..= seq` in
/// delta parts, or (`full`) the whole volume at `seq` in base parts, which a recovery starts
/// from instead of the base and the deltas before it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DeltaInfo {
    pub seq: Seq,
    /// For a full snapshot, `seq`.
    pub from: Seq,
    /// Timestamp of the record at `seq`.
    pub time_ns: u64,
    pub parts: u64,
    /// Data bytes held by the parts (zeroed ranges hold none).
    pub data_bytes: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub full: bool,
}

impl DeltaInfo {
    /// A full snapshot taken as the base: its parts are base parts of its seq already.
    pub fn as_base(&self) -> BaseInfo {
        debug_assert!(self.full, "only a full snapshot can become the base");
        BaseInfo { seq: self.seq, time_ns: self.time_ns, parts: self.parts, data_bytes: self.data_bytes }
    }

    /// Where its parts are.
    pub fn parts_of(&self) -> PartOf {
        if self.full {
            PartOf::Base
        } else {
            PartOf::Delta
        }
    }
}

impl Manifest {
    pub fn new(store_uuid: uuid::Uuid, volume_size: u64, block_size: u32, base: BaseInfo) -> Self {
        Self {
            format: FORMAT_NAME.to_string(),
            format_version: MANIFEST_VERSION,
            store_uuid,
            volume_size,
            block_size,
            shipped_seq: base.seq,
            shipped_time_ns: base.time_ns,
            base,
            deltas: Vec::new(),
            markers: Vec::new(),
            max_age_secs: None,
            updated_ns: 0,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("the manifest serialises")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let corrupt = |reason: String| Error::Corrupt { key: MANIFEST_KEY.to_string(), reason };
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
        if value.get("format").and_then(|f| f.as_str()) != Some(FORMAT_NAME) {
            return Err(corrupt(format!("not a {FORMAT_NAME} manifest")));
        }
        let version = value.get("format-version").and_then(|v| v.as_u64()).unwrap_or(0);
        if version == 0 || version > u64::from(MANIFEST_VERSION) {
            return Err(Error::UnsupportedVersion {
                key: MANIFEST_KEY.to_string(),
                found: u32::try_from(version).unwrap_or(u32::MAX),
                supported: MANIFEST_VERSION,
            });
        }
        let mut manifest: Self = serde_json::from_value(value).map_err(|e| corrupt(e.to_string()))?;
        if manifest.shipped_seq < manifest.base.seq {
            return Err(corrupt(format!(
                "shipped seq {} is older than the base at seq {}",
                manifest.shipped_seq, manifest.base.seq
            )));
        }
        // Each delta must follow the point before it without leaving records out, and lie
        // within what was shipped.
        let mut point = manifest.base.seq;
        for delta in &manifest.deltas {
            let follows = if delta.full { delta.from == delta.seq } else { delta.from <= point };
            if !follows || delta.seq <= point || delta.seq > manifest.shipped_seq {
                return Err(corrupt(format!(
                    "the delta at seq {} (from seq {}) does not follow the point at seq {point} within the shipped \
                     records",
                    delta.seq, delta.from
                )));
            }
            point = delta.seq;
        }
        // What this build writes from here on.
        manifest.format_version = MANIFEST_VERSION;
        Ok(manifest)
    }

    /// The newest remote snapshot: the last delta, else the base.
    pub fn newest_point(&self) -> Seq {
        self.deltas.last().map_or(self.base.seq, |d| d.seq)
    }

    /// Data bytes of the deltas after the newest full snapshot (or the base): what a recovery of
    /// a late point reads besides that snapshot.
    pub fn delta_bytes_since_full(&self) -> u64 {
        self.deltas.iter().rev().take_while(|d| !d.full).map(|d| d.data_bytes).sum()
    }

    /// Whether base parts of the snapshot at `seq` are counted: the base's or a full snapshot's.
    pub fn counts_base_parts_of(&self, seq: Seq) -> bool {
        self.base.seq == seq || self.deltas.iter().any(|d| d.full && d.seq == seq)
    }

    /// Whether the parts of kind `of` at `seq` are ones it lists.
    pub fn counts_parts(&self, of: PartOf, seq: Seq) -> bool {
        match of {
            PartOf::Base => self.counts_base_parts_of(seq),
            PartOf::Delta => self.deltas.iter().any(|d| !d.full && d.seq == seq),
        }
    }

    /// Whether a marker's point can be rebuilt from the replica.
    pub fn marker_expired(&self, marker: &Marker) -> bool {
        marker.seq < self.base.seq
    }
}

/// `journal/<first>-<last>.rwj`, both 16 hex digits: the name says which records it holds, so
/// a listing is enough to chain them.
pub fn journal_key(first: Seq, last: Seq) -> String {
    format!("{JOURNAL_DIR}/{first:016x}-{last:016x}.rwj")
}

/// The record range a journal object's key names, if it is one.
pub fn parse_journal_key(key: &str) -> Option<(Seq, Seq)> {
    let name = key.strip_prefix(JOURNAL_DIR)?.strip_prefix('/')?.strip_suffix(".rwj")?;
    let (first, last) = name.split_once('-')?;
    let hex = |s: &str| (s.len() == 16).then(|| u64::from_str_radix(s, 16).ok()).flatten();
    let (first, last) = (hex(first)?, hex(last)?);
    (first <= last).then_some((first, last))
}

/// A snapshot stored in parts: the base, or a delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartOf {
    Base,
    Delta,
}

impl PartOf {
    fn dir(self) -> &'static str {
        match self {
            Self::Base => BASE_DIR,
            Self::Delta => DELTA_DIR,
        }
    }

    fn extension(self) -> &'static str {
        match self {
            Self::Base => ".rwb",
            Self::Delta => ".rwd",
        }
    }

    fn magic(self) -> [u8; 8] {
        match self {
            Self::Base => *b"RWREPB\0\0",
            Self::Delta => *b"RWREPD\0\0",
        }
    }

    /// `base/<seq>/<part>.rwb` or `delta/<seq>/<part>.rwd`.
    pub fn key(self, seq: Seq, part: u64) -> String {
        format!("{}/{seq:016x}/{part:08x}{}", self.dir(), self.extension())
    }

    /// The snapshot's sequence number a part's key names, if it is one of this kind.
    pub fn parse_key(self, key: &str) -> Option<Seq> {
        let rest = key.strip_prefix(self.dir())?.strip_prefix('/')?;
        let (seq, part) = rest.split_once('/')?;
        part.strip_suffix(self.extension())?;
        (seq.len() == 16).then(|| u64::from_str_radix(seq, 16).ok()).flatten()
    }
}

/// The common object header: magic, version, a count, the store, a range, the body's length
/// and checksum, and the header's own checksum.
struct ObjectHeader {
    magic: [u8; 8],
    count: u32,
    store_uuid: uuid::Uuid,
    first: u64,
    second: u64,
    body_len: u64,
    body_crc: u32,
}

impl ObjectHeader {
    fn encode(&self) -> [u8; OBJECT_HEADER_LEN] {
        let mut buf = [0u8; OBJECT_HEADER_LEN];
        buf[0..8].copy_from_slice(&self.magic);
        buf[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        buf[12..16].copy_from_slice(&self.count.to_le_bytes());
        buf[16..32].copy_from_slice(self.store_uuid.as_bytes());
        buf[32..40].copy_from_slice(&self.first.to_le_bytes());
        buf[40..48].copy_from_slice(&self.second.to_le_bytes());
        buf[48..56].copy_from_slice(&self.body_len.to_le_bytes());
        buf[56..60].copy_from_slice(&self.body_crc.to_le_bytes());
        let crc = crc32c::crc32c(&buf[0..60]);
        buf[60..64].copy_from_slice(&crc.to_le_bytes());
        buf
    }

    /// Decodes and checks the header and the body's checksum; returns the header and body.
    fn decode<'a>(key: &str, magic: [u8; 8], store_uuid: uuid::Uuid, bytes: &'a [u8]) -> Result<(Self, &'a [u8])> {
        let corrupt = |reason: &str| Error::Corrupt { key: key.to_string(), reason: reason.to_string() };
        if bytes.len() < OBJECT_HEADER_LEN || bytes[0..8] != magic {
            return Err(corrupt("no object header"));
        }
        if crc32c::crc32c(&bytes[0..60]) != u32_at(bytes, 60) {
            return Err(corrupt("header checksum mismatch"));
        }
        let version = u32_at(bytes, 8);
        if version != FORMAT_VERSION {
            return Err(Error::UnsupportedVersion { key: key.to_string(), found: version, supported: FORMAT_VERSION });
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&bytes[16..32]);
        let header = Self {
            magic,
            count: u32_at(bytes, 12),
            store_uuid: uuid::Uuid::from_bytes(uuid),
            first: u64_at(bytes, 32),
            second: u64_at(bytes, 40),
            body_len: u64_at(bytes, 48),
            body_crc: u32_at(bytes, 56),
        };
        if header.store_uuid != store_uuid {
            return Err(corrupt("the object belongs to another store"));
        }
        let body = &bytes[OBJECT_HEADER_LEN..];
        if body.len() as u64 != header.body_len {
            return Err(corrupt("object length does not match its header"));
        }
        if crc32c::crc32c(body) != header.body_crc {
            return Err(corrupt("body checksum mismatch"));
        }
        Ok((header, body))
    }
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    let mut bytes = [0u8; 4];
    bytes.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(bytes)
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(bytes)
}

/// What [`scan_records`] found at the start of a run of a segment's bytes.
#[derive(Debug, Default)]
pub struct RecordRun {
    pub first: Seq,
    pub last: Seq,
    /// Timestamp of the last record.
    pub last_time_ns: u64,
    pub count: u32,
    /// Bytes the whole records take; a record cut short by the end of the bytes is left out.
    pub len: usize,
    /// The length of the record cut short there, if one was.
    pub cut_short: Option<u64>,
    /// The markers among the records.
    pub markers: Vec<Marker>,
}

/// A record in a run of segment bytes that is not what the journal holds there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunFault {
    /// Byte offset of the record in the run.
    pub at: usize,
    pub reason: String,
}

/// Checks the records `first..=last` at the start of `bytes`, which a journal segment holds
/// from record `first` on, for shipping them as they are: every header (its checksum and fields), numbering
/// without a gap, and the payloads of markers (decoded for the manifest). Other payloads are
/// not read: the journal computed their checksums as it wrote them, and every reader of the
/// object checks them ([`decode_journal_object`]); reading them here cost the shipper more CPU
/// than anything else it did.
pub fn scan_records(bytes: &[u8], first: Seq, last: Seq) -> Result<RecordRun, RunFault> {
    let mut run = RecordRun { first, last: first.saturating_sub(1), ..RecordRun::default() };
    let mut pos = 0usize;
    while let Some(raw) = bytes.get(pos..pos + HEADER_LEN).filter(|_| run.last < last) {
        let fault = |reason: String| RunFault { at: pos, reason };
        let raw: &[u8; HEADER_LEN] = raw.try_into().map_err(|_| fault("short header".into()))?;
        let record = RecordHeader::decode(raw).map_err(|e| fault(e.to_string()))?;
        let expected = first + u64::from(run.count);
        if record.seq != expected {
            return Err(fault(format!("record {} where {expected} was expected", record.seq)));
        }
        let end = usize::try_from(record.record_len()).ok().and_then(|len| pos.checked_add(len));
        let Some(end) = end.filter(|&end| end <= bytes.len()) else {
            run.cut_short = Some(record.record_len());
            break;
        };
        if record.kind == RecordKind::Marker {
            let payload = &bytes[pos + HEADER_LEN..pos + HEADER_LEN + record.payload_len as usize];
            if crc32c::crc32c(payload) != record.payload_crc {
                return Err(fault(format!("record {expected}: payload checksum mismatch")));
            }
            run.markers.extend(marker::decode_payload(payload, record.seq, record.timestamp_ns));
        }
        run.last = record.seq;
        run.last_time_ns = record.timestamp_ns;
        run.count += 1;
        pos = end;
    }
    run.len = pos;
    Ok(run)
}

/// Makes a journal object in place: `object` holds [`OBJECT_HEADER_LEN`] bytes of room, then
/// the records of `run` exactly as the segment holds them (and nothing after them). Writes the
/// object header into the room and returns the object's key.
pub fn seal_journal_object(object: &mut [u8], store_uuid: uuid::Uuid, run: &RecordRun) -> String {
    let body = &object[OBJECT_HEADER_LEN..];
    let header = ObjectHeader {
        magic: JOURNAL_MAGIC,
        count: run.count,
        store_uuid,
        first: run.first,
        second: run.last,
        body_len: body.len() as u64,
        body_crc: crc32c::crc32c(body),
    };
    object[..OBJECT_HEADER_LEN].copy_from_slice(&header.encode());
    journal_key(run.first, run.last)
}

/// Decodes a journal object and hands each record to `visit`, checking every checksum and that
/// the records are exactly those its key names, in order.
pub fn decode_journal_object(
    key: &str,
    store_uuid: uuid::Uuid,
    bytes: &[u8],
    mut visit: impl FnMut(&RecordHeader, &[u8]) -> Result<()>,
) -> Result<()> {
    let corrupt = |reason: String| Error::Corrupt { key: key.to_string(), reason };
    let (header, body) = ObjectHeader::decode(key, JOURNAL_MAGIC, store_uuid, bytes)?;
    if parse_journal_key(key).is_some_and(|range| range != (header.first, header.second)) {
        return Err(corrupt("the header's record range does not match the object's name".into()));
    }
    let mut pos = 0usize;
    let mut expected = header.first;
    for _ in 0..header.count {
        let raw: &[u8; HEADER_LEN] = body
            .get(pos..pos + HEADER_LEN)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| corrupt(format!("record {expected} is cut short")))?;
        let record = RecordHeader::decode(raw).map_err(|fault| corrupt(format!("record {expected}: {fault}")))?;
        if record.seq != expected {
            return Err(corrupt(format!("record {} where {expected} was expected", record.seq)));
        }
        let payload_at = pos + HEADER_LEN;
        let payload = body
            .get(payload_at..payload_at + record.payload_len as usize)
            .ok_or_else(|| corrupt(format!("record {expected}'s payload is cut short")))?;
        if crc32c::crc32c(payload) != record.payload_crc {
            return Err(corrupt(format!("record {expected}: payload checksum mismatch")));
        }
        visit(&record, payload)?;
        pos += record.record_len() as usize;
        expected += 1;
    }
    if expected != header.second + 1 || pos != body.len() {
        return Err(corrupt("the object holds other records than its header says".into()));
    }
    Ok(())
}

/// What one stored range of a part holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartData {
    Bytes(Vec<u8>),
    /// This many bytes that read as zeroes (a delta's zeroed or discarded range).
    Zeroes(u64),
}

/// One stored range of a part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartExtent {
    pub offset: u64,
    pub data: PartData,
}

/// A range as [`decode_part`] hands it over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartRange<'a> {
    Bytes(&'a [u8]),
    Zeroes(u64),
}

/// Encodes part `part` of the snapshot at `seq`: a table of (volume offset, length, CRC32C,
/// flags) and the data after it.
pub fn encode_part(of: PartOf, store_uuid: uuid::Uuid, seq: Seq, part: u64, extents: &[PartExtent]) -> Vec<u8> {
    let mut body = Vec::new();
    for extent in extents {
        let (len, crc, flags) = match &extent.data {
            PartData::Bytes(data) => (data.len() as u64, crc32c::crc32c(data), 0),
            PartData::Zeroes(len) => (*len, 0, ZEROES_FLAG),
        };
        body.extend_from_slice(&extent.offset.to_le_bytes());
        body.extend_from_slice(&len.to_le_bytes());
        body.extend_from_slice(&crc.to_le_bytes());
        body.extend_from_slice(&flags.to_le_bytes());
    }
    for extent in extents {
        if let PartData::Bytes(data) = &extent.data {
            body.extend_from_slice(data);
        }
    }
    let header = ObjectHeader {
        magic: of.magic(),
        count: u32::try_from(extents.len()).expect("a part holds few extents"),
        store_uuid,
        first: seq,
        second: part,
        body_len: body.len() as u64,
        body_crc: crc32c::crc32c(&body),
    };
    let mut bytes = header.encode().to_vec();
    bytes.extend_from_slice(&body);
    bytes
}

/// Decodes a part of the snapshot at `seq`, handing each range to `visit` with its volume
/// offset.
pub fn decode_part(
    of: PartOf,
    key: &str,
    store_uuid: uuid::Uuid,
    seq: Seq,
    volume_size: u64,
    bytes: &[u8],
    mut visit: impl FnMut(u64, PartRange<'_>) -> Result<()>,
) -> Result<()> {
    let corrupt = |reason: String| Error::Corrupt { key: key.to_string(), reason };
    let (header, body) = ObjectHeader::decode(key, of.magic(), store_uuid, bytes)?;
    if header.first != seq {
        return Err(corrupt(format!("a part of the snapshot at seq {}, not {seq}", header.first)));
    }
    let table_len = header.count as usize * EXTENT_ENTRY_LEN;
    let mut data_at = table_len;
    for entry in 0..header.count as usize {
        let at = entry * EXTENT_ENTRY_LEN;
        let table = body.get(at..at + EXTENT_ENTRY_LEN).ok_or_else(|| corrupt("extent table cut short".into()))?;
        let (offset, len, crc, flags) = (u64_at(table, 0), u64_at(table, 8), u32_at(table, 16), u32_at(table, 20));
        if offset.checked_add(len).is_none_or(|end| end > volume_size) {
            return Err(corrupt(format!("extent {offset}+{len} lies outside the volume")));
        }
        match flags {
            ZEROES_FLAG => visit(offset, PartRange::Zeroes(len))?,
            0 => {
                let data = usize::try_from(len)
                    .ok()
                    .and_then(|len| body.get(data_at..data_at + len))
                    .ok_or_else(|| corrupt("extent data cut short".into()))?;
                if crc32c::crc32c(data) != crc {
                    return Err(corrupt(format!("extent at volume offset {offset}: checksum mismatch")));
                }
                visit(offset, PartRange::Bytes(data))?;
                data_at += data.len();
            }
            other => return Err(corrupt(format!("extent at volume offset {offset}: unknown flags {other:#x}"))),
        }
    }
    if data_at != body.len() {
        return Err(corrupt("bytes after the last extent".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: RecordKind, seq: Seq, data: &[u8]) -> RecordHeader {
        RecordHeader {
            kind,
            seq,
            timestamp_ns: seq * 10,
            offset: if kind == RecordKind::Write { seq * 4096 } else { 0 },
            length: if kind == RecordKind::Write { data.len() as u64 } else { 0 },
            payload_len: data.len() as u32,
            payload_crc: crc32c::crc32c(data),
        }
    }

    /// Records as a segment holds them (header, payload padded to 64 bytes).
    fn segment_bytes(records: &[(RecordHeader, Vec<u8>)]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for (header, payload) in records {
            bytes.extend_from_slice(&header.encode());
            bytes.extend_from_slice(payload);
            bytes.resize(bytes.len() + (header.record_len() as usize - HEADER_LEN - payload.len()), 0);
        }
        bytes
    }

    /// A journal object made as the shipper makes one: room for the header, then the bytes.
    fn object_of(store: uuid::Uuid, first: Seq, records: &[u8]) -> (String, Vec<u8>) {
        let run = scan_records(records, first, Seq::MAX).unwrap();
        let mut object = vec![0u8; OBJECT_HEADER_LEN];
        object.extend_from_slice(&records[..run.len]);
        let key = seal_journal_object(&mut object, store, &run);
        (key, object)
    }

    #[test]
    fn journal_objects_round_trip_and_every_flipped_byte_is_caught() {
        let store = uuid::Uuid::new_v4();
        let records: Vec<_> = (5..8)
            .map(|seq| {
                let data = vec![seq as u8; 100 + seq as usize];
                (record(RecordKind::Write, seq, &data), data)
            })
            .collect();
        let (key, bytes) = object_of(store, 5, &segment_bytes(&records));
        assert_eq!(parse_journal_key(&key), Some((5, 7)));
        let mut seen = Vec::new();
        decode_journal_object(&key, store, &bytes, |h, p| {
            seen.push((h.seq, p.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), [5, 6, 7]);
        assert_eq!(seen[1].1, vec![6u8; 106]);
        for at in (0..bytes.len()).step_by(7) {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x40;
            let result = decode_journal_object(&key, store, &damaged, |_, _| Ok(()));
            assert!(matches!(result, Err(Error::Corrupt { .. })), "byte {at} flip went unnoticed");
        }
        let cut = decode_journal_object(&key, store, &bytes[..bytes.len() - 64], |_, _| Ok(()));
        assert!(matches!(cut, Err(Error::Corrupt { .. })));
        let other = decode_journal_object(&key, uuid::Uuid::new_v4(), &bytes, |_, _| Ok(()));
        assert!(matches!(other, Err(Error::Corrupt { .. })));
        let renamed = decode_journal_object(&journal_key(5, 9), store, &bytes, |_, _| Ok(()));
        assert!(matches!(renamed, Err(Error::Corrupt { .. })));
    }

    #[test]
    fn a_run_of_segment_bytes_is_cut_at_whole_records_and_checked_header_by_header() {
        let marker = rewind_engine::marker::encode_payload(1, rewind_engine::marker::MarkerSource::Host, "m", None);
        let records = vec![
            (record(RecordKind::Write, 10, &[1; 4096]), vec![1; 4096]),
            (record(RecordKind::Marker, 11, &marker), marker.clone()),
            (record(RecordKind::Write, 12, &[2; 100]), vec![2; 100]),
        ];
        let bytes = segment_bytes(&records);
        let whole = scan_records(&bytes, 10, 12).unwrap();
        assert_eq!((whole.first, whole.last, whole.count, whole.len, whole.cut_short), (10, 12, 3, bytes.len(), None));
        assert_eq!(whole.markers.iter().map(|m| (m.seq, m.name.as_str())).collect::<Vec<_>>(), [(11, "m")]);
        // Up to a last record only (the last durable one).
        let bounded = scan_records(&bytes, 10, 11).unwrap();
        assert_eq!(
            (bounded.last, bounded.count, bounded.len),
            (11, 2, bytes.len() - records[2].0.record_len() as usize)
        );
        // Cut inside the last record: the run ends before it and says how long it is.
        let cut = scan_records(&bytes[..bytes.len() - 10], 10, 12).unwrap();
        assert_eq!((cut.last, cut.count, cut.cut_short), (11, 2, Some(records[2].0.record_len())));
        // Cut inside the first: nothing whole.
        let none = scan_records(&bytes[..100], 10, 12).unwrap();
        assert_eq!((none.count, none.len, none.cut_short), (0, 0, Some(records[0].0.record_len())));
        // Numbered from elsewhere, a damaged header, a damaged marker: faults at the record.
        assert_eq!(scan_records(&bytes, 9, 12).unwrap_err().at, 0);
        let second = records[0].0.record_len() as usize;
        let mut damaged = bytes.clone();
        damaged[second + 20] ^= 1;
        assert_eq!(scan_records(&damaged, 10, 12).unwrap_err().at, second);
        let mut damaged = bytes.clone();
        damaged[second + HEADER_LEN + 2] ^= 1;
        assert_eq!(scan_records(&damaged, 10, 12).unwrap_err().at, second);
        // A write's payload is not read here: the object's readers check it.
        let mut payload_flipped = bytes.clone();
        payload_flipped[HEADER_LEN + 5] ^= 1;
        let (key, object) = object_of(uuid::Uuid::nil(), 10, &payload_flipped);
        let decoded = decode_journal_object(&key, uuid::Uuid::nil(), &object, |_, _| Ok(()));
        assert!(
            matches!(decoded, Err(Error::Corrupt { reason, .. }) if reason.contains("record 10: payload checksum"))
        );
    }

    #[test]
    fn parts_round_trip_and_refuse_damage() {
        let store = uuid::Uuid::new_v4();
        let extents = vec![
            PartExtent { offset: 0, data: PartData::Bytes(vec![1; 4096]) },
            PartExtent { offset: 8192, data: PartData::Zeroes(16384) },
            PartExtent { offset: 65536, data: PartData::Bytes(vec![2; 8192]) },
        ];
        for of in [PartOf::Base, PartOf::Delta] {
            let bytes = encode_part(of, store, 42, 3, &extents);
            let key = of.key(42, 3);
            assert_eq!(of.parse_key(&key), Some(42));
            let mut seen = Vec::new();
            decode_part(of, &key, store, 42, 1 << 20, &bytes, |offset, range| {
                let data = match range {
                    PartRange::Bytes(data) => PartData::Bytes(data.to_vec()),
                    PartRange::Zeroes(len) => PartData::Zeroes(len),
                };
                seen.push(PartExtent { offset, data });
                Ok(())
            })
            .unwrap();
            assert_eq!(seen, extents);
            for at in (0..bytes.len()).step_by(5) {
                let mut damaged = bytes.clone();
                damaged[at] ^= 0x10;
                let result = decode_part(of, &key, store, 42, 1 << 20, &damaged, |_, _| Ok(()));
                assert!(matches!(result, Err(Error::Corrupt { .. })), "byte {at} flip went unnoticed");
            }
            assert!(decode_part(of, &key, store, 41, 1 << 20, &bytes, |_, _| Ok(())).is_err());
            assert!(decode_part(of, &key, store, 42, 65536, &bytes, |_, _| Ok(())).is_err());
        }
        // A delta part is not taken for a base part, nor the other way round.
        let delta = encode_part(PartOf::Delta, store, 42, 0, &extents);
        assert!(decode_part(PartOf::Base, &PartOf::Base.key(42, 0), store, 42, 1 << 20, &delta, |_, _| Ok(())).is_err());
    }

    #[test]
    fn manifests_refuse_deltas_that_leave_records_out() {
        let base = BaseInfo { seq: 3, time_ns: 7, parts: 1, data_bytes: 4096 };
        let mut manifest = Manifest::new(uuid::Uuid::new_v4(), 1 << 20, 4096, base);
        manifest.shipped_seq = 50;
        let delta = |from, seq| DeltaInfo { seq, from, time_ns: seq, parts: 1, data_bytes: 100, full: false };
        let full = |seq| DeltaInfo { full: true, ..delta(seq, seq) };
        manifest.deltas = vec![delta(3, 10), delta(10, 20), full(25), delta(5, 30), delta(30, 40)];
        assert_eq!(Manifest::decode(&manifest.encode()).unwrap(), manifest);
        assert_eq!(manifest.newest_point(), 40);
        assert_eq!(manifest.delta_bytes_since_full(), 200);
        assert!(manifest.counts_base_parts_of(25) && manifest.counts_base_parts_of(3));
        assert!(!manifest.counts_base_parts_of(20));
        for deltas in [
            vec![delta(4, 10)],
            vec![delta(3, 10), delta(11, 20)],
            vec![delta(3, 60)],
            vec![delta(3, 3)],
            vec![DeltaInfo { from: 3, ..full(10) }],
        ] {
            let bad = Manifest { deltas, ..manifest.clone() };
            assert!(matches!(Manifest::decode(&bad.encode()), Err(Error::Corrupt { .. })), "{:?}", bad.deltas);
        }
    }

    #[test]
    fn only_canonical_object_names_parse() {
        assert_eq!(parse_journal_key("journal/0000000000000001-0000000000000002.rwj"), Some((1, 2)));
        assert_eq!(parse_journal_key("journal/0000000000000003-0000000000000002.rwj"), None);
        assert_eq!(parse_journal_key("journal/1-2.rwj"), None);
        assert_eq!(parse_journal_key("base/0000000000000001/00000000.rwb"), None);
        assert_eq!(PartOf::Base.parse_key("base/0000000000000001/00000000.rwb"), Some(1));
        assert_eq!(PartOf::Base.parse_key("base/1/00000000.rwb"), None);
        assert_eq!(PartOf::Delta.parse_key("delta/0000000000000001/00000000.rwd"), Some(1));
        assert_eq!(PartOf::Delta.parse_key("base/0000000000000001/00000000.rwb"), None);
        assert_eq!(PartOf::Base.parse_key("delta/0000000000000001/00000000.rwd"), None);
    }
}
