//! Point-in-time exports served by a running daemon: each one a [`PointExport`] (a view of a
//! retained point with its overlay) behind a vhost-user-blk socket of its own, served by the
//! same backend code as the live disk, on threads of its own, so a second VM can boot the point
//! while the first keeps writing to the live disk.
//!
//! Overlays live in the store directory (`exports/`), so they are on the store's file system
//! and go with it; a crash leaves them behind, and the next daemon on the store removes them
//! (it holds the store's lock, so no one else can be using them).

use std::collections::BTreeMap;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use crate::export::PointExport;
use crate::journal::Seq;
use crate::recovery::RecoveryTarget;
use crate::store::Store;
use crate::vhost_user::{BlkBackend, BlkOptions, BlockSource};

/// More exports than this at once are refused: each holds journal and snapshots from being
/// freed, and serves with threads of its own.
pub const MAX_EXPORTS: usize = 8;
const OVERLAY_DIR: &str = "exports";

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{0}")]
    Store(#[from] crate::Error),
    #[error("too many point exports: at most {max} may be open at once; remove one first")]
    TooMany { max: usize },
    #[error("no point export {0:?}")]
    Unknown(String),
    #[error("cannot listen on {path}: {cause}")]
    Socket { path: PathBuf, cause: std::io::Error },
    #[error("socket path {0} must be absolute")]
    RelativeSocket(PathBuf),
    #[error("cannot start serving the export: {0}")]
    Thread(std::io::Error),
}

/// One open export, as `query-point-exports` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ExportInfo {
    pub export_id: String,
    /// The point served: the volume as it was after this record.
    pub seq: Seq,
    /// The snapshot the view reads from (journal after it is kept while the export is open).
    pub snapshot_seq: Seq,
    /// The point as it was asked for.
    pub target: String,
    pub socket: PathBuf,
    /// Bytes the export's guest has written (they are in the overlay only).
    pub overlay_bytes: u64,
    pub frontend_connected: bool,
}

/// The overlay file of export `id` of the store in `store_dir`.
pub fn overlay_path(store_dir: &Path, id: &str) -> PathBuf {
    store_dir.join(OVERLAY_DIR).join(format!("{id}.overlay"))
}

/// Creates the overlay directory, emptied of what a crashed daemon left. Only the holder of
/// the store's lock may call this.
pub fn prepare_overlay_dir(store_dir: &Path) -> std::io::Result<()> {
    let dir = store_dir.join(OVERLAY_DIR);
    std::fs::create_dir_all(&dir)?;
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "overlay") {
            log::info!("removing {}, left by an export of a daemon that did not stop cleanly", path.display());
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// An export being served on its socket.
struct ExportServer {
    info: ExportInfo,
    export: Arc<PointExport>,
    backend: Arc<BlkBackend>,
    stopping: Arc<AtomicBool>,
    connection: Arc<Mutex<Option<UnixStream>>>,
    /// A handle on the listening socket, to wake an accept that waits for a frontend.
    waker: UnixListener,
    thread: Option<JoinHandle<()>>,
}

impl ExportServer {
    fn start(info: ExportInfo, export: Arc<PointExport>, options: BlkOptions) -> Result<Self, ExportError> {
        let socket_error = |cause| ExportError::Socket { path: info.socket.clone(), cause };
        let listener = crate::control::bind_private(&info.socket).map_err(socket_error)?;
        let waker = listener.try_clone().map_err(socket_error)?;
        let backend = Arc::new(BlkBackend::new(BlockSource::Export(Arc::clone(&export)), options));
        let stopping = Arc::new(AtomicBool::new(false));
        let connection = Arc::new(Mutex::new(None));
        let thread = {
            let (backend, stopping, connection) =
                (Arc::clone(&backend), Arc::clone(&stopping), Arc::clone(&connection));
            let (id, socket) = (info.export_id.clone(), info.socket.clone());
            std::thread::Builder::new().name(format!("rewind-{id}")).spawn(move || {
                if let Err(e) = crate::serve::accept_loop(listener, &socket, &backend, &stopping, &connection) {
                    log::error!("{id}: {e:#}");
                }
            })
        };
        let thread = match thread {
            Ok(thread) => thread,
            Err(e) => {
                let _ = std::fs::remove_file(&info.socket);
                return Err(ExportError::Thread(e));
            }
        };
        Ok(Self { info, export, backend, stopping, connection, waker, thread: Some(thread) })
    }

    fn info(&self) -> ExportInfo {
        ExportInfo {
            overlay_bytes: self.export.overlay_bytes(),
            frontend_connected: self.backend.connected.load(Ordering::Relaxed),
            ..self.info.clone()
        }
    }
}

impl Drop for ExportServer {
    /// Disconnects the frontend (in-flight requests finish), stops listening and removes the
    /// socket; the overlay goes with the last user of the export.
    fn drop(&mut self) {
        crate::serve::stop_serving(&self.stopping, &self.backend, &self.connection, &self.waker);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("{}: the serving thread panicked", self.info.export_id);
            }
        }
        let _ = std::fs::remove_file(&self.info.socket);
        log::info!("{}: removed", self.info.export_id);
    }
}

/// The exports of one daemon.
pub struct Exports {
    store: Arc<Store>,
    /// Options of the live device, which the exports' devices copy.
    options: BlkOptions,
    servers: Mutex<BTreeMap<String, ExportServer>>,
    started: AtomicU64,
}

impl Exports {
    pub fn new(store: Arc<Store>, options: BlkOptions) -> Self {
        Self { store, options, servers: Mutex::new(BTreeMap::new()), started: AtomicU64::new(0) }
    }

    fn servers(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ExportServer>> {
        // Changed by single inserts and removes only.
        self.servers.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Exports the point `target` names on a new socket at `socket`.
    pub fn add(&self, target: &RecoveryTarget, socket: &Path) -> Result<ExportInfo, ExportError> {
        if !socket.is_absolute() {
            return Err(ExportError::RelativeSocket(socket.to_path_buf()));
        }
        // Held throughout, so two adds cannot both pass the limit.
        let mut servers = self.servers();
        if servers.len() >= MAX_EXPORTS {
            return Err(ExportError::TooMany { max: MAX_EXPORTS });
        }
        let id = format!("export-{}", self.started.fetch_add(1, Ordering::Relaxed) + 1);
        let view = self.store.point_view(target)?;
        let export = Arc::new(PointExport::create(view, &overlay_path(self.store.store_dir(), &id))?);
        let info = ExportInfo {
            export_id: id.clone(),
            seq: export.seq(),
            snapshot_seq: export.view().snapshot_seq(),
            target: target.to_string(),
            socket: socket.to_path_buf(),
            overlay_bytes: 0,
            frontend_connected: false,
        };
        let options = BlkOptions { read_only: false, serial: export_serial(&id), ..self.options.clone() };
        warm_up(&export);
        let server = ExportServer::start(info, export, options)?;
        let info = server.info();
        log::info!("{id}: serving {} (seq {}) on {}", info.target, info.seq, info.socket.display());
        servers.insert(id, server);
        Ok(info)
    }

    /// Stops serving export `id` and removes its socket and overlay.
    pub fn remove(&self, id: &str) -> Result<(), ExportError> {
        let server = self.servers().remove(id).ok_or_else(|| ExportError::Unknown(id.to_string()))?;
        drop(server);
        Ok(())
    }

    pub fn list(&self) -> Vec<ExportInfo> {
        self.servers().values().map(ExportServer::info).collect()
    }

    /// Export `id` itself, for a promote job to read while it keeps serving.
    pub fn export(&self, id: &str) -> Result<(ExportInfo, Arc<PointExport>), ExportError> {
        let servers = self.servers();
        let server = servers.get(id).ok_or_else(|| ExportError::Unknown(id.to_string()))?;
        Ok((server.info(), Arc::clone(&server.export)))
    }

    /// Removes every export (the daemon is stopping).
    pub fn remove_all(&self) {
        let servers = std::mem::take(&mut *self.servers());
        drop(servers);
    }
}

/// Reads what the export's view reads from into the page cache, on a thread of its own so the
/// command does not wait for it.
pub fn warm_up(export: &PointExport) {
    let spawned = std::thread::Builder::new().name("rewind-export-warm-up".into()).spawn(export.view().prefetcher());
    if let Err(e) = spawned {
        log::debug!("cannot start reading an export ahead: {e}");
    }
}

/// The serial number an export's guest reads: the export's id, so it is told from the live disk.
fn export_serial(id: &str) -> [u8; crate::virtio_blk::ID_BYTES] {
    let mut serial = [0u8; crate::virtio_blk::ID_BYTES];
    let text = format!("rewind-{id}");
    let n = text.len().min(serial.len());
    serial[..n].copy_from_slice(&text.as_bytes()[..n]);
    serial
}
