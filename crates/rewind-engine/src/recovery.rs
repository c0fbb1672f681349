//! Recovery: rebuild the volume as it was at a point, into a new image.
//!
//! The newest snapshot at or before the point is copied into the output (holes stay holes),
//! then the journal records after the snapshot are replayed up to and including the point.
//! Recovery reads the store only; it never changes the store or the live volume.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::fsutil;
use crate::journal::{JournalView, Payloads, RecordHeader, RecordKind};
use crate::snapshot::SnapshotStore;
use crate::Seq;

/// What a recovery request names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecoveryTarget {
    /// The point of the marker of this name.
    Marker(String),
    /// Up to and including this record.
    Seq(Seq),
    /// Wall-clock time in ns since the epoch: the last record at or before it.
    Time(u64),
}

impl std::fmt::Display for RecoveryTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Marker(name) => write!(f, "marker {name:?}"),
            Self::Seq(seq) => write!(f, "seq {seq}"),
            Self::Time(ns) => {
                let time = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(*ns);
                write!(f, "time {}", humantime::format_rfc3339_nanos(time))
            }
        }
    }
}

/// What a recovery wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RecoveryReport {
    /// The new image.
    pub output: PathBuf,
    /// The point recovered to.
    pub seq: Seq,
    /// The snapshot the recovery started from.
    pub snapshot_seq: Seq,
    /// Journal records replayed on top of the snapshot.
    pub records_replayed: u64,
    /// Data bytes written into the output (snapshot data plus replayed writes).
    pub bytes_written: u64,
}

/// Progress of a long operation: bytes done of a total.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// Applies one volume record to `target`. Write payloads come in `payload`.
pub fn apply_record(target: &File, header: &RecordHeader, payload: Option<&[u8]>) -> Result<()> {
    match header.kind {
        RecordKind::Write => {
            let data = payload.expect("write records are read with their payload");
            target
                .write_all_at(data, header.offset)
                .context(|| format!("applying seq {} at offset {}", header.seq, header.offset))
        }
        RecordKind::WriteZeroes | RecordKind::Discard => fsutil::zero_range(target, header.offset, header.length)
            .context(|| format!("applying seq {} at offset {}", header.seq, header.offset)),
        RecordKind::Marker | RecordKind::Snapshot => Ok(()),
    }
}

/// Replays the records in `from..=to` of `view` onto `target`. Returns the records applied and
/// the write bytes they carried.
pub fn replay(view: &JournalView, from: Seq, to: Seq, target: &File) -> Result<(u64, u64)> {
    let mut records = 0;
    let mut bytes = 0;
    view.for_each(from, to, Payloads::OfKinds(&[RecordKind::Write]), |rec| {
        apply_record(target, &rec.header, rec.payload)?;
        records += u64::from(rec.header.kind.modifies_volume());
        if rec.header.kind == RecordKind::Write {
            bytes += rec.header.length;
        }
        Ok(())
    })?;
    Ok((records, bytes))
}

/// Creates an output image that must not exist yet ([`Error::OutputExists`] if it does).
pub(crate) fn create_output(path: &Path) -> Result<File> {
    OpenOptions::new().read(true).write(true).create_new(true).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Error::OutputExists(path.to_path_buf())
        } else {
            Error::Io { context: format!("creating {}", path.display()), cause: e }
        }
    })
}

/// Builds the volume at `seq` into a new file at `output`, from snapshot `snapshot_seq` (the
/// newest at or before `seq`) and the journal after it. The output is removed on failure.
pub fn recover_to(
    snapshots: &SnapshotStore,
    view: &JournalView,
    snapshot_seq: Seq,
    seq: Seq,
    output: &Path,
    progress: Progress<'_>,
    stop: &AtomicBool,
) -> Result<RecoveryReport> {
    let file = create_output(output)?;
    let volume_size = snapshots.volume_size();
    let mut build = || -> Result<RecoveryReport> {
        file.set_len(volume_size).context(|| format!("sizing {}", output.display()))?;
        let from_snapshot = snapshots.materialize(snapshot_seq, &file, progress, stop)?;
        if stop.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        let (records_replayed, replayed_bytes) = replay(view, snapshot_seq + 1, seq, &file)?;
        file.sync_all().context(|| format!("syncing {}", output.display()))?;
        progress(volume_size, volume_size);
        Ok(RecoveryReport {
            output: output.to_path_buf(),
            seq,
            snapshot_seq,
            records_replayed,
            bytes_written: from_snapshot + replayed_bytes,
        })
    };
    build().inspect_err(|_| {
        let _ = std::fs::remove_file(output);
    })
}
