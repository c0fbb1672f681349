//! Snapshots: the volume's content at chosen sequence numbers, kept as a chain.
//!
//! The chain is rooted in a base image (`snapshots/base.img`, a sparse raw file holding the
//! volume at the base's sequence number). Every later snapshot is a delta file holding only the
//! byte ranges that changed since the snapshot before it, with their content at the snapshot's
//! point. A delta is compacted from the journal records between the two points, never read from
//! the live volume, so taking one costs in proportion to what was written and never pauses
//! guest I/O. Deltas that no recovery point needs any more are merged into the base.
//!
//! `manifest.json` lists the chain; it is replaced atomically after every file it names is
//! durable, so a crash leaves either the old chain or the new one.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::extent_map::{ExtentMap, ExtentSource};
use crate::fsutil;
use crate::journal::segment::Segment;
use crate::journal::{JournalView, RecordHeader, RecordKind, HEADER_LEN};
use crate::{Seq, FORMAT_VERSION};

const DELTA_MAGIC: [u8; 8] = *b"RWSNAPD\0";
const DELTA_HEADER_LEN: u64 = 64;
const EXTENT_ENTRY_LEN: u64 = 32;
/// Marks a table entry whose range reads as zeroes and has no data in the file.
const ZERO_EXTENT: u64 = u64::MAX;
const BASE_FILE: &str = "base.img";
const MANIFEST_FILE: &str = "manifest.json";
const COPY_CHUNK: usize = 1 << 20;

/// Why a snapshot was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotOrigin {
    /// The volume as it was when the store was created.
    Initial,
    /// Asked for by a user or the periodic timer.
    Requested,
    /// Taken by retention so that freeing the journal keeps the remaining points recoverable.
    Retention,
    /// Kept at a marker so the marker outlives the journal it was recorded in.
    Marker,
}

/// One link of the snapshot chain. (Stores written before keys were made kebab-case use
/// snake_case; both are read.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotInfo {
    /// The volume as it was after this record.
    pub seq: Seq,
    /// Why it was taken.
    pub origin: SnapshotOrigin,
    /// Wall-clock time it was taken, ns since the epoch.
    #[serde(alias = "created_ns")]
    pub created_ns: u64,
    /// Data bytes held by this link of the chain (for the base: its allocated data).
    #[serde(alias = "data_bytes")]
    pub data_bytes: u64,
    /// Extents (written or zeroed ranges) it holds.
    pub extents: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Manifest {
    #[serde(alias = "format_version")]
    format_version: u32,
    base: SnapshotInfo,
    deltas: Vec<SnapshotInfo>,
    /// Set while the first delta is being folded into the base: the base file may then hold
    /// part of it, so it is the volume at no point until open finishes the merge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    merging_into_base: Option<Seq>,
}

/// Where a range of the net effect of some records comes from ([`net_effect`]): zeroes, or
/// part of a journal payload: segment index, where the range's bytes start, and where the
/// payload they belong to starts (its checksum covers the whole payload; see
/// [`KeptRanges`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Zero,
    Journal { segment: u64, position: u64, payload: u64 },
}

impl ExtentSource for Source {
    fn skip(self, bytes: u64) -> Self {
        match self {
            Self::Zero => Self::Zero,
            Self::Journal { segment, position, payload } => {
                Self::Journal { segment, position: position + bytes, payload }
            }
        }
    }
}

pub(crate) struct DeltaExtent {
    pub(crate) offset: u64,
    pub(crate) len: u64,
    /// Where the extent's bytes are in the delta file; [`DeltaExtent::is_zero`] when none.
    pub(crate) data_position: u64,
    crc: u32,
}

impl DeltaExtent {
    /// The range reads as zeroes and has no data in the file.
    pub(crate) fn is_zero(&self) -> bool {
        self.data_position == ZERO_EXTENT
    }
}

pub struct SnapshotStore {
    dir: PathBuf,
    volume_size: u64,
    manifest: Manifest,
}

impl SnapshotStore {
    /// Creates the snapshot area with a base at seq 0 holding `initial` (a copy of the adopted
    /// image, holes kept) or an empty sparse base when there is none.
    pub fn create(
        dir: &Path,
        volume_size: u64,
        initial: Option<&File>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Self> {
        fs::create_dir_all(dir).context(|| format!("creating {}", dir.display()))?;
        let base_path = dir.join(BASE_FILE);
        let base = File::create(&base_path).context(|| format!("creating {}", base_path.display()))?;
        base.set_len(volume_size).context(|| format!("sizing {}", base_path.display()))?;
        let data_bytes = match initial {
            Some(image) => fsutil::copy_sparse(image, &base, volume_size, |done| {
                progress(done, volume_size);
                Ok(())
            })
            .context(|| format!("copying the image into {}", base_path.display()))?,
            None => 0,
        };
        base.sync_all().context(|| format!("syncing {}", base_path.display()))?;
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            base: SnapshotInfo {
                seq: 0,
                origin: SnapshotOrigin::Initial,
                created_ns: fsutil::now_ns(),
                data_bytes,
                extents: 0,
            },
            deltas: Vec::new(),
            merging_into_base: None,
        };
        let store = Self { dir: dir.to_path_buf(), volume_size, manifest };
        store.save_manifest()?;
        Ok(store)
    }

    /// Bytes of the volume the snapshots are of.
    pub fn volume_size(&self) -> u64 {
        self.volume_size
    }

    /// Opens the snapshot area of a store whose journal ends at `head`. Delta files the
    /// manifest does not name are removed, once the manifest has passed its checks.
    pub fn open(dir: &Path, volume_size: u64, head: Seq) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let text = fs::read(&path).context(|| format!("reading {}", path.display()))?;
        let manifest: Manifest = serde_json::from_slice(&text)
            .map_err(|e| Error::BadMetadata { path: path.clone(), reason: e.to_string() })?;
        if manifest.format_version != FORMAT_VERSION {
            return Err(Error::UnsupportedVersion { path, found: manifest.format_version, supported: FORMAT_VERSION });
        }
        // The manifest has no checksum of its own: check that the chain is one this store
        // could have made before anything walks it.
        let mut previous = manifest.base.seq;
        for delta in &manifest.deltas {
            if delta.seq <= previous {
                return Err(Error::BadMetadata {
                    path,
                    reason: format!("snapshot at seq {} follows one at seq {previous}", delta.seq),
                });
            }
            previous = delta.seq;
        }
        // Every snapshot is compacted from journal records: a chain reaching past the journal's
        // last record is damaged, and nothing built on it could be trusted.
        if previous > head {
            return Err(Error::BadMetadata {
                path,
                reason: format!("the snapshot chain reaches seq {previous}, past the journal's last record {head}"),
            });
        }
        if manifest.merging_into_base.is_some_and(|seq| manifest.deltas.first().is_none_or(|d| d.seq != seq)) {
            return Err(Error::BadMetadata {
                path,
                reason: "the delta being merged into the base is not the first of the chain".into(),
            });
        }
        let mut store = Self { dir: dir.to_path_buf(), volume_size, manifest };
        store.remove_unlisted_files()?;
        if store.manifest.merging_into_base.is_some() {
            log::info!("snapshots: finishing the merge of a delta into the base that a crash interrupted");
            store.merge_first_delta()?;
        }
        Ok(store)
    }

    /// Deletes delta files a crash left behind before (or after) the manifest named them.
    fn remove_unlisted_files(&self) -> Result<()> {
        let listed: Vec<String> = self.manifest.deltas.iter().map(|d| delta_file_name(d.seq)).collect();
        for entry in fs::read_dir(&self.dir).context(|| format!("listing {}", self.dir.display()))? {
            let entry = entry.context(|| format!("listing {}", self.dir.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale_delta = name.ends_with(".delta") && !listed.contains(&name);
            if stale_delta || name.ends_with(".tmp") {
                log::info!("snapshots: removing leftover {name}");
                fs::remove_file(entry.path()).context(|| format!("removing {}", entry.path().display()))?;
            }
        }
        Ok(())
    }

    fn save_manifest(&self) -> Result<()> {
        let text = serde_json::to_vec_pretty(&self.manifest).expect("manifest serialises");
        fsutil::write_atomically(&self.dir.join(MANIFEST_FILE), &text)
    }

    /// Every snapshot, oldest (the base) first.
    pub fn list(&self) -> Vec<SnapshotInfo> {
        std::iter::once(self.manifest.base.clone()).chain(self.manifest.deltas.iter().cloned()).collect()
    }

    pub fn newest_seq(&self) -> Seq {
        self.manifest.deltas.last().map_or(self.manifest.base.seq, |d| d.seq)
    }

    /// The newest snapshot at or before `seq`.
    pub fn newest_at_or_before(&self, seq: Seq) -> Option<Seq> {
        self.list().iter().rev().map(|s| s.seq).find(|&s| s <= seq)
    }

    /// The oldest snapshot at or after `seq`.
    pub fn oldest_at_or_after(&self, seq: Seq) -> Option<Seq> {
        self.list().iter().map(|s| s.seq).find(|&s| s >= seq)
    }

    /// Adds a snapshot at `seq`, compacted from `view`, splitting the delta that spans it if
    /// the chain already reaches past it. The view must hold every record after the snapshot
    /// just before `seq` up to the one just after it.
    pub fn insert(&mut self, view: &JournalView, seq: Seq, origin: SnapshotOrigin) -> Result<SnapshotInfo> {
        if seq < self.manifest.base.seq {
            return Err(Error::Unrecoverable {
                requested: format!("snapshot at seq {seq}"),
                oldest: self.manifest.base.seq,
                head: view.next_seq().saturating_sub(1),
            });
        }
        if let Some(existing) = self.list().into_iter().find(|s| s.seq == seq) {
            return Ok(existing);
        }
        let previous = self.newest_at_or_before(seq).expect("the base is at or before seq");
        let position = self.manifest.deltas.iter().position(|d| d.seq > seq);
        let info = self.write_delta(view, previous, seq, origin)?;
        let index = position.unwrap_or(self.manifest.deltas.len());
        self.manifest.deltas.insert(index, info.clone());
        self.save_manifest()?;
        if let Some(next) = self.manifest.deltas.get(index + 1).cloned() {
            // The delta previous→next still gives the right bytes applied after the new one
            // (it holds every block written since previous); it is only larger than it need be.
            // So it is replaced by seq→next only now that the manifest lists the new snapshot:
            // replaced before, a crash would leave a chain missing the records in between.
            let rest = self.write_delta(view, seq, next.seq, next.origin)?;
            self.manifest.deltas[index + 1] = SnapshotInfo { created_ns: next.created_ns, ..rest };
            self.save_manifest()?;
        }
        Ok(info)
    }

    /// Folds the oldest delta into the base while `base_is_needed(base_seq)` is false.
    /// Returns how many deltas were merged.
    pub fn merge_into_base(&mut self, base_is_needed: impl Fn(Seq) -> bool) -> Result<usize> {
        let mut merged = 0;
        while !self.manifest.deltas.is_empty() && !base_is_needed(self.manifest.base.seq) {
            self.manifest.merging_into_base = Some(self.manifest.deltas[0].seq);
            self.save_manifest()?;
            self.merge_first_delta()?;
            merged += 1;
        }
        Ok(merged)
    }

    /// Folds the first delta into the base. Applying a delta twice gives the same bytes, so
    /// after a crash open repeats this from the start.
    fn merge_first_delta(&mut self) -> Result<()> {
        let delta = self.manifest.deltas[0].clone();
        let base_path = self.dir.join(BASE_FILE);
        let base = OpenOptions::new()
            .write(true)
            .read(true)
            .open(&base_path)
            .context(|| format!("opening {}", base_path.display()))?;
        self.apply_delta(delta.seq, &base)?;
        base.sync_all().context(|| format!("syncing {}", base_path.display()))?;
        self.manifest.base = SnapshotInfo {
            data_bytes: fsutil::data_ranges(&base, self.volume_size)
                .context(|| format!("mapping {}", base_path.display()))?
                .iter()
                .map(|r| r.1)
                .sum(),
            extents: 0,
            ..delta
        };
        self.manifest.deltas.remove(0);
        self.manifest.merging_into_base = None;
        self.save_manifest()?;
        let delta_path = self.delta_path(delta.seq);
        fs::remove_file(&delta_path).context(|| format!("removing {}", delta_path.display()))?;
        Ok(())
    }

    /// Writes the volume at snapshot `seq` into `output` (sized to the volume, empty): the base
    /// copied with its holes, then each delta up to `seq`. Returns the data bytes written.
    /// Stops with [`Error::Cancelled`] soon after `stop` is set.
    pub fn materialize(
        &self,
        seq: Seq,
        output: &File,
        progress: &mut dyn FnMut(u64, u64),
        stop: &AtomicBool,
    ) -> Result<u64> {
        let base_path = self.dir.join(BASE_FILE);
        let base = File::open(&base_path).context(|| format!("opening {}", base_path.display()))?;
        let total = self.volume_size;
        let copied = fsutil::copy_sparse(&base, output, self.volume_size, |done| {
            progress(done, total);
            match stop.load(Ordering::Relaxed) {
                true => Err(std::io::Error::new(std::io::ErrorKind::Interrupted, "stopped")),
                false => Ok(()),
            }
        });
        let mut written = match copied {
            Err(_) if stop.load(Ordering::Relaxed) => return Err(Error::Cancelled),
            copied => copied.context(|| format!("copying {}", base_path.display()))?,
        };
        for delta in self.manifest.deltas.iter().take_while(|d| d.seq <= seq) {
            if stop.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            written += self.apply_delta(delta.seq, output)?;
        }
        Ok(written)
    }

    fn delta_path(&self, seq: Seq) -> PathBuf {
        self.dir.join(delta_file_name(seq))
    }

    /// Compacts the records in (from, to] into a new delta file.
    fn write_delta(&self, view: &JournalView, from: Seq, to: Seq, origin: SnapshotOrigin) -> Result<SnapshotInfo> {
        let map = net_effect(view, from, to, &AtomicBool::new(false))?;
        let final_path = self.delta_path(to);
        let tmp_path = final_path.with_extension("tmp");
        let file = File::create(&tmp_path).context(|| format!("creating {}", tmp_path.display()))?;
        let table_len = map.len() as u64 * EXTENT_ENTRY_LEN;
        let data_start = (DELTA_HEADER_LEN + table_len).div_ceil(4096) * 4096;
        let mut out = BufWriter::with_capacity(COPY_CHUNK, &file);
        let mut extents = Vec::with_capacity(map.len());
        let mut data_position = data_start;
        let mut kept = KeptRanges::new(view, COPY_CHUNK);
        let write_err = |e| Error::Io { context: format!("writing {}", tmp_path.display()), cause: e };
        std::io::Seek::seek(&mut out, std::io::SeekFrom::Start(data_start)).map_err(write_err)?;
        for (offset, len, source) in map.iter() {
            if source == Source::Zero {
                extents.push(DeltaExtent { offset, len, data_position: ZERO_EXTENT, crc: 0 });
                continue;
            }
            let crc = kept.read(offset, source, len, |_, piece| out.write_all(piece).map_err(write_err))?;
            extents.push(DeltaExtent { offset, len, data_position, crc });
            data_position += len;
        }
        out.flush().map_err(write_err)?;
        drop(out);

        let mut table = Vec::with_capacity(table_len as usize);
        for extent in &extents {
            table.extend_from_slice(&extent.offset.to_le_bytes());
            table.extend_from_slice(&extent.len.to_le_bytes());
            table.extend_from_slice(&extent.data_position.to_le_bytes());
            table.extend_from_slice(&extent.crc.to_le_bytes());
            table.extend_from_slice(&[0u8; 4]);
        }
        let mut header = [0u8; DELTA_HEADER_LEN as usize];
        header[0..8].copy_from_slice(&DELTA_MAGIC);
        header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        header[16..24].copy_from_slice(&from.to_le_bytes());
        header[24..32].copy_from_slice(&to.to_le_bytes());
        header[32..40].copy_from_slice(&(extents.len() as u64).to_le_bytes());
        header[40..44].copy_from_slice(&crc32c::crc32c(&table).to_le_bytes());
        let header_crc = crc32c::crc32c(&header[0..44]);
        header[44..48].copy_from_slice(&header_crc.to_le_bytes());
        file.write_all_at(&header, 0).map_err(write_err)?;
        file.write_all_at(&table, DELTA_HEADER_LEN).map_err(write_err)?;
        file.set_len(data_position).map_err(write_err)?;
        file.sync_all().map_err(write_err)?;
        fs::rename(&tmp_path, &final_path).context(|| format!("renaming {}", tmp_path.display()))?;
        fsutil::sync_dir(&self.dir)?;
        Ok(SnapshotInfo {
            seq: to,
            origin,
            created_ns: fsutil::now_ns(),
            data_bytes: data_position - data_start,
            extents: extents.len() as u64,
        })
    }

    /// Opens the base image for reading, as it is now.
    pub(crate) fn open_base(&self) -> Result<File> {
        let path = self.dir.join(BASE_FILE);
        File::open(&path).context(|| format!("opening {}", path.display()))
    }

    /// The base's sequence number and the deltas of the chain up to and including `seq`,
    /// oldest first.
    pub(crate) fn chain_through(&self, seq: Seq) -> (Seq, Vec<Seq>) {
        let deltas = self.manifest.deltas.iter().map(|d| d.seq).take_while(|&d| d <= seq).collect();
        (self.manifest.base.seq, deltas)
    }

    /// Opens delta `seq` and reads its extent table, checking the header and table checksums
    /// (the data's are checked by whoever reads a whole extent).
    pub(crate) fn read_delta_table(&self, seq: Seq) -> Result<(File, Vec<DeltaExtent>)> {
        let path = self.delta_path(seq);
        let corrupt = |reason: &str| Error::SnapshotCorrupt { path: path.clone(), reason: reason.to_string() };
        let file = File::open(&path).context(|| format!("opening {}", path.display()))?;
        let mut header = [0u8; DELTA_HEADER_LEN as usize];
        file.read_exact_at(&mut header, 0).map_err(|_| corrupt("short header"))?;
        if header[0..8] != DELTA_MAGIC {
            return Err(corrupt("bad magic"));
        }
        let field = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
        let crc_at = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
        if crc32c::crc32c(&header[0..44]) != crc_at(44) {
            return Err(corrupt("header checksum mismatch"));
        }
        if field(24) != seq {
            return Err(corrupt("delta is for another sequence number"));
        }
        // A delta may start before the snapshot it follows (it then repeats some blocks), never
        // after it: the records in between would be missing from the chain.
        let follows = self.list().iter().rev().map(|s| s.seq).find(|&s| s < seq);
        if follows.is_some_and(|follows| field(16) > follows) {
            return Err(corrupt("delta starts after the snapshot before it in the chain"));
        }
        let count = field(32);
        let file_len = file.metadata().context(|| format!("reading size of {}", path.display()))?.len();
        if count.saturating_mul(EXTENT_ENTRY_LEN) > file_len {
            return Err(corrupt("extent count larger than the file"));
        }
        let mut table = vec![0u8; (count * EXTENT_ENTRY_LEN) as usize];
        file.read_exact_at(&mut table, DELTA_HEADER_LEN).map_err(|_| corrupt("short extent table"))?;
        if crc32c::crc32c(&table) != crc_at(40) {
            return Err(corrupt("extent table checksum mismatch"));
        }
        let extents = table
            .chunks_exact(EXTENT_ENTRY_LEN as usize)
            .map(|e| DeltaExtent {
                offset: u64::from_le_bytes(e[0..8].try_into().expect("8 bytes")),
                len: u64::from_le_bytes(e[8..16].try_into().expect("8 bytes")),
                data_position: u64::from_le_bytes(e[16..24].try_into().expect("8 bytes")),
                crc: u32::from_le_bytes(e[24..28].try_into().expect("4 bytes")),
            })
            .collect::<Vec<_>>();
        if extents.iter().any(|e| e.offset.checked_add(e.len).is_none_or(|end| end > self.volume_size)) {
            return Err(corrupt("extent outside the volume"));
        }
        Ok((file, extents))
    }

    /// Reads delta `seq` extent by extent, checking every data checksum: zero ranges go to
    /// `on_zero(offset, len)`, data to `on_data(volume_offset, bytes)` in pieces. Returns the data
    /// bytes read.
    fn scan_delta(
        &self,
        seq: Seq,
        mut on_zero: impl FnMut(u64, u64) -> Result<()>,
        mut on_data: impl FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<u64> {
        let path = self.delta_path(seq);
        let (file, extents) = self.read_delta_table(seq)?;
        let mut chunk = vec![0u8; COPY_CHUNK];
        let mut total = 0;
        for extent in extents {
            if extent.is_zero() {
                on_zero(extent.offset, extent.len)?;
                continue;
            }
            let mut crc = 0;
            let mut done = 0;
            while done < extent.len {
                let n = (extent.len - done).min(COPY_CHUNK as u64) as usize;
                file.read_exact_at(&mut chunk[..n], extent.data_position + done).map_err(|_| {
                    Error::SnapshotCorrupt { path: path.clone(), reason: "extent data cut short".into() }
                })?;
                crc = crc32c::crc32c_append(crc, &chunk[..n]);
                on_data(extent.offset + done, &chunk[..n])?;
                done += n as u64;
            }
            if crc != extent.crc {
                return Err(Error::SnapshotCorrupt {
                    path,
                    reason: format!("data checksum mismatch in extent at volume offset {}", extent.offset),
                });
            }
            total += extent.len;
        }
        Ok(total)
    }

    /// Applies delta `seq` to `target`. Returns the data bytes written.
    fn apply_delta(&self, seq: Seq, target: &File) -> Result<u64> {
        self.scan_delta(
            seq,
            |offset, len| fsutil::zero_range(target, offset, len).context(|| "zeroing a range".to_string()),
            |offset, bytes| target.write_all_at(bytes, offset).context(|| "writing snapshot data".to_string()),
        )
    }

    /// Checks every delta's header, table and data checksums.
    pub fn verify(&self) -> Result<()> {
        for delta in &self.manifest.deltas {
            self.scan_delta(delta.seq, |_, _| Ok(()), |_, _| Ok(()))?;
        }
        Ok(())
    }

    /// Bytes the snapshot area takes on disk (allocated data of the base plus the deltas).
    pub fn stored_bytes(&self) -> u64 {
        // Saturating: the counts come from a file without a checksum.
        self.manifest.deltas.iter().fold(self.manifest.base.data_bytes, |sum, d| sum.saturating_add(d.data_bytes))
    }
}

/// The net effect of the records in (from, to] of `view`: each byte range's last write (where
/// its payload lies in the journal) or zeroing, in volume order. Applied to the volume at any
/// point from `from` to `to`, it gives the volume at `to`. Folded from the record headers
/// alone: the payloads that survive are checked as they are read ([`KeptRanges`]), so
/// a damaged journal is never packed into a snapshot under checksums of its own, and the
/// overwritten ones are not read at all. Stops with [`Error::Cancelled`] soon after `stop` is
/// set.
pub fn net_effect(view: &JournalView, from: Seq, to: Seq, stop: &AtomicBool) -> Result<ExtentMap<Source>> {
    if view.first_seq() > from + 1 || view.next_seq() <= to {
        return Err(Error::Unrecoverable {
            requested: format!("snapshot at seq {to}"),
            oldest: view.first_seq().saturating_sub(1),
            head: view.next_seq().saturating_sub(1),
        });
    }
    let mut map = ExtentMap::new();
    view.for_each_header(from + 1, to, |segment, record| {
        if stop.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        let payload = record.payload_position;
        match record.kind {
            RecordKind::Write => map.insert(
                record.offset,
                record.length,
                Source::Journal { segment: segment.index, position: payload, payload },
            ),
            RecordKind::WriteZeroes | RecordKind::Discard => map.insert(record.offset, record.length, Source::Zero),
            RecordKind::Marker | RecordKind::Snapshot => {}
        }
        Ok(())
    })?;
    Ok(map)
}

/// Reads the journal ranges of a net effect ([`Source::Journal`]) and checks them: the record
/// header before each payload must be the write of exactly that volume range, and the bytes
/// must match the record's payload checksum, as they go when a range is its whole payload,
/// else by reading the whole payload once (a payload kept in many fragments is checked once).
pub struct KeptRanges<'v> {
    view: &'v JournalView,
    chunk: Vec<u8>,
    /// Payloads kept in part and checked whole already: (segment index, payload position).
    checked: HashSet<(u64, u64)>,
}

impl<'v> KeptRanges<'v> {
    /// Reads `view`'s payloads `chunk_len` bytes at a time.
    pub fn new(view: &'v JournalView, chunk_len: usize) -> Self {
        Self { view, chunk: vec![0u8; chunk_len.max(1)], checked: HashSet::new() }
    }

    /// Reads the `len` bytes at volume offset `offset` that `source` places in the journal,
    /// handing each piece to `each` with its offset in the range; returns the range's CRC32C.
    /// A mismatch is reported after the pieces were handed over: the caller must drop what it
    /// made of them. `each`'s errors end the reading and are returned as they are.
    pub fn read<E: From<Error>>(
        &mut self,
        offset: u64,
        source: Source,
        len: u64,
        each: impl FnMut(u64, &[u8]) -> std::result::Result<(), E>,
    ) -> std::result::Result<u32, E> {
        let Source::Journal { segment: index, position, payload } = source else { return Ok(0) };
        let view = self.view;
        let segment = view.segment(index).ok_or_else(|| Error::Unrecoverable {
            requested: format!("journal segment {index}"),
            oldest: view.first_seq().saturating_sub(1),
            head: view.next_seq().saturating_sub(1),
        })?;
        let record_at = payload - HEADER_LEN as u64;
        let corrupt =
            |reason: String| Error::JournalCorrupt { segment: segment.path.clone(), offset: record_at, reason };
        let mut raw = [0u8; HEADER_LEN];
        JournalView::read_payload(segment, record_at, &mut raw)?;
        let header = RecordHeader::decode(&raw).map_err(|fault| E::from(corrupt(fault.to_string())))?;
        let payload_len = u64::from(header.payload_len);
        let within = position.checked_sub(payload).filter(|skip| skip + len <= payload_len);
        if header.kind != RecordKind::Write || within.is_none_or(|skip| header.offset.checked_add(skip) != Some(offset))
        {
            return Err(corrupt(format!(
                "record {} is not the write of volume offset {offset} the header index places there",
                header.seq
            ))
            .into());
        }
        let whole = position == payload && len == payload_len;
        let crc = read_with_crc(segment, position, len, &mut self.chunk, each)?;
        let payload_crc = match whole {
            true => crc,
            false if self.checked.contains(&(index, payload)) => return Ok(crc),
            false => read_with_crc(segment, payload, payload_len, &mut self.chunk, |_, _| Ok::<(), E>(()))?,
        };
        if payload_crc != header.payload_crc {
            return Err(corrupt("payload checksum mismatch".into()).into());
        }
        if !whole {
            self.checked.insert((index, payload));
        }
        Ok(crc)
    }
}

/// Reads `len` bytes of `segment` from `position` through `chunk`, handing each piece to
/// `each` with its offset in the range; returns their CRC32C.
fn read_with_crc<E: From<Error>>(
    segment: &Segment,
    position: u64,
    len: u64,
    chunk: &mut [u8],
    mut each: impl FnMut(u64, &[u8]) -> std::result::Result<(), E>,
) -> std::result::Result<u32, E> {
    let mut crc = 0;
    let mut done = 0;
    while done < len {
        let n = (len - done).min(chunk.len() as u64) as usize;
        JournalView::read_payload(segment, position + done, &mut chunk[..n])?;
        crc = crc32c::crc32c_append(crc, &chunk[..n]);
        each(done, &chunk[..n])?;
        done += n as u64;
    }
    Ok(crc)
}

fn delta_file_name(seq: Seq) -> String {
    format!("{seq:016x}.delta")
}
