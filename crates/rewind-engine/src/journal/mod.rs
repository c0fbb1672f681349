//! The journal: numbered, checksummed records in append-only segment files.
//!
//! Writers append batches of records with one `pwritev` per batch (group commit); `sync_active`
//! makes everything appended durable with one `fdatasync`. Readers take a [`JournalView`] — the
//! list of segments and their ends at one instant — and walk records without holding the
//! writer's lock. On open the journal is scanned: a torn tail past the last durable point is cut
//! back and logged, damage anywhere else stops the open with the segment and offset.
//!
//! Why one long file: the append path, the open scan and the spare preparation share the
//! segment naming and the rule for where a segment's records end, and were changed together
//! this far. Records and segment headers live in `record` and `segment`; the writer / reader /
//! recovery split (as in fjall's lsm-tree) is the next step.

pub mod header_index;
pub mod record;
pub mod segment;

use std::fs::{self, File, OpenOptions};
use std::io::IoSlice;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, IoContext, Result};
use crate::fsutil;

pub use record::{RecordHeader, RecordKind, HEADER_LEN};
use segment::{ChunkReader, Segment, SegmentHeader, SEGMENT_HEADER_LEN};

/// Re-exported so that `journal::Seq`, where it was first defined, still names it.
pub use crate::Seq;

/// Freed segments kept for reuse: overwriting existing file pages is several times cheaper
/// than filling fresh ones.
const MAX_SPARE_SEGMENTS: usize = 4;
const SPARE_PREFIX: &str = "spare-";
/// The highest first sequence number the oldest segment's header may name (see
/// `read_segment_header`).
const MAX_FIRST_SEQ: Seq = 1 << 62;
/// A spare being zero-filled; left behind only by a crash, and removed at open.
const PREPARING_PREFIX: &str = "preparing-";

/// A record to append: the journal assigns its sequence number and timestamp.
#[derive(Debug, Clone, Copy)]
pub struct NewRecord<'a> {
    pub kind: RecordKind,
    pub offset: u64,
    pub length: u64,
    pub payload: &'a [&'a [u8]],
}

/// A record read back: its header, where it lies, and its payload when it was read.
pub struct RecordRef<'a> {
    pub header: RecordHeader,
    pub segment: &'a Segment,
    pub position: u64,
    pub payload: Option<&'a [u8]>,
}

impl RecordRef<'_> {
    pub fn payload_position(&self) -> u64 {
        self.position + HEADER_LEN as u64
    }
}

/// How the scan at open ended the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailRepair {
    pub segment: PathBuf,
    pub offset: u64,
    pub reason: String,
    /// Bytes of the segment past the cut that held no valid record.
    pub discarded_bytes: u64,
}

pub struct Journal {
    dir: PathBuf,
    store_uuid: [u8; 16],
    segment_capacity: u64,
    /// Oldest first; the last one is the active segment that appends go to.
    segments: Vec<Segment>,
    last_timestamp_ns: u64,
    next_segment_index: u64,
    /// Sealed segments whose records may not be durable yet, and the journal directory after a
    /// segment was added to it: the next sync covers them.
    unsynced: Vec<Arc<File>>,
    /// Asks a [`SparePreparer`] for a spare: at the first append and at every roll-over.
    spare_wanted: Option<SyncSender<()>>,
    /// Where sealed segments go to be written back and dropped from the page cache.
    sealed_to: Option<mpsc::Sender<SealedMessage>>,
    asked_for_spare: bool,
    /// The active segment's records, for its header index when it is sealed.
    index: header_index::IndexBuilder,
}

/// Why a walk over a segment stopped before its file ended or at a record it could not use.
struct WalkEnd {
    end: u64,
    next_seq: Seq,
    /// None when the segment's bytes simply ran out.
    fault: Option<String>,
}

/// What a walk should do with each record's payload.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Payloads {
    /// Skip payloads (headers are still checked).
    Skip,
    /// Read and check the payloads of these kinds only.
    OfKinds(&'static [RecordKind]),
    /// Read and check every payload.
    All,
}

impl Payloads {
    fn wanted(self, kind: RecordKind) -> bool {
        match self {
            Self::Skip => false,
            Self::OfKinds(kinds) => kinds.contains(&kind),
            Self::All => true,
        }
    }
}

/// Record size from which a walk stops reading ahead past the next header.
const SKIP_READ_AHEAD_FROM: u64 = 64 * 1024;

fn walk_segment(
    segment: &Segment,
    limit: Option<(u64, Seq)>,
    payloads: impl Fn(&RecordHeader) -> bool,
    visit: impl FnMut(RecordRef<'_>) -> Result<()>,
) -> Result<WalkEnd> {
    walk_segment_from(segment, (SEGMENT_HEADER_LEN, segment.first_seq), limit, payloads, visit)
}

/// [`walk_segment`] from byte `start.0` of the segment, where record `start.1` begins.
fn walk_segment_from(
    segment: &Segment,
    start: (u64, Seq),
    limit: Option<(u64, Seq)>,
    payloads: impl Fn(&RecordHeader) -> bool,
    mut visit: impl FnMut(RecordRef<'_>) -> Result<()>,
) -> Result<WalkEnd> {
    let file_len = match limit {
        Some((end, _)) => end,
        None => segment.file.metadata().context(|| format!("reading size of {}", segment.path.display()))?.len(),
    };
    let mut reader = ChunkReader::new(&segment.file, &segment.path, file_len);
    let (mut pos, mut expected) = start;
    let fault = loop {
        if pos + HEADER_LEN as u64 > file_len {
            // Zeroes too few for a header: the unused rest of a segment whose size is not a
            // multiple of the record alignment.
            let rest = reader.read_at(pos, (file_len - pos) as usize)?;
            break rest.iter().any(|&b| b != 0).then(|| "short record header".to_string());
        }
        let bytes: [u8; HEADER_LEN] =
            reader.read_at(pos, HEADER_LEN)?.try_into().expect("read_at returns full header inside the file");
        let header = match RecordHeader::decode(&bytes) {
            Ok(header) => header,
            // Zeroes: the never-written (or cleared) rest of the segment.
            Err(record::HeaderFault::NoMagic) if bytes.iter().all(|&b| b == 0) => break None,
            Err(record::HeaderFault::NoMagic) => break Some("no record here".to_string()),
            Err(fault) => break Some(fault.to_string()),
        };
        // A record of the segment's earlier life: the end of this one's.
        if header.seq < expected {
            break None;
        }
        if header.seq != expected {
            break Some(format!("sequence {} where {expected} was expected", header.seq));
        }
        let record_end = pos + header.record_len();
        if record_end > file_len {
            break Some("record runs past the end of the segment".to_string());
        }
        let payload = if payloads(&header) {
            let payload = reader.read_at(pos + HEADER_LEN as u64, header.payload_len as usize)?;
            if crc32c::crc32c(payload) != header.payload_crc {
                break Some("payload checksum mismatch".to_string());
            }
            Some(payload)
        } else {
            None
        };
        visit(RecordRef { header, segment, position: pos, payload })?;
        // Records tend to come in runs of similar sizes: after a large one, the next header is
        // read alone rather than with a chunk of (probably skipped) payload behind it.
        reader.read_ahead(header.record_len() < SKIP_READ_AHEAD_FROM);
        pos = record_end;
        expected += 1;
        if limit.is_some_and(|(_, next)| expected >= next) {
            break None;
        }
    };
    Ok(WalkEnd { end: pos, next_seq: expected, fault })
}

/// Looks past `from` in a segment file for any valid record numbered `min_seq` or later: if one
/// exists, the records before it were durable once, and a fault before it is damage, not a
/// torn tail.
fn later_valid_record(file: &File, path: &Path, from: u64, min_seq: Seq) -> Result<Option<u64>> {
    let file_len = file.metadata().context(|| format!("reading size of {}", path.display()))?.len();
    let mut reader = ChunkReader::new(file, path, file_len);
    let mut pos = from.div_ceil(record::ALIGN) * record::ALIGN;
    while pos + HEADER_LEN as u64 <= file_len {
        if let Ok(bytes) = <[u8; HEADER_LEN]>::try_from(reader.read_at(pos, HEADER_LEN)?) {
            if RecordHeader::decode(&bytes).is_ok_and(|header| header.seq >= min_seq) {
                return Ok(Some(pos));
            }
        }
        pos += record::ALIGN;
    }
    Ok(None)
}

/// Cuts the active segment's `file` back to `keep` bytes (its capacity, or the end of its
/// records if they go further) when it is longer. An append that fills a segment leaves no
/// zeroed header after its last record, so whatever lies past the capacity (the tail of a reused
/// segment's oversized record, a torn write that grew the file) would be scanned as if it
/// followed that record: a torn tail at the next open, or a stale record taken for a new one.
fn cut_past(file: &File, path: &Path, keep: u64) -> Result<()> {
    let len = file.metadata().context(|| format!("reading size of {}", path.display()))?.len();
    if len > keep {
        file.set_len(keep).context(|| format!("cutting {} to {keep} bytes", path.display()))?;
    }
    Ok(())
}

/// The segment indexes in `dir`, oldest first. Only names exactly as [`Segment::file_name`]
/// makes them count: anything else (`0.seg`, upper case, a sign) is left alone with a warning,
/// so a stray file can never stand for a segment twice. Spares a crash left half-made are
/// removed.
fn list_segments(dir: &Path) -> Result<Vec<u64>> {
    let mut indexes = Vec::new();
    for entry in fs::read_dir(dir).context(|| format!("listing {}", dir.display()))? {
        let entry = entry.context(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(PREPARING_PREFIX) {
            fs::remove_file(entry.path()).context(|| format!("removing {}", entry.path().display()))?;
        } else if let Some(index) = Segment::parse_file_name(&name) {
            indexes.push(index);
        } else if name.ends_with(".seg") && !name.starts_with(SPARE_PREFIX) {
            log::warn!("journal: ignoring {}: not a segment name", entry.path().display());
        }
    }
    indexes.sort_unstable();
    Ok(indexes)
}

/// Reads and checks a segment's header: Ok(Err(reason)) when it cannot start segment `index`
/// of this store after `expected` (a torn start or damage, as the scan decides); Err when the
/// segment belongs to another store or format, which no crash of this one explains.
fn read_segment_header(
    file: &File,
    path: &Path,
    store_uuid: [u8; 16],
    index: u64,
    expected: Option<Seq>,
) -> Result<std::result::Result<SegmentHeader, String>> {
    let mut bytes = [0u8; SEGMENT_HEADER_LEN as usize];
    let read = fsutil::read_up_to_at(file, &mut bytes, 0).context(|| format!("reading {}", path.display()))?;
    if read < bytes.len() {
        return Ok(Err(format!("segment header missing (the file has {read} bytes)")));
    }
    let header = match SegmentHeader::decode(&bytes, path) {
        Ok(header) => header,
        Err(Error::JournalCorrupt { reason, .. }) => return Ok(Err(reason)),
        Err(other) => return Err(other),
    };
    if header.store_uuid != store_uuid {
        return Err(Error::JournalCorrupt {
            segment: path.to_path_buf(),
            offset: 0,
            reason: "segment belongs to another store".into(),
        });
    }
    if header.index != index {
        return Ok(Err(format!("segment header names segment {:x} (a reused segment not restarted)", header.index)));
    }
    // The oldest segment's number: far below where numbering could ever reach, and far enough
    // above any journal's worth of records that counting on from here cannot overflow. Later
    // segments continue that count (checked below), wherever it has got to.
    if header.first_seq == 0 || (expected.is_none() && header.first_seq > MAX_FIRST_SEQ) {
        return Ok(Err(format!("segment starts at an impossible sequence number {}", header.first_seq)));
    }
    if let Some(expected) = expected {
        if header.first_seq != expected {
            return Ok(Err(format!("segment starts at {} where {expected} was expected", header.first_seq)));
        }
    }
    Ok(Ok(header))
}

impl Journal {
    fn without_segments(dir: &Path, store_uuid: [u8; 16], segment_capacity: u64, next_segment_index: u64) -> Self {
        Self {
            dir: dir.to_path_buf(),
            store_uuid,
            segment_capacity,
            segments: Vec::new(),
            last_timestamp_ns: 0,
            next_segment_index,
            unsynced: Vec::new(),
            spare_wanted: None,
            sealed_to: None,
            asked_for_spare: false,
            index: header_index::IndexBuilder::default(),
        }
    }

    /// Creates an empty journal whose first record will be `first_seq`.
    pub fn create(dir: &Path, store_uuid: [u8; 16], segment_capacity: u64, first_seq: Seq) -> Result<Self> {
        fs::create_dir_all(dir).context(|| format!("creating {}", dir.display()))?;
        let mut journal = Self::without_segments(dir, store_uuid, segment_capacity, 0);
        // The first segment is zero-filled too, so flushes are cheap from the first write on.
        zero_fill_spare(dir, segment_capacity, || Ok(()))?;
        journal.start_segment(first_seq)?;
        journal.sync_started_segment()?;
        Ok(journal)
    }

    /// Makes the active segment's header and directory entry durable now: for a journal that
    /// must open after a crash before its first sync (a new store, or one whose first segment
    /// was lost).
    fn sync_started_segment(&mut self) -> Result<()> {
        let active = self.active();
        active.file.sync_data().context(|| format!("syncing {}", active.path.display()))?;
        fsutil::sync_dir(&self.dir)?;
        self.unsynced.clear();
        Ok(())
    }

    /// Opens and scans the journal. Every record is passed to `visit`, with its payload when
    /// `payloads` asks for it; payloads of records past `durable_through` (the store's
    /// checkpoint) and of the last segment are always read and checked.
    ///
    /// The scan stops at the first fault: a record that does not decode, or a segment whose
    /// header is missing, stale (a reused segment whose new header never reached the disk) or
    /// does not continue the numbering. If no valid record of this journal's life lies
    /// anywhere behind the fault, it is a torn tail: what a crash left of appends, segment
    /// starts and segment reuses that were never made durable (a sync makes every earlier
    /// segment durable before a later one). The tail is cut back and the segments started in
    /// it are removed, logged and reported. A valid record behind the fault means the fault
    /// hit durable records: the open fails, naming the segment and offset.
    pub fn open(
        dir: &Path,
        store_uuid: [u8; 16],
        segment_capacity: u64,
        durable_through: Seq,
        payloads: Payloads,
        mut visit: impl FnMut(RecordRef<'_>) -> Result<()>,
    ) -> Result<(Self, Option<TailRepair>)> {
        let indexes = list_segments(dir)?;
        let (Some(&first_index), Some(&last_index)) = (indexes.first(), indexes.last()) else {
            return Err(Error::JournalCorrupt {
                segment: dir.to_path_buf(),
                offset: 0,
                reason: "no journal segments".into(),
            });
        };
        let next_index = last_index.checked_add(1).ok_or_else(|| Error::JournalCorrupt {
            segment: dir.join(Segment::file_name(last_index)),
            offset: 0,
            reason: "segment index at its limit".into(),
        })?;
        let mut journal = Self::without_segments(dir, store_uuid, segment_capacity, next_index);
        // Where the scan stopped, if not at the end of the last segment: (position in
        // `indexes`, byte offset, reason), with the segment in `journal.segments` when its
        // header was usable.
        let mut stop: Option<(usize, u64, String)> = None;
        for (i, &index) in indexes.iter().enumerate() {
            let path = dir.join(Segment::file_name(index));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .context(|| format!("opening {}", path.display()))?;
            let expected = journal.segments.last().map(|s: &Segment| s.next_seq);
            let header = match read_segment_header(&file, &path, store_uuid, index, expected)? {
                Ok(header) => header,
                Err(reason) => {
                    // An unusable header right after a walk that ended early: the fault is
                    // where that walk ended.
                    stop = Some(stop.unwrap_or((i, 0, reason)));
                    break;
                }
            };
            // The previous segment's walk ended early, but this one continues the numbering:
            // that segment simply ended there (a reused segment holds old bytes past its end).
            stop = None;
            let mut segment = Segment {
                index,
                path,
                file: Arc::new(file),
                first_seq: header.first_seq,
                next_seq: header.first_seq,
                end: SEGMENT_HEADER_LEN,
                first_timestamp_ns: 0,
                last_timestamp_ns: 0,
            };
            let is_last = i + 1 == indexes.len();
            let mut timestamps = (0u64, 0u64);
            let walked = walk_segment(
                &segment,
                None,
                |h| is_last || h.seq > durable_through || payloads.wanted(h.kind),
                |rec| {
                    if timestamps.0 == 0 {
                        timestamps.0 = rec.header.timestamp_ns;
                    }
                    timestamps.1 = rec.header.timestamp_ns;
                    visit(rec)
                },
            )?;
            segment.end = walked.end;
            segment.next_seq = walked.next_seq;
            (segment.first_timestamp_ns, segment.last_timestamp_ns) = timestamps;
            journal.last_timestamp_ns = journal.last_timestamp_ns.max(segment.last_timestamp_ns);
            // A process that crashed may have left its appends unsynced in the page cache.
            journal.unsynced.push(Arc::clone(&segment.file));
            journal.segments.push(segment);
            if let Some(reason) = walked.fault {
                stop = Some((i, walked.end, reason));
            }
        }
        let repair = match stop {
            Some((position, offset, reason)) => {
                Some(journal.cut_torn_tail(&indexes[position..], offset, reason, durable_through)?)
            }
            None => None,
        };
        if journal.segments.is_empty() {
            // Only a journal that never made a record durable can lose its first segment.
            if first_index != 0 || durable_through != 0 {
                return Err(Error::JournalCorrupt {
                    segment: dir.join(Segment::file_name(first_index)),
                    offset: 0,
                    reason: "the oldest segment is unusable".into(),
                });
            }
            journal.next_segment_index = 0;
            journal.start_segment(1)?;
            journal.sync_started_segment()?;
        }
        let active = journal.active();
        cut_past(&active.file, &active.path, active.end.max(segment_capacity))?;
        journal.prefetch_active();
        Ok((journal, repair))
    }

    /// Cuts the journal back at `offset` of the first of `tail` (segment indexes, the first
    /// one also the last scanned segment when its header was usable) and removes the other
    /// segments, unless a valid record of this life lies behind the cut.
    fn cut_torn_tail(&mut self, tail: &[u64], offset: u64, reason: String, durable_through: Seq) -> Result<TailRepair> {
        let next_seq = self.segments.last().map_or(durable_through + 1, |s| s.next_seq);
        let first_path = self.dir.join(Segment::file_name(tail[0]));
        let cut_in_scanned = self.segments.last().is_some_and(|s| s.index == tail[0]);
        for (i, &index) in tail.iter().enumerate() {
            let path = self.dir.join(Segment::file_name(index));
            let file = File::open(&path).context(|| format!("opening {}", path.display()))?;
            let from = if i == 0 && cut_in_scanned { offset + 1 } else { SEGMENT_HEADER_LEN };
            if let Some(found) = later_valid_record(&file, &path, from, next_seq)? {
                log::error!(
                    "journal: {} holds a valid record at offset {found} behind damage in {} at offset {offset}",
                    path.display(),
                    first_path.display()
                );
                return Err(Error::JournalCorrupt { segment: first_path, offset, reason });
            }
        }
        if next_seq <= durable_through {
            log::error!("journal: records {next_seq}..={durable_through} were durable but are damaged; they are lost");
        }
        let mut discarded_bytes = 0;
        if cut_in_scanned {
            let active = self.active();
            let file_len = active.file.metadata().context(|| "reading segment size".to_string())?.len();
            discarded_bytes += file_len.saturating_sub(offset);
            // Cut the torn bytes off so a later crash cannot mistake them for records.
            active.file.set_len(offset).context(|| format!("cutting the torn tail of {}", active.path.display()))?;
            active.file.sync_data().context(|| format!("syncing {}", active.path.display()))?;
        }
        let removed = if cut_in_scanned { &tail[1..] } else { tail };
        for &index in removed {
            let path = self.dir.join(Segment::file_name(index));
            discarded_bytes += fs::metadata(&path).map_or(0, |m| m.len());
            fs::remove_file(&path).context(|| format!("removing {}", path.display()))?;
        }
        if let Some(&first_removed) = removed.first() {
            self.next_segment_index = first_removed;
            fsutil::sync_dir(&self.dir)?;
        }
        log::warn!(
            "journal: torn tail in {} at offset {offset}: {reason}; kept records up to seq {}, removed {} segment \
             file(s) started after them, {discarded_bytes} bytes in all",
            first_path.display(),
            next_seq.saturating_sub(1),
            removed.len()
        );
        Ok(TailRepair { segment: first_path, offset, reason, discarded_bytes })
    }

    pub fn next_seq(&self) -> Seq {
        self.active().next_seq
    }

    /// Sequence number of the oldest record still held, or `next_seq` when there is none.
    pub fn first_seq(&self) -> Seq {
        self.segments[0].first_seq
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    pub fn active(&self) -> &Segment {
        self.segments.last().expect("a journal always has an active segment")
    }

    pub fn total_bytes(&self) -> u64 {
        self.segments.iter().map(Segment::used_bytes).sum()
    }

    pub fn view(&self) -> JournalView {
        JournalView { segments: self.segments.clone() }
    }

    /// Appends `records` in order with one vectored write per segment they land in. Returns the
    /// sequence number of the first. On error nothing is appended: the numbers are not used and
    /// whatever bytes reached the file past the old end are overwritten by the next append.
    pub fn append(&mut self, records: &[NewRecord<'_>]) -> Result<Seq> {
        if !self.asked_for_spare {
            self.asked_for_spare = true;
            self.want_spare();
        }
        let first = self.next_seq();
        let mut start = 0;
        while start < records.len() {
            let active_end = self.active().end;
            let mut fit_end = active_end;
            let mut count = 0;
            for record in &records[start..] {
                let len = HEADER_LEN as u64 + record::padded_len(record.length_of_payload());
                if fit_end + len > self.segment_capacity && (fit_end > SEGMENT_HEADER_LEN || count > 0) {
                    break;
                }
                fit_end += len;
                count += 1;
            }
            if count == 0 {
                self.roll_over()?;
                continue;
            }
            self.append_to_active(&records[start..start + count])?;
            start += count;
        }
        Ok(first)
    }

    fn append_to_active(&mut self, records: &[NewRecord<'_>]) -> Result<()> {
        static PADDING: [u8; record::ALIGN as usize] = [0; record::ALIGN as usize];
        static END_OF_RECORDS: [u8; HEADER_LEN] = [0; HEADER_LEN];
        let now = fsutil::now_ns().max(self.last_timestamp_ns);
        let active = self.segments.last().expect("active segment");
        let headers: Vec<[u8; HEADER_LEN]> = records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let payload_len = r.length_of_payload();
                RecordHeader {
                    kind: r.kind,
                    seq: active.next_seq + i as u64,
                    timestamp_ns: now,
                    offset: r.offset,
                    length: r.length,
                    payload_len: payload_len as u32,
                    payload_crc: record::payload_crc(r.payload),
                }
                .encode()
            })
            .collect();
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(records.len() * 3);
        let mut total = 0u64;
        for (header, record) in headers.iter().zip(records) {
            slices.push(IoSlice::new(header));
            slices.extend(record.payload.iter().filter(|p| !p.is_empty()).map(|p| IoSlice::new(p)));
            let payload_len = record.length_of_payload();
            let padding = (record::padded_len(payload_len) - payload_len) as usize;
            if padding > 0 {
                slices.push(IoSlice::new(&PADDING[..padding]));
            }
            total += HEADER_LEN as u64 + record::padded_len(payload_len);
        }
        // Zeroes after the last record end the segment for the scanner: a reused segment holds
        // an earlier life's bytes there, which a clean reopen would otherwise take for a torn
        // record. The next append overwrites them.
        if active.end + total + HEADER_LEN as u64 <= self.segment_capacity {
            slices.push(IoSlice::new(&END_OF_RECORDS));
        }
        fsutil::write_all_vectored_at(&active.file, &slices, active.end)
            .context(|| format!("appending to {}", active.path.display()))?;
        let mut position = active.end;
        for record in records {
            self.index.push(record.kind, record.offset, record.length, position + HEADER_LEN as u64);
            position += HEADER_LEN as u64 + record::padded_len(record.length_of_payload());
        }
        let active = self.segments.last_mut().expect("active segment");
        if active.is_empty() {
            active.first_timestamp_ns = now;
        }
        active.last_timestamp_ns = now;
        active.end += total;
        active.next_seq += records.len() as u64;
        self.last_timestamp_ns = now;
        Ok(())
    }

    /// Seals the active segment and starts the next one. The sealed segment is synced by the
    /// next `sync`, not here: appends never wait for the disk.
    fn roll_over(&mut self) -> Result<()> {
        let sealed = Arc::clone(&self.active().file);
        let next = self.active().next_seq;
        if let Some(sealed_to) = &self.sealed_to {
            let _ = sealed_to.send(Some((Arc::clone(&sealed), self.active().end)));
        }
        self.unsynced.push(sealed);
        std::mem::take(&mut self.index).write(self.active());
        self.start_segment(next)
    }

    /// Every file a sync must flush for all appended records to be durable.
    pub fn sync_targets(&self) -> Vec<Arc<File>> {
        self.unsynced.iter().cloned().chain(std::iter::once(self.active_file())).collect()
    }

    /// Forgets sealed segments that `synced` made durable.
    pub fn mark_synced(&mut self, synced: &[Arc<File>]) {
        self.unsynced.retain(|f| !synced.iter().any(|s| Arc::ptr_eq(s, f)));
    }

    fn start_segment(&mut self, first_seq: Seq) -> Result<()> {
        let index = self.next_segment_index;
        let path = self.dir.join(Segment::file_name(index));
        let reused = match spare_paths(&self.dir)?.into_iter().next() {
            Some(spare) => {
                fs::rename(&spare, &path).context(|| format!("reusing {}", spare.display()))?;
                true
            }
            None => false,
        };
        if self.asked_for_spare {
            self.want_spare();
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .context(|| format!("creating {}", path.display()))?;
        if reused {
            cut_past(&file, &path, self.segment_capacity)?;
        } else {
            // Appends into reserved blocks cost a fraction of appends that allocate as they go.
            fsutil::preallocate(&file, self.segment_capacity);
        }
        // An index left by a segment of this number that a crash cut off would not describe
        // this one (and is checked before use anyway).
        header_index::remove(&path);
        self.index = header_index::IndexBuilder::complete();
        let header = SegmentHeader { store_uuid: self.store_uuid, index, first_seq };
        // A reused segment still holds its old records past the header; they are numbered below
        // `first_seq`, so the scanner never takes them for this life's records.
        file.write_all_at(&header.encode(), 0).context(|| format!("writing {}", path.display()))?;
        // The new file's header and directory entry become durable with the next sync, like the
        // records: a roll-over never waits for the disk while appends wait for it.
        let dir = File::open(&self.dir).context(|| format!("opening {}", self.dir.display()))?;
        self.unsynced.push(Arc::new(dir));
        self.next_segment_index += 1;
        self.segments.push(Segment {
            index,
            path,
            file: Arc::new(file),
            first_seq,
            next_seq: first_seq,
            end: SEGMENT_HEADER_LEN,
            first_timestamp_ns: 0,
            last_timestamp_ns: 0,
        });
        Ok(())
    }

    /// Reads the rest of the active segment into the page cache in the background (see
    /// [`fsutil::prefetch`]), for a journal opened after its pages may have left the cache;
    /// spares are read ahead by the [`SparePreparer`].
    fn prefetch_active(&self) {
        let active = self.active();
        if let Err(e) = fsutil::prefetch(&active.file, active.end, self.segment_capacity.saturating_sub(active.end)) {
            log::debug!("journal: cannot read {} ahead: {e}", active.path.display());
        }
    }

    /// Has `preparer` keep a spare segment ready for the next roll-over.
    pub fn use_preparer(&mut self, preparer: &SparePreparer) {
        self.spare_wanted = Some(preparer.wake.clone());
    }

    /// Has `dropper` write back and uncache every segment sealed from now on.
    pub fn use_cache_dropper(&mut self, dropper: &CacheDropper) {
        self.sealed_to = Some(dropper.sealed.clone());
    }

    fn want_spare(&self) {
        if let Some(wake) = &self.spare_wanted {
            // A full channel means a request is already pending.
            let _ = wake.try_send(());
        }
    }

    /// Frees the oldest `count` segments (never the active one), keeping a few for reuse.
    /// The caller has made sure nothing still needs their records.
    pub fn free_oldest(&mut self, count: usize) -> Result<()> {
        let count = count.min(self.segments.len() - 1);
        let mut spares = spare_paths(&self.dir)?.len();
        let freed: Vec<Arc<File>> = self.segments[..count].iter().map(|s| Arc::clone(&s.file)).collect();
        self.mark_synced(&freed);
        for segment in self.segments.drain(..count) {
            header_index::remove(&segment.path);
            if spares < MAX_SPARE_SEGMENTS {
                let spare = self.dir.join(format!("{SPARE_PREFIX}{:016x}.seg", segment.index));
                fs::rename(&segment.path, &spare).context(|| format!("retiring {}", segment.path.display()))?;
                spares += 1;
            } else {
                fs::remove_file(&segment.path).context(|| format!("removing {}", segment.path.display()))?;
            }
        }
        fsutil::sync_dir(&self.dir)
    }

    /// The active segment's file, for syncing without holding the journal.
    pub fn active_file(&self) -> Arc<File> {
        Arc::clone(&self.active().file)
    }
}

/// The spare segments in `dir`, in the order they are reused: freed segments (whose pages may
/// still be cached) before zero-filled ones.
fn spare_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut spares = Vec::new();
    for entry in fs::read_dir(dir).context(|| format!("listing {}", dir.display()))? {
        let entry = entry.context(|| format!("listing {}", dir.display()))?;
        if entry.file_name().to_string_lossy().starts_with(SPARE_PREFIX) {
            spares.push(entry.path());
        }
    }
    spares.sort();
    Ok(spares)
}

/// Spare file names, in the order roll-overs take them: freed segments (`spare-<index>`, whose
/// blocks are written already), then zero-filled ones, then reserved ones.
const ZERO_FILLED_SPARE: &str = "z";
const RESERVED_SPARE: &str = "zz";

fn is_reserved_spare(path: &Path) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    name.strip_prefix(SPARE_PREFIX).is_some_and(|rest| rest.starts_with(RESERVED_SPARE))
}

/// Reserves (`fallocate`) a spare segment in `dir` unless one is ready: quick, so that a
/// roll-over does not have to reserve blocks itself while every append waits for it.
/// Returns whether it made one.
pub fn reserve_spare(dir: &Path, capacity: u64) -> Result<bool> {
    if !spare_paths(dir)?.is_empty() {
        return Ok(false);
    }
    let stamp = fsutil::now_ns();
    let preparing = dir.join(format!("{PREPARING_PREFIX}{stamp:016x}.tmp"));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&preparing)
        .context(|| format!("creating {}", preparing.display()))?;
    fsutil::preallocate(&file, capacity);
    let spare = dir.join(format!("{SPARE_PREFIX}{RESERVED_SPARE}{stamp:016x}.seg"));
    fs::rename(&preparing, &spare).context(|| format!("renaming {}", preparing.display()))?;
    Ok(true)
}

/// Zero-fills a new spare segment in `dir` unless one better than reserved is ready. Appends
/// into written zeroes make each `fdatasync` cheaper than appends into reserved (unwritten)
/// blocks, as with a database's preallocated log files. Returns whether it made one (not on
/// file systems in memory, where it would not help). `between_chunks` runs after each MiB
/// (see [`fsutil::create_zeroed`]).
pub fn zero_fill_spare(dir: &Path, capacity: u64, between_chunks: impl FnMut() -> std::io::Result<()>) -> Result<bool> {
    if spare_paths(dir)?.iter().any(|spare| !is_reserved_spare(spare)) {
        return Ok(false);
    }
    let stamp = fsutil::now_ns();
    let preparing = dir.join(format!("{PREPARING_PREFIX}{stamp:016x}.tmp"));
    if !fsutil::create_zeroed(&preparing, capacity, between_chunks)
        .context(|| format!("zero-filling {}", preparing.display()))?
    {
        return Ok(false);
    }
    let spare = dir.join(format!("{SPARE_PREFIX}{ZERO_FILLED_SPARE}{stamp:016x}.seg"));
    fs::rename(&preparing, &spare).context(|| format!("renaming {}", preparing.display()))?;
    Ok(true)
}

/// Reads the spare that the next roll-over takes into the page cache (see [`fsutil::prefetch`]):
/// best effort, as it only saves time.
fn prefetch_next_spare(dir: &Path) {
    let prefetched = (|| -> Result<()> {
        if let Some(spare) = spare_paths(dir)?.into_iter().next() {
            let file = File::open(&spare).context(|| format!("opening {}", spare.display()))?;
            let len = file.metadata().context(|| format!("reading {}", spare.display()))?.len();
            fsutil::prefetch(&file, 0, len).context(|| format!("reading {} ahead", spare.display()))?;
        }
        Ok(())
    })();
    if let Err(e) = prefetched {
        log::debug!("journal: {e}");
    }
}

/// The preparer's pause per MiB zero-filled: at most ~64 MB/s, so that it never competes with
/// a busy journal for the disk (it then simply falls behind, and segments start reserved
/// rather than zero-filled), while a flush-bound journal (tens of MB/s) always finds a spare.
const SPARE_PACE: Duration = Duration::from_millis(16);

/// A thread that keeps a spare segment ready, off the write path: reserved at once, then
/// zero-filled at a gentle pace, and read into the page cache before it is needed.
pub struct SparePreparer {
    wake: SyncSender<()>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SparePreparer {
    pub fn spawn(dir: &Path, capacity: u64) -> Self {
        let (wake, wanted) = mpsc::sync_channel::<()>(1);
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let dir = dir.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("rewind-spares".into())
            .spawn(move || {
                fsutil::enter_housekeeping();
                while wanted.recv().is_ok() && !stopping.load(Ordering::Relaxed) {
                    let pace = || {
                        if stopping.load(Ordering::Relaxed) {
                            return Err(std::io::Error::new(std::io::ErrorKind::Interrupted, "the store is closing"));
                        }
                        std::thread::sleep(SPARE_PACE);
                        Ok(())
                    };
                    if let Err(e) = reserve_spare(&dir, capacity) {
                        log::warn!("journal: cannot reserve a spare segment: {e}");
                    }
                    prefetch_next_spare(&dir);
                    if let Err(e) = zero_fill_spare(&dir, capacity, pace) {
                        log::warn!("journal: cannot zero-fill a spare segment: {e}");
                    }
                    prefetch_next_spare(&dir);
                }
            })
            .map_err(|e| log::warn!("journal: no spare-segment thread: {e}"))
            .ok();
        Self { wake, stop, thread }
    }
}

impl Drop for SparePreparer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.wake.try_send(());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A sealed segment's file and its length, or `None` to stop the [`CacheDropper`].
type SealedMessage = Option<(Arc<File>, u64)>;

/// Writes sealed segments back and drops them from the page cache, off the write path, so
/// their pages go back to the allocator and soon hold the next segment's records. Reusing
/// freed pages is several times cheaper than touching new ones on virtual machines whose free
/// memory is handed back to the host (see the README's benchmarks). This is cache management
/// only: durability still comes from `sync`.
pub struct CacheDropper {
    sealed: mpsc::Sender<SealedMessage>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CacheDropper {
    /// Segments sealed while `retention_floor` holds the journal (anything but `Seq::MAX`) stay
    /// cached: a reader is about to copy them elsewhere (replication), and would otherwise read
    /// them back from the disk.
    pub fn spawn(retention_floor: Arc<AtomicU64>) -> Self {
        let (sealed, segments) = mpsc::channel::<SealedMessage>();
        let thread = std::thread::Builder::new()
            .name("rewind-uncache".into())
            .spawn(move || {
                fsutil::enter_housekeeping();
                while let Ok(Some((file, len))) = segments.recv() {
                    if retention_floor.load(Ordering::Relaxed) != Seq::MAX {
                        continue;
                    }
                    if let Err(e) = fsutil::write_back_and_uncache(&file, len) {
                        log::debug!("journal: cannot uncache a sealed segment: {e}");
                    }
                }
            })
            .map_err(|e| log::warn!("journal: no uncache thread: {e}"))
            .ok();
        Self { sealed, thread }
    }
}

impl Drop for CacheDropper {
    fn drop(&mut self) {
        let _ = self.sealed.send(None);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl NewRecord<'_> {
    fn length_of_payload(&self) -> u64 {
        self.payload.iter().map(|p| p.len() as u64).sum()
    }
}

/// The segments of a journal at one instant. Records appended later are not seen; segments
/// freed later must not be freed while a view is in use (the store serialises the two).
#[derive(Clone)]
pub struct JournalView {
    segments: Vec<Segment>,
}

impl JournalView {
    /// The segments, oldest first.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    pub fn first_seq(&self) -> Seq {
        self.segments.first().map_or(0, |s| s.first_seq)
    }

    pub fn next_seq(&self) -> Seq {
        self.segments.last().map_or(0, |s| s.next_seq)
    }

    pub fn segment(&self, index: u64) -> Option<&Segment> {
        self.segments.iter().find(|s| s.index == index)
    }

    /// The segments holding records with `from <= seq <= to` (none when `from > to`).
    fn segments_holding(&self, from: Seq, to: Seq) -> impl Iterator<Item = &Segment> {
        self.segments.iter().filter(move |s| from <= to && s.next_seq > from && s.first_seq <= to)
    }

    /// Visits every record with `from <= seq <= to`, in order, reading and checking payloads as
    /// asked. Any fault inside the view is damage.
    pub fn for_each(
        &self,
        from: Seq,
        to: Seq,
        payloads: Payloads,
        mut visit: impl FnMut(RecordRef<'_>) -> Result<()>,
    ) -> Result<()> {
        for segment in self.segments_holding(from, to) {
            let walked = walk_segment(
                segment,
                Some((segment.end, segment.next_seq.min(to + 1))),
                |h| h.seq >= from && payloads.wanted(h.kind),
                |rec| if rec.header.seq >= from { visit(rec) } else { Ok(()) },
            )?;
            if let Some(reason) = walked.fault {
                return Err(Error::JournalCorrupt { segment: segment.path.clone(), offset: walked.end, reason });
            }
        }
        Ok(())
    }

    /// Visits the records with `from <= seq <= to` in order, without their payloads: from the
    /// segments' header indexes where they have usable ones, else by walking the segments.
    pub fn for_each_header(
        &self,
        from: Seq,
        to: Seq,
        mut visit: impl FnMut(&Segment, header_index::IndexedRecord) -> Result<()>,
    ) -> Result<()> {
        let active = self.segments.last().map(|s| s.index);
        for segment in self.segments_holding(from, to) {
            let in_range = |seq: Seq| seq >= from && seq <= to;
            match header_index::read(segment) {
                Some(records) => {
                    for record in records.into_iter().filter(|r| in_range(r.seq)) {
                        visit(segment, record)?;
                    }
                }
                // A sealed segment without a usable index (the first of a new journal, the one
                // active when the store was opened, or its index damaged) is walked whole, so
                // that it gets one for the next view; the active segment, still growing, only
                // as far as asked.
                None => {
                    let sealed = Some(segment.index) != active;
                    let (mut index, walk_to) = match sealed {
                        true => (header_index::IndexBuilder::complete(), segment.next_seq - 1),
                        false => (header_index::IndexBuilder::default(), to),
                    };
                    // The newest record visited (or passed over) so far.
                    let mut walked = None;
                    let one = JournalView { segments: vec![segment.clone()] };
                    let outcome = one.for_each(segment.first_seq, walk_to, Payloads::Skip, |rec| {
                        let h = rec.header;
                        index.push(h.kind, h.offset, h.length, rec.payload_position());
                        if in_range(h.seq) {
                            let payload_position = rec.payload_position();
                            let (kind, offset, length) = (h.kind, h.offset, h.length);
                            visit(
                                segment,
                                header_index::IndexedRecord { seq: h.seq, kind, offset, length, payload_position },
                            )?;
                        }
                        walked = Some(h.seq);
                        Ok(())
                    });
                    match outcome {
                        Ok(()) => index.write(segment),
                        // Damage past the records asked for costs the segment its index only.
                        Err(e) if walked.is_some_and(|seq| seq >= to) => {
                            log::warn!("journal: not indexing {}: {e}", segment.path.display())
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(())
    }

    /// [`for_each`](Self::for_each) from record `from`, which a previous walk found starting at
    /// byte `position` of segment `segment` (a replication reader remembers where it stopped,
    /// rather than walk the segment from its start again). A position that does not hold
    /// record `from` is damage.
    pub fn for_each_from_position(
        &self,
        from: Seq,
        (segment, position): (u64, u64),
        to: Seq,
        payloads: Payloads,
        mut visit: impl FnMut(RecordRef<'_>) -> Result<()>,
    ) -> Result<()> {
        let Some(first) = self.segment(segment).filter(|s| s.first_seq <= from && from < s.next_seq) else {
            return self.for_each(from, to, payloads, visit);
        };
        if from > to {
            return Ok(());
        }
        let until = first.next_seq.min(to + 1);
        let walked = walk_segment_from(
            first,
            (position, from),
            Some((first.end, until)),
            |h| payloads.wanted(h.kind),
            &mut visit,
        )?;
        // A walk that ended early found no record `from` (or a gap after it) at that position.
        let fault = walked.fault.or_else(|| {
            (walked.next_seq != until).then(|| format!("record {} is not where it was found before", walked.next_seq))
        });
        if let Some(reason) = fault {
            return Err(Error::JournalCorrupt { segment: first.path.clone(), offset: walked.end, reason });
        }
        self.for_each(first.next_seq, to, payloads, visit)
    }

    /// Sequence number of the last record with a timestamp at or before `time_ns`, if any.
    pub fn last_at_or_before(&self, time_ns: u64) -> Result<Option<Seq>> {
        let mut found = None;
        for segment in &self.segments {
            if segment.is_empty() || segment.first_timestamp_ns > time_ns {
                break;
            }
            if segment.last_timestamp_ns <= time_ns {
                found = segment.last_seq();
                continue;
            }
            self.for_each(segment.first_seq, segment.next_seq - 1, Payloads::Skip, |rec| {
                if rec.header.timestamp_ns <= time_ns {
                    found = Some(rec.header.seq);
                }
                Ok(())
            })?;
            break;
        }
        Ok(found)
    }

    /// Reads `buf.len()` payload bytes at `position` of `segment`.
    pub fn read_payload(segment: &Segment, position: u64, buf: &mut [u8]) -> Result<()> {
        segment
            .file
            .read_exact_at(buf, position)
            .context(|| format!("reading {} at {position}", segment.path.display()))
    }
}

#[cfg(test)]
mod tests;
