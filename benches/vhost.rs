//! Backend-bound I/O: a libblkio load generator drives `rewind serve` and qemu-storage-daemon
//! (its fastest sound configuration: page cache, io_uring) over the same kind of raw image,
//! alternating the two several times in one invocation and reporting medians. Also marker-add
//! latency on the control socket while rewind is under write load.
//!
//!   cargo bench --bench vhost        # writes target/bench/vhost.{md,json}
//!   REWIND_BENCH_QUICK=1 ...         # shorter runs
//!   REWIND_BENCH_ONLY=1MiB ...       # only workloads whose name contains this (for profiling);
//!                                    # `marker` or `memory` for only that section
//!   REWIND_BENCH_MEMORY_GIB="1 4 16" # journal sizes for the memory section (default "1 4")
//!   REWIND_BENCH_BASELINE=PATH ...   # also alternate another rewind binary (an earlier build)
//!                                    # with the two, for a before/after table
//!
//!   REWIND_BENCH_EXPORT_GIB="1 4 16" # volume sizes for the instant-access section (default "1 4")
//!
//! The instant-access section (`export`) fills a volume of N GiB with data, serves it, writes
//! 4 KiB random writes over its first GiB until the journal holds 1 GiB, adds a marker, and times
//! `point-export-add` of the marker to the export's first 4 KiB read completing (a libblkio
//! client connecting to the new socket), then 4 KiB random reads QD32 over that GiB through the
//! export and through the live disk (alternating), then a full `recover` of the same marker.
//!
//! The memory section serves a 1 TiB sparse image, writes 1 MiB pieces over its first GiB until
//! the journal holds N GiB, adds 10 000 markers, and reads the daemon's resident memory; then
//! again after a restart on that store; qemu-storage-daemon serving the same image is the peer.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};

const IMAGE_SIZE: u64 = 1 << 30;

#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    block: usize,
    depth: usize,
    queues: usize,
    write: bool,
    random: bool,
    flush_each: bool,
    /// The client spins over its queues instead of sleeping on their completion fds (only
    /// with several queues; one queue always blocks in do_io).
    spin: bool,
}

const WORKLOADS: [Workload; 6] = [
    Workload {
        name: "4 KiB random write QD32, 1 queue",
        block: 4096,
        depth: 32,
        queues: 1,
        write: true,
        random: true,
        flush_each: false,
        spin: false,
    },
    Workload {
        name: "4 KiB random write QD32, 2 queues",
        block: 4096,
        depth: 32,
        queues: 2,
        write: true,
        random: true,
        flush_each: false,
        spin: false,
    },
    Workload {
        name: "4 KiB random write QD32, 2 queues, spinning client",
        block: 4096,
        depth: 32,
        queues: 2,
        write: true,
        random: true,
        flush_each: false,
        spin: true,
    },
    Workload {
        name: "4 KiB random read QD32",
        block: 4096,
        depth: 32,
        queues: 1,
        write: false,
        random: true,
        flush_each: false,
        spin: false,
    },
    Workload {
        name: "1 MiB sequential write QD8",
        block: 1 << 20,
        depth: 8,
        queues: 1,
        write: true,
        random: false,
        flush_each: false,
        spin: false,
    },
    Workload {
        name: "4 KiB random write QD1 + flush each",
        block: 4096,
        depth: 1,
        queues: 1,
        write: true,
        random: true,
        flush_each: true,
        spin: false,
    },
];

#[derive(Clone, Copy, PartialEq)]
enum Backend {
    Rewind,
    /// The rewind binary REWIND_BENCH_BASELINE names.
    Baseline,
    Qsd,
}

fn baseline_binary() -> Option<PathBuf> {
    std::env::var_os("REWIND_BENCH_BASELINE").map(PathBuf::from)
}

#[derive(Default, Clone)]
struct Sample {
    iops: f64,
    mib_s: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_us_per_io: f64,
}

#[path = "../tests/common/cpu.rs"]
mod cpu;
#[path = "../crates/rewind-engine/tests/common/rng.rs"]
mod rng;
use rng::Rng;

/// Both backends get an image written the same way: in 4 KiB pieces (how a file is written
/// changes later 4 KiB write costs on this kernel).
fn prepare_image(path: &Path) {
    let _ = fs::remove_file(path);
    let file = OpenOptions::new().write(true).create(true).truncate(true).open(path).unwrap();
    let block: Vec<u8> = (0..4096).map(|i| (i % 251) as u8 + 1).collect();
    for i in 0..IMAGE_SIZE / 4096 {
        file.write_all_at(&block, i * 4096).unwrap();
    }
    file.sync_all().unwrap();
}

fn wait_for(path: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        assert!(child.try_wait().unwrap().is_none(), "backend exited early");
        assert!(Instant::now() < deadline, "backend socket never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn start(backend: Backend, work: &Path, image: &Path, queues: usize) -> (Child, PathBuf) {
    let _ = fs::remove_dir_all(rewind::store::default_store_dir(image));
    start_on_store(backend, work, image, queues)
}

/// [`start`] without removing the store a previous run left.
fn start_on_store(backend: Backend, work: &Path, image: &Path, queues: usize) -> (Child, PathBuf) {
    let socket = work.join("bench.sock");
    let _ = fs::remove_file(&socket);
    let mut child = match backend {
        Backend::Rewind | Backend::Baseline => {
            let binary = match backend {
                Backend::Baseline => baseline_binary().expect("REWIND_BENCH_BASELINE is set"),
                _ => PathBuf::from(env!("CARGO_BIN_EXE_rewind")),
            };
            Command::new(binary)
                .arg("serve")
                .arg(image)
                .arg("--socket")
                .arg(&socket)
                .args(["--num-queues", &queues.to_string(), "--queue-size", "1024", "--control"])
                .arg(work.join("bench.ctl"))
                // Control commands log how long the daemon took over each (marker_latency).
                .env("RUST_LOG", "warn,rewind::control=debug")
                .stderr(File::create(work.join("rewind.log")).unwrap())
                .spawn()
                .unwrap()
        }
        Backend::Qsd => Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=f0,filename={},cache.direct=off,aio=io_uring", image.display()))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
                socket.display()
            ))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    };
    wait_for(&socket, &mut child);
    (child, socket)
}

/// Runs `w` for `secs` against the socket; returns (ios, latencies in µs).
fn drive(socket: &Path, w: Workload, secs: f64) -> (u64, Vec<f64>) {
    let mut blkio = Blkio::new("virtio-blk-vhost-user").unwrap();
    blkio.set_str("path", socket.to_str().unwrap()).unwrap();
    blkio.connect().unwrap();
    blkio.set_i32("num-queues", w.queues as i32).unwrap();
    let region_len = w.block * w.depth * w.queues;
    let region = blkio.alloc_mem_region(region_len.max(1 << 20)).unwrap();
    let mut queues = blkio.start().unwrap().queues;
    blkio.map_mem_region(&region).unwrap();
    // SAFETY: the region is mapped for its length and only used as I/O buffers.
    unsafe { std::ptr::write_bytes(region.addr as *mut u8, 0x5a, region_len) };
    let mut rng = Rng(0x9e37_79b9);
    let blocks = IMAGE_SIZE / w.block as u64;
    let mut sequential = 0u64;
    let mut next_offset = |rng: &mut Rng| {
        if w.random {
            (rng.next() % blocks) * w.block as u64
        } else {
            sequential = (sequential + 1) % blocks;
            sequential * w.block as u64
        }
    };
    let mut started = vec![Instant::now(); w.depth * w.queues];
    let mut flushing = vec![false; w.depth * w.queues];
    let submit = |q: &mut blkio::Blkioq, slot: usize, offset: u64| {
        let buf = region.addr + slot * w.block;
        if w.write {
            q.write(offset, buf as *const u8, w.block, slot, ReqFlags::empty());
        } else {
            q.read(offset, buf as *mut u8, w.block, slot, ReqFlags::empty());
        }
    };
    for (qi, q) in queues.iter_mut().enumerate() {
        for d in 0..w.depth {
            let slot = qi * w.depth + d;
            started[slot] = Instant::now();
            submit(q, slot, next_offset(&mut rng));
        }
    }
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut latencies = Vec::new();
    let mut ios = 0u64;
    let mut completions: Vec<std::mem::MaybeUninit<Completion>> =
        (0..w.depth).map(|_| std::mem::MaybeUninit::uninit()).collect();
    // One queue: block in do_io. Several: sweep them without blocking, and when a sweep finds
    // nothing, sleep on their completion fds rather than spin (a spinning client would take a
    // core from the backend on this 2-core machine).
    let mut completion_fds: Vec<libc::pollfd> = Vec::new();
    if w.queues > 1 && !w.spin {
        for q in queues.iter_mut() {
            q.set_completion_fd_enabled(true);
            let fd = q.get_completion_fd().expect("virtio-blk queues have a completion fd");
            completion_fds.push(libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
        }
    }
    while Instant::now() < deadline {
        let mut swept = 0;
        for (qi, q) in queues.iter_mut().enumerate() {
            let min = if w.queues == 1 { 1 } else { 0 };
            let n = q.do_io(&mut completions, min, None, None).unwrap();
            swept += n;
            for c in &completions[..n] {
                // SAFETY: do_io initialised the first n entries.
                let c = unsafe { c.assume_init_ref() };
                assert_eq!(c.ret, 0, "I/O error from the backend");
                let slot = c.user_data;
                if w.flush_each && !flushing[slot] {
                    flushing[slot] = true;
                    q.flush(slot, ReqFlags::empty());
                    continue;
                }
                flushing[slot] = false;
                latencies.push(started[slot].elapsed().as_secs_f64() * 1e6);
                ios += 1;
                started[slot] = Instant::now();
                debug_assert_eq!(slot / w.depth, qi);
                submit(q, slot, next_offset(&mut rng));
            }
        }
        if swept == 0 && !completion_fds.is_empty() {
            // SAFETY: poll(2) on fds the queues own, with a timeout so the deadline is seen.
            unsafe { libc::poll(completion_fds.as_mut_ptr(), completion_fds.len() as libc::nfds_t, 100) };
            for pfd in &completion_fds {
                if pfd.revents & libc::POLLIN != 0 {
                    let mut count = 0u64;
                    // SAFETY: reading an eventfd's 8-byte counter into a u64 we own.
                    unsafe { libc::read(pfd.fd, (&mut count as *mut u64).cast(), 8) };
                }
            }
        }
    }
    // Drain what is in flight before disconnecting.
    for q in queues.iter_mut() {
        let mut left = w.depth;
        while left > 0 {
            left -= q.do_io(&mut completions, 1, None, None).unwrap();
        }
    }
    (ios, latencies)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p) as usize]
}

fn run_once(backend: Backend, work: &Path, image: &Path, w: Workload, secs: f64) -> Sample {
    let (child, socket) = start(backend, work, image, w.queues);
    let cpu_before = cpu::process_cpu(child.id()).as_secs_f64();
    let begin = Instant::now();
    let (ios, mut latencies) = drive(&socket, w, secs);
    let elapsed = begin.elapsed().as_secs_f64();
    let cpu = cpu::process_cpu(child.id()).as_secs_f64() - cpu_before;
    stop(child);
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Sample {
        iops: ios as f64 / elapsed,
        mib_s: ios as f64 * w.block as f64 / elapsed / (1 << 20) as f64,
        p50_us: percentile(&latencies, 0.5),
        p99_us: percentile(&latencies, 0.99),
        cpu_us_per_io: cpu / ios as f64 * 1e6,
    }
}

fn median_sample(samples: &[Sample]) -> Sample {
    let median = |f: fn(&Sample) -> f64| {
        let mut v: Vec<f64> = samples.iter().map(f).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    Sample {
        iops: median(|s| s.iops),
        mib_s: median(|s| s.mib_s),
        p50_us: median(|s| s.p50_us),
        p99_us: median(|s| s.p99_us),
        cpu_us_per_io: median(|s| s.cpu_us_per_io),
    }
}

/// A QMP session on rewind's control socket, capabilities negotiated.
struct Control {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Control {
    fn connect(child: &mut Child, path: &Path) -> Self {
        wait_for(path, child);
        let stream = UnixStream::connect(path).unwrap();
        let mut control = Self { reader: BufReader::new(stream.try_clone().unwrap()), writer: stream };
        control.read_reply(); // the greeting
        control.execute(r#"{"execute":"qmp_capabilities"}"#);
        control
    }

    fn read_reply(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        line
    }

    fn execute(&mut self, command: &str) {
        writeln!(self.writer, "{command}").unwrap();
        let reply = self.read_reply();
        assert!(reply.contains("\"return\""), "{command}: {reply}");
    }

    fn add_marker(&mut self, name: &str) {
        self.execute(&format!(r#"{{"execute":"marker-add","arguments":{{"name":"{name}"}}}}"#));
    }

    /// Runs a command that starts a job and waits for its `JOB_COMPLETED` event.
    fn run_job(&mut self, command: &str) {
        self.execute(command);
        loop {
            let line = self.read_reply();
            assert!(!line.is_empty(), "the daemon closed the control socket");
            if line.contains("JOB_COMPLETED") {
                assert!(line.contains("concluded"), "{command}: {line}");
                return;
            }
        }
    }
}

/// marker-add latency on the control socket while a frontend writes at QD32.
fn marker_latency(work: &Path, image: &Path, secs: f64) -> MarkerLatency {
    let (mut child, socket) = start(Backend::Rewind, work, image, 1);
    let mut control = Control::connect(&mut child, &work.join("bench.ctl"));
    let w = WORKLOADS[0];
    let load = std::thread::spawn(move || drive(&socket, w, secs));
    let mut latencies = Vec::new();
    let deadline = Instant::now() + Duration::from_secs_f64(secs * 0.8);
    let mut i = 0;
    while Instant::now() < deadline {
        let start = Instant::now();
        control.add_marker(&format!("m{i}"));
        latencies.push(start.elapsed().as_secs_f64() * 1e6);
        i += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    load.join().unwrap();
    stop(child);
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let log = fs::read_to_string(work.join("rewind.log")).unwrap();
    let mut in_daemon: Vec<f64> = log
        .lines()
        .filter_map(|line| line.split("control: marker-add handled in ").nth(1))
        .map(|rest| rest.trim_end_matches(" µs").parse().unwrap())
        .collect();
    assert_eq!(in_daemon.len(), latencies.len(), "one timing logged per marker-add");
    in_daemon.sort_by(|a, b| a.partial_cmp(b).unwrap());
    MarkerLatency {
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
        in_daemon_p50: percentile(&in_daemon, 0.5),
        in_daemon_p99: percentile(&in_daemon, 0.99),
    }
}

/// Resident and peak memory of a process, in MiB.
fn memory_mib(pid: u32) -> (f64, f64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<f64>().unwrap() / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn dir_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum()
}

const MEMORY_VOLUME: u64 = 1 << 40;
const MEMORY_MARKERS: usize = 10_000;

/// The memory section's figures for one journal size, in MiB.
struct Footprint {
    journal_gib: f64,
    serving: (f64, f64),
    reopened: (f64, f64),
    reopen_secs: f64,
    peer: (f64, f64),
}

/// rewind serving a 1 TiB sparse image whose journal holds `journal_gib` GiB and 10 000 markers.
fn memory_footprint(work: &Path, journal_gib: u64) -> Footprint {
    let image = work.join("memory.img");
    let _ = fs::remove_file(&image);
    File::create(&image).unwrap().set_len(MEMORY_VOLUME).unwrap();
    let journal = rewind::store::default_store_dir(&image).join("journal");
    let writes = WORKLOADS.into_iter().find(|w| w.block == 1 << 20).expect("a 1 MiB write workload");
    let (mut child, socket) = start(Backend::Rewind, work, &image, 1);
    let mut control = Control::connect(&mut child, &work.join("bench.ctl"));
    while dir_bytes(&journal) < journal_gib << 30 {
        drive(&socket, writes, 5.0);
    }
    for i in 0..MEMORY_MARKERS {
        control.add_marker(&format!("marker-{i}"));
    }
    let serving = memory_mib(child.id());
    let journal_bytes = dir_bytes(&journal);
    drop(control);
    stop(child);

    let opening = Instant::now();
    let (child, socket) = start_on_store(Backend::Rewind, work, &image, 1);
    let reopen_secs = opening.elapsed().as_secs_f64();
    drive(&socket, writes, 1.0);
    let reopened = memory_mib(child.id());
    stop(child);
    let _ = fs::remove_dir_all(rewind::store::default_store_dir(&image));

    let (child, socket) = start(Backend::Qsd, work, &image, 1);
    drive(&socket, writes, 1.0);
    let peer = memory_mib(child.id());
    stop(child);
    fs::remove_file(&image).unwrap();
    Footprint { journal_gib: journal_bytes as f64 / (1u64 << 30) as f64, serving, reopened, reopen_secs, peer }
}

/// The instant-access section's figures for one volume size.
struct InstantAccess {
    volume_gib: u64,
    journal_gib: f64,
    /// `point-export-add` sent to its reply, and to the export's first read completing (s).
    add_secs: f64,
    first_read_secs: f64,
    export: Sample,
    live: Sample,
    recover_secs: f64,
}

/// Writes `len` bytes of data (no holes) into a new file at `path`, 1 MiB at a time.
fn filled_image(path: &Path, len: u64) {
    let _ = fs::remove_file(path);
    let file = File::create(path).unwrap();
    let mut rng = Rng(0x1111);
    let chunk = rng.bytes(1 << 20);
    for i in 0..len >> 20 {
        file.write_all_at(&chunk, i << 20).unwrap();
    }
    file.sync_all().unwrap();
}

/// 4 KiB random reads QD32 for `secs` on `socket`.
fn read_sample(socket: &Path, secs: f64) -> Sample {
    let w = WORKLOADS.into_iter().find(|w| !w.write && w.block == 4096).expect("a 4 KiB read workload");
    let begin = Instant::now();
    let (ios, mut latencies) = drive(socket, w, secs);
    let elapsed = begin.elapsed().as_secs_f64();
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Sample {
        iops: ios as f64 / elapsed,
        mib_s: ios as f64 * 4096.0 / elapsed / (1 << 20) as f64,
        p50_us: percentile(&latencies, 0.5),
        p99_us: percentile(&latencies, 0.99),
        cpu_us_per_io: 0.0,
    }
}

/// The figures of the instant-access section for a volume of `volume_gib` GiB (see the module
/// documentation).
fn instant_access(work: &Path, volume_gib: u64, rounds: usize, secs: f64) -> InstantAccess {
    let image = work.join("instant.img");
    let _ = fs::remove_dir_all(rewind::store::default_store_dir(&image));
    filled_image(&image, volume_gib << 30);
    let journal = rewind::store::default_store_dir(&image).join("journal");
    let (mut child, socket) = start(Backend::Rewind, work, &image, 1);
    let mut control = Control::connect(&mut child, &work.join("bench.ctl"));
    while dir_bytes(&journal) < 1 << 30 {
        drive(&socket, WORKLOADS[0], 5.0);
    }
    let journal_gib = dir_bytes(&journal) as f64 / (1u64 << 30) as f64;
    control.add_marker("point");

    // The daemon takes only absolute paths (its working directory is not the client's).
    let export_socket = std::path::absolute(work.join("export.sock")).unwrap();
    let _ = fs::remove_file(&export_socket);
    let asked = Instant::now();
    control.execute(&format!(
        r#"{{"execute":"point-export-add","arguments":{{"marker":"point","socket":"{}"}}}}"#,
        export_socket.display()
    ));
    let add_secs = asked.elapsed().as_secs_f64();
    let first_read_secs = {
        let mut blkio = Blkio::new("virtio-blk-vhost-user").unwrap();
        blkio.set_str("path", export_socket.to_str().unwrap()).unwrap();
        blkio.connect().unwrap();
        let region = blkio.alloc_mem_region(1 << 20).unwrap();
        let mut queues = blkio.start().unwrap().queues;
        blkio.map_mem_region(&region).unwrap();
        queues[0].read(0, region.addr as *mut u8, 4096, 0, ReqFlags::empty());
        let mut completion = [std::mem::MaybeUninit::<Completion>::uninit()];
        assert_eq!(queues[0].do_io(&mut completion, 1, None, None).unwrap(), 1);
        asked.elapsed().as_secs_f64()
    };

    let mut export = Vec::new();
    let mut live = Vec::new();
    for round in 1..=rounds {
        export.push(read_sample(&export_socket, secs));
        live.push(read_sample(&socket, secs));
        // Each round's pair, for the spread behind the medians (the first rounds run while the
        // export reads its files into the page cache).
        let (e, l) = (export[round - 1].iops, live[round - 1].iops);
        eprintln!("export round {round}: {e:.0} IOPS through the export, {l:.0} live ({:.2}x)", e / l);
    }

    let recovered = std::path::absolute(work.join("recovered.img")).unwrap();
    let _ = fs::remove_file(&recovered);
    let asked = Instant::now();
    control.run_job(&format!(
        r#"{{"execute":"recover","arguments":{{"marker":"point","output":"{}"}}}}"#,
        recovered.display()
    ));
    let recover_secs = asked.elapsed().as_secs_f64();
    drop(control);
    stop(child);
    fs::remove_file(&recovered).unwrap();
    fs::remove_file(&image).unwrap();
    let _ = fs::remove_dir_all(rewind::store::default_store_dir(&image));
    InstantAccess {
        volume_gib,
        journal_gib,
        add_secs,
        first_read_secs,
        export: median_sample(&export),
        live: median_sample(&live),
        recover_secs,
    }
}

fn stop(mut child: Child) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
}

/// marker-add round trips as the client sees them, and the daemon's share (request read to
/// reply sent), in µs.
struct MarkerLatency {
    p50: f64,
    p99: f64,
    in_daemon_p50: f64,
    in_daemon_p99: f64,
}

fn main() {
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let quick = std::env::var_os("REWIND_BENCH_QUICK").is_some();
    let (rounds, secs) = if quick { (3, 2.0) } else { (5, 5.0) };
    let work = PathBuf::from(std::env::var("REWIND_BENCH_DIR").unwrap_or_else(|_| "target/bench/vhost-work".into()));
    fs::create_dir_all(&work).unwrap();
    let image = work.join("bench.img");
    let mut md = String::from(
        "| workload | rewind IOPS | qsd IOPS | ratio | rewind MiB/s | qsd MiB/s | rewind p50/p99 µs | qsd p50/p99 µs | rewind CPU µs/IO | qsd CPU µs/IO |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut json = Vec::new();
    let only = std::env::var("REWIND_BENCH_ONLY").ok();
    let mut backends = vec![Backend::Rewind, Backend::Qsd];
    if baseline_binary().is_some() {
        backends.push(Backend::Baseline);
    }
    let mut before_after = String::from(
        "\nBefore/after (REWIND_BENCH_BASELINE, alternated in the same runs):\n\n\
         | workload | rewind IOPS | baseline IOPS | rewind/baseline | rewind/qsd | baseline/qsd |\n|---|---|---|---|---|---|\n",
    );
    for w in WORKLOADS.into_iter().filter(|w| only.as_deref().is_none_or(|o| w.name.replace(' ', "").contains(o))) {
        let (mut ours, mut peer, mut baseline) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            for &backend in &backends {
                prepare_image(&image);
                let sample = run_once(backend, &work, &image, w, secs);
                match backend {
                    Backend::Rewind => ours.push(sample),
                    Backend::Qsd => peer.push(sample),
                    Backend::Baseline => baseline.push(sample),
                }
            }
        }
        let (o, p) = (median_sample(&ours), median_sample(&peer));
        if !baseline.is_empty() {
            let b = median_sample(&baseline);
            before_after.push_str(&format!(
                "| {} | {:.0} | {:.0} | {:.2}× | {:.2}× | {:.2}× |\n",
                w.name,
                o.iops,
                b.iops,
                o.iops / b.iops,
                o.iops / p.iops,
                b.iops / p.iops
            ));
        }
        let ratio = o.iops / p.iops;
        let row = format!(
            "| {} | {:.0} | {:.0} | {:.2}× | {:.0} | {:.0} | {:.0}/{:.0} | {:.0}/{:.0} | {:.1} | {:.1} |\n",
            w.name,
            o.iops,
            p.iops,
            ratio,
            o.mib_s,
            p.mib_s,
            o.p50_us,
            o.p99_us,
            p.p50_us,
            p.p99_us,
            o.cpu_us_per_io,
            p.cpu_us_per_io
        );
        print!("{row}");
        md.push_str(&row);
        json.push(serde_json::json!({"workload": w.name, "ratio": ratio,
            "rewind": {"iops": o.iops, "mib_s": o.mib_s, "p50_us": o.p50_us, "p99_us": o.p99_us, "cpu_us_per_io": o.cpu_us_per_io},
            "qemu-storage-daemon": {"iops": p.iops, "mib_s": p.mib_s, "p50_us": p.p50_us, "p99_us": p.p99_us, "cpu_us_per_io": p.cpu_us_per_io}}));
    }
    if baseline_binary().is_some() {
        print!("{before_after}");
        md.push_str(&before_after);
    }
    let section = |name: &str| only.as_deref().is_none_or(|o| name.contains(o));
    if section("marker") {
        prepare_image(&image);
        let marker = marker_latency(&work, &image, secs * 2.0);
        let line = format!(
            "\nmarker-add on the control socket under 4 KiB QD32 write load: p50 {:.0} µs, p99 {:.0} µs \
             (inside the daemon, request read to reply sent: p50 {:.0} µs, p99 {:.0} µs)\n",
            marker.p50, marker.p99, marker.in_daemon_p50, marker.in_daemon_p99
        );
        print!("{line}");
        md.push_str(&line);
        json.push(serde_json::json!({"marker-add under load": {"p50_us": marker.p50, "p99_us": marker.p99,
            "in_daemon_p50_us": marker.in_daemon_p50, "in_daemon_p99_us": marker.in_daemon_p99}}));
    }
    if section("export") {
        let sizes = std::env::var("REWIND_BENCH_EXPORT_GIB").unwrap_or_else(|_| "1 4".into());
        let mut table = String::from(
            "\nInstant access: a volume of N GiB (all data) with 1 GiB of 4 KiB random writes journaled since its \
             snapshot; a marker exported with point-export-add, against a full recover of it:\n\n\
             | volume GiB | journal GiB | point-export-add reply s | to first read s | export 4 KiB rand read QD32 IOPS | live IOPS | ratio | export p50/p99 µs | live p50/p99 µs | full recover s |\n\
             |---|---|---|---|---|---|---|---|---|---|\n",
        );
        for gib in sizes.split_whitespace().map(|g| g.parse::<u64>().expect("REWIND_BENCH_EXPORT_GIB: GiB numbers")) {
            let f = instant_access(&work, gib, rounds, secs);
            let row = format!(
                "| {} | {:.2} | {:.3} | {:.3} | {:.0} | {:.0} | {:.2}× | {:.0}/{:.0} | {:.0}/{:.0} | {:.1} |\n",
                f.volume_gib,
                f.journal_gib,
                f.add_secs,
                f.first_read_secs,
                f.export.iops,
                f.live.iops,
                f.export.iops / f.live.iops,
                f.export.p50_us,
                f.export.p99_us,
                f.live.p50_us,
                f.live.p99_us,
                f.recover_secs
            );
            print!("{row}");
            table.push_str(&row);
            json.push(serde_json::json!({"instant access": {"volume_gib": f.volume_gib, "journal_gib": f.journal_gib,
                "export_add_secs": f.add_secs, "first_read_secs": f.first_read_secs,
                "export_read_iops": f.export.iops, "live_read_iops": f.live.iops, "recover_secs": f.recover_secs}}));
        }
        md.push_str(&table);
    }
    if section("memory") {
        let sizes = std::env::var("REWIND_BENCH_MEMORY_GIB").unwrap_or_else(|_| "1 4".into());
        let mut table = format!(
            "\nMemory serving a 1 TiB sparse image with {MEMORY_MARKERS} markers (MiB; resident/peak):\n\n\
             | journal GiB | rewind serving | rewind after a restart | restart s (with writeback of the load) | qsd serving |\n|---|---|---|---|---|\n"
        );
        for gib in sizes.split_whitespace().map(|g| g.parse::<u64>().expect("REWIND_BENCH_MEMORY_GIB: GiB numbers")) {
            let f = memory_footprint(&work, gib);
            let row = format!(
                "| {:.1} | {:.0}/{:.0} | {:.0}/{:.0} | {:.1} | {:.0}/{:.0} |\n",
                f.journal_gib, f.serving.0, f.serving.1, f.reopened.0, f.reopened.1, f.reopen_secs, f.peer.0, f.peer.1
            );
            print!("{row}");
            table.push_str(&row);
            json.push(serde_json::json!({"memory": {"journal_gib": f.journal_gib, "markers": MEMORY_MARKERS,
                "rewind_rss_mib": f.serving.0, "rewind_peak_mib": f.serving.1,
                "rewind_restarted_rss_mib": f.reopened.0, "rewind_restarted_peak_mib": f.reopened.1,
                "restart_secs": f.reopen_secs, "qsd_rss_mib": f.peer.0, "qsd_peak_mib": f.peer.1}}));
        }
        md.push_str(&table);
    }
    let out = Path::new("target/bench");
    fs::create_dir_all(out).unwrap();
    fs::write(out.join("vhost.md"), &md).unwrap();
    fs::write(out.join("vhost.json"), serde_json::to_string_pretty(&json).unwrap()).unwrap();
    let _ = fs::remove_dir_all(&work);
}
