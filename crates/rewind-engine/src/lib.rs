//! rewind's storage engine: a journaling block store. Every write to the volume is journaled
//! before it is acknowledged, so the volume can be rebuilt as it was at any retained point: a
//! marker, a sequence number or a time.
//!
//! The pieces, one module each: [`journal`] (on-disk records, append, scan, torn-tail repair),
//! [`snapshot`] (the delta chain), [`marker`], [`retention`], [`recovery`], [`view`] (points
//! read in place, without copying), [`export`] (a view made writable by an overlay), and
//! [`store`], the write path that ties them together. Nothing here knows about virtio,
//! vhost-user or the CLI.
//!
//! [`Seq`] and [`FORMAT_VERSION`] live here, at the root, because every layer (down to
//! [`error`]) uses them: defined in a module, they would make lower modules import upwards.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod error;
pub mod export;
pub mod extent_map;
pub mod fsutil;
pub mod journal;
pub mod marker;
pub mod recovery;
pub mod retention;
pub mod snapshot;
pub mod store;
pub mod view;

pub use error::{Error, Result};
pub use store::{CreateOptions, Store, VolumeOp};

/// A journal sequence number. Records are numbered 1, 2, 3, … without gaps; 0 names the state
/// before the first record.
pub type Seq = u64;

/// Version of the on-disk format (docs/format.md). Stores of another version are refused.
pub const FORMAT_VERSION: u32 = 1;
