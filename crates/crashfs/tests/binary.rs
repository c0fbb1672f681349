//! The binary as a shell script uses it: mount, a workload in another process killed with
//! SIGKILL, `crashfs ctl SOCKET crash`, the workload started again; SIGTERM unmounts.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_crashfs");

struct Daemon {
    child: Child,
    dir: TempDir,
}

impl Daemon {
    fn start(model: &str) -> Option<Daemon> {
        if !fuse_available() {
            return None;
        }
        let dir = TempDir::new();
        for sub in ["backing", "mnt"] {
            fs::create_dir(dir.0.join(sub)).unwrap();
        }
        let child = Command::new(BIN)
            .args(["mount", "--model", model, "--backing"])
            .arg(dir.0.join("backing"))
            .arg("--mountpoint")
            .arg(dir.0.join("mnt"))
            .arg("--control")
            .arg(dir.0.join("sock"))
            .spawn()
            .unwrap();
        let daemon = Daemon { child, dir };
        wait_for("the control socket", || daemon.socket().exists());
        Some(daemon)
    }

    fn mnt(&self) -> PathBuf {
        self.dir.0.join("mnt")
    }

    fn socket(&self) -> PathBuf {
        self.dir.0.join("sock")
    }

    fn ctl(&self, command: &str) -> Output {
        Command::new(BIN).arg("ctl").arg(self.socket()).args(command.split(' ')).output().unwrap()
    }

    fn signal(&self, signal: i32) {
        // SAFETY: plain syscall; the pid is our own child's, not reaped yet.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().unwrap().is_none() {
            self.signal(libc::SIGTERM);
            let _ = self.child.wait();
        }
    }
}

/// A child killed (SIGKILL) when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let started = Instant::now();
    while !ready() {
        assert!(started.elapsed() < Duration::from_secs(20), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sh(script: &str, mnt: &Path) -> Output {
    Command::new("sh").arg("-c").arg(script).env("M", mnt).output().unwrap()
}

fn mounted(mnt: &Path) -> bool {
    fs::read_to_string("/proc/mounts").unwrap().lines().any(|line| line.split(' ').nth(1) == mnt.to_str())
}

#[test]
fn kill_crash_restart_through_the_control_socket() {
    let Some(daemon) = Daemon::start("data-and-metadata") else { return };
    let mnt = daemon.mnt();
    let out =
        sh(r#"printf durable > "$M/f" && sync "$M/f" "$M" && printf ' lost' >> "$M/f" && printf x > "$M/new""#, &mnt);
    assert!(out.status.success(), "{out:?}");
    // A workload that dies with a file open and writes unsynced. Its output must not be the
    // test's: a sleep left behind by a failed test would hold cargo's pipe open.
    let workload = Command::new("sh")
        .arg("-c")
        .arg(r#"exec 3>>"$M/f"; printf ' more' >&3; touch "$M/ready"; exec sleep 100"#)
        .env("M", &mnt)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut workload = Killed(workload);
    wait_for("the workload", || mnt.join("ready").exists());
    let stats = daemon.ctl("stats");
    // f grew by 10 unsynced bytes, new holds 1; new and ready are not durable names.
    assert_eq!(String::from_utf8_lossy(&stats.stdout), "ok unsynced-files=2 unsynced-bytes=11 pending-entries=2\n");
    workload.0.kill().unwrap();
    workload.0.wait().unwrap();

    let crash = daemon.ctl("crash");
    assert!(crash.status.success(), "{crash:?}");
    let answer = String::from_utf8(crash.stdout).unwrap();
    assert!(answer.starts_with("ok model=data-and-metadata entries-reverted=2 files-reverted=1"), "{answer}");

    let out = sh(r#"cat "$M/f"; ls "$M""#, &mnt);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "durablef\n", "new and ready are gone");

    let bad = daemon.ctl("crash nonsense");
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stdout).starts_with("err unknown crash model"));
    assert!(daemon.ctl("sync-all").status.success());
}

#[test]
fn sigterm_unmounts_and_leaves_a_plain_directory() {
    let Some(mut daemon) = Daemon::start("data") else { return };
    let mnt = daemon.mnt();
    fs::write(mnt.join("f"), b"kept").unwrap();
    assert!(mounted(&mnt));
    daemon.signal(libc::SIGTERM);
    assert!(daemon.child.wait().unwrap().success());
    assert!(!mounted(&mnt));
    assert!(!daemon.socket().exists());
    let backing: Vec<_> = fs::read_dir(daemon.dir.0.join("backing")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(backing, ["f"], "no hidden directory left");
}

#[test]
fn sigterm_with_files_still_open_unmounts_too() {
    let Some(mut daemon) = Daemon::start("data") else { return };
    let mnt = daemon.mnt();
    fs::write(mnt.join("f"), b"open").unwrap();
    let holder = Command::new("sh")
        .arg("-c")
        .arg(r#"exec 3<"$M/f"; touch "$M/ready"; exec sleep 100"#)
        .env("M", &mnt)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _holder = Killed(holder);
    wait_for("the holder", || mnt.join("ready").exists());
    daemon.signal(libc::SIGTERM);
    assert!(daemon.child.wait().unwrap().success());
    assert!(!mounted(&mnt));
}

#[test]
fn a_dead_mount_is_detached_by_the_next_start() {
    let Some(mut daemon) = Daemon::start("data") else { return };
    let mnt = daemon.mnt();
    daemon.signal(libc::SIGKILL);
    daemon.child.wait().unwrap();
    assert_eq!(fs::metadata(&mnt).unwrap_err().raw_os_error(), Some(libc::ENOTCONN));
    let mount = crashfs::Mount::start(daemon.dir.0.join("backing"), &mnt, crashfs::Model::Data).unwrap();
    fs::write(mnt.join("f"), b"works").unwrap();
    mount.unmount().unwrap();
    assert!(!mounted(&mnt));
}
