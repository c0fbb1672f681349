//! The sockets: accepting clients, one thread each, QMP negotiation, replies and events.

use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Map, Value};

use super::device::DeviceStatus;
use super::dispatch::{reply, Jobs};
use super::errors::QmpError;
use super::protocol::{AgentCommand, Channel, Command, Empty};
use super::reader::{MessageReader, ReadError};
use super::replies::{Event, EventMessage, Greeting, Outcome, Response, Timestamp};
use crate::point_exports::Exports;
use crate::store::Store;

/// More simultaneous clients than this are turned away, so clients cannot exhaust the daemon.
const MAX_CLIENTS: usize = 64;
/// A client that does not read its replies for this long is dropped rather than block others.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// A connected client's write half, shared with event senders.
type ClientWriter = Arc<Mutex<UnixStream>>;

/// What every client thread and job shares.
pub(super) struct Shared {
    pub(super) store: Arc<Store>,
    pub(super) device: Arc<dyn DeviceStatus>,
    pub(super) vhost_socket: PathBuf,
    pub(super) exports: Arc<Exports>,
    pub(super) jobs: Jobs,
    client_threads: Mutex<Vec<JoinHandle<()>>>,
    /// Host clients that finished negotiation: they receive events.
    subscribers: Mutex<Vec<(u64, ClientWriter)>>,
    /// Every open client stream, to close them all at shutdown.
    open: Mutex<Vec<(u64, UnixStream)>>,
    next_client: AtomicU64,
    /// Set by `shutdown`: accept loops, clients and recoveries end.
    pub(super) stopping: AtomicBool,
    /// What `query-replication` reports, when the daemon ships to a replica.
    pub(super) replication: std::sync::OnceLock<rewind_replica::ship::StatusHandle>,
}

/// The control sockets of one daemon.
pub struct ControlServer {
    shared: Arc<Shared>,
    /// Each listener's path, a handle on its socket to wake its accept, and its thread.
    listeners: Vec<(PathBuf, UnixListener, JoinHandle<()>)>,
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

/// Makes a blocked `accept` on `listener` return (with EINVAL), whatever became of the socket's
/// path: shutting the socket down needs no path, unlike connecting to it.
pub fn wake_accept(listener: &UnixListener) {
    // SAFETY: shutdown(2) on a socket descriptor the caller owns; it changes no memory.
    if unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) } != 0 {
        log::error!("cannot wake a listener: {}", io::Error::last_os_error());
    }
}

fn send(writer: &ClientWriter, message: &impl Serialize) -> io::Result<()> {
    let mut line = serde_json::to_vec(message)?;
    line.push(b'\n');
    writer.lock().unwrap_or_else(|p| p.into_inner()).write_all(&line)
}

fn error_response(error: QmpError) -> Response {
    Response { outcome: Outcome::Error(error), id: None }
}

/// A QMP input's `execute` and `arguments` (none given: an empty map), its framing checked.
pub fn split_request(message: &Value) -> Result<(&str, Map<String, Value>), QmpError> {
    let Some(object) = message.as_object() else {
        return Err(QmpError::generic("QMP input must be a JSON object"));
    };
    let Some(name) = object.get("execute").and_then(Value::as_str) else {
        return Err(QmpError::generic("QMP input lacks member 'execute'"));
    };
    if let Some(unknown) = object.keys().find(|k| !matches!(k.as_str(), "execute" | "arguments" | "id")) {
        return Err(QmpError::generic(format!("QMP input member '{unknown}' is unexpected")));
    }
    match object.get("arguments") {
        None => Ok((name, Map::new())),
        Some(Value::Object(arguments)) => Ok((name, arguments.clone())),
        Some(_) => Err(QmpError::generic("QMP input member 'arguments' must be an object")),
    }
}

impl Shared {
    pub(super) fn emit(&self, event: Event) {
        let message = EventMessage { event, timestamp: Timestamp::now() };
        let subscribers: Vec<(u64, ClientWriter)> = self.subscribers.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for (id, writer) in subscribers {
            if send(&writer, &message).is_err() {
                self.subscribers.lock().unwrap_or_else(|p| p.into_inner()).retain(|(c, _)| *c != id);
            }
        }
    }

    /// Serves one client until it disconnects or the server stops.
    fn serve_client(self: &Arc<Self>, channel: Channel, stream: UnixStream, client: u64) {
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        let Ok(write_half) = stream.try_clone() else { return };
        let writer: ClientWriter = Arc::new(Mutex::new(write_half));
        if send(&writer, &Greeting::default()).is_err() {
            return;
        }
        let mut negotiated = false;
        let mut reader = MessageReader::new(stream);
        while !self.stopping.load(Ordering::SeqCst) {
            let message = match reader.next_message() {
                Ok(Some(message)) => message,
                Ok(None) | Err(ReadError::Closed) => break,
                Err(ReadError::Malformed(desc)) => {
                    if send(&writer, &error_response(QmpError::generic(desc))).is_err() {
                        break;
                    }
                    continue;
                }
            };
            let started = Instant::now();
            let outcome = match self.handle(channel, &message, &mut negotiated) {
                Ok(value) => Outcome::Return(value),
                Err(e) => Outcome::Error(e),
            };
            if negotiated && channel == Channel::Host {
                let mut subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
                if !subscribers.iter().any(|(c, _)| *c == client) {
                    subscribers.push((client, Arc::clone(&writer)));
                }
            }
            if send(&writer, &Response { outcome, id: message.get("id").cloned() }).is_err() {
                break;
            }
            // From the request read to the reply sent: the daemon's share of a client's wait.
            let command = message.get("execute").and_then(Value::as_str).unwrap_or("?");
            log::debug!("control: {command} handled in {} µs", started.elapsed().as_micros());
        }
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner()).retain(|(c, _)| *c != client);
        self.open.lock().unwrap_or_else(|p| p.into_inner()).retain(|(c, _)| *c != client);
    }

    /// One QMP input: negotiation first, then the commands the channel offers.
    fn handle(self: &Arc<Self>, channel: Channel, message: &Value, negotiated: &mut bool) -> Result<Value, QmpError> {
        let (name, arguments) = split_request(message)?;
        let command = Command::parse(name, arguments, channel);
        if !*negotiated {
            return match command {
                Ok(Command::Agent(AgentCommand::QmpCapabilities(_))) => {
                    *negotiated = true;
                    reply(&Empty {})
                }
                _ => Err(QmpError::command_not_found("Expecting capabilities negotiation with 'qmp_capabilities'")),
            };
        }
        match command? {
            Command::Agent(command) => self.execute_agent(channel, command),
            Command::Host(command) => self.execute_host(command),
        }
    }
}

impl ControlServer {
    /// `device` is what `query-status` reports on; `vhost_socket` is where it is served;
    /// `exports` are the point exports the `point-export-*` commands manage.
    pub fn new<D: DeviceStatus + 'static>(
        store: Arc<Store>,
        device: Arc<D>,
        vhost_socket: PathBuf,
        exports: Arc<Exports>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                store,
                device,
                vhost_socket,
                exports,
                jobs: Jobs::default(),
                client_threads: Mutex::new(Vec::new()),
                subscribers: Mutex::new(Vec::new()),
                open: Mutex::new(Vec::new()),
                next_client: AtomicU64::new(0),
                stopping: AtomicBool::new(false),
                replication: std::sync::OnceLock::new(),
            }),
            listeners: Vec::new(),
        }
    }

    /// Has `query-replication` report what `replication` says.
    pub fn set_replication(&self, replication: rewind_replica::ship::StatusHandle) {
        let _ = self.shared.replication.set(replication);
    }

    /// Sends events to every host client that negotiated, from any thread.
    pub fn event_sender(&self) -> impl Fn(Event) + Send + 'static {
        let shared = Arc::clone(&self.shared);
        move |event| shared.emit(event)
    }

    /// Starts accepting clients of `channel` on `path`.
    pub fn listen(&mut self, path: &Path, channel: Channel) -> io::Result<()> {
        let listener = bind_private(path)?;
        let waker = listener.try_clone()?;
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
                    let _ = send(&busy, &error_response(QmpError::generic("too many clients")));
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
        self.listeners.push((path.to_path_buf(), waker, handle));
        Ok(())
    }

    /// Stops accepting, closes every client, stops running recoveries (their outputs are
    /// removed), removes the sockets.
    pub fn shutdown(self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        for (path, waker, handle) in self.listeners {
            wake_accept(&waker);
            let _ = handle.join();
            let _ = std::fs::remove_file(&path);
        }
        for (_, stream) in self.shared.open.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        let clients: Vec<JoinHandle<()>> =
            self.shared.client_threads.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect();
        for handle in clients {
            let _ = handle.join();
        }
        self.shared.jobs.wait();
    }
}
