//! The shipping thread: beside the daemon's I/O path, it copies durable journal records to the
//! replica in order, a batch at a time, and rewrites the manifest after each batch is stored.
//!
//! Guest I/O never waits for it: it reads records through a journal view (the page cache, not
//! the writer's lock), and a slow, full or unreachable store only makes it fall behind. What it
//! has not shipped stays in the local journal: it holds retention at its shipped point
//! (`Store::keep_journal_from`). When that makes the local journal outgrow its size limit, it
//! says so (a `REPLICATION_ERROR` event and `journal-over-limit` in the status) and keeps the
//! records: remote history is never given up silently. See docs/format.md, "Replica".

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rewind_engine::fsutil;
use rewind_engine::journal::segment::{Segment, SEGMENT_HEADER_LEN};
use rewind_engine::journal::{JournalView, Payloads, RecordRef, HEADER_LEN};
use rewind_engine::marker::Marker;
use rewind_engine::recovery::RecoveryTarget;
use rewind_engine::snapshot::{self, Source};
use rewind_engine::{Seq, Store};
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::layout::{
    self, BaseInfo, DeltaInfo, Manifest, PartData, PartExtent, PartOf, BASE_DIR, DELTA_DIR, EXTENT_ENTRY_LEN,
    MANIFEST_KEY, OBJECT_HEADER_LEN,
};
use crate::remote::{Remote, PARALLEL_UPLOADS};
use crate::restore::{self, list_journal, read_manifest};

/// How the shipper groups and paces its uploads.
#[derive(Debug, Clone)]
pub struct ShipperConfig {
    /// Durable records are shipped at least this often: a write reaches the store within about
    /// this plus one upload.
    pub interval: Duration,
    /// A journal object is closed once it holds this many bytes of records.
    pub max_object_bytes: usize,
    /// Remote retention: points older than this are freed from the replica (see `rebase`).
    pub max_age: Option<Duration>,
    /// A remote snapshot (a delta) is made once this many journal bytes were shipped after the
    /// newest one, so that recovering a late point replays at most about this much journal
    /// (see `delta_due` for the other triggers). None: no deltas.
    pub delta_every: Option<u64>,
}

impl ShipperConfig {
    /// `serve --replicate`'s delta spacing when none is given: four times the volume's size
    /// (each delta holds at most the volume, so it takes at most a quarter of the journal it
    /// spares a recovery from replaying).
    pub fn default_delta_every(volume_size: u64) -> u64 {
        volume_size.saturating_mul(4)
    }
}

impl Default for ShipperConfig {
    fn default() -> Self {
        Self { interval: Duration::from_millis(200), max_object_bytes: 8 << 20, max_age: None, delta_every: None }
    }
}

/// `query-replication`: how far shipping has got.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ReplicationStatus {
    pub url: String,
    /// Every record up to here is in the replica (0 before the first manifest).
    pub shipped_seq: Seq,
    /// The local journal's newest record.
    pub head: Seq,
    /// Age of the oldest record not shipped yet; 0 when caught up.
    pub seconds_behind: f64,
    /// Journal bytes not shipped yet.
    pub bytes_pending: u64,
    /// The most recent failure, kept after recovery from it (see `failing`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Whether the last attempt failed.
    pub failing: bool,
    /// The oldest point the replica can rebuild.
    pub remote_oldest_seq: Seq,
    /// The replica's newest snapshot (the base, or the last delta): recovering a later point
    /// replays the journal from there.
    pub remote_snapshot_seq: Seq,
    /// Remote snapshots after the base.
    pub remote_deltas: u64,
    /// A remote snapshot is being made.
    pub making_delta: bool,
    pub objects_shipped: u64,
    pub bytes_shipped: u64,
    /// The local journal is over its size limit because of records held for shipping.
    pub journal_over_limit: bool,
}

/// `REPLICATION_ERROR`: shipping failed (it is retried), or the local journal outgrew its
/// limit because of records held for shipping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ReplicationError {
    pub error: String,
    pub shipped_seq: Seq,
}

/// `REPLICATION_CAUGHT_UP`: everything durable is shipped again, after a failure or at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ReplicationCaughtUp {
    pub shipped_seq: Seq,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationEvent {
    Error(ReplicationError),
    CaughtUp(ReplicationCaughtUp),
}

/// Reads a running shipper's status.
#[derive(Clone)]
pub struct StatusHandle(Arc<Mutex<ReplicationStatus>>);

impl StatusHandle {
    pub fn get(&self) -> ReplicationStatus {
        locked(&self.0).clone()
    }
}

/// Receives the shipper's events (the daemon sends them to its control clients).
pub type EventSink = Box<dyn Fn(ReplicationEvent) + Send>;

/// Longest wait between attempts while the store fails.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Data read per piece when cutting a snapshot into parts; the base's all-zero pieces are not
/// stored.
const PIECE: u64 = 1 << 20;
/// What the delta thread's errors call it.
const DELTA_WORK: &str = "the remote snapshot";
/// Where the base is built before it is uploaded, in the store's directory.
const BASE_BUILD_FILE: &str = "replica-base.tmp";
/// Where a full remote snapshot is rebuilt before it is uploaded.
const FULL_BUILD_FILE: &str = "replica-full.tmp";
/// Longest wait between attempts while remote snapshots fail (each may read a volume).
const SNAPSHOT_MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Failed remote snapshots in a row after which the local journal is no longer held for the
/// next one (local retention goes on as without deltas; a full snapshot of the store's own
/// then takes over once records it would need are freed).
const SNAPSHOT_FAILURES_BEFORE_RELEASE: u32 = 3;

/// Set to stop the thread; the condition variable wakes it.
type StopSignal = Arc<(Mutex<bool>, Condvar)>;

/// The running shipper. Stopping it (or dropping it) ships one more walk of what is durable
/// (at most a segment), unless the store is failing.
pub struct Shipper {
    status: Arc<Mutex<ReplicationStatus>>,
    stop: StopSignal,
    thread: Option<JoinHandle<()>>,
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shipper {
    /// Holds the store's retention at once (nothing unshipped may be freed from here on), then
    /// starts shipping to `remote` in a thread of its own.
    pub fn start(store: Arc<Store>, remote: Remote, config: ShipperConfig, events: EventSink) -> Result<Self> {
        store.keep_journal_from(0);
        if let Err(e) = crate::remembered::remember(store.store_dir(), remote.url()) {
            // Only offline status reads it; shipping does not need it.
            log::warn!("replication: cannot record the replica's URL in the store: {e}");
        }
        let syncer = Syncer::start(Arc::clone(&store))?;
        let status = Arc::new(Mutex::new(ReplicationStatus { url: remote.url().to_string(), ..Default::default() }));
        let stop: StopSignal = Arc::new((Mutex::new(false), Condvar::new()));
        let mut worker = Worker {
            store,
            syncer,
            buffers: BufferPool::new(config.max_object_bytes),
            remote: Arc::new(remote),
            config,
            events,
            status: Arc::clone(&status),
            stop: Arc::clone(&stop),
            manifest: None,
            retry_at: None,
            backoff: FIRST_BACKOFF,
            caught_up_due: true,
            error_reported: false,
            over_limit_reported: false,
            shipped_end: None,
            unshipped_time: None,
            retention_checked: None,
            delta: None,
            since_point: 0,
            delta_covers: None,
            delta_stop: Arc::default(),
            delta_retry_at: None,
            delta_backoff: FIRST_BACKOFF,
            delta_failures: 0,
        };
        let thread = std::thread::Builder::new()
            .name("rewind-replica".into())
            .spawn(move || worker.run())
            .map_err(|e| Error::Io { context: "starting the replication thread".into(), cause: e })?;
        Ok(Self { status, stop, thread: Some(thread) })
    }

    pub fn status(&self) -> ReplicationStatus {
        locked(&self.status).clone()
    }

    /// A handle that reads the status from elsewhere (the control socket).
    pub fn status_handle(&self) -> StatusHandle {
        StatusHandle(Arc::clone(&self.status))
    }

    /// Ships one more walk of what is durable (unless failing) and ends the thread.
    pub fn stop(mut self) {
        self.stop_thread();
    }

    fn stop_thread(&mut self) {
        *locked(&self.stop.0) = true;
        self.stop.1.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Shipper {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

/// Makes the journal durable in a thread of its own when asked, so that a walk finds the next
/// records durable instead of waiting for their `fdatasync` (under load it took as long as
/// shipping them).
struct Syncer {
    wanted: Option<mpsc::SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Syncer {
    fn start(store: Arc<Store>) -> Result<Self> {
        let (wanted, asked) = mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("rewind-replsync".into())
            .spawn(move || {
                fsutil::enter_housekeeping();
                while asked.recv().is_ok() {
                    // A failed sync fails the store's later syncs too; the walk that finds
                    // nothing durable syncs itself and reports it.
                    if let Err(e) = store.sync() {
                        log::debug!("replication: syncing the journal ahead of shipping failed: {e}");
                    }
                }
            })
            .map_err(|e| Error::Io { context: "starting the replication sync thread".into(), cause: e })?;
        Ok(Self { wanted: Some(wanted), thread: Some(thread) })
    }

    /// Asks for a sync of everything appended by now, unless one is asked for already.
    fn request(&self) {
        if let Some(wanted) = &self.wanted {
            let _ = wanted.try_send(());
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        // Closing the channel ends the thread after the sync under way, if any.
        self.wanted = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Worker {
    store: Arc<Store>,
    syncer: Syncer,
    buffers: BufferPool,
    remote: Arc<Remote>,
    config: ShipperConfig,
    events: EventSink,
    status: Arc<Mutex<ReplicationStatus>>,
    stop: StopSignal,
    /// The replica's manifest as last written or read; None until connected.
    manifest: Option<Manifest>,
    /// After a failure: no attempt before this.
    retry_at: Option<Instant>,
    backoff: Duration,
    /// REPLICATION_CAUGHT_UP is sent when everything durable is shipped (at start, after errors).
    caught_up_due: bool,
    /// A REPLICATION_ERROR was sent for the current run of failures.
    error_reported: bool,
    over_limit_reported: bool,
    /// Segment index and byte offset where the last shipped record ends, for `bytes-pending`.
    shipped_end: Option<(u64, u64)>,
    /// The first unshipped record's sequence number and timestamp, for `seconds-behind`.
    unshipped_time: Option<(Seq, u64)>,
    /// When remote retention last looked at the base's age.
    retention_checked: Option<Instant>,
    /// The remote snapshot being made in a thread of its own, if one is.
    delta: Option<JoinHandle<Result<DeltaInfo>>>,
    /// Journal bytes shipped after the replica's newest snapshot.
    since_point: u64,
    /// What `since_point` was when the delta under way started: the bytes it covers.
    delta_covers: Option<u64>,
    /// Set to stop the remote snapshot under way.
    delta_stop: Arc<AtomicBool>,
    /// After a failed remote snapshot: none before this (the journal ships meanwhile).
    delta_retry_at: Option<Instant>,
    delta_backoff: Duration,
    /// Remote snapshots failed in a row.
    delta_failures: u32,
}

impl Worker {
    fn stopping(&self) -> bool {
        *locked(&self.stop.0)
    }

    fn run(&mut self) {
        // Guest I/O comes first on a machine with few cores. The threads that write a
        // directory replica's files are started from this one and inherit its priority.
        fsutil::enter_housekeeping();
        loop {
            if self.stopping() {
                if self.retry_at.is_none() {
                    if let Err(e) = self.ship_durable() {
                        log::warn!("replication: final shipping to {} failed: {e}", self.remote.url());
                    }
                }
                // A snapshot under way stops soon; one finished is still listed.
                self.delta_stop.store(true, Ordering::Relaxed);
                if let Some(delta) = self.delta.take() {
                    let finished = delta.join().unwrap_or(Err(Error::ThreadDied(DELTA_WORK)));
                    if let Err(e) = finished.and_then(|delta| self.list_delta(delta)) {
                        log::info!(
                            "replication to {}: the remote snapshot under way was not finished: {e}",
                            self.remote.url()
                        );
                    }
                }
                return;
            }
            // Passes start every `interval` (at once after one that left durable records
            // behind): under load a pass takes about that long, and waiting a whole interval
            // after each one let the lag grow.
            let started = Instant::now();
            let backlog = self.tick();
            let wait = if backlog { Duration::ZERO } else { self.config.interval.saturating_sub(started.elapsed()) };
            let stop = locked(&self.stop.0);
            if !*stop && !wait.is_zero() {
                let _ = self.stop.1.wait_timeout(stop, wait);
            }
        }
    }

    /// One attempt at shipping; returns whether durable records are left to ship at once.
    fn tick(&mut self) -> bool {
        let mut backlog = false;
        if self.retry_at.is_none_or(|at| Instant::now() >= at) {
            match self.ship_durable() {
                Ok(more) => {
                    backlog = more;
                    self.retry_at = None;
                    self.backoff = FIRST_BACKOFF;
                    self.error_reported = false;
                    locked(&self.status).failing = false;
                }
                Err(e) => self.failed(e),
            }
        }
        if let Err(e) = self.refresh_status() {
            log::debug!("replication: cannot read the journal's state: {e}");
        }
        backlog
    }

    fn failed(&mut self, error: Error) {
        let shipped_seq = self.manifest.as_ref().map_or(0, |m| m.shipped_seq);
        log::warn!("replication to {}: {error} (retrying in {:?})", self.remote.url(), self.backoff);
        {
            let mut status = locked(&self.status);
            status.last_error = Some(error.to_string());
            status.failing = true;
        }
        if !self.error_reported {
            (self.events)(ReplicationEvent::Error(ReplicationError { error: error.to_string(), shipped_seq }));
            self.error_reported = true;
        }
        self.caught_up_due = true;
        self.retry_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    /// Connects if need be, then ships one walk (at most a segment) of the durable records.
    /// Returns whether durable records are left (in later segments).
    fn ship_durable(&mut self) -> Result<bool> {
        if self.manifest.is_none() {
            let manifest = self.connect()?;
            self.set_shipped(&manifest);
            self.manifest = Some(manifest);
        }
        let head = self.store.head();
        let backlog = self.ship_walk()?;
        self.finish_delta();
        self.start_delta_if_due()?;
        if self.caught_up_due && self.shipped() >= head {
            self.caught_up_due = false;
            let shipped_seq = self.shipped();
            log::info!("replication to {}: caught up at seq {shipped_seq}", self.remote.url());
            (self.events)(ReplicationEvent::CaughtUp(ReplicationCaughtUp { shipped_seq }));
        }
        self.apply_remote_retention()?;
        Ok(backlog)
    }

    /// Remote retention: once the replica's base is older than `max_age` by a quarter more
    /// (so that rebases are spaced out), the replica is rebased past the points older than
    /// `max_age`: onto its newest full snapshot in that quarter, which becomes the base as it
    /// is, else onto its last point older than `max_age`, rebuilt from the replica and uploaded
    /// (each such rebase downloads and uploads a volume). Every point from the new base on
    /// stays recoverable; markers before it are listed as expired.
    fn apply_remote_retention(&mut self) -> Result<()> {
        let (Some(max_age), Some(manifest)) = (self.config.max_age, self.manifest.as_ref()) else { return Ok(()) };
        if self.delta.is_some() {
            // The delta under way follows the present chain; the rebase waits for it.
            return Ok(());
        }
        let check_every = (max_age / 4).max(Duration::from_secs(1));
        if self.retention_checked.is_some_and(|at| at.elapsed() < check_every) {
            return Ok(());
        }
        self.retention_checked = Some(Instant::now());
        let new_base = match rebase_due(manifest, max_age, fsutil::now_ns()) {
            None => None,
            Some(Rebase::OntoFull(full)) => Some(full.as_base()),
            Some(Rebase::Rebuild { cutoff }) => self.rebuilt_base(manifest, cutoff)?,
        };
        let Some(base) = new_base else { return Ok(()) };
        let mut next = manifest.clone();
        // A later delta still follows the new base: its records start at or before it.
        next.deltas.retain(|delta| delta.seq > base.seq);
        next.base = base;
        next.max_age_secs = Some(max_age.as_secs());
        next.updated_ns = fsutil::now_ns();
        self.remote.put(MANIFEST_KEY, next.encode())?;
        log::info!(
            "replication to {}: remote retention rebased the replica from seq {} to seq {}{}",
            self.remote.url(),
            manifest.base.seq,
            next.base.seq,
            if manifest.counts_base_parts_of(next.base.seq) {
                " (a full snapshot became the base as it is)"
            } else {
                ""
            }
        );
        remove_unlisted(&self.remote, &next)?;
        self.set_shipped(&next);
        self.manifest = Some(next);
        Ok(())
    }

    /// The replica's base at its last point at or before `cutoff`, rebuilt from the replica in
    /// a temporary image and uploaded as base parts, or None when that point is not after the
    /// base.
    fn rebuilt_base(&self, manifest: &Manifest, cutoff: u64) -> Result<Option<BaseInfo>> {
        let build_path = self.store.store_dir().join(BASE_BUILD_FILE);
        let _ = std::fs::remove_file(&build_path);
        let rebuilt = restore::recover(
            &self.remote,
            manifest,
            &RecoveryTarget::Time(cutoff),
            &build_path,
            &mut |_, _| {},
            &|| self.stopping(),
        );
        let base = rebuilt.and_then(|(report, time_ns)| {
            if report.seq <= manifest.base.seq {
                return Ok(None);
            }
            // A full snapshot at that point becomes the base as it is: its parts are already
            // the base parts of that seq, and uploading them again would rewrite counted parts.
            if let Some(full) = manifest.deltas.iter().find(|d| d.full && d.seq == report.seq) {
                return Ok(Some(full.as_base()));
            }
            let image = File::open(&build_path).context(|| format!("opening {}", build_path.display()))?;
            let (parts, data_bytes) = upload_image(
                &self.remote,
                &image,
                manifest.store_uuid,
                report.seq,
                self.config.max_object_bytes,
                &|| self.stopping(),
            )?;
            Ok(Some(BaseInfo { seq: report.seq, time_ns, parts, data_bytes }))
        });
        let _ = std::fs::remove_file(&build_path);
        base
    }

    fn shipped(&self) -> Seq {
        self.manifest.as_ref().map_or(0, |m| m.shipped_seq)
    }

    /// Takes `manifest` as the replica's state: the local journal is held from the first
    /// record not shipped, or (when deltas are made) not in a remote snapshot, since the next
    /// delta is compacted from the local records.
    fn set_shipped(&self, manifest: &Manifest) {
        let held_after = match self.config.delta_every {
            Some(_) if self.delta_failures < SNAPSHOT_FAILURES_BEFORE_RELEASE => manifest.newest_point(),
            _ => manifest.shipped_seq,
        };
        self.store.keep_journal_from(held_after + 1);
        let mut status = locked(&self.status);
        status.shipped_seq = manifest.shipped_seq;
        status.remote_oldest_seq = manifest.base.seq;
        status.remote_snapshot_seq = manifest.newest_point();
        status.remote_deltas = manifest.deltas.len() as u64;
    }

    /// Reads the replica's manifest and resumes from it, or starts the replica with a base.
    fn connect(&mut self) -> Result<Manifest> {
        let uuid = self.store.status().uuid;
        let Some(manifest) = read_manifest(&self.remote)? else {
            return self.upload_base();
        };
        if manifest.store_uuid != uuid {
            return Err(Error::OtherStore {
                url: self.remote.url().to_string(),
                remote: manifest.store_uuid,
                local: uuid,
            });
        }
        let head = self.store.head();
        if manifest.shipped_seq > head {
            return Err(Error::Diverged {
                url: self.remote.url().to_string(),
                remote: manifest.shipped_seq,
                local: head,
            });
        }
        let first_local = self.store.journal_view().first_seq();
        if manifest.shipped_seq + 1 < first_local {
            let error = format!(
                "the replica ends at seq {} but the local journal starts at seq {first_local} (it was served without \
                 --replicate meanwhile): starting the replica again from a new base; remote points before it are lost",
                manifest.shipped_seq
            );
            log::warn!("replication to {}: {error}", self.remote.url());
            (self.events)(ReplicationEvent::Error(ReplicationError { error, shipped_seq: manifest.shipped_seq }));
            return self.upload_base();
        }
        remove_unlisted(&self.remote, &manifest)?;
        let newest_point = manifest.newest_point();
        self.since_point = list_journal(&self.remote)?
            .iter()
            .filter(|object| object.last > newest_point && object.last <= manifest.shipped_seq)
            .map(|object| object.size.saturating_sub(OBJECT_HEADER_LEN as u64))
            .sum();
        log::info!("replication to {}: resuming after seq {}", self.remote.url(), manifest.shipped_seq);
        // The next manifest written says what this run keeps.
        let max_age_secs = self.config.max_age.map(|age| age.as_secs());
        Ok(Manifest { max_age_secs, ..manifest })
    }

    /// Uploads the volume at the store's oldest recoverable point as the replica's base, then
    /// a manifest naming it (and nothing shipped after it yet).
    fn upload_base(&mut self) -> Result<Manifest> {
        let status = self.store.status();
        let seq = status.oldest_recoverable;
        let build_path = self.store.store_dir().join(BASE_BUILD_FILE);
        let _ = std::fs::remove_file(&build_path);
        log::info!("replication to {}: uploading the base at seq {seq}", self.remote.url());
        self.store.recover(&RecoveryTarget::Seq(seq), &build_path, &mut |_, _| {})?;
        let uploaded =
            File::open(&build_path).context(|| format!("opening {}", build_path.display())).and_then(|image| {
                upload_image(&self.remote, &image, status.uuid, seq, self.config.max_object_bytes, &|| false)
            });
        let _ = std::fs::remove_file(&build_path);
        let (parts, data_bytes) = uploaded?;
        let time_ns = self.record_time(seq).unwrap_or_else(|| {
            // The record itself was freed: the snapshot taken at it is no older than it.
            status.snapshots.iter().find(|s| s.seq == seq).map_or(0, |s| s.created_ns)
        });
        let mut manifest = Manifest::new(
            status.uuid,
            status.volume_size,
            status.block_size,
            BaseInfo { seq, time_ns, parts, data_bytes },
        );
        manifest.max_age_secs = self.config.max_age.map(|age| age.as_secs());
        manifest.markers = self.store.markers().into_iter().map(|m| m.marker).filter(|m| m.seq <= seq).collect();
        manifest.updated_ns = fsutil::now_ns();
        self.remote.put(MANIFEST_KEY, manifest.encode())?;
        remove_unlisted(&self.remote, &manifest)?;
        self.since_point = 0;
        Ok(manifest)
    }

    /// Lists a finished remote snapshot in the manifest, if it still fits the chain: a delta
    /// must follow the newest snapshot; a full snapshot replaces the delta at its point (whose
    /// parts are then deleted) or, made from the local store, follows the newest snapshot.
    fn list_delta(&mut self, delta: DeltaInfo) -> Result<()> {
        let Some(manifest) = self.manifest.as_ref() else { return Ok(()) };
        let mut next = manifest.clone();
        let newest = manifest.newest_point();
        let replaced = match next.deltas.last() {
            Some(last) if delta.full && last.seq == delta.seq && !last.full => next.deltas.pop(),
            _ if delta.seq > newest && delta.seq <= manifest.shipped_seq && (delta.full || delta.from == newest) => {
                None
            }
            // Not listed, so deleted as a leftover at the next start.
            _ => {
                self.delta_covers = None;
                return Ok(());
            }
        };
        log::info!(
            "replication to {}: remote {} snapshot at seq {} stored ({} parts, {} data bytes)",
            self.remote.url(),
            if delta.full { "full" } else { "delta" },
            delta.seq,
            delta.parts,
            delta.data_bytes,
        );
        next.deltas.push(delta);
        next.updated_ns = fsutil::now_ns();
        self.remote.put(MANIFEST_KEY, next.encode())?;
        self.since_point = self.since_point.saturating_sub(self.delta_covers.take().unwrap_or_default());
        self.set_shipped(&next);
        self.manifest = Some(next);
        if let Some(replaced) = replaced {
            delete_parts(&self.remote, replaced.parts_of(), replaced.seq, replaced.parts);
        }
        Ok(())
    }

    /// Lists the remote snapshot made in its thread once that is done. A failure is reported
    /// (`last-error`, a `REPLICATION_ERROR` event) and retried after a back-off of its own: the
    /// journal, which every point needs, keeps shipping meanwhile.
    fn finish_delta(&mut self) {
        if !self.delta.as_ref().is_some_and(|delta| delta.is_finished()) {
            return;
        }
        let Some(delta) = self.delta.take() else { return };
        locked(&self.status).making_delta = false;
        let finished = delta.join().unwrap_or(Err(Error::ThreadDied(DELTA_WORK)));
        let listed = finished.and_then(|delta| {
            // Before listing, so that the listing holds the journal again.
            self.delta_failures = 0;
            self.list_delta(delta)
        });
        match listed {
            Ok(()) => {
                self.delta_retry_at = None;
                self.delta_backoff = FIRST_BACKOFF;
            }
            Err(e) => {
                self.delta_covers = None;
                self.delta_failures += 1;
                let error = format!("remote snapshot: {e}");
                log::warn!(
                    "replication to {}: {error} (retrying in {:?}; the journal ships meanwhile)",
                    self.remote.url(),
                    self.delta_backoff
                );
                locked(&self.status).last_error = Some(error.clone());
                if self.delta_failures == 1 {
                    (self.events)(ReplicationEvent::Error(ReplicationError { error, shipped_seq: self.shipped() }));
                }
                if self.delta_failures == SNAPSHOT_FAILURES_BEFORE_RELEASE {
                    log::warn!(
                        "replication to {}: {} remote snapshots failed in a row: the local journal is no longer held \
                         for the next one",
                        self.remote.url(),
                        self.delta_failures
                    );
                    if let Some(manifest) = self.manifest.clone() {
                        self.set_shipped(&manifest);
                    }
                }
                self.delta_retry_at = Some(Instant::now() + self.delta_backoff);
                self.delta_backoff = (self.delta_backoff * 2).min(SNAPSHOT_MAX_BACKOFF);
            }
        }
    }

    /// Whether the next remote snapshot is due: `delta_every` journal bytes were shipped after
    /// the newest one, or the local journal it holds (from that snapshot on) reaches half of
    /// local retention's size or age limit, so that holding it never makes local retention
    /// overstep.
    fn delta_due(&self, manifest: &Manifest) -> bool {
        let Some(every) = self.config.delta_every else { return false };
        if manifest.shipped_seq <= manifest.newest_point() {
            return false;
        }
        let retention = self.store.retention();
        let by_size = self.since_point >= every.min(retention.max_bytes.map_or(u64::MAX, |max| max / 2));
        let point_time_ns = manifest.deltas.last().map_or(manifest.base.time_ns, |d| d.time_ns);
        let by_age = retention
            .max_age_secs
            .is_some_and(|age| fsutil::now_ns().saturating_sub(point_time_ns) / 1_000_000_000 >= age / 2);
        by_size || by_age
    }

    /// Starts making a remote snapshot in a thread of its own when one is due and none is under
    /// way (compacting and uploading it takes as long as reading what changed, and the journal
    /// keeps shipping meanwhile):
    /// - a full snapshot at the newest delta once the deltas after the last full one (or the
    ///   base) hold as much data as the volume, so that recovering a late point never reads
    ///   more than about twice the volume besides the journal after the newest snapshot;
    /// - else, when `delta_due`, a delta at the shipped point, or a full snapshot there if the
    ///   local records after the newest remote snapshot were freed (the store was served
    ///   without --replicate, or snapshots kept failing) so no delta can be compacted.
    ///
    /// Full snapshots are read from a point view of the local store: nothing is downloaded or
    /// copied, and guest I/O and shipping go on.
    fn start_delta_if_due(&mut self) -> Result<()> {
        let Some(manifest) = self.manifest.as_ref() else { return Ok(()) };
        if self.delta.is_some() || self.stopping() || self.delta_retry_at.is_some_and(|at| Instant::now() < at) {
            return Ok(());
        }
        // A delta reads the local records after the newest remote snapshot: only while they
        // are there and held (the hold is released after repeated failures).
        let records_held = self.delta_failures < SNAPSHOT_FAILURES_BEFORE_RELEASE
            && self.store.journal_view().first_seq() <= manifest.newest_point() + 1;
        let full_due = manifest.deltas.last().is_some_and(|d| !d.full)
            && manifest.delta_bytes_since_full() >= manifest.volume_size;
        let at_shipped = (manifest.shipped_seq, manifest.shipped_time_ns);
        let (kind, (seq, time_ns)) = match manifest.deltas.last() {
            Some(last) if full_due => (SnapshotKind::Full(manifest.clone()), (last.seq, last.time_ns)),
            _ if !self.delta_due(manifest) => return Ok(()),
            _ if !records_held => (SnapshotKind::Full(manifest.clone()), at_shipped),
            _ => (SnapshotKind::Delta, at_shipped),
        };
        if seq == manifest.shipped_seq {
            self.delta_covers = Some(self.since_point);
        }
        let work = DeltaWork {
            store: Arc::clone(&self.store),
            remote: Arc::clone(&self.remote),
            stop: Arc::clone(&self.delta_stop),
            store_uuid: manifest.store_uuid,
            from: manifest.newest_point(),
            seq,
            time_ns,
            max_object_bytes: self.config.max_object_bytes,
            kind,
        };
        let thread = std::thread::Builder::new()
            .name("rewind-repldelta".into())
            .spawn(move || work.run())
            .map_err(|e| Error::Io { context: "starting the remote snapshot thread".into(), cause: e })?;
        self.delta = Some(thread);
        locked(&self.status).making_delta = true;
        Ok(())
    }

    /// The timestamp of record `seq`, if the local journal still holds it.
    fn record_time(&self, seq: Seq) -> Option<u64> {
        let view = self.store.journal_view();
        if seq == 0 || seq < view.first_seq() {
            return None;
        }
        let mut time = None;
        view.for_each(seq, seq, Payloads::Skip, |rec| {
            time = Some(rec.header.timestamp_ns);
            Ok(())
        })
        .ok()?;
        time
    }

    /// Ships the durable records after the shipped point, up to the end of the segment holding
    /// the first of them, as byte ranges of the segment cut into objects at record boundaries
    /// (read while earlier objects upload), then the manifest that counts them. Returns
    /// whether durable records are left after the segment.
    ///
    /// Only durable records are shipped: a record lost in a crash is numbered again, and the
    /// replica must never hold the lost one. While this walk ships what is durable, the syncer
    /// makes the next records durable (an `fdatasync` under load took as long as a walk); only
    /// when nothing durable is left to ship does the walk sync itself.
    fn ship_walk(&mut self) -> Result<bool> {
        let Some(manifest) = self.manifest.as_ref() else { return Ok(false) };
        let from = manifest.shipped_seq + 1;
        let durable = match self.store.durable_seq() {
            durable if durable >= from => {
                if self.store.head() > durable {
                    self.syncer.request();
                }
                durable
            }
            _ => self.store.sync()?,
        };
        let view = self.store.journal_view();
        let Some(segment) = view.segments().iter().find(|s| s.first_seq <= from && from < s.next_seq) else {
            return Ok(false);
        };
        let start = match self.shipped_end {
            Some((index, end)) if index == segment.index => end,
            _ if from == segment.first_seq => SEGMENT_HEADER_LEN,
            _ => record_position(&view, from)?,
        };
        let mut objects = SegmentObjects {
            segment,
            store_uuid: manifest.store_uuid,
            max_object_bytes: self.config.max_object_bytes,
            pos: start,
            next_seq: from,
            last_seq: durable,
            last_time_ns: 0,
            markers: Vec::new(),
            failed: false,
            buffers: self.buffers.clone(),
        };
        self.remote.put_each(&mut objects, |_, len| {
            let mut status = locked(&self.status);
            status.objects_shipped += 1;
            status.bytes_shipped += len;
        })?;
        if objects.next_seq == from {
            return Ok(false);
        }
        let mut next = manifest.clone();
        next.shipped_seq = objects.next_seq - 1;
        next.shipped_time_ns = objects.last_time_ns;
        next.markers.append(&mut objects.markers);
        next.updated_ns = fsutil::now_ns();
        // Only once every object it counts is stored.
        self.remote.put(MANIFEST_KEY, next.encode())?;
        self.shipped_end = Some((segment.index, objects.pos));
        self.since_point += objects.pos - start;
        self.set_shipped(&next);
        self.manifest = Some(next);
        Ok(objects.next_seq <= durable)
    }

    /// Head, lag and pending bytes for `query-replication`, and the journal's size against its
    /// limit.
    fn refresh_status(&mut self) -> Result<()> {
        let view = self.store.journal_view();
        let head = view.next_seq() - 1;
        let shipped = self.shipped();
        let bytes_pending = pending_bytes(&view, shipped, self.shipped_end);
        let seconds_behind = if shipped < head { self.age_of(&view, shipped + 1)? } else { 0.0 };
        let journal_bytes: u64 = view.segments().iter().map(|s| s.used_bytes()).sum();
        let limit = self.store.retention().max_bytes;
        let over_limit = shipped < head && limit.is_some_and(|max| journal_bytes > max);
        if over_limit && !self.over_limit_reported {
            let error = format!(
                "the local journal holds {journal_bytes} bytes, over its limit of {} bytes, because records after seq \
                 {shipped} are not shipped yet; they are kept until shipped (guest I/O goes on)",
                limit.unwrap_or_default()
            );
            log::warn!("replication to {}: {error}", self.remote.url());
            (self.events)(ReplicationEvent::Error(ReplicationError { error, shipped_seq: shipped }));
        }
        self.over_limit_reported = over_limit;
        let mut status = locked(&self.status);
        status.head = head;
        status.bytes_pending = bytes_pending;
        status.seconds_behind = seconds_behind;
        status.journal_over_limit = over_limit;
        Ok(())
    }

    /// Seconds since the first unshipped record, `seq`, was written. Its header is read from
    /// where the last shipped record ended when that is known (a walk from a segment's start
    /// costs a read of all of it).
    fn age_of(&mut self, view: &JournalView, seq: Seq) -> Result<f64> {
        let time_ns = match self.unshipped_time {
            Some((cached, time_ns)) if cached == seq => time_ns,
            _ => {
                let mut time_ns = fsutil::now_ns();
                let mut visit = |rec: RecordRef<'_>| {
                    time_ns = rec.header.timestamp_ns;
                    Ok(())
                };
                match self.shipped_end {
                    Some(position) => view.for_each_from_position(seq, position, seq, Payloads::Skip, &mut visit)?,
                    None => view.for_each(seq, seq, Payloads::Skip, &mut visit)?,
                }
                self.unshipped_time = Some((seq, time_ns));
                time_ns
            }
        };
        Ok(fsutil::now_ns().saturating_sub(time_ns) as f64 / 1e9)
    }
}

/// Where record `seq` starts in its segment (after a restart, or when shipping moves on to
/// another segment): from the segment's header index, else a walk of its headers.
fn record_position(view: &JournalView, seq: Seq) -> Result<u64> {
    let mut position = None;
    view.for_each_header(seq, seq, |_, record| {
        position = Some(record.payload_position - HEADER_LEN as u64);
        Ok(())
    })?;
    position.ok_or(Error::Gap { seq })
}

/// Object buffers given back once their upload is done, so that the next objects are read into
/// memory already mapped: a new 8 MiB buffer per object cost page faults and zeroing, a third
/// of the shipper's CPU. Holds at most as many as can be in use at once, and none larger than
/// an object (the buffer of a record larger than that is freed).
#[derive(Clone)]
struct BufferPool {
    free: Arc<Mutex<Vec<Vec<u8>>>>,
    largest: usize,
}

impl BufferPool {
    fn new(max_object_bytes: usize) -> Self {
        Self { free: Arc::default(), largest: OBJECT_HEADER_LEN + max_object_bytes }
    }

    /// A buffer of `len` bytes, whose contents are whatever it held before.
    fn take(&self, len: usize) -> Vec<u8> {
        let mut buffer = locked(&self.free).pop().unwrap_or_default();
        buffer.resize(len, 0);
        buffer
    }

    fn give_back(&self, buffer: Vec<u8>) {
        let mut free = locked(&self.free);
        if free.len() <= PARALLEL_UPLOADS && buffer.capacity() <= self.largest {
            free.push(buffer);
        }
    }
}

/// An object's bytes on their way to the store: dropped once the upload is done (or failed),
/// they go back to the pool.
struct Pooled {
    bytes: Vec<u8>,
    pool: BufferPool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.bytes));
    }
}

/// The journal objects of one segment's unshipped records, read lazily: each is one read of
/// the segment's bytes as they are (the objects use the journal's record encoding), checked
/// header by header ([`layout::scan_records`]) and cut at the last whole record. Only the
/// records of the view, all durable, are read.
struct SegmentObjects<'a> {
    segment: &'a Segment,
    store_uuid: uuid::Uuid,
    max_object_bytes: usize,
    /// Where the next object's first record starts.
    pos: u64,
    next_seq: Seq,
    /// The last record to ship (the last durable one).
    last_seq: Seq,
    /// Timestamp of the last record read.
    last_time_ns: u64,
    markers: Vec<Marker>,
    failed: bool,
    buffers: BufferPool,
}

impl SegmentObjects<'_> {
    fn read(&mut self) -> Result<(String, Bytes)> {
        let left = self.segment.end - self.pos;
        let mut want = left.min(self.max_object_bytes as u64);
        loop {
            let mut object = self.buffers.take(OBJECT_HEADER_LEN + want as usize);
            JournalView::read_payload(self.segment, self.pos, &mut object[OBJECT_HEADER_LEN..])?;
            let run =
                layout::scan_records(&object[OBJECT_HEADER_LEN..], self.next_seq, self.last_seq).map_err(|fault| {
                    rewind_engine::Error::JournalCorrupt {
                        segment: self.segment.path.clone(),
                        offset: self.pos + fault.at as u64,
                        reason: fault.reason,
                    }
                })?;
            match run.cut_short {
                // A record larger than an object: it goes alone, read whole.
                Some(len) if run.count == 0 && len <= left && len != want => want = len,
                _ if run.count == 0 => {
                    return Err(rewind_engine::Error::JournalCorrupt {
                        segment: self.segment.path.clone(),
                        offset: self.pos,
                        reason: format!("record {} runs past the journal's end", self.next_seq),
                    }
                    .into())
                }
                _ => {
                    object.truncate(OBJECT_HEADER_LEN + run.len);
                    let key = layout::seal_journal_object(&mut object, self.store_uuid, &run);
                    self.pos += run.len as u64;
                    self.next_seq = run.last + 1;
                    self.last_time_ns = run.last_time_ns;
                    self.markers.extend(run.markers);
                    return Ok((key, Bytes::from_owner(Pooled { bytes: object, pool: self.buffers.clone() })));
                }
            }
        }
    }
}

impl Iterator for SegmentObjects<'_> {
    type Item = Result<(String, Bytes)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.segment.end || self.next_seq > self.last_seq || self.failed {
            return None;
        }
        let object = self.read();
        // The walk fails with the first error: the objects after it are not read.
        self.failed = object.is_err();
        Some(object)
    }
}

/// Packs a snapshot's ranges into parts of about `max_object_bytes` (table entries included),
/// uploading each as it fills.
struct PartUploader<'a> {
    remote: &'a Remote,
    of: PartOf,
    store_uuid: uuid::Uuid,
    seq: Seq,
    max_object_bytes: usize,
    extents: Vec<PartExtent>,
    held: usize,
    parts: u64,
    data_bytes: u64,
}

impl<'a> PartUploader<'a> {
    fn new(remote: &'a Remote, of: PartOf, store_uuid: uuid::Uuid, seq: Seq, max_object_bytes: usize) -> Self {
        Self { remote, of, store_uuid, seq, max_object_bytes, extents: Vec::new(), held: 0, parts: 0, data_bytes: 0 }
    }

    fn push(&mut self, extent: PartExtent) -> Result<()> {
        if let PartData::Bytes(data) = &extent.data {
            self.held += data.len();
            self.data_bytes += data.len() as u64;
        }
        self.held += EXTENT_ENTRY_LEN;
        self.extents.push(extent);
        if self.held >= self.max_object_bytes {
            self.upload()?;
        }
        Ok(())
    }

    fn upload(&mut self) -> Result<()> {
        if self.extents.is_empty() {
            return Ok(());
        }
        let bytes = layout::encode_part(self.of, self.store_uuid, self.seq, self.parts, &self.extents);
        self.remote.put(&self.of.key(self.seq, self.parts), bytes)?;
        self.parts += 1;
        self.extents.clear();
        self.held = 0;
        Ok(())
    }

    /// Pushes the extents `fill` gives, then uploads what is left; returns the parts and data
    /// bytes stored. Cut short by a stop, it deletes the parts it stored unless the bucket's
    /// manifest lists them: a host that never starts the shipper again would leave them in the
    /// bucket. (The bucket's manifest, not the worker's: a manifest whose upload timed out may
    /// have been stored all the same, listing the same snapshot made before and made again.)
    fn fill(mut self, fill: impl FnOnce(&mut Self) -> Result<()>) -> Result<(u64, u64)> {
        match fill(&mut self).and_then(|()| self.upload()) {
            Ok(()) => Ok((self.parts, self.data_bytes)),
            Err(error) => {
                if matches!(error, Error::Stopped(_)) {
                    match read_manifest(self.remote) {
                        Ok(listing) if !listing.as_ref().is_some_and(|m| m.counts_parts(self.of, self.seq)) => {
                            delete_parts(self.remote, self.of, self.seq, self.parts)
                        }
                        Ok(_) => {}
                        Err(e) => log::info!(
                            "replication to {}: the parts of a snapshot cut short are left for the next start to \
                             delete (reading the manifest: {e})",
                            self.remote.url()
                        ),
                    }
                }
                Err(error)
            }
        }
    }
}

/// Which remote snapshot a [`DeltaWork`] makes.
enum SnapshotKind {
    /// The net effect of the local records after the newest remote snapshot.
    Delta,
    /// The whole volume, rebuilt from the replica this manifest describes (every object's
    /// checksums checked on the way).
    Full(Manifest),
}

/// A remote snapshot to make at `seq`: a delta compacted from the local records in
/// `from + 1 ..= seq` (which the store holds until it is listed), or a full snapshot.
struct DeltaWork {
    store: Arc<Store>,
    remote: Arc<Remote>,
    stop: Arc<AtomicBool>,
    store_uuid: uuid::Uuid,
    from: Seq,
    seq: Seq,
    time_ns: u64,
    max_object_bytes: usize,
    kind: SnapshotKind,
}

impl DeltaWork {
    fn run(self) -> Result<DeltaInfo> {
        let (from, (parts, data_bytes), full) = match &self.kind {
            SnapshotKind::Delta => (self.from, self.upload_delta()?, false),
            SnapshotKind::Full(manifest) => (self.seq, self.upload_full(manifest)?, true),
        };
        Ok(DeltaInfo { seq: self.seq, from, time_ns: self.time_ns, parts, data_bytes, full })
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn upload_delta(&self) -> Result<(u64, u64)> {
        let view = self.store.journal_view();
        // Payload checksums are checked as the payloads are read: the delta's own checksums
        // must never cover damaged bytes.
        let effect = snapshot::net_effect(&view, self.from, self.seq, &self.stop)?;
        let mut kept = snapshot::KeptRanges::new(&view, PIECE as usize);
        let parts = PartUploader::new(&self.remote, PartOf::Delta, self.store_uuid, self.seq, self.max_object_bytes);
        parts.fill(|parts| {
            for (offset, len, source) in effect.iter() {
                if source == Source::Zero {
                    parts.push(PartExtent { offset, data: PartData::Zeroes(len) })?;
                    continue;
                }
                kept.read(offset, source, len, |done, piece| {
                    if self.stopping() {
                        return Err(Error::Stopped(DELTA_WORK));
                    }
                    parts.push(PartExtent { offset: offset + done, data: PartData::Bytes(piece.to_vec()) })
                })?;
            }
            Ok(())
        })
    }

    /// Rebuilds the volume at `seq` from the replica (its newest full snapshot before `seq` and
    /// the deltas and journal after it) in a temporary image in the store's directory, and
    /// uploads it as base parts. The replica, not the store, is read: every byte comes through
    /// the replica's own checksums, and neither the store's maintenance lock nor its journal
    /// hold is needed.
    fn upload_full(&self, manifest: &Manifest) -> Result<(u64, u64)> {
        let build_path = self.store.store_dir().join(FULL_BUILD_FILE);
        let _ = std::fs::remove_file(&build_path);
        let stopping = || self.stopping();
        let target = RecoveryTarget::Seq(self.seq);
        let uploaded = restore::recover(&self.remote, manifest, &target, &build_path, &mut |_, _| {}, &stopping)
            .and_then(|_| File::open(&build_path).context(|| format!("opening {}", build_path.display())))
            .and_then(|image| {
                upload_image(&self.remote, &image, self.store_uuid, self.seq, self.max_object_bytes, &stopping)
            });
        let _ = std::fs::remove_file(&build_path);
        uploaded
    }
}

/// Where remote retention rebases a replica.
#[derive(Debug, PartialEq)]
pub(crate) enum Rebase<'a> {
    /// Onto this full snapshot, as it is.
    OntoFull(&'a DeltaInfo),
    /// Onto the last point at or before `cutoff` (ns), rebuilt and uploaded.
    Rebuild { cutoff: u64 },
}

/// The rebase remote retention makes at `now` (ns), if one is due: once the base is older than
/// `max_age` by a quarter more, onto the newest full snapshot in that quarter (older than
/// `max_age`, so no retained point is lost, and not older than the quarter, or the next
/// rebase would be due at once), else onto the last point older than `max_age`.
pub(crate) fn rebase_due(manifest: &Manifest, max_age: Duration, now: u64) -> Option<Rebase<'_>> {
    let max_age_ns = u64::try_from(max_age.as_nanos()).unwrap_or(u64::MAX);
    let due_before = now.saturating_sub(max_age_ns.saturating_add(max_age_ns / 4));
    if manifest.base.time_ns >= due_before {
        return None;
    }
    let cutoff = now.saturating_sub(max_age_ns);
    let full_in_slack = manifest.deltas.iter().rev().find(|d| d.full && d.time_ns <= cutoff && d.time_ns >= due_before);
    Some(full_in_slack.map_or(Rebase::Rebuild { cutoff }, Rebase::OntoFull))
}

/// Cuts `image` (the volume at `seq`) into base parts of about `max_object_bytes`, leaving out
/// holes and all-zero pieces (they read as zeroes in a new image), unless `stopping` says to
/// give up. Returns the parts and data bytes stored.
fn upload_image(
    remote: &Remote,
    image: &File,
    store_uuid: uuid::Uuid,
    seq: Seq,
    max_object_bytes: usize,
    stopping: &dyn Fn() -> bool,
) -> Result<(u64, u64)> {
    let volume_size = image.metadata().context(|| "reading the size of the image to upload".to_string())?.len();
    let ranges = fsutil::data_ranges(image, volume_size).context(|| "mapping the image to upload".to_string())?;
    PartUploader::new(remote, PartOf::Base, store_uuid, seq, max_object_bytes).fill(|parts| {
        for (start, len) in ranges {
            let mut offset = start;
            while offset < start + len {
                if stopping() {
                    return Err(Error::Stopped(DELTA_WORK));
                }
                let piece = PIECE.min(start + len - offset);
                let mut data = vec![0u8; piece as usize];
                image
                    .read_exact_at(&mut data, offset)
                    .context(|| format!("reading the image to upload at {offset}"))?;
                if data.iter().any(|&b| b != 0) {
                    parts.push(PartExtent { offset, data: PartData::Bytes(data) })?;
                }
                offset += piece;
            }
        }
        Ok(())
    })
}

/// Deletes parts `0..parts` of the snapshot at `seq`, which no manifest lists; one that cannot be
/// deleted is left for the next start to delete.
fn delete_parts(remote: &Remote, of: PartOf, seq: Seq, parts: u64) {
    for part in 0..parts {
        let key = of.key(seq, part);
        if let Err(e) = remote.delete(&key) {
            log::info!("replication to {}: {key} is left for the next start to delete: {e}", remote.url());
        }
    }
}

/// Journal bytes after the last shipped record, which ends at `shipped_end` (segment index and
/// offset) when known.
fn pending_bytes(view: &JournalView, shipped: Seq, shipped_end: Option<(u64, u64)>) -> u64 {
    view.segments()
        .iter()
        .filter(|s| s.next_seq > shipped + 1)
        .map(|s| match shipped_end {
            Some((index, end)) if index == s.index => s.end.saturating_sub(end),
            // A later segment, or (before the first walk after a restart, an over-estimate) the
            // one holding the shipped point.
            _ => s.end - SEGMENT_HEADER_LEN,
        })
        .sum()
}

/// Deletes what the manifest does not count: journal objects past the shipped point (an
/// upload cut short) or wholly before the base, and parts of other bases and deltas.
fn remove_unlisted(remote: &Remote, manifest: &Manifest) -> Result<()> {
    for object in list_journal(remote)? {
        if object.last > manifest.shipped_seq || object.last <= manifest.base.seq {
            log::info!("replication to {}: removing {} (not counted by the manifest)", remote.url(), object.key);
            remote.delete(&object.key)?;
        }
    }
    for (of, dir) in [(PartOf::Base, BASE_DIR), (PartOf::Delta, DELTA_DIR)] {
        for object in remote.list(dir)? {
            if !of.parse_key(&object.key).is_some_and(|seq| manifest.counts_parts(of, seq)) {
                log::info!(
                    "replication to {}: removing {} (not a part of a snapshot the manifest lists)",
                    remote.url(),
                    object.key
                );
                remote.delete(&object.key)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use object_store::memory::InMemory;
    use object_store::ObjectStore;

    use super::*;
    use crate::layout::DELTA_DIR;

    /// A snapshot made again after a manifest listing it was stored, though its upload was
    /// reported failed, keeps its parts when a stop cuts the new one short.
    #[test]
    fn parts_a_stop_cuts_short_are_deleted_unless_the_buckets_manifest_lists_them() {
        let objects: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let remote = Remote::with_store("memory:///", objects, Duration::from_secs(5)).unwrap();
        let store_uuid = uuid::Uuid::new_v4();
        let base = BaseInfo { seq: 0, time_ns: 0, parts: 0, data_bytes: 0 };
        let mut manifest = Manifest::new(store_uuid, 1 << 20, 4096, base);
        manifest.shipped_seq = 11;
        manifest.deltas.push(DeltaInfo { seq: 10, from: 0, time_ns: 1, parts: 4, data_bytes: 400, full: false });
        remote.put(MANIFEST_KEY, manifest.encode()).unwrap();
        for (seq, listed) in [(10, true), (11, false)] {
            // Parts of one extent each, the fifth never stored.
            let uploader = PartUploader::new(&remote, PartOf::Delta, store_uuid, seq, 64);
            let cut_short = uploader.fill(|parts| {
                for extent in 0..4 {
                    parts.push(PartExtent { offset: extent * 4096, data: PartData::Bytes(vec![7; 100]) })?;
                }
                Err(Error::Stopped("the test"))
            });
            assert!(matches!(cut_short, Err(Error::Stopped(_))), "{cut_short:?}");
            let stored = remote.list(DELTA_DIR).unwrap();
            let kept = stored.iter().filter(|o| PartOf::Delta.parse_key(&o.key) == Some(seq)).count();
            assert_eq!(kept, if listed { 4 } else { 0 }, "seq {seq}");
        }
    }
}
