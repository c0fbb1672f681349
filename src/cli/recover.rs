//! `recover`: offline into a new image, or as a job of the daemon, followed to its end.

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::args::{RecoverArgs, Where};
use super::{emit, open_replica, progress_bar, with_store};
use crate::control::protocol::{self, HostCommand};
use crate::control::replies::{Event, Job, JobStarted, JobStatus};
use crate::qmp_client::QmpClient;
use crate::recovery::RecoveryTarget;

pub(super) fn recover(args: &RecoverArgs) -> Result<()> {
    let target = args.target.target();
    let bar = progress_bar("recovering");
    let mut progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    match args.place.resolve() {
        Where::Online(control) => {
            let job = recover_online(control, &target, &args.output, &mut progress)?;
            bar.finish_and_clear();
            emit(args.json, &job, || {
                let seq = job.seq.map_or("?".to_string(), |seq| seq.to_string());
                println!("recovered to seq {seq} into {} (job {})", args.output.display(), job.id);
            })
        }
        Where::Replica(url) => {
            let report = open_replica(url)?
                .recover(&target, &args.output, &mut progress)
                .with_context(|| format!("recovering to {target} from {url}"))?;
            bar.finish_and_clear();
            emit(args.json, &report, || {
                println!(
                    "recovered {url} to seq {} (remote snapshot at seq {} + {} journal records) into {}",
                    report.seq,
                    report.snapshot_seq,
                    report.records_replayed,
                    report.output.display()
                );
            })
        }
        Where::Offline(image, store) => {
            let report = with_store(image, store, |s| {
                s.recover(&target, &args.output, &mut progress).with_context(|| format!("recovering to {target}"))
            })?;
            bar.finish_and_clear();
            emit(args.json, &report, || {
                println!(
                    "recovered {} to seq {} (snapshot {} + {} journal records) into {}",
                    image.display(),
                    report.seq,
                    report.snapshot_seq,
                    report.records_replayed,
                    report.output.display()
                );
            })
        }
    }
}

/// Starts a recovery job on the daemon and follows its events to the end.
fn recover_online(
    control: &Path,
    target: &RecoveryTarget,
    output: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Job> {
    let output = std::path::absolute(output).context("resolving --output")?;
    let mut client = QmpClient::connect(control)?;
    let command = HostCommand::Recover(protocol::RecoverArgs::new(target, output));
    let started: JobStarted = client.execute(command).with_context(|| format!("recovering to {target}"))?;
    follow_job(&mut client, &started, progress).with_context(|| format!("recovery to {target} failed"))
}

/// Follows the events of a job the daemon started until it ends; fails if the job does.
pub(super) fn follow_job(
    client: &mut QmpClient,
    started: &JobStarted,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Job> {
    loop {
        match client.next_event()? {
            Event::JobProgress(p) if p.id == started.job_id => progress(p.done, p.total),
            Event::JobCompleted(job) if job.id == started.job_id => match job.status {
                JobStatus::Concluded => return Ok(job),
                JobStatus::Failed | JobStatus::Running => {
                    bail!("{} ended: {}", job.id, job.error.as_deref().unwrap_or("unknown error"))
                }
            },
            _ => {}
        }
    }
}
