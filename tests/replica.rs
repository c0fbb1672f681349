//! Off-host replication end to end: `rewind serve --replicate` with a libblkio frontend
//! writing, markers added over the control socket, and every marker recovered byte for byte by
//! `rewind recover --from` into another directory with no local store. Against a directory
//! (`file://`) here always; against a real one-node Ceph (radosgw) when Ceph is installed (see
//! tests/common/ceph.rs and scripts/test).

mod common;

#[path = "common/ceph.rs"]
mod ceph;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{rewind_bin, wait_for_path, Client, Daemon, Rng};
use rewind::control::protocol::{AgentCommand, HostCommand};
use rewind::control::replies::{Event, MarkerAdded, Status};
use rewind::qmp_client::QmpClient;
use rewind_replica::ReplicationStatus;

const SIZE: u64 = 16 << 20;
const BLOCK: u64 = 4096;

/// A daemon serving a fresh image with a control socket, replicating to `url`.
struct Replicated {
    daemon: Daemon,
    control: PathBuf,
}

fn serve_replicated(dir: &Path, url: &str, env: &[(String, String)], extra: &[&str]) -> Replicated {
    let image = dir.join("disk.img");
    let control = dir.join("control.sock");
    let socket = dir.join("vhost.sock");
    let _ = std::fs::remove_file(&socket);
    let level = std::env::var("TEST_DAEMON_LOG").unwrap_or_else(|_| "warn".into());
    let mut command = Command::new(rewind_bin());
    command
        .arg("serve")
        .arg(&image)
        .arg("--socket")
        .arg(&socket)
        .args(["--size", "16M", "--control"])
        .arg(&control)
        .args(["--replicate", url])
        .args(extra)
        .env("RUST_LOG", level)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(std::process::Stdio::null());
    let mut child = command.spawn().unwrap();
    wait_for_path(&mut child, &socket);
    wait_for_path(&mut child, &control);
    Replicated { daemon: Daemon { child, socket }, control }
}

/// Random 4 KiB writes through the frontend, mirrored into `model`.
fn write_random(client: &mut Client, model: &mut [u8], rng: &mut Rng, count: usize) {
    for _ in 0..count {
        let offset = (rng.next() % (SIZE / BLOCK)) * BLOCK;
        let data = rng.bytes(BLOCK as usize);
        assert_eq!(client.write(offset, &data), 0);
        model[offset as usize..(offset + BLOCK) as usize].copy_from_slice(&data);
    }
}

fn add_marker(control: &Path, name: &str) -> u64 {
    let mut qmp = QmpClient::connect(control).unwrap();
    let added: MarkerAdded = qmp.execute(AgentCommand::MarkerAdd { name: name.into(), note: None }).unwrap();
    added.seq
}

fn replication(control: &Path) -> ReplicationStatus {
    QmpClient::connect(control).unwrap().execute(HostCommand::QueryReplication).unwrap()
}

/// Polls `query-replication` until `done` holds, for at most `limit`.
fn wait_replication(
    control: &Path,
    limit: Duration,
    what: &str,
    done: impl Fn(&ReplicationStatus) -> bool,
) -> ReplicationStatus {
    let deadline = Instant::now() + limit;
    loop {
        let status = replication(control);
        if done(&status) {
            return status;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}: {status:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until every record the daemon holds now is shipped.
fn caught_up(control: &Path, limit: Duration) -> ReplicationStatus {
    let status: Status = QmpClient::connect(control).unwrap().execute(AgentCommand::QueryStatus).unwrap();
    wait_replication(control, limit, "caught up", |s| !s.failing && s.shipped_seq >= status.head)
}

fn rewind_with(env: &[(String, String)], args: &[&str]) -> std::process::Output {
    Command::new(rewind_bin()).args(args).envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str()))).output().unwrap()
}

/// Recovers `--marker`/`--seq`/`--time` from `url` into `output` (another "host": no store)
/// and returns the image's bytes.
fn recover_from(env: &[(String, String)], url: &str, target: &[&str], output: &Path) -> Vec<u8> {
    let mut args = vec!["recover", "--from", url];
    args.extend_from_slice(target);
    args.extend_from_slice(&["--output", output.to_str().unwrap()]);
    let out = rewind_with(env, &args);
    assert!(out.status.success(), "recover {target:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::read(output).unwrap()
}

fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

/// `rounds` rounds of 200 random writes and a flush, each followed by a marker `NAME-ROUND`;
/// returns each marker with the volume it names.
fn marked_rounds(
    client: &mut Client,
    control: &Path,
    rng: &mut Rng,
    model: &mut [u8],
    name: &str,
    rounds: usize,
) -> Vec<(String, Vec<u8>)> {
    let mut points = Vec::new();
    for round in 0..rounds {
        write_random(client, model, rng, 200);
        assert_eq!(client.flush(), 0);
        let marker = format!("{name}-{round}");
        add_marker(control, &marker);
        points.push((marker, model.to_vec()));
    }
    points
}

/// The scenario every backend runs: markers and writes on a live daemon, recovered from the
/// replica alone (remote snapshots every MiB shipped, so most points are a base, deltas and a
/// stretch of journal); then the listing commands.
fn markers_and_writes_recover_exactly(dir: &Path, url: &str, env: &[(String, String)]) {
    let served = serve_replicated(&dir.join("host-a").tap_create(), url, env, &["--replica-delta-every", "1M"]);
    let mut client = Client::connect(&served.daemon.socket, 1);
    let mut rng = Rng(0x5eed_0012);
    let mut model = vec![0u8; SIZE as usize];
    let mut points = marked_rounds(&mut client, &served.control, &mut rng, &mut model, "round", 2);
    caught_up(&served.control, Duration::from_secs(30));
    wait_for_deltas(env, url, 1);
    // This marker lies after the first delta, the head after the second.
    points.extend(marked_rounds(&mut client, &served.control, &mut rng, &mut model, "late", 1));
    write_random(&mut client, &mut model, &mut rng, 100);
    assert_eq!(client.flush(), 0);
    let status = caught_up(&served.control, Duration::from_secs(30));
    wait_for_deltas(env, url, 2);
    let second_host = dir.join("host-b").tap_create();
    for (name, expected) in &points {
        let got = recover_from(env, url, &["--marker", name], &second_host.join(format!("{name}.img")));
        assert!(got == *expected, "marker {name} recovered other bytes");
    }
    let head = status.head.to_string();
    assert!(recover_from(env, url, &["--seq", &head], &second_host.join("head.img")) == model, "head differs");

    let listed = rewind_with(env, &["marker", "list", "--from", url, "--json"]);
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    let markers: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let names: Vec<&str> = markers.as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["round-0", "round-1", "late-0"]);
    let remote = rewind_with(env, &["status", "--from", url, "--json"]);
    assert!(remote.status.success(), "{}", String::from_utf8_lossy(&remote.stderr));
    let remote: serde_json::Value = serde_json::from_slice(&remote.stdout).unwrap();
    assert_eq!(remote["shipped-seq"], status.head);
    let online = rewind_with(env, &["status", "--control", served.control.to_str().unwrap(), "--json"]);
    let online: serde_json::Value = serde_json::from_slice(&online.stdout).unwrap();
    assert_eq!(online["replication"]["shipped-seq"], status.head, "{online}");
    drop(client);
    served.daemon.terminate();
}

/// Waits until `status --from` lists `count` remote snapshots (made beside the shipping, each
/// listed once stored).
fn wait_for_deltas(env: &[(String, String)], url: &str, count: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let remote = rewind_with(env, &["status", "--from", url, "--json"]);
        assert!(remote.status.success(), "{}", String::from_utf8_lossy(&remote.stderr));
        let remote: serde_json::Value = serde_json::from_slice(&remote.stdout).unwrap();
        if remote["deltas"].as_u64() >= Some(count) {
            assert!(remote["delta-bytes"].as_u64() > Some(0), "{remote}");
            return;
        }
        assert!(Instant::now() < deadline, "fewer than {count} remote snapshots after 30 s: {remote}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn writes_and_markers_on_a_live_daemon_recover_byte_exact_from_a_directory_replica() {
    let dir = tempfile::tempdir().unwrap();
    let url = file_url(&dir.path().join("replica"));
    markers_and_writes_recover_exactly(dir.path(), &url, &[]);
}

/// `--housekeeping-cpus` moves the replication threads (and the threads they start to write a
/// directory replica) and the journal's housekeeping onto the CPUs asked for, and leaves the
/// threads serving guest I/O where they were.
#[test]
fn housekeeping_threads_run_on_the_cpus_asked_for() {
    let allowed = |status: &str| {
        let line = status.lines().find_map(|line| line.strip_prefix("Cpus_allowed_list:")).unwrap();
        rewind::units::parse_cpu_list(line.trim()).unwrap().cpus
    };
    let ours = allowed(&std::fs::read_to_string("/proc/self/status").unwrap());
    let housekeeping = *ours.last().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = file_url(&dir.path().join("replica"));
    let cpu = housekeeping.to_string();
    let served = serve_replicated(dir.path(), &url, &[], &["--housekeeping-cpus", &cpu]);
    let mut client = Client::connect(&served.daemon.socket, 1);
    let (mut rng, mut model) = (Rng(0x5eed_0015), vec![0u8; SIZE as usize]);
    write_random(&mut client, &mut model, &mut rng, 64);
    assert_eq!(client.flush(), 0);
    caught_up(&served.control, Duration::from_secs(30));

    let tasks = std::fs::read_dir(format!("/proc/{}/task", served.daemon.child.id())).unwrap();
    let mut placed = std::collections::BTreeMap::<String, Vec<Vec<usize>>>::new();
    for task in tasks {
        let task = task.unwrap().path();
        let name = std::fs::read_to_string(task.join("comm")).unwrap().trim().to_string();
        placed.entry(name).or_default().push(allowed(&std::fs::read_to_string(task.join("status")).unwrap()));
    }
    for name in ["rewind-replica", "rewind-replsync", "rewind-spares", "rewind-uncache", "tokio-rt-worker"] {
        let cpus = placed.get(name).unwrap_or_else(|| panic!("no thread {name} among {placed:?}"));
        assert!(cpus.iter().all(|cpus| *cpus == [housekeeping]), "{name} runs on {cpus:?}, not CPU {housekeeping}");
    }
    for name in ["rewind", "rewind-queue-0", "rewind-apply-0"] {
        assert!(placed[name].iter().all(|cpus| *cpus == ours), "{name} moved: {:?}", placed[name]);
    }
    drop(client);
    served.daemon.terminate();
}

/// A power loss on a directory replica's own disk (a crashfs mount: names and bytes go back to
/// their last fsync) keeps everything its manifest counted: the manifest, and every object it
/// lists, so the last shipped point and its markers still recover byte-exact.
#[test]
fn a_power_loss_on_a_directory_replicas_disk_keeps_what_its_manifest_counts() {
    let dir = tempfile::tempdir().unwrap();
    let (backing, mountpoint) = (dir.path().join("backing"), dir.path().join("mnt"));
    std::fs::create_dir(&backing).unwrap();
    std::fs::create_dir(&mountpoint).unwrap();
    let mount = crashfs::Mount::start(&backing, &mountpoint, crashfs::Model::DataAndMetadata).unwrap();
    let url = file_url(&mountpoint.join("replica"));
    let served = serve_replicated(&dir.path().join("host-a").tap_create(), &url, &[], &[]);
    let mut client = Client::connect(&served.daemon.socket, 1);
    let mut rng = Rng(0x5eed_0014);
    let mut model = vec![0u8; SIZE as usize];
    let points = marked_rounds(&mut client, &served.control, &mut rng, &mut model, "before-the-crash", 2);
    let status = caught_up(&served.control, Duration::from_secs(30));
    drop(client);
    served.daemon.kill();

    let report = mount.crash().unwrap();
    let second_host = dir.path().join("host-b").tap_create();
    let head = status.head.to_string();
    let got = recover_from(&[], &url, &["--seq", &head], &second_host.join("head.img"));
    assert!(got == model, "the last shipped point differs after the replica's power loss ({report})");
    for (name, expected) in &points {
        let got = recover_from(&[], &url, &["--marker", name], &second_host.join(format!("{name}.img")));
        assert!(got == *expected, "marker {name} recovered other bytes after the replica's power loss");
    }
}

#[test]
fn a_daemon_killed_while_shipping_resumes_from_the_manifest_without_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let replica = dir.path().join("replica");
    killed_while_shipping_resumes_without_gaps(dir.path(), &file_url(&replica), &[], &|| {
        std::fs::read_dir(replica.join("journal"))
            .unwrap()
            .map(|e| format!("journal/{}", e.unwrap().file_name().to_string_lossy()))
            .collect()
    });
}

/// kill -9 while the shipper is at work, restart: shipping resumes from the manifest, the
/// journal objects among the keys `list_journal` returns follow each other with no gap and no record twice,
/// and points from before and after the kill recover exactly.
fn killed_while_shipping_resumes_without_gaps(
    dir: &Path,
    url: &str,
    env: &[(String, String)],
    list_journal: &dyn Fn() -> Vec<String>,
) {
    let host = dir.join("host-a").tap_create();
    let mut rng = Rng(0xdead_0012);
    let mut model = vec![0u8; SIZE as usize];
    let served = serve_replicated(&host, url, env, &[]);
    let mut client = Client::connect(&served.daemon.socket, 1);
    write_random(&mut client, &mut model, &mut rng, 300);
    let before_kill = model.clone();
    let marker_seq = add_marker(&served.control, "before-kill");
    // More writes, then kill -9 while the shipper is at work on them.
    write_random(&mut client, &mut model, &mut rng, 300);
    wait_replication(&served.control, Duration::from_secs(30), "shipping started", |s| s.shipped_seq > 0);
    drop(client);
    served.daemon.kill();

    let served = serve_replicated(&host, url, env, &[]);
    let mut client = Client::connect(&served.daemon.socket, 1);
    write_random(&mut client, &mut model, &mut rng, 100);
    assert_eq!(client.flush(), 0);
    add_marker(&served.control, "after-restart");
    let status = caught_up(&served.control, Duration::from_secs(30));
    assert!(status.head > marker_seq);
    let second_host = dir.join("host-b").tap_create();
    let got = recover_from(env, url, &["--marker", "before-kill"], &second_host.join("a.img"));
    assert!(got == before_kill, "before-kill differs");
    let got = recover_from(env, url, &["--marker", "after-restart"], &second_host.join("b.img"));
    assert!(got == model, "after-restart differs");
    let mut ranges: Vec<(u64, u64)> =
        list_journal().iter().filter_map(|key| rewind_replica::layout::parse_journal_key(key)).collect();
    ranges.sort();
    let mut next = 1;
    for &(first, last) in &ranges {
        assert_eq!(first, next, "journal objects {ranges:?}");
        next = last + 1;
    }
    assert_eq!(next, status.shipped_seq + 1);
    drop(client);
    served.daemon.terminate();
}

#[test]
fn remote_retention_frees_old_points_and_keeps_later_ones_recoverable_in_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let replica = dir.path().join("replica");
    remote_retention_keeps_later_points(dir.path(), &file_url(&replica), &[]);
    // A replica that cannot be read is reported by the offline status, which still succeeds.
    std::fs::remove_dir_all(&replica).unwrap();
    let offline = offline_status(&[], &dir.path().join("host-a").join("disk.img"));
    let error = offline["replication"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("no rewind replica"), "{offline}");
    assert!(offline["head"].as_u64().is_some(), "the store's own status is there too: {offline}");
}

/// `--replica-max-age`: once the early writes are older than the limit, the replica is rebased
/// past them; their marker is listed as expired and refused, every later point recovers exactly.
fn remote_retention_keeps_later_points(dir: &Path, url: &str, env: &[(String, String)]) {
    let served = serve_replicated(&dir.join("host-a").tap_create(), url, env, &["--replica-max-age", "1s"]);
    let mut client = Client::connect(&served.daemon.socket, 1);
    let mut rng = Rng(0x0a9e_0012);
    let mut model = vec![0u8; SIZE as usize];
    write_random(&mut client, &mut model, &mut rng, 100);
    assert_eq!(client.flush(), 0);
    let old = add_marker(&served.control, "old");
    // Records after the marker: once they are past the limit too, the base moves beyond it.
    write_random(&mut client, &mut model, &mut rng, 10);
    assert_eq!(client.flush(), 0);
    let rebased = wait_replication(&served.control, Duration::from_secs(30), "rebase", |s| s.remote_oldest_seq > old);
    write_random(&mut client, &mut model, &mut rng, 100);
    assert_eq!(client.flush(), 0);
    add_marker(&served.control, "new");
    let status = caught_up(&served.control, Duration::from_secs(30));
    let listed = rewind_with(env, &["marker", "list", "--from", url, "--json"]);
    let markers: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let expired: Vec<(&str, bool)> = markers
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["name"].as_str().unwrap(), m["expired"].as_bool().unwrap()))
        .collect();
    assert_eq!(expired, [("old", true), ("new", false)]);
    let second_host = dir.join("host-b").tap_create();
    let refused = rewind_with(env, &["recover", "--from", url, "--marker", "old", "--output", "/nonexistent/x"]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not recoverable"));
    assert!(recover_from(env, url, &["--marker", "new"], &second_host.join("new.img")) == model, "new differs");
    let oldest = rebased.remote_oldest_seq.to_string();
    recover_from(env, url, &["--seq", &oldest], &second_host.join("oldest.img"));
    assert!(status.remote_oldest_seq >= rebased.remote_oldest_seq);
    drop(client);
    served.daemon.terminate();
    // The expired marker is reported as such by every reader of the replica, and by the
    // store's offline status, which remembers the replica it was served with.
    let got = rewind_with(env, &["marker", "get", "old", "--from", url, "--json"]);
    let got: serde_json::Value = serde_json::from_slice(&got.stdout).unwrap();
    assert_eq!(got["expired"], true);
    let image = dir.join("host-a").join("disk.img");
    let offline = offline_status(env, &image);
    assert_eq!(offline["replication"]["url"], url);
    let held = &offline["replication"]["replica"];
    assert_eq!((held["markers"].as_u64(), held["expired-markers"].as_u64()), (Some(2), Some(1)), "{offline}");
    assert!(held["oldest-recoverable"].as_u64().unwrap() >= rebased.remote_oldest_seq);
    let from = rewind_with(env, &["status", "--from", url, "--json"]);
    let from: serde_json::Value = serde_json::from_slice(&from.stdout).unwrap();
    assert_eq!(&from, held, "status --from and the offline status say the same");
}

/// `rewind status IMAGE --json`, which must succeed.
fn offline_status(env: &[(String, String)], image: &Path) -> serde_json::Value {
    let out = rewind_with(env, &["status", image.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "status failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn bad_urls_missing_replicas_and_corrupt_objects_are_reported_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("out.img");
    let out_str = output.to_str().unwrap();
    let fails = |args: &[&str], expected: &str| {
        let out = rewind_with(&[], args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(expected), "{args:?}: expected {expected:?} in: {stderr}");
    };
    fails(&["recover", "--from", "ftp://host/x", "--seq", "1", "--output", out_str], "unknown scheme");
    let empty = file_url(&dir.path().join("empty"));
    fails(&["recover", "--from", &empty, "--seq", "1", "--output", out_str], "no rewind replica");
    fails(&["marker", "list", "--from", &empty], "no rewind replica");
    // A daemon is refused a URL it cannot use.
    let bad = Command::new(rewind_bin())
        .args(["serve", "x.img", "--socket", "s", "--size", "1M", "--replicate", "gopher://x"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown scheme"));

    let replica = dir.path().join("replica");
    let url = file_url(&replica);
    let served = serve_replicated(&dir.path().join("host").tap_create(), &url, &[], &[]);
    let mut client = Client::connect(&served.daemon.socket, 1);
    let mut model = vec![0u8; SIZE as usize];
    write_random(&mut client, &mut model, &mut Rng(7), 50);
    assert_eq!(client.flush(), 0);
    let status = caught_up(&served.control, Duration::from_secs(30));
    drop(client);
    served.daemon.terminate();
    let seq = status.head.to_string();
    fails(
        &["recover", "--from", &url, "--seq", &(status.head + 1).to_string(), "--output", out_str],
        "not recoverable",
    );
    fails(&["recover", "--from", &url, "--marker", "nope", "--output", out_str], "no marker named");
    let object = std::fs::read_dir(replica.join("journal")).unwrap().next().unwrap().unwrap();
    let name = object.file_name().to_string_lossy().into_owned();
    let mut bytes = std::fs::read(object.path()).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 1;
    std::fs::write(object.path(), &bytes).unwrap();
    fails(&["recover", "--from", &url, "--seq", &seq, "--output", out_str], &name);
    std::fs::remove_file(object.path()).unwrap();
    fails(&["recover", "--from", &url, "--seq", &seq, "--output", out_str], "gap");
    assert!(!output.exists(), "nothing is left at --output");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(leftovers.iter().all(|n| !n.to_string_lossy().contains("partial")), "{leftovers:?}");
}

/// Everything against a real one-node Ceph: a cluster started on 127.0.0.1 for this test and
/// stopped after it. Skipped (with a note) where Ceph is not installed, unless REWIND_TEST_CEPH
/// is set; scripts/test installs Ceph and sets it.
#[test]
fn against_a_real_ceph_cluster() {
    let Some(mut cluster) = ceph::Cluster::start_if_installed() else {
        assert!(std::env::var_os("REWIND_TEST_CEPH").is_none(), "REWIND_TEST_CEPH is set but Ceph is not installed");
        eprintln!("note: Ceph (ceph-mon, ceph-osd, radosgw) is not installed: the Ceph replication tests are skipped");
        return;
    };
    let env = cluster.s3_env();
    let dir = tempfile::tempdir().unwrap();
    cluster.create_bucket("live");
    markers_and_writes_recover_exactly(&dir.path().join("live"), "s3://live/volumes/disk1", &env);
    cluster.create_bucket("killed");
    killed_while_shipping_resumes_without_gaps(&dir.path().join("killed"), "s3://killed/vol", &env, &|| {
        cluster
            .list_objects("killed")
            .into_iter()
            .filter_map(|key| key.strip_prefix("vol/").map(str::to_string))
            .collect()
    });
    cluster.create_bucket("retention");
    remote_retention_keeps_later_points(&dir.path().join("retention"), "s3://retention/vol", &env);
    cluster.create_bucket("outage");
    radosgw_outage_keeps_guest_io_going_and_catches_up(&mut cluster, &dir.path().join("outage"), &env);
    bad_bucket_and_credentials_are_errors(&cluster, &dir.path().join("bad"), &env);
}

/// radosgw stopped under write load: guest I/O goes on, the lag grows, an error is reported;
/// after the restart shipping catches up and every marker is still recovered exactly.
fn radosgw_outage_keeps_guest_io_going_and_catches_up(
    cluster: &mut ceph::Cluster,
    dir: &Path,
    env: &[(String, String)],
) {
    let url = "s3://outage/vol";
    // A journal limit the outage's backlog outgrows: the records are kept and that is reported.
    let served = serve_replicated(&dir.join("host-a").tap_create(), url, env, &["--journal-max", "1M"]);
    let mut events = QmpClient::connect(&served.control).unwrap();
    let mut client = Client::connect(&served.daemon.socket, 1);
    let mut rng = Rng(0x07a6_e000);
    let mut model = vec![0u8; SIZE as usize];
    write_random(&mut client, &mut model, &mut rng, 100);
    assert_eq!(client.flush(), 0);
    caught_up(&served.control, Duration::from_secs(30));
    cluster.stop_gateway();
    let outage = Instant::now();
    write_random(&mut client, &mut model, &mut rng, 300);
    assert_eq!(client.flush(), 0);
    add_marker(&served.control, "during-outage");
    let during = model.clone();
    let lagging = wait_replication(&served.control, Duration::from_secs(60), "lag while radosgw is down", |s| {
        s.failing && s.shipped_seq < s.head && s.bytes_pending > 0
    });
    assert!(lagging.last_error.is_some());
    // Guest I/O is not held up by the outage.
    let started = Instant::now();
    write_random(&mut client, &mut model, &mut rng, 100);
    assert_eq!(client.flush(), 0);
    assert!(started.elapsed() < Duration::from_secs(10), "writes stalled during the outage");
    let behind = wait_replication(&served.control, Duration::from_secs(30), "journal over its limit", |s| {
        s.journal_over_limit && s.seconds_behind > 0.0
    });
    let (mut failure_reported, mut over_limit_reported) = (false, false);
    while !(failure_reported && over_limit_reported) {
        if let Event::ReplicationError(error) = events.next_event().unwrap() {
            if error.error.contains("over its limit") {
                over_limit_reported = true;
            } else {
                assert!(error.error.contains("vol/"), "the failing object is named: {}", error.error);
                failure_reported = true;
            }
        }
    }
    eprintln!(
        "outage: lag {:.1} s, {} bytes pending after {:?}",
        behind.seconds_behind,
        behind.bytes_pending,
        outage.elapsed()
    );
    cluster.start_gateway();
    let caught = caught_up(&served.control, Duration::from_secs(60));
    loop {
        if let Event::ReplicationCaughtUp(up) = events.next_event().unwrap() {
            assert!(up.shipped_seq > lagging.shipped_seq);
            break;
        }
    }
    let second_host = dir.join("host-b").tap_create();
    let got = recover_from(env, url, &["--marker", "during-outage"], &second_host.join("during.img"));
    assert!(got == during, "during-outage differs");
    let got = recover_from(env, url, &["--seq", &caught.head.to_string()], &second_host.join("head.img"));
    assert!(got == model, "head differs");
    drop(client);
    served.daemon.terminate();
}

fn bad_bucket_and_credentials_are_errors(cluster: &ceph::Cluster, dir: &Path, env: &[(String, String)]) {
    let output = dir.to_path_buf().tap_create().join("out.img");
    let out_str = output.to_str().unwrap();
    let out = rewind_with(env, &["status", "--from", "s3://no-such-bucket/x"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no rewind replica at s3://no-such-bucket/x"), "{stderr}");
    let mut wrong_key = env.to_vec();
    wrong_key.retain(|(k, _)| k != "AWS_SECRET_ACCESS_KEY");
    wrong_key.push(("AWS_SECRET_ACCESS_KEY".into(), "not-the-secret".into()));
    let out =
        rewind_with(&wrong_key, &["recover", "--from", "s3://live/volumes/disk1", "--seq", "1", "--output", out_str]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("rewind-replica.json") && stderr.contains("SignatureDoesNotMatch"), "{stderr}");
    assert!(!output.exists());
    // A corrupt object in the bucket is named.
    let objects = cluster.list_objects("live");
    let victim = objects.iter().filter(|k| k.contains("/journal/")).min().expect("journal objects in the bucket");
    cluster.corrupt_object("live", victim);
    let out = rewind_with(env, &["recover", "--from", "s3://live/volumes/disk1", "--seq", "1", "--output", out_str]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let name = victim.strip_prefix("volumes/disk1/").unwrap();
    assert!(!out.status.success() && stderr.contains(name), "{stderr}");
    assert!(!output.exists());
}

trait TapCreate {
    fn tap_create(self) -> Self;
}

impl TapCreate for PathBuf {
    fn tap_create(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}
