//! A throwaway one-node Ceph for tests: a monitor, one OSD (memstore) and radosgw, all on
//! 127.0.0.1 under a temporary directory, started by the test (no systemd) and stopped when
//! dropped. The settings that make it start in seconds are in ../shared/notes/ceph.md.
#![allow(dead_code)] // the tests and the replication bench use different parts

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ACCESS_KEY: &str = "rewindtest";
const SECRET_KEY: &str = "rewindtestsecret";
const REGION: &str = "default";
const BRING_UP: Duration = Duration::from_secs(30);

pub struct Cluster {
    dir: tempfile::TempDir,
    conf: PathBuf,
    rgw_port: u16,
    /// Running daemons by role, stopped in reverse order of start.
    mon: Option<Child>,
    osd: Option<Child>,
    rgw: Option<Child>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn installed(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// Polls `ready` until it holds or `limit` passes.
fn wait_until(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(Instant::now() < deadline, "ceph: {what} not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Cluster {
    /// Starts a cluster, or returns None where Ceph is not installed.
    pub fn start_if_installed() -> Option<Self> {
        Self::start_if_installed_holding(4 << 30)
    }

    /// A cluster whose memory store holds `memstore_bytes` (a full store hangs; the OSD's
    /// memory grows to about 1.5 times what it holds).
    pub fn start_if_installed_holding(memstore_bytes: u64) -> Option<Self> {
        let needed = ["ceph-mon", "ceph-osd", "radosgw", "ceph", "ceph-authtool", "monmaptool", "radosgw-admin"];
        if !needed.iter().all(|p| installed(p)) {
            return None;
        }
        let started = Instant::now();
        let dir = tempfile::Builder::new().prefix("ceph").tempdir().unwrap();
        let conf = dir.path().join("ceph.conf");
        let mut cluster = Self { conf, rgw_port: free_port(), dir, mon: None, osd: None, rgw: None };
        cluster.write_conf(free_port(), memstore_bytes);
        cluster.start_monitor();
        cluster.start_osd();
        cluster.start_gateway();
        cluster.create_user();
        eprintln!("ceph: cluster up in {:?}", started.elapsed());
        Some(cluster)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write_conf(&self, mon_port: u16, memstore_bytes: u64) {
        let d = self.dir.path().display();
        for sub in ["run", "log", "mon", "osd/ceph-0", "rgw"] {
            std::fs::create_dir_all(self.path(sub)).unwrap();
        }
        let fsid = uuid::Uuid::new_v4();
        let conf = format!(
            "[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{mon_port}
ms bind msgr1 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
keyring = {d}/$name.keyring
run dir = {d}/run
admin socket = {d}/run/$name.asok
pid file = {d}/run/$name.pid
log file = {d}/log/$name.log
mon data = {d}/mon/$cluster-$id
osd data = {d}/osd/$cluster-$id
osd objectstore = memstore
memstore device bytes = {memstore_bytes}
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
osd crush chooseleaf type = 0
client mount timeout = 10
rados osd op timeout = 10
rados mon op timeout = 10
[mon]
paxos propose interval = 0.1
paxos min wait = 0.01
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:{rgw}
rgw data = {d}/rgw
",
            rgw = self.rgw_port
        );
        std::fs::write(&self.conf, conf).unwrap();
        self.run(
            "monmaptool",
            &[
                "--create",
                "--fsid",
                &fsid.to_string(),
                "--addv",
                "a",
                &format!("[v2:127.0.0.1:{mon_port}]"),
                self.path("monmap").to_str().unwrap(),
            ],
        );
    }

    /// Runs a Ceph tool to completion; panics with its output if it fails.
    fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self.command(program).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "ceph: {program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn try_run(&self, program: &str, args: &[&str]) -> Option<String> {
        let out = self.command(program).args(args).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.env("CEPH_CONF", &self.conf).stdin(Stdio::null());
        command
    }

    fn spawn(&self, program: &str, args: &[&str]) -> Child {
        let log = std::fs::File::create(self.path(&format!("log/{program}.out"))).unwrap();
        self.command(program).args(args).stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap()
    }

    fn start_monitor(&mut self) {
        let mon_keyring = self.path("mon.keyring");
        let admin_keyring = self.path("client.admin.keyring");
        let (mon_k, admin_k) = (mon_keyring.to_str().unwrap(), admin_keyring.to_str().unwrap());
        self.run("ceph-authtool", &["--create-keyring", mon_k, "--gen-key", "-n", "mon.", "--cap", "mon", "allow *"]);
        self.run(
            "ceph-authtool",
            &[
                "--create-keyring",
                admin_k,
                "--gen-key",
                "-n",
                "client.admin",
                "--cap",
                "mon",
                "allow *",
                "--cap",
                "osd",
                "allow *",
                "--cap",
                "mgr",
                "allow *",
            ],
        );
        self.run("ceph-authtool", &[mon_k, "--import-keyring", admin_k]);
        let monmap = self.path("monmap");
        self.run("ceph-mon", &["--mkfs", "-i", "a", "--monmap", monmap.to_str().unwrap(), "--keyring", mon_k]);
        self.mon = Some(self.spawn("ceph-mon", &["-i", "a", "-f"]));
        wait_until("the monitor", BRING_UP, || self.try_run("ceph", &["-s", "--connect-timeout", "2"]).is_some());
    }

    fn start_osd(&mut self) {
        let uuid = uuid::Uuid::new_v4().to_string();
        let id = self.run("ceph", &["osd", "new", &uuid]);
        assert_eq!(id.trim(), "0", "ceph: the OSD got id {id}");
        self.run("ceph-osd", &["-i", "0", "--mkfs", "--mkkey", "--osd-uuid", &uuid, "--no-mon-config"]);
        let keyring = self.path("osd.0.keyring");
        self.run(
            "ceph",
            &["auth", "add", "osd.0", "osd", "allow *", "mon", "allow profile osd", "-i", keyring.to_str().unwrap()],
        );
        self.osd = Some(self.spawn("ceph-osd", &["-i", "0", "-f"]));
        wait_until("the OSD", BRING_UP, || {
            self.try_run("ceph", &["osd", "dump", "--connect-timeout", "2"])
                .is_some_and(|dump| dump.contains("osd.0 up"))
        });
    }

    /// Starts radosgw (again) and waits until it answers HTTP.
    pub fn start_gateway(&mut self) {
        let keyring = self.path("client.rgw.a.keyring");
        if !keyring.exists() {
            self.run(
                "ceph",
                &[
                    "auth",
                    "get-or-create",
                    "client.rgw.a",
                    "mon",
                    "allow rw",
                    "osd",
                    "allow rwx",
                    "-o",
                    keyring.to_str().unwrap(),
                ],
            );
        }
        self.rgw = Some(self.spawn("radosgw", &["-n", "client.rgw.a", "-f"]));
        let port = self.rgw_port;
        wait_until("radosgw", BRING_UP, || TcpStream::connect(("127.0.0.1", port)).is_ok());
    }

    /// The running daemons' process ids.
    pub fn pids(&self) -> Vec<u32> {
        [&self.mon, &self.osd, &self.rgw].into_iter().flatten().map(Child::id).collect()
    }

    /// Stops radosgw (SIGTERM) and waits for it.
    pub fn stop_gateway(&mut self) {
        if let Some(child) = self.rgw.take() {
            stop(child);
        }
    }

    fn create_user(&self) {
        wait_until("the radosgw user", BRING_UP, || {
            self.try_run(
                "radosgw-admin",
                &[
                    "user",
                    "create",
                    "--uid=rewind",
                    "--display-name=rewind",
                    &format!("--access-key={ACCESS_KEY}"),
                    &format!("--secret-key={SECRET_KEY}"),
                ],
            )
            .is_some()
        });
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.rgw_port)
    }

    /// The environment S3 clients take the endpoint and keys from.
    pub fn s3_env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_string()),
            ("AWS_REGION", REGION.to_string()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// A signed S3 request with curl (object_store does not create buckets).
    fn s3(&self, method: &str, path: &str, extra: &[&str]) -> std::process::Output {
        Command::new("curl")
            .args(["-sS", "--fail-with-body", "-X", method, "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
            .args(["--aws-sigv4", &format!("aws:amz:{REGION}:s3"), "--user"])
            .arg(format!("{ACCESS_KEY}:{SECRET_KEY}"))
            .args(extra)
            .arg(format!("{}/{path}", self.endpoint()))
            .output()
            .unwrap()
    }

    pub fn create_bucket(&self, bucket: &str) {
        let deadline = Instant::now() + BRING_UP;
        loop {
            let out = self.s3("PUT", bucket, &[]);
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "ceph: creating bucket {bucket} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Keys of the objects in `bucket`.
    pub fn list_objects(&self, bucket: &str) -> Vec<String> {
        let listing = self.run("radosgw-admin", &["bucket", "list", &format!("--bucket={bucket}")]);
        let objects: serde_json::Value = serde_json::from_str(&listing).unwrap();
        objects.as_array().unwrap().iter().map(|o| o["name"].as_str().unwrap().to_string()).collect()
    }

    /// Flips one byte in the middle of an object.
    pub fn corrupt_object(&self, bucket: &str, key: &str) {
        let path = format!("{bucket}/{key}");
        let got = self.s3("GET", &path, &[]);
        assert!(got.status.success(), "GET {path}: {}", String::from_utf8_lossy(&got.stderr));
        let mut bytes = got.stdout;
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x20;
        let file = self.path("corrupt.bin");
        std::fs::write(&file, &bytes).unwrap();
        let put = self.s3("PUT", &path, &["--data-binary", &format!("@{}", file.display())]);
        assert!(put.status.success(), "PUT {path}: {}", String::from_utf8_lossy(&put.stderr));
    }
}

/// SIGTERM, then SIGKILL if it lingers; always reaped (orphans stay zombies here).
fn stop(mut child: Child) {
    // SAFETY: plain syscall on a child we own.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // radosgw, then the OSD, then the monitor: an OSD outliving the monitor is slow to stop.
        for child in [self.rgw.take(), self.osd.take(), self.mon.take()].into_iter().flatten() {
            stop(child);
        }
    }
}
