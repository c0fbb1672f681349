//! `init`, `snapshot`, `verify` and `retention`: the image and its store.

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::args::{InitArgs, Place, RetentionCommandArgs, StoreArg, Where};
use super::{emit, progress_bar, with_store};
use crate::control::protocol::HostCommand;
use crate::control::replies::Snapshot;
use crate::qmp_client::QmpClient;
use crate::store::{CreateOptions, Store};
use crate::units::format_bytes;

pub(super) fn init(args: InitArgs) -> Result<()> {
    if args.segment_size < 4096 {
        bail!("--segment-size must be at least 4096 bytes");
    }
    let mut options = CreateOptions { size: args.size, segment_capacity: args.segment_size, ..Default::default() };
    args.retention.apply_to(&mut options.retention);
    let bar = progress_bar("copying the image into the base snapshot");
    let (created, _) = Store::create(&args.image, args.store.dir.as_deref(), &options, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .with_context(|| format!("initialising {}", args.image.display()))?;
    bar.finish_and_clear();
    println!(
        "initialised {} ({}) with store {}",
        args.image.display(),
        format_bytes(created.volume_size()),
        created.store_dir().display()
    );
    created.close()?;
    Ok(())
}

/// Prints the `snapshot-take` reply, whether the daemon or this process took it.
pub(super) fn snapshot(place: &Place, json: bool) -> Result<()> {
    let info: Snapshot = match place.resolve() {
        Where::Online(control) => QmpClient::connect(control)?.execute(HostCommand::SnapshotTake)?,
        Where::Offline(image, store) => {
            with_store(image, store, |s| Ok(s.take_snapshot().context("taking a snapshot")?.into()))?
        }
        Where::Replica(url) => {
            bail!("{url} is a replica, read-only here: take snapshots of the image or through --control")
        }
    };
    emit(json, &info, || {
        println!("snapshot at seq {} ({} of changed data)", info.seq, format_bytes(info.data_bytes));
    })
}

pub(super) fn verify(image: &Path, store: &StoreArg, json: bool) -> Result<()> {
    let report = with_store(image, store, |s| {
        let bar = progress_bar("verifying");
        let report = s.verify(&mut |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        });
        bar.finish_and_clear();
        report.context("verification failed")
    })?;
    emit(json, &report, || {
        println!(
            "ok: {} journal records and {} snapshots checked; the volume matches seq {}",
            report.records_checked, report.snapshots_checked, report.head
        );
    })
}

pub(super) fn retention(args: &RetentionCommandArgs) -> Result<()> {
    let report = with_store(&args.image, &args.store, |s| {
        let mut policy = s.retention();
        args.retention.apply_to(&mut policy);
        if args.no_journal_max {
            policy.max_bytes = None;
        }
        if args.no_journal_max_age {
            policy.max_age_secs = None;
        }
        s.set_retention(policy)?;
        s.enforce_retention().context("applying retention")
    })?;
    emit(args.json, &report, || {
        println!(
            "freed {} segment(s) ({}); oldest recoverable point: seq {}",
            report.freed_segments,
            format_bytes(report.freed_bytes),
            report.oldest_recoverable
        );
    })
}
