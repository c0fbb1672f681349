//! Runs commands against the store, the device and the point exports, and keeps the
//! background jobs (recoveries and promotes).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use super::arguments::CommandError;
use super::errors::QmpError;
use super::protocol::{AgentCommand, Channel, Empty, HostCommand, PointExportArgs, RecoverArgs};
use super::replies::{
    Event, Job, JobProgress, JobStarted, JobStatus, JobType, Journal, Marker, MarkerAdded, PointExportAdded,
    RetentionApplied, Snapshot, Status,
};
use super::server::Shared;
use crate::journal::Seq;
use crate::marker::MarkerSource;
use crate::recovery::RecoveryTarget;

const PROGRESS_EVENT_INTERVAL: Duration = Duration::from_millis(200);

/// A reply's value as sent.
pub(super) fn reply<T: Serialize>(value: &T) -> Result<Value, QmpError> {
    serde_json::to_value(value).map_err(|e| QmpError::generic(format!("cannot encode the reply: {e}")))
}

/// The background jobs: every one started since the daemon did, and the threads running them.
#[derive(Default)]
pub(super) struct Jobs {
    list: Mutex<BTreeMap<u64, Job>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    started: AtomicU64,
}

impl Jobs {
    fn all(&self) -> Vec<Job> {
        self.list.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// Changes job `number` and returns what `change` returns.
    fn update<R>(&self, number: u64, change: impl FnOnce(&mut Job) -> R) -> Option<R> {
        self.list.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&number).map(change)
    }

    /// Waits for every running job to finish.
    pub(super) fn wait(&self) {
        let handles: Vec<JoinHandle<()>> = self.threads.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect();
        for handle in handles {
            let _ = handle.join();
        }
    }
}

impl Shared {
    /// Runs a command either channel offers (negotiation is the session's, in `handle`).
    pub(super) fn execute_agent(&self, channel: Channel, command: AgentCommand) -> Result<Value, QmpError> {
        let store = &self.store;
        match command {
            AgentCommand::QmpCapabilities(_) => {
                Err(QmpError::command_not_found("Capabilities negotiation is already complete, command ignored"))
            }
            AgentCommand::MarkerAdd { name, note } => {
                let source = match channel {
                    Channel::Host => MarkerSource::Host,
                    Channel::Agent => MarkerSource::Guest,
                };
                let marker = store.add_marker(&name, note.as_deref(), source)?;
                reply(&MarkerAdded { id: marker.id, seq: marker.seq, time_ns: marker.time_ns })
            }
            AgentCommand::MarkerList => reply(&store.markers().into_iter().map(Marker::from).collect::<Vec<_>>()),
            AgentCommand::MarkerGet { name } => reply(&Marker::from(store.marker(&name)?)),
            AgentCommand::QueryStatus => reply(&self.status()),
        }
    }

    /// Runs a command of the host socket.
    pub(super) fn execute_host(self: &Arc<Self>, command: HostCommand) -> Result<Value, QmpError> {
        let store = &self.store;
        match command {
            HostCommand::SnapshotTake => reply(&Snapshot::from(store.take_snapshot()?)),
            HostCommand::SnapshotList => reply(&store.snapshots().into_iter().map(Snapshot::from).collect::<Vec<_>>()),
            HostCommand::QueryJournal => reply(&Journal::from(store.status())),
            HostCommand::RetentionSet(change) => {
                let mut policy = store.retention();
                change.apply_to(&mut policy);
                store.set_retention(policy.clone())?;
                let report = store.enforce_retention()?;
                reply(&RetentionApplied::new(policy, &report))
            }
            HostCommand::Recover(args) => reply(&self.start_recovery(args)?),
            HostCommand::QueryJobs => reply(&self.jobs.all()),
            HostCommand::PointExportAdd(args) => reply(&self.add_export(args)?),
            HostCommand::PointExportRemove { export_id } => {
                self.exports.remove(&export_id)?;
                reply(&Empty {})
            }
            HostCommand::QueryPointExports => reply(&self.exports.list()),
            HostCommand::PointExportPromote { export_id, output } => reply(&self.start_promote(&export_id, output)?),
            HostCommand::QueryReplication => match self.replication.get() {
                Some(replication) => reply(&replication.get()),
                None => Err(QmpError::generic("replication is off: start rewind serve with --replicate URL")),
            },
        }
    }

    fn status(&self) -> Status {
        Status {
            image: self.store.image().to_path_buf(),
            size: self.store.volume_size(),
            head: self.store.head(),
            queues: self.device.queues(),
            read_only: self.device.read_only(),
            vhost_socket: self.vhost_socket.clone(),
            frontend_connected: self.device.frontend_connected(),
            counters: self.device.counters(),
        }
    }

    fn add_export(&self, args: PointExportArgs) -> Result<PointExportAdded, QmpError> {
        let target = args.target()?;
        let info = self.exports.add(&target, &args.socket)?;
        Ok(PointExportAdded { export_id: info.export_id, seq: info.seq })
    }

    /// Checks the target now (unknown marker, unrecoverable point, output in the way) rather
    /// than in the job, then starts the job.
    fn start_recovery(self: &Arc<Self>, args: RecoverArgs) -> Result<JobStarted, QmpError> {
        let target = args.target()?;
        check_output(&args.output)?;
        let seq = self.store.resolve(&target)?;
        Ok(self.start_job(JobType::Recover, target.to_string(), args.output, seq, move |shared, output, progress| {
            let report =
                shared.store.recover_unless_stopped(&RecoveryTarget::Seq(seq), output, progress, &shared.stopping)?;
            Ok(format!("recovered seq {} into {}", report.seq, report.output.display()))
        }))
    }

    /// Checks the export and the output now, then starts a job that writes the export (its
    /// point plus what its guest wrote) into a new image while it keeps serving.
    fn start_promote(self: &Arc<Self>, export_id: &str, output: PathBuf) -> Result<JobStarted, QmpError> {
        check_output(&output)?;
        let (info, export) = self.exports.export(export_id)?;
        let target = format!("{} ({})", info.export_id, info.target);
        Ok(self.start_job(JobType::Promote, target, output, info.seq, move |shared, output, progress| {
            let data_bytes = export.promote(output, progress, &shared.stopping)?;
            Ok(format!("promoted into {} ({data_bytes} data bytes)", output.display()))
        }))
    }

    /// Lists a job and runs `work` (given the output and a progress callback) on a thread of
    /// its own; `work` returns what to log when it succeeds.
    fn start_job(
        self: &Arc<Self>,
        job_type: JobType,
        target: String,
        output: PathBuf,
        seq: Seq,
        work: impl FnOnce(&Self, &Path, &mut dyn FnMut(u64, u64)) -> crate::Result<String> + Send + 'static,
    ) -> JobStarted {
        let number = self.jobs.started.fetch_add(1, Ordering::Relaxed) + 1;
        let kind = match job_type {
            JobType::Recover => "recover",
            JobType::Promote => "promote",
        };
        let id = format!("{kind}-{number}");
        let job = Job {
            id: id.clone(),
            job_type,
            status: JobStatus::Running,
            target,
            output: output.clone(),
            done: 0,
            total: self.store.volume_size(),
            seq: Some(seq),
            error: None,
        };
        self.jobs.list.lock().unwrap_or_else(|p| p.into_inner()).insert(number, job);
        let shared = Arc::clone(self);
        let handle = thread::spawn(move || shared.run_job(number, &output, work));
        self.jobs.threads.lock().unwrap_or_else(|p| p.into_inner()).push(handle);
        JobStarted { job_id: id, seq }
    }

    /// The job's thread: runs it, with progress events, then reports how it ended.
    fn run_job(
        &self,
        number: u64,
        output: &Path,
        work: impl FnOnce(&Self, &Path, &mut dyn FnMut(u64, u64)) -> crate::Result<String>,
    ) {
        let Some(id) = self.jobs.update(number, |job| job.id.clone()) else { return };
        let mut last_event = Instant::now();
        let result = work(self, output, &mut |done, total| {
            self.jobs.update(number, |job| {
                job.done = done;
                job.total = total;
            });
            if last_event.elapsed() >= PROGRESS_EVENT_INTERVAL {
                last_event = Instant::now();
                self.emit(Event::JobProgress(JobProgress { id: id.clone(), done, total }));
            }
        });
        match &result {
            Ok(done) => log::info!("{id}: {done}"),
            Err(e) => log::error!("{id} failed: {e}"),
        }
        let finished = self.jobs.update(number, |job| {
            match result {
                Ok(_) => {
                    job.status = JobStatus::Concluded;
                    job.done = job.total;
                }
                Err(e) => {
                    job.status = JobStatus::Failed;
                    job.error = Some(e.to_string());
                }
            }
            job.clone()
        });
        if let Some(job) = finished {
            self.emit(Event::JobCompleted(job));
        }
    }
}

/// A job's output must be an absolute path (the daemon's working directory is not the
/// client's) where nothing is yet.
fn check_output(output: &Path) -> Result<(), QmpError> {
    if !output.is_absolute() {
        let reason = "must be an absolute path".to_string();
        return Err(CommandError::Invalid { name: "output".into(), reason }.into());
    }
    if output.exists() {
        return Err(crate::Error::OutputExists(output.to_path_buf()).into());
    }
    Ok(())
}
