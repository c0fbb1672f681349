//! A map from volume byte ranges to where their newest content comes from. Inserting a range
//! replaces whatever overlapped it, so folding a stretch of journal records into the map in
//! order leaves exactly their net effect: the content of a snapshot delta.

use std::collections::BTreeMap;

/// Where an extent's bytes come from; `skip` moves the start forward when an extent is split.
pub trait ExtentSource: Copy {
    fn skip(self, bytes: u64) -> Self;
}

#[derive(Debug, Clone, Default)]
pub struct ExtentMap<S> {
    /// start → (length, source); ranges never overlap and are never empty.
    extents: BTreeMap<u64, (u64, S)>,
}

impl<S: ExtentSource> ExtentMap<S> {
    pub fn new() -> Self {
        Self { extents: BTreeMap::new() }
    }

    pub fn insert(&mut self, start: u64, len: u64, source: S) {
        if len == 0 {
            return;
        }
        let end = start + len;
        // The extent starting before `start` may reach into the new range: keep its head, and
        // its tail too if it reaches past the new range.
        if let Some((&prev_start, &(prev_len, prev_source))) = self.extents.range(..start).next_back() {
            let prev_end = prev_start + prev_len;
            if prev_end > start {
                self.extents.insert(prev_start, (start - prev_start, prev_source));
                if prev_end > end {
                    self.extents.insert(end, (prev_end - end, prev_source.skip(end - prev_start)));
                }
            }
        }
        let covered: Vec<u64> = self.extents.range(start..end).map(|(&s, _)| s).collect();
        for old_start in covered {
            let (old_len, old_source) = self.extents.remove(&old_start).expect("key just listed");
            let old_end = old_start + old_len;
            if old_end > end {
                self.extents.insert(end, (old_end - end, old_source.skip(end - old_start)));
            }
        }
        self.extents.insert(start, (len, source));
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, u64, S)> + '_ {
        self.extents.iter().map(|(&start, &(len, source))| (start, len, source))
    }

    /// The extents that overlap `start..end`, in order, whole (the first may start before
    /// `start`, the last end after `end`).
    ///
    /// Each B-tree search is a walk through nodes that are rarely cached (one per read of an
    /// export's overlay), so the common case takes one: when the last extent starting before
    /// `end` starts at or before `start`, it is the only one that can overlap.
    pub fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64, S)> + '_ {
        let last = self.extents.range(..end).next_back().map(|(&s, &(len, source))| (s, len, source));
        let (only, several) = match last {
            Some((s, len, source)) if s <= start => ((s + len > start).then_some((s, len, source)), None),
            _ => (None, Some(self.overlapping_searched(start, end))),
        };
        only.into_iter().chain(several.into_iter().flatten())
    }

    /// [`overlapping`](Self::overlapping) with a search for each end of the range.
    fn overlapping_searched(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64, S)> + '_ {
        let before = self
            .extents
            .range(..start)
            .next_back()
            .filter(|(&s, &(len, _))| s + len > start)
            .map(|(&s, &(len, source))| (s, len, source));
        let inside = self.extents.range(start..end).map(|(&s, &(len, source))| (s, len, source));
        before.into_iter().chain(inside)
    }

    pub fn len(&self) -> usize {
        self.extents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }
}

/// An extent map that no longer changes (a point-in-time view's), in a sorted array with a
/// summary of it small enough to stay cached. A lookup bisects the summary, then scans one run
/// of [`SUMMARY_STRIDE`] extents (four cache lines, read in order), so it waits for memory about
/// once. A view's lookups are random over a map of megabytes: bisecting the whole array took
/// 10–17% of an export's read path in profiles, a B-tree walk 7–11%, both from cache misses.
/// An extent takes 32 bytes with a 16-byte source, plus 1 byte of summary.
#[derive(Debug, Clone)]
pub struct SortedExtents<S> {
    /// (start, end, source), in order; extents neither overlap nor are empty, so the ends are
    /// in order too.
    extents: Vec<(u64, u64, S)>,
    /// The start of every [`SUMMARY_STRIDE`]th extent.
    summary: Vec<u64>,
}

const SUMMARY_STRIDE: usize = 8;

impl<S: ExtentSource> From<ExtentMap<S>> for SortedExtents<S> {
    fn from(map: ExtentMap<S>) -> Self {
        let extents: Vec<_> =
            map.extents.into_iter().map(|(start, (len, source))| (start, start + len, source)).collect();
        let summary = extents.iter().step_by(SUMMARY_STRIDE).map(|&(start, _, _)| start).collect();
        Self { extents, summary }
    }
}

impl<S: ExtentSource> SortedExtents<S> {
    /// The extents that overlap `start..end`, in order, whole (the first may start before
    /// `start`, the last end after `end`).
    pub fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64, S)> + '_ {
        // Those starting before `end`, from the first that ends after `start`. Usually only the
        // last of them can overlap, which spares the second search.
        let last = self.count_starting_before(end);
        let first = match last.checked_sub(1) {
            Some(only) if self.extents[only].0 <= start => only + usize::from(self.extents[only].1 <= start),
            _ => self.extents[..last].partition_point(|&(_, e, _)| e <= start),
        };
        self.extents[first..last].iter().map(|&(s, e, source)| (s, e - s, source))
    }

    fn count_starting_before(&self, offset: u64) -> usize {
        let Some(run) = self.summary.partition_point(|&s| s < offset).checked_sub(1) else {
            return 0;
        };
        let from = run * SUMMARY_STRIDE;
        let to = (from + SUMMARY_STRIDE).min(self.extents.len());
        from + self.extents[from..to].iter().take_while(|&&(s, _, _)| s < offset).count()
    }

    pub fn len(&self) -> usize {
        self.extents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A source that remembers which insert it came from and how far into it we are, so the
    /// map can be checked byte by byte against a plain array.
    #[derive(Debug, Clone, Copy, PartialEq)]
    struct Tagged {
        insert: u32,
        at: u64,
    }

    impl ExtentSource for Tagged {
        fn skip(self, bytes: u64) -> Self {
            Self { insert: self.insert, at: self.at + bytes }
        }
    }

    proptest! {
        #[test]
        fn map_matches_byte_array(ops in proptest::collection::vec((0u64..200, 1u64..60), 1..40)) {
            let mut map = ExtentMap::new();
            let mut bytes: Vec<Option<(u32, u64)>> = vec![None; 300];
            for (i, &(start, len)) in ops.iter().enumerate() {
                map.insert(start, len, Tagged { insert: i as u32, at: 0 });
                for k in 0..len {
                    bytes[(start + k) as usize] = Some((i as u32, k));
                }
            }
            let mut from_map: Vec<Option<(u32, u64)>> = vec![None; 300];
            let mut last_end = 0;
            for (start, len, source) in map.iter() {
                prop_assert!(start >= last_end, "extents overlap");
                prop_assert!(len > 0);
                last_end = start + len;
                for k in 0..len {
                    from_map[(start + k) as usize] = Some((source.insert, source.at + k));
                }
            }
            prop_assert_eq!(from_map, bytes);
        }
    }

    proptest! {
        /// `overlapping` yields, in order, exactly the extents that share a byte with the
        /// range, whichever way it finds them, from the B-tree and from the sorted arrays.
        #[test]
        fn overlapping_matches_a_scan(
            ops in proptest::collection::vec((0u64..200, 1u64..60), 0..40),
            start in 0u64..260,
            len in 1u64..80,
        ) {
            let mut map = ExtentMap::new();
            for (i, &(s, l)) in ops.iter().enumerate() {
                map.insert(s, l, Tagged { insert: i as u32, at: 0 });
            }
            let end = start + len;
            let scanned: Vec<_> = map.iter().filter(|&(s, l, _)| s < end && s + l > start).collect();
            let found: Vec<_> = map.overlapping(start, end).collect();
            prop_assert_eq!(&found, &scanned);
            let sorted = SortedExtents::from(map);
            let found_sorted: Vec<_> = sorted.overlapping(start, end).collect();
            prop_assert_eq!(found_sorted, scanned);
        }
    }

    proptest! {
        /// The sorted arrays of a map with many extents (several summary blocks) find what a
        /// scan finds.
        #[test]
        fn sorted_extents_of_many_blocks_match_a_scan(
            ops in proptest::collection::vec((0u64..20_000, 1u64..40), 200..600),
            ranges in proptest::collection::vec((0u64..20_100, 1u64..300), 1..50),
        ) {
            let mut map = ExtentMap::new();
            for (i, &(s, l)) in ops.iter().enumerate() {
                map.insert(s, l, Tagged { insert: i as u32, at: 0 });
            }
            let all: Vec<_> = map.iter().collect();
            prop_assert!(all.len() > SUMMARY_STRIDE);
            let sorted = SortedExtents::from(map);
            for (start, len) in ranges {
                let end = start + len;
                let scanned: Vec<_> = all.iter().copied().filter(|&(s, l, _)| s < end && s + l > start).collect();
                let found: Vec<_> = sorted.overlapping(start, end).collect();
                prop_assert_eq!(found, scanned);
            }
        }
    }

    #[test]
    fn insert_inside_an_extent_splits_it_in_three() {
        let mut map = ExtentMap::new();
        map.insert(0, 100, Tagged { insert: 0, at: 0 });
        map.insert(40, 10, Tagged { insert: 1, at: 0 });
        let got: Vec<_> = map.iter().collect();
        assert_eq!(
            got,
            vec![
                (0, 40, Tagged { insert: 0, at: 0 }),
                (40, 10, Tagged { insert: 1, at: 0 }),
                (50, 50, Tagged { insert: 0, at: 50 }),
            ]
        );
    }
}
