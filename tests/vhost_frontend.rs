//! `rewind serve` driven by a hand-built VMM over the real socket: every request type,
//! multiqueue, EVENT_IDX on and off, indirect descriptors, every kind of malformed chain (each
//! completes with IOERR, or with no status when there is nowhere to put one, and the device
//! goes on serving), config space and cache mode, and disconnect/reconnect.

mod common;

#[path = "common/vmm.rs"]
mod vmm;

use common::{rewind_bin, status_json, Daemon};
use vm_memory::{Bytes, GuestAddress};
use vmm::{d, Vmm, D, DATA, F_INDIRECT, F_WRITE, MEM_SIZE};

const SIZE: u64 = 8 << 20;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const T_MARKER_ADD: u32 = 0x5257_0001;
const T_MARKER_GET: u32 = 0x5257_0002;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

const HDR: u64 = DATA;
const STATUS: u64 = DATA + 0x1000;
const BUF: u64 = DATA + 0x10000;

fn header(vmm: &Vmm, at: u64, request_type: u32, sector: u64) -> D {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&request_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    vmm.mem.write_slice(&h, GuestAddress(at)).unwrap();
    d(at, 16, 0)
}

fn status_desc(vmm: &Vmm, at: u64) -> D {
    vmm.mem.write_obj(0xffu8, GuestAddress(at)).unwrap();
    d(at, 1, F_WRITE)
}

/// Runs one chain to completion on queue `q`; returns (status byte, used length).
fn run(vmm: &mut Vmm, q: usize, descs: &[D], status_at: u64) -> (u8, u32) {
    let head = vmm.place_chain(q, descs);
    vmm.make_available(q, head, true);
    let used = vmm.wait_used(q, 1);
    assert_eq!(used[0].0, head);
    (vmm.mem.read_obj(GuestAddress(status_at)).unwrap(), used[0].1)
}

fn simple(vmm: &mut Vmm, request_type: u32, sector: u64, data: Option<D>) -> (u8, u32) {
    let mut descs = vec![header(vmm, HDR, request_type, sector)];
    descs.extend(data);
    descs.push(status_desc(vmm, STATUS));
    run(vmm, 0, &descs, STATUS)
}

fn fill(vmm: &Vmm, at: u64, seed: u8, len: usize) -> Vec<u8> {
    let bytes: Vec<u8> = (0..len).map(|i| seed.wrapping_mul(31).wrapping_add(i as u8 ^ (i >> 8) as u8)).collect();
    vmm.mem.write_slice(&bytes, GuestAddress(at)).unwrap();
    bytes
}

fn read_back(vmm: &mut Vmm, sector: u64, len: u32) -> Vec<u8> {
    let (status, used) = simple(vmm, T_IN, sector, Some(d(BUF, len, F_WRITE)));
    assert_eq!((status, used), (S_OK, len + 1));
    let mut out = vec![0u8; len as usize];
    vmm.mem.read_slice(&mut out, GuestAddress(BUF)).unwrap();
    out
}

fn start(dir: &std::path::Path, extra: &[&str]) -> (Daemon, std::path::PathBuf) {
    let image = dir.join("disk.img");
    let socket = dir.join("vhost.sock");
    let mut args = vec!["--size", "8M", "--serial", "rewind-test-serial"];
    args.extend_from_slice(extra);
    (Daemon::start(&image, &socket, &args), image)
}

#[test]
fn every_request_type() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, image) = start(dir.path(), &[]);
    let mut vmm = Vmm::connect(&daemon.socket, 1, true);

    let written = fill(&vmm, BUF, 7, 8192);
    assert_eq!(simple(&mut vmm, T_OUT, 16, Some(d(BUF, 8192, 0))), (S_OK, 1));
    assert!(read_back(&mut vmm, 16, 8192) == written);

    assert_eq!(simple(&mut vmm, T_FLUSH, 0, None), (S_OK, 1));

    let (status, used) = simple(&mut vmm, T_GET_ID, 0, Some(d(BUF, 20, F_WRITE)));
    assert_eq!((status, used), (S_OK, 21));
    let mut id = [0u8; 20];
    vmm.mem.read_slice(&mut id, GuestAddress(BUF)).unwrap();
    assert_eq!(&id[..18], b"rewind-test-serial");

    // Discard and write-zeroes (with UNMAP) read back as zeroes.
    let segment = |vmm: &Vmm, sector: u64, sectors: u32, flags: u32| {
        let mut seg = [0u8; 16];
        seg[0..8].copy_from_slice(&sector.to_le_bytes());
        seg[8..12].copy_from_slice(&sectors.to_le_bytes());
        seg[12..16].copy_from_slice(&flags.to_le_bytes());
        vmm.mem.write_slice(&seg, GuestAddress(BUF + 0x8000)).unwrap();
        d(BUF + 0x8000, 16, 0)
    };
    let seg = segment(&vmm, 16, 4, 0);
    assert_eq!(simple(&mut vmm, T_DISCARD, 0, Some(seg)), (S_OK, 1));
    let seg = segment(&vmm, 20, 4, 1);
    assert_eq!(simple(&mut vmm, T_WRITE_ZEROES, 0, Some(seg)), (S_OK, 1));
    let back = read_back(&mut vmm, 16, 8192);
    assert!(back[..4096].iter().all(|&b| b == 0));
    assert!(back[4096..] == written[4096..]);

    // Guest markers: add, then read back by name and as the newest.
    vmm.mem.write_slice(b"before-upgrade", GuestAddress(BUF + 0x9000)).unwrap();
    assert_eq!(simple(&mut vmm, T_MARKER_ADD, 0, Some(d(BUF + 0x9000, 14, 0))), (S_OK, 1));
    let descs =
        [header(&vmm, HDR, T_MARKER_GET, 0), d(BUF + 0x9000, 14, 0), d(BUF, 256, F_WRITE), status_desc(&vmm, STATUS)];
    let (status, used) = run(&mut vmm, 0, &descs, STATUS);
    assert_eq!((status, used), (S_OK, 26 + 14 + 1));
    let mut reply = [0u8; 40];
    vmm.mem.read_slice(&mut reply, GuestAddress(BUF)).unwrap();
    let id = u64::from_le_bytes(reply[0..8].try_into().unwrap());
    let seq = u64::from_le_bytes(reply[8..16].try_into().unwrap());
    assert_eq!((id, seq), (1, 4), "marker id and seq (after 3 writes)");
    assert_eq!(reply[24], 1, "source guest");
    assert_eq!(&reply[26..40], b"before-upgrade");
    assert_eq!(simple(&mut vmm, T_MARKER_GET, 0, Some(d(BUF + 0x100, 64, F_WRITE))), (S_OK, 26 + 14 + 1));
    // A duplicate name and an unknown one are errors; an unknown type is UNSUPP.
    assert_eq!(simple(&mut vmm, T_MARKER_ADD, 0, Some(d(BUF + 0x9000, 14, 0))).0, S_IOERR);
    vmm.mem.write_slice(b"nope", GuestAddress(BUF + 0x9000)).unwrap();
    let descs =
        [header(&vmm, HDR, T_MARKER_GET, 0), d(BUF + 0x9000, 4, 0), d(BUF, 256, F_WRITE), status_desc(&vmm, STATUS)];
    assert_eq!(run(&mut vmm, 0, &descs, STATUS).0, S_IOERR);
    assert_eq!(simple(&mut vmm, 77, 0, None), (S_UNSUPP, 1));

    drop(vmm);
    assert!(daemon.terminate().success());
    let out = std::process::Command::new(rewind_bin()).args(["marker", "list", "--json"]).arg(&image).output().unwrap();
    let markers: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(markers[0]["name"], "before-upgrade");
    assert_eq!(markers[0]["source"], "guest");
    assert_eq!(status_json(&image)["head"], 4);
}

#[test]
fn malformed_chains_fail_and_the_device_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, _) = start(dir.path(), &[]);
    let mut vmm = Vmm::connect(&daemon.socket, 1, true);

    // Each case has its own header: they are all written before the first is submitted.
    let case_header = |n: u64| HDR + n * 0x20;
    let cases: Vec<(&str, Vec<D>, Option<u8>)> = vec![
        (
            "wrong direction",
            vec![header(&vmm, case_header(1), T_IN, 0), d(BUF, 512, 0), status_desc(&vmm, STATUS)],
            Some(S_IOERR),
        ),
        (
            "sector past the end",
            vec![header(&vmm, case_header(2), T_IN, SIZE / 512), d(BUF, 512, F_WRITE), status_desc(&vmm, STATUS)],
            Some(S_IOERR),
        ),
        (
            "zero length",
            vec![header(&vmm, case_header(3), T_OUT, 0), d(BUF, 0, 0), status_desc(&vmm, STATUS)],
            Some(S_IOERR),
        ),
        (
            "not a multiple of 512",
            vec![header(&vmm, case_header(4), T_OUT, 0), d(BUF, 100, 0), status_desc(&vmm, STATUS)],
            Some(S_IOERR),
        ),
        (
            "buffer outside guest memory",
            vec![header(&vmm, case_header(5), T_IN, 0), d(MEM_SIZE - 256, 512, F_WRITE), status_desc(&vmm, STATUS)],
            Some(S_IOERR),
        ),
        (
            "too many segments",
            {
                let mut v = vec![header(&vmm, case_header(6), T_IN, 0)];
                v.extend((0..127).map(|i| d(BUF + i * 512, 512, F_WRITE)));
                v.push(status_desc(&vmm, STATUS));
                v
            },
            Some(S_IOERR),
        ),
        ("read-only status", vec![header(&vmm, case_header(7), T_IN, 0), d(BUF, 512, F_WRITE), d(STATUS, 1, 0)], None),
        ("missing status", vec![header(&vmm, case_header(8), T_OUT, 0), d(BUF, 512, 0)], None),
        (
            "status outside guest memory",
            vec![header(&vmm, case_header(9), T_IN, 0), d(BUF, 512, F_WRITE), d(MEM_SIZE + 4096, 1, F_WRITE)],
            None,
        ),
    ];
    for (what, descs, expected) in cases {
        vmm.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let head = vmm.place_chain(0, &descs);
        vmm.make_available(0, head, true);
        let used = vmm.wait_used(0, 1);
        let status: u8 = vmm.mem.read_obj(GuestAddress(STATUS)).unwrap();
        match expected {
            Some(s) => assert_eq!((status, used[0].1), (s, 1), "{what}"),
            None => assert_eq!((status, used[0].1), (0xff, 0), "{what}: nothing should be written"),
        }
        // The device goes on serving.
        assert_eq!(simple(&mut vmm, T_FLUSH, 0, None), (S_OK, 1), "after {what}");
    }

    // A descriptor loop: the chain never ends; it must complete, not hang the queue.
    let h = header(&vmm, HDR, T_IN, 0);
    vmm.write_desc(0, 200, h.addr, h.len, vmm::F_NEXT, 201);
    vmm.write_desc(0, 201, BUF, 512, F_WRITE | vmm::F_NEXT, 200);
    vmm.make_available(0, 200, true);
    let used = vmm.wait_used(0, 1);
    assert_eq!(used[0], (200, 0), "a looping chain has no status to write");
    assert_eq!(simple(&mut vmm, T_FLUSH, 0, None), (S_OK, 1));
    drop(vmm);
    assert!(daemon.terminate().success());
}

#[test]
fn multiqueue_indirect_descriptors_and_event_idx_off() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, _) = start(dir.path(), &["--num-queues", "2"]);
    for event_idx in [true, false] {
        let mut vmm = Vmm::connect(&daemon.socket, 2, event_idx);
        assert_eq!(vmm.event_idx(), event_idx);
        // Several requests in flight on both queues, completed with interrupts.
        let mut expected = Vec::new();
        for q in 0..2 {
            let mut heads = Vec::new();
            for i in 0..8u64 {
                let slot = q as u64 * 8 + i;
                let data = fill(&vmm, BUF + slot * 4096, slot as u8 + 3, 4096);
                let descs = [
                    header(&vmm, HDR + slot * 16, T_OUT, slot * 8),
                    d(BUF + slot * 4096, 4096, 0),
                    status_desc(&vmm, STATUS + slot),
                ];
                let head = vmm.place_chain(q, &descs);
                vmm.make_available(q, head, false);
                heads.push(head);
                expected.push((slot, data));
            }
            vmm.kick(q);
            let mut used: Vec<u16> = vmm.wait_used(q, 8).into_iter().map(|u| u.0).collect();
            used.sort();
            heads.sort();
            assert_eq!(used, heads);
            for i in 0..8u64 {
                assert_eq!(vmm.mem.read_obj::<u8>(GuestAddress(STATUS + q as u64 * 8 + i)).unwrap(), S_OK);
            }
        }
        for (slot, data) in &expected {
            assert!(read_back(&mut vmm, slot * 8, 4096) == *data, "slot {slot}");
        }

        // An indirect table: header, two data buffers and status, behind one ring descriptor.
        let table = DATA + 0x20_0000;
        let write = fill(&vmm, BUF, 99, 1024);
        header(&vmm, HDR, T_OUT, 1000);
        status_desc(&vmm, STATUS);
        let entries = [(HDR, 16u32, 0u16), (BUF, 512, 0), (BUF + 512, 512, 0), (STATUS, 1, F_WRITE)];
        for (i, (addr, len, flags)) in entries.iter().enumerate() {
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            let next_flag = if i + 1 < entries.len() { vmm::F_NEXT } else { 0 };
            raw[12..14].copy_from_slice(&(flags | next_flag).to_le_bytes());
            raw[14..16].copy_from_slice(&(i as u16 + 1).to_le_bytes());
            vmm.mem.write_slice(&raw, GuestAddress(table + 16 * i as u64)).unwrap();
        }
        let (status, used) = run(&mut vmm, 1, &[d(table, 64, F_INDIRECT)], STATUS);
        assert_eq!((status, used), (S_OK, 1));
        assert!(read_back(&mut vmm, 1000, 1024) == write);
        drop(vmm);
    }
    assert!(daemon.terminate().success());
}

#[test]
fn config_space_cache_mode_and_reconnect() {
    use vhost::vhost_user::message::VhostUserConfigFlags;
    use vhost::vhost_user::VhostUserFrontend;
    let dir = tempfile::tempdir().unwrap();
    let (daemon, image) = start(dir.path(), &["--num-queues", "2"]);
    let mut vmm = Vmm::connect(&daemon.socket, 1, true);
    let (_, config) = vmm.frontend.get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60]).unwrap();
    assert_eq!(u64::from_le_bytes(config[0..8].try_into().unwrap()), SIZE / 512, "capacity");
    assert_eq!(config[32], 1, "write-back by default");
    assert_eq!(u16::from_le_bytes(config[34..36].try_into().unwrap()), 2, "num_queues");
    vmm.frontend.set_config(32, VhostUserConfigFlags::WRITABLE, &[0]).unwrap();
    let (_, config) = vmm.frontend.get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60]).unwrap();
    assert_eq!(config[32], 0, "the guest switched to write-through");
    // Write-through: the write is durable when it completes, even if the daemon dies next.
    let data = fill(&vmm, BUF, 5, 4096);
    assert_eq!(simple(&mut vmm, T_OUT, 64, Some(d(BUF, 4096, 0))), (S_OK, 1));
    drop(vmm);

    // The next frontend, on the same daemon, reads what the first wrote.
    let mut vmm = Vmm::connect(&daemon.socket, 1, true);
    assert!(read_back(&mut vmm, 64, 4096) == data);
    drop(vmm);
    daemon.kill();
    let (daemon, _) = start(dir.path(), &[]);
    let mut vmm = Vmm::connect(&daemon.socket, 1, true);
    assert!(read_back(&mut vmm, 64, 4096) == data, "a write-through write was lost by kill -9");
    drop(vmm);
    assert!(daemon.terminate().success());
    assert_eq!(status_json(&image)["head"], 1);
}

#[test]
fn read_only_disks_refuse_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, image) = start(dir.path(), &["--read-only"]);
    let mut vmm = Vmm::connect(&daemon.socket, 1, true);
    assert!(vmm.features & (1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_RO) != 0, "RO feature offered");
    fill(&vmm, BUF, 1, 4096);
    assert_eq!(simple(&mut vmm, T_OUT, 0, Some(d(BUF, 4096, 0))), (S_IOERR, 1));
    assert!(read_back(&mut vmm, 0, 4096).iter().all(|&b| b == 0));
    drop(vmm);
    assert!(daemon.terminate().success());
    assert_eq!(status_json(&image)["head"], 0);
}

#[test]
fn periodic_snapshots_are_taken_while_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, image) = start(dir.path(), &["--snapshot-every", "1s"]);
    let mut vmm = Vmm::connect(&daemon.socket, 1, true);
    fill(&vmm, BUF, 1, 4096);
    assert_eq!(simple(&mut vmm, T_OUT, 0, Some(d(BUF, 4096, 0))), (S_OK, 1));
    // Wait for the timer's snapshot to appear in the store (bounded).
    let snapshots = rewind::store::default_store_dir(&image).join("snapshots");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !std::fs::read_dir(&snapshots).unwrap().any(|e| e.unwrap().path().extension().is_some_and(|x| x == "delta")) {
        assert!(std::time::Instant::now() < deadline, "no periodic snapshot within 20 s");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    drop(vmm);
    assert!(daemon.terminate().success());
    let status = status_json(&image);
    let snapshot =
        status["snapshots"].as_array().unwrap().iter().find(|s| s["origin"] == "requested").cloned().unwrap();
    assert_eq!(snapshot["data_bytes"], 4096);
}
