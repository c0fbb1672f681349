//! rewind: a journaling block store. Every write to the volume is journaled before it is
//! acknowledged, so the volume can be rebuilt as it was at any retained point: a marker, a
//! sequence number or a time.
//!
//! The pieces, one module each: [`journal`] (on-disk records, append, scan, torn-tail repair),
//! [`snapshot`] (the delta chain), [`marker`], [`retention`], [`recovery`], and [`store`], the
//! write path that ties them together.

pub mod cli;
pub mod control;
pub mod error;
pub mod extent_map;
pub mod fsutil;
pub mod journal;
pub mod log_limit;
pub mod marker;
pub mod qmp_client;
pub mod recovery;
pub mod retention;
pub mod serve;
pub mod snapshot;
pub mod store;
pub mod units;
pub mod vhost_user;
pub mod virtio_blk;

pub use error::{Error, Result};
pub use store::{CreateOptions, Store, VolumeOp};

/// Version of the on-disk format (docs/format.md). Stores of another version are refused.
pub const FORMAT_VERSION: u32 = 1;
