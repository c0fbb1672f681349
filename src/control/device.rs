//! What the control plane knows of the device it reports on: a small read-only view, so the
//! protocol code depends on this and not on the vhost-user backend.

use std::sync::atomic::Ordering;

use super::replies::Counters;
use crate::vhost_user::BlkBackend;

pub trait DeviceStatus: Send + Sync {
    /// Whether a frontend (the VM) is connected now.
    fn frontend_connected(&self) -> bool;
    fn queues(&self) -> usize;
    fn read_only(&self) -> bool;
    fn counters(&self) -> Counters;
}

impl DeviceStatus for BlkBackend {
    fn frontend_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    fn queues(&self) -> usize {
        self.options().num_queues
    }

    fn read_only(&self) -> bool {
        self.options().read_only
    }

    fn counters(&self) -> Counters {
        let c = &self.counters;
        Counters {
            requests: c.requests.load(Ordering::Relaxed),
            bytes_read: c.bytes_read.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
            flushes: c.flushes.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            broken_queues: c.broken_queues.load(Ordering::Relaxed),
            resubmitted: c.resubmitted.load(Ordering::Relaxed),
        }
    }
}
