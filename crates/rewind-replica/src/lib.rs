//! Off-host protection for a rewind store: its history shipped, while it serves, to an object
//! store (S3, Ceph's radosgw, or a directory), and any point the replica holds rebuilt from the
//! bucket alone on another host.
//!
//! - [`remote`]: the object store behind a URL, every request bounded by a timeout;
//! - [`directory`]: a `file://` replica, written durably;
//! - [`layout`]: the versioned remote layout (docs/format.md, "Replica");
//! - [`ship`]: the shipping thread beside the daemon's I/O path;
//! - [`restore`]: markers, status and recovery from the replica alone;
//! - [`remembered`]: the replica's URL kept in the store, for offline status.
//!
//! The engine does not depend on this crate: it only offers a hold on retention
//! (`Store::keep_journal_from`) and read access to durable records.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod directory;
pub mod error;
pub mod layout;
pub mod remembered;
pub mod remote;
pub mod restore;
pub mod ship;

pub use error::{Error, Result};
pub use remote::Remote;
pub use restore::{Replica, ReplicaStatus};
pub use ship::{ReplicationEvent, ReplicationStatus, Shipper, ShipperConfig};

#[cfg(test)]
mod tests;
