//! Reading a replica with nothing but the bucket: its markers, its state, and recovery of any
//! point it holds into a new sparse image. Records are decoded and applied with the engine's
//! own code (`RecordHeader::decode`, `recovery::apply_record`), so a remote recovery writes
//! exactly the bytes a local one would.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rewind_engine::journal::{RecordHeader, RecordKind};
use rewind_engine::recovery::{apply_record, Progress, RecoveryReport, RecoveryTarget};
use rewind_engine::store::MarkerStatus;
use rewind_engine::Seq;
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::layout::{self, DeltaInfo, Manifest, PartOf, PartRange, BASE_DIR, DELTA_DIR, JOURNAL_DIR, MANIFEST_KEY};
use crate::remote::{Listed, Remote};

/// A replica opened for reading: its manifest as it was when opened.
pub struct Replica {
    remote: Remote,
    manifest: Manifest,
}

/// One journal object of the chain a recovery reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalObject {
    pub key: String,
    pub first: Seq,
    pub last: Seq,
    pub size: u64,
}

/// `rewind status --from URL`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ReplicaStatus {
    pub url: String,
    pub store_uuid: uuid::Uuid,
    pub volume_size: u64,
    pub block_size: u32,
    /// Every point from here to `shipped_seq` can be recovered.
    pub oldest_recoverable: Seq,
    pub oldest_time_ns: u64,
    pub shipped_seq: Seq,
    pub shipped_time_ns: u64,
    pub base_bytes: u64,
    /// Remote snapshots after the base.
    pub deltas: usize,
    pub delta_bytes: u64,
    pub journal_objects: usize,
    pub journal_bytes: u64,
    pub markers: usize,
    pub expired_markers: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_age_secs: Option<u64>,
    pub updated_ns: u64,
}

/// Reads the manifest, or `None` when the replica has none yet.
pub fn read_manifest(remote: &Remote) -> Result<Option<Manifest>> {
    match remote.get(MANIFEST_KEY) {
        Ok(bytes) => Manifest::decode(&bytes).map(Some),
        Err(Error::Missing { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The journal objects the listing holds, by their names.
pub fn list_journal(remote: &Remote) -> Result<Vec<JournalObject>> {
    let listed: Vec<Listed> = remote.list(JOURNAL_DIR)?;
    let mut objects: Vec<JournalObject> = listed
        .into_iter()
        .filter_map(|Listed { key, size }| {
            let (first, last) = layout::parse_journal_key(&key)?;
            Some(JournalObject { key, first, last, size })
        })
        .collect();
    objects.sort_by_key(|o| (o.first, o.last));
    Ok(objects)
}

/// The objects holding records `from..=to`, in order, from `objects` (sorted, all counted by
/// the manifest). An upload cut short before a crash may have left a second object starting at
/// the same record; both hold the same records (only durable records are shipped), so the one
/// reaching furthest is taken.
pub fn chain(objects: &[JournalObject], from: Seq, to: Seq) -> Result<Vec<JournalObject>> {
    let mut chain = Vec::new();
    let mut next = from;
    while next <= to {
        let best = objects
            .iter()
            .filter(|o| o.first <= next && next <= o.last)
            .max_by_key(|o| o.last)
            .ok_or(Error::Gap { seq: next })?;
        chain.push(best.clone());
        next = best.last + 1;
    }
    Ok(chain)
}

impl Replica {
    pub fn open(url: &str) -> Result<Self> {
        Self::from_remote(Remote::open(url)?)
    }

    pub fn from_remote(remote: Remote) -> Result<Self> {
        let manifest = read_manifest(&remote)?.ok_or_else(|| Error::NoReplica(remote.url().to_string()))?;
        Ok(Self { remote, manifest })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Every marker shipped, in sequence order; those the replica can no longer rebuild are
    /// flagged expired.
    pub fn markers(&self) -> Vec<MarkerStatus> {
        self.manifest
            .markers
            .iter()
            .map(|marker| MarkerStatus { expired: self.manifest.marker_expired(marker), marker: marker.clone() })
            .collect()
    }

    pub fn status(&self) -> Result<ReplicaStatus> {
        let m = &self.manifest;
        let journal = list_journal(&self.remote)?;
        let base_bytes = self.remote.list(BASE_DIR)?.iter().map(|o| o.size).sum();
        let delta_bytes = self.remote.list(DELTA_DIR)?.iter().map(|o| o.size).sum();
        let expired = m.markers.iter().filter(|marker| m.marker_expired(marker)).count();
        Ok(ReplicaStatus {
            url: self.remote.url().to_string(),
            store_uuid: m.store_uuid,
            volume_size: m.volume_size,
            block_size: m.block_size,
            oldest_recoverable: m.base.seq,
            oldest_time_ns: m.base.time_ns,
            shipped_seq: m.shipped_seq,
            shipped_time_ns: m.shipped_time_ns,
            base_bytes,
            deltas: m.deltas.len(),
            delta_bytes,
            journal_objects: journal.len(),
            journal_bytes: journal.iter().map(|o| o.size).sum(),
            markers: m.markers.len(),
            expired_markers: expired,
            max_age_secs: m.max_age_secs,
            updated_ns: m.updated_ns,
        })
    }

    /// Writes the volume at `target` into a new sparse image at `output`. It is built beside
    /// `output` under a temporary name and linked into place only once complete and synced, so
    /// nothing half-written is ever left at `output`.
    pub fn recover(&self, target: &RecoveryTarget, output: &Path, progress: Progress<'_>) -> Result<RecoveryReport> {
        recover(&self.remote, &self.manifest, target, output, progress, &|| false).map(|(report, _)| report)
    }
}

/// Where a recovery stops replaying.
#[derive(Debug, Clone, Copy)]
enum Point {
    /// After this record (a marker or a seq, checked against the replica).
    Seq(Seq),
    /// After the last record written at or before this time (ns): found while replaying, as
    /// records are in time order.
    LastAtOrBefore(u64),
}

impl Point {
    fn includes(self, header: &RecordHeader) -> bool {
        match self {
            Self::Seq(to) => header.seq <= to,
            Self::LastAtOrBefore(time_ns) => header.timestamp_ns <= time_ns,
        }
    }

    /// Whether the remote snapshot at `seq`, whose record was written at `time_ns`, is at or
    /// before the point (records are in time order).
    fn reaches(self, seq: Seq, time_ns: u64) -> bool {
        match self {
            Self::Seq(to) => seq <= to,
            Self::LastAtOrBefore(at) => time_ns <= at,
        }
    }
}

/// The snapshots a recovery to `point` writes, in order: the newest full one at or before the
/// point (else the base), then the deltas after it up to the point.
fn snapshots_through(m: &Manifest, point: Point) -> Vec<DeltaInfo> {
    let reached = m.deltas.iter().take_while(|d| point.reaches(d.seq, d.time_ns)).count();
    let reached = &m.deltas[..reached];
    match reached.iter().rposition(|d| d.full) {
        Some(full) => reached[full..].to_vec(),
        None => {
            let b = &m.base;
            let base = DeltaInfo {
                seq: b.seq,
                from: b.seq,
                time_ns: b.time_ns,
                parts: b.parts,
                data_bytes: b.data_bytes,
                full: true,
            };
            std::iter::once(base).chain(reached.iter().cloned()).collect()
        }
    }
}

/// The point a target names, checked against the replica.
fn resolve(m: &Manifest, target: &RecoveryTarget) -> Result<Point> {
    let unrecoverable = || rewind_engine::Error::Unrecoverable {
        requested: target.to_string(),
        oldest: m.base.seq,
        head: m.shipped_seq,
    };
    let seq = match target {
        RecoveryTarget::Marker(name) => {
            m.markers
                .iter()
                .find(|marker| &marker.name == name)
                .ok_or_else(|| rewind_engine::Error::UnknownMarker(name.clone()))?
                .seq
        }
        RecoveryTarget::Seq(seq) => *seq,
        RecoveryTarget::Time(ns) if *ns < m.base.time_ns => {
            return Err(rewind_engine::Error::TimeBeforeJournal(target.to_string()).into())
        }
        RecoveryTarget::Time(ns) => return Ok(Point::LastAtOrBefore(*ns)),
    };
    if seq < m.base.seq || seq > m.shipped_seq {
        return Err(unrecoverable().into());
    }
    Ok(Point::Seq(seq))
}

/// [`Replica::recover`] from `remote` as `m` describes it; also returns the timestamp of the
/// point's record (the base's when no record was replayed). Gives up with [`Error::Stopped`]
/// at the next object once `stopping` says so.
pub(crate) fn recover(
    remote: &Remote,
    m: &Manifest,
    target: &RecoveryTarget,
    output: &Path,
    progress: Progress<'_>,
    stopping: &dyn Fn() -> bool,
) -> Result<(RecoveryReport, u64)> {
    if output.symlink_metadata().is_ok() {
        return Err(rewind_engine::Error::OutputExists(output.to_path_buf()).into());
    }
    let point = resolve(m, target)?;
    let to = match point {
        Point::Seq(seq) => seq,
        Point::LastAtOrBefore(_) => m.shipped_seq,
    };
    let snapshots = snapshots_through(m, point);
    let snapshot_seq = snapshots.last().map_or(m.base.seq, |d| d.seq);
    let mut objects = list_journal(remote)?;
    objects.retain(|o| o.last <= m.shipped_seq);
    let chain = chain(&objects, snapshot_seq + 1, to)?;
    let partial = partial_path(output);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&partial)
        .context(|| format!("creating {}", partial.display()))?;
    let built = (|| {
        file.set_len(m.volume_size).context(|| format!("sizing {}", partial.display()))?;
        let (mut report, time_ns) =
            build(remote, m, &file, &Route { point, snapshots: &snapshots, chain: &chain }, progress, stopping)?;
        file.sync_all().context(|| format!("syncing {}", partial.display()))?;
        std::fs::hard_link(&partial, output).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => rewind_engine::Error::OutputExists(output.to_path_buf()).into(),
            _ => Error::Io { context: format!("moving the image into {}", output.display()), cause: e },
        })?;
        report.output = output.to_path_buf();
        Ok((report, time_ns))
    })();
    let _ = std::fs::remove_file(&partial);
    built
}

/// What a recovery reads to reach its point: snapshots (a full one, then deltas), then the
/// journal objects after them.
struct Route<'a> {
    point: Point,
    snapshots: &'a [DeltaInfo],
    chain: &'a [JournalObject],
}

/// Writes the route's snapshots into `file`, then replays its journal up to the point.
fn build(
    remote: &Remote,
    m: &Manifest,
    file: &File,
    route: &Route<'_>,
    progress: Progress<'_>,
    stopping: &dyn Fn() -> bool,
) -> Result<(RecoveryReport, u64)> {
    let Route { point, snapshots, chain } = *route;
    let go_on = || if stopping() { Err(Error::Stopped("a recovery from the replica")) } else { Ok(()) };
    let total = snapshots.iter().map(|d| d.data_bytes).sum::<u64>() + chain.iter().map(|o| o.size).sum::<u64>();
    let mut done = 0u64;
    progress(0, total);
    let mut bytes_written = 0u64;
    // Every snapshot's parts, downloaded in parallel and applied in this order.
    let parts: Vec<(PartOf, Seq, String)> = snapshots
        .iter()
        .flat_map(|d| (0..d.parts).map(move |part| (d.parts_of(), d.seq, d.parts_of().key(d.seq, part))))
        .collect();
    let keys: Vec<String> = parts.iter().map(|(_, _, key)| key.clone()).collect();
    let mut next_part = parts.iter();
    remote.get_each(&keys, |key, bytes| {
        go_on()?;
        let Some(&(of, seq, _)) = next_part.next() else { return Ok(false) };
        layout::decode_part(of, key, m.store_uuid, seq, m.volume_size, &bytes, |offset, range| {
            match range {
                PartRange::Bytes(data) => {
                    file.write_all_at(data, offset).context(|| format!("writing the image at offset {offset}"))?;
                    bytes_written += data.len() as u64;
                    done += data.len() as u64;
                }
                PartRange::Zeroes(len) => rewind_engine::fsutil::zero_range(file, offset, len)
                    .context(|| format!("zeroing the image at offset {offset}"))?,
            }
            Ok(())
        })?;
        progress(done.min(total), total);
        Ok(true)
    })?;
    // Records after the last snapshot up to the point: for a time, until the first record
    // past it.
    let (snapshot_seq, snapshot_time_ns) =
        snapshots.last().map_or((m.base.seq, m.base.time_ns), |d| (d.seq, d.time_ns));
    let mut seq = snapshot_seq;
    let mut time_ns = snapshot_time_ns;
    let mut records_replayed = 0u64;
    let keys: Vec<String> = chain.iter().map(|o| o.key.clone()).collect();
    remote.get_each(&keys, |key, bytes| {
        go_on()?;
        let mut past_point = false;
        let size = bytes.len() as u64;
        layout::decode_journal_object(key, m.store_uuid, &bytes, |header, payload| {
            if header.seq <= snapshot_seq || past_point {
                return Ok(());
            }
            if !point.includes(header) {
                past_point = true;
                return Ok(());
            }
            apply_record(file, header, (header.kind == RecordKind::Write).then_some(payload))?;
            records_replayed += u64::from(header.kind.modifies_volume());
            if header.kind == RecordKind::Write {
                bytes_written += header.length;
            }
            seq = header.seq;
            time_ns = header.timestamp_ns;
            Ok(())
        })?;
        done += size;
        progress(done.min(total), total);
        Ok(!past_point)
    })?;
    progress(total, total);
    let report = RecoveryReport { output: PathBuf::new(), seq, snapshot_seq, records_replayed, bytes_written };
    Ok((report, time_ns))
}

/// Where a recovery builds `output` before linking it into place: beside it (same file
/// system), hidden, and unique to this process.
fn partial_path(output: &Path) -> PathBuf {
    let name = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    output.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}
