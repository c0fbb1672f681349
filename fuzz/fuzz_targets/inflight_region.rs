//! An inflight region as a frontend hands it back after a reconnect
//! (`rewind::vhost_user::inflight`): any bytes, any sizes and offset in SET_INFLIGHT_FD, any
//! used index in the ring. Adopting it and starting each queue either fails with an error or
//! yields a resubmit list of distinct heads inside the queue and a consistent next entry; the
//! tracker then takes and completes chains without a panic.

#![no_main]

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rewind::vhost_user::inflight::{queue_region_size, InflightError, InflightRegion, QueueTracker};

const LIMITS: (usize, usize) = (4, 256);

#[derive(Arbitrary, Debug)]
struct Input {
    num_queues: u8,
    queue_size: u16,
    /// What SET_INFLIGHT_FD claims, as a change to the true values.
    size_delta: i16,
    offset: u16,
    claimed_queues: u8,
    claimed_queue_size: u16,
    ring_size: u16,
    used_idx: u16,
    /// Patches of the region's bytes: (offset, bytes).
    patches: Vec<(u16, Vec<u8>)>,
    heads: Vec<u16>,
}

fuzz_target!(|input: Input| {
    let num_queues = u16::from(input.num_queues % 5);
    let queue_size = input.queue_size % 300;
    let Ok((_, file)) = InflightRegion::create(num_queues, queue_size, LIMITS) else { return };
    let len = file.metadata().expect("metadata").len();
    for (at, bytes) in &input.patches {
        let at = u64::from(*at) % len.max(1);
        let end = (at + bytes.len() as u64).min(len);
        file.write_all_at(&bytes[..(end - at) as usize], at).expect("patch");
    }
    let claimed_size = (len as i64 + i64::from(input.size_delta)).max(0) as u64;
    let claimed_queues = if input.claimed_queues % 3 == 0 { u16::from(input.claimed_queues) } else { num_queues };
    let claimed_queue_size =
        if input.claimed_queue_size % 3 == 0 { input.claimed_queue_size } else { queue_size };
    let offset = u64::from(input.offset % 3) * 4096;
    let adopted = InflightRegion::adopt(
        file.try_clone().expect("dup"),
        claimed_size,
        offset,
        claimed_queues,
        claimed_queue_size,
        LIMITS,
    );
    let Ok(region) = adopted else { return };
    assert_eq!(claimed_size, u64::from(claimed_queues) * queue_region_size(claimed_queue_size) as u64);
    let region = Arc::new(region);
    let ring_size = if input.ring_size % 2 == 0 { claimed_queue_size } else { input.ring_size };
    for queue in 0..usize::from(claimed_queues) + 1 {
        let Ok((tracker, resume)) = QueueTracker::start(Arc::clone(&region), queue, ring_size, input.used_idx) else {
            continue;
        };
        let mut heads = resume.resubmit.clone();
        assert!(heads.len() <= usize::from(ring_size));
        assert!(heads.iter().all(|&head| head < ring_size));
        heads.sort_unstable();
        heads.dedup();
        assert_eq!(heads.len(), resume.resubmit.len(), "a head resubmitted twice");
        assert_eq!(resume.next_avail, input.used_idx.wrapping_add(resume.resubmit.len() as u16));
        let taken: Vec<u16> = input.heads.iter().map(|&head| head % ring_size).collect();
        tracker.taken(taken.iter().copied()).expect("taking heads inside the queue");
        for head in taken {
            tracker.complete::<InflightError>(head, || Ok(())).expect("completing a head inside the queue");
        }
    }
});
