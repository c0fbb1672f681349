//! I/O fault sweeps, SQLite style: the store lives on a crashfs mount that fails the k-th
//! write, fsync, fdatasync, fallocate, rename or truncate with EIO or ENOSPC, once or from then
//! on, while a frontend writes, flushes, adds a marker, takes a snapshot and has retention free
//! segments. For every fault: no write completes OK unless it is in the journal (after the fault
//! is cleared and the daemon restarted, every block holds its last OK write or a later one); the
//! daemon keeps answering reads and the control socket while the fault lasts; it stops on
//! SIGTERM; the store then opens and verifies, and writes work again.
//!
//! `cargo test --test faults` tries the first, a middle and the last k of each kind;
//! `cargo test --release --test faults -- --ignored` every k the workload reaches.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::blocks::{write_in, Frontend};
use common::{rewind_bin, Daemon};
use crashfs::{Fault, Op, Persist};
use rewind::control::replies::Status;
use rewind::control::{AgentCommand, HostCommand};
use rewind::qmp_client::QmpClient;

const BLOCKS: u64 = 64;
const WRITES: u64 = 48;

struct Mounted {
    mount: crashfs::Mount,
    /// Holds the backing directory, the mount point and the sockets.
    dir: tempfile::TempDir,
}

fn mount() -> Mounted {
    let dir = tempfile::tempdir().unwrap();
    let (backing, mountpoint) = (dir.path().join("backing"), dir.path().join("mnt"));
    std::fs::create_dir(&backing).unwrap();
    std::fs::create_dir(&mountpoint).unwrap();
    let mount = crashfs::Mount::start(&backing, &mountpoint, crashfs::Model::Data).unwrap();
    Mounted { mount, dir }
}

fn rewind(args: &[&str]) -> std::process::Output {
    Command::new(rewind_bin()).args(args).env("RUST_LOG", "error").output().unwrap()
}

/// A fresh store on the mount, served.
struct Served {
    image: PathBuf,
    socket: PathBuf,
    control: PathBuf,
    /// None only while it is being restarted.
    daemon: Option<Daemon>,
}

fn serve(mounted: &Mounted, name: &str) -> Served {
    let image = mounted.mount.mountpoint().join(format!("{name}.img"));
    let init = rewind(&["init", image.to_str().unwrap(), "--size", "256K", "--segment-size", "16K"]);
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let socket = mounted.dir.path().join(format!("{name}.sock"));
    let control = mounted.dir.path().join(format!("{name}.ctl"));
    let mut served = Served { image, socket, control, daemon: None };
    served.start();
    served
}

impl Served {
    /// Starts the daemon, its log (full of the errors the faults cause) beside the image.
    fn start(&mut self) {
        // Beside the sockets, off the mount: the log's own writes must not count.
        let log = self.socket.with_extension("log");
        let args = ["--control", self.control.to_str().unwrap()];
        self.daemon = Some(Daemon::start_logging_to(&self.image, &self.socket, &args, "warn", &log));
    }
}

/// What the workload saw: per block the writes issued in order and the last one that completed
/// OK; the marker if it was added.
#[derive(Default)]
struct Seen {
    issued: HashMap<u64, Vec<u64>>,
    ok: HashMap<u64, u64>,
    marker: bool,
    reads_failed: bool,
}

/// Writes, flushes, a marker, a snapshot and retention freeing segments. Nothing here may hang
/// or see a wrong byte whatever fails.
fn workload(served: &Served, what: &str) -> Seen {
    let mut frontend = Frontend::connect(&served.socket);
    let mut control = QmpClient::connect(&served.control).unwrap();
    let mut seen = Seen::default();
    for id in 1..=WRITES {
        let block = (id * 7) % BLOCKS;
        seen.issued.entry(block).or_default().push(id);
        if frontend.write(block, id) == 0 {
            seen.ok.insert(block, id);
        }
        if id % 6 == 0 {
            frontend.flush();
        }
        if id % 8 == 0 {
            // A read returns the right bytes or fails: it fails only once a sync of the volume
            // (a snapshot or retention checkpoints it) has failed, and then every later one does.
            let read_block = (id * 7) % BLOCKS;
            let (ret, bytes) = frontend.read(read_block);
            if ret == 0 {
                assert!(!seen.reads_failed, "{what}: a read after write {id} worked after one had failed");
                let held = write_in(&bytes, read_block).unwrap_or_else(|| panic!("{what}: block {read_block} is torn"));
                let issued = &seen.issued[&read_block];
                assert!(
                    seen.ok.get(&read_block).is_none_or(|&ok| held >= ok) && (held == 0 || issued.contains(&held)),
                    "{what}: block {read_block} reads as write {held}; issued {issued:?}, last OK {:?}",
                    seen.ok.get(&read_block)
                );
            } else {
                seen.reads_failed = true;
            }
        }
        match id {
            16 => {
                let added: Result<serde_json::Value, _> =
                    control.execute(AgentCommand::MarkerAdd { name: "mid".into(), note: None });
                seen.marker = added.is_ok();
            }
            24 => drop(control.execute::<serde_json::Value>(HostCommand::SnapshotTake)),
            32 => {
                let retention =
                    rewind::control::protocol::RetentionChange { max_bytes: Some(32 << 10), ..Default::default() };
                drop(control.execute::<serde_json::Value>(HostCommand::RetentionSet(retention)));
            }
            _ => {}
        }
    }
    // The control socket answers whatever failed.
    let status: Status = control.execute(AgentCommand::QueryStatus).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(status.queues, 1);
    seen
}

/// After the fault is cleared: SIGTERM stops the daemon, the store opens and verifies, every
/// write that completed OK is there, the marker too if it was added, and writes work again.
fn check_after(served: &mut Served, seen: &Seen, what: &str) {
    // It may exit with an error when it could not make the store durable at exit.
    served.daemon.take().expect("served").terminate_within(Duration::from_secs(10));
    let verify = rewind(&["verify", served.image.to_str().unwrap()]);
    assert!(verify.status.success(), "{what}: verify: {}", String::from_utf8_lossy(&verify.stderr));
    served.start();
    let mut frontend = Frontend::connect(&served.socket);
    for block in 0..BLOCKS {
        let (ret, bytes) = frontend.read(block);
        assert_eq!(ret, 0, "{what}: read of block {block}");
        let held = write_in(&bytes, block).unwrap_or_else(|| panic!("{what}: block {block} is torn"));
        let issued = seen.issued.get(&block).map_or(&[][..], Vec::as_slice);
        let ok = seen.ok.get(&block).copied().unwrap_or(0);
        assert!(
            held >= ok && (held == 0 || issued.contains(&held)),
            "{what}: block {block} holds write {held}; issued {issued:?}, last OK {ok}"
        );
    }
    if seen.marker {
        let listed = rewind(&["marker", "list", "--control", served.control.to_str().unwrap(), "--json"]);
        assert!(String::from_utf8_lossy(&listed.stdout).contains("\"mid\""), "{what}: the marker added is gone");
    }
    assert_eq!(frontend.write(0, WRITES + 1), 0, "{what}: writes work again");
    assert_eq!(frontend.flush(), 0, "{what}: flushes work again");
}

#[test]
fn a_failed_flush_is_never_retried_into_a_false_success() {
    let mounted = mount();
    let mut served = serve(&mounted, "fsync");
    let mut frontend = Frontend::connect(&served.socket);
    assert_eq!(frontend.write(1, 1), 0);
    assert_eq!(frontend.flush(), 0);
    assert_eq!(frontend.write(2, 2), 0);
    let fault = Fault { op: Op::Fdatasync, nth: 1, errno: libc::EIO, persist: Persist::Once };
    mounted.mount.inject(fault).unwrap();
    assert_ne!(frontend.flush(), 0, "the flush whose fdatasync failed");
    // The kernel may have dropped the pages it could not write and will not say so again: a
    // second fdatasync would succeed and prove nothing. Writes and flushes fail from now on.
    assert_ne!(frontend.flush(), 0, "a flush after the failure");
    assert_ne!(frontend.write(3, 3), 0, "a write after the failure");
    let (ret, bytes) = frontend.read(1);
    assert_eq!((ret, write_in(&bytes, 1)), (0, Some(1)), "reads go on");
    mounted.mount.clear_faults().unwrap();
    drop(frontend);
    let seen = Seen {
        issued: HashMap::from([(1, vec![1]), (2, vec![2])]),
        ok: HashMap::from([(1, 1), (2, 2)]),
        ..Seen::default()
    };
    check_after(&mut served, &seen, "after a failed fdatasync");
}

#[test]
fn a_full_disk_fails_writes_keeps_reads_and_writes_resume_when_space_returns() {
    let mounted = mount();
    let mut served = serve(&mounted, "full");
    let mut frontend = Frontend::connect(&served.socket);
    assert_eq!(frontend.write(1, 1), 0);
    let fault = Fault { op: Op::Write, nth: 1, errno: libc::ENOSPC, persist: Persist::Forever };
    mounted.mount.inject(fault).unwrap();
    for id in 2..6 {
        assert_ne!(frontend.write(id, id), 0, "write {id} on a full disk");
    }
    let (ret, bytes) = frontend.read(1);
    assert_eq!((ret, write_in(&bytes, 1)), (0, Some(1)), "reads go on");
    mounted.mount.clear_faults().unwrap();
    // Space is back: no restart needed.
    assert_eq!(frontend.write(6, 6), 0);
    assert_eq!(frontend.flush(), 0);
    let (ret, bytes) = frontend.read(6);
    assert_eq!((ret, write_in(&bytes, 6)), (0, Some(6)));
    drop(frontend);
    let issued = (1..=6).map(|id| (id, vec![id])).collect();
    let seen = Seen { issued, ok: HashMap::from([(1, 1), (6, 6)]), ..Seen::default() };
    check_after(&mut served, &seen, "after a full disk");
}

/// How many operations of each kind the workload makes, measured on a run without faults.
fn counts_of_a_clean_run(mounted: &Mounted) -> HashMap<Op, u64> {
    let mut served = serve(mounted, "clean");
    let before = mounted.mount.op_counts().unwrap();
    let seen = workload(&served, "no fault");
    let after = mounted.mount.op_counts().unwrap();
    check_after(&mut served, &seen, "no fault");
    Op::ALL.into_iter().map(|op| (op, after.get(op) - before.get(op))).collect()
}

/// Every fault `which` picks: for each kind, errno and persistence, the k it chooses among the
/// operations a clean run makes.
fn sweep(which: impl Fn(u64) -> Vec<u64>) -> HashMap<Op, u64> {
    let mounted = mount();
    let counts = counts_of_a_clean_run(&mounted);
    let mut runs = 0;
    for op in Op::ALL {
        for errno in [libc::EIO, libc::ENOSPC] {
            for persist in [Persist::Once, Persist::Forever] {
                for nth in which(counts[&op]) {
                    let what = format!("{op} #{nth} fails with errno {errno}, {persist:?}");
                    let mut served = serve(&mounted, &format!("run{runs}"));
                    mounted.mount.inject(Fault { op, nth, errno, persist }).unwrap();
                    let seen = workload(&served, &what);
                    mounted.mount.clear_faults().unwrap();
                    check_after(&mut served, &seen, &what);
                    runs += 1;
                }
            }
        }
    }
    println!("fault sweep: {runs} runs; a clean run makes {counts:?}");
    counts
}

#[test]
fn faults_at_the_first_a_middle_and_the_last_operation_of_each_kind() {
    let counts = sweep(|count| {
        let mut picks = vec![1, count.div_ceil(2), count];
        picks.retain(|&k| k >= 1);
        picks.dedup();
        picks
    });
    // The workload reaches every kind a running store uses (truncation happens only when a
    // torn tail is cut at open).
    for op in [Op::Write, Op::Fsync, Op::Fdatasync, Op::Fallocate, Op::Rename] {
        assert!(counts[&op] > 0, "the workload makes no {op}: {counts:?}");
    }
}

/// The whole sweep: `FAULT_SWEEP=all cargo test --release --test faults -- --ignored`.
#[test]
#[ignore]
fn faults_at_every_operation() {
    sweep(|count| (1..=count).collect());
}
