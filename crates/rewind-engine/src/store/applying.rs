//! Batches that are in the journal but not yet applied to the volume.
//!
//! A batch is journaled under the writer lock and applied to the volume outside it, so one
//! queue can journal its next batch while another thread writes the volume. The volume must
//! still end up as if every record were applied in sequence order (invariant 2): a batch waits
//! before applying until no earlier batch still in flight overlaps it, and a read waits for
//! every in-flight batch it overlaps. Batches that touch different ranges apply in parallel.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::Seq;

struct InFlight {
    first: Seq,
    /// Byte ranges `[start, end)` the batch writes, sorted by start.
    ranges: Vec<(u64, u64)>,
}

#[derive(Default)]
struct State {
    /// Oldest first (sequence order, as registered under the writer lock).
    batches: Vec<InFlight>,
    /// The sequence number after the newest batch registered.
    registered_end: Seq,
    /// The first record that reached the journal but could not be applied to the volume: the
    /// volume lacks it and may lack any later one until they are re-applied.
    behind_from: Option<Seq>,
    /// Threads waiting for a change: a finish wakes them only if there are any (a futex wake
    /// per batch is a measurable cost).
    waiters: usize,
}

#[derive(Default)]
pub struct Applying {
    state: Mutex<State>,
    changed: Condvar,
}

fn overlaps(sorted: &[(u64, u64)], start: u64, end: u64) -> bool {
    sorted.iter().take_while(|&&(s, _)| s < end).any(|&(_, e)| e > start)
}

fn batches_overlap(a: &[(u64, u64)], b: &[(u64, u64)]) -> bool {
    let (small, large) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    small.iter().any(|&(s, e)| overlaps(large, s, e))
}

impl Applying {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, mut guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        guard.waiters += 1;
        let mut guard = self.changed.wait(guard).unwrap_or_else(|p| p.into_inner());
        guard.waiters -= 1;
        guard
    }

    /// Registers a batch just appended to the journal, numbered from `first`, one range
    /// per record. Call under the writer lock, so batches are registered in sequence order.
    pub fn register(self: &Arc<Self>, first: Seq, mut ranges: Vec<(u64, u64)>) -> ApplyTicket {
        let count = ranges.len();
        ranges.retain(|&(s, e)| e > s);
        ranges.sort_unstable();
        let mut state = self.lock();
        state.batches.push(InFlight { first, ranges });
        state.registered_end = first + count as Seq;
        drop(state);
        ApplyTicket { applying: Arc::clone(self), first, finished: false }
    }

    /// Waits until no earlier batch in flight overlaps `ticket`'s: its writes may then go to
    /// the volume.
    pub fn wait_turn(&self, ticket: &ApplyTicket) {
        let mut state = self.lock();
        loop {
            let mine =
                state.batches.iter().position(|b| b.first == ticket.first).expect("a ticket's batch is in flight");
            let ranges = &state.batches[mine].ranges;
            if !state.batches[..mine].iter().any(|b| batches_overlap(&b.ranges, ranges)) {
                return;
            }
            state = self.wait(state);
        }
    }

    /// Where a read issued now stands: it must see every batch registered so far.
    pub fn fence(&self) -> Seq {
        self.lock().registered_end
    }

    /// Waits until no batch registered before `fence` still writes any byte of `[start, end)`.
    /// Later batches are not waited for: a read is concurrent with them, and the thread that
    /// would apply one may be the one reading.
    pub fn wait_for_range(&self, start: u64, end: u64, fence: Seq) {
        let mut state = self.lock();
        while state.batches.iter().take_while(|b| b.first < fence).any(|b| overlaps(&b.ranges, start, end)) {
            state = self.wait(state);
        }
    }

    /// Waits until every batch holding a record numbered `seq` or lower has been applied (or
    /// has failed to be).
    pub fn wait_through(&self, seq: Seq) {
        let mut state = self.lock();
        while state.batches.first().is_some_and(|b| b.first <= seq) {
            state = self.wait(state);
        }
    }

    /// The first record the volume lacks after a failed apply, if any.
    pub fn behind_from(&self) -> Option<Seq> {
        self.lock().behind_from
    }

    /// Forgets a failed apply once the records from `seq` on were applied again.
    pub fn caught_up(&self, seq: Seq) {
        let mut state = self.lock();
        if state.behind_from == Some(seq) {
            state.behind_from = None;
        }
    }

    fn finish(&self, first: Seq, applied: bool) {
        let mut state = self.lock();
        state.batches.retain(|b| b.first != first);
        if !applied {
            state.behind_from = Some(state.behind_from.map_or(first, |behind| behind.min(first)));
        }
        let waiters = state.waiters > 0;
        drop(state);
        if waiters {
            self.changed.notify_all();
        }
    }
}

/// A journaled batch's claim on the volume. Finish it once its writes are applied; dropped
/// unfinished, it counts as a failed apply, so the volume is caught up from the journal.
pub struct ApplyTicket {
    applying: Arc<Applying>,
    first: Seq,
    finished: bool,
}

impl ApplyTicket {
    pub fn first_seq(&self) -> Seq {
        self.first
    }

    pub fn finish(mut self, applied: bool) {
        self.finished = true;
        self.applying.finish(self.first, applied);
    }
}

impl Drop for ApplyTicket {
    fn drop(&mut self) {
        if !self.finished {
            self.applying.finish(self.first, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[test]
    fn overlap_matches_a_brute_force_check() {
        let mut rng = 0x1234_5678_u64;
        let mut next = |m: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % m
        };
        for _ in 0..2000 {
            let mut ranges: Vec<(u64, u64)> = (0..next(6)).map(|_| (next(100), 0)).collect();
            for r in &mut ranges {
                r.1 = r.0 + 1 + next(40);
            }
            ranges.sort_unstable();
            let (s, e) = (next(140), 0);
            let e = e.max(s + 1 + next(30));
            let brute = ranges.iter().any(|&(rs, re)| rs < e && re > s);
            assert_eq!(overlaps(&ranges, s, e), brute, "{ranges:?} against {s}..{e}");
        }
    }

    #[test]
    fn a_batch_waits_only_for_earlier_overlapping_batches() {
        let applying = Arc::new(Applying::default());
        let first = applying.register(1, vec![(0, 4096)]);
        let disjoint = applying.register(2, vec![(8192, 12288)]);
        let overlapping = applying.register(3, vec![(4000, 5000)]);
        // Disjoint from everything before it: its turn is now.
        applying.wait_turn(&disjoint);
        let waited = Arc::new(AtomicBool::new(false));
        let handle = {
            let applying = Arc::clone(&applying);
            let waited = Arc::clone(&waited);
            std::thread::spawn(move || {
                applying.wait_turn(&overlapping);
                assert!(waited.load(Ordering::SeqCst), "applied before the earlier overlapping batch finished");
                overlapping.finish(true);
            })
        };
        // Give a wrong early return time to happen: the thread would then see `waited` unset.
        std::thread::sleep(Duration::from_millis(20));
        waited.store(true, Ordering::SeqCst);
        first.finish(true);
        handle.join().unwrap();
        disjoint.finish(true);
        applying.wait_through(3);
        assert_eq!(applying.behind_from(), None);
    }

    #[test]
    fn a_dropped_ticket_marks_the_volume_behind() {
        let applying = Arc::new(Applying::default());
        let ok = applying.register(5, vec![(0, 1)]);
        drop(applying.register(7, vec![(0, 1)]));
        ok.finish(true);
        applying.wait_through(100);
        assert_eq!(applying.behind_from(), Some(7));
        applying.caught_up(7);
        assert_eq!(applying.behind_from(), None);
    }
}
