//! The store: one data volume with its journal, snapshots and markers, and the write path that
//! ties them together. Safe to share between I/O threads (`&self` everywhere).
//!
//! Locks, always taken in this order: `maintenance` (snapshots, retention, recovery, verify:
//! the slow operations, one at a time) → `writer` (numbering and journal append) → `durable`
//! (group commit of `sync`). The write path takes only `writer` and, to sync, `durable`.
//! Volume applies run outside every lock, ordered by [`applying`]: a batch waits only for
//! earlier batches that overlap it, so the volume still ends up written in sequence order.
//!
//! Why one long file: every public operation here takes the locks above in that order, and
//! keeping them side by side is what lets a reader check the order. The pieces that need no
//! lock of the store's live apart (`applying`, `recovery`, `retention`, `snapshot`); splitting
//! the open path and the maintenance operations into their own files is the next step.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::fsutil;
use crate::journal::{CacheDropper, Journal, JournalView, NewRecord, Payloads, RecordKind, SparePreparer, TailRepair};
use crate::marker::{self, Marker, MarkerIndex, MarkerSource};
use crate::recovery::{self, Progress, RecoveryReport, RecoveryTarget};
use crate::retention::{self, RetentionPlan, RetentionPolicy, SegmentSummary};
use crate::snapshot::{SnapshotInfo, SnapshotOrigin, SnapshotStore};
use crate::view::{PointView, ViewPinStatus, ViewPins};
use crate::{Seq, FORMAT_VERSION};

mod applying;

use applying::{ApplyTicket, Applying};

/// Size of a journal segment file unless [`CreateOptions`] says otherwise.
pub const DEFAULT_SEGMENT_CAPACITY: u64 = 64 << 20;
/// The smallest journal segment: a header and a few records.
pub const MIN_SEGMENT_CAPACITY: u64 = 4096;
/// A sector: the volume's size is a whole number of them.
pub const SECTOR_SIZE: u64 = 512;
const META_FILE: &str = "meta.json";
const LOCK_FILE: &str = "lock";
const JOURNAL_DIR: &str = "journal";
const SNAPSHOT_DIR: &str = "snapshots";

/// The store's persistent metadata (`meta.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Meta {
    pub format_version: u32,
    pub uuid: uuid::Uuid,
    pub volume_size: u64,
    pub block_size: u32,
    pub segment_capacity: u64,
    /// Every record up to here is durably applied to the volume (the checkpoint).
    pub applied_seq: Seq,
    pub retention: RetentionPolicy,
    /// The boot the store is open in, cleared on a clean close. Found set from another boot,
    /// it means the machine went down with the store open: unsynced volume writes may have
    /// been lost or kept in any mix, so the volume is rebuilt from the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_in_boot: Option<String>,
    /// Set, before anything is repaired, by an open that follows an unclean shutdown, and
    /// cleared when that open is done. Found set, an open was interrupted part-way: it may have
    /// cut the journal's tail (durably) and then died while rebuilding the volume, so the next
    /// open could find nothing else to say the volume must be rebuilt.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub open_unfinished: bool,
}

/// This boot's identity, or None where the kernel does not tell.
fn boot_id() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().map(|id| id.trim().to_string())
}

/// How [`Store::create`] lays out a new store.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Size of a new image; an existing image is adopted at its own size.
    pub size: Option<u64>,
    /// Bytes per journal segment file.
    pub segment_capacity: u64,
    /// The retention policy stored with the store (can be changed later).
    pub retention: RetentionPolicy,
}

impl Default for CreateOptions {
    fn default() -> Self {
        Self { size: None, segment_capacity: DEFAULT_SEGMENT_CAPACITY, retention: RetentionPolicy::default() }
    }
}

/// One change to the volume.
#[derive(Debug, Clone, Copy)]
pub enum VolumeOp<'a> {
    /// Data in pieces (as it sits in guest memory), written contiguously at `offset`.
    Write { offset: u64, data: &'a [&'a [u8]] },
    /// `len` bytes at `offset` become zeroes.
    WriteZeroes { offset: u64, len: u64 },
    /// `len` bytes at `offset` are no longer needed; they read back as zeroes.
    Discard { offset: u64, len: u64 },
}

impl VolumeOp<'_> {
    /// Offset and length of the bytes it changes.
    pub(crate) fn range(&self) -> (u64, u64) {
        match *self {
            Self::Write { offset, data } => (offset, data.iter().map(|d| d.len() as u64).sum()),
            Self::WriteZeroes { offset, len } | Self::Discard { offset, len } => (offset, len),
        }
    }
}

/// A [`VolumeOp`] of a journaled batch, its data (if any) in the batch's own copy.
enum CopiedOp {
    Write { offset: u64, data: std::ops::Range<usize> },
    WriteZeroes { offset: u64, len: u64 },
    Discard { offset: u64, len: u64 },
}

impl CopiedOp {
    /// Copies `op`'s data to the end of `copy`.
    fn copy(op: &VolumeOp<'_>, copy: &mut Vec<u8>) -> Self {
        match *op {
            VolumeOp::Write { offset, data } => {
                let start = copy.len();
                for piece in data {
                    copy.extend_from_slice(piece);
                }
                Self::Write { offset, data: start..copy.len() }
            }
            VolumeOp::WriteZeroes { offset, len } => Self::WriteZeroes { offset, len },
            VolumeOp::Discard { offset, len } => Self::Discard { offset, len },
        }
    }

    /// The op's record; `payload` is its data in the copy, as a one-piece list.
    fn record<'a>(&self, payload: &'a [&'a [u8]]) -> NewRecord<'a> {
        match *self {
            Self::Write { offset, ref data } => {
                NewRecord { kind: RecordKind::Write, offset, length: data.len() as u64, payload }
            }
            Self::WriteZeroes { offset, len } => {
                NewRecord { kind: RecordKind::WriteZeroes, offset, length: len, payload: &[] }
            }
            Self::Discard { offset, len } => NewRecord { kind: RecordKind::Discard, offset, length: len, payload: &[] },
        }
    }
}

/// A marker and whether its point can still be recovered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarkerStatus {
    #[serde(flatten)]
    pub marker: Marker,
    /// The point can no longer be recovered: its journal was freed and no snapshot pins it.
    pub expired: bool,
}

/// A summary of the store ([`Store::status`]), as `rewind status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Status {
    pub image: PathBuf,
    pub store: PathBuf,
    pub uuid: uuid::Uuid,
    pub volume_size: u64,
    pub block_size: u32,
    /// Oldest record still in the journal (head + 1 when the journal is empty).
    pub first_seq: Seq,
    /// Newest record (0 before the first).
    pub head: Seq,
    /// Every point from here to `head` is recoverable; older ones only where a snapshot is.
    pub oldest_recoverable: Seq,
    /// Every record up to here is durably applied to the volume.
    pub checkpoint: Seq,
    pub journal_bytes: u64,
    pub journal_segments: usize,
    pub snapshots: Vec<SnapshotInfo>,
    pub snapshot_bytes: u64,
    pub markers: usize,
    pub expired_markers: usize,
    pub retention: RetentionPolicy,
    /// Open point-in-time views, and what of the journal and snapshots they hold on to.
    #[serde(default)]
    pub view_pins: Vec<ViewPinStatus>,
}

/// What [`Store::enforce_retention`] freed and took.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RetentionReport {
    pub freed_segments: usize,
    pub freed_bytes: u64,
    /// Snapshots taken so that the remaining points stay recoverable.
    pub snapshots_taken: Vec<Seq>,
    /// Deltas no retained point needs any more, merged into the base.
    pub merged_into_base: usize,
    pub oldest_recoverable: Seq,
}

/// What [`Store::verify`] checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct VerifyReport {
    pub records_checked: u64,
    pub snapshots_checked: usize,
    pub head: Seq,
    pub volume_bytes_compared: u64,
}

/// What opening found and repaired.
#[derive(Debug, Clone, Default)]
pub struct OpenReport {
    pub tail_repair: Option<TailRepair>,
    pub records_replayed: u64,
    /// Why the volume was rebuilt from the snapshots and journal, if it was.
    pub volume_rebuilt: Option<String>,
}

struct Writer {
    journal: Journal,
    markers: MarkerIndex,
    guest_marker_rate: TokenBucket,
}

/// A rate limit: `rate` a second on average, `burst` at once.
#[derive(Debug)]
struct TokenBucket {
    tokens: f64,
    refilled: std::time::Instant,
    rate: f64,
    burst: f64,
}

impl TokenBucket {
    fn new(rate: f64, burst: f64) -> Self {
        Self { tokens: burst, refilled: std::time::Instant::now(), rate, burst }
    }

    /// Takes a token if there is one.
    fn take(&mut self) -> bool {
        let now = std::time::Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.refilled).as_secs_f64() * self.rate).min(self.burst);
        self.refilled = now;
        let taken = self.tokens >= 1.0;
        if taken {
            self.tokens -= 1.0;
        }
        taken
    }
}

/// The writes a read must see: those journaled before the fence was taken.
#[derive(Debug, Clone, Copy)]
pub struct ReadFence(Seq);

/// A batch in the journal whose writes still have to reach the volume ([`Store::apply`]).
///
/// It holds its own copy of the writes' data, taken before the checksums were computed, and the
/// volume is written from that copy too: the caller's buffers may change while the batch is in
/// flight (a guest may modify a page under writeback), and a record whose bytes differ from its
/// checksum would read as damage, or a volume from its journal.
pub struct Journaled {
    ticket: ApplyTicket,
    ops: Vec<CopiedOp>,
    copy: Vec<u8>,
}

struct Maintenance {
    snapshots: SnapshotStore,
    meta: Meta,
}

/// The recoverable range's lower end and the snapshot points, kept apart from `maintenance`
/// so listings never wait behind a long recovery.
#[derive(Clone, Default)]
struct Recoverability {
    oldest: Seq,
    snapshot_points: Vec<Seq>,
}

impl Recoverability {
    fn marker_expired(&self, seq: Seq) -> bool {
        seq < self.oldest && !self.snapshot_points.contains(&seq)
    }
}

/// A data volume with its journal, snapshots and markers (see the module documentation).
pub struct Store {
    image: PathBuf,
    dir: PathBuf,
    volume: File,
    volume_size: u64,
    _lock: File,
    maintenance: Mutex<Maintenance>,
    writer: Mutex<Writer>,
    applying: Arc<Applying>,
    durable: Mutex<Seq>,
    /// Set for good when a sync failed. The kernel may have dropped the dirty pages it could
    /// not write and will not report that again, so a later sync that succeeds proves nothing:
    /// writes and flushes fail from then on, and so do reads when it was the volume's sync.
    sync_failure: Mutex<Option<SyncFailure>>,
    /// Whether `sync_failure` is set: what the write and read paths look at.
    sync_failed: std::sync::atomic::AtomicBool,
    recoverability: Mutex<Recoverability>,
    /// Open point-in-time views: retention keeps what they read.
    view_pins: ViewPins,
    /// Retention keeps every record numbered at or above this (see
    /// [`keep_journal_from`](Self::keep_journal_from)); `Seq::MAX` when nothing asks.
    /// Shared with the cache dropper, which leaves sealed segments cached while it holds.
    retention_floor: Arc<std::sync::atomic::AtomicU64>,
    _spares: SparePreparer,
    _uncache: CacheDropper,
}

/// The store directory used for `image` unless one is named: `IMAGE.rewind` beside it.
pub fn default_store_dir(image: &Path) -> PathBuf {
    let mut name = image.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".rewind");
    image.with_file_name(name)
}

#[derive(Debug, Clone)]
struct SyncFailure {
    what: String,
    /// The volume's sync failed: what it holds may not be what was written.
    volume: bool,
}

fn lock_poisoned<T>(guard: std::sync::LockResult<MutexGuard<'_, T>>) -> MutexGuard<'_, T> {
    // A panic while holding a lock is a bug; the state behind it stays consistent because every
    // mutation is completed or returned as an error before the guard is released.
    guard.unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn read_meta(dir: &Path) -> Result<Meta> {
    let path = dir.join(META_FILE);
    let text = match fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Error::NoStore(dir.to_path_buf())),
        Err(e) => return Err(Error::Io { context: format!("reading {}", path.display()), cause: e }),
    };
    let meta: Meta =
        serde_json::from_slice(&text).map_err(|e| Error::BadMetadata { path: path.clone(), reason: e.to_string() })?;
    if meta.format_version != FORMAT_VERSION {
        return Err(Error::UnsupportedVersion { path, found: meta.format_version, supported: FORMAT_VERSION });
    }
    Ok(meta)
}

fn write_meta(dir: &Path, meta: &Meta) -> Result<()> {
    fsutil::write_atomically(&dir.join(META_FILE), &serde_json::to_vec_pretty(meta).expect("meta serialises"))
}

/// Takes the store's advisory lock, or names the process that holds it.
fn take_lock(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .context(|| format!("opening {}", path.display()))?;
    // SAFETY: plain syscall on an owned fd.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut owner = String::new();
        let _ = file.read_to_string(&mut owner);
        let owner = owner.trim();
        return Err(Error::Locked {
            path: dir.to_path_buf(),
            owner: if owner.is_empty() { "unknown owner".to_string() } else { owner.to_string() },
        });
    }
    let command: Vec<String> = std::env::args().collect();
    let owner = format!("pid {}: {}", std::process::id(), command.join(" "));
    file.set_len(0).context(|| format!("writing {}", path.display()))?;
    file.rewind().context(|| format!("writing {}", path.display()))?;
    file.write_all(owner.as_bytes()).context(|| format!("writing {}", path.display()))?;
    Ok(file)
}

fn check_range(offset: u64, len: u64, volume_size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= volume_size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, volume_size }),
    }
}

impl Store {
    /// Creates a store for `image`: a new sparse image of `options.size`, or an existing image
    /// adopted as it is (its content becomes the snapshot at seq 0).
    pub fn create(
        image: &Path,
        store_dir: Option<&Path>,
        options: &CreateOptions,
        progress: Progress<'_>,
    ) -> Result<(Self, OpenReport)> {
        let dir = store_dir.map_or_else(|| default_store_dir(image), Path::to_path_buf);
        if dir.exists() {
            return Err(Error::StoreExists(dir));
        }
        let existing = match fs::metadata(image) {
            Ok(meta) => Some(meta.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::Io { context: format!("inspecting {}", image.display()), cause: e }),
        };
        let volume_size = match (existing, options.size) {
            (Some(len), Some(size)) if len != size => {
                return Err(Error::BadMetadata {
                    path: image.to_path_buf(),
                    reason: format!("image is {len} bytes but --size asks for {size}; omit --size to adopt it"),
                })
            }
            (Some(len), _) => len,
            (None, Some(size)) => size,
            (None, None) => {
                return Err(Error::BadMetadata {
                    path: image.to_path_buf(),
                    reason: "image does not exist; give a size to create it".into(),
                })
            }
        };
        if options.segment_capacity < MIN_SEGMENT_CAPACITY
            || options.segment_capacity % crate::journal::record::ALIGN != 0
        {
            return Err(Error::BadMetadata {
                path: dir,
                reason: format!(
                    "segment size {} is not a multiple of {} bytes of at least {MIN_SEGMENT_CAPACITY}",
                    options.segment_capacity,
                    crate::journal::record::ALIGN
                ),
            });
        }
        if volume_size == 0 || volume_size % SECTOR_SIZE != 0 {
            return Err(Error::BadMetadata {
                path: image.to_path_buf(),
                reason: format!("volume size {volume_size} is not a positive multiple of {SECTOR_SIZE}"),
            });
        }
        if existing.is_none() {
            let file = File::create(image).context(|| format!("creating {}", image.display()))?;
            file.set_len(volume_size).context(|| format!("sizing {}", image.display()))?;
            file.sync_all().context(|| format!("syncing {}", image.display()))?;
        }
        // Build the store under a temporary name so a crash never leaves half a store behind.
        let building = dir.with_extension("creating");
        if building.exists() {
            fs::remove_dir_all(&building).context(|| format!("removing {}", building.display()))?;
        }
        fs::create_dir_all(&building).context(|| format!("creating {}", building.display()))?;
        let meta = Meta {
            format_version: FORMAT_VERSION,
            uuid: uuid::Uuid::new_v4(),
            volume_size,
            block_size: 4096,
            segment_capacity: options.segment_capacity,
            applied_seq: 0,
            retention: options.retention.clone(),
            open_in_boot: None,
            open_unfinished: false,
        };
        let initial = match existing {
            Some(_) => Some(File::open(image).context(|| format!("opening {}", image.display()))?),
            None => None,
        };
        SnapshotStore::create(&building.join(SNAPSHOT_DIR), volume_size, initial.as_ref(), progress)?;
        Journal::create(&building.join(JOURNAL_DIR), *meta.uuid.as_bytes(), meta.segment_capacity, 1)?;
        write_meta(&building, &meta)?;
        fs::rename(&building, &dir).context(|| format!("renaming {} to {}", building.display(), dir.display()))?;
        fsutil::sync_dir(fsutil::parent_dir(&dir))?;
        Self::open(image, Some(&dir))
    }

    /// Opens the store of `image`, repairing a torn journal tail and bringing the volume up to
    /// the journal's head.
    pub fn open(image: &Path, store_dir: Option<&Path>) -> Result<(Self, OpenReport)> {
        let dir = store_dir.map_or_else(|| default_store_dir(image), Path::to_path_buf);
        if !dir.join(META_FILE).exists() {
            return Err(Error::NoStore(dir));
        }
        let lock = take_lock(&dir)?;
        let mut meta = read_meta(&dir)?;
        let interrupted_open = meta.open_unfinished;
        if meta.open_in_boot.is_some() && !meta.open_unfinished {
            meta.open_unfinished = true;
            write_meta(&dir, &meta)?;
        }
        let volume =
            OpenOptions::new().read(true).write(true).open(image).context(|| format!("opening {}", image.display()))?;
        let image_len = volume.metadata().context(|| format!("inspecting {}", image.display()))?.len();
        if image_len != meta.volume_size {
            return Err(Error::BadMetadata {
                path: image.to_path_buf(),
                reason: format!("image is {image_len} bytes but the store was made for {}", meta.volume_size),
            });
        }
        let mut markers = MarkerIndex::load_archive(&dir)?;
        let mut report = OpenReport::default();
        let (mut journal, tail_repair) = Journal::open(
            &dir.join(JOURNAL_DIR),
            *meta.uuid.as_bytes(),
            meta.segment_capacity,
            meta.applied_seq,
            Payloads::OfKinds(&[RecordKind::Marker]),
            |rec| {
                let h = rec.header;
                if h.kind == RecordKind::Marker {
                    let payload = rec.payload.expect("marker payloads are read");
                    let marker = marker::decode_payload(payload, h.seq, h.timestamp_ns).ok_or_else(|| {
                        Error::JournalCorrupt {
                            segment: rec.segment.path.clone(),
                            offset: rec.position,
                            reason: "undecodable marker record".into(),
                        }
                    })?;
                    markers.insert(marker);
                }
                // Every later replay and recovery trusts what open let through: a record
                // outside the volume (only a forged or damaged one with valid checksums)
                // would grow the image.
                if h.kind.modifies_volume() && h.offset.checked_add(h.length).is_none_or(|end| end > meta.volume_size) {
                    return Err(Error::JournalCorrupt {
                        segment: rec.segment.path.clone(),
                        offset: rec.position,
                        reason: format!(
                            "record {} covers {} bytes at {}, outside the {}-byte volume",
                            h.seq, h.length, h.offset, meta.volume_size
                        ),
                    });
                }
                // Records past the checkpoint may be missing from the volume: apply them again
                // (applying a record twice gives the same bytes).
                if h.seq > meta.applied_seq && h.kind.modifies_volume() {
                    recovery::apply_record(&volume, &h, rec.payload)?;
                    report.records_replayed += 1;
                }
                Ok(())
            },
        )?;
        let head = journal.next_seq() - 1;
        let snapshots = SnapshotStore::open(&dir.join(SNAPSHOT_DIR), meta.volume_size, head)?;
        let this_boot = boot_id();
        // Volume writes are ordered with the journal's only at checkpoints. If journal records
        // were lost, or the machine went down with the store open, the volume may hold writes
        // the journal does not: rebuild it so it holds exactly the state at the head.
        let rebuild_reason = if interrupted_open {
            Some("an earlier open was interrupted while it repaired the store".to_string())
        } else if let Some(repair) = &tail_repair {
            Some(format!("the journal tail was cut at {} offset {}", repair.segment.display(), repair.offset))
        } else if head < meta.applied_seq {
            Some(format!("the journal ends at seq {head} but seq {} was durable", meta.applied_seq))
        } else if meta.open_in_boot.is_some() && meta.open_in_boot != this_boot {
            Some("the machine went down while the store was open".to_string())
        } else {
            None
        };
        if let Some(reason) = &rebuild_reason {
            log::warn!("store {}: {reason}; rebuilding the volume at seq {head}", dir.display());
            fsutil::zero_range(&volume, 0, meta.volume_size).context(|| format!("clearing {}", image.display()))?;
            let newest = snapshots.newest_seq();
            snapshots.materialize(newest, &volume, &mut |_, _| {}, &AtomicBool::new(false))?;
            let (replayed, _) = recovery::replay(&journal.view(), newest + 1, head, &volume)?;
            report.records_replayed = replayed;
            volume.sync_data().context(|| format!("syncing {}", image.display()))?;
            meta.applied_seq = head;
        }
        report.volume_rebuilt = rebuild_reason;
        let spares = SparePreparer::spawn(&dir.join(JOURNAL_DIR), meta.segment_capacity);
        journal.use_preparer(&spares);
        let retention_floor = Arc::new(std::sync::atomic::AtomicU64::new(Seq::MAX));
        let uncache = CacheDropper::spawn(Arc::clone(&retention_floor));
        journal.use_cache_dropper(&uncache);
        report.tail_repair = tail_repair;
        meta.open_in_boot = this_boot.or_else(|| Some("unknown".to_string()));
        meta.open_unfinished = false;
        write_meta(&dir, &meta)?;
        let store = Self {
            image: image.to_path_buf(),
            dir,
            volume,
            volume_size: meta.volume_size,
            _lock: lock,
            recoverability: Mutex::new(Recoverability::default()),
            view_pins: ViewPins::default(),
            retention_floor,
            maintenance: Mutex::new(Maintenance { snapshots, meta }),
            writer: Mutex::new(Writer {
                journal,
                markers,
                guest_marker_rate: TokenBucket::new(marker::GUEST_MARKERS_PER_SECOND, marker::GUEST_MARKER_BURST),
            }),
            applying: Arc::default(),
            durable: Mutex::new(0),
            sync_failure: Mutex::new(None),
            sync_failed: AtomicBool::new(false),
            _spares: spares,
            _uncache: uncache,
        };
        {
            let mut maintenance = lock_poisoned(store.maintenance.lock());
            if report.records_replayed > 0 || maintenance.meta.applied_seq < head {
                store.checkpoint(&mut maintenance)?;
            }
            store.refresh_recoverability(&maintenance);
        }
        Ok((store, report))
    }

    /// Makes everything durable and releases the store. Dropping a store without closing it is
    /// like a crash: safe, and the next open replays what the volume may lack.
    pub fn close(self) -> Result<()> {
        let mut maintenance = lock_poisoned(self.maintenance.lock());
        self.checkpoint(&mut maintenance)?;
        maintenance.meta.open_in_boot = None;
        write_meta(&self.dir, &maintenance.meta)
    }

    /// Size of the volume in bytes.
    pub fn volume_size(&self) -> u64 {
        self.volume_size
    }

    /// The data volume's image file.
    pub fn image(&self) -> &Path {
        &self.image
    }

    /// The directory holding the journal, snapshots and metadata.
    pub fn store_dir(&self) -> &Path {
        &self.dir
    }

    /// Has retention keep every record numbered `seq` or later, whatever its policy says: for a
    /// reader that still has to copy them elsewhere (replication). `Seq::MAX` lifts the hold.
    pub fn keep_journal_from(&self, seq: Seq) {
        self.retention_floor.store(seq, std::sync::atomic::Ordering::SeqCst);
    }

    /// What [`keep_journal_from`](Self::keep_journal_from) holds now.
    pub fn journal_kept_from(&self) -> Seq {
        self.retention_floor.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The journal as it is now, to read records from. Segments are freed only by retention,
    /// which keeps what [`keep_journal_from`](Self::keep_journal_from) holds: read only records
    /// at or above the hold.
    pub fn journal_view(&self) -> JournalView {
        lock_poisoned(self.writer.lock()).journal.view()
    }

    /// The last record known to be durable (0 until the first [`sync`](Self::sync) after open).
    pub fn durable_seq(&self) -> Seq {
        *lock_poisoned(self.durable.lock())
    }

    /// Newest sequence number (0 before the first record).
    pub fn head(&self) -> Seq {
        lock_poisoned(self.writer.lock()).journal.next_seq() - 1
    }

    /// Journals `ops` as one batch (one write to the journal), then applies them to the volume
    /// in order. Returns the sequence number of the last op. When this returns an error, no op
    /// of the batch may be acknowledged.
    pub fn submit(&self, ops: &[VolumeOp<'_>]) -> Result<Seq> {
        let journaled = self.journal(ops)?;
        self.apply(journaled, |_| {})
    }

    /// The first half of [`submit`](Self::submit): numbers `ops` and appends them to the
    /// journal as one batch, from a copy of their data (see [`Journaled`]). The caller must
    /// then [`apply`](Self::apply) the batch; until it does, reads of its ranges and
    /// checkpoints wait.
    pub fn journal(&self, ops: &[VolumeOp<'_>]) -> Result<Journaled> {
        for op in ops {
            let (offset, len) = op.range();
            check_range(offset, len, self.volume_size)?;
        }
        self.check_durable(false)?;
        // Copied before the writer lock is taken: queues copy in parallel.
        let data_len = ops.iter().filter(|op| matches!(op, VolumeOp::Write { .. })).map(|op| op.range().1).sum::<u64>();
        let mut copy = Vec::with_capacity(data_len as usize);
        let copied: Vec<CopiedOp> = ops.iter().map(|op| CopiedOp::copy(op, &mut copy)).collect();
        let payloads: Vec<[&[u8]; 1]> = copied
            .iter()
            .map(|op| match op {
                CopiedOp::Write { data, .. } => [&copy[data.clone()]],
                CopiedOp::WriteZeroes { .. } | CopiedOp::Discard { .. } => [&[][..]],
            })
            .collect();
        let records: Vec<NewRecord<'_>> =
            copied.iter().zip(&payloads).map(|(op, payload)| op.record(payload)).collect();
        let ticket = {
            let mut writer = lock_poisoned(self.writer.lock());
            self.catch_up_volume(&writer)?;
            let first = writer.journal.append(&records)?;
            let ranges = ops.iter().map(|op| op.range()).map(|(offset, len)| (offset, offset + len)).collect();
            // Registered before the writer lock is released, so batches queue in sequence order.
            self.applying.register(first, ranges)
        };
        Ok(Journaled { ticket, ops: copied, copy })
    }

    /// The second half of [`submit`](Self::submit): writes a journaled batch to the volume once
    /// no earlier overlapping batch is still being written, calling `applied` with each op's
    /// index as soon as it is written (it may be acknowledged then). Returns the sequence
    /// number of the last op. On error the ops not reported applied must fail; the records
    /// stay journaled and the volume is caught up later.
    pub fn apply(&self, journaled: Journaled, mut applied: impl FnMut(usize)) -> Result<Seq> {
        let Journaled { ticket, ops, copy } = journaled;
        let count = ops.len();
        self.applying.wait_turn(&ticket);
        let first = ticket.first_seq();
        for (i, op) in ops.iter().enumerate() {
            let written = match *op {
                CopiedOp::Write { offset, ref data } => self.volume.write_all_at(&copy[data.clone()], offset),
                CopiedOp::WriteZeroes { offset, len } | CopiedOp::Discard { offset, len } => {
                    fsutil::zero_range(&self.volume, offset, len)
                }
            };
            if let Err(cause) = written {
                ticket.finish(false);
                let seq = first + i as u64;
                return Err(Error::Io { context: format!("applying seq {seq} to {}", self.image.display()), cause });
            }
            applied(i);
        }
        ticket.finish(true);
        Ok(first + count as u64 - 1)
    }

    /// [`submit`](Self::submit) of a single write; returns its sequence number.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<Seq> {
        self.submit(&[VolumeOp::Write { offset, data: &[data] }])
    }

    /// [`submit`](Self::submit) of a single write-zeroes; returns its sequence number.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<Seq> {
        self.submit(&[VolumeOp::WriteZeroes { offset, len }])
    }

    /// [`submit`](Self::submit) of a single discard; returns its sequence number.
    pub fn discard(&self, offset: u64, len: u64) -> Result<Seq> {
        self.submit(&[VolumeOp::Discard { offset, len }])
    }

    /// Re-applies records the volume missed after an earlier apply failure. Called under the
    /// writer lock, so no batch can be registered meanwhile.
    fn catch_up_volume(&self, writer: &Writer) -> Result<()> {
        if self.applying.behind_from().is_none() {
            return Ok(());
        }
        // Batches still in flight may fail too, or may overwrite what the replay writes.
        self.applying.wait_through(Seq::MAX);
        let Some(from) = self.applying.behind_from() else { return Ok(()) };
        let view = writer.journal.view();
        recovery::replay(&view, from, view.next_seq() - 1, &self.volume)?;
        self.applying.caught_up(from);
        log::info!("volume {} caught up from seq {from}", self.image.display());
        Ok(())
    }

    /// Reads the volume. A write journaled before the read and still being applied to any of
    /// these bytes is waited for, so a read never sees such a batch half applied.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_after(self.read_fence(), offset, buf)
    }

    /// Marks the writes a read issued now must see (for a read carried out later, elsewhere).
    pub fn read_fence(&self) -> ReadFence {
        ReadFence(self.applying.fence())
    }

    /// Reads the volume as [`read`](Self::read) would have when `fence` was taken (or newer).
    pub fn read_after(&self, fence: ReadFence, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(offset, buf.len() as u64, self.volume_size)?;
        self.check_durable(true)?;
        self.applying.wait_for_range(offset, offset + buf.len() as u64, fence.0);
        self.volume.read_exact_at(buf, offset).context(|| format!("reading {} at {offset}", self.image.display()))
    }

    /// Makes every record appended so far durable. Concurrent callers share one fdatasync.
    pub fn sync(&self) -> Result<Seq> {
        let (target, files) = {
            let writer = lock_poisoned(self.writer.lock());
            (writer.journal.next_seq() - 1, writer.journal.sync_targets())
        };
        let durable_now = {
            let mut durable = lock_poisoned(self.durable.lock());
            self.check_durable(false)?;
            if *durable < target {
                for file in &files {
                    if let Err(cause) = file.sync_data() {
                        let what =
                            format!("syncing the journal failed: {cause}; records after seq {durable} may be lost");
                        return Err(self.sync_failed(what, false));
                    }
                }
                *durable = target;
            }
            *durable
        };
        // The active segment stays a sync target; the sealed ones are done.
        lock_poisoned(self.writer.lock()).journal.mark_synced(&files[..files.len() - 1]);
        Ok(durable_now)
    }

    /// Makes the volume durable up to the journal's head and records that in the metadata, so
    /// that open need not replay those records and retention may free them.
    fn checkpoint(&self, maintenance: &mut Maintenance) -> Result<()> {
        let head = lock_poisoned(self.writer.lock()).journal.next_seq() - 1;
        if head == maintenance.meta.applied_seq {
            return Ok(());
        }
        self.applying.wait_through(head);
        self.catch_up_volume(&lock_poisoned(self.writer.lock()))?;
        // The journal first: the volume must never durably hold a record the journal could lose.
        self.sync()?;
        if let Err(cause) = self.volume.sync_data() {
            let what = format!("syncing {} failed: {cause}", self.image.display());
            return Err(self.sync_failed(what, true));
        }
        maintenance.meta.applied_seq = head;
        write_meta(&self.dir, &maintenance.meta)
    }

    /// Latches a failed sync (see `sync_failure`) and returns the error to report.
    fn sync_failed(&self, what: String, volume: bool) -> Error {
        log::error!("{what}: writes and flushes fail from now on{}", if volume { ", and reads" } else { "" });
        let mut failure = lock_poisoned(self.sync_failure.lock());
        let failure = failure.get_or_insert(SyncFailure { what, volume: false });
        failure.volume |= volume;
        self.sync_failed.store(true, std::sync::atomic::Ordering::Release);
        Error::NotDurable(failure.what.clone())
    }

    /// Fails once a sync has failed: always for writes, for reads when it was the volume's.
    fn check_durable(&self, reading: bool) -> Result<()> {
        if !self.sync_failed.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        match &*lock_poisoned(self.sync_failure.lock()) {
            Some(failure) if !reading || failure.volume => Err(Error::NotDurable(failure.what.clone())),
            _ => Ok(()),
        }
    }

    /// Makes the volume durable up to the head, so a later open has little to replay.
    pub fn checkpoint_now(&self) -> Result<()> {
        let mut maintenance = lock_poisoned(self.maintenance.lock());
        self.checkpoint(&mut maintenance)
    }

    /// Journals a marker named `name` at the current head. Names are unique; the marker is as
    /// durable as the writes journaled before it.
    pub fn add_marker(&self, name: &str, note: Option<&str>, source: MarkerSource) -> Result<Marker> {
        marker::validate_name(name.as_bytes())?;
        if let Some(note) = note {
            marker::validate_note(note)?;
        }
        self.check_durable(false)?;
        let marker = {
            let mut writer = lock_poisoned(self.writer.lock());
            if writer.markers.contains(name) {
                return Err(Error::DuplicateMarker(name.to_string()));
            }
            if source == MarkerSource::Guest {
                if writer.markers.guest_markers() >= marker::MAX_GUEST_MARKERS {
                    return Err(Error::GuestMarkerLimit(format!(
                        "the store holds {} guest markers, the most it keeps",
                        marker::MAX_GUEST_MARKERS
                    )));
                }
                if !writer.guest_marker_rate.take() {
                    return Err(Error::GuestMarkerLimit(format!(
                        "more than {} guest markers a second",
                        marker::GUEST_MARKERS_PER_SECOND
                    )));
                }
            }
            let id = writer.markers.next_id();
            let payload = marker::encode_payload(id, source, name, note);
            let record = NewRecord { kind: RecordKind::Marker, offset: 0, length: 0, payload: &[&payload] };
            let seq = writer.journal.append(&[record])?;
            let time_ns = writer.journal.active().last_timestamp_ns;
            let marker = Marker { id, name: name.to_string(), seq, time_ns, source, note: note.map(str::to_string) };
            writer.markers.insert(marker.clone());
            marker
        };
        // A marker is as durable as the writes around it: the next FLUSH (or sync) covers it.
        Ok(marker)
    }

    /// The marker named `name`, or [`Error::UnknownMarker`].
    pub fn marker(&self, name: &str) -> Result<MarkerStatus> {
        let marker = lock_poisoned(self.writer.lock()).markers.get(name).cloned();
        let marker = marker.ok_or_else(|| Error::UnknownMarker(name.to_string()))?;
        let expired = lock_poisoned(self.recoverability.lock()).marker_expired(marker.seq);
        Ok(MarkerStatus { marker, expired })
    }

    /// The newest marker, if any (the guest's MARKER_GET without a name).
    pub fn newest_marker(&self) -> Option<MarkerStatus> {
        let marker = lock_poisoned(self.writer.lock()).markers.iter().next_back().cloned()?;
        let expired = lock_poisoned(self.recoverability.lock()).marker_expired(marker.seq);
        Some(MarkerStatus { marker, expired })
    }

    /// Every marker in sequence order, expired ones flagged.
    pub fn markers(&self) -> Vec<MarkerStatus> {
        let markers: Vec<Marker> = lock_poisoned(self.writer.lock()).markers.iter().cloned().collect();
        let recoverability = lock_poisoned(self.recoverability.lock()).clone();
        markers
            .into_iter()
            .map(|marker| MarkerStatus { expired: recoverability.marker_expired(marker.seq), marker })
            .collect()
    }

    /// Takes a snapshot of the volume as it is now. Guest I/O goes on meanwhile: the snapshot
    /// is compacted from the journal.
    pub fn take_snapshot(&self) -> Result<SnapshotInfo> {
        let mut maintenance = lock_poisoned(self.maintenance.lock());
        let (seq, view) = {
            let mut writer = lock_poisoned(self.writer.lock());
            let record = NewRecord { kind: RecordKind::Snapshot, offset: 0, length: 0, payload: &[] };
            let seq = writer.journal.append(&[record])?;
            (seq, writer.journal.view())
        };
        // The snapshot area makes the snapshot durable: the records it is compacted from must be
        // durable first, or a crash could leave a snapshot past the journal's end.
        self.sync()?;
        let info = maintenance.snapshots.insert(&view, seq, SnapshotOrigin::Requested)?;
        self.refresh_recoverability(&maintenance);
        Ok(info)
    }

    /// The snapshot chain, base first.
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        lock_poisoned(self.maintenance.lock()).snapshots.list()
    }

    /// The stored retention policy.
    pub fn retention(&self) -> RetentionPolicy {
        lock_poisoned(self.maintenance.lock()).meta.retention.clone()
    }

    /// Stores a new retention policy; it takes effect at the next
    /// [`enforce_retention`](Self::enforce_retention).
    pub fn set_retention(&self, policy: RetentionPolicy) -> Result<()> {
        let mut maintenance = lock_poisoned(self.maintenance.lock());
        maintenance.meta.retention = policy;
        write_meta(&self.dir, &maintenance.meta)
    }

    fn refresh_recoverability(&self, maintenance: &Maintenance) {
        let first_seq = lock_poisoned(self.writer.lock()).journal.first_seq();
        let snapshots = &maintenance.snapshots;
        let snapshot_points: Vec<Seq> = snapshots.list().iter().map(|s| s.seq).collect();
        // The chain always holds a snapshot at or after the journal's start (retention takes one
        // before freeing), so this finds one.
        let oldest = snapshots.oldest_at_or_after(first_seq - 1).unwrap_or_else(|| snapshots.newest_seq());
        *lock_poisoned(self.recoverability.lock()) = Recoverability { oldest, snapshot_points };
    }

    /// Frees journal segments the retention policy no longer wants, taking the snapshots that
    /// keep the remaining points recoverable first.
    pub fn enforce_retention(&self) -> Result<RetentionReport> {
        let mut maintenance = lock_poisoned(self.maintenance.lock());
        let recoverability = lock_poisoned(self.recoverability.lock()).clone();
        let (summaries, marker_seqs, view) = {
            let writer = lock_poisoned(self.writer.lock());
            let summaries: Vec<SegmentSummary> = writer
                .journal
                .segments()
                .iter()
                .map(|s| SegmentSummary {
                    first_seq: s.first_seq,
                    next_seq: s.next_seq,
                    bytes: s.used_bytes(),
                    last_timestamp_ns: s.last_timestamp_ns,
                })
                .collect();
            let marker_seqs: Vec<Seq> = writer.markers.iter().map(|m| m.seq).collect();
            (summaries, marker_seqs, writer.journal.view())
        };
        let policy = maintenance.meta.retention.clone();
        let oldest_view_snapshot = self.view_pins.oldest_snapshot();
        let plan: RetentionPlan = retention::plan(
            &policy,
            &summaries,
            &retention::RetentionInputs {
                now_ns: fsutil::now_ns(),
                // Only checkpointed records may be freed; the checkpoint below covers them all.
                // An open point-in-time view reads the records after its snapshot in place, and
                // replication has yet to ship those at or above its floor: to the planner they
                // are records still awaiting replay.
                checkpoint: (view.next_seq() - 1)
                    .min(oldest_view_snapshot.unwrap_or(Seq::MAX))
                    .min(self.retention_floor.load(std::sync::atomic::Ordering::SeqCst).saturating_sub(1)),
                oldest: recoverability.oldest,
                snapshot_points: &recoverability.snapshot_points,
                marker_seqs: &marker_seqs,
            },
        );
        let mut report = RetentionReport { oldest_recoverable: recoverability.oldest, ..Default::default() };
        if plan.free_segments > 0 {
            // Checkpoint only when something is to be freed: it syncs the whole volume.
            self.checkpoint(&mut maintenance)?;
            for &(seq, origin) in &plan.snapshots {
                maintenance.snapshots.insert(&view, seq, origin)?;
                report.snapshots_taken.push(seq);
            }
            report.freed_bytes = summaries[..plan.free_segments].iter().map(|s| s.bytes).sum();
            {
                let mut writer = lock_poisoned(self.writer.lock());
                writer.markers.save_archive(&self.dir, plan.new_first_seq)?;
                writer.journal.free_oldest(plan.free_segments)?;
            }
            report.freed_segments = plan.free_segments;
        }
        let new_first = plan.new_first_seq;
        let pinned: Vec<Seq> = if policy.keep_marker_snapshots { marker_seqs } else { Vec::new() };
        // A merge rewrites the base in place, under every open view that reads it.
        let views_open = oldest_view_snapshot.is_some();
        report.merged_into_base = maintenance
            .snapshots
            .merge_into_base(|base| views_open || base + 1 >= new_first || pinned.contains(&base))?;
        self.refresh_recoverability(&maintenance);
        report.oldest_recoverable = lock_poisoned(self.recoverability.lock()).oldest;
        if report.freed_segments > 0 {
            log::info!(
                "retention freed {} segment(s), {} bytes; oldest recoverable point is now seq {}",
                report.freed_segments,
                report.freed_bytes,
                report.oldest_recoverable
            );
        }
        Ok(report)
    }

    /// The sequence number a target names, checked to be recoverable.
    pub fn resolve(&self, target: &RecoveryTarget) -> Result<Seq> {
        let view = lock_poisoned(self.writer.lock()).journal.view();
        self.resolve_in(target, &view)
    }

    fn resolve_in(&self, target: &RecoveryTarget, view: &JournalView) -> Result<Seq> {
        let head = view.next_seq() - 1;
        let recoverability = lock_poisoned(self.recoverability.lock()).clone();
        let seq = match target {
            RecoveryTarget::Marker(name) => self.marker(name)?.marker.seq,
            RecoveryTarget::Seq(seq) => *seq,
            RecoveryTarget::Time(ns) => {
                view.last_at_or_before(*ns)?.ok_or_else(|| Error::TimeBeforeJournal(target.to_string()))?
            }
        };
        let pinned = recoverability.snapshot_points.contains(&seq);
        if seq > head || (seq < recoverability.oldest && !pinned) {
            return Err(Error::Unrecoverable { requested: target.to_string(), oldest: recoverability.oldest, head });
        }
        Ok(seq)
    }

    /// Writes the volume as it was at `target` into a new image at `output`. The store and the
    /// live volume are not changed, and writes may continue meanwhile.
    pub fn recover(&self, target: &RecoveryTarget, output: &Path, progress: Progress<'_>) -> Result<RecoveryReport> {
        self.recover_unless_stopped(target, output, progress, &AtomicBool::new(false))
    }

    /// [`recover`](Self::recover) that gives up with [`Error::Cancelled`] (removing the output)
    /// soon after `stop` is set: a daemon that is asked to stop does not wait for a recovery of
    /// a large volume.
    pub fn recover_unless_stopped(
        &self,
        target: &RecoveryTarget,
        output: &Path,
        progress: Progress<'_>,
        stop: &AtomicBool,
    ) -> Result<RecoveryReport> {
        let maintenance = lock_poisoned(self.maintenance.lock());
        let view = lock_poisoned(self.writer.lock()).journal.view();
        let seq = self.resolve_in(target, &view)?;
        let snapshot_seq = maintenance.snapshots.newest_at_or_before(seq).expect("the base precedes every point");
        recovery::recover_to(&maintenance.snapshots, &view, snapshot_seq, seq, output, progress, stop)
    }

    /// The volume as it was at `target`, read in place from the store's files (nothing is
    /// copied). Retention keeps what the view reads until it is dropped.
    pub fn point_view(&self, target: &RecoveryTarget) -> Result<PointView> {
        // Under `maintenance`, so no merge or free runs between choosing the files and pinning them.
        let maintenance = lock_poisoned(self.maintenance.lock());
        let view = lock_poisoned(self.writer.lock()).journal.view();
        let seq = self.resolve_in(target, &view)?;
        let snapshot_seq = maintenance.snapshots.newest_at_or_before(seq).expect("the base precedes every point");
        let point = PointView::build(&maintenance.snapshots, &view, snapshot_seq, seq)?;
        Ok(point.pinned_by(self.view_pins.pin(ViewPinStatus { seq, snapshot_seq })))
    }

    /// Checks every journal and snapshot checksum, and that the volume holds exactly what the
    /// snapshots and journal say it should. Writes wait while the volume is compared.
    pub fn verify(&self, progress: Progress<'_>) -> Result<VerifyReport> {
        let maintenance = lock_poisoned(self.maintenance.lock());
        maintenance.snapshots.verify()?;
        let writer = lock_poisoned(self.writer.lock());
        self.applying.wait_through(Seq::MAX);
        self.catch_up_volume(&writer)?;
        let view = writer.journal.view();
        let head = view.next_seq() - 1;
        let mut records_checked = 0;
        view.for_each(view.first_seq(), head, Payloads::All, |_| {
            records_checked += 1;
            Ok(())
        })?;
        let expected_path = self.dir.join("verify.tmp");
        let _ = fs::remove_file(&expected_path);
        let newest = maintenance.snapshots.newest_seq();
        let mut compare = || -> Result<u64> {
            recovery::recover_to(
                &maintenance.snapshots,
                &view,
                newest,
                head,
                &expected_path,
                progress,
                &AtomicBool::new(false),
            )?;
            let expected = File::open(&expected_path).context(|| format!("opening {}", expected_path.display()))?;
            compare_files(&expected, &self.volume, self.volume_size)
        };
        let compared = compare();
        let _ = fs::remove_file(&expected_path);
        Ok(VerifyReport {
            records_checked,
            snapshots_checked: maintenance.snapshots.list().len(),
            head,
            volume_bytes_compared: compared?,
        })
    }

    /// A summary of the store: ranges, sizes, counts and policy.
    pub fn status(&self) -> Status {
        let maintenance = lock_poisoned(self.maintenance.lock());
        let (first_seq, head, journal_bytes, journal_segments, markers) = {
            let writer = lock_poisoned(self.writer.lock());
            let journal = &writer.journal;
            (
                journal.first_seq(),
                journal.next_seq() - 1,
                journal.total_bytes(),
                journal.segments().len(),
                writer.markers.iter().map(|m| m.seq).collect::<Vec<_>>(),
            )
        };
        let recoverability = lock_poisoned(self.recoverability.lock()).clone();
        Status {
            image: self.image.clone(),
            store: self.dir.clone(),
            uuid: maintenance.meta.uuid,
            volume_size: self.volume_size,
            block_size: maintenance.meta.block_size,
            first_seq,
            head,
            oldest_recoverable: recoverability.oldest,
            checkpoint: maintenance.meta.applied_seq,
            journal_bytes,
            journal_segments,
            snapshots: maintenance.snapshots.list(),
            snapshot_bytes: maintenance.snapshots.stored_bytes(),
            markers: markers.len(),
            expired_markers: markers.iter().filter(|&&m| recoverability.marker_expired(m)).count(),
            retention: maintenance.meta.retention.clone(),
            view_pins: self.view_pins.list(),
        }
    }
}

/// Compares two files of `len` bytes; names the first differing offset.
fn compare_files(expected: &File, actual: &File, len: u64) -> Result<u64> {
    const CHUNK: usize = 1 << 20;
    let mut a = vec![0u8; CHUNK];
    let mut b = vec![0u8; CHUNK];
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(CHUNK as u64) as usize;
        expected.read_exact_at(&mut a[..n], pos).context(|| "reading the expected image".to_string())?;
        actual.read_exact_at(&mut b[..n], pos).context(|| "reading the volume".to_string())?;
        if a[..n] != b[..n] {
            let at = pos + a[..n].iter().zip(&b[..n]).position(|(x, y)| x != y).unwrap_or(0) as u64;
            return Err(Error::VerifyFailed(format!(
                "the volume differs from what the journal says at byte offset {at}"
            )));
        }
        pos += n as u64;
    }
    Ok(len)
}

#[cfg(test)]
mod tests;
