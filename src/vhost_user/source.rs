//! What a device serves: the live store, or a point-in-time export (a view of a retained point
//! with its overlay). The pipeline and applier are written against [`BlockSource`], so both
//! kinds of disk share one implementation of the virtio-blk device.
//!
//! The live store journals a batch and applies it to the volume later (on the applier); an
//! export writes a batch to its overlay at once, so its "journaled" batch is already applied,
//! and its reads need no fence.

use std::sync::Arc;

use super::completion::ExecError;
use crate::export::PointExport;
use crate::marker::{Marker, MarkerSource};
use crate::store::{Journaled, MarkerStatus, ReadFence, Store, VolumeOp};

/// The disk behind a device.
#[derive(Clone)]
pub enum BlockSource {
    Live(Arc<Store>),
    Export(Arc<PointExport>),
}

/// The writes a read must see ([`Store::read_fence`]); an export's writes are complete before
/// they are acknowledged, so it needs none.
#[derive(Debug, Clone, Copy)]
pub enum Fence {
    Live(ReadFence),
    Export,
}

/// A batch accepted by the source and on its way to the disk.
pub enum Batch {
    Live(Journaled),
    /// Written to the export's overlay already; holds its number of ops.
    Export(usize),
}

impl BlockSource {
    pub fn volume_size(&self) -> u64 {
        match self {
            Self::Live(store) => store.volume_size(),
            Self::Export(export) => export.volume_size(),
        }
    }

    pub fn read_fence(&self) -> Fence {
        match self {
            Self::Live(store) => Fence::Live(store.read_fence()),
            Self::Export(_) => Fence::Export,
        }
    }

    /// Reads `buf.len()` bytes at `offset`, after the writes `fence` names.
    pub fn read_after(&self, fence: Fence, offset: u64, buf: &mut [u8]) -> crate::Result<()> {
        match (self, fence) {
            (Self::Live(store), Fence::Live(fence)) => store.read_after(fence, offset, buf),
            (Self::Live(store), Fence::Export) => store.read(offset, buf),
            (Self::Export(export), _) => export.read(offset, buf),
        }
    }

    /// Accepts a batch: the live store journals it, an export writes it to its overlay.
    pub fn journal(&self, ops: &[VolumeOp<'_>]) -> crate::Result<Batch> {
        match self {
            Self::Live(store) => store.journal(ops).map(Batch::Live),
            Self::Export(export) => export.write(ops).map(|()| Batch::Export(ops.len())),
        }
    }

    /// Brings a batch to the disk, calling `applied(i)` as each op of it is there.
    pub fn apply(&self, batch: Batch, mut applied: impl FnMut(usize)) -> crate::Result<()> {
        match (self, batch) {
            (Self::Live(store), Batch::Live(journaled)) => store.apply(journaled, applied).map(drop),
            (_, Batch::Export(ops)) => {
                (0..ops).for_each(&mut applied);
                Ok(())
            }
            (Self::Export(_), Batch::Live(_)) => unreachable!("an export never journals"),
        }
    }

    /// Makes the writes so far durable. An export's overlay is scratch that goes with the
    /// export (and the process), so there is nothing to make durable.
    pub fn sync(&self) -> crate::Result<()> {
        match self {
            Self::Live(store) => store.sync().map(drop),
            Self::Export(_) => Ok(()),
        }
    }

    pub fn add_marker(&self, name: &str, source: MarkerSource) -> Result<Marker, ExecError> {
        match self {
            Self::Live(store) => Ok(store.add_marker(name, None, source)?),
            Self::Export(_) => Err(ExecError::NoMarkersOnExport),
        }
    }

    /// The marker of this name, or the newest one.
    pub fn marker(&self, name: Option<&str>) -> Result<Option<MarkerStatus>, ExecError> {
        match (self, name) {
            (Self::Live(store), Some(name)) => Ok(Some(store.marker(name)?)),
            (Self::Live(store), None) => Ok(store.newest_marker()),
            (Self::Export(_), _) => Err(ExecError::NoMarkersOnExport),
        }
    }
}
