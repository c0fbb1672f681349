//! A test VMM: the vhost crate's frontend side, memfd guest memory and split rings laid out by
//! hand (descriptor table, avail ring at +0x1000, used ring at +0x2000 of each queue's area), so
//! tests can build any descriptor chain, malformed ones included.
// Shared by several test binaries, each of which uses only part of it.
#![allow(dead_code)]

use std::fs::File;
use std::os::unix::io::FromRawFd;
use std::path::Path;

use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const MEM_SIZE: u64 = 32 << 20;
pub const QUEUE_SIZE: u16 = 256;
/// Where data buffers live (below are the rings).
pub const DATA: u64 = 4 << 20;
const QUEUE_AREA: u64 = 0x10000;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Where a queue's descriptor table and rings are in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct Rings {
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
}

impl Rings {
    /// The usual layout: queue `q`'s own area, avail ring at +0x1000, used ring at +0x2000.
    pub fn standard(q: usize) -> Self {
        let base = QUEUE_AREA * (q as u64 + 1);
        Self { desc: GuestAddress(base), avail: GuestAddress(base + 0x1000), used: GuestAddress(base + 0x2000) }
    }
}

pub struct Queue {
    rings: Rings,
    kick: EventFd,
    call: EventFd,
    next_avail: u16,
    last_used: u16,
    /// Next free descriptor slot (descriptors are handed out round robin).
    next_desc: u16,
}

impl Queue {
    fn desc_table(&self) -> GuestAddress {
        self.rings.desc
    }
    fn avail(&self) -> GuestAddress {
        self.rings.avail
    }
    fn used(&self) -> GuestAddress {
        self.rings.used
    }
}

pub struct Vmm {
    pub frontend: Frontend,
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub features: u64,
    /// Where guest address 0 is mapped in this process: ring addresses go to the backend as
    /// the frontend's virtual addresses.
    host_base: u64,
    multiqueue: bool,
    /// The inflight region the device made (GET_INFLIGHT_FD), handed back at every reconnect
    /// as QEMU does.
    pub inflight: Option<(VhostUserInflight, File)>,
}

/// One descriptor to place: guest address, length, flags (NEXT is added by `submit`).
#[derive(Clone, Copy, Debug)]
pub struct D {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
}

pub fn d(addr: u64, len: u32, flags: u16) -> D {
    D { addr, len, flags }
}

fn memfd(size: u64) -> File {
    // SAFETY: memfd_create with a static name; the fd is owned by the File.
    let fd = unsafe { libc::memfd_create(c"rewind-test-vmm".as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: fd was just created and is ours.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).unwrap();
    file
}

/// Connects and negotiates features: returns the frontend, the virtio features and the
/// protocol features in force.
fn handshake(socket: &Path, num_queues: usize, event_idx: bool) -> (Frontend, u64, VhostUserProtocolFeatures) {
    let mut frontend = Frontend::connect(socket, num_queues as u64).unwrap();
    frontend.set_owner().unwrap();
    let offered = frontend.get_features().unwrap();
    let mut features = offered;
    if !event_idx {
        features &= !VIRTIO_RING_F_EVENT_IDX;
    }
    frontend.set_features(features).unwrap();
    assert!(offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0);
    let protocol = frontend.get_protocol_features().unwrap();
    frontend.set_protocol_features(protocol).unwrap();
    // As QEMU does with REPLY_ACK: every request that changes the device waits for its verdict.
    frontend.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
    (frontend, features, protocol)
}

impl Vmm {
    /// Connects and sets the device up with `num_queues` queues; `event_idx` chooses whether
    /// VIRTIO_RING_F_EVENT_IDX is negotiated.
    pub fn connect(socket: &Path, num_queues: usize, event_idx: bool) -> Self {
        Self::connect_with(socket, num_queues, event_idx, false)
    }

    /// `connect`, and with `tracked` the device keeps an inflight region (INFLIGHT_SHMFD), as
    /// QEMU's vhost-user-blk asks.
    pub fn connect_with(socket: &Path, num_queues: usize, event_idx: bool, tracked: bool) -> Self {
        let (frontend, features, protocol) = handshake(socket, num_queues, event_idx);
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            MEM_SIZE as usize,
            Some(FileOffset::new(memfd(MEM_SIZE), 0)),
        )])
        .unwrap();
        let region = mem.find_region(GuestAddress(0)).unwrap();
        let host_base = region.as_ptr() as u64;

        let multiqueue = protocol.contains(VhostUserProtocolFeatures::MQ);
        let mut vmm = Self { frontend, mem, queues: Vec::new(), features, host_base, multiqueue, inflight: None };
        vmm.send_mem_table();
        if tracked {
            let asked = VhostUserInflight::new(0, 0, num_queues as u16, QUEUE_SIZE);
            let (inflight, file) = vmm.frontend.get_inflight_fd(&asked).unwrap();
            vmm.frontend.set_inflight_fd(&inflight, std::os::fd::AsRawFd::as_raw_fd(&file)).unwrap();
            vmm.inflight = Some((inflight, file));
        }
        for q in 0..num_queues {
            let queue = Queue {
                rings: Rings::standard(q),
                kick: EventFd::new(EFD_NONBLOCK).unwrap(),
                call: EventFd::new(EFD_NONBLOCK).unwrap(),
                next_avail: 0,
                last_used: 0,
                next_desc: 0,
            };
            vmm.queues.push(queue);
            vmm.start_queue(q);
        }
        vmm
    }

    fn send_mem_table(&mut self) {
        let region = self.mem.find_region(GuestAddress(0)).unwrap();
        let info = VhostUserMemoryRegionInfo::from_guest_region(region).unwrap();
        self.frontend.set_mem_table(&[info]).unwrap();
    }

    /// Hands queue `q`'s rings, as they are set in `self.queues`, to the device, empty.
    fn start_queue(&mut self, q: usize) {
        let rings = self.queues[q].rings;
        // Zeroed where they are in guest memory: the device reads the used index at SET_VRING_ADDR.
        let parts = [
            (rings.desc, 16 * QUEUE_SIZE as u64),
            (rings.avail, 6 + 2 * QUEUE_SIZE as u64),
            (rings.used, 6 + 8 * QUEUE_SIZE as u64),
        ];
        for (at, len) in parts {
            let len = len.min(MEM_SIZE.saturating_sub(at.0));
            self.mem.write_slice(&vec![0u8; len as usize], at).unwrap();
        }
        let queue = &mut self.queues[q];
        queue.next_avail = 0;
        queue.last_used = 0;
        queue.next_desc = 0;
        self.set_up_queue(q, 0);
    }

    /// Gives queue `q` to the device as it is in guest memory, the device to take its next
    /// request from available entry `base`.
    fn set_up_queue(&mut self, q: usize, base: u16) {
        let rings = self.queues[q].rings;
        let hva = |gpa: GuestAddress| self.host_base + gpa.0;
        self.frontend.set_vring_num(q, QUEUE_SIZE).unwrap();
        self.frontend
            .set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: QUEUE_SIZE,
                    queue_size: QUEUE_SIZE,
                    flags: 0,
                    desc_table_addr: hva(rings.desc),
                    used_ring_addr: hva(rings.used),
                    avail_ring_addr: hva(rings.avail),
                    log_addr: None,
                },
            )
            .unwrap();
        self.frontend.set_vring_base(q, base).unwrap();
        let queue = &self.queues[q];
        self.frontend.set_vring_call(q, &queue.call).unwrap();
        self.frontend.set_vring_kick(q, &queue.kick).unwrap();
        if self.multiqueue || q == 0 {
            self.frontend.set_vring_enable(q, true).unwrap();
        }
    }

    /// Connects again, as QEMU does to a restarted backend (`reconnect=1`): same memory, rings
    /// as they are, every queue's next available entry set to `base` (QEMU sends what it
    /// restored, which need not match the ring).
    pub fn reconnect(&mut self, socket: &Path, base: u16) {
        self.try_reconnect(socket, base).unwrap();
    }

    /// `reconnect`, failing if the device refuses the inflight region.
    pub fn try_reconnect(&mut self, socket: &Path, base: u16) -> vhost::Result<()> {
        let event_idx = self.event_idx();
        // The old connection goes first: the device serves one frontend at a time.
        let (placeholder, _) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(std::mem::replace(&mut self.frontend, Frontend::from_stream(placeholder, self.queues.len() as u64)));
        (self.frontend, self.features, _) = handshake(socket, self.queues.len(), event_idx);
        self.send_mem_table();
        if let Some((inflight, file)) = &self.inflight {
            self.frontend.set_inflight_fd(inflight, std::os::fd::AsRawFd::as_raw_fd(file))?;
        }
        for q in 0..self.queues.len() {
            self.set_up_queue(q, base);
        }
        Ok(())
    }

    /// Queue `q`'s used index as the device last published it.
    pub fn used_idx(&self, q: usize) -> u16 {
        self.mem.read_obj(GuestAddress(self.queues[q].used().0 + 2)).unwrap()
    }

    /// Resets queue `q` as a driver does after a device error: the device gives the ring back
    /// (GET_VRING_BASE), then gets it again, empty, at `rings`.
    pub fn reset_queue(&mut self, q: usize, rings: Rings) {
        self.frontend.get_vring_base(q).unwrap();
        self.queues[q].rings = rings;
        self.start_queue(q);
    }

    /// Moves the available index `by` entries on, as if that many chains had been made
    /// available, and kicks.
    pub fn advance_avail_idx(&mut self, q: usize, by: u16) {
        let queue = &mut self.queues[q];
        queue.next_avail = queue.next_avail.wrapping_add(by);
        self.mem.write_obj(queue.next_avail, GuestAddress(queue.avail().0 + 2)).unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        queue.kick.write(1).unwrap();
    }

    pub fn event_idx(&self) -> bool {
        self.features & VIRTIO_RING_F_EVENT_IDX != 0
    }

    /// Writes descriptors as one chain (NEXT links added between them) starting at a fresh slot.
    /// Returns the head index.
    pub fn place_chain(&mut self, q: usize, descs: &[D]) -> u16 {
        let queue = &mut self.queues[q];
        let head = queue.next_desc;
        for (i, desc) in descs.iter().enumerate() {
            let index = (head as usize + i) % QUEUE_SIZE as usize;
            let next = ((head as usize + i + 1) % QUEUE_SIZE as usize) as u16;
            let flags = desc.flags | if i + 1 < descs.len() { F_NEXT } else { 0 };
            self.write_desc(q, index as u16, desc.addr, desc.len, flags, next);
        }
        let queue = &mut self.queues[q];
        queue.next_desc = ((head as usize + descs.len()) % QUEUE_SIZE as usize) as u16;
        head
    }

    pub fn write_desc(&self, q: usize, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(self.queues[q].desc_table().0 + 16 * index as u64);
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&raw, at).unwrap();
    }

    /// Makes `head` available; `kick` says whether to notify the device now.
    pub fn make_available(&mut self, q: usize, head: u16, kick: bool) {
        let queue = &mut self.queues[q];
        let slot = GuestAddress(queue.avail().0 + 4 + 2 * (queue.next_avail % QUEUE_SIZE) as u64);
        self.mem.write_obj(head, slot).unwrap();
        queue.next_avail = queue.next_avail.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem.write_obj(queue.next_avail, GuestAddress(queue.avail().0 + 2)).unwrap();
        // used_event: signal us as soon as anything past what we have seen is used.
        let used_event = GuestAddress(queue.avail().0 + 4 + 2 * QUEUE_SIZE as u64);
        self.mem.write_obj(queue.last_used, used_event).unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        if kick {
            queue.kick.write(1).unwrap();
        }
    }

    pub fn kick(&self, q: usize) {
        self.queues[q].kick.write(1).unwrap();
    }

    /// Waits for `count` used entries on queue `q`. Like a real driver, it collects what is in
    /// the used ring, publishes `used_event`, checks the ring once more (entries added before
    /// the device could see the new `used_event` are not signalled), and only then waits for
    /// an interrupt; an interrupt that never comes is a failure. Returns (head, used length).
    pub fn wait_used(&mut self, q: usize, count: usize) -> Vec<(u16, u32)> {
        let mut got = Vec::new();
        loop {
            let before = got.len();
            self.collect_used(q, &mut got);
            let queue = &self.queues[q];
            let used_event = GuestAddress(queue.avail().0 + 4 + 2 * QUEUE_SIZE as u64);
            self.mem.write_obj(queue.last_used, used_event).unwrap();
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            self.collect_used(q, &mut got);
            if got.len() >= count {
                return got;
            }
            if got.len() > before {
                continue;
            }
            let interrupted = self.take_interrupt(q, std::time::Duration::from_secs(20));
            assert!(interrupted, "no interrupt within 20 s ({} of {count} completions seen)", got.len());
        }
    }

    /// Waits up to `timeout` for an interrupt of queue `q` (its call eventfd) and consumes it.
    pub fn take_interrupt(&self, q: usize, timeout: std::time::Duration) -> bool {
        let fd = std::os::unix::io::AsRawFd::as_raw_fd(&self.queues[q].call);
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
        let _ = self.queues[q].call.read();
        ready == 1
    }

    /// Moves the used ring's new entries into `got`.
    fn collect_used(&mut self, q: usize, got: &mut Vec<(u16, u32)>) {
        let used_idx: u16 = self.mem.read_obj(GuestAddress(self.queues[q].used().0 + 2)).unwrap();
        while self.queues[q].last_used != used_idx {
            let queue = &mut self.queues[q];
            let slot = GuestAddress(queue.used().0 + 4 + 8 * (queue.last_used % QUEUE_SIZE) as u64);
            let id: u32 = self.mem.read_obj(slot).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(slot.0 + 4)).unwrap();
            got.push((id as u16, len));
            queue.last_used = queue.last_used.wrapping_add(1);
        }
    }
}
