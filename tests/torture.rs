//! Crash torture: a libblkio frontend writes blocks that name their write, flushes, adds
//! markers and keeps unflushed writes in flight while `rewind serve` is killed at random
//! instants (kill -9), or loses power: the store lives on a crashfs mount, which after the kill
//! drops whatever was not made durable (its `data` and `data-and-metadata` models, taken in
//! turn; every other pair of power losses also starts a new boot, as a real one does). Each runs with default settings and with retention working hard (small segments, a
//! journal limit, a snapshot every second). After each crash: `rewind verify` passes offline; every block
//! holds a write no older than the last one a completed FLUSH covered (or a write issued after
//! it), whole; every marker the store still lists recovers to exactly the blocks it named; the
//! daemon serves again.
//!
//! `cargo test --test torture` runs a short version. `scripts/torture` runs the soak:
//! TORTURE_CYCLES (default 8) and TORTURE_SEED; every 50 cycles a new store starts. When a check
//! fails, the store's directory is kept and its path printed.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkio::ReqFlags;
use common::blocks::{write_in, Frontend, BLOCK, DEPTH, FLUSH};
use common::{rewind_bin, Daemon, Rng};

const BLOCKS: u64 = 2048;
const SIZE: u64 = BLOCK * BLOCKS;

/// What the frontend knows: per block, the writes issued to it in order (never two in flight
/// at once) and the newest one a completed FLUSH covers.
#[derive(Default)]
struct Model {
    issued: HashMap<u64, Vec<u64>>,
    durable: HashMap<u64, u64>,
    /// Per block, the newest write completed.
    acked: HashMap<u64, u64>,
    /// Markers with the blocks' writes when they were added (nothing in flight then), kept
    /// for the newest [`MARKER_STATES_KEPT`] only: a soak makes tens of thousands of markers.
    markers: Vec<(String, Option<HashMap<u64, u64>>)>,
    /// How many of `markers` a completed FLUSH covers.
    durable_markers: usize,
    next_id: u64,
}

impl Model {
    /// Checks what a block holds after a crash; returns the write it holds.
    fn check(&self, block: u64, bytes: &[u8], cycle: usize) -> u64 {
        let found = write_in(bytes, block).unwrap_or_else(|| panic!("cycle {cycle}: block {block} is torn"));
        let floor = self.durable.get(&block).copied().unwrap_or(0);
        let issued = self.issued.get(&block).map_or(&[][..], Vec::as_slice);
        let possible = (found == floor) || issued.iter().any(|&id| id == found && id > floor);
        assert!(possible, "cycle {cycle}: block {block} holds write {found}; durable was {floor}, issued {issued:?}");
        found
    }
}

/// How many markers' block states the model keeps to compare recoveries against.
const MARKER_STATES_KEPT: usize = 64;

impl Model {
    fn add_marker(&mut self, name: String) {
        self.markers.push((name, Some(self.acked.clone())));
        if let Some(oldest_kept) = self.markers.len().checked_sub(MARKER_STATES_KEPT + 1) {
            self.markers[oldest_kept].1 = None;
        }
    }
}

/// Kill -9 only, or a power loss after it.
#[derive(Clone, Copy, PartialEq)]
enum Crash {
    Kill,
    PowerLoss,
}

struct Setup {
    /// Where the store lives for power losses; dropped (unmounted) before `dir` goes.
    mount: Option<crashfs::Mount>,
    /// Kept when a check fails, for a look at what the crash left (the path is printed).
    dir: Option<tempfile::TempDir>,
    image: PathBuf,
    socket: PathBuf,
    control: PathBuf,
    serve_args: Vec<String>,
}

impl Setup {
    fn new(retention: bool, crash: Crash) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mount = (crash == Crash::PowerLoss).then(|| {
            let (backing, mountpoint) = (dir.path().join("backing"), dir.path().join("mnt"));
            std::fs::create_dir(&backing).unwrap();
            std::fs::create_dir(&mountpoint).unwrap();
            crashfs::Mount::start(&backing, &mountpoint, crashfs::Model::DataAndMetadata).unwrap()
        });
        // Sockets stay outside the mount.
        let image = mount.as_ref().map_or_else(|| dir.path().to_path_buf(), |m| m.mountpoint().to_path_buf());
        let image = image.join("disk.img");
        let mut init = vec!["init".to_string(), image.to_str().unwrap().into(), "--size".into(), SIZE.to_string()];
        let mut serve_args = vec![];
        if retention {
            init.extend(["--segment-size".into(), "262144".into(), "--journal-max".into(), "2M".into()]);
            serve_args.extend(["--snapshot-every".into(), "1s".into()]);
        }
        rewind(&init.iter().map(String::as_str).collect::<Vec<_>>());
        let socket = dir.path().join("vhost.sock");
        let control = dir.path().join("control.sock");
        serve_args.extend(["--control".into(), control.to_str().unwrap().into()]);
        Self { mount, dir: Some(dir), image, socket, control, serve_args }
    }

    fn dir(&self) -> &Path {
        self.dir.as_ref().expect("the directory is there until the setup is dropped").path()
    }

    fn serve(&self) -> Daemon {
        let args: Vec<&str> = self.serve_args.iter().map(String::as_str).collect();
        Daemon::start(&self.image, &self.socket, &args)
    }
}

fn rewind(args: &[&str]) -> std::process::Output {
    let out = Command::new(rewind_bin()).args(args).env("RUST_LOG", "error").output().unwrap();
    assert!(out.status.success(), "rewind {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.mount.take();
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                eprintln!("torture: the store is kept in {}", dir.keep().display());
            }
        }
    }
}

/// One cycle's workload until the daemon dies under it (`dead` says when it has been killed).
/// Returns the writes completed.
fn run_until_killed(
    frontend: &mut Frontend,
    model: &mut Model,
    rng: &mut Rng,
    control: &Path,
    cycle: usize,
    dead: &AtomicBool,
) -> usize {
    // Some cycles flush often, others leave long bursts unflushed (several segments' worth
    // with small segments), which is where a crash leaves the most behind.
    let flush_one_in = [4, 32, 256][cycle % 3];
    // Completions, or None once the daemon is gone: silence from a live daemon is waited out.
    let complete = |frontend: &mut Frontend| loop {
        match frontend.complete(1, Duration::from_millis(50)) {
            Some(done) => return Some(done),
            None if dead.load(Ordering::SeqCst) => return None,
            None => {}
        }
    };
    let mut slots: Vec<Option<(u64, u64)>> = vec![None; DEPTH];
    // The blocks' completed writes and the markers made when the FLUSH in flight was issued.
    let mut flush_in_flight: Option<(HashMap<u64, u64>, usize)> = None;
    let mut completed = 0;
    let mut next_marker = 40 + rng.next() % 80;
    loop {
        // Keep the queue full with writes to blocks not already in flight.
        for slot in 0..DEPTH {
            if slots[slot].is_some() {
                continue;
            }
            let block = loop {
                let block = rng.next() % BLOCKS;
                if !slots.iter().flatten().any(|&(b, _)| b == block) {
                    break block;
                }
            };
            model.next_id += 1;
            let id = model.next_id;
            frontend.start_write(slot, block, id);
            model.issued.entry(block).or_default().push(id);
            slots[slot] = Some((block, id));
        }
        if flush_in_flight.is_none() && rng.next() % flush_one_in == 0 {
            frontend.queue.flush(FLUSH, ReqFlags::empty());
            flush_in_flight = Some((model.acked.clone(), model.markers.len()));
        }
        let Some(done) = complete(frontend) else { return completed };
        for (user_data, ret) in done {
            if ret != 0 {
                return completed;
            }
            if user_data == FLUSH {
                let (blocks, markers) = flush_in_flight.take().expect("a flush was in flight");
                model.durable.extend(blocks);
                model.durable_markers = model.durable_markers.max(markers);
                continue;
            }
            let (block, id) = slots[user_data].take().expect("a write was in that slot");
            model.acked.insert(block, id);
            completed += 1;
        }
        if completed as u64 >= next_marker && flush_in_flight.is_none() {
            // A marker names a known state: wait for what is in flight first.
            while slots.iter().any(Option::is_some) {
                let Some(done) = complete(frontend) else { return completed };
                for (user_data, ret) in done {
                    if ret != 0 {
                        return completed;
                    }
                    let (block, id) = slots[user_data].take().expect("a write was in that slot");
                    model.acked.insert(block, id);
                    completed += 1;
                }
            }
            let name = format!("c{cycle}-w{completed}");
            let added = rewind::qmp_client::QmpClient::connect(control).and_then(|mut c| {
                c.execute::<serde_json::Value>(rewind::control::AgentCommand::MarkerAdd {
                    name: name.clone(),
                    note: None,
                })
            });
            if added.is_err() {
                return completed;
            }
            model.add_marker(name);
            next_marker += 40 + rng.next() % 80;
        }
    }
}

/// Makes the store's metadata say it was open in an earlier boot, as after a reboot.
fn start_a_new_boot(image: &Path) {
    let meta_path = rewind::store::default_store_dir(image).join("meta.json");
    let mut meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    if meta.get("open-in-boot").is_some() {
        meta["open-in-boot"] = "the boot before the power loss".into();
        std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
    }
}

/// After a crash, offline: the store opens and verifies; every marker it lists that the
/// frontend made recovers exactly (one at random each cycle, and the newest).
fn check_store(setup: &Setup, model: &mut Model, rng: &mut Rng, cycle: usize) -> usize {
    let image = setup.image.to_str().unwrap();
    rewind(&["verify", image]);
    let listed: Vec<serde_json::Value> =
        serde_json::from_slice(&rewind(&["marker", "list", image, "--json"]).stdout).unwrap();
    let is_listed = |name: &str| listed.iter().any(|m| m["name"] == name);
    for (name, _) in &model.markers[..model.durable_markers] {
        assert!(is_listed(name), "cycle {cycle}: durable marker {name} is gone");
    }
    // Markers no FLUSH covered may be gone; those are forgotten.
    model.markers.retain(|(name, _)| is_listed(name));
    let recoverable: Vec<(&String, &HashMap<u64, u64>)> = model
        .markers
        .iter()
        .filter_map(|(name, blocks)| Some((name, blocks.as_ref()?)))
        .filter(|(name, _)| listed.iter().any(|m| m["name"] == name.as_str() && m["expired"] == false))
        .collect();
    let picks = [recoverable.last(), recoverable.get((rng.next() as usize) % recoverable.len().max(1))];
    let mut checked = 0;
    for &(name, blocks) in picks.into_iter().flatten() {
        let output = setup.dir().join(format!("recovered-{cycle}-{checked}.img"));
        rewind(&["recover", image, "--marker", name, "--output", output.to_str().unwrap()]);
        let bytes = std::fs::read(&output).unwrap();
        for block in 0..BLOCKS {
            let expected = blocks.get(&block).copied().unwrap_or(0);
            let got = write_in(&bytes[(block * BLOCK) as usize..][..BLOCK as usize], block);
            assert_eq!(got, Some(expected), "cycle {cycle}: marker {name} block {block}");
        }
        std::fs::remove_file(output).unwrap();
        checked += 1;
    }
    checked
}

/// A soak starts a new store this often: without retention the journal, and with it the time
/// each cycle's checks take, would grow without bound.
const CYCLES_PER_STORE: usize = 50;

/// What a power loss keeps, taken in turn.
const POWER_LOSS_MODELS: [crashfs::Model; 2] = [crashfs::Model::Data, crashfs::Model::DataAndMetadata];

fn torture(crash: Crash, retention: bool) {
    let cycles: usize = std::env::var("TORTURE_CYCLES").map_or(8, |v| v.parse().unwrap());
    let seed: u64 = std::env::var("TORTURE_SEED").map_or(0x7047_7572, |v| v.parse().unwrap());
    let mut rng = Rng(seed);
    let (mut setup, mut model) = (Setup::new(retention, crash), Model::default());
    let (mut writes, mut markers_made, mut markers_checked) = (0, 0, 0);
    let started = Instant::now();
    for cycle in 0..cycles {
        if cycle > 0 && cycle % CYCLES_PER_STORE == 0 {
            markers_made += model.markers.len();
            drop(setup);
            (setup, model) = (Setup::new(retention, crash), Model::default());
        }
        let daemon = setup.serve();
        let mut frontend = Frontend::connect(&daemon.socket);
        if cycle % CYCLES_PER_STORE > 0 {
            let bytes = frontend.read_all(BLOCKS);
            for block in 0..BLOCKS {
                let found = model.check(block, &bytes[(block * BLOCK) as usize..][..BLOCK as usize], cycle);
                model.issued.insert(block, vec![found]);
                model.acked.insert(block, found);
            }
        }
        // What survived becomes the durable floor once a FLUSH covers it.
        assert_eq!(frontend.flush(), 0);
        model.durable = model.acked.clone();
        model.durable_markers = model.markers.len();

        let dead = Arc::new(AtomicBool::new(false));
        let pid = daemon.child.id() as i32;
        let delay = Duration::from_millis(100 + rng.next() % 700);
        let killer = {
            let dead = Arc::clone(&dead);
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                // SAFETY: kill(2) on our own child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                dead.store(true, Ordering::SeqCst);
            })
        };
        writes += run_until_killed(&mut frontend, &mut model, &mut rng, &setup.control, cycle, &dead);
        killer.join().unwrap();
        assert!(dead.load(Ordering::SeqCst), "cycle {cycle}: the workload stopped before the kill");
        drop(frontend);
        daemon.kill();
        if let Some(mount) = &setup.mount {
            mount.crash_with(POWER_LOSS_MODELS[cycle % POWER_LOSS_MODELS.len()]).unwrap();
            // A real power loss also starts a new boot, after which open rebuilds the volume
            // whatever else it finds; the other cycles keep the boot, as storage that lost its
            // unsynced writes without a reboot would.
            if cycle / POWER_LOSS_MODELS.len() % 2 == 0 {
                start_a_new_boot(&setup.image);
            }
        }
        markers_checked += check_store(&setup, &mut model, &mut rng, cycle);
    }
    println!(
        "torture: {cycles} {} cycles{}, {writes} writes, {} markers made, {markers_checked} recovered and \
         compared, in {:.0?}",
        if crash == Crash::Kill { "kill -9" } else { "power-loss" },
        if retention { " with retention" } else { "" },
        markers_made + model.markers.len(),
        started.elapsed()
    );
}

#[test]
fn kill_at_random_instants() {
    torture(Crash::Kill, false);
}

#[test]
fn kill_at_random_instants_with_retention_working_hard() {
    torture(Crash::Kill, true);
}

#[test]
fn power_loss_at_random_instants() {
    torture(Crash::PowerLoss, false);
}

#[test]
fn power_loss_at_random_instants_with_retention_working_hard() {
    torture(Crash::PowerLoss, true);
}
