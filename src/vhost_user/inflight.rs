//! Inflight I/O tracking (vhost-user protocol feature INFLIGHT_SHMFD): a region of shared
//! memory, created here and kept by the frontend across backend restarts, that records which
//! descriptor chains each queue has taken off its ring and not yet put on the used ring. A
//! backend started after a crash or a restart runs those chains again, in the order they were
//! taken, before anything new (see docs/virtio.md, "Restarts").
//!
//! The region comes back from the frontend after a reconnect: it is untrusted input. Its sizes,
//! versions and counters are checked when it is adopted ([`InflightRegion::adopt`]) and its
//! indexes whenever they are used; every access goes through vm-memory's bounds-checked
//! volatile slices, so a region the frontend changes at any moment can make a queue refuse to
//! start, never make the daemon read or write outside it.
//!
//! Layout, per queue, for split rings (the vhost-user spec and libvhost-user agree): a 16-byte
//! header `{u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx}`, then
//! `desc_num` 16-byte entries `{u8 inflight; u8 padding[5]; u16 next; u64 counter}`. Each queue's
//! part is [`queue_region_size`] bytes.

use std::fs::File;
use std::num::Wrapping;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory, VolatileSlice};

/// The only region version this backend writes and accepts (0 is a region not used yet).
const VERSION: u16 = 1;
const HEADER_BYTES: usize = 16;
const ENTRY_BYTES: usize = 16;
const VERSION_AT: usize = 8;
const DESC_NUM_AT: usize = 10;
const LAST_BATCH_HEAD_AT: usize = 12;
const USED_IDX_AT: usize = 14;
const ENTRY_INFLIGHT_AT: usize = 0;
const ENTRY_COUNTER_AT: usize = 8;
/// libvhost-user's alignment of each queue's part, kept so either backend can adopt the other's
/// region.
const QUEUE_ALIGN: usize = 64;

/// Bytes of one queue's part of the region for a queue of `queue_size` entries (libvhost-user's
/// formula; it leaves room for the header).
pub fn queue_region_size(queue_size: u16) -> usize {
    (ENTRY_BYTES * usize::from(queue_size) + 2).next_multiple_of(QUEUE_ALIGN)
}

/// Why a region cannot be created or adopted, or a queue cannot start from it.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("the inflight region is for {given} queue(s); the device has {max} (at least one is needed)")]
    QueueCount { given: u16, max: usize },
    #[error("the inflight region is for queues of {given} entries; the device takes 1 to {max}")]
    QueueSize { given: u16, max: usize },
    #[error("the inflight region is {given} bytes; {expected} are needed for its queues")]
    Size { given: u64, expected: u64 },
    #[error("the inflight file holds {file} bytes, less than the region's offset {offset} plus size {size}")]
    FileTooSmall { file: u64, offset: u64, size: u64 },
    #[error("queue {queue}'s inflight version is {version}; only 0 (unused) and {VERSION} are known")]
    Version { queue: usize, version: u16 },
    #[error("queue {queue}'s inflight region says {given} entries; the region is for {expected}")]
    DescNum { queue: usize, given: u16, expected: u16 },
    #[error("queue {queue}'s inflight entry {index} has the flag {flag}, not 0 or 1")]
    Flag { queue: usize, index: u16, flag: u8 },
    #[error("queue {queue}'s last batch head {head} is outside its {size} entries")]
    LastBatchHead { queue: usize, head: u16, size: u16 },
    #[error("queue {queue} has {ring} entries but its inflight region was made for {region}")]
    RingSize { queue: usize, ring: u16, region: u16 },
    #[error("queue {queue} has no part in an inflight region made for {queues} queue(s)")]
    NoSuchQueue { queue: usize, queues: u16 },
    #[error("the inflight region cannot be read or written: {0}")]
    Access(#[from] vm_memory::volatile_memory::Error),
    #[error("cannot create the inflight region: {0}")]
    Create(std::io::Error),
    #[error("cannot map the inflight region: {0}")]
    Map(vm_memory::mmap::MmapRegionError),
}

impl From<InflightError> for std::io::Error {
    fn from(error: InflightError) -> Self {
        std::io::Error::other(error)
    }
}

/// The region of one frontend's device, mapped here.
pub struct InflightRegion {
    map: MmapRegion<()>,
    num_queues: u16,
    queue_size: u16,
}

impl InflightRegion {
    /// A zeroed region for `num_queues` queues of `queue_size` entries (GET_INFLIGHT_FD) and the
    /// file the frontend keeps it in: a memfd sealed against resizing, so neither side can make
    /// the other's mapping fault.
    pub fn create(num_queues: u16, queue_size: u16, limits: (usize, usize)) -> Result<(Self, File), InflightError> {
        check_shape(num_queues, queue_size, limits)?;
        let size = region_size(num_queues, queue_size);
        let fd = rustix::fs::memfd_create(
            "rewind-inflight",
            rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
        )
        .map_err(|e| InflightError::Create(e.into()))?;
        let file = File::from(fd);
        file.set_len(size).map_err(InflightError::Create)?;
        rustix::fs::fcntl_add_seals(
            &file,
            rustix::fs::SealFlags::GROW | rustix::fs::SealFlags::SHRINK | rustix::fs::SealFlags::SEAL,
        )
        .map_err(|e| InflightError::Create(e.into()))?;
        let ours = file.try_clone().map_err(InflightError::Create)?;
        let region = Self::map(ours, 0, num_queues, queue_size)?;
        Ok((region, file))
    }

    /// Adopts the region a frontend hands back (SET_INFLIGHT_FD), after checking everything in
    /// it that does not change while the queues run.
    pub fn adopt(
        file: File,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
        limits: (usize, usize),
    ) -> Result<Self, InflightError> {
        check_shape(num_queues, queue_size, limits)?;
        let expected = region_size(num_queues, queue_size);
        if mmap_size != expected {
            return Err(InflightError::Size { given: mmap_size, expected });
        }
        let file_len = file.metadata().map_err(InflightError::Create)?.len();
        if mmap_offset.checked_add(mmap_size).is_none_or(|end| end > file_len) {
            return Err(InflightError::FileTooSmall { file: file_len, offset: mmap_offset, size: mmap_size });
        }
        let region = Self::map(file, mmap_offset, num_queues, queue_size)?;
        for queue in 0..usize::from(num_queues) {
            region.queue_part(queue)?.check(queue, queue_size)?;
        }
        Ok(region)
    }

    fn map(file: File, offset: u64, num_queues: u16, queue_size: u16) -> Result<Self, InflightError> {
        let size = region_size(num_queues, queue_size) as usize;
        let map = MmapRegion::from_file(FileOffset::new(file, offset), size).map_err(InflightError::Map)?;
        Ok(Self { map, num_queues, queue_size })
    }

    fn queue_part(&self, queue: usize) -> Result<QueuePart<'_>, InflightError> {
        if queue >= usize::from(self.num_queues) {
            return Err(InflightError::NoSuchQueue { queue, queues: self.num_queues });
        }
        let len = queue_region_size(self.queue_size);
        Ok(QueuePart { slice: self.map.get_slice(queue * len, len)? })
    }
}

fn check_shape(
    num_queues: u16,
    queue_size: u16,
    (max_queues, max_queue_size): (usize, usize),
) -> Result<(), InflightError> {
    if num_queues == 0 || usize::from(num_queues) > max_queues {
        return Err(InflightError::QueueCount { given: num_queues, max: max_queues });
    }
    if queue_size == 0 || usize::from(queue_size) > max_queue_size {
        return Err(InflightError::QueueSize { given: queue_size, max: max_queue_size });
    }
    Ok(())
}

fn region_size(num_queues: u16, queue_size: u16) -> u64 {
    u64::from(num_queues) * queue_region_size(queue_size) as u64
}

/// One queue's part of the region.
struct QueuePart<'a> {
    slice: VolatileSlice<'a>,
}

impl QueuePart<'_> {
    fn version(&self) -> Result<u16, InflightError> {
        Ok(self.slice.load(VERSION_AT, Ordering::Acquire)?)
    }

    fn flag(&self, index: u16) -> Result<u8, InflightError> {
        Ok(self.slice.load(entry(index) + ENTRY_INFLIGHT_AT, Ordering::Acquire)?)
    }

    fn set_flag(&self, index: u16, flag: u8) -> Result<(), InflightError> {
        Ok(self.slice.store(flag, entry(index) + ENTRY_INFLIGHT_AT, Ordering::Release)?)
    }

    fn counter(&self, index: u16) -> Result<u64, InflightError> {
        Ok(self.slice.load(entry(index) + ENTRY_COUNTER_AT, Ordering::Acquire)?)
    }

    fn load_u16(&self, at: usize) -> Result<u16, InflightError> {
        Ok(self.slice.load(at, Ordering::Acquire)?)
    }

    fn store_u16(&self, at: usize, value: u16) -> Result<(), InflightError> {
        Ok(self.slice.store(value, at, Ordering::Release)?)
    }

    /// Checks a queue's header and flags: a fresh part (version 0: None) or one this backend's
    /// format describes (its flagged entries, as (counter, index), read in the same pass).
    fn check(&self, queue: usize, queue_size: u16) -> Result<Option<Vec<(u64, u16)>>, InflightError> {
        match self.version()? {
            0 => Ok(None),
            VERSION => {
                let desc_num = self.load_u16(DESC_NUM_AT)?;
                if desc_num != queue_size {
                    return Err(InflightError::DescNum { queue, given: desc_num, expected: queue_size });
                }
                let head = self.load_u16(LAST_BATCH_HEAD_AT)?;
                if head >= queue_size {
                    return Err(InflightError::LastBatchHead { queue, head, size: queue_size });
                }
                let mut flagged = Vec::new();
                for index in 0..queue_size {
                    match self.flag(index)? {
                        0 => {}
                        1 => flagged.push((self.counter(index)?, index)),
                        flag => return Err(InflightError::Flag { queue, index, flag }),
                    }
                }
                Ok(Some(flagged))
            }
            version => Err(InflightError::Version { queue, version }),
        }
    }
}

fn entry(index: u16) -> usize {
    HEADER_BYTES + ENTRY_BYTES * usize::from(index)
}

/// What a queue starting on a region must do first: run `resubmit` (heads, in the order they
/// were first taken) and take new requests from `next_avail` on.
#[derive(Debug, PartialEq, Eq)]
pub struct Resume {
    pub resubmit: Vec<u16>,
    pub next_avail: u16,
}

/// A running queue's tracking in the region: marks chains as they are taken and clears them as
/// they complete. Worker and applier both complete requests, so completion is serialised here.
pub struct QueueTracker {
    region: Arc<InflightRegion>,
    queue: usize,
    /// The next chain's counter, which orders resubmission.
    counter: Mutex<u64>,
}

impl QueueTracker {
    /// Starts tracking queue `queue`, whose ring has `ring_size` entries and whose used index
    /// in guest memory is `used_idx`. A part used before (a backend ran this queue and may have
    /// died mid-way) says what to resubmit: first a completion that was interrupted after the
    /// used index moved is finished, as the spec requires; then every chain still flagged is run
    /// again, by counter.
    pub fn start(
        region: Arc<InflightRegion>,
        queue: usize,
        ring_size: u16,
        used_idx: u16,
    ) -> Result<(Self, Resume), InflightError> {
        if ring_size != region.queue_size {
            return Err(InflightError::RingSize { queue, ring: ring_size, region: region.queue_size });
        }
        let part = region.queue_part(queue)?;
        let mut resume = Resume { resubmit: Vec::new(), next_avail: used_idx };
        let mut counter = 0;
        if let Some(mut flagged) = part.check(queue, ring_size)? {
            if part.load_u16(USED_IDX_AT)? != used_idx {
                // Read again: the frontend may have changed it since the check.
                let head = part.load_u16(LAST_BATCH_HEAD_AT)?;
                if head >= ring_size {
                    return Err(InflightError::LastBatchHead { queue, head, size: ring_size });
                }
                part.set_flag(head, 0)?;
                part.store_u16(USED_IDX_AT, used_idx)?;
                flagged.retain(|&(_, index)| index != head);
            }
            flagged.sort_unstable();
            counter = flagged.last().map_or(0, |&(last, _)| last.wrapping_add(1));
            // Every chain taken is either completed (counted by the used index) or flagged.
            resume.next_avail = (Wrapping(used_idx) + Wrapping(flagged.len() as u16)).0;
            resume.resubmit = flagged.into_iter().map(|(_, index)| index).collect();
        } else {
            part.store_u16(DESC_NUM_AT, ring_size)?;
            part.store_u16(LAST_BATCH_HEAD_AT, 0)?;
            part.store_u16(USED_IDX_AT, used_idx)?;
            part.store_u16(VERSION_AT, VERSION)?;
        }
        Ok((Self { region, queue, counter: Mutex::new(counter) }, resume))
    }

    fn part(&self) -> Result<QueuePart<'_>, InflightError> {
        self.region.queue_part(self.queue)
    }

    /// Flags chains taken off the ring, in ring order, before any of them runs.
    pub fn taken(&self, heads: impl IntoIterator<Item = u16>) -> Result<(), InflightError> {
        let part = self.part()?;
        let mut counter = self.counter.lock().unwrap_or_else(|p| p.into_inner());
        for head in heads {
            part.slice.store(*counter, entry(head) + ENTRY_COUNTER_AT, Ordering::Relaxed)?;
            part.set_flag(head, 1)?;
            *counter = counter.wrapping_add(1);
        }
        Ok(())
    }

    /// Completes `head`: `put_used` puts it on the used ring (moving the used index by one).
    /// The region first names it as the batch being completed, and clears its flag and records
    /// the new used index only after, so a backend that dies between the two finds the used
    /// index ahead of the region's and knows which flag is stale.
    pub fn complete<E>(&self, head: u16, put_used: impl FnOnce() -> Result<(), E>) -> Result<(), E>
    where
        E: From<InflightError>,
    {
        let part = self.part()?;
        let _serialised = self.counter.lock().unwrap_or_else(|p| p.into_inner());
        part.store_u16(LAST_BATCH_HEAD_AT, head)?;
        put_used()?;
        part.set_flag(head, 0)?;
        let used = part.load_u16(USED_IDX_AT)?;
        part.store_u16(USED_IDX_AT, used.wrapping_add(1))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: (usize, usize) = (4, 256);

    fn fresh(queues: u16, size: u16) -> (Arc<InflightRegion>, File) {
        let (region, file) = InflightRegion::create(queues, size, LIMITS).expect("create");
        (Arc::new(region), file)
    }

    fn complete(tracker: &QueueTracker, head: u16) {
        tracker.complete::<InflightError>(head, || Ok(())).expect("complete");
    }

    #[test]
    fn a_fresh_region_resumes_at_the_used_index_with_nothing_to_resubmit() {
        let (region, file) = fresh(2, 8);
        assert_eq!(file.metadata().unwrap().len(), 2 * 192);
        let (_, resume) = QueueTracker::start(Arc::clone(&region), 1, 8, 77).expect("start");
        assert_eq!(resume, Resume { resubmit: vec![], next_avail: 77 });
    }

    #[test]
    fn chains_still_flagged_are_resubmitted_in_the_order_they_were_taken() {
        let (region, file) = fresh(1, 8);
        let (tracker, _) = QueueTracker::start(Arc::clone(&region), 0, 8, 10).expect("start");
        tracker.taken([5, 2, 7, 0]).unwrap();
        complete(&tracker, 2);
        tracker.taken([3]).unwrap();
        complete(&tracker, 0);
        drop(tracker);
        let len = file.metadata().unwrap().len();
        let adopted = InflightRegion::adopt(file, len, 0, 1, 8, LIMITS).expect("adopt");
        // Two completions moved the used index from 10 to 12; three chains are still flagged.
        let (_, resume) = QueueTracker::start(Arc::new(adopted), 0, 8, 12).expect("restart");
        assert_eq!(resume, Resume { resubmit: vec![5, 7, 3], next_avail: 15 });
    }

    #[test]
    fn a_completion_cut_short_after_the_used_index_moved_is_not_resubmitted() {
        let (region, _file) = fresh(1, 8);
        let (tracker, _) = QueueTracker::start(Arc::clone(&region), 0, 8, 0).expect("start");
        tracker.taken([4, 6]).unwrap();
        // The backend dies inside put_used: the used ring has the entry, the flag is still set.
        let died: Result<(), InflightError> =
            tracker.complete(4, || Err(InflightError::NoSuchQueue { queue: 9, queues: 0 }));
        assert!(died.is_err());
        drop(tracker);
        let (_, resume) = QueueTracker::start(Arc::clone(&region), 0, 8, 1).expect("restart");
        assert_eq!(resume, Resume { resubmit: vec![6], next_avail: 2 });
    }

    #[test]
    fn a_completion_cut_short_before_the_used_index_moved_is_resubmitted() {
        let (region, _file) = fresh(1, 8);
        let (tracker, _) = QueueTracker::start(Arc::clone(&region), 0, 8, 0).expect("start");
        tracker.taken([4, 6]).unwrap();
        drop(tracker);
        let (_, resume) = QueueTracker::start(region, 0, 8, 0).expect("restart");
        assert_eq!(resume, Resume { resubmit: vec![4, 6], next_avail: 2 });
    }

    fn write_u16(file: &File, at: u64, value: u16) {
        use std::os::unix::fs::FileExt;
        file.write_all_at(&value.to_le_bytes(), at).unwrap();
    }

    #[test]
    fn bad_regions_are_refused_with_the_reason() {
        let adopt = |file: &File, size: u64, offset: u64, queues: u16, queue_size: u16| {
            InflightRegion::adopt(file.try_clone().unwrap(), size, offset, queues, queue_size, LIMITS).err()
        };
        let (_region, file) = fresh(2, 8);
        assert!(matches!(adopt(&file, 384, 0, 5, 8), Some(InflightError::QueueCount { given: 5, .. })));
        assert!(matches!(adopt(&file, 384, 0, 0, 8), Some(InflightError::QueueCount { given: 0, .. })));
        assert!(matches!(adopt(&file, 384, 0, 2, 512), Some(InflightError::QueueSize { given: 512, .. })));
        assert!(matches!(adopt(&file, 100, 0, 2, 8), Some(InflightError::Size { given: 100, .. })));
        assert!(matches!(adopt(&file, 384, 4096, 2, 8), Some(InflightError::FileTooSmall { .. })));
        assert!(matches!(adopt(&file, 384, u64::MAX, 2, 8), Some(InflightError::FileTooSmall { .. })));
        assert!(adopt(&file, 384, 0, 2, 8).is_none());

        write_u16(&file, VERSION_AT as u64, 7);
        assert!(matches!(adopt(&file, 384, 0, 2, 8), Some(InflightError::Version { queue: 0, version: 7 })));
        write_u16(&file, VERSION_AT as u64, VERSION);
        write_u16(&file, DESC_NUM_AT as u64, 8);
        write_u16(&file, 192 + VERSION_AT as u64, VERSION);
        write_u16(&file, 192 + DESC_NUM_AT as u64, 9);
        assert!(matches!(adopt(&file, 384, 0, 2, 8), Some(InflightError::DescNum { queue: 1, given: 9, .. })));
        write_u16(&file, 192 + DESC_NUM_AT as u64, 8);
        write_u16(&file, LAST_BATCH_HEAD_AT as u64, 8);
        assert!(matches!(adopt(&file, 384, 0, 2, 8), Some(InflightError::LastBatchHead { head: 8, .. })));
        write_u16(&file, LAST_BATCH_HEAD_AT as u64, 3);
        write_u16(&file, 192 + entry(5) as u64, 2);
        assert!(matches!(adopt(&file, 384, 0, 2, 8), Some(InflightError::Flag { queue: 1, index: 5, flag: 2 })));
        write_u16(&file, 192 + entry(5) as u64, 1);
        let region = Arc::new(InflightRegion::adopt(file.try_clone().unwrap(), 384, 0, 2, 8, LIMITS).expect("adopt"));
        assert!(matches!(
            QueueTracker::start(Arc::clone(&region), 0, 16, 0).err(),
            Some(InflightError::RingSize { ring: 16, region: 8, .. })
        ));
        assert!(matches!(
            QueueTracker::start(Arc::clone(&region), 2, 8, 0).err(),
            Some(InflightError::NoSuchQueue { .. })
        ));
        // Changed after adoption: still refused at start, never used as an index.
        write_u16(&file, 192 + LAST_BATCH_HEAD_AT as u64, 40_000);
        assert!(matches!(
            QueueTracker::start(Arc::clone(&region), 1, 8, 9).err(),
            Some(InflightError::LastBatchHead { head: 40_000, .. })
        ));
    }

    #[test]
    fn the_region_is_sealed_against_resizing() {
        let (_region, file) = fresh(1, 4);
        assert!(file.set_len(1 << 20).is_err());
        assert!(file.set_len(0).is_err());
    }
}
