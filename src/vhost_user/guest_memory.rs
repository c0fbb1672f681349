//! Host views of guest buffers: the one module of the vhost glue with `unsafe` code.
//!
//! The volume and the journal read and write plain `&[u8]` / `&mut [u8]`, so a request's data
//! buffers are handed to them as slices of the guest memory mapping, without a copy. Such a
//! slice is sound only while the mapping is: a [`GuestBuffers`] keeps the memory it maps from
//! (an owned guard, or a borrow of it) together with the raw views, and lends the views out
//! only through methods that borrow it. No raw pointer and no slice of unbounded lifetime
//! leaves this module, so a slice cannot outlive its mapping, whatever thread the buffers
//! travel to.
//!
//! What the types cannot promise: the memory is shared with the guest, which may change the
//! bytes while the device reads them, write where the device writes, or name the same bytes in
//! two buffers (or in a buffer and a status byte). Strictly, Rust assumes the bytes behind a
//! shared slice stay put while it is borrowed; here they are only read once each, by the
//! checksum and the system calls, and every value of a `u8` is valid, so a change is a data
//! race the guest started, as with DMA on any block device. The guest gets what it raced for,
//! with one cost worth knowing: a write buffer changed while it is journaled gets a record
//! whose checksum does not match its bytes (the journal then reads as damaged there), and the
//! volume may get other bytes than the journal. At most one mutable view is lent at a time,
//! and the device never reads back what it wrote through one.

use std::ops::Range;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryLoadGuard, GuestMemoryMmap};

/// A pass's hold on guest memory: the regions mapped when the pass began.
pub type Memory = GuestMemoryLoadGuard<GuestMemoryMmap>;

/// Where the mapping of a [`GuestBuffers`] is kept alive.
enum Held<'m> {
    /// Its own guard, for buffers handed to another thread (an applier's job).
    Owned(Memory),
    /// A borrow of the caller's, for buffers used and dropped within a pass.
    Borrowed(&'m GuestMemoryMmap),
}

impl Held<'_> {
    fn get(&self) -> &GuestMemoryMmap {
        match self {
            Held::Owned(memory) => memory,
            Held::Borrowed(memory) => memory,
        }
    }
}

/// One contiguous host view of guest memory.
struct RawSlice {
    ptr: *mut u8,
    len: usize,
}

/// Which of a [`GuestBuffers`]' views one request's buffers became, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    start: usize,
    end: usize,
}

impl Span {
    /// The views' indices.
    pub fn indices(self) -> Range<usize> {
        self.start..self.end
    }
}

/// Guest buffers mapped for host I/O, with the memory that keeps them mapped.
///
/// Buffers of many requests share one value (one allocation and, for a job, one guard), each
/// request holding the [`Span`] of its views.
pub struct GuestBuffers<'m> {
    memory: Held<'m>,
    slices: Vec<RawSlice>,
}

// SAFETY: the raw views point into the mapping that `memory` keeps alive, and they move
// together with it: a `GuestMemoryLoadGuard` is an `Arc` of the memory (`Send`), a borrow of
// `GuestMemoryMmap` is `Send` because the memory is `Sync`, and the views are only lent out
// through `&self` / `&mut self`, so no thread uses them after the value is dropped. What the
// bytes hold is shared with the guest by design (see the module's docs). The type is not
// `Sync`: a mutable view is lent through `&mut self` only, and nothing needs to share one
// value between threads.
unsafe impl Send for GuestBuffers<'_> {}

impl GuestBuffers<'static> {
    /// Buffers that keep the memory mapped themselves, for a job another thread runs.
    pub fn owning(memory: Memory) -> Self {
        Self { memory: Held::Owned(memory), slices: Vec::new() }
    }
}

impl<'m> GuestBuffers<'m> {
    /// Buffers that cannot outlive the caller's hold on the memory.
    pub fn borrowing(memory: &'m GuestMemoryMmap) -> Self {
        Self { memory: Held::Borrowed(memory), slices: Vec::new() }
    }

    /// The guest memory the buffers are in (for status bytes and small copies).
    pub fn memory(&self) -> &GuestMemoryMmap {
        self.memory.get()
    }

    /// Maps a request's buffers (one view per piece of a buffer that is contiguous on the
    /// host) and returns their span. On an error nothing is added.
    pub fn map(&mut self, buffers: &[(GuestAddress, u32)]) -> Result<Span, GuestMemoryError> {
        let start = self.slices.len();
        let memory = self.memory.get();
        for &(addr, len) in buffers {
            for slice in memory.get_slices(addr, len as usize) {
                match slice {
                    Ok(slice) => self.slices.push(RawSlice { ptr: slice.ptr_guard_mut().as_ptr(), len: slice.len() }),
                    Err(e) => {
                        self.slices.truncate(start);
                        return Err(e);
                    }
                }
            }
        }
        Ok(Span { start, end: self.slices.len() })
    }

    /// Forgets every view (the memory stays held), to map the next request's buffers into the
    /// same allocation.
    pub fn clear(&mut self) {
        self.slices.clear();
    }

    /// Every view, in the order mapped: a span's indices select a request's.
    pub fn all(&self) -> Vec<&[u8]> {
        self.slices
            .iter()
            .map(|s| {
                // SAFETY: `map` took the view from memory that `self.memory` keeps mapped for as
                // long as `self` is borrowed here; the guest may change the bytes meanwhile (see
                // the module's docs), which only changes what gets written.
                unsafe { std::slice::from_raw_parts(s.ptr, s.len) }
            })
            .collect()
    }

    /// One view, for the device to write into (a device-writable buffer).
    pub fn bytes_mut(&mut self, index: usize) -> &mut [u8] {
        let s = &self.slices[index];
        // SAFETY: as in `all`. Borrowing `self` mutably means no other view is lent meanwhile;
        // the guest may still alias these bytes, which only changes what it reads back.
        unsafe { std::slice::from_raw_parts_mut(s.ptr, s.len) }
    }
}
