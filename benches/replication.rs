//! Replication figures: 4 KiB random write IOPS at QD32 with `--replicate` on and off
//! (alternating, in the same run), the lag from a write's completion to its record being
//! counted by the replica's manifest (p50/p99), catch-up speed after the store was unreachable,
//! and recovery from the replica against reading its objects alone. Against a one-node Ceph
//! (radosgw) started here when Ceph is installed, else against a directory.
//!
//! Each round also weighs the CPU a write took while writes completed: the busy time of the
//! cores the daemon and the load ran on, and the daemon's own. The ratio of those costs
//! without and with replication is what replication costs the I/O's cores, whatever the
//! machine's speed did between the rounds; it would be the IOPS ratio if the load kept those
//! cores busy (here it keeps them 0.7–0.95 busy: the writes wait on each other, not on CPU).
//!
//!   cargo bench --bench replication      # writes target/bench/replication.{md,json}
//!   REWIND_BENCH_QUICK=1 ...             # shorter runs
//!   REWIND_BENCH_REPLICA_DIRECTORY=1 ... # a directory replica even when Ceph is installed
//!   REWIND_BENCH_DELTA_EVERY=0 ...       # the IOPS and lag rounds with this --replica-delta-every
//!
//! With Ceph, each round runs twice: with the cluster on the cores the daemon and the load
//! generator use, and with the cluster and the daemon's housekeeping threads (the shipping
//! among them: `--housekeeping-cpus`) on a core of their own, the others left to the daemon's
//! I/O and the load: a stand-in for a cluster on another host and a host with a core to spare.
//! There the cores' figure is what shipping costs the I/O path beside it, and the daemon's
//! figure (its own CPU, wherever it ran) includes what the shipping itself took. In each
//! placement the lag is also measured paced at half the rate the cluster took in a backlog, a
//! load the store keeps up with.

#[path = "../tests/common/ceph.rs"]
mod ceph;
#[path = "../tests/common/cpu.rs"]
mod cpu;
#[path = "../crates/rewind-engine/tests/common/rng.rs"]
mod rng;

use std::fs::{self, File, OpenOptions};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};
use rewind::control::protocol::{AgentCommand, HostCommand};
use rewind::control::replies::Status;
use rewind::qmp_client::QmpClient;
use rewind_replica::layout::PartOf;
use rewind_replica::ReplicationStatus;
use rng::Rng;

const IMAGE_SIZE: u64 = 256 << 20;
const BLOCK: usize = 4096;
/// The one bucket of the bench's Ceph replicas.
const BUCKET: &str = "bench";
const DEPTH: usize = 32;
/// A write rate this machine's one-node Ceph keeps up with, for the lag of a store that is not
/// the bottleneck.
const PACED_IOPS: f64 = 2000.0;
/// Cores busy at most this much (of one core) count as idle: a cluster at rest, the kernel.
const QUIET_CORES: f64 = 0.2;
/// A lag past this means the store stopped taking objects.
const LAG_LIMIT: Duration = Duration::from_secs(300);

/// Where the cluster runs: on the cores the daemon and the load generator use (as the tests run
/// it), or on the last core alone with the daemon's housekeeping threads (`--housekeeping-cpus`:
/// the shipping among them), the others left to the daemon's I/O and the load: a stand-in for a
/// cluster on another host, where a replica belongs, and a host with a core to spare for
/// shipping, as hosts with more than two have.
#[derive(Clone, Copy, PartialEq)]
enum Placement {
    Shared,
    OwnCore,
}

impl Placement {
    fn label(self) -> &'static str {
        match self {
            Placement::Shared => "cluster sharing the cores",
            Placement::OwnCore => "cluster and shipping on a core of their own",
        }
    }

    /// The daemon's options for this placement, in rounds with and without replication alike.
    fn daemon_args(self, cpus: usize) -> Vec<String> {
        match self {
            Placement::Shared => Vec::new(),
            Placement::OwnCore => vec!["--housekeeping-cpus".into(), (cpus - 1).to_string()],
        }
    }

    /// The cores the daemon and the load run on, of `cpus`.
    fn ours(self, cpus: usize) -> Range<usize> {
        match self {
            Placement::Shared => 0..cpus,
            Placement::OwnCore => 0..cpus - 1,
        }
    }
}

/// Moves every thread of the cluster's daemons, and of this process (whose children, the
/// daemons under test, inherit it), to `placement`'s cores among `cpus`.
fn place(cluster: &ceph::Cluster, placement: Placement, cpus: usize) {
    let cores = placement.ours(cpus);
    let ours = format!("{}-{}", cores.start, cores.end - 1);
    let theirs = match placement {
        Placement::Shared => ours.clone(),
        Placement::OwnCore => (cpus - 1).to_string(),
    };
    let taskset = |cores: &str, pid: u32| {
        let status = Command::new("taskset")
            .args(["-a", "-p", "-c", cores, &pid.to_string()])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "taskset -c {cores} -p {pid} failed");
    };
    for pid in cluster.pids() {
        taskset(&theirs, pid);
    }
    taskset(&ours, std::process::id());
}

/// One placement's rounds, without and with replication.
#[derive(Default)]
struct Rounds {
    off: Vec<Round>,
    on: Vec<Round>,
}

struct Target {
    url: String,
    env: Vec<(String, String)>,
}

/// A sparse image: the replica's base holds no data, so what is measured is the journal's
/// shipping (and the one-node cluster's memory store stays far from full: a full Ceph hangs).
fn prepare_image(path: &Path) {
    let _ = fs::remove_file(path);
    let file = OpenOptions::new().write(true).create(true).truncate(true).open(path).unwrap();
    file.set_len(IMAGE_SIZE).unwrap();
}

/// Where the bench's replicas live: a directory, or a one-node Ceph started for each replica
/// and stopped once the replica is deleted. One cluster for a whole run kept every deleted
/// replica in memory (radosgw frees deleted objects hours later) until the OSD was OOM-killed;
/// purging the bucket between replicas once left its memory store reporting itself full.
enum Replicas {
    Directory { dir: PathBuf, cpus: usize },
    Ceph { cluster: Option<ceph::Cluster>, cpus: usize },
}

impl Replicas {
    /// Ceph when installed, unless REWIND_BENCH_REPLICA_DIRECTORY asks for a directory (to tell
    /// the shipper's own cost from that of a cluster sharing this machine's cores).
    fn new(work: &Path, cpus: usize) -> Self {
        let cluster = match std::env::var_os("REWIND_BENCH_REPLICA_DIRECTORY") {
            Some(_) => None,
            None => start_cluster(),
        };
        match cluster {
            Some(cluster) => Replicas::Ceph { cluster: Some(cluster), cpus },
            None => Replicas::Directory { dir: fs::canonicalize(work).unwrap().join("replica"), cpus },
        }
    }

    fn is_ceph(&self) -> bool {
        matches!(self, Replicas::Ceph { .. })
    }

    /// The machine's cores, counted before any pinning narrowed this process's.
    fn cpus(&self) -> usize {
        match self {
            Replicas::Ceph { cpus, .. } | Replicas::Directory { cpus, .. } => *cpus,
        }
    }

    fn describe(&self) -> &'static str {
        match self {
            Replicas::Ceph { .. } => "one-node Ceph (radosgw, memstore OSD)",
            Replicas::Directory { .. } => "a local directory",
        }
    }

    /// An empty replica `name`; with Ceph, on a cluster of its own, placed (with this
    /// process) as `placement` says.
    fn create(&mut self, name: &str, placement: Placement) -> Target {
        match self {
            Replicas::Directory { dir, .. } => {
                Target { url: format!("file://{}", dir.join(name).display()), env: Vec::new() }
            }
            Replicas::Ceph { cluster, cpus } => {
                let running = cluster.get_or_insert_with(|| start_cluster().expect("Ceph was installed"));
                running.create_bucket(BUCKET);
                place(running, placement, *cpus);
                Target { url: format!("s3://{BUCKET}/{name}"), env: running.s3_env() }
            }
        }
    }

    /// The cluster holding the replica in use.
    fn cluster(&mut self) -> &mut ceph::Cluster {
        match self {
            Replicas::Ceph { cluster: Some(cluster), .. } => cluster,
            _ => panic!("no cluster is running"),
        }
    }

    /// Deletes the replica at `target`, so that the next one does not fill the disk or the
    /// cluster's memory.
    fn delete(&mut self, target: &Target) {
        match self {
            Replicas::Ceph { cluster, .. } => *cluster = None,
            Replicas::Directory { .. } => {
                let remote = remote(target);
                for object in remote.list("").unwrap() {
                    remote.delete(&object.key).unwrap();
                }
            }
        }
    }
}

/// Room for the largest replica, the recovery rounds' (up to about 3 GiB).
fn start_cluster() -> Option<ceph::Cluster> {
    ceph::Cluster::start_if_installed_holding(8 << 30)
}

fn remote(target: &Target) -> rewind_replica::Remote {
    // The bench's own client reads the endpoint and keys from the environment, as the CLI does.
    for (k, v) in &target.env {
        std::env::set_var(k, v);
    }
    rewind_replica::Remote::open(&target.url).unwrap()
}

/// Serves `image` with `extra` options, replicating to `target` when given.
fn serve(work: &Path, image: &Path, target: Option<&Target>, extra: &[String]) -> (Child, PathBuf, PathBuf) {
    let _ = fs::remove_dir_all(rewind::store::default_store_dir(image));
    let socket = work.join("bench.sock");
    let control = work.join("bench.ctl");
    let _ = fs::remove_file(&socket);
    let mut command = Command::new(env!("CARGO_BIN_EXE_rewind"));
    command
        .arg("serve")
        .arg(image)
        .arg("--socket")
        .arg(&socket)
        .args(["--queue-size", "1024", "--control"])
        .arg(&control);
    command.args(extra);
    if let Some(target) = target {
        command.args(["--replicate", &target.url]).envs(target.env.iter().map(|(k, v)| (k, v)));
    }
    let mut child =
        command.env("RUST_LOG", "error").stderr(File::create(work.join("rewind.log")).unwrap()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(socket.exists() && control.exists()) {
        assert!(child.try_wait().unwrap().is_none(), "rewind serve exited early");
        assert!(Instant::now() < deadline, "rewind serve did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    (child, socket, control)
}

fn stop(mut child: Child) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
}

/// 4 KiB random writes at QD32 for `secs`, as fast as they complete or paced at `rate` a
/// second; returns IOPS.
fn drive(socket: &Path, secs: f64, rate: Option<f64>) -> f64 {
    let mut blkio = Blkio::new("virtio-blk-vhost-user").unwrap();
    blkio.set_str("path", socket.to_str().unwrap()).unwrap();
    blkio.connect().unwrap();
    blkio.set_i32("num-queues", 1).unwrap();
    let region = blkio.alloc_mem_region(BLOCK * DEPTH).unwrap();
    let mut queues = blkio.start().unwrap().queues;
    blkio.map_mem_region(&region).unwrap();
    let q = &mut queues[0];
    let mut rng = Rng(0x5eed);
    // SAFETY: the region is BLOCK * DEPTH bytes libblkio mapped into this process, not in use
    // by any request yet. Filled with data that is not all zeroes, so that remote snapshots and
    // recoveries carry real bytes.
    let data = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, BLOCK * DEPTH) };
    data.iter_mut().for_each(|byte| *byte = rng.next() as u8);
    let blocks = IMAGE_SIZE / BLOCK as u64;
    for slot in 0..DEPTH {
        let buf = (region.addr + slot * BLOCK) as *const u8;
        q.write((rng.next() % blocks) * BLOCK as u64, buf, BLOCK, slot, ReqFlags::empty());
    }
    let mut completions: Vec<std::mem::MaybeUninit<Completion>> =
        (0..DEPTH).map(|_| std::mem::MaybeUninit::uninit()).collect();
    let begin = Instant::now();
    let deadline = begin + Duration::from_secs_f64(secs);
    let mut ios = 0u64;
    let mut idle: Vec<usize> = Vec::new();
    let mut wait_for = 1;
    while Instant::now() < deadline {
        let n = q.do_io(&mut completions, wait_for, None, None).unwrap();
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first n entries.
            let c = unsafe { c.assume_init_ref() };
            assert_eq!(c.ret, 0, "I/O error");
            ios += 1;
            idle.push(c.user_data);
        }
        let allowed = rate.map_or(usize::MAX, |rate| {
            ((rate * begin.elapsed().as_secs_f64()) as usize).saturating_sub(ios as usize + DEPTH - idle.len())
        });
        for _ in 0..allowed.min(idle.len()) {
            let Some(slot) = idle.pop() else { break };
            let buf = (region.addr + slot * BLOCK) as *const u8;
            q.write((rng.next() % blocks) * BLOCK as u64, buf, BLOCK, slot, ReqFlags::empty());
        }
        // While writes are in flight, wait for one to complete: paced, the next are submitted
        // then. A sleep instead is woken late on a core the daemon keeps busy (paced writes on
        // one core reached only ~13 000/s). With none in flight, sleep until the next is due.
        let in_flight = DEPTH - idle.len();
        wait_for = usize::from(in_flight > 0);
        if let (Some(rate), 0) = (rate, in_flight) {
            let due = begin + Duration::from_secs_f64((ios + 1) as f64 / rate);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
    }
    let elapsed = begin.elapsed().as_secs_f64();
    let mut left = DEPTH - idle.len();
    while left > 0 {
        left -= q.do_io(&mut completions, 1, None, None).unwrap();
    }
    ios as f64 / elapsed
}

fn head(control: &Path) -> u64 {
    let status: Status = QmpClient::connect(control).unwrap().execute(AgentCommand::QueryStatus).unwrap();
    status.head
}

fn replication(client: &mut QmpClient) -> ReplicationStatus {
    client.execute(HostCommand::QueryReplication).unwrap()
}

/// What a round measured.
struct Round {
    iops: f64,
    /// Lags in ms (with replication on).
    lags: Vec<f64>,
    /// Per write, while writes were completing.
    costs: Costs,
}

/// CPU per write, in µs, while writes were completing.
#[derive(Clone, Copy)]
struct Costs {
    /// The daemon's CPU time (its shipping threads included).
    daemon_us: f64,
    /// The busy time of the cores the daemon and the load ran on, whoever used it (the load,
    /// the kernel, a cluster sharing them).
    cores_us: f64,
    /// How many of those cores were busy, on average.
    cores_busy: f64,
}

/// Serves `image` (replicating to `target` when given) and runs `load` on the daemon's socket
/// (returning its IOPS) while sampling the daemon every 50 ms (and the lag); `cores` are the
/// ones the daemon and the load run on.
fn run_round(
    work: &Path,
    image: &Path,
    target: Option<&Target>,
    (placement, cpus): (Placement, usize),
    load: impl FnOnce(&Path) -> f64,
) -> Round {
    let mut extra = placement.daemon_args(cpus);
    if let (Some(size), Some(_)) = (std::env::var("REWIND_BENCH_DELTA_EVERY").ok(), target) {
        extra.extend(["--replica-delta-every".into(), size]);
    }
    let cores = placement.ours(cpus);
    let (child, socket, control) = serve(work, image, target, &extra);
    if target.is_some() {
        wait_caught_up(&control, Duration::from_secs(120));
    }
    let running = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (control, running, daemon, replicated) =
            (control.clone(), Arc::clone(&running), child.id(), target.is_some());
        std::thread::spawn(move || watch(control, daemon, cores, replicated, running))
    };
    let iops = load(&socket);
    running.store(false, Ordering::Relaxed);
    let (samples, lags) = watcher.join().unwrap();
    stop(child);
    Round { iops, lags, costs: costs(&samples) }
}

/// One of a round's samples.
struct Sample {
    head: u64,
    daemon_cpu: Duration,
    cores_busy: Duration,
    at: Instant,
}

/// While `running`, samples the daemon (`daemon` is its pid) every 50 ms: its head, its CPU
/// time and the busy time of `cores`. When `replicated` and writes completed since the last
/// sample (a guest booting writes none), finds when the manifest first counted the head: the
/// lag of the writes completed by then (±10 ms, the polling interval). Returns the samples and
/// the lags in ms.
fn watch(
    control: PathBuf,
    daemon: u32,
    cores: Range<usize>,
    replicated: bool,
    running: Arc<AtomicBool>,
) -> (Vec<Sample>, Vec<f64>) {
    let mut client = QmpClient::connect(&control).unwrap();
    let mut samples: Vec<Sample> = Vec::new();
    let mut pending: Vec<(Instant, u64)> = Vec::new();
    let mut lags = Vec::new();
    while running.load(Ordering::Relaxed) || !pending.is_empty() {
        let due = samples.last().is_none_or(|last| last.at.elapsed() >= Duration::from_millis(50));
        if running.load(Ordering::Relaxed) && due {
            let status: Status = client.execute(AgentCommand::QueryStatus).unwrap();
            let at = Instant::now();
            if replicated && samples.last().is_some_and(|last| status.head > last.head) {
                pending.push((at, status.head));
            }
            let (daemon_cpu, cores_busy) = (cpu::process_cpu(daemon), cpu::cores_busy(cores.clone()));
            samples.push(Sample { head: status.head, daemon_cpu, cores_busy, at });
        }
        // Asked with replication off too (an error reply), so that both rounds' daemons answer
        // the same requests.
        let shipped = client.execute::<ReplicationStatus>(HostCommand::QueryReplication);
        if replicated {
            let shipped = shipped.unwrap().shipped_seq;
            let now = Instant::now();
            // A store that stopped taking objects fails the bench rather than hang it.
            if let Some((at, seq)) = pending.first() {
                assert!(now - *at < LAG_LIMIT, "seq {seq} not in the replica after {LAG_LIMIT:?}");
            }
            pending.retain(|&(at, seq)| {
                let done = shipped >= seq;
                if done {
                    lags.push((now - at).as_secs_f64() * 1e3);
                }
                !done
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    (samples, lags)
}

/// The costs between the first and the last sample that found the head moved (the writes
/// completed throughout).
fn costs(samples: &[Sample]) -> Costs {
    let moved: Vec<&Sample> =
        samples.windows(2).filter(|pair| pair[1].head > pair[0].head).map(|pair| &pair[1]).collect();
    let (Some(first), Some(last)) = (moved.first(), moved.last()) else { panic!("no write completed in the round") };
    assert!(last.head > first.head, "writes completed in only one 50 ms sample of the round");
    let writes = (last.head - first.head) as f64;
    let cores_busy = last.cores_busy - first.cores_busy;
    Costs {
        daemon_us: (last.daemon_cpu - first.daemon_cpu).as_secs_f64() * 1e6 / writes,
        cores_us: cores_busy.as_secs_f64() * 1e6 / writes,
        cores_busy: cores_busy.as_secs_f64() / (last.at - first.at).as_secs_f64(),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    assert!(!sorted.is_empty(), "no lag sample: no write completed while the lag was sampled");
    sorted[((sorted.len() as f64 - 1.0) * p) as usize]
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[values.len() / 2]
}

/// Waits until shipping has caught up and no remote snapshot is being made, twice in a row
/// over more than a shipping interval (a delta starts just after the pass that makes it due).
fn wait_settled(control: &Path, limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut client = QmpClient::connect(control).unwrap();
    let mut settled_at = None;
    loop {
        let caught_up = wait_caught_up(control, limit).shipped_seq;
        let status = replication(&mut client);
        let settled = (!status.making_delta).then_some(caught_up);
        if settled.is_some() && settled == settled_at {
            return;
        }
        settled_at = settled;
        assert!(Instant::now() < deadline, "a remote snapshot took longer than {limit:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn wait_caught_up(control: &Path, limit: Duration) -> ReplicationStatus {
    let target = head(control);
    let mut client = QmpClient::connect(control).unwrap();
    let deadline = Instant::now() + limit;
    loop {
        let status = replication(&mut client);
        if status.shipped_seq >= target && !status.failing {
            return status;
        }
        assert!(Instant::now() < deadline, "no catch-up: {status:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// How a replica caught up after an outage.
struct CatchUp {
    /// The backlog when the store came back.
    backlog_mib: f64,
    /// Seconds from the store's restart until the replica held the backlog.
    took: f64,
    /// The store's own rate: from the first object stored after the restart, which ends the
    /// retry back-off.
    store_mib_s: f64,
    store_records_s: f64,
}

/// Stops radosgw while 1 s of QD32 writes go on to a replica at `target`, restarts it (in
/// `placement`) and times the catch-up.
fn catch_up(
    work: &Path,
    image: &Path,
    target: &Target,
    cluster: &mut ceph::Cluster,
    placement: Placement,
    cpus: usize,
) -> CatchUp {
    prepare_image(image);
    let (child, socket, control) = serve(work, image, Some(target), &placement.daemon_args(cpus));
    wait_caught_up(&control, Duration::from_secs(120));
    cluster.stop_gateway();
    drive(&socket, 1.0, None);
    let mut client = QmpClient::connect(&control).unwrap();
    let behind = replication(&mut client);
    cluster.start_gateway();
    // Started from this process, it has the daemon's cores until placed.
    place(cluster, placement, cpus);
    let restarted = Instant::now();
    let mut first_progress = None;
    let caught_up = loop {
        let status = replication(&mut client);
        if first_progress.is_none() && status.bytes_shipped > behind.bytes_shipped {
            first_progress = Some((Instant::now(), status.clone()));
        }
        if status.shipped_seq >= behind.head && !status.failing {
            break Instant::now();
        }
        assert!(restarted.elapsed() < Duration::from_secs(600), "no catch-up: {status:?}");
        std::thread::sleep(Duration::from_millis(10));
    };
    stop(child);
    let (first_at, first) = first_progress.unwrap();
    let storing = (caught_up - first_at).as_secs_f64();
    let stored_after_first = behind.bytes_pending.saturating_sub(first.bytes_shipped - behind.bytes_shipped);
    let record_bytes = behind.bytes_pending as f64 / (behind.head - behind.shipped_seq) as f64;
    CatchUp {
        backlog_mib: behind.bytes_pending as f64 / (1 << 20) as f64,
        took: (caught_up - restarted).as_secs_f64(),
        store_mib_s: stored_after_first as f64 / (1 << 20) as f64 / storing,
        store_records_s: stored_after_first as f64 / record_bytes / storing,
    }
}

/// fio in a QEMU guest (under TCG here, which issues about 12 000 writes/s at most whatever
/// the disk): what a VM on this machine sees, against the load generator's ceiling.
struct Guest {
    data: PathBuf,
    script: PathBuf,
    log: PathBuf,
}

impl Guest {
    /// The guest's files (fio, its libraries, the script running it for `secs`), or why no
    /// guest boots here.
    fn prepare(work: &Path, secs: f64) -> Result<Self, String> {
        let data = work.join("guest-data");
        let built = Command::new("bash")
            .args(["-c", r#"source guest-tests/lib.sh && guest_initramfs >/dev/null && guest_fio "$0""#])
            .arg(&data)
            .output()
            .map_err(|e| format!("bash: {e}"))?;
        if !built.status.success() {
            return Err(String::from_utf8_lossy(&built.stderr).trim().to_string());
        }
        if Command::new("qemu-system-x86_64").arg("--version").output().map_or(true, |o| !o.status.success()) {
            return Err("no qemu-system-x86_64".into());
        }
        let script = work.join("guest-fio.sh");
        fs::write(
            &script,
            format!(
                "set -e\nmkdir -p /tmp\n/data/lib/ld-linux-x86-64.so.2 --library-path /data/lib /data/fio --name=randwrite \
                 --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randwrite --bs=4k --iodepth={DEPTH} \
                 --runtime={secs:.0} --time_based --size={IMAGE_SIZE} --output-format=terse --terse-version=3 > /tmp/out\n\
                 # terse v3: field 49 is the write IOPS\necho \"fio-result $(cut -d';' -f49 /tmp/out)\"\n"
            ),
        )
        .unwrap();
        Ok(Self { data, script, log: work.join("guest.log") })
    }

    /// Boots a guest whose disk is the daemon at `socket` and runs fio: 4 KiB random writes,
    /// O_DIRECT, libaio at QD32. Returns fio's IOPS.
    fn fio(&self, socket: &Path) -> f64 {
        let booted = Command::new("bash")
            .args([
                "-c",
                r#"source guest-tests/lib.sh && guest_boot "$0" "$1" "$2" -chardev socket,id=disk0,path="$3" \
                   -device vhost-user-blk-pci,chardev=disk0,num-queues=1"#,
            ])
            .args([&self.log, &self.script, &self.data, socket])
            .status()
            .unwrap();
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        assert!(booted.success(), "the guest's fio failed:\n{log}");
        let iops = log.lines().find_map(|line| line.trim().strip_prefix("fio-result ")?.trim().parse::<f64>().ok());
        iops.unwrap_or_else(|| panic!("no fio result in the guest's log:\n{log}"))
    }
}

/// `rounds` rounds of `load` on the daemon's socket with replication off and on, in each
/// placement (off first in even rounds, on first in odd ones, so that a drift of the machine's
/// speed favours neither); returns each placement's rounds, and the remote snapshots stored
/// and their data bytes.
fn measure_rounds(
    replicas: &mut Replicas,
    placements: &[Placement],
    rounds: usize,
    work: &Path,
    image: &Path,
    name: &str,
    load: impl Fn(&Path) -> f64,
) -> (Vec<Rounds>, usize, u64) {
    let mut rounds_of: Vec<Rounds> = placements.iter().map(|_| Rounds::default()).collect();
    let (mut deltas, mut delta_bytes) = (0, 0);
    for round in 0..rounds {
        for (placement, results) in placements.iter().zip(&mut rounds_of) {
            let round_target = replicas.create(&format!("{name}{round}"), *placement);
            let cores = placement.ours(replicas.cpus());
            for replicated in [round % 2 == 1, round % 2 == 0] {
                wait_quiet(cores.clone());
                prepare_image(image);
                let target = replicated.then_some(&round_target);
                let measured = run_round(work, image, target, (*placement, replicas.cpus()), &load);
                match replicated {
                    true => results.on.push(measured),
                    false => results.off.push(measured),
                }
            }
            let manifest = rewind_replica::Replica::from_remote(remote(&round_target)).unwrap().manifest().clone();
            deltas += manifest.deltas.len();
            delta_bytes += manifest.deltas.iter().map(|d| d.data_bytes).sum::<u64>();
            replicas.delete(&round_target);
            let label = if replicas.is_ceph() { format!(", {}", placement.label()) } else { String::new() };
            let (off, on) = (&results.off[round], &results.on[round]);
            eprintln!(
                "{name} {round}{label}: off {:.0} IOPS, {:.1} µs of CPU a write; on {:.0} IOPS, {:.1} µs",
                off.iops, off.costs.cores_us, on.iops, on.costs.cores_us
            );
        }
    }
    (rounds_of, deltas, delta_bytes)
}

/// Waits (up to 30 s) until `cores` are nearly idle: a cluster just started, or just sent a
/// round's objects, goes on working for a while, which would count against the next round.
fn wait_quiet(cores: Range<usize>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let window = Duration::from_millis(500);
    loop {
        let before = cpu::cores_busy(cores.clone());
        std::thread::sleep(window);
        let busy = (cpu::cores_busy(cores.clone()) - before).as_secs_f64() / window.as_secs_f64();
        if busy < QUIET_CORES {
            return;
        }
        if Instant::now() > deadline {
            eprintln!("cores {cores:?} still {busy:.2} busy after 30 s; measuring all the same");
            return;
        }
    }
}

/// The table of `measure_rounds`' results under `heading` (and their figures in `json`, keys
/// prefixed by `key_prefix`).
fn report_rounds(
    heading: &str,
    placements: &[Placement],
    rounds_of: Vec<Rounds>,
    json: &mut serde_json::Value,
    key_prefix: &str,
) -> String {
    let mut line = format!(
        "| replication | {heading} | CPU a write: cores (busy), daemon | CPU a write, off/on | lag p50 | lag p99 |\n\
         |---|---|---|---|---|---|\n"
    );
    for (placement, results) in placements.iter().zip(rounds_of) {
        let (label, key) = match placement {
            _ if placements.len() == 1 => (String::new(), ""),
            Placement::Shared => (format!(", {}", placement.label()), "shared_"),
            Placement::OwnCore => (format!(", {}", placement.label()), "own_core_"),
        };
        let mut lags: Vec<f64> = results.on.iter().flat_map(|round| round.lags.iter().copied()).collect();
        lags.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let (p50, p99) = (percentile(&lags, 0.5), percentile(&lags, 0.99));
        // Each round's pair ran within seconds: its ratios say more than the medians' on a
        // machine whose speed changes. The CPU a write takes on the I/O's cores is its cost there,
        // whatever the machine's speed did meanwhile.
        let pairs = || results.on.iter().zip(&results.off);
        let iops_ratios: Vec<f64> = pairs().map(|(on, off)| on.iops / off.iops).collect();
        let cpu_ratios: Vec<f64> = pairs().map(|(on, off)| off.costs.cores_us / on.costs.cores_us).collect();
        let listed = |ratios: &[f64]| ratios.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(", ");
        let row = |rounds: &[Round]| {
            let iops = median(rounds.iter().map(|r| r.iops).collect());
            let cores_us = median(rounds.iter().map(|r| r.costs.cores_us).collect());
            let busy = median(rounds.iter().map(|r| r.costs.cores_busy).collect());
            let daemon_us = median(rounds.iter().map(|r| r.costs.daemon_us).collect());
            (iops, format!("{cores_us:.1} µs ({busy:.2} cores), {daemon_us:.1} µs"), cores_us, daemon_us)
        };
        let (iops_off, cpu_off, cores_us_off, daemon_us_off) = row(&results.off);
        let (iops_on, cpu_on, cores_us_on, daemon_us_on) = row(&results.on);
        let (iops_ratio, cpu_ratio) = (median(iops_ratios.clone()), median(cpu_ratios.clone()));
        line.push_str(&format!(
            "| off{label} | {iops_off:.0} | {cpu_off} | | | |\n\
             | on{label} | {iops_on:.0} ({iops_ratio:.2}×; rounds {}) | {cpu_on} | {cpu_ratio:.2}× (rounds {}) | {p50:.0} ms | {p99:.0} ms |\n",
            listed(&iops_ratios),
            listed(&cpu_ratios)
        ));
        let key = format!("{key_prefix}{key}");
        json[format!("{key}iops_off")] = iops_off.into();
        json[format!("{key}iops_on")] = iops_on.into();
        json[format!("{key}iops_ratio")] = iops_ratio.into();
        json[format!("{key}round_ratios")] = listed(&iops_ratios).into();
        json[format!("{key}cores_us_off")] = cores_us_off.into();
        json[format!("{key}cores_us_on")] = cores_us_on.into();
        json[format!("{key}daemon_us_off")] = daemon_us_off.into();
        json[format!("{key}daemon_us_on")] = daemon_us_on.into();
        json[format!("{key}cpu_per_write_ratio")] = cpu_ratio.into();
        json[format!("{key}cpu_per_write_round_ratios")] = listed(&cpu_ratios).into();
        json[format!("{key}lag_p50_ms")] = p50.into();
        json[format!("{key}lag_p99_ms")] = p99.into();
    }
    print!("{line}");
    line
}

fn main() {
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let quick = std::env::var_os("REWIND_BENCH_QUICK").is_some();
    let (rounds, secs) = if quick { (2, 3.0) } else { (3, 5.0) };
    let work =
        PathBuf::from(std::env::var("REWIND_BENCH_DIR").unwrap_or_else(|_| "target/bench/replication-work".into()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).unwrap();
    let image = work.join("bench.img");
    // Counted before any pinning narrows this process's cores.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut replicas = Replicas::new(&work, cpus);
    let store_name = replicas.describe();
    let mut md =
        format!("Replica: {store_name}, on this machine; 4 KiB random writes at QD32 over a 256 MiB image.\n\n");

    let placements = match replicas.is_ceph() && cpus >= 2 {
        true => vec![Placement::Shared, Placement::OwnCore],
        false => vec![Placement::Shared],
    };
    let (rounds_of, deltas, delta_bytes) =
        measure_rounds(&mut replicas, &placements, rounds, &work, &image, "round", |socket| drive(socket, secs, None));
    let mut json = serde_json::json!({"store": store_name});
    let heading = format!("4 KiB random write IOPS, QD32 (median of {rounds})");
    md.push_str(&report_rounds(&heading, &placements, rounds_of, &mut json, ""));

    // Catch-up after an outage (Ceph only: radosgw stopped under load), in each placement;
    // half its rate is a load the store keeps up with, for the lag of a store that is not the
    // bottleneck.
    let mut paced = vec![(Placement::Shared, PACED_IOPS, String::new())];
    if replicas.is_ceph() {
        for placement in &placements {
            let target = replicas.create("catch-up", *placement);
            let caught = catch_up(&work, &image, &target, replicas.cluster(), *placement, cpus);
            replicas.delete(&target);
            let line = format!(
                "\ncatch-up after radosgw was down for 1 s of QD32 writes, {}: {:.1} MiB shipped in {:.1} s from \
                 radosgw's restart ({:.1} MiB/s, retry back-off included); {:.1} MiB/s from the first object stored \
                 after it\n",
                placement.label(),
                caught.backlog_mib,
                caught.took,
                caught.backlog_mib / caught.took,
                caught.store_mib_s
            );
            print!("{line}");
            md.push_str(&line);
            let key = if *placement == Placement::Shared { "" } else { "own_core_" };
            json[format!("{key}catch_up_mib_s")] = (caught.backlog_mib / caught.took).into();
            json[format!("{key}catch_up_store_mib_s")] = caught.store_mib_s.into();
            let why = format!(" (half the records/s the store took in its catch-up, {:.0}/s)", caught.store_records_s);
            paced.push((*placement, caught.store_records_s / 2.0, why));
        }
    }
    let mut line = String::from("\n| paced writes, QD32 | IOPS | lag p50 | lag p99 |\n|---|---|---|---|\n");
    for (placement, rate, why) in paced {
        let paced_target = replicas.create("paced", placement);
        prepare_image(&image);
        let paced_round = run_round(&work, &image, Some(&paced_target), (placement, cpus), |socket| {
            drive(socket, secs * 2.0, Some(rate))
        });
        let (paced_iops, mut paced_lags) = (paced_round.iops, paced_round.lags);
        replicas.delete(&paced_target);
        paced_lags.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let (p50, p99) = (percentile(&paced_lags, 0.5), percentile(&paced_lags, 0.99));
        let label = if replicas.is_ceph() { format!(", {}", placement.label()) } else { String::new() };
        line.push_str(&format!("| paced at {rate:.0}/s{why}{label} | {paced_iops:.0} | {p50:.0} ms | {p99:.0} ms |\n"));
        let key = if placement == Placement::Shared { "" } else { "own_core_" };
        json[format!("{key}paced_{rate:.0}_lag_p99_ms")] = p99.into();
        json[format!("{key}paced_{rate:.0}_lag_p50_ms")] = p50.into();
    }
    line.push_str(&format!(
        "\nLag: a write completed by the time the head was sampled (every 50 ms) until the manifest counts it \
         (polled every 10 ms). Remote snapshots stored during the unpaced rounds (--replica-delta-every {}): \
         {deltas}, {:.0} MiB.\n",
        std::env::var("REWIND_BENCH_DELTA_EVERY").unwrap_or_else(|_| "by default, 4× the volume".into()),
        delta_bytes as f64 / (1 << 20) as f64
    ));
    print!("{line}");
    md.push_str(&line);

    // The same writes from a guest, which (under TCG) issues far fewer of them than the load
    // generator: what a VM on this machine sees.
    let guest_secs = if quick { 5.0 } else { 10.0 };
    match Guest::prepare(&work, guest_secs) {
        Ok(guest) => {
            let (rounds_of, _, _) =
                measure_rounds(&mut replicas, &placements, rounds, &work, &image, "guest", |socket| guest.fio(socket));
            let heading = format!(
                "fio in a QEMU guest (TCG): 4 KiB random writes, libaio QD32, O_DIRECT, {guest_secs:.0} s; IOPS \
                 (median of {rounds})"
            );
            md.push('\n');
            md.push_str(&report_rounds(&heading, &placements, rounds_of, &mut json, "guest_"));
        }
        Err(why) => {
            let line = format!("\nNo guest rounds: {why}\n");
            print!("{line}");
            md.push_str(&line);
        }
    }

    // Recovery of the head after the same writes, from a replica with remote snapshots (the
    // default spacing) and from one without, each against downloading the objects it reads.
    let mut table = format!(
        "\nRecovery of the head from the replica after {secs:.0} s of QD32 writes (`rewind recover --from URL --seq \
         HEAD`), against downloading the same objects alone:\n\n\
         | replica | journal shipped | remote snapshots | objects read | recovery | download alone |\n|---|---|---|---|---|---|\n"
    );
    for (name, label, extra) in [
        ("deltas", "remote snapshots every 4× the volume (default)", Vec::new()),
        (
            "journal",
            "no remote snapshots (`--replica-delta-every 0`)",
            vec!["--replica-delta-every".into(), "0".into()],
        ),
    ] {
        prepare_image(&image);
        let recovery_target = replicas.create(&format!("recovery-{name}"), Placement::Shared);
        let (child, socket, control) = serve(&work, &image, Some(&recovery_target), &extra);
        wait_caught_up(&control, Duration::from_secs(120));
        drive(&socket, secs, None);
        wait_settled(&control, Duration::from_secs(600));
        stop(child);
        let manifest = rewind_replica::Replica::from_remote(remote(&recovery_target)).unwrap().manifest().clone();
        let remote = remote(&recovery_target);
        let journal = rewind_replica::restore::list_journal(&remote).unwrap();
        let journal_mib = journal.iter().map(|o| o.size).sum::<u64>() as f64 / (1 << 20) as f64;
        let newest = manifest.newest_point();
        let mut keys: Vec<String> =
            (0..manifest.base.parts).map(|part| PartOf::Base.key(manifest.base.seq, part)).collect();
        // What a recovery of the head reads: the newest full snapshot (else the base), the
        // deltas after it, the journal after the last of them.
        let start = manifest.deltas.iter().rposition(|d| d.full);
        if start.is_some() {
            keys.clear();
        }
        for delta in &manifest.deltas[start.unwrap_or(0)..] {
            keys.extend((0..delta.parts).map(|part| delta.parts_of().key(delta.seq, part)));
        }
        keys.extend(
            rewind_replica::restore::chain(&journal, newest + 1, manifest.shipped_seq)
                .unwrap()
                .into_iter()
                .map(|o| o.key),
        );
        let begin = Instant::now();
        let mut bytes = 0u64;
        remote
            .get_each(&keys, |_, data| {
                bytes += data.len() as u64;
                Ok(true)
            })
            .unwrap();
        let download = begin.elapsed().as_secs_f64();
        let output = work.join("recovered.img");
        let _ = fs::remove_file(&output);
        let begin = Instant::now();
        let recovered = Command::new(env!("CARGO_BIN_EXE_rewind"))
            .args(["recover", "--from", &recovery_target.url, "--seq", &manifest.shipped_seq.to_string()])
            .envs(recovery_target.env.iter().map(|(k, v)| (k, v)))
            .arg("--output")
            .arg(&output)
            .output()
            .unwrap();
        assert!(recovered.status.success(), "{}", String::from_utf8_lossy(&recovered.stderr));
        let recovery = begin.elapsed().as_secs_f64();
        // The daemon stopped at the shipped head: the image is what the recovery must give.
        assert!(
            fs::read(&output).unwrap() == fs::read(&image).unwrap(),
            "the recovered head differs from the image; the replica's snapshots: {:?}",
            manifest.deltas
        );
        let _ = fs::remove_file(&output);
        replicas.delete(&recovery_target);
        let mib = bytes as f64 / (1 << 20) as f64;
        let delta_mib = manifest.deltas.iter().map(|d| d.data_bytes).sum::<u64>() as f64 / (1 << 20) as f64;
        table.push_str(&format!(
            "| {label} | {journal_mib:.0} MiB | {} ({} full), {delta_mib:.0} MiB | {mib:.0} MiB in {} objects | {recovery:.2} s \
             ({:.0} MiB/s of objects) | {download:.2} s ({:.0} MiB/s) |\n",
            manifest.deltas.len(),
            manifest.deltas.iter().filter(|d| d.full).count(),
            keys.len(),
            mib / recovery,
            mib / download
        ));
        json[format!("recovery_{name}_s")] = recovery.into();
        json[format!("download_{name}_s")] = download.into();
        json[format!("journal_{name}_mib")] = journal_mib.into();
    }
    print!("{table}");
    md.push_str(&table);
    let out = Path::new("target/bench");
    fs::create_dir_all(out).unwrap();
    fs::write(out.join("replication.md"), &md).unwrap();
    fs::write(out.join("replication.json"), serde_json::to_string_pretty(&json).unwrap()).unwrap();
    drop(replicas);
    let _ = fs::remove_dir_all(&work);
}
