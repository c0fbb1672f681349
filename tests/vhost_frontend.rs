//! `rewind serve` driven by a hand-built VMM over the real socket: every request type,
//! multiqueue, EVENT_IDX on and off, indirect descriptors, every kind of malformed request
//! (each completes with IOERR, or with no status when there is nowhere to put one, and the
//! device goes on serving), impossible ring states (the queue is broken until the driver
//! resets it; the other queue, the control socket and SIGTERM keep working), a flood of bad
//! requests against the log's rate limit, config space and cache mode, and
//! disconnect/reconnect.

mod common;

#[path = "common/vmm.rs"]
mod vmm;

use common::{rewind_bin, status_json, Daemon};
use rewind::control::replies::Status;
use rewind::control::AgentCommand;
use vm_memory::{Bytes, GuestAddress};
use vmm::{d, Rings, Vmm, D, DATA, F_INDIRECT, F_NEXT, F_WRITE, MEM_SIZE, QUEUE_SIZE};

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
    assert_eq!(snapshot["data-bytes"], 4096);
}

/// Writes `data` at `sector` through queue `q` and reads it back there.
fn write_and_read_on(vmm: &mut Vmm, q: usize, sector: u64, data: &[u8]) -> Vec<u8> {
    vmm.mem.write_slice(data, GuestAddress(BUF)).unwrap();
    let write = [header(vmm, HDR, T_OUT, sector), d(BUF, data.len() as u32, 0), status_desc(vmm, STATUS)];
    assert_eq!(run(vmm, q, &write, STATUS), (S_OK, 1), "write on queue {q}");
    let read = [header(vmm, HDR, T_IN, sector), d(BUF + 0x8000, data.len() as u32, F_WRITE), status_desc(vmm, STATUS)];
    assert_eq!(run(vmm, q, &read, STATUS), (S_OK, data.len() as u32 + 1), "read on queue {q}");
    let mut out = vec![0u8; data.len()];
    vmm.mem.read_slice(&mut out, GuestAddress(BUF + 0x8000)).unwrap();
    out
}

/// Waits until the log holds `count` lines containing `needle`; returns the log.
fn wait_for_log(log: &std::path::Path, needle: &str, count: usize) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(log).unwrap();
        if text.matches(needle).count() >= count {
            return text;
        }
        assert!(std::time::Instant::now() < deadline, "no {count} x {needle:?} in the log:\n{text}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn impossible_ring_states_break_one_queue_until_the_driver_resets_it() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    let log = dir.path().join("daemon.log");
    let args = ["--size", "8M", "--num-queues", "2", "--control", control.to_str().unwrap()];
    let daemon =
        Daemon::start_logging_to(&dir.path().join("disk.img"), &dir.path().join("vhost.sock"), &args, "info", &log);
    let mut vmm = Vmm::connect(&daemon.socket, 2, true);
    let mut qmp = rewind::qmp_client::QmpClient::connect(&control).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = common::Rng(0x5eed);
    let mut check_io = |vmm: &mut Vmm, q: usize| {
        let sector = rng.next() % (SIZE / 512 - 8);
        let data = rng.bytes(4096);
        model[sector as usize * 512..][..4096].copy_from_slice(&data);
        assert!(write_and_read_on(vmm, q, sector, &data) == data, "queue {q} at sector {sector}");
        assert!(read_back(vmm, 0, SIZE as u32 / 8) == model[..SIZE as usize / 8], "queue 0 against the model");
    };

    let hdr = HDR + 0x100;
    type Fault<'a> = (&'a str, &'a dyn Fn(&mut Vmm));
    let faults: [Fault; 5] = [
        ("the available index 257 entries ahead", &|vmm| vmm.advance_avail_idx(1, QUEUE_SIZE + 1)),
        ("a head outside the table", &|vmm| vmm.make_available(1, QUEUE_SIZE + 3, true)),
        ("a chain that loops", &|vmm| {
            vmm.write_desc(1, 10, hdr, 16, F_NEXT, 11);
            vmm.write_desc(1, 11, BUF, 512, F_WRITE | F_NEXT, 10);
            vmm.make_available(1, 10, true);
        }),
        ("a chain that leaves the table", &|vmm| {
            vmm.write_desc(1, 10, hdr, 16, F_NEXT, 4000);
            vmm.make_available(1, 10, true);
        }),
        ("an available ring that ends outside guest memory", &|vmm| {
            vmm.reset_queue(1, Rings { avail: GuestAddress(MEM_SIZE - 0x100), ..Rings::standard(1) });
            vmm.kick(1);
        }),
    ];
    for (n, (what, fault)) in faults.iter().enumerate() {
        header(&vmm, hdr, T_IN, 0);
        check_io(&mut vmm, 1);
        fault(&mut vmm);
        wait_for_log(&log, "queue 1 is broken", n + 1);

        // A guest that keeps kicking the broken queue costs the host next to nothing.
        let cpu_before = daemon.cpu_time();
        for _ in 0..100 {
            vmm.kick(1);
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let cpu = daemon.cpu_time() - cpu_before;
        assert!(cpu < std::time::Duration::from_millis(300), "{what}: {cpu:?} of CPU in a second of kicks");

        check_io(&mut vmm, 0);
        let status: Status = qmp.execute(AgentCommand::QueryStatus).unwrap();
        assert_eq!(status.counters.broken_queues, 1, "{what}: {status:?}");
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(text.matches("queue 1 is broken").count(), n + 1, "{what}: logged once\n{text}");

        vmm.reset_queue(1, Rings::standard(1));
        check_io(&mut vmm, 1);
        let status: Status = qmp.execute(AgentCommand::QueryStatus).unwrap();
        assert_eq!(status.counters.broken_queues, 0, "{what}: mended by the reset: {status:?}");
    }

    // SIGTERM while a queue is broken and the frontend still connected.
    vmm.advance_avail_idx(1, 1000);
    wait_for_log(&log, "queue 1 is broken", faults.len() + 1);
    assert!(daemon.terminate_within(std::time::Duration::from_secs(10)).success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.len() < 16 << 10, "the log stays small: {} bytes\n{text}", text.len());
    assert!(!text.contains("Iterator error"), "the virtio crate's own error is not reached:\n{text}");
}

#[test]
fn a_million_malformed_requests_leave_a_log_of_bounded_size() {
    const TOTAL: usize = 1_000_000;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("daemon.log");
    let daemon = Daemon::start_logging_to(
        &dir.path().join("disk.img"),
        &dir.path().join("vhost.sock"),
        &["--size", "8M"],
        "warn",
        &log,
    );
    let mut vmm = Vmm::connect(&daemon.socket, 1, true);
    // A read with no data buffer: refused with IOERR. One chain per two table slots.
    let chain = [header(&vmm, HDR, T_IN, 0), status_desc(&vmm, STATUS)];
    let heads: Vec<u16> = (0..QUEUE_SIZE / 2).map(|_| vmm.place_chain(0, &chain)).collect();
    let started = std::time::Instant::now();
    let mut done = 0;
    while done < TOTAL {
        let round = heads.len().min(TOTAL - done);
        for (i, &head) in heads[..round].iter().enumerate() {
            vmm.make_available(0, head, i + 1 == round);
        }
        assert_eq!(vmm.wait_used(0, round).len(), round);
        done += round;
    }
    assert_eq!(vmm.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_IOERR);
    let elapsed = started.elapsed().as_secs_f64();
    drop(vmm);
    assert!(daemon.terminate().success());

    let text = std::fs::read_to_string(&log).unwrap();
    let printed = text.matches("refused a request").count();
    let suppressed: usize = text
        .lines()
        .filter_map(|line| line.split("suppressed ").nth(1))
        .map(|rest| rest.split(' ').next().unwrap().parse::<usize>().unwrap())
        .sum();
    assert_eq!(printed + suppressed, TOTAL, "every refusal is printed or counted\n{text}");
    // A few lines a second for the one thread that refuses them, and a summary a second.
    let bound = 10.0 * (elapsed + 2.0);
    assert!((text.lines().count() as f64) < bound, "{} lines in {elapsed:.1}s\n{text}", text.lines().count());
}

#[test]
fn a_restarted_daemon_resumes_the_ring_or_breaks_the_queue_whatever_base_it_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let socket = dir.path().join("vhost.sock");
    let log = dir.path().join("daemon.log");
    let daemon = Daemon::start_logging_to(&image, &socket, &["--size", "8M"], "info", &log);
    let mut vmm = Vmm::connect(&daemon.socket, 1, true);
    let first = fill(&vmm, BUF + 0x10000, 1, 4096);
    assert!(write_and_read_on(&mut vmm, 0, 8, &first) == first);
    assert!(daemon.terminate().success());

    // Two writes made available while no daemon runs; the restarted one is told to start at
    // the entry after the last completed one, as QEMU restores it from the used index.
    let daemon = Daemon::start_logging_to(&image, &socket, &["--size", "8M"], "info", &log);
    let pending: Vec<(u64, Vec<u8>)> = (0..2u64)
        .map(|i| {
            let data = fill(&vmm, BUF + i * 4096, 10 + i as u8, 4096);
            let descs = [
                header(&vmm, HDR + i * 16, T_OUT, 16 + i * 8),
                d(BUF + i * 4096, 4096, 0),
                status_desc(&vmm, STATUS + i),
            ];
            let head = vmm.place_chain(0, &descs);
            vmm.make_available(0, head, false);
            (16 + i * 8, data)
        })
        .collect();
    vmm.reconnect(&socket, 2);
    vmm.kick(0);
    assert_eq!(vmm.wait_used(0, 2).len(), 2);
    for (sector, data) in &pending {
        assert!(read_back(&mut vmm, *sector, 4096) == *data, "sector {sector}");
    }
    assert!(read_back(&mut vmm, 8, 4096) == first);
    assert!(daemon.terminate().success());

    // A base far behind the available index: the queue is broken, said once, and costs nothing.
    let daemon = Daemon::start_logging_to(&image, &socket, &["--size", "8M"], "info", &log);
    vmm.reconnect(&socket, 7u16.wrapping_sub(QUEUE_SIZE + 100));
    vmm.kick(0);
    wait_for_log(&log, "queue 0 is broken", 1);
    let cpu_before = daemon.cpu_time();
    for _ in 0..50 {
        vmm.kick(0);
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let cpu = daemon.cpu_time() - cpu_before;
    assert!(cpu < std::time::Duration::from_millis(200), "{cpu:?} of CPU in half a second of kicks");
    assert!(daemon.terminate_within(std::time::Duration::from_secs(10)).success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("queue 0 is broken").count(), 1, "{text}");
}

/// A backend killed between putting completions on the used ring and signalling them leaves a
/// driver that is never told: with EVENT_IDX the next backend's completions do not signal it
/// either, its `used_event` lying behind them. A queue that starts signals the driver once, so
/// that it looks at its used ring again.
#[test]
fn a_started_queue_signals_the_driver_once_for_what_a_previous_backend_left_unsignalled() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, _) = start(dir.path(), &[]);
    let mut vmm = Vmm::connect(&daemon.socket, 1, true);
    let data = fill(&vmm, BUF, 3, 4096);
    assert!(write_and_read_on(&mut vmm, 0, 8, &data) == data);
    daemon.kill();
    while vmm.take_interrupt(0, std::time::Duration::ZERO) {}

    let (daemon, _) = start(dir.path(), &[]);
    vmm.reconnect(&daemon.socket, vmm.used_idx(0));
    assert!(vmm.take_interrupt(0, std::time::Duration::from_secs(20)), "the restarted queue did not signal");
    assert!(read_back(&mut vmm, 8, 4096) == data);
    assert!(daemon.terminate().success());
}

/// Flags queue 0's chain `head` in an inflight region as taken and not completed, with
/// `counter` (the region's layout: docs/virtio.md, "Restarts"), as a backend that died would
/// leave it.
fn flag_in_flight(region: &std::fs::File, head: u16, counter: u64) {
    use std::os::unix::fs::FileExt;
    let entry = 16 + 16 * u64::from(head);
    region.write_all_at(&counter.to_le_bytes(), entry + 8).unwrap();
    region.write_all_at(&[1], entry).unwrap();
}

/// Where `start_tracked` puts the disk, the vhost socket and the daemon's log.
fn tracked_paths(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    (dir.join("disk.img"), dir.join("vhost.sock"), dir.join("daemon.log"))
}

/// A daemon on a new 8 MiB disk in `dir` and a test VMM with an inflight region, after one
/// 4 KiB write at sector 8 (its data returned) has completed.
fn start_tracked(dir: &std::path::Path) -> (Daemon, Vmm, Vec<u8>) {
    let (image, socket, log) = tracked_paths(dir);
    let daemon = Daemon::start_logging_to(&image, &socket, &["--size", "8M"], "info", &log);
    let mut vmm = Vmm::connect_with(&daemon.socket, 1, true, true);
    let first = fill(&vmm, BUF + 0x10000, 1, 4096);
    assert!(write_and_read_on(&mut vmm, 0, 8, &first) == first);
    (daemon, vmm, first)
}

fn verify_offline(image: &std::path::Path) {
    let out = std::process::Command::new(rewind_bin()).arg("verify").arg(image).output().unwrap();
    assert!(out.status.success(), "rewind verify: {}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn requests_a_backend_left_in_flight_run_again_in_the_order_it_took_them_before_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, mut vmm, first) = start_tracked(dir.path());
    let (image, socket, log) = tracked_paths(dir.path());
    assert!(daemon.terminate().success());

    // Two writes of one sector that a backend took off the ring, the second one first, and
    // died before completing either: the last one it took decides the sector.
    let used = vmm.used_idx(0);
    let chains: Vec<(u16, Vec<u8>)> = (0..2u64)
        .map(|i| {
            let data = fill(&vmm, BUF + i * 4096, 20 + i as u8, 4096);
            let descs =
                [header(&vmm, HDR + i * 16, T_OUT, 16), d(BUF + i * 4096, 4096, 0), status_desc(&vmm, STATUS + i)];
            let head = vmm.place_chain(0, &descs);
            vmm.make_available(0, head, false);
            (head, data)
        })
        .collect();
    let region = vmm.inflight.as_ref().unwrap().1.try_clone().unwrap();
    flag_in_flight(&region, chains[1].0, 4);
    flag_in_flight(&region, chains[0].0, 9);

    // QEMU restores the ring's base to the used index; the region says two more were taken.
    let control = dir.path().join("control.sock");
    let args = ["--size", "8M", "--control", control.to_str().unwrap()];
    let daemon = Daemon::start_logging_to(&image, &socket, &args, "info", &log);
    vmm.reconnect(&socket, used);
    let done = vmm.wait_used(0, 2);
    let mut heads: Vec<u16> = done.iter().map(|&(head, _)| head).collect();
    heads.sort_unstable();
    let mut expected: Vec<u16> = chains.iter().map(|&(head, _)| head).collect();
    expected.sort_unstable();
    assert_eq!(heads, expected);
    for i in 0..2 {
        assert_eq!(vmm.mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(), S_OK);
    }
    assert!(read_back(&mut vmm, 16, 4096) == chains[0].1, "resubmitted out of order");
    // New requests come from the ring after the resubmitted ones.
    let next = fill(&vmm, BUF + 0x20000, 3, 4096);
    assert!(write_and_read_on(&mut vmm, 0, 24, &next) == next);
    assert!(read_back(&mut vmm, 8, 4096) == first);
    wait_for_log(&log, "resubmitting 2 request(s)", 1);
    let mut qmp = rewind::qmp_client::QmpClient::connect(&control).unwrap();
    let status: Status = qmp.execute(AgentCommand::QueryStatus).unwrap();
    assert_eq!(status.counters.resubmitted, 2, "{status:?}");
    assert!(daemon.terminate().success());
    verify_offline(&image);
}

#[test]
fn a_bad_inflight_region_is_refused_with_its_reason_and_the_daemon_goes_on() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let (daemon, mut vmm, first) = start_tracked(dir.path());
    let (image, socket, log) = tracked_paths(dir.path());
    let region = vmm.inflight.as_ref().unwrap().1.try_clone().unwrap();
    let used = vmm.used_idx(0);

    // A version no backend writes, then an entry flag that is neither 0 nor 1.
    region.write_all_at(&7u16.to_le_bytes(), 8).unwrap();
    assert!(vmm.try_reconnect(&socket, used).is_err());
    wait_for_log(&log, "inflight version is 7", 1);
    region.write_all_at(&1u16.to_le_bytes(), 8).unwrap();
    region.write_all_at(&[5], 16 + 16 * 3).unwrap();
    assert!(vmm.try_reconnect(&socket, used).is_err());
    wait_for_log(&log, "entry 3 has the flag 5", 1);

    // A good region again: the same daemon serves, and nothing was lost.
    region.write_all_at(&[0], 16 + 16 * 3).unwrap();
    vmm.reconnect(&socket, used);
    assert!(read_back(&mut vmm, 8, 4096) == first);
    let next = fill(&vmm, BUF + 0x20000, 2, 4096);
    assert!(write_and_read_on(&mut vmm, 0, 16, &next) == next);
    assert!(daemon.terminate().success());
    verify_offline(&image);
}

#[test]
fn writes_in_flight_when_the_daemon_is_killed_complete_after_the_restart() {
    // Three descriptors a write: the burst fits the 256-entry table without reusing a slot.
    const WRITES: u64 = 64;
    let dir = tempfile::tempdir().unwrap();
    let (mut daemon, mut vmm, _) = start_tracked(dir.path());
    let (image, socket, log) = tracked_paths(dir.path());
    for round in 0..12u64 {
        // A burst of writes to distinct sectors (with a flush among them), the daemon killed
        // at once, a new one started: every request completes once it is back, OK, and the
        // disk holds every write.
        let mut expected = Vec::new();
        for i in 0..WRITES {
            let at = BUF + i * 4096;
            let data = fill(&vmm, at, (round * WRITES + i) as u8, 4096);
            let sector = 8 * (i + 1);
            let descs = if i == WRITES / 2 {
                vec![header(&vmm, HDR + i * 16, T_FLUSH, 0), status_desc(&vmm, STATUS + i)]
            } else {
                expected.push((sector, data));
                vec![header(&vmm, HDR + i * 16, T_OUT, sector), d(at, 4096, 0), status_desc(&vmm, STATUS + i)]
            };
            let head = vmm.place_chain(0, &descs);
            vmm.make_available(0, head, i + 1 == WRITES);
        }
        std::thread::sleep(std::time::Duration::from_micros(200 * round));
        daemon.kill();
        daemon = Daemon::start_logging_to(&image, &socket, &["--size", "8M"], "info", &log);
        vmm.reconnect(&socket, vmm.used_idx(0));
        vmm.kick(0);
        // Each request completes exactly once: a request completed before the kill and run
        // again would show up twice, and the driver would complete a freed request.
        let mut heads: Vec<u16> = vmm.wait_used(0, WRITES as usize).iter().map(|&(head, _)| head).collect();
        heads.sort_unstable();
        heads.dedup();
        assert_eq!(heads.len(), WRITES as usize, "round {round}: a request completed twice");
        for i in 0..WRITES {
            assert_eq!(vmm.mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(), S_OK, "round {round}, request {i}");
        }
        for (sector, data) in &expected {
            assert!(read_back(&mut vmm, *sector, 4096) == *data, "round {round}, sector {sector}");
        }
    }
    assert!(daemon.terminate().success());
    verify_offline(&image);
    let text = std::fs::read_to_string(&log).unwrap();
    eprintln!("{} of 12 restarts resubmitted requests", text.matches("resubmitting").count());
}
