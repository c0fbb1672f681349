//! The command-line interface: argument parsing, the offline commands that act on a store
//! directly, and their `--control` forms that ask a running `rewind serve`. One function per
//! subcommand, grouped: [`image`] (init, snapshot, verify, retention), [`markers`],
//! [`status`], [`recover`], [`export`].

mod args;
mod export;
mod image;
mod markers;
mod recover;
mod status;

use std::io::IsTerminal;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Serialize;

pub use args::{Cli, Command, MarkerCommand, ServeArgs};

use crate::store::Store;
use args::StoreArg;

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init(args) => image::init(args),
        Command::Status { place, json } => status::status(&place, json),
        Command::Marker { command } => markers::run(command),
        Command::Snapshot { place, json } => image::snapshot(&place, json),
        Command::Recover(args) => recover::recover(&args),
        Command::Verify { image, store, json } => image::verify(&image, &store, json),
        Command::Serve(args) => serve(args),
        Command::Retention(args) => image::retention(&args),
        Command::Export { command } => export::run(command),
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    if let Some(list) = &args.housekeeping_cpus {
        crate::fsutil::set_housekeeping_cpus(&list.cpus)
            .with_context(|| format!("--housekeeping-cpus {list}: cannot run threads on these CPUs"))?;
    }
    let retention = args.retention;
    let replicate = args.replicate;
    crate::serve::serve(crate::serve::ServeConfig {
        image: args.image,
        store_dir: args.store.dir,
        socket: args.socket,
        control: args.control,
        agent_socket: args.agent_socket,
        size: args.size,
        num_queues: args.num_queues,
        queue_size: args.queue_size,
        serial: args.serial,
        read_only: args.read_only,
        snapshot_every: args.snapshot_every,
        at: args.at.target(),
        retention: Box::new(move |policy| retention.apply_to(policy)),
        replicate,
        replica_max_age: args.replica_max_age,
        replica_delta_every: args.replica_delta_every,
    })
}

/// A progress bar on a terminal, nothing otherwise.
pub fn progress_bar(message: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

/// Opens the store of `image`; when a daemon serves it, says which control socket to use.
fn open(image: &Path, store: &StoreArg) -> Result<Store> {
    let opened = Store::open(image, store.dir.as_deref());
    if let Err(crate::Error::Locked { .. }) = &opened {
        let dir = store.dir.clone().unwrap_or_else(|| crate::store::default_store_dir(image));
        if let Some(served) = crate::serve::ServedBy::read(&dir) {
            match served.control {
                Some(control) => bail!(
                    "{} is being served by rewind serve (pid {}); use --control {}",
                    image.display(),
                    served.pid,
                    control.display()
                ),
                None => bail!(
                    "{} is being served by rewind serve (pid {}) without a control socket; restart it with --control",
                    image.display(),
                    served.pid
                ),
            }
        }
    }
    let (store, report) = opened.with_context(|| format!("opening the store of {}", image.display()))?;
    if let Some(repair) = report.tail_repair {
        eprintln!(
            "note: the journal had a torn tail ({}) in {} at offset {}; it was cut back",
            repair.reason,
            repair.segment.display(),
            repair.offset
        );
    }
    Ok(store)
}

/// Opens the store of `image`, runs `action` on it and closes it.
fn with_store<T>(image: &Path, store: &StoreArg, action: impl FnOnce(&Store) -> Result<T>) -> Result<T> {
    let opened = open(image, store)?;
    let result = action(&opened)?;
    opened.close()?;
    Ok(result)
}

/// Opens the replica at `url` (reads its manifest).
fn open_replica(url: &str) -> Result<rewind_replica::Replica> {
    rewind_replica::Replica::open(url).with_context(|| format!("reading the replica at {url}"))
}

/// Prints `value` as JSON with `--json`, else the way `human` shows it.
fn emit(json: bool, value: &impl Serialize, human: impl FnOnce()) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value).context("encoding JSON")?);
    } else {
        human();
    }
    Ok(())
}
