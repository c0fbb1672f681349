//! Runs commands against the store and the device, and keeps the background jobs.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use super::arguments::CommandError;
use super::errors::QmpError;
use super::protocol::{AgentCommand, Channel, HostCommand, RecoverArgs};
use super::replies::{
    Event, Job, JobProgress, JobStarted, JobStatus, JobType, Journal, Marker, MarkerAdded, RetentionApplied, Snapshot,
    Status,
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

    /// Checks the target now (unknown marker, unrecoverable point, output in the way) rather
    /// than in the job, then starts the job.
    fn start_recovery(self: &Arc<Self>, args: RecoverArgs) -> Result<JobStarted, QmpError> {
        let target = args.target()?;
        if !args.output.is_absolute() {
            let reason = "must be an absolute path".to_string();
            return Err(CommandError::Invalid { name: "output".into(), reason }.into());
        }
        if args.output.exists() {
            return Err(crate::Error::OutputExists(args.output).into());
        }
        let seq = self.store.resolve(&target)?;
        let number = self.jobs.started.fetch_add(1, Ordering::Relaxed) + 1;
        let id = format!("recover-{number}");
        let job = Job {
            id: id.clone(),
            job_type: JobType::Recover,
            status: JobStatus::Running,
            target: target.to_string(),
            output: args.output.clone(),
            done: 0,
            total: self.store.volume_size(),
            seq: Some(seq),
            error: None,
        };
        self.jobs.list.lock().unwrap_or_else(|p| p.into_inner()).insert(number, job);
        let shared = Arc::clone(self);
        let handle = thread::spawn(move || shared.run_recovery(number, seq, &args.output));
        self.jobs.threads.lock().unwrap_or_else(|p| p.into_inner()).push(handle);
        Ok(JobStarted { job_id: id, seq })
    }

    /// The job's thread: recovers, with progress events, then reports how it ended.
    fn run_recovery(&self, number: u64, seq: Seq, output: &Path) {
        let Some(id) = self.jobs.update(number, |job| job.id.clone()) else { return };
        let mut last_event = Instant::now();
        let target = RecoveryTarget::Seq(seq);
        let result = self.store.recover_unless_stopped(
            &target,
            output,
            &mut |done, total| {
                self.jobs.update(number, |job| {
                    job.done = done;
                    job.total = total;
                });
                if last_event.elapsed() >= PROGRESS_EVENT_INTERVAL {
                    last_event = Instant::now();
                    self.emit(Event::JobProgress(JobProgress { id: id.clone(), done, total }));
                }
            },
            &self.stopping,
        );
        match &result {
            Ok(report) => log::info!("{id}: recovered seq {} into {}", report.seq, report.output.display()),
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
