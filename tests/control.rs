//! The control plane over real sockets: QMP negotiation, every command, every error class,
//! oversized and malformed input, many clients at once, the guest-agent channel refusing host
//! commands, socket permissions and liveness checks, the CLI's --control forms, and an online
//! recovery that runs while a frontend keeps writing.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{rewind_bin, wait_for_path, Client, Daemon, Rng};
use serde_json::{json, Value};

struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Conn {
    fn open(path: &Path) -> (Self, Value) {
        let stream = UnixStream::connect(path).unwrap();
        let mut conn = Conn { reader: BufReader::new(stream.try_clone().unwrap()), writer: stream };
        let greeting = conn.read();
        (conn, greeting)
    }

    /// Connected and negotiated.
    fn ready(path: &Path) -> Self {
        let (mut conn, greeting) = Self::open(path);
        assert!(greeting["QMP"]["capabilities"].is_array(), "{greeting}");
        assert_eq!(conn.call("qmp_capabilities", json!({})), json!({"return": {}}));
        conn
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        assert!(self.reader.read_line(&mut line).unwrap() > 0, "connection closed");
        serde_json::from_str(&line).unwrap()
    }

    /// The next reply, skipping events.
    fn reply(&mut self) -> Value {
        loop {
            let message = self.read();
            if message.get("event").is_none() {
                return message;
            }
        }
    }

    fn call(&mut self, command: &str, arguments: Value) -> Value {
        let message = json!({"execute": command, "arguments": arguments});
        self.send_raw(format!("{message}\n").as_bytes());
        self.reply()
    }

    fn ok(&mut self, command: &str, arguments: Value) -> Value {
        let reply = self.call(command, arguments);
        reply.get("return").cloned().unwrap_or_else(|| panic!("{command} failed: {reply}"))
    }

    fn error_class(&mut self, command: &str, arguments: Value) -> String {
        let reply = self.call(command, arguments);
        reply["error"]["class"].as_str().unwrap_or_else(|| panic!("{command} did not fail: {reply}")).to_string()
    }
}

struct Served {
    daemon: Daemon,
    dir: tempfile::TempDir,
    image: PathBuf,
    control: PathBuf,
    agent: PathBuf,
}

fn serve(extra: &[&str]) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let control = dir.path().join("control.sock");
    let agent = dir.path().join("agent.sock");
    let mut args =
        vec!["--size", "16M", "--control", control.to_str().unwrap(), "--agent-socket", agent.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut daemon = Daemon::start(&image, &dir.path().join("vhost.sock"), &args);
    wait_for_path(&mut daemon.child, &control);
    wait_for_path(&mut daemon.child, &agent);
    Served { daemon, dir, image, control, agent }
}

fn rewind(args: &[&str]) -> std::process::Output {
    Command::new(rewind_bin()).args(args).output().unwrap()
}

#[test]
fn negotiation_commands_and_error_classes() {
    let s = serve(&[]);
    for path in [&s.control, &s.agent] {
        let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", path.display());
    }
    let (mut c, greeting) = Conn::open(&s.control);
    assert!(greeting["QMP"]["version"].is_object());
    assert_eq!(c.error_class("marker-list", json!({})), "CommandNotFound", "commands before negotiation");
    assert_eq!(c.call("qmp_capabilities", json!({})), json!({"return": {}}));
    assert_eq!(c.error_class("qmp_capabilities", json!({})), "CommandNotFound");

    // ids are echoed.
    c.send_raw(br#"{"execute": "query-jobs", "id": {"mine": 42}}"#);
    assert_eq!(c.reply(), json!({"return": [], "id": {"mine": 42}}));

    let added = c.ok("marker-add", json!({"name": "before-upgrade", "note": "db checkpoint"}));
    assert_eq!(added["id"], 1);
    assert_eq!(added["seq"], 1);
    assert!(added["time-ns"].as_u64().unwrap() > 0);
    let listed = c.ok("marker-list", json!({}));
    assert_eq!(listed[0]["name"], "before-upgrade");
    assert_eq!(listed[0]["source"], "host");
    assert_eq!(listed[0]["note"], "db checkpoint");
    assert_eq!(c.ok("marker-get", json!({"name": "before-upgrade"}))["seq"], 1);
    let snapshot = c.ok("snapshot-take", json!({}));
    assert_eq!(snapshot["seq"], 2);
    assert_eq!(c.ok("snapshot-list", json!({})).as_array().unwrap().len(), 2);
    let journal = c.ok("query-journal", json!({}));
    assert_eq!((journal["head"].clone(), journal["oldest-recoverable"].clone()), (json!(2), json!(0)));
    let retention = c.ok("retention-set", json!({"max-bytes": 1u64 << 30, "keep-marker-snapshots": true}));
    assert_eq!(retention["retention"]["max-bytes"], 1u64 << 30);
    assert_eq!(c.ok("query-journal", json!({}))["retention"]["keep-marker-snapshots"], true);
    let status = c.ok("query-status", json!({}));
    assert_eq!(status["size"], 16 << 20);
    assert_eq!(status["frontend-connected"], false);
    assert_eq!(status["image"], json!(s.image));

    // Error classes and clear descriptions.
    assert_eq!(c.error_class("no-such-command", json!({})), "CommandNotFound");
    assert_eq!(c.error_class("marker-add", json!({"name": "before-upgrade"})), "MarkerExists");
    assert_eq!(c.error_class("marker-get", json!({"name": "never"})), "MarkerNotFound");
    assert_eq!(c.error_class("marker-add", json!({"name": ""})), "GenericError");
    assert_eq!(c.error_class("marker-add", json!({"nome": "typo"})), "GenericError");
    assert_eq!(c.error_class("recover", json!({"seq": 99, "output": "/tmp/x.img"})), "PointNotRecoverable");
    assert_eq!(
        c.error_class("recover", json!({"seq": 1, "marker": "before-upgrade", "output": "/tmp/x.img"})),
        "GenericError"
    );
    assert_eq!(c.error_class("recover", json!({"seq": 1, "output": "relative.img"})), "GenericError");
    let reply = c.call("marker-get", json!({"name": "never"}));
    assert!(reply["error"]["desc"].as_str().unwrap().contains("no marker named"), "{reply}");

    // Malformed input gets an error and the connection keeps working.
    c.send_raw(b"{not json}\n");
    assert_eq!(c.reply()["error"]["class"], "GenericError");
    c.send_raw(b"[1, 2]\n");
    assert!(c.reply()["error"]["desc"].as_str().unwrap().contains("JSON object"));
    c.send_raw(br#"{"execute": "marker-list", "arguments": [1]}"#);
    assert_eq!(c.reply()["error"]["class"], "GenericError");
    // Over 1 MiB in one message: refused, discarded, and the next message is served.
    let mut big = br#"{"execute": "marker-add", "arguments": {"name": ""#.to_vec();
    big.extend(std::iter::repeat_n(b'a', (1 << 20) + 10));
    big.extend_from_slice(b"\"}}\n");
    c.send_raw(&big);
    assert!(c.reply()["error"]["desc"].as_str().unwrap().contains("over"), "oversized message");
    assert_eq!(c.ok("marker-list", json!({})).as_array().unwrap().len(), 1);
    drop(c);
    assert!(s.daemon.terminate().success());
}

#[test]
fn errors_name_the_argument_and_the_agent_refuses_host_commands_before_their_arguments() {
    let s = serve(&[]);
    let mut c = Conn::ready(&s.control);
    let desc = |reply: Value| (reply["error"]["class"].clone(), reply["error"]["desc"].clone());
    assert_eq!(desc(c.call("marker-add", json!({}))), (json!("GenericError"), json!("Parameter 'name' is missing")));
    assert_eq!(
        desc(c.call("marker-list", json!({"all": true}))),
        (json!("GenericError"), json!("Parameter 'all' is unexpected"))
    );
    let (class, text) = desc(c.call("retention-set", json!({"max-bytes": "lots"})));
    assert_eq!(class, "GenericError");
    assert!(text.as_str().unwrap().starts_with("Invalid parameter 'max-bytes'"), "{text}");
    // No `arguments` at all is the same as none.
    c.send_raw(b"{\"execute\": \"query-jobs\"}\n");
    assert_eq!(c.reply(), json!({"return": []}));

    let mut agent = Conn::ready(&s.agent);
    for (command, arguments) in [("query-jobs", json!({"junk": 1})), ("recover", json!({}))] {
        let reply = agent.call(command, arguments);
        assert_eq!(
            desc(reply),
            (
                json!("CommandNotFound"),
                json!(format!("The command {command} is not available on the guest agent channel"))
            )
        );
    }
    drop((c, agent));
    assert!(s.daemon.terminate().success());
}

#[test]
fn the_agent_channel_is_confined_and_many_clients_are_served() {
    let s = serve(&[]);
    let mut agent = Conn::ready(&s.agent);
    let added = agent.ok("marker-add", json!({"name": "after-a"}));
    assert_eq!(added["seq"], 1);
    assert_eq!(agent.ok("marker-get", json!({"name": "after-a"}))["source"], "guest");
    assert_eq!(agent.ok("marker-list", json!({})).as_array().unwrap().len(), 1);
    agent.ok("query-status", json!({}));
    for (command, arguments) in [
        ("recover", json!({"marker": "after-a", "output": "/tmp/escape.img"})),
        ("retention-set", json!({"max-bytes": 0})),
        ("snapshot-take", json!({})),
        ("query-journal", json!({})),
    ] {
        assert_eq!(agent.error_class(command, arguments), "CommandNotFound", "{command} on the agent channel");
    }
    assert!(!Path::new("/tmp/escape.img").exists());

    // A client flooding junk does not stop the others.
    let mut junk = UnixStream::connect(&s.control).unwrap();
    std::thread::spawn(move || {
        let garbage = vec![b'x'; 256 * 1024];
        for _ in 0..40 {
            if junk.write_all(&garbage).is_err() {
                break;
            }
        }
    });
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let path = s.control.clone();
            std::thread::spawn(move || {
                let mut c = Conn::ready(&path);
                for k in 0..5 {
                    c.ok("marker-add", json!({"name": format!("client-{i}-{k}")}));
                }
                c.ok("marker-list", json!({})).as_array().unwrap().len()
            })
        })
        .collect();
    for t in threads {
        assert!(t.join().unwrap() >= 6);
    }
    let mut c = Conn::ready(&s.control);
    let markers = c.ok("marker-list", json!({}));
    assert_eq!(markers.as_array().unwrap().len(), 1 + 16 * 5);
    let seqs: Vec<u64> = markers.as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "marker seqs are unique and ordered");
    drop(c);
    drop(agent);
    assert!(s.daemon.terminate().success());
}

#[test]
fn sockets_are_private_stale_ones_replaced_live_ones_refused() {
    let s = serve(&[]);
    // A second daemon on the same control socket is refused with a clear error.
    let other = s.dir.path().join("other.img");
    let out = rewind(&[
        "serve",
        other.to_str().unwrap(),
        "--size",
        "1M",
        "--socket",
        s.dir.path().join("v2.sock").to_str().unwrap(),
        "--control",
        s.control.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"), "{}", String::from_utf8_lossy(&out.stderr));
    // Offline commands name the control socket while the image is served.
    let out = rewind(&["marker", "list", s.image.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&format!("--control {}", s.control.display())), "{stderr}");
    assert!(s.daemon.terminate().success());
    assert!(!s.control.exists(), "the control socket is removed at exit");

    // A stale socket file (nobody listening) is replaced.
    let listener = std::os::unix::net::UnixListener::bind(&s.control).unwrap();
    drop(listener);
    assert!(s.control.exists());
    let mut daemon =
        Daemon::start(&s.image, &s.dir.path().join("vhost.sock"), &["--control", s.control.to_str().unwrap()]);
    wait_for_path(&mut daemon.child, &s.control);
    Conn::ready(&s.control).ok("query-status", json!({}));
    assert!(daemon.terminate().success());
}

#[test]
fn cli_control_forms_and_online_recovery_under_write_load() {
    let s = serve(&["--num-queues", "1"]);
    let control = s.control.to_str().unwrap();
    let mut client = Client::connect(&s.daemon.socket, 1);
    let mut rng = Rng(5);
    let mut model = vec![0u8; 16 << 20];
    for i in 0..64u64 {
        let data = rng.bytes(65536);
        assert_eq!(client.write(i * 65536, &data), 0);
        model[(i * 65536) as usize..((i + 1) * 65536) as usize].copy_from_slice(&data);
    }
    let out = rewind(&["marker", "add", "before-load", "--control", control, "--note", "from the CLI", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let marker: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(marker["name"], "before-load");
    assert_eq!(marker["seq"], 65, "ordered after the 64 completed writes");
    let at_marker = model.clone();

    // Keep writing from another thread while the recovery runs.
    let writer = std::thread::spawn(move || {
        let mut rng = Rng(77);
        for i in 0..200u64 {
            let data = rng.bytes(4096);
            assert_eq!(client.write((i % 1000) * 4096, &data), 0);
        }
        client
    });
    let output = s.dir.path().join("recovered.img");
    let out = rewind(&[
        "recover",
        "--control",
        control,
        "--marker",
        "before-load",
        "--output",
        output.to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let job: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(job["status"], "concluded");
    assert_eq!(job["seq"], 65);
    let client = writer.join().unwrap();
    assert!(std::fs::read(&output).unwrap() == at_marker, "online recovery is not the state at the marker");

    let out = rewind(&["status", "--control", control, "--json"]);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["status"]["frontend-connected"], true);
    assert!(status["status"]["counters"]["bytes-written"].as_u64().unwrap() >= 64 * 65536);
    assert_eq!(status["journal"]["head"], 65 + 200);
    let out = rewind(&["snapshot", "--control", control, "--json"]);
    assert_eq!(serde_json::from_slice::<Value>(&out.stdout).unwrap()["seq"], 266);
    let out = rewind(&["marker", "list", "--control", control, "--json"]);
    let markers: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(markers[0]["note"], "from the CLI");
    let out = rewind(&["recover", "--control", control, "--marker", "nope", "--output", "/tmp/nope.img"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no marker named"));

    // query-jobs remembers the job.
    let mut c = Conn::ready(&s.control);
    let jobs = c.ok("query-jobs", json!({}));
    assert_eq!(jobs[0]["status"], "concluded");
    drop(c);
    drop(client);
    assert!(s.daemon.terminate().success());
}

#[test]
fn a_guest_flooding_markers_is_held_to_its_limit_and_the_host_is_not() {
    let s = serve(&[]);
    let mut agent = Conn::ready(&s.agent);
    let started = std::time::Instant::now();
    let mut accepted = 0;
    for i in 0..300 {
        let reply = agent.call("marker-add", json!({"name": format!("flood-{i}"), "note": "x".repeat(4096)}));
        match reply["error"]["class"].as_str() {
            None => accepted += 1,
            Some(class) => assert_eq!(class, "MarkerLimit", "{reply}"),
        }
    }
    // The burst, and what the rate refilled meanwhile.
    let allowed = 100.0 + 10.0 * started.elapsed().as_secs_f64();
    assert!(accepted >= 100 && accepted as f64 <= allowed + 1.0, "{accepted} accepted, {allowed:.0} allowed");
    let mut host = Conn::ready(&s.control);
    host.ok("marker-add", json!({"name": "host-during-the-flood"}));
    assert!(s.daemon.terminate().success());
}
