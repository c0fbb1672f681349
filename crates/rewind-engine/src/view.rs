//! Point-in-time views: the volume as it was at a retained point, read in place.
//!
//! Recovery copies (the snapshot, then the journal replayed on top). A view copies nothing: it
//! is an index from every volume range to where that range's content at the point lives — a
//! journal record's payload, a snapshot delta's data, zeroes, or (for ranges nothing after the
//! base touched) the base image. It is built from the extent tables of the snapshot chain up
//! to the newest snapshot at or before the point, and the record headers after it (from the
//! segments' header indexes, `journal::header_index`, where they have them); payloads are not
//! read, so building costs in proportion to the extents and records, not the data.
//!
//! The view keeps its own handles on every file it reads, and while it is open the store keeps
//! the files' content as it was ([`ViewPins`]): no journal segment holding a record after the
//! view's snapshot is freed, and nothing is merged into the base.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::extent_map::{ExtentMap, ExtentSource, SortedExtents};
use crate::journal::segment::Segment;
use crate::journal::{JournalView, RecordKind};
use crate::snapshot::SnapshotStore;
use crate::Seq;

/// Where one extent of the view reads from. Ranges the map does not hold read from the base.
#[derive(Debug, Clone, Copy)]
enum Location {
    Zero,
    /// `delta` indexes [`PointView::deltas`].
    Delta {
        delta: u32,
        position: u64,
    },
    /// `segment` indexes [`PointView::segments`].
    Journal {
        segment: u32,
        position: u64,
    },
}

// docs/format.md gives a view's bytes per extent from this size.
const _: () = assert!(std::mem::size_of::<Location>() == 16);

impl ExtentSource for Location {
    fn skip(self, bytes: u64) -> Self {
        match self {
            Self::Zero => Self::Zero,
            Self::Delta { delta, position } => Self::Delta { delta, position: position + bytes },
            Self::Journal { segment, position } => Self::Journal { segment, position: position + bytes },
        }
    }
}

/// The volume as it was after record `seq`, read from the store's files in place.
pub struct PointView {
    seq: Seq,
    snapshot_seq: Seq,
    volume_size: u64,
    base: File,
    deltas: Vec<Arc<File>>,
    segments: Vec<Segment>,
    map: SortedExtents<Location>,
    _pin: Option<ViewPin>,
}

impl PointView {
    /// Builds the view of point `seq` from the chain up to snapshot `snapshot_seq` (the newest
    /// at or before `seq`) and the records of `journal` after it.
    pub(crate) fn build(snapshots: &SnapshotStore, journal: &JournalView, snapshot_seq: Seq, seq: Seq) -> Result<Self> {
        let base = snapshots.open_base()?;
        let mut map = ExtentMap::new();
        let (_, delta_seqs) = snapshots.chain_through(snapshot_seq);
        let mut deltas = Vec::with_capacity(delta_seqs.len());
        for delta_seq in delta_seqs {
            let (file, extents) = snapshots.read_delta_table(delta_seq)?;
            let delta = deltas.len() as u32;
            for extent in extents {
                let location = match extent.is_zero() {
                    true => Location::Zero,
                    false => Location::Delta { delta, position: extent.data_position },
                };
                map.insert(extent.offset, extent.len, location);
            }
            deltas.push(Arc::new(file));
        }
        if snapshot_seq < seq && (journal.first_seq() > snapshot_seq + 1 || journal.next_seq() <= seq) {
            return Err(Error::Unrecoverable {
                requested: format!("seq {seq}"),
                oldest: journal.first_seq().saturating_sub(1),
                head: journal.next_seq().saturating_sub(1),
            });
        }
        let mut segments: Vec<Segment> = Vec::new();
        journal.for_each_header(snapshot_seq + 1, seq, |segment, record| {
            let location = match record.kind {
                RecordKind::Write => {
                    if segments.last().is_none_or(|s| s.index != segment.index) {
                        segments.push(segment.clone());
                    }
                    Location::Journal { segment: segments.len() as u32 - 1, position: record.payload_position }
                }
                RecordKind::WriteZeroes | RecordKind::Discard => Location::Zero,
                RecordKind::Marker | RecordKind::Snapshot => return Ok(()),
            };
            map.insert(record.offset, record.length, location);
            Ok(())
        })?;
        Ok(Self {
            seq,
            snapshot_seq,
            volume_size: snapshots.volume_size(),
            base,
            deltas,
            segments,
            map: map.into(),
            _pin: None,
        })
    }

    pub(crate) fn pinned_by(mut self, pin: ViewPin) -> Self {
        self._pin = Some(pin);
        self
    }

    /// The point: the volume as it was after this record.
    pub fn seq(&self) -> Seq {
        self.seq
    }

    /// The snapshot the view starts from.
    pub fn snapshot_seq(&self) -> Seq {
        self.snapshot_seq
    }

    pub fn volume_size(&self) -> u64 {
        self.volume_size
    }

    /// Extents the index holds (ranges not reading from the base).
    pub fn extents(&self) -> usize {
        self.map.len()
    }

    /// What reads the journal segments and snapshot deltas the view reads from into the page
    /// cache: the store drops sealed segments from the cache, and a view's reads would
    /// otherwise go to the disk one by one. The base is left alone (it is as large as the
    /// volume). It holds the files only, not the view, so it may run on a thread of its own
    /// without keeping the view open.
    pub fn prefetcher(&self) -> impl FnOnce() + Send + 'static {
        let segments = self.segments.iter().map(|s| (Arc::clone(&s.file), s.end));
        let deltas = self.deltas.iter().map(|d| (Arc::clone(d), d.metadata().map_or(0, |m| m.len())));
        let files: Vec<(Arc<File>, u64)> = segments.chain(deltas).collect();
        let seq = self.seq;
        move || {
            for (file, len) in files {
                if let Err(e) = crate::fsutil::prefetch(&file, 0, len) {
                    log::debug!("view of seq {seq}: cannot read ahead: {e}");
                }
            }
        }
    }

    /// Reads `buf.len()` bytes of the volume at the point, from `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        let end = match offset.checked_add(len) {
            Some(end) if end <= self.volume_size => end,
            _ => return Err(Error::OutOfRange { offset, len, volume_size: self.volume_size }),
        };
        let mut pos = offset;
        for (start, extent_len, location) in self.map.overlapping(offset, end) {
            if start > pos {
                self.read_base(pos, &mut buf[(pos - offset) as usize..(start - offset) as usize])?;
                pos = start;
            }
            let piece_end = (start + extent_len).min(end);
            let piece = &mut buf[(pos - offset) as usize..(piece_end - offset) as usize];
            self.read_location(location.skip(pos - start), piece)?;
            pos = piece_end;
        }
        if pos < end {
            self.read_base(pos, &mut buf[(pos - offset) as usize..])?;
        }
        Ok(())
    }

    fn read_base(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.base.read_exact_at(buf, offset).context(|| format!("reading the base image at {offset}"))
    }

    fn read_location(&self, location: Location, buf: &mut [u8]) -> Result<()> {
        match location {
            Location::Zero => {
                buf.fill(0);
                Ok(())
            }
            Location::Delta { delta, position } => self.deltas[delta as usize]
                .read_exact_at(buf, position)
                .context(|| format!("reading a snapshot delta at {position}")),
            Location::Journal { segment, position } => {
                JournalView::read_payload(&self.segments[segment as usize], position, buf)
            }
        }
    }
}

/// What an open view holds on to: shown by `status` and `query-journal`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ViewPinStatus {
    /// The point the view shows.
    pub seq: Seq,
    /// The snapshot it reads from: journal records after it are kept, and nothing is merged
    /// into the base, while the view is open.
    pub snapshot_seq: Seq,
}

/// The open views of a store, so that retention leaves their files alone.
#[derive(Clone, Default)]
pub(crate) struct ViewPins {
    open: Arc<Mutex<OpenPins>>,
}

#[derive(Default)]
struct OpenPins {
    next_id: u64,
    by_id: BTreeMap<u64, ViewPinStatus>,
}

impl ViewPins {
    fn lock(&self) -> std::sync::MutexGuard<'_, OpenPins> {
        // The map is changed by single inserts and removes: a panic elsewhere cannot leave it
        // half changed.
        self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a view; it is released when the returned pin drops.
    pub(crate) fn pin(&self, status: ViewPinStatus) -> ViewPin {
        let mut open = self.lock();
        let id = open.next_id;
        open.next_id += 1;
        open.by_id.insert(id, status);
        ViewPin { pins: self.clone(), id }
    }

    /// The oldest snapshot an open view reads from, if any view is open.
    pub(crate) fn oldest_snapshot(&self) -> Option<Seq> {
        self.lock().by_id.values().map(|p| p.snapshot_seq).min()
    }

    pub(crate) fn list(&self) -> Vec<ViewPinStatus> {
        self.lock().by_id.values().cloned().collect()
    }
}

/// An open view's hold on the store's files; dropping it lets retention free them again.
pub(crate) struct ViewPin {
    pins: ViewPins,
    id: u64,
}

impl Drop for ViewPin {
    fn drop(&mut self) {
        self.pins.lock().by_id.remove(&self.id);
    }
}
