//! Everything the daemon sends: the greeting, each command's reply, the events. The daemon
//! serialises these types and the CLI deserialises them, so both agree on every key. Keys are
//! lower case with hyphens; times are ns since the epoch and say so (`time-ns`).

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::errors::QmpError;
use crate::journal::Seq;
use crate::marker::MarkerSource;
use crate::retention::RetentionPolicy;
use crate::snapshot::{SnapshotInfo, SnapshotOrigin};
use crate::store::{MarkerStatus, RetentionReport};

/// Sent once on connect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Greeting {
    #[serde(rename = "QMP")]
    pub qmp: GreetingBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GreetingBody {
    pub version: Version,
    pub capabilities: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    pub rewind: String,
    /// QMP clients expect a QEMU version; this is not QEMU, so 0.0.0.
    pub qemu: QemuVersion,
    pub package: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

/// This daemon's greeting.
impl Default for Greeting {
    fn default() -> Self {
        let version = Version {
            rewind: env!("CARGO_PKG_VERSION").to_string(),
            qemu: QemuVersion { major: 0, minor: 0, micro: 0 },
            package: "rewind".to_string(),
        };
        Self { qmp: GreetingBody { version, capabilities: Vec::new() } }
    }
}

/// The answer to one command: `{"return": …}` or `{"error": …}`, with the request's `id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    #[serde(flatten)]
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Return(Value),
    Error(QmpError),
}

/// `marker-add`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MarkerAdded {
    pub id: u64,
    pub seq: Seq,
    pub time_ns: u64,
}

/// One marker, in `marker-list` and `marker-get`. A type of its own, not the engine's
/// [`crate::marker::Marker`]: that one is also the on-disk form (markers.json), whose keys must
/// not follow the protocol's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Marker {
    pub id: u64,
    pub name: String,
    pub seq: Seq,
    pub time_ns: u64,
    pub source: MarkerSource,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Its point can no longer be recovered.
    pub expired: bool,
}

impl From<MarkerStatus> for Marker {
    fn from(status: MarkerStatus) -> Self {
        let m = status.marker;
        Self {
            id: m.id,
            name: m.name,
            seq: m.seq,
            time_ns: m.time_ns,
            source: m.source,
            note: m.note,
            expired: status.expired,
        }
    }
}

/// One snapshot, in `snapshot-take` and `snapshot-list` (the engine's `SnapshotInfo` is also
/// the on-disk manifest's form).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Snapshot {
    pub seq: Seq,
    pub origin: SnapshotOrigin,
    pub created_ns: u64,
    /// Data bytes held by this link of the chain.
    pub data_bytes: u64,
    pub extents: u64,
}

impl From<SnapshotInfo> for Snapshot {
    fn from(s: SnapshotInfo) -> Self {
        Self { seq: s.seq, origin: s.origin, created_ns: s.created_ns, data_bytes: s.data_bytes, extents: s.extents }
    }
}

/// `query-journal`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Journal {
    pub first_seq: Seq,
    pub head: Seq,
    pub oldest_recoverable: Seq,
    pub checkpoint: Seq,
    /// Bytes of journal segments.
    pub bytes: u64,
    pub segments: usize,
    /// How many snapshots there are.
    pub snapshots: usize,
    pub snapshot_bytes: u64,
    pub retention: RetentionPolicy,
    /// Open point-in-time exports' hold on the journal and snapshots.
    #[serde(default)]
    pub view_pins: Vec<crate::view::ViewPinStatus>,
}

impl From<crate::store::Status> for Journal {
    fn from(s: crate::store::Status) -> Self {
        Self {
            first_seq: s.first_seq,
            head: s.head,
            oldest_recoverable: s.oldest_recoverable,
            checkpoint: s.checkpoint,
            bytes: s.journal_bytes,
            segments: s.journal_segments,
            snapshots: s.snapshots.len(),
            snapshot_bytes: s.snapshot_bytes,
            retention: s.retention,
            view_pins: s.view_pins,
        }
    }
}

/// `retention-set`: the settings now in force and what applying them freed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RetentionApplied {
    pub retention: RetentionPolicy,
    pub freed_segments: usize,
    pub freed_bytes: u64,
    pub oldest_recoverable: Seq,
}

impl RetentionApplied {
    pub fn new(retention: RetentionPolicy, report: &RetentionReport) -> Self {
        Self {
            retention,
            freed_segments: report.freed_segments,
            freed_bytes: report.freed_bytes,
            oldest_recoverable: report.oldest_recoverable,
        }
    }
}

/// `recover`, at once: the job that does it and the point it recovers to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobStarted {
    pub job_id: String,
    pub seq: Seq,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobType {
    Recover,
    /// `point-export-promote`: an export written into a new image.
    Promote,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Running,
    Concluded,
    Failed,
}

/// One background job, in `query-jobs` and `JOB_COMPLETED`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Job {
    pub id: String,
    #[serde(rename = "type")]
    pub job_type: JobType,
    pub status: JobStatus,
    /// What it recovers to, as people read it ("marker \"before-upgrade\"").
    pub target: String,
    pub output: PathBuf,
    /// Bytes done of `total`.
    pub done: u64,
    pub total: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<Seq>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `point-export-add`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PointExportAdded {
    pub export_id: String,
    /// The point served: the volume as it was after this record.
    pub seq: Seq,
}

/// `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Status {
    pub image: PathBuf,
    /// Bytes.
    pub size: u64,
    pub head: Seq,
    pub queues: usize,
    pub read_only: bool,
    pub vhost_socket: PathBuf,
    pub frontend_connected: bool,
    pub counters: Counters,
}

/// What the device has done since the daemon started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Counters {
    pub requests: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub flushes: u64,
    pub errors: u64,
    /// Queues not served now because their ring state was impossible (docs/virtio.md).
    pub broken_queues: u64,
    /// Requests a previous daemon left in flight and this one ran again (docs/virtio.md).
    #[serde(default)]
    pub resubmitted: u64,
}

/// The events, each with its data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", content = "data")]
pub enum Event {
    /// At most five a second per job.
    #[serde(rename = "JOB_PROGRESS")]
    JobProgress(JobProgress),
    /// The job as in `query-jobs`, `concluded` or `failed`.
    #[serde(rename = "JOB_COMPLETED")]
    JobCompleted(Job),
    /// Shipping to the replica failed (it is retried), or the local journal outgrew its limit
    /// because of records not shipped yet. Once per run of failures.
    #[serde(rename = "REPLICATION_ERROR")]
    ReplicationError(rewind_replica::ship::ReplicationError),
    /// Everything durable is in the replica: after the first catch-up, and after failures.
    #[serde(rename = "REPLICATION_CAUGHT_UP")]
    ReplicationCaughtUp(rewind_replica::ship::ReplicationCaughtUp),
}

impl From<rewind_replica::ReplicationEvent> for Event {
    fn from(event: rewind_replica::ReplicationEvent) -> Self {
        match event {
            rewind_replica::ReplicationEvent::Error(error) => Self::ReplicationError(error),
            rewind_replica::ReplicationEvent::CaughtUp(caught_up) => Self::ReplicationCaughtUp(caught_up),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobProgress {
    pub id: String,
    pub done: u64,
    pub total: u64,
}

/// An event as sent: the event, its data and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMessage {
    #[serde(flatten)]
    pub event: Event,
    pub timestamp: Timestamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    pub seconds: u64,
    pub microseconds: u32,
}

impl Timestamp {
    pub fn now() -> Self {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        Self { seconds: now.as_secs(), microseconds: now.subsec_micros() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn responses_and_events_read_back_as_sent() {
        let reply = Response { outcome: Outcome::Return(json!({"a": 1})), id: Some(json!(7)) };
        let sent = serde_json::to_value(&reply).unwrap();
        assert_eq!(sent, json!({"return": {"a": 1}, "id": 7}));
        assert_eq!(serde_json::from_value::<Response>(sent).unwrap(), reply);
        let error = Response { outcome: Outcome::Error(QmpError::generic("no")), id: None };
        let sent = serde_json::to_value(&error).unwrap();
        assert_eq!(sent, json!({"error": {"class": "GenericError", "desc": "no"}}));
        assert_eq!(serde_json::from_value::<Response>(sent).unwrap(), error);

        let event = EventMessage {
            event: Event::JobProgress(JobProgress { id: "recover-1".into(), done: 1, total: 2 }),
            timestamp: Timestamp { seconds: 3, microseconds: 4 },
        };
        let sent = serde_json::to_value(&event).unwrap();
        assert_eq!(
            sent,
            json!({"event": "JOB_PROGRESS", "data": {"id": "recover-1", "done": 1, "total": 2},
                   "timestamp": {"seconds": 3, "microseconds": 4}})
        );
        assert_eq!(serde_json::from_value::<Event>(sent).unwrap(), event.event);
    }
}
