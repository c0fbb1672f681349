//! The offline CLI end to end: the real binary on a real image.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output};

/// The tests here open stores in-process and spawn the binary; a child forked while another
/// test holds a store's lock would hold it too until it execs. One test at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn rewind(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rewind")).args(args).current_dir(cwd).output().unwrap()
}

fn ok(args: &[&str], cwd: &Path) -> String {
    let out = rewind(args, cwd);
    assert!(out.status.success(), "rewind {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn json(args: &[&str], cwd: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(args, cwd)).unwrap()
}

/// Writes to the volume through the library (the CLI has no write command: writes come from
/// the guest), between CLI calls.
fn write_through_store(dir: &Path, offset: u64, data: &[u8]) {
    let (store, _) = rewind::Store::open(&dir.join("disk.img"), None).unwrap();
    store.write(offset, data).unwrap();
    store.close().unwrap();
}

#[test]
fn init_mark_snapshot_recover_verify_round_trip() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&["init", "disk.img", "--size", "4M"], d);
    assert_eq!(fs::metadata(d.join("disk.img")).unwrap().len(), 4 << 20);

    write_through_store(d, 0, &[0xaa; 8192]);
    let marker = json(&["marker", "add", "disk.img", "before-upgrade", "--note", "app checkpoint", "--json"], d);
    assert_eq!(marker["name"], "before-upgrade");
    assert_eq!(marker["seq"], 2);
    assert_eq!(marker["source"], "host");
    let snapshot = json(&["snapshot", "disk.img", "--json"], d);
    assert_eq!(snapshot["seq"], 3);
    assert_eq!(snapshot["data-bytes"], 8192);
    write_through_store(d, 4096, &[0xbb; 8192]);
    let expected_before: Vec<u8> = {
        let mut v = vec![0u8; 4 << 20];
        v[..8192].fill(0xaa);
        v
    };

    let listed = json(&["marker", "list", "disk.img", "--json"], d);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["expired"], false);
    assert_eq!(listed[0]["note"], "app checkpoint");

    ok(&["recover", "disk.img", "--marker", "before-upgrade", "--output", "back.img"], d);
    assert!(fs::read(d.join("back.img")).unwrap() == expected_before);
    ok(&["recover", "disk.img", "--seq", "4", "--output", "now.img"], d);
    assert!(fs::read(d.join("now.img")).unwrap() == fs::read(d.join("disk.img")).unwrap());
    let time = marker["time-ns"].as_u64().unwrap();
    let rfc3339 = rewind::units::format_time_ns(time + 1_000_000);
    ok(&["recover", "disk.img", "--time", &rfc3339, "--output", "by-time.img"], d);
    assert!(fs::read(d.join("by-time.img")).unwrap()[..8192] == expected_before[..8192]);

    let status = json(&["status", "disk.img", "--json"], d);
    assert_eq!(status["head"], 4);
    assert_eq!(status["oldest-recoverable"], 0);
    assert_eq!(status["markers"], 1);
    assert_eq!(status["snapshots"].as_array().unwrap().len(), 2);
    let verified = json(&["verify", "disk.img", "--json"], d);
    assert_eq!(verified["head"], 4);
    let human = ok(&["status", "disk.img"], d);
    assert!(human.contains("oldest recoverable:  seq 0"), "{human}");
}

#[test]
fn errors_are_clear_and_exit_non_zero() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = rewind(&["status", "missing.img"], d);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("run `rewind init` first"));

    ok(&["init", "disk.img", "--size", "1M"], d);
    let out = rewind(&["recover", "disk.img", "--marker", "nope", "--output", "x.img"], d);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no marker named \"nope\""));
    assert!(!d.join("x.img").exists());

    let out = rewind(&["recover", "disk.img", "--seq", "7", "--output", "x.img"], d);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("recoverable range is 0..=0"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = rewind(&["recover", "disk.img", "--seq", "0", "--marker", "a", "--output", "x.img"], d);
    assert_eq!(out.status.code(), Some(2), "clap refuses two targets");

    ok(&["marker", "add", "disk.img", "dup"], d);
    let out = rewind(&["marker", "add", "disk.img", "dup"], d);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));

    let out = rewind(&["init", "disk.img", "--size", "2M"], d);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));

    let out = rewind(&["serve", "disk.img", "--socket", "s", "--housekeeping-cpus", "1-0"], d);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("runs backwards"));
    let out = rewind(&["serve", "disk.img", "--socket", "s", "--housekeeping-cpus", "1000"], d);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--housekeeping-cpus 1000: cannot run threads on these CPUs"), "{stderr}");
    assert!(!d.join("s").exists(), "a daemon that cannot place its threads does not serve");
}

#[test]
fn retention_frees_the_journal_and_flags_expired_markers() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&["init", "disk.img", "--size", "1M", "--segment-size", "16K"], d);
    write_through_store(d, 0, &[1; 4096]);
    ok(&["marker", "add", "disk.img", "old"], d);
    for i in 0..12u64 {
        write_through_store(d, i * 4096, &[i as u8 + 2; 4096]);
    }
    ok(&["marker", "add", "disk.img", "new"], d);
    let report = json(&["retention", "disk.img", "--journal-max", "20K", "--json"], d);
    assert!(report["freed-segments"].as_u64().unwrap() >= 1, "{report}");
    let markers = json(&["marker", "list", "disk.img", "--json"], d);
    assert_eq!(markers[0]["name"], "old");
    assert_eq!(markers[0]["expired"], true);
    assert_eq!(markers[1]["expired"], false);
    let out = rewind(&["recover", "disk.img", "--marker", "old", "--output", "old.img"], d);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not recoverable"));
    ok(&["recover", "disk.img", "--marker", "new", "--output", "new.img"], d);
    let image = fs::File::open(d.join("disk.img")).unwrap();
    let mut live = vec![0u8; 1 << 20];
    image.read_exact_at(&mut live, 0).unwrap();
    assert!(fs::read(d.join("new.img")).unwrap() == live);
    ok(&["verify", "disk.img"], d);
}
