//! Helpers for tests that run the real `rewind serve` binary and talk to it over vhost-user
//! with libblkio, a frontend nobody here wrote.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

pub mod blocks;
pub mod cpu;
#[path = "../../crates/rewind-engine/tests/common/rng.rs"]
mod rng;
#[allow(unused_imports)] // not every test binary uses it
pub use rng::Rng;

pub fn rewind_bin() -> &'static str {
    env!("CARGO_BIN_EXE_rewind")
}

/// A running `rewind serve`.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
}

/// Waits until `path` exists (a socket the daemon creates), failing if the child exits.
pub fn wait_for_path(child: &mut Child, path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("rewind serve exited early: {status}");
        }
        assert!(Instant::now() < deadline, "{} did not appear", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Daemon {
    pub fn start(image: &Path, socket: &Path, extra: &[&str]) -> Self {
        // TEST_DAEMON_LOG=debug shows the daemon's vhost-user messages when a test fails.
        let level = std::env::var("TEST_DAEMON_LOG").unwrap_or_else(|_| "warn".into());
        Self::spawn(image, socket, extra, &level, Stdio::inherit())
    }

    /// Like `start`, with the daemon's log at `level` written to the file `log`.
    pub fn start_logging_to(image: &Path, socket: &Path, extra: &[&str], level: &str, log: &Path) -> Self {
        Self::spawn(image, socket, extra, level, std::fs::File::create(log).unwrap().into())
    }

    fn spawn(image: &Path, socket: &Path, extra: &[&str], level: &str, stderr: Stdio) -> Self {
        let _ = std::fs::remove_file(socket);
        let child = Command::new(rewind_bin())
            .arg("serve")
            .arg(image)
            .arg("--socket")
            .arg(socket)
            .args(extra)
            .env("RUST_LOG", level)
            .stdin(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let mut daemon = Self { child, socket: socket.to_path_buf() };
        daemon.wait_for_socket();
        daemon
    }

    /// CPU time (user + system) the daemon has used so far.
    pub fn cpu_time(&self) -> Duration {
        cpu::process_cpu(self.child.id())
    }

    /// SIGTERM, then the exit status, which must come within `limit`.
    pub fn terminate_within(mut self, limit: Duration) -> ExitStatus {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "rewind serve did not exit within {limit:?} of SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_for_socket(&mut self) {
        wait_for_path(&mut self.child, &self.socket);
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(self) -> ExitStatus {
        self.terminate_within(Duration::from_secs(60))
    }

    /// SIGKILL: what a crash leaves.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Daemon {
    /// A failing test must not leave its daemon running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A libblkio virtio-blk-vhost-user client with one shared buffer region.
pub struct Client {
    pub blkio: Blkio,
    pub queues: Vec<Blkioq>,
    pub region: MemoryRegion,
}

pub const REGION: usize = 4 << 20;

impl Client {
    pub fn connect(socket: &Path, num_queues: i32) -> Self {
        let mut blkio = Blkio::new("virtio-blk-vhost-user").unwrap();
        blkio.set_str("path", socket.to_str().unwrap()).unwrap();
        blkio.connect().unwrap();
        blkio.set_i32("num-queues", num_queues).unwrap();
        let region = blkio.alloc_mem_region(REGION).unwrap();
        let outcome = blkio.start().unwrap();
        blkio.map_mem_region(&region).unwrap();
        Self { blkio, queues: outcome.queues, region }
    }

    pub fn buffer(&mut self, at: usize, len: usize) -> &mut [u8] {
        assert!(at + len <= REGION);
        // SAFETY: the region is ours, mapped for REGION bytes, and no request is in flight.
        unsafe { std::slice::from_raw_parts_mut((self.region.addr + at) as *mut u8, len) }
    }

    /// Waits for `count` completions on queue `q`; returns their results by user data.
    pub fn complete(&mut self, q: usize, count: usize) -> Vec<(usize, i32)> {
        let mut done = Vec::new();
        while done.len() < count {
            let mut completions: Vec<std::mem::MaybeUninit<Completion>> =
                (0..count - done.len()).map(|_| std::mem::MaybeUninit::uninit()).collect();
            let mut timeout = Duration::from_secs(30);
            let n = self.queues[q].do_io(&mut completions, 1, Some(&mut timeout), None).unwrap();
            assert!(n > 0, "no completion within 30 s");
            for c in &completions[..n] {
                // SAFETY: do_io initialised the first n entries.
                let c = unsafe { c.assume_init_ref() };
                done.push((c.user_data, c.ret));
            }
        }
        done
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> i32 {
        self.buffer(0, data.len()).copy_from_slice(data);
        let ptr = self.region.addr as *const u8;
        self.queues[0].write(offset, ptr, data.len(), 0, ReqFlags::empty());
        self.complete(0, 1)[0].1
    }

    pub fn read(&mut self, offset: u64, len: usize) -> (i32, Vec<u8>) {
        let ptr = self.region.addr as *mut u8;
        self.queues[0].read(offset, ptr, len, 0, ReqFlags::empty());
        let ret = self.complete(0, 1)[0].1;
        (ret, self.buffer(0, len).to_vec())
    }

    pub fn flush(&mut self) -> i32 {
        self.queues[0].flush(0, ReqFlags::empty());
        self.complete(0, 1)[0].1
    }

    pub fn discard(&mut self, offset: u64, len: u64) -> i32 {
        self.queues[0].discard(offset, len, 0, ReqFlags::empty());
        self.complete(0, 1)[0].1
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> i32 {
        self.queues[0].write_zeroes(offset, len, 0, ReqFlags::empty());
        self.complete(0, 1)[0].1
    }
}

pub fn status_json(image: &Path) -> serde_json::Value {
    let out = Command::new(rewind_bin()).args(["status", "--json"]).arg(image).output().unwrap();
    assert!(out.status.success(), "status failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}
