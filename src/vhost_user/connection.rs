//! One frontend's connection: the vhost-user requests it sends (this module's
//! [`VhostUserBackendReqHandlerMut`]) and the worker thread of each queue it starts.
//!
//! rewind answers the requests itself rather than through vhost-user-backend's handler, which
//! is private to that crate and refuses inflight tracking: here GET_INFLIGHT_FD and
//! SET_INFLIGHT_FD create and adopt the region ([`inflight`](super::inflight)), and a queue that
//! starts on a region resubmits what a previous backend left unfinished. The rings themselves
//! are vhost-user-backend's [`VringRwLock`].

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight, VhostUserLog,
    VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVirtioFeatures, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Error as ProtocolError, GpuBackend, Result as ProtocolResult, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap};

use super::inflight::{InflightRegion, QueueTracker};
use super::BlkBackend;

/// Memory slots offered with CONFIGURE_MEM_SLOTS (what kernel vhost supports).
const MAX_MEM_SLOTS: u64 = 509;

/// Where a region of guest memory is in the frontend's address space, for SET_VRING_ADDR.
struct Mapping {
    frontend_addr: u64,
    size: u64,
    guest_addr: u64,
}

/// A started queue's worker thread and how to wake or stop it.
struct QueueWorker {
    wake: UnixStream,
    exit: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl QueueWorker {
    /// Serves queue `index` whenever its kick fd or `wake` fires, starting with one pass (a
    /// queue started after a reconnect may have requests to resubmit, or waiting on the ring
    /// since before: libvhost-user kicks itself for the same reason).
    fn spawn(backend: Arc<BlkBackend>, index: usize, vring: VringRwLock, kick: File) -> io::Result<Self> {
        let (wake, mut woken) = UnixStream::pair()?;
        woken.set_nonblocking(true)?;
        let exit = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&exit);
        let thread = std::thread::Builder::new().name(format!("rewind-queue-{index}")).spawn(move || {
            let mut drained = [0u8; 64];
            // Checked after every drain of `woken`: a stop that wrote its byte while the last
            // drain ran has set the flag before, so it is seen here, not lost.
            while !stop.load(Ordering::Acquire) {
                if vring.get_ref().is_enabled() {
                    if let Err(e) = backend.process_queue(index, &vring) {
                        log::warn!("queue {index}: {e}");
                    }
                }
                let mut fds = [
                    rustix::event::PollFd::new(&kick, rustix::event::PollFlags::IN),
                    rustix::event::PollFd::new(&woken, rustix::event::PollFlags::IN),
                ];
                match rustix::event::poll(&mut fds, None) {
                    Ok(_) | Err(rustix::io::Errno::INTR) => {}
                    Err(e) => {
                        log::error!("queue {index}: cannot wait for kicks: {e}");
                        return;
                    }
                }
                // Only a kick fd that is readable is read: a frontend's eventfd may block.
                if fds[0].revents().contains(rustix::event::PollFlags::IN) {
                    let _ = vring.read_kick();
                }
                while matches!(woken.read(&mut drained), Ok(n) if n > 0) {}
            }
        })?;
        Ok(Self { wake, exit, thread: Some(thread) })
    }

    fn wake(&mut self) {
        if let Err(e) = self.wake.write_all(&[1]) {
            log::warn!("cannot wake a queue worker: {e}");
        }
    }
}

impl Drop for QueueWorker {
    /// Stops the thread after its current pass.
    fn drop(&mut self) {
        self.exit.store(true, Ordering::Release);
        self.wake();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("a queue worker panicked");
            }
        }
    }
}

/// The state of one frontend's connection.
pub struct Connection {
    backend: Arc<BlkBackend>,
    memory: GuestMemoryAtomic<GuestMemoryMmap>,
    mappings: Vec<Mapping>,
    vrings: Vec<VringRwLock>,
    workers: Vec<Option<QueueWorker>>,
    inflight: Option<Arc<InflightRegion>>,
    owned: bool,
    acked_features: u64,
}

fn invalid(why: impl std::fmt::Display) -> ProtocolError {
    log::warn!("frontend request refused: {why}");
    ProtocolError::ReqHandlerError(io::Error::new(io::ErrorKind::InvalidInput, why.to_string()))
}

impl Connection {
    pub fn new(backend: Arc<BlkBackend>) -> io::Result<Self> {
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let queues = backend.options().num_queues;
        let max_size = backend.options().queue_size as u16;
        let vrings = (0..queues)
            .map(|_| VringRwLock::new(memory.clone(), max_size).map_err(|e| io::Error::other(e.to_string())))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Self {
            backend,
            memory,
            mappings: Vec::new(),
            vrings,
            workers: (0..queues).map(|_| None).collect(),
            inflight: None,
            owned: false,
            acked_features: 0,
        })
    }

    fn vring(&self, index: u32) -> ProtocolResult<&VringRwLock> {
        self.vrings.get(index as usize).ok_or_else(|| invalid(format!("there is no queue {index}")))
    }

    fn guest_addr(&self, frontend_addr: u64) -> ProtocolResult<u64> {
        self.mappings
            .iter()
            .find(|m| frontend_addr >= m.frontend_addr && frontend_addr - m.frontend_addr < m.size)
            .map(|m| frontend_addr - m.frontend_addr + m.guest_addr)
            .ok_or_else(|| invalid(format!("ring address {frontend_addr:#x} is in no memory region")))
    }

    fn publish_memory(&mut self, memory: GuestMemoryMmap) {
        self.memory.lock().unwrap_or_else(|p| p.into_inner()).replace(memory);
        self.backend.set_memory(self.memory.clone());
    }

    /// Starts queue `index`, kicked through `kick` (the frontend's kick fd, duplicated for its
    /// worker to wait on): with an inflight region, it resumes where the region says and
    /// resubmits what is unfinished first.
    fn start_queue(&mut self, index: usize, kick: File) -> ProtocolResult<()> {
        let vring = self.vrings[index].clone();
        if vring.get_ref().get_queue().ready() {
            return Ok(());
        }
        let tracking = match &self.inflight {
            Some(region) => {
                let size = vring.get_ref().get_queue().size();
                let used = vring.queue_used_idx().map_err(|e| invalid(format!("queue {index}: {e}")))?;
                let (tracker, resume) = QueueTracker::start(Arc::clone(region), index, size, used)
                    .map_err(|e| invalid(format!("queue {index} cannot start: {e}")))?;
                vring.set_queue_next_avail(resume.next_avail);
                if !resume.resubmit.is_empty() {
                    log::info!(
                        "queue {index}: resubmitting {} request(s) left in flight by the previous backend",
                        resume.resubmit.len()
                    );
                }
                Some((Arc::new(tracker), resume.resubmit))
            }
            None => None,
        };
        vring.set_queue_ready(true);
        // A backend killed between putting completions on the used ring and signalling them
        // left a driver that was never told, and with EVENT_IDX it would not be told of later
        // ones either (its used_event lies behind them): one signal makes it look at the ring
        // again. A driver with nothing new there ignores it.
        if let Err(e) = vring.signal_used_queue() {
            log::warn!("queue {index}: cannot signal the driver: {e}");
        }
        self.backend.start_queue(index, tracking);
        let worker = QueueWorker::spawn(Arc::clone(&self.backend), index, vring, kick)
            .map_err(ProtocolError::ReqHandlerError)?;
        self.workers[index] = Some(worker);
        Ok(())
    }

    /// Stops queue `index`: its worker exits and everything taken off its ring completes.
    fn stop_queue(&mut self, index: usize) {
        self.vrings[index].set_queue_ready(false);
        self.workers[index] = None;
        self.backend.stop_queue(index);
    }

    /// Ends the connection: every queue stops (in-flight requests complete).
    pub fn close(&mut self) {
        for index in 0..self.vrings.len() {
            self.stop_queue(index);
        }
        self.backend.disconnected();
    }
}

impl VhostUserBackendReqHandlerMut for Connection {
    fn set_owner(&mut self) -> ProtocolResult<()> {
        if self.owned {
            return Err(ProtocolError::InvalidOperation("already owned"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> ProtocolResult<()> {
        self.owned = false;
        self.acked_features = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> ProtocolResult<()> {
        for index in 0..self.vrings.len() {
            self.vrings[index].set_enabled(false);
            self.stop_queue(index);
        }
        self.acked_features = 0;
        self.backend.reset_device();
        Ok(())
    }

    fn get_features(&mut self) -> ProtocolResult<u64> {
        Ok(self.backend.features())
    }

    fn set_features(&mut self, features: u64) -> ProtocolResult<()> {
        if features & !self.backend.features() != 0 {
            return Err(invalid(format!("features {features:#x} include some not offered")));
        }
        self.acked_features = features;
        // Without PROTOCOL_FEATURES there is no SET_VRING_ENABLE: rings start enabled.
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            self.vrings.iter().for_each(|vring| vring.set_enabled(true));
        }
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        self.vrings.iter().for_each(|vring| vring.set_queue_event_idx(event_idx));
        self.backend.set_features(features);
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> ProtocolResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening.is_some() {
            return Err(ProtocolError::InvalidOperation("postcopy is not supported"));
        }
        let mut guest_regions = Vec::with_capacity(regions.len());
        let mut mappings = Vec::with_capacity(regions.len());
        for (region, file) in regions.iter().zip(files) {
            let mapped = GuestRegionMmap::new(region.mmap_region(file)?, GuestAddress(region.guest_phys_addr))
                .ok_or_else(|| invalid("a memory region overflows the guest address space"))?;
            guest_regions.push(mapped);
            mappings.push(Mapping {
                frontend_addr: region.user_addr,
                size: region.memory_size,
                guest_addr: region.guest_phys_addr,
            });
        }
        let memory = GuestMemoryMmap::from_regions(guest_regions).map_err(|e| invalid(format!("memory table: {e}")))?;
        self.publish_memory(memory);
        self.mappings = mappings;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> ProtocolResult<()> {
        let max = self.backend.options().queue_size;
        if num == 0 || num as usize > max {
            return Err(invalid(format!("queue {index}: size {num} is outside 1..={max}")));
        }
        self.vring(index)?.set_queue_size(num as u16);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> ProtocolResult<()> {
        let (desc, avail, used) = (self.guest_addr(descriptor)?, self.guest_addr(available)?, self.guest_addr(used)?);
        let vring = self.vring(index)?;
        vring.set_queue_info(desc, avail, used).map_err(|e| invalid(format!("queue {index}: {e}")))?;
        let used_idx = vring.queue_used_idx().map_err(|e| invalid(format!("queue {index}: {e}")))?;
        vring.set_queue_next_used(used_idx);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> ProtocolResult<()> {
        self.vring(index)?.set_queue_next_avail(base as u16);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> ProtocolResult<VhostUserVringState> {
        let vring = self.vring(index)?.clone();
        self.stop_queue(index as usize);
        let next_avail = vring.queue_next_avail();
        vring.set_kick(None);
        vring.set_call(None);
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, file: Option<File>) -> ProtocolResult<()> {
        let vring = self.vring(u32::from(index))?;
        let ours = file.as_ref().map(File::try_clone).transpose().map_err(ProtocolError::ReqHandlerError)?;
        vring.set_kick(file);
        // A queue starts when it is kicked; without a kick fd (polling) it is not served.
        match ours {
            Some(kick) => self.start_queue(usize::from(index), kick),
            None => Ok(()),
        }
    }

    fn set_vring_call(&mut self, index: u8, file: Option<File>) -> ProtocolResult<()> {
        self.vring(u32::from(index))?.set_call(file);
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, file: Option<File>) -> ProtocolResult<()> {
        self.vring(u32::from(index))?.set_err(file);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> ProtocolResult<VhostUserProtocolFeatures> {
        Ok(self.backend.protocol_features())
    }

    fn set_protocol_features(&mut self, _features: u64) -> ProtocolResult<()> {
        // The request handler keeps the acknowledged set and checks requests against it.
        Ok(())
    }

    fn get_queue_num(&mut self) -> ProtocolResult<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> ProtocolResult<()> {
        if self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(ProtocolError::InactiveFeature(VhostUserVirtioFeatures::PROTOCOL_FEATURES));
        }
        self.vring(index)?.set_enabled(enable);
        if let Some(worker) = self.workers[index as usize].as_mut() {
            worker.wake();
        }
        Ok(())
    }

    fn get_config(&mut self, offset: u32, size: u32, _flags: VhostUserConfigFlags) -> ProtocolResult<Vec<u8>> {
        Ok(self.backend.get_config(offset, size))
    }

    fn set_config(&mut self, offset: u32, buf: &[u8], _flags: VhostUserConfigFlags) -> ProtocolResult<()> {
        self.backend.set_config(offset, buf).map_err(ProtocolError::ReqHandlerError)
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> ProtocolResult<()> {
        Err(ProtocolError::InvalidOperation("not a GPU"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> ProtocolResult<File> {
        Err(ProtocolError::InvalidOperation("no shared objects"))
    }

    fn get_inflight_fd(&mut self, inflight: &VhostUserInflight) -> ProtocolResult<(VhostUserInflight, File)> {
        let (region, file) =
            InflightRegion::create(inflight.num_queues, inflight.queue_size, self.backend.queue_limits())
                .map_err(|e| invalid(format!("GET_INFLIGHT_FD: {e}")))?;
        let size = crate::vhost_user::inflight::queue_region_size(inflight.queue_size) as u64;
        self.inflight = Some(Arc::new(region));
        log::debug!("inflight region created: {} queue(s) of {}", inflight.num_queues, inflight.queue_size);
        Ok((
            VhostUserInflight::new(size * u64::from(inflight.num_queues), 0, inflight.num_queues, inflight.queue_size),
            file,
        ))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> ProtocolResult<()> {
        self.inflight = None;
        let region = InflightRegion::adopt(
            file,
            inflight.mmap_size,
            inflight.mmap_offset,
            inflight.num_queues,
            inflight.queue_size,
            self.backend.queue_limits(),
        )
        .map_err(|e| invalid(format!("SET_INFLIGHT_FD: {e}")))?;
        log::info!(
            "tracking in-flight requests in the frontend's region ({} queue(s) of {})",
            inflight.num_queues,
            inflight.queue_size
        );
        self.inflight = Some(Arc::new(region));
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> ProtocolResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        file: File,
        postcopy_listening: Option<bool>,
    ) -> ProtocolResult<Option<VhostUserMemoryRegionBase>> {
        if postcopy_listening.is_some() {
            return Err(ProtocolError::InvalidOperation("postcopy is not supported"));
        }
        let mapped = GuestRegionMmap::new(region.mmap_region(file)?, GuestAddress(region.guest_phys_addr))
            .ok_or_else(|| invalid("a memory region overflows the guest address space"))?;
        let memory = self
            .memory
            .memory()
            .insert_region(Arc::new(mapped))
            .map_err(|e| invalid(format!("adding a memory region: {e}")))?;
        self.publish_memory(memory);
        self.mappings.push(Mapping {
            frontend_addr: region.user_addr,
            size: region.memory_size,
            guest_addr: region.guest_phys_addr,
        });
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> ProtocolResult<()> {
        let (memory, _) = self
            .memory
            .memory()
            .remove_region(GuestAddress(region.guest_phys_addr), region.memory_size)
            .map_err(|e| invalid(format!("removing a memory region: {e}")))?;
        self.publish_memory(memory);
        self.mappings.retain(|m| m.guest_addr != region.guest_phys_addr);
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _file: File,
    ) -> ProtocolResult<Option<File>> {
        Err(ProtocolError::InvalidOperation("no device state transfer"))
    }

    fn check_device_state(&mut self) -> ProtocolResult<()> {
        Err(ProtocolError::InvalidOperation("no device state transfer"))
    }

    fn get_shmem_config(&mut self) -> ProtocolResult<VhostUserShMemConfig> {
        Err(ProtocolError::InvalidOperation("no shared memory regions"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> ProtocolResult<()> {
        Err(ProtocolError::InvalidOperation("no dirty logging"))
    }
}
