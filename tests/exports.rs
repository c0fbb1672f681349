//! Point-in-time exports over real sockets, driven by libblkio: an export of a marker reads the
//! model's bytes at the marker while the live disk keeps writing; the export's writes land in
//! its overlay only (never the live volume or the store); promote writes the point plus those
//! writes; retention's pin shows while it is open and goes with it; bad requests get clear
//! errors and the daemon keeps serving; `rewind serve --at-marker` serves a point offline.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{rewind_bin, status_json, wait_for_path, Client, Daemon, Rng};
use rewind::control::protocol::{HostCommand, PointExportArgs};
use rewind::control::replies::PointExportAdded;
use rewind::control::ErrorClass;
use rewind::qmp_client::{ClientError, QmpClient};
use rewind::recovery::RecoveryTarget;
use serde_json::Value;

const SIZE: u64 = 16 << 20;
const CHUNK: u64 = 1 << 20;

fn rewind(args: &[&str]) -> std::process::Output {
    Command::new(rewind_bin()).args(args).output().unwrap()
}

/// Runs the CLI with `--json` output expected, and parses it.
fn rewind_json(args: &[&str]) -> Value {
    let out = rewind(args);
    assert!(out.status.success(), "rewind {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Reads the whole disk behind `client` and compares it with `expected`, chunk by chunk.
fn assert_reads(client: &mut Client, expected: &[u8], what: &str) {
    for offset in (0..SIZE).step_by(CHUNK as usize) {
        let (ret, data) = client.read(offset, CHUNK as usize);
        assert_eq!(ret, 0, "{what}: read at {offset}");
        assert!(data == expected[offset as usize..(offset + CHUNK) as usize], "{what} differs in {offset}+{CHUNK}");
    }
}

fn write_both(client: &mut Client, model: &mut [u8], offset: u64, data: &[u8]) {
    assert_eq!(client.write(offset, data), 0);
    model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
}

struct Served {
    daemon: Daemon,
    dir: tempfile::TempDir,
    image: PathBuf,
    control: PathBuf,
}

fn serve() -> Served {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let control = dir.path().join("control.sock");
    let args = ["--size", "16M", "--control", control.to_str().unwrap()];
    let mut daemon = Daemon::start(&image, &dir.path().join("vhost.sock"), &args);
    wait_for_path(&mut daemon.child, &control);
    Served { daemon, dir, image, control }
}

fn overlays(image: &Path) -> Vec<PathBuf> {
    let dir = image.with_file_name("disk.img.rewind").join("exports");
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect()
}

#[test]
fn an_export_reads_the_point_while_the_live_disk_writes_and_promotes_with_its_own_writes() {
    let s = serve();
    let control = s.control.to_str().unwrap();
    let mut live = Client::connect(&s.daemon.socket, 1);
    let mut rng = Rng(0xe4);
    let mut model = vec![0u8; SIZE as usize];
    for i in 0..64u64 {
        write_both(&mut live, &mut model, i * 65536, &rng.bytes(65536));
    }
    // The point reads from a snapshot delta, the base and the journal after the snapshot.
    rewind_json(&["snapshot", "--control", control, "--json"]);
    for i in 0..32u64 {
        write_both(&mut live, &mut model, (i * 7 % 256) * 4096 + 512, &rng.bytes(8192));
    }
    let marker = rewind_json(&["marker", "add", "before-upgrade", "--control", control, "--json"]);
    let at_marker = model.clone();

    let socket = s.dir.path().join("export.sock");
    let added = rewind_json(&[
        "export",
        "add",
        "--control",
        control,
        "--marker",
        "before-upgrade",
        "--socket",
        socket.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(added["export-id"], "export-1");
    assert_eq!(added["seq"], marker["seq"]);
    let journal = rewind_json(&["status", "--control", control, "--json"])["journal"].clone();
    assert_eq!(journal["view-pins"][0]["seq"], marker["seq"], "{journal}");

    // The live disk keeps writing, from another thread, while the export is read.
    let writer = std::thread::spawn(move || {
        let mut rng = Rng(77);
        for i in 0..400u64 {
            write_both(&mut live, &mut model, (i % 2000) * 4096, &rng.bytes(4096));
        }
        (live, model)
    });
    let mut export = Client::connect(&socket, 1);
    assert_reads(&mut export, &at_marker, "the export");
    let (mut live, model) = writer.join().unwrap();

    // The export's guest writes; it reads its own writes, the live disk does not see them.
    let mut exported = at_marker.clone();
    let mut rng = Rng(0x0e);
    for i in 0..16u64 {
        write_both(&mut export, &mut exported, (i * 37 % 4000) * 4096, &rng.bytes(4096 * (1 + i % 3) as usize));
    }
    assert_eq!(export.discard(CHUNK, 65536), 0);
    exported[CHUNK as usize..(CHUNK + 65536) as usize].fill(0);
    assert_eq!(export.flush(), 0);
    assert_reads(&mut export, &exported, "the export after its writes");
    assert_reads(&mut live, &model, "the live disk");

    let list = rewind_json(&["export", "list", "--control", control, "--json"]);
    assert_eq!(list[0]["export-id"], "export-1");
    assert_eq!(list[0]["frontend-connected"], true);
    assert!(list[0]["overlay-bytes"].as_u64().unwrap() > 65536, "{list}");

    // Promote while the export is connected; the image is the point plus the export's writes.
    let promoted = s.dir.path().join("promoted.img");
    let job = rewind_json(&[
        "export",
        "promote",
        "export-1",
        "--output",
        promoted.to_str().unwrap(),
        "--control",
        control,
        "--json",
    ]);
    assert_eq!(job["status"], "concluded");
    assert_eq!(job["type"], "promote");
    assert!(std::fs::read(&promoted).unwrap() == exported, "promote differs from the export");
    assert_reads(&mut export, &exported, "the export after promote");

    drop(export);
    let out = rewind(&["export", "remove", "export-1", "--control", control]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!socket.exists(), "the export's socket outlived it");
    assert!(overlays(&s.image).is_empty(), "the overlay outlived its export");
    let journal = rewind_json(&["status", "--control", control, "--json"])["journal"].clone();
    assert_eq!(journal["view-pins"], Value::Array(vec![]), "{journal}");
    assert_eq!(journal["head"], marker["seq"].as_u64().unwrap() + 400, "the export journaled something");
    assert_reads(&mut live, &model, "the live disk after the export");
    drop(live);
    assert!(s.daemon.terminate().success());
    assert!(std::fs::read(&s.image).unwrap() == model, "the live volume changed under the export");
}

fn error_class(client: &mut QmpClient, command: HostCommand) -> (ErrorClass, String) {
    match client.execute::<Value>(command) {
        Err(ClientError::Command(e)) => (e.class, e.desc),
        other => panic!("expected an error reply, got {other:?}"),
    }
}

#[test]
fn bad_export_requests_get_clear_errors_and_the_daemon_keeps_serving() {
    let s = serve();
    let mut live = Client::connect(&s.daemon.socket, 1);
    let mut model = vec![0u8; SIZE as usize];
    write_both(&mut live, &mut model, 0, &[7u8; 4096]);
    let mut qmp = QmpClient::connect(&s.control).unwrap();
    let sock = |name: &str| s.dir.path().join(name);
    let add =
        |target: RecoveryTarget, socket: PathBuf| HostCommand::PointExportAdd(PointExportArgs::new(&target, socket));

    let (class, desc) = error_class(&mut qmp, add(RecoveryTarget::Marker("nope".into()), sock("a.sock")));
    assert_eq!(class, ErrorClass::MarkerNotFound, "{desc}");
    let (class, desc) = error_class(&mut qmp, add(RecoveryTarget::Seq(1000), sock("a.sock")));
    assert_eq!(class, ErrorClass::PointNotRecoverable, "{desc}");
    assert!(desc.contains("recoverable range is 0..=1"), "{desc}");
    let (class, desc) = error_class(&mut qmp, add(RecoveryTarget::Seq(1), s.control.clone()));
    assert_eq!(class, ErrorClass::GenericError);
    assert!(desc.contains("in use"), "{desc}");
    let (_, desc) = error_class(&mut qmp, add(RecoveryTarget::Seq(1), "relative.sock".into()));
    assert!(desc.contains("absolute"), "{desc}");
    let (class, _) = error_class(&mut qmp, HostCommand::PointExportRemove { export_id: "export-9".into() });
    assert_eq!(class, ErrorClass::ExportNotFound);
    let promote = |id: &str, output: PathBuf| HostCommand::PointExportPromote { export_id: id.into(), output };
    let (class, _) = error_class(&mut qmp, promote("export-9", sock("p.img")));
    assert_eq!(class, ErrorClass::ExportNotFound);
    assert!(overlays(&s.image).is_empty(), "a refused export left an overlay");

    let mut ids = Vec::new();
    for i in 0..rewind::point_exports::MAX_EXPORTS {
        let added: PointExportAdded =
            qmp.execute(add(RecoveryTarget::Seq(i as u64 % 2), sock(&format!("e{i}.sock")))).unwrap();
        ids.push(added.export_id);
    }
    let (_, desc) = error_class(&mut qmp, add(RecoveryTarget::Seq(1), sock("one-too-many.sock")));
    assert!(desc.contains("too many point exports"), "{desc}");
    assert!(!sock("one-too-many.sock").exists());
    let taken = s.dir.path().join("taken.img");
    std::fs::write(&taken, b"keep").unwrap();
    let (_, desc) = error_class(&mut qmp, promote(&ids[0], taken.clone()));
    assert!(desc.contains("already exists"), "{desc}");
    assert_eq!(std::fs::read(&taken).unwrap(), b"keep");

    // The export of seq 0 reads the empty disk, the live disk its write.
    let mut first = Client::connect(&sock("e0.sock"), 1);
    assert_eq!(first.read(0, 4096), (0, vec![0u8; 4096]));
    drop(first);
    write_both(&mut live, &mut model, 4096, &[9u8; 4096]);
    assert_eq!(live.read(0, 8192).1, model[..8192]);
    for id in &ids {
        let _: Value = qmp.execute(HostCommand::PointExportRemove { export_id: id.clone() }).unwrap();
    }
    let exports: Vec<Value> = qmp.execute(HostCommand::QueryPointExports).unwrap();
    assert!(exports.is_empty());
    drop(live);
    assert!(s.daemon.terminate().success());
}

#[test]
fn serve_at_a_marker_serves_the_point_offline_and_leaves_the_store_alone() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let socket = dir.path().join("vhost.sock");
    let daemon = Daemon::start(&image, &socket, &["--size", "16M"]);
    let mut live = Client::connect(&socket, 1);
    let mut rng = Rng(3);
    let mut model = vec![0u8; SIZE as usize];
    for i in 0..32u64 {
        write_both(&mut live, &mut model, i * 131072, &rng.bytes(65536));
    }
    drop(live);
    assert!(daemon.terminate().success());
    let out = rewind(&["marker", "add", image.to_str().unwrap(), "checked"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let at_marker = model.clone();
    let daemon = Daemon::start(&image, &socket, &[]);
    let mut live = Client::connect(&socket, 1);
    for i in 0..32u64 {
        write_both(&mut live, &mut model, i * 131072 + 65536, &rng.bytes(65536));
    }
    drop(live);
    assert!(daemon.terminate().success());
    let head = status_json(&image)["head"].clone();

    let daemon = Daemon::start(&image, &socket, &["--at-marker", "checked"]);
    let mut export = Client::connect(&socket, 1);
    assert_reads(&mut export, &at_marker, "rewind serve --at-marker");
    let mut exported = at_marker.clone();
    write_both(&mut export, &mut exported, 4096, &[0xAB; 8192]);
    assert_reads(&mut export, &exported, "the offline export after a write");
    drop(export);
    assert!(daemon.terminate().success());

    assert!(std::fs::read(&image).unwrap() == model, "serving a point changed the volume");
    assert_eq!(status_json(&image)["head"], head, "serving a point journaled something");
    assert!(overlays(&image).is_empty(), "the offline export's overlay outlived it");
    let mut missing = Command::new(rewind_bin())
        .args(["serve", image.to_str().unwrap(), "--socket", socket.to_str().unwrap(), "--at-marker", "nope"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(!missing.wait().unwrap().success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(missing.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("no marker named \"nope\""), "{stderr}");
}
