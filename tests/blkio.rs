//! `rewind serve` driven by libblkio over a real vhost-user socket: random writes, reads,
//! discards and write-zeroes checked byte for byte against a model, on one and two queues;
//! every write is in the journal; FLUSH survives kill -9; the daemon serves the next frontend
//! after a disconnect and exits cleanly on SIGTERM.

mod common;

use common::{status_json, Client, Daemon, Rng};

const SIZE: u64 = 16 << 20;

fn run_mixed_io(client: &mut Client, model: &mut [u8], rng: &mut Rng, rounds: usize) -> u64 {
    let mut changes = 0;
    for _ in 0..rounds {
        let sectors = 1 + rng.next() % 128;
        let len = sectors * 512;
        let offset = (rng.next() % (SIZE / 512 - sectors)) * 512;
        match rng.next() % 10 {
            0 => {
                assert_eq!(client.discard(offset, len), 0);
                model[offset as usize..(offset + len) as usize].fill(0);
                changes += 1;
            }
            1 => {
                assert_eq!(client.write_zeroes(offset, len), 0);
                model[offset as usize..(offset + len) as usize].fill(0);
                changes += 1;
            }
            2..=5 => {
                let data = rng.bytes(len as usize);
                assert_eq!(client.write(offset, &data), 0);
                model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
                changes += 1;
            }
            _ => {
                let (ret, data) = client.read(offset, len as usize);
                assert_eq!(ret, 0);
                assert!(data == model[offset as usize..(offset + len) as usize], "read at {offset}+{len} differs");
            }
        }
    }
    changes
}

#[test]
fn random_io_matches_the_model_and_every_write_is_journaled() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let socket = dir.path().join("vhost.sock");
    let daemon = Daemon::start(&image, &socket, &["--size", "16M", "--num-queues", "2"]);
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = Rng(0x1234_5678);
    let mut client = Client::connect(&socket, 2);
    let mut changes = run_mixed_io(&mut client, &mut model, &mut rng, 400);
    assert_eq!(client.flush(), 0);

    // Out-of-range and misaligned requests are refused, and the device goes on serving.
    assert_ne!(client.write(SIZE, &[1u8; 512]), 0);
    let (ret, _) = client.read(SIZE - 512, 1024);
    assert_ne!(ret, 0);

    // The second queue, with several requests in flight at once.
    let data: Vec<Vec<u8>> = (0..16).map(|_| rng.bytes(4096)).collect();
    for (i, d) in data.iter().enumerate() {
        client.buffer(i * 4096, 4096).copy_from_slice(d);
        let ptr = (client.region.addr + i * 4096) as *const u8;
        client.queues[1].write(i as u64 * 8192, ptr, 4096, i, blkio::ReqFlags::empty());
    }
    let done = client.complete(1, 16);
    assert!(done.iter().all(|&(_, ret)| ret == 0), "{done:?}");
    for (i, d) in data.iter().enumerate() {
        model[i * 8192..i * 8192 + 4096].copy_from_slice(d);
    }
    changes += 16;
    // Many reads in flight at once on queue 0, overlapping those writes: the backend shares
    // such runs between two threads, and each must still read exactly the model's bytes.
    let region_blocks = 32;
    for i in 0..region_blocks {
        let ptr = (client.region.addr + i * 4096) as *mut u8;
        client.queues[0].read((i as u64 * 6144) % (SIZE - 4096), ptr, 4096, i, blkio::ReqFlags::empty());
    }
    let done = client.complete(0, region_blocks);
    assert!(done.iter().all(|&(_, ret)| ret == 0), "{done:?}");
    for i in 0..region_blocks {
        let offset = ((i as u64 * 6144) % (SIZE - 4096)) as usize;
        let got = client.buffer(i * 4096, 4096).to_vec();
        assert!(got == model[offset..offset + 4096], "concurrent read {i} at {offset} differs");
    }
    changes += run_mixed_io(&mut client, &mut model, &mut rng, 100);
    drop(client);

    let status = daemon.terminate();
    assert!(status.success(), "SIGTERM exit: {status}");
    assert!(std::fs::read(&image).unwrap() == model, "the image differs from the model");
    let status = status_json(&image);
    assert_eq!(status["head"].as_u64().unwrap(), changes, "journal head != number of writes");
    let out = std::process::Command::new(common::rewind_bin()).arg("verify").arg(&image).output().unwrap();
    assert!(out.status.success(), "verify: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn flushed_writes_survive_kill_9_and_the_next_frontend_sees_them() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let socket = dir.path().join("vhost.sock");
    let daemon = Daemon::start(&image, &socket, &["--size", "16M"]);
    let mut rng = Rng(99);
    let first = rng.bytes(65536);
    let mut client = Client::connect(&socket, 1);
    assert_eq!(client.write(4096, &first), 0);
    drop(client);

    // A second frontend on the same daemon sees the first one's data.
    let second = rng.bytes(8192);
    let mut client = Client::connect(&socket, 1);
    let (ret, back) = client.read(4096, 65536);
    assert_eq!(ret, 0);
    assert!(back == first);
    assert_eq!(client.write(1 << 20, &second), 0);
    assert_eq!(client.flush(), 0);
    daemon.kill();
    drop(client);

    let daemon = Daemon::start(&image, &socket, &[]);
    let mut client = Client::connect(&socket, 1);
    let (_, back) = client.read(4096, 65536);
    assert!(back == first, "first write lost after kill -9");
    let (_, back) = client.read(1 << 20, 8192);
    assert!(back == second, "flushed write lost after kill -9");
    drop(client);
    assert!(daemon.terminate().success());
    assert_eq!(status_json(&image)["head"], 2);
}

#[test]
fn a_flooded_queue_starves_neither_the_other_queue_nor_the_control_socket() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let socket = dir.path().join("vhost.sock");
    let control = dir.path().join("control.sock");
    let daemon =
        Daemon::start(&image, &socket, &["--size", "16M", "--num-queues", "2", "--control", control.to_str().unwrap()]);
    let mut client = Client::connect(&socket, 2);
    let mut flooded = client.queues.remove(0);
    let flood_buffers = client.region.addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut rounds = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // 32 writes of 64 KiB at a time, from the first 2 MiB of the region.
                for i in 0..32usize {
                    let ptr = (flood_buffers + i * 65536) as *const u8;
                    flooded.write((i as u64 % 8) << 20, ptr, 65536, i, blkio::ReqFlags::empty());
                }
                let mut done = 0;
                while done < 32 {
                    let mut completions: Vec<std::mem::MaybeUninit<blkio::Completion>> =
                        (0..32).map(|_| std::mem::MaybeUninit::uninit()).collect();
                    let mut timeout = std::time::Duration::from_secs(30);
                    done += flooded.do_io(&mut completions, 1, Some(&mut timeout), None).unwrap();
                }
                rounds += 1;
            }
            rounds
        })
    };
    // The other queue (now index 0) and the control socket are served all along.
    let mut qmp = rewind::qmp_client::QmpClient::connect(&control).unwrap();
    let mut slowest = std::time::Duration::ZERO;
    let data = Rng(3).bytes(4096);
    for i in 0..50u64 {
        let started = std::time::Instant::now();
        client.buffer(3 << 20, 4096).copy_from_slice(&data);
        let ptr = (client.region.addr + (3 << 20)) as *const u8;
        client.queues[0].write((12 << 20) + i * 4096, ptr, 4096, 0, blkio::ReqFlags::empty());
        assert_eq!(client.complete(0, 1)[0].1, 0);
        let _: rewind::control::replies::Status = qmp.execute(rewind::control::AgentCommand::QueryStatus).unwrap();
        slowest = slowest.max(started.elapsed());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = flood.join().unwrap();
    assert!(rounds > 0, "the flood ran");
    // Starved, a request would wait for the flood to end; served, it waits for its turn.
    assert!(slowest < std::time::Duration::from_secs(10), "a request took {slowest:?} beside the flood");
    drop(client);
    assert!(daemon.terminate().success());
}

/// A guest may change a buffer while its write is in flight (Linux rewrites a page under
/// writeback unless the device asks for stable pages). Whichever bytes the write takes, its
/// journal record must match its checksum and the volume must hold what the journal says:
/// before, such a record read as damage (and a valid one after it made the store refuse to
/// open), or the volume differed from its journal.
#[test]
fn a_buffer_changed_while_its_write_is_in_flight_leaves_a_consistent_store() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let socket = dir.path().join("vhost.sock");
    let daemon = Daemon::start(&image, &socket, &["--size", "16M"]);
    let mut client = Client::connect(&socket, 1);
    const DEPTH: usize = 16;
    const LEN: usize = 64 << 10;
    let region = client.region.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let scribbler = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut value = 0u8;
            while !stop.load(Ordering::Relaxed) {
                for at in (0..DEPTH * LEN).step_by(64) {
                    // SAFETY: inside the client's region; the daemon reads it concurrently, as
                    // it would a guest's page, which is what this test is about.
                    unsafe { std::ptr::write_volatile((region + at) as *mut u8, value) };
                }
                value = value.wrapping_add(1);
            }
        })
    };
    let mut rng = Rng(5);
    for _ in 0..200 {
        for slot in 0..DEPTH {
            let offset = rng.next() % (SIZE / LEN as u64) * LEN as u64;
            let buffer = (region + slot * LEN) as *const u8;
            client.queues[0].write(offset, buffer, LEN, slot, blkio::ReqFlags::empty());
        }
        assert!(client.complete(0, DEPTH).iter().all(|&(_, ret)| ret == 0));
    }
    stop.store(true, Ordering::Relaxed);
    scribbler.join().unwrap();
    drop(client);
    assert!(daemon.terminate().success());
    let verify = std::process::Command::new(common::rewind_bin()).arg("verify").arg(&image).output().unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
}
