//! `rewind serve`: the store behind a vhost-user-blk socket, one frontend at a time, with
//! periodic snapshots, retention and checkpoints in the background, and a clean exit on
//! SIGINT/SIGTERM (in-flight requests finish, the journal is synced). With `--at-*` it serves
//! a retained point instead (a point-in-time export, writes to a scratch overlay), and the
//! control socket can add exports of other points while it serves.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use vhost::vhost_user::BackendReqHandler;

use crate::control::{Channel, ControlServer};
use crate::export::PointExport;
use crate::point_exports::{self, Exports};
use crate::recovery::RecoveryTarget;
use crate::retention::RetentionPolicy;
use crate::store::{CreateOptions, Store};
use crate::vhost_user::{BlkBackend, BlkOptions, BlockSource, Connection};
use crate::virtio_blk::ID_BYTES;

pub struct ServeConfig {
    pub image: PathBuf,
    pub store_dir: Option<PathBuf>,
    pub socket: PathBuf,
    /// The host control socket (every command).
    pub control: Option<PathBuf>,
    /// The guest-agent socket (markers and status only).
    pub agent_socket: Option<PathBuf>,
    /// Size of the image if the store has to be created.
    pub size: Option<u64>,
    pub num_queues: usize,
    pub queue_size: usize,
    pub serial: Option<String>,
    pub read_only: bool,
    pub snapshot_every: Option<Duration>,
    /// Serve this retained point (writes go to an overlay) instead of the live volume.
    pub at: Option<RecoveryTarget>,
    /// Applied to the store's retention settings before serving.
    pub retention: Box<dyn Fn(&mut RetentionPolicy) + Send>,
    /// The replica to ship the volume's history to (s3://BUCKET/PREFIX or file:///DIR).
    pub replicate: Option<String>,
    /// Remote retention: points older than this are freed from the replica.
    pub replica_max_age: Option<Duration>,
    /// Journal bytes shipped between remote snapshots (0: none; None: the default for the volume).
    pub replica_delta_every: Option<u64>,
}

/// Who serves a store, recorded in it so that offline commands can point at the control socket.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ServedBy {
    pub pid: u32,
    pub socket: PathBuf,
    pub control: Option<PathBuf>,
}

const SERVED_BY_FILE: &str = "served-by.json";

impl ServedBy {
    fn write(&self, store_dir: &Path) -> Result<()> {
        let text = serde_json::to_vec_pretty(self).expect("serialisable");
        std::fs::write(store_dir.join(SERVED_BY_FILE), text).context("recording the serving process")
    }

    fn remove(store_dir: &Path) {
        let _ = std::fs::remove_file(store_dir.join(SERVED_BY_FILE));
    }

    /// What the store records of its server, if anything.
    pub fn read(store_dir: &Path) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(store_dir.join(SERVED_BY_FILE)).ok()?).ok()
    }
}

/// How often the background thread checkpoints and applies retention.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(5);

fn serial_from(config: &ServeConfig, uuid: uuid::Uuid) -> Result<[u8; ID_BYTES]> {
    let text = match &config.serial {
        Some(serial) => serial.clone(),
        None => format!("rewind-{}", &uuid.simple().to_string()[..ID_BYTES - 7]),
    };
    if text.len() > ID_BYTES {
        return Err(anyhow!("--serial is {} bytes; at most {ID_BYTES} fit", text.len()));
    }
    let mut serial = [0u8; ID_BYTES];
    serial[..text.len()].copy_from_slice(text.as_bytes());
    Ok(serial)
}

fn open_or_create(config: &ServeConfig) -> Result<Store> {
    let dir = config.store_dir.clone().unwrap_or_else(|| crate::store::default_store_dir(&config.image));
    let (store, report) = if dir.join("meta.json").exists() {
        Store::open(&config.image, Some(&dir))
    } else {
        let options = CreateOptions { size: config.size, ..Default::default() };
        Store::create(&config.image, Some(&dir), &options, &mut |_, _| {})
    }
    .with_context(|| format!("opening the store of {}", config.image.display()))?;
    if let Some(reason) = report.volume_rebuilt {
        log::warn!("volume rebuilt on open: {reason}");
    }
    Ok(store)
}

/// How often the volume is made durable (bounding what an open after a crash replays).
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(60);

/// Periodic snapshots, retention and checkpoints until `stop` says otherwise.
fn maintenance(store: Arc<Store>, snapshot_every: Option<Duration>, stop: mpsc::Receiver<()>) {
    let mut last_snapshot = Instant::now();
    let mut last_checkpoint = Instant::now();
    let interval = snapshot_every.map_or(MAINTENANCE_INTERVAL, |every| every.min(MAINTENANCE_INTERVAL));
    loop {
        match stop.recv_timeout(interval) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        if snapshot_every.is_some_and(|every| last_snapshot.elapsed() >= every) {
            match store.take_snapshot() {
                Ok(info) => log::info!("periodic snapshot at seq {}", info.seq),
                Err(e) => log::error!("periodic snapshot failed: {e}"),
            }
            last_snapshot = Instant::now();
        }
        if let Err(e) = store.enforce_retention() {
            log::error!("retention failed: {e}");
        }
        if last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL {
            if let Err(e) = store.checkpoint_now() {
                log::error!("checkpoint failed: {e}");
            }
            last_checkpoint = Instant::now();
        }
    }
}

pub fn serve(mut config: ServeConfig) -> Result<()> {
    // Paths are reported to clients and recorded in the store: make them absolute.
    for path in
        [Some(&mut config.image), Some(&mut config.socket), config.control.as_mut(), config.agent_socket.as_mut()]
            .into_iter()
            .flatten()
    {
        *path = std::path::absolute(&*path).with_context(|| format!("resolving {}", path.display()))?;
    }
    if config.num_queues == 0 || config.num_queues > 64 {
        return Err(anyhow!("--num-queues must be 1 to 64"));
    }
    if !config.queue_size.is_power_of_two() || config.queue_size > 32768 {
        return Err(anyhow!("--queue-size must be a power of two up to 32768"));
    }
    let store = open_or_create(&config)?;
    let mut policy = store.retention();
    (config.retention)(&mut policy);
    store.set_retention(policy)?;
    let serial = serial_from(&config, store.status().uuid)?;
    point_exports::prepare_overlay_dir(store.store_dir()).context("preparing the directory of export overlays")?;
    let store = Arc::new(store);
    let source = match &config.at {
        None => BlockSource::Live(Arc::clone(&store)),
        Some(target) => {
            let export = Arc::new(export_point(&store, target)?);
            point_exports::warm_up(&export);
            BlockSource::Export(export)
        }
    };
    let options = BlkOptions {
        num_queues: config.num_queues,
        queue_size: config.queue_size,
        serial,
        read_only: config.read_only,
    };
    let backend = Arc::new(BlkBackend::new(source, options.clone()));

    let exports = Arc::new(Exports::new(Arc::clone(&store), options));
    let mut control =
        ControlServer::new(Arc::clone(&store), Arc::clone(&backend), config.socket.clone(), Arc::clone(&exports));
    // Before maintenance starts (the shipper holds retention from the first moment) and before
    // the sockets appear (query-replication answers from the first command).
    let shipper = match &config.replicate {
        Some(url) => {
            let remote = rewind_replica::Remote::open(url).with_context(|| format!("--replicate {url}"))?;
            let send = control.event_sender();
            let events = Box::new(move |event: rewind_replica::ReplicationEvent| send(event.into()));
            let delta_every = match config.replica_delta_every {
                Some(0) => None,
                Some(bytes) => Some(bytes),
                None => Some(rewind_replica::ShipperConfig::default_delta_every(store.volume_size())),
            };
            let shipping =
                rewind_replica::ShipperConfig { max_age: config.replica_max_age, delta_every, ..Default::default() };
            let shipper = rewind_replica::Shipper::start(Arc::clone(&store), remote, shipping, events)
                .context("starting replication")?;
            control.set_replication(shipper.status_handle());
            log::info!("replicating to {url}");
            Some(shipper)
        }
        None => None,
    };
    for (path, channel) in [(&config.control, Channel::Host), (&config.agent_socket, Channel::Agent)] {
        if let Some(path) = path {
            control.listen(path, channel).with_context(|| format!("listening on {}", path.display()))?;
        }
    }
    let served_by =
        ServedBy { pid: std::process::id(), socket: config.socket.clone(), control: config.control.clone() };
    // Before the socket appears, which tells whoever waits for it that the daemon is ready. Only
    // offline commands use the record (to name the control socket): a full disk does not stop
    // the daemon here.
    if let Err(e) = served_by.write(store.store_dir()) {
        log::warn!("{e:#}");
    }
    // Signals are caught before the socket appears: whoever waits for it may signal at once.
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])
        .context("installing signal handlers")?;
    let signal_handle = signals.handle();
    let listener = crate::control::bind_private(&config.socket)
        .with_context(|| format!("listening on {}", config.socket.display()))?;
    // The signal thread's own handle on the listening socket, to wake a waiting accept.
    let waker = listener.try_clone().context("sharing the listening socket")?;

    let stopping = Arc::new(AtomicBool::new(false));
    let connection: Arc<Mutex<Option<UnixStream>>> = Arc::new(Mutex::new(None));
    let signal_thread = {
        let stopping = Arc::clone(&stopping);
        let connection = Arc::clone(&connection);
        let backend = Arc::clone(&backend);
        thread::spawn(move || {
            if let Some(signal) = signals.forever().next() {
                log::info!("signal {signal}: finishing in-flight requests and exiting");
                stop_serving(&stopping, &backend, &connection, &waker);
            }
        })
    };
    let (stop_maintenance, maintenance_stop) = mpsc::channel();
    let maintenance_thread = {
        let store = Arc::clone(&store);
        let every = config.snapshot_every;
        thread::spawn(move || maintenance(store, every, maintenance_stop))
    };

    let result = accept_loop(listener, &config.socket, &backend, &stopping, &connection);

    signal_handle.close();
    let _ = signal_thread.join();
    drop(stop_maintenance);
    let _ = maintenance_thread.join();
    // Ships what is durable once more (unless the replica is failing), before the store closes.
    drop(shipper);
    control.shutdown();
    exports.remove_all();
    drop(exports);
    drop(backend);
    ServedBy::remove(store.store_dir());
    let store = Arc::try_unwrap(store).map_err(|_| anyhow!("the store is still in use at exit"))?;
    store.close().context("syncing the store at exit")?;
    let _ = std::fs::remove_file(&config.socket);
    log::info!("rewind serve: stopped cleanly");
    result
}

/// The export `rewind serve --at-*` serves: its overlay is removed when it stops.
fn export_point(store: &Store, target: &RecoveryTarget) -> Result<PointExport> {
    let view = store.point_view(target).with_context(|| format!("exporting {target}"))?;
    let overlay = point_exports::overlay_path(store.store_dir(), "served");
    let export = PointExport::create(view, &overlay).context("creating the export's overlay")?;
    log::info!(
        "serving {target} (seq {}, {} extents from snapshot {} on): writes go to {} and are dropped at exit",
        export.seq(),
        export.view().extents(),
        export.view().snapshot_seq(),
        overlay.display()
    );
    Ok(export)
}

/// Makes [`accept_loop`] return: every request taken off a ring completes, then the frontend
/// is disconnected (it finds nothing in flight when it reconnects to the next daemon), or the
/// accept that waits for one is woken.
pub(crate) fn stop_serving(
    stopping: &AtomicBool,
    backend: &BlkBackend,
    connection: &Mutex<Option<UnixStream>>,
    waker: &UnixListener,
) {
    stopping.store(true, Ordering::SeqCst);
    backend.finish_in_flight();
    match connection.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
        Some(stream) => hang_up(stream),
        None => crate::control::wake_accept(waker),
    }
}

fn hang_up(stream: &UnixStream) {
    if let Err(e) = stream.shutdown(std::net::Shutdown::Both) {
        log::warn!("cannot disconnect the frontend: {e}");
    }
}

/// Serves one frontend after another on `listener` until `stopping` is set ([`stop_serving`]).
pub(crate) fn accept_loop(
    listener: UnixListener,
    socket: &Path,
    backend: &Arc<BlkBackend>,
    stopping: &AtomicBool,
    connection: &Mutex<Option<UnixStream>>,
) -> Result<()> {
    log::info!("listening on {} ({} queue(s))", socket.display(), backend.options().num_queues);
    while !stopping.load(Ordering::SeqCst) {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(_) if stopping.load(Ordering::SeqCst) => break,
            Err(e) => return Err(anyhow!("accepting a frontend: {e}")),
        };
        serve_frontend(stream, backend, stopping, connection)?;
    }
    Ok(())
}

/// Answers one frontend's vhost-user requests until it goes away or is disconnected.
fn serve_frontend(
    stream: UnixStream,
    backend: &Arc<BlkBackend>,
    stopping: &AtomicBool,
    connection: &Mutex<Option<UnixStream>>,
) -> Result<()> {
    let hangup = stream.try_clone().context("sharing the frontend's socket")?;
    let state = Arc::new(Mutex::new(Connection::new(Arc::clone(backend)).context("setting up the queues")?));
    let mut requests = BackendReqHandler::from_stream(stream, Arc::clone(&state));
    *connection.lock().unwrap_or_else(|p| p.into_inner()) = Some(hangup);
    backend.connected.store(true, Ordering::Relaxed);
    // A stop that came between the accept and the line above found no connection to end.
    if stopping.load(Ordering::SeqCst) {
        if let Some(stream) = connection.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            hang_up(stream);
        }
    } else {
        log::info!("frontend connected");
    }
    let ended = loop {
        if let Err(e) = requests.handle_request() {
            break e;
        }
    };
    *connection.lock().unwrap_or_else(|p| p.into_inner()) = None;
    state.lock().unwrap_or_else(|p| p.into_inner()).close();
    backend.connected.store(false, Ordering::Relaxed);
    use vhost::vhost_user::Error as ProtocolError;
    match ended {
        ProtocolError::Disconnected | ProtocolError::SocketBroken(_) | ProtocolError::PartialMessage => {
            log::info!("frontend disconnected")
        }
        _ if stopping.load(Ordering::SeqCst) => log::info!("frontend disconnected"),
        e => log::warn!("frontend connection ended: {e}"),
    }
    Ok(())
}
