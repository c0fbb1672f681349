//! The control plane: a QMP-framed JSON protocol on unix sockets, so QMP clients work
//! unchanged. The host socket has every command; the guest-agent socket only marker-add,
//! marker-list, marker-get and query-status, so a guest can never start a recovery, write a
//! host path or change retention. See docs/control.md.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::marker::MarkerSource;
use crate::recovery::RecoveryTarget;
use crate::store::{MarkerStatus, Store};
use crate::vhost_user::BlkBackend;

/// Larger messages get an error and are discarded.
pub const MAX_MESSAGE: usize = 1 << 20;
/// More simultaneous clients than this are turned away, so clients cannot exhaust the daemon.
const MAX_CLIENTS: usize = 64;
/// A client that does not read its replies for this long is dropped rather than block others.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
const PROGRESS_EVENT_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Host,
    Agent,
}

impl Channel {
    fn allows(self, command: &str) -> bool {
        match self {
            Self::Host => true,
            Self::Agent => matches!(command, "marker-add" | "marker-list" | "marker-get" | "query-status"),
        }
    }
}

/// A QMP error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    pub class: &'static str,
    pub desc: String,
}

impl QmpError {
    fn generic(desc: impl Into<String>) -> Self {
        Self { class: "GenericError", desc: desc.into() }
    }

    fn not_found(desc: impl Into<String>) -> Self {
        Self { class: "CommandNotFound", desc: desc.into() }
    }
}

impl From<crate::Error> for QmpError {
    fn from(e: crate::Error) -> Self {
        Self::generic(e.to_string())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobStatus {
    Running,
    Concluded,
    Failed,
}

#[derive(Debug, Clone)]
struct Job {
    id: String,
    target: String,
    output: PathBuf,
    status: JobStatus,
    done: u64,
    total: u64,
    seq: Option<u64>,
    error: Option<String>,
}

impl Job {
    fn to_json(&self) -> Value {
        let status = match self.status {
            JobStatus::Running => "running",
            JobStatus::Concluded => "concluded",
            JobStatus::Failed => "failed",
        };
        let mut v = json!({
            "id": self.id, "type": "recover", "status": status, "target": self.target,
            "output": self.output, "done": self.done, "total": self.total,
        });
        if let Some(seq) = self.seq {
            v["seq"] = json!(seq);
        }
        if let Some(error) = &self.error {
            v["error"] = json!(error);
        }
        v
    }
}

/// A connected client's write half, shared with event senders.
type ClientWriter = Arc<Mutex<UnixStream>>;

struct Shared {
    store: Arc<Store>,
    backend: Arc<BlkBackend>,
    vhost_socket: PathBuf,
    jobs: Mutex<BTreeMap<u64, Job>>,
    job_threads: Mutex<Vec<JoinHandle<()>>>,
    client_threads: Mutex<Vec<JoinHandle<()>>>,
    next_job: AtomicU64,
    /// Host clients that finished negotiation: they receive events.
    subscribers: Mutex<Vec<(u64, ClientWriter)>>,
    /// Every open client stream, to close them all at shutdown.
    open: Mutex<Vec<(u64, UnixStream)>>,
    next_client: AtomicU64,
    stopping: AtomicBool,
}

/// The control sockets of one daemon.
pub struct ControlServer {
    shared: Arc<Shared>,
    listeners: Vec<(PathBuf, JoinHandle<()>)>,
}

/// Binds `path` with mode 0600 before anyone can connect: the socket is bound under a temporary
/// name, restricted, then renamed into place. A stale socket file is replaced; a live one (a
/// connection succeeds) is refused.
pub fn bind_private(path: &Path) -> io::Result<UnixListener> {
    if path.exists() {
        match UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running process", path.display()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                log::info!("replacing stale socket {}", path.display());
                std::fs::remove_file(path)?;
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("{} exists and is not a usable socket: {e}", path.display()),
                ))
            }
        }
    }
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&tmp, path)?;
    Ok(listener)
}

fn now_timestamp() -> Value {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    json!({"seconds": now.as_secs(), "microseconds": now.subsec_micros()})
}

fn send(writer: &ClientWriter, message: &Value) -> io::Result<()> {
    let mut line = serde_json::to_vec(message).expect("JSON values serialise");
    line.push(b'\n');
    writer.lock().unwrap_or_else(|p| p.into_inner()).write_all(&line)
}

impl Shared {
    fn emit(&self, event: &str, data: Value) {
        let message = json!({"event": event, "data": data, "timestamp": now_timestamp()});
        let subscribers: Vec<(u64, ClientWriter)> = self.subscribers.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for (id, writer) in subscribers {
            if send(&writer, &message).is_err() {
                self.subscribers.lock().unwrap_or_else(|p| p.into_inner()).retain(|(c, _)| *c != id);
            }
        }
    }
}

fn marker_json(m: &MarkerStatus) -> Value {
    serde_json::to_value(m).expect("markers serialise")
}

fn snapshot_json(s: &crate::snapshot::SnapshotInfo) -> Value {
    json!({"seq": s.seq, "origin": s.origin, "created": s.created_ns, "data-bytes": s.data_bytes, "extents": s.extents})
}

fn arguments<T: for<'de> Deserialize<'de>>(args: &Value) -> Result<T, QmpError> {
    serde_json::from_value(args.clone()).map_err(|e| QmpError::generic(format!("Invalid arguments: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MarkerAddArgs {
    name: String,
    note: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameArgs {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RetentionArgs {
    max_bytes: Option<u64>,
    max_age_secs: Option<u64>,
    keep_marker_snapshots: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecoverArgs {
    marker: Option<String>,
    seq: Option<u64>,
    /// RFC 3339.
    time: Option<String>,
    output: PathBuf,
}

impl Shared {
    fn execute(self: &Arc<Self>, channel: Channel, command: &str, args: &Value) -> Result<Value, QmpError> {
        if !channel.allows(command) {
            return Err(QmpError::not_found(format!(
                "The command {command} is not available on the guest agent channel"
            )));
        }
        let store = &self.store;
        match command {
            "marker-add" => {
                let a: MarkerAddArgs = arguments(args)?;
                let source = if channel == Channel::Agent { MarkerSource::Guest } else { MarkerSource::Host };
                let marker = store.add_marker(&a.name, a.note.as_deref(), source)?;
                Ok(json!({"id": marker.id, "seq": marker.seq, "time": marker.time_ns}))
            }
            "marker-list" => {
                let _: NoArgs = arguments(args)?;
                Ok(Value::Array(store.markers().iter().map(marker_json).collect()))
            }
            "marker-get" => {
                let a: NameArgs = arguments(args)?;
                Ok(marker_json(&store.marker(&a.name)?))
            }
            "snapshot-take" => {
                let _: NoArgs = arguments(args)?;
                Ok(snapshot_json(&store.take_snapshot()?))
            }
            "snapshot-list" => {
                let _: NoArgs = arguments(args)?;
                Ok(Value::Array(store.snapshots().iter().map(snapshot_json).collect()))
            }
            "query-journal" => {
                let _: NoArgs = arguments(args)?;
                let s = store.status();
                Ok(json!({
                    "first-seq": s.first_seq, "head": s.head, "oldest-recoverable": s.oldest_recoverable,
                    "checkpoint": s.checkpoint, "bytes": s.journal_bytes, "segments": s.journal_segments,
                    "snapshots": s.snapshots.len(), "snapshot-bytes": s.snapshot_bytes,
                    "retention": s.retention,
                }))
            }
            "retention-set" => {
                let a: RetentionArgs = arguments(args)?;
                let mut policy = store.retention();
                if let Some(max) = a.max_bytes {
                    policy.max_bytes = Some(max);
                }
                if let Some(age) = a.max_age_secs {
                    policy.max_age_secs = Some(age);
                }
                if let Some(keep) = a.keep_marker_snapshots {
                    policy.keep_marker_snapshots = keep;
                }
                store.set_retention(policy.clone())?;
                let report = store.enforce_retention()?;
                Ok(json!({"retention": policy, "freed-segments": report.freed_segments,
                          "freed-bytes": report.freed_bytes, "oldest-recoverable": report.oldest_recoverable}))
            }
            "recover" => self.start_recovery(arguments(args)?),
            "query-jobs" => {
                let _: NoArgs = arguments(args)?;
                let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
                Ok(Value::Array(jobs.values().map(Job::to_json).collect()))
            }
            "query-status" => {
                let _: NoArgs = arguments(args)?;
                let c = &self.backend.counters;
                Ok(json!({
                    "image": store.image(), "size": store.volume_size(), "head": store.head(),
                    "queues": self.backend.options().num_queues, "read-only": self.backend.options().read_only,
                    "vhost-socket": self.vhost_socket,
                    "frontend-connected": self.backend.connected.load(Ordering::Relaxed),
                    "counters": {
                        "requests": c.requests.load(Ordering::Relaxed),
                        "bytes-read": c.bytes_read.load(Ordering::Relaxed),
                        "bytes-written": c.bytes_written.load(Ordering::Relaxed),
                        "flushes": c.flushes.load(Ordering::Relaxed),
                        "errors": c.errors.load(Ordering::Relaxed),
                        "broken-queues": c.broken_queues.load(Ordering::Relaxed),
                    },
                }))
            }
            other => Err(QmpError::not_found(format!("The command {other} has not been found"))),
        }
    }

    fn start_recovery(self: &Arc<Self>, a: RecoverArgs) -> Result<Value, QmpError> {
        let target = match (a.marker, a.seq, a.time) {
            (Some(name), None, None) => RecoveryTarget::Marker(name),
            (None, Some(seq), None) => RecoveryTarget::Seq(seq),
            (None, None, Some(time)) => {
                RecoveryTarget::Time(crate::units::parse_rfc3339_ns(&time).map_err(QmpError::generic)?)
            }
            _ => return Err(QmpError::generic("recover needs exactly one of marker, seq and time")),
        };
        if !a.output.is_absolute() {
            return Err(QmpError::generic("output must be an absolute path"));
        }
        if a.output.exists() {
            return Err(crate::Error::OutputExists(a.output).into());
        }
        // Refuse unknown or unrecoverable points now rather than in a job.
        let seq = self.store.resolve(&target)?;
        let number = self.next_job.fetch_add(1, Ordering::Relaxed) + 1;
        let id = format!("recover-{number}");
        let job = Job {
            id: id.clone(),
            target: target.to_string(),
            output: a.output.clone(),
            status: JobStatus::Running,
            done: 0,
            total: self.store.volume_size(),
            seq: Some(seq),
            error: None,
        };
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).insert(number, job);
        let shared = Arc::clone(self);
        let job_id = id.clone();
        let handle = thread::spawn(move || {
            let mut last_event = Instant::now();
            let result = shared.store.recover(&RecoveryTarget::Seq(seq), &a.output, &mut |done, total| {
                if let Some(job) = shared.jobs.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&number) {
                    job.done = done;
                    job.total = total;
                }
                if last_event.elapsed() >= PROGRESS_EVENT_INTERVAL {
                    last_event = Instant::now();
                    shared.emit("JOB_PROGRESS", json!({"id": job_id, "done": done, "total": total}));
                }
            });
            let data = {
                let mut jobs = shared.jobs.lock().unwrap_or_else(|p| p.into_inner());
                let job = jobs.get_mut(&number).expect("job registered before its thread");
                match &result {
                    Ok(report) => {
                        job.status = JobStatus::Concluded;
                        job.done = job.total;
                        log::info!("{job_id}: recovered seq {} into {}", report.seq, report.output.display());
                    }
                    Err(e) => {
                        job.status = JobStatus::Failed;
                        job.error = Some(e.to_string());
                        log::error!("{job_id} failed: {e}");
                    }
                }
                job.to_json()
            };
            shared.emit("JOB_COMPLETED", data);
        });
        self.job_threads.lock().unwrap_or_else(|p| p.into_inner()).push(handle);
        Ok(json!({"job-id": id, "seq": seq}))
    }

    /// Serves one client until it disconnects or the server stops.
    fn serve_client(self: &Arc<Self>, channel: Channel, stream: UnixStream, client: u64) {
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        let Ok(write_half) = stream.try_clone() else { return };
        let writer: ClientWriter = Arc::new(Mutex::new(write_half));
        let greeting = json!({"QMP": {"version": {"rewind": env!("CARGO_PKG_VERSION"),
            "qemu": {"major": 0, "minor": 0, "micro": 0}, "package": "rewind"}, "capabilities": []}});
        if send(&writer, &greeting).is_err() {
            return;
        }
        let mut negotiated = false;
        let mut reader = MessageReader::new(stream);
        while !self.stopping.load(Ordering::SeqCst) {
            let message = match reader.next_message() {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(ReadError::Closed) => break,
                Err(ReadError::Malformed(desc)) => {
                    if send(&writer, &json!({"error": {"class": "GenericError", "desc": desc}})).is_err() {
                        break;
                    }
                    continue;
                }
            };
            let started = std::time::Instant::now();
            let reply = self.handle(channel, &message, &mut negotiated);
            if negotiated && channel == Channel::Host {
                let mut subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
                if !subscribers.iter().any(|(c, _)| *c == client) {
                    subscribers.push((client, Arc::clone(&writer)));
                }
            }
            if send(&writer, &reply).is_err() {
                break;
            }
            // From the request read to the reply sent: the daemon's share of a client's wait.
            let command = message.get("execute").and_then(Value::as_str).unwrap_or("?");
            log::debug!("control: {command} handled in {} µs", started.elapsed().as_micros());
        }
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner()).retain(|(c, _)| *c != client);
        self.open.lock().unwrap_or_else(|p| p.into_inner()).retain(|(c, _)| *c != client);
    }

    fn handle(self: &Arc<Self>, channel: Channel, message: &Value, negotiated: &mut bool) -> Value {
        let id = message.get("id").cloned();
        let with_id = |mut reply: Value| {
            if let Some(id) = &id {
                reply["id"] = id.clone();
            }
            reply
        };
        let error = |e: QmpError| with_id(json!({"error": {"class": e.class, "desc": e.desc}}));
        let Some(object) = message.as_object() else {
            return error(QmpError::generic("QMP input must be a JSON object"));
        };
        let Some(command) = object.get("execute").and_then(Value::as_str) else {
            return error(QmpError::generic("QMP input lacks member 'execute'"));
        };
        if let Some(unknown) = object.keys().find(|k| !matches!(k.as_str(), "execute" | "arguments" | "id")) {
            return error(QmpError::generic(format!("QMP input member '{unknown}' is unexpected")));
        }
        let args = object.get("arguments").cloned().unwrap_or_else(|| json!({}));
        if !args.is_object() {
            return error(QmpError::generic("QMP input member 'arguments' must be an object"));
        }
        if command == "qmp_capabilities" {
            if *negotiated {
                return error(QmpError::not_found("Capabilities negotiation is already complete, command ignored"));
            }
            *negotiated = true;
            return with_id(json!({"return": {}}));
        }
        if !*negotiated {
            return error(QmpError::not_found("Expecting capabilities negotiation with 'qmp_capabilities'"));
        }
        match self.execute(channel, command, &args) {
            Ok(value) => with_id(json!({"return": value})),
            Err(e) => error(e),
        }
    }
}

enum ReadError {
    /// The client went away or the connection broke.
    Closed,
    Malformed(String),
}

/// Splits a byte stream into JSON values, with or without newlines between them (QMP clients
/// send both ways), holding at most `MAX_MESSAGE` bytes of one message.
struct MessageReader {
    stream: UnixStream,
    buf: Vec<u8>,
    /// After an oversized message: drop bytes up to the next newline.
    skipping: bool,
}

impl MessageReader {
    fn new(stream: UnixStream) -> Self {
        Self { stream, buf: Vec::new(), skipping: false }
    }

    fn next_message(&mut self) -> Result<Option<Value>, ReadError> {
        loop {
            if self.skipping {
                match self.buf.iter().position(|&b| b == b'\n') {
                    Some(end) => {
                        self.buf.drain(..=end);
                        self.skipping = false;
                    }
                    None => self.buf.clear(),
                }
            }
            if !self.skipping {
                let start = self.buf.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(self.buf.len());
                self.buf.drain(..start);
                if !self.buf.is_empty() {
                    let mut values = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
                    match values.next() {
                        Some(Ok(value)) => {
                            let used = values.byte_offset();
                            self.buf.drain(..used);
                            if used > MAX_MESSAGE {
                                return Err(ReadError::Malformed(format!(
                                    "message over {MAX_MESSAGE} bytes, discarded"
                                )));
                            }
                            return Ok(Some(value));
                        }
                        Some(Err(e)) if e.is_eof() => {
                            if self.buf.len() > MAX_MESSAGE {
                                self.skipping = true;
                                return Err(ReadError::Malformed(format!(
                                    "message over {MAX_MESSAGE} bytes, discarded"
                                )));
                            }
                        }
                        Some(Err(e)) => {
                            // Resynchronise at the next line.
                            match self.buf.iter().position(|&b| b == b'\n') {
                                Some(end) => drop(self.buf.drain(..=end)),
                                None => self.skipping = true,
                            }
                            return Err(ReadError::Malformed(format!("JSON parse error: {e}")));
                        }
                        None => self.buf.clear(),
                    }
                }
            }
            let mut chunk = [0u8; 64 * 1024];
            let n = self.stream.read(&mut chunk).map_err(|_| ReadError::Closed)?;
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

impl ControlServer {
    pub fn new(store: Arc<Store>, backend: Arc<BlkBackend>, vhost_socket: PathBuf) -> Self {
        Self {
            shared: Arc::new(Shared {
                store,
                backend,
                vhost_socket,
                jobs: Mutex::new(BTreeMap::new()),
                job_threads: Mutex::new(Vec::new()),
                client_threads: Mutex::new(Vec::new()),
                next_job: AtomicU64::new(0),
                subscribers: Mutex::new(Vec::new()),
                open: Mutex::new(Vec::new()),
                next_client: AtomicU64::new(0),
                stopping: AtomicBool::new(false),
            }),
            listeners: Vec::new(),
        }
    }

    /// Starts accepting clients of `channel` on `path`.
    pub fn listen(&mut self, path: &Path, channel: Channel) -> io::Result<()> {
        let listener = bind_private(path)?;
        let shared = Arc::clone(&self.shared);
        let handle = thread::spawn(move || {
            for stream in listener.incoming() {
                if shared.stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let mut open = shared.open.lock().unwrap_or_else(|p| p.into_inner());
                if open.len() >= MAX_CLIENTS {
                    drop(open);
                    let busy = Arc::new(Mutex::new(stream));
                    let _ = send(&busy, &json!({"error": {"class": "GenericError", "desc": "too many clients"}}));
                    continue;
                }
                let client = shared.next_client.fetch_add(1, Ordering::Relaxed);
                if let Ok(clone) = stream.try_clone() {
                    open.push((client, clone));
                }
                drop(open);
                let worker = Arc::clone(&shared);
                let handle = thread::spawn(move || worker.serve_client(channel, stream, client));
                let mut threads = shared.client_threads.lock().unwrap_or_else(|p| p.into_inner());
                threads.retain(|t| !t.is_finished());
                threads.push(handle);
            }
        });
        self.listeners.push((path.to_path_buf(), handle));
        Ok(())
    }

    /// Stops accepting, closes every client, waits for running recoveries, removes the sockets.
    pub fn shutdown(self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        for (path, handle) in self.listeners {
            // A connection of our own wakes the accept loop so it sees `stopping`.
            drop(UnixStream::connect(&path));
            let _ = handle.join();
            let _ = std::fs::remove_file(&path);
        }
        for (_, stream) in self.shared.open.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        for threads in [&self.shared.client_threads, &self.shared.job_threads] {
            let handles: Vec<JoinHandle<()>> = threads.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect();
            for handle in handles {
                let _ = handle.join();
            }
        }
    }
}
