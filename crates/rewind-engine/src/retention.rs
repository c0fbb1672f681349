//! Retention: which journal segments may be freed, and which snapshots must exist first so
//! that every point still in the recoverable range stays recoverable.
//!
//! The plan is a pure function of the journal's shape, the policy and the clock, so it is
//! tested on its own; the store carries it out (snapshots first, durably, then the free).

use serde::{Deserialize, Serialize};

use crate::snapshot::SnapshotOrigin;
use crate::Seq;

/// How much journal to keep. With no limit set, nothing is ever freed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RetentionPolicy {
    /// Free the oldest segments while the journal holds more than this many bytes.
    pub max_bytes: Option<u64>,
    /// Free segments whose newest record is older than this.
    pub max_age_secs: Option<u64>,
    /// Keep a snapshot at every marker so markers outlive the journal they were recorded in.
    #[serde(default)]
    pub keep_marker_snapshots: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentSummary {
    pub first_seq: Seq,
    pub next_seq: Seq,
    pub bytes: u64,
    pub last_timestamp_ns: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionPlan {
    /// How many of the oldest segments to free.
    pub free_segments: usize,
    /// The journal's first sequence number once they are freed.
    pub new_first_seq: Seq,
    /// Snapshots to take, oldest first, before anything is freed.
    pub snapshots: Vec<(Seq, SnapshotOrigin)>,
}

/// What the planner needs to know of the store besides its segments.
pub struct RetentionInputs<'a> {
    pub now_ns: u64,
    /// Records up to here are applied to the volume durably; later ones must stay for replay.
    pub checkpoint: Seq,
    /// Oldest recoverable point now.
    pub oldest: Seq,
    pub snapshot_points: &'a [Seq],
    pub marker_seqs: &'a [Seq],
}

/// Plans what to free. `segments` are oldest first; the last is the active one and is never
/// freed.
pub fn plan(policy: &RetentionPolicy, segments: &[SegmentSummary], inputs: &RetentionInputs<'_>) -> RetentionPlan {
    let mut total: u64 = segments.iter().map(|s| s.bytes).sum();
    let max_age_ns = policy.max_age_secs.map(|secs| secs.saturating_mul(1_000_000_000));
    let mut free = 0;
    for segment in segments.iter().take(segments.len().saturating_sub(1)) {
        let over_size = policy.max_bytes.is_some_and(|max| total > max);
        let too_old = max_age_ns.is_some_and(|age| segment.last_timestamp_ns.saturating_add(age) < inputs.now_ns);
        let replayable = segment.next_seq.saturating_sub(1) <= inputs.checkpoint;
        if !(over_size || too_old) || !replayable {
            break;
        }
        total -= segment.bytes;
        free += 1;
    }
    if free == 0 {
        return RetentionPlan { new_first_seq: segments.first().map_or(0, |s| s.first_seq), ..Default::default() };
    }
    let new_first_seq = segments[free - 1].next_seq;
    let last_freed = new_first_seq - 1;
    let has_snapshot = |seq: Seq| inputs.snapshot_points.contains(&seq);
    let mut snapshots: Vec<(Seq, SnapshotOrigin)> = Vec::new();
    if policy.keep_marker_snapshots {
        snapshots.extend(
            inputs
                .marker_seqs
                .iter()
                .filter(|&&m| m >= inputs.oldest && m <= last_freed && !has_snapshot(m))
                .map(|&m| (m, SnapshotOrigin::Marker)),
        );
    }
    if last_freed >= inputs.oldest && !has_snapshot(last_freed) && !snapshots.iter().any(|s| s.0 == last_freed) {
        snapshots.push((last_freed, SnapshotOrigin::Retention));
    }
    snapshots.sort_by_key(|s| s.0);
    RetentionPlan { free_segments: free, new_first_seq, snapshots }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segments(bounds: &[(Seq, Seq, u64)]) -> Vec<SegmentSummary> {
        bounds
            .iter()
            .map(|&(first_seq, next_seq, ts)| SegmentSummary { first_seq, next_seq, bytes: 100, last_timestamp_ns: ts })
            .collect()
    }

    fn inputs<'a>(snapshot_points: &'a [Seq], marker_seqs: &'a [Seq]) -> RetentionInputs<'a> {
        RetentionInputs { now_ns: 1_000_000_000_000, checkpoint: u64::MAX, oldest: 0, snapshot_points, marker_seqs }
    }

    #[test]
    fn frees_oldest_segments_until_under_the_byte_limit_and_snapshots_the_boundary() {
        let segs = segments(&[(1, 11, 0), (11, 21, 0), (21, 31, 0), (31, 35, 0)]);
        let policy = RetentionPolicy { max_bytes: Some(250), ..Default::default() };
        let plan = plan(&policy, &segs, &inputs(&[0], &[]));
        assert_eq!(plan.free_segments, 2);
        assert_eq!(plan.new_first_seq, 21);
        assert_eq!(plan.snapshots, vec![(20, SnapshotOrigin::Retention)]);
    }

    #[test]
    fn never_frees_the_active_segment() {
        let segs = segments(&[(1, 11, 0), (11, 21, 0)]);
        let policy = RetentionPolicy { max_bytes: Some(0), ..Default::default() };
        assert_eq!(plan(&policy, &segs, &inputs(&[0], &[])).free_segments, 1);
    }

    #[test]
    fn age_limit_frees_only_old_segments() {
        let now = 1_000_000_000_000;
        let segs = segments(&[(1, 11, now - 50_000_000_000), (11, 21, now - 5_000_000_000), (21, 22, now)]);
        let policy = RetentionPolicy { max_age_secs: Some(10), ..Default::default() };
        let plan = plan(&policy, &segs, &inputs(&[0], &[]));
        assert_eq!(plan.free_segments, 1);
    }

    #[test]
    fn records_not_yet_checkpointed_are_kept() {
        let segs = segments(&[(1, 11, 0), (11, 21, 0), (21, 22, 0)]);
        let policy = RetentionPolicy { max_bytes: Some(0), ..Default::default() };
        let plan = plan(&policy, &segs, &RetentionInputs { checkpoint: 15, ..inputs(&[0], &[]) });
        assert_eq!(plan.free_segments, 1);
    }

    #[test]
    fn existing_snapshot_at_the_boundary_is_reused_and_markers_get_snapshots_when_kept() {
        let segs = segments(&[(1, 11, 0), (11, 21, 0)]);
        let policy = RetentionPolicy { max_bytes: Some(0), keep_marker_snapshots: true, ..Default::default() };
        let plan = plan(&policy, &segs, &inputs(&[0, 10], &[4, 7, 15]));
        assert_eq!(plan.snapshots, vec![(4, SnapshotOrigin::Marker), (7, SnapshotOrigin::Marker)]);
    }

    #[test]
    fn nothing_to_do_under_the_limits() {
        let segs = segments(&[(1, 11, 0), (11, 21, 0)]);
        let policy = RetentionPolicy { max_bytes: Some(1000), ..Default::default() };
        assert_eq!(plan(&policy, &segs, &inputs(&[0], &[])), RetentionPlan { new_first_seq: 1, ..Default::default() });
    }
}
