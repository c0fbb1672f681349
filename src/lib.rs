//! rewind: a vhost-user-blk backend over a journaling block store. Every write to the volume is
//! journaled before it is acknowledged, so the volume can be rebuilt as it was at any retained
//! point: a marker, a sequence number or a time.
//!
//! The store itself is the `rewind-engine` crate, re-exported here under the module names it
//! had when it lived in this crate ([`journal`], [`snapshot`], [`marker`], [`retention`],
//! [`recovery`], [`store`], ...). This crate adds what serves and drives it: [`virtio_blk`]
//! and [`vhost_user`] (the device), [`serve`], [`point_exports`], [`control`] (the control socket) and [`cli`].

pub mod cli;
pub mod control;
pub mod log_limit;
pub mod point_exports;
pub mod qmp_client;
pub mod serve;
pub mod units;
pub mod vhost_user;
pub mod virtio_blk;

pub use rewind_engine::{
    error, export, extent_map, fsutil, journal, marker, recovery, retention, snapshot, store, view, CreateOptions,
    Error, Result, Seq, Store, VolumeOp, FORMAT_VERSION,
};
