//! The command-line interface: argument parsing and the offline commands that act on a store
//! directly.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::marker::MarkerSource;
use crate::recovery::RecoveryTarget;
use crate::retention::RetentionPolicy;
use crate::store::{CreateOptions, MarkerStatus, Status, Store, DEFAULT_SEGMENT_CAPACITY};
use crate::units::{format_bytes, format_time_ns, parse_duration, parse_rfc3339_ns, parse_size};

#[derive(Parser, Debug)]
#[command(name = "rewind", version, about = "A journaling block store: rewind a VM disk to any marker")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a sparse raw image (or adopt an existing one) and its store.
    Init {
        image: PathBuf,
        /// Size of a new image (e.g. 10G); an existing image keeps its size.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        #[command(flatten)]
        store: StoreArg,
        /// Size of one journal segment file.
        #[arg(long, value_parser = parse_size, default_value_t = DEFAULT_SEGMENT_CAPACITY)]
        segment_size: u64,
        #[command(flatten)]
        retention: RetentionArgs,
    },
    /// Show sequence range, journal, snapshots, markers and retention settings.
    Status {
        image: PathBuf,
        #[command(flatten)]
        store: StoreArg,
        #[arg(long)]
        json: bool,
    },
    /// Add, list or look up markers.
    Marker {
        #[command(subcommand)]
        command: MarkerCommand,
    },
    /// Take a snapshot of the volume now.
    Snapshot {
        image: PathBuf,
        #[command(flatten)]
        store: StoreArg,
        #[arg(long)]
        json: bool,
    },
    /// Rebuild the volume as it was at a marker, sequence number or time into a new image.
    Recover {
        image: PathBuf,
        #[command(flatten)]
        target: TargetArgs,
        /// The new image to write (must not exist).
        #[arg(long)]
        output: PathBuf,
        #[command(flatten)]
        store: StoreArg,
        #[arg(long)]
        json: bool,
    },
    /// Check every checksum and that the volume matches its journal.
    Verify {
        image: PathBuf,
        #[command(flatten)]
        store: StoreArg,
        #[arg(long)]
        json: bool,
    },
    /// Serve the image to a VM over a vhost-user-blk socket, journaling every write.
    Serve {
        image: PathBuf,
        /// The vhost-user socket to listen on (QEMU: -chardev socket,path=…).
        #[arg(long)]
        socket: PathBuf,
        /// Size of a new image when the store does not exist yet.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        #[arg(long, default_value_t = 1)]
        num_queues: usize,
        #[arg(long, default_value_t = 256)]
        queue_size: usize,
        /// Serial number the guest reads (GET_ID), at most 20 bytes; default from the store UUID.
        #[arg(long)]
        serial: Option<String>,
        #[arg(long)]
        read_only: bool,
        /// Take a snapshot this often (e.g. 10m).
        #[arg(long, value_parser = parse_duration)]
        snapshot_every: Option<std::time::Duration>,
        #[command(flatten)]
        store: StoreArg,
        #[command(flatten)]
        retention: RetentionArgs,
    },
    /// Change the retention settings (if any are given) and free what they no longer keep.
    Retention {
        image: PathBuf,
        #[command(flatten)]
        store: StoreArg,
        #[command(flatten)]
        retention: RetentionArgs,
        /// Remove the size limit.
        #[arg(long, conflicts_with = "journal_max")]
        no_journal_max: bool,
        /// Remove the age limit.
        #[arg(long, conflicts_with = "journal_max_age")]
        no_journal_max_age: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum MarkerCommand {
    /// Record a named point in time.
    Add {
        image: PathBuf,
        name: String,
        #[arg(long)]
        note: Option<String>,
        #[command(flatten)]
        store: StoreArg,
        #[arg(long)]
        json: bool,
    },
    /// List markers (expired ones are flagged).
    List {
        image: PathBuf,
        #[command(flatten)]
        store: StoreArg,
        #[arg(long)]
        json: bool,
    },
    /// Show one marker.
    Get {
        image: PathBuf,
        name: String,
        #[command(flatten)]
        store: StoreArg,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct StoreArg {
    /// Store directory (default: IMAGE.rewind beside the image).
    #[arg(long = "store", value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct TargetArgs {
    /// Recover to this marker.
    #[arg(long)]
    pub marker: Option<String>,
    /// Recover to this sequence number.
    #[arg(long)]
    pub seq: Option<u64>,
    /// Recover to the last record at or before this RFC 3339 time.
    #[arg(long, value_parser = parse_rfc3339_ns)]
    pub time: Option<u64>,
}

impl TargetArgs {
    pub fn target(&self) -> RecoveryTarget {
        match (&self.marker, self.seq, self.time) {
            (Some(name), _, _) => RecoveryTarget::Marker(name.clone()),
            (_, Some(seq), _) => RecoveryTarget::Seq(seq),
            (_, _, Some(ns)) => RecoveryTarget::Time(ns),
            _ => unreachable!("clap requires exactly one target"),
        }
    }
}

#[derive(Args, Debug)]
pub struct RetentionArgs {
    /// Free the oldest journal segments while the journal is larger than this.
    #[arg(long, value_parser = parse_size)]
    pub journal_max: Option<u64>,
    /// Free journal segments older than this (e.g. 7d, 12h).
    #[arg(long, value_parser = parse_duration)]
    pub journal_max_age: Option<std::time::Duration>,
    /// Keep a snapshot at every marker so markers outlive the journal.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub keep_marker_snapshots: Option<bool>,
}

impl RetentionArgs {
    fn apply_to(&self, policy: &mut RetentionPolicy) {
        if let Some(max) = self.journal_max {
            policy.max_bytes = Some(max);
        }
        if let Some(age) = self.journal_max_age {
            policy.max_age_secs = Some(age.as_secs());
        }
        if let Some(keep) = self.keep_marker_snapshots {
            policy.keep_marker_snapshots = keep;
        }
    }
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

fn open(image: &Path, store: &StoreArg) -> Result<Store> {
    let (store, report) = Store::open(image, store.dir.as_deref())
        .with_context(|| format!("opening the store of {}", image.display()))?;
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

/// Prints `value` as JSON with `--json`, else the way `human` shows it.
fn emit(json: bool, value: &impl Serialize, human: impl FnOnce()) {
    if json {
        println!("{}", serde_json::to_string_pretty(value).expect("serialisable"));
    } else {
        human();
    }
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init { image, size, store, segment_size, retention } => {
            if segment_size < 4096 {
                bail!("--segment-size must be at least 4096 bytes");
            }
            let mut options = CreateOptions { size, segment_capacity: segment_size, ..Default::default() };
            retention.apply_to(&mut options.retention);
            let bar = progress_bar("copying the image into the base snapshot");
            let (created, _) = Store::create(&image, store.dir.as_deref(), &options, &mut |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })
            .with_context(|| format!("initialising {}", image.display()))?;
            bar.finish_and_clear();
            println!(
                "initialised {} ({}) with store {}",
                image.display(),
                format_bytes(created.volume_size()),
                created.store_dir().display()
            );
            created.close()?;
        }
        Command::Status { image, store, json } => {
            let opened = open(&image, &store)?;
            let status = opened.status();
            emit(json, &status, || {
                print_status(&status);
            });
            opened.close()?;
        }
        Command::Marker { command } => run_marker(command)?,
        Command::Snapshot { image, store, json } => {
            let opened = open(&image, &store)?;
            let info = opened.take_snapshot().context("taking a snapshot")?;
            emit(json, &info, || {
                println!("snapshot at seq {} ({} of changed data)", info.seq, format_bytes(info.data_bytes));
            });
            opened.close()?;
        }
        Command::Recover { image, target, output, store, json } => {
            let opened = open(&image, &store)?;
            let target = target.target();
            let bar = progress_bar("recovering");
            let report = opened
                .recover(&target, &output, &mut |done, total| {
                    bar.set_length(total);
                    bar.set_position(done);
                })
                .with_context(|| format!("recovering to {target}"))?;
            bar.finish_and_clear();
            emit(json, &report, || {
                println!(
                    "recovered {} to seq {} (snapshot {} + {} journal records) into {}",
                    image.display(),
                    report.seq,
                    report.snapshot_seq,
                    report.records_replayed,
                    report.output.display()
                );
            });
            opened.close()?;
        }
        Command::Verify { image, store, json } => {
            let opened = open(&image, &store)?;
            let bar = progress_bar("verifying");
            let report = opened.verify(&mut |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            });
            bar.finish_and_clear();
            let report = report.context("verification failed")?;
            emit(json, &report, || {
                println!(
                    "ok: {} journal records and {} snapshots checked; the volume matches seq {}",
                    report.records_checked, report.snapshots_checked, report.head
                );
            });
            opened.close()?;
        }
        Command::Serve {
            image,
            socket,
            size,
            num_queues,
            queue_size,
            serial,
            read_only,
            snapshot_every,
            store,
            retention,
        } => crate::serve::serve(crate::serve::ServeConfig {
            image,
            store_dir: store.dir,
            socket,
            size,
            num_queues,
            queue_size,
            serial,
            read_only,
            snapshot_every,
            retention: Box::new(move |policy| retention.apply_to(policy)),
        })?,
        Command::Retention { image, store, retention, no_journal_max, no_journal_max_age, json } => {
            let opened = open(&image, &store)?;
            let mut policy = opened.retention();
            retention.apply_to(&mut policy);
            if no_journal_max {
                policy.max_bytes = None;
            }
            if no_journal_max_age {
                policy.max_age_secs = None;
            }
            opened.set_retention(policy)?;
            let report = opened.enforce_retention().context("applying retention")?;
            emit(json, &report, || {
                println!(
                    "freed {} segment(s) ({}); oldest recoverable point: seq {}",
                    report.freed_segments,
                    format_bytes(report.freed_bytes),
                    report.oldest_recoverable
                );
            });
            opened.close()?;
        }
    }
    Ok(())
}

fn run_marker(command: MarkerCommand) -> Result<()> {
    match command {
        MarkerCommand::Add { image, name, note, store, json } => {
            let opened = open(&image, &store)?;
            let marker = opened
                .add_marker(&name, note.as_deref(), MarkerSource::Host)
                .with_context(|| format!("adding marker {name:?}"))?;
            emit(json, &marker, || {
                println!("marker {:?} (id {}) at seq {}", marker.name, marker.id, marker.seq);
            });
            opened.close()?;
        }
        MarkerCommand::List { image, store, json } => {
            let opened = open(&image, &store)?;
            let markers = opened.markers();
            emit(json, &markers, || {
                print_markers(&markers);
            });
            opened.close()?;
        }
        MarkerCommand::Get { image, name, store, json } => {
            let opened = open(&image, &store)?;
            let marker = opened.marker(&name)?;
            emit(json, &marker, || {
                print_markers(std::slice::from_ref(&marker));
            });
            opened.close()?;
        }
    }
    Ok(())
}

pub fn print_markers(markers: &[MarkerStatus]) {
    if markers.is_empty() {
        println!("no markers");
        return;
    }
    println!("{:>5}  {:>10}  {:<24}  {:<6}  {:<8}  NAME", "ID", "SEQ", "TIME", "SOURCE", "STATE");
    for m in markers {
        let source = match m.marker.source {
            MarkerSource::Host => "host",
            MarkerSource::Guest => "guest",
        };
        let note = m.marker.note.as_deref().map(|n| format!("  ({n})")).unwrap_or_default();
        println!(
            "{:>5}  {:>10}  {:<24}  {:<6}  {:<8}  {}{}",
            m.marker.id,
            m.marker.seq,
            format_time_ns(m.marker.time_ns),
            source,
            if m.expired { "expired" } else { "ok" },
            m.marker.name,
            note
        );
    }
}

pub fn print_status(status: &Status) {
    println!("image:               {} ({})", status.image.display(), format_bytes(status.volume_size));
    println!("store:               {} (uuid {})", status.store.display(), status.uuid);
    println!("sequence range:      {}..={} (checkpoint {})", status.first_seq, status.head, status.checkpoint);
    println!("oldest recoverable:  seq {}", status.oldest_recoverable);
    println!("journal:             {} in {} segment(s)", format_bytes(status.journal_bytes), status.journal_segments);
    println!("snapshots:           {} ({} stored)", status.snapshots.len(), format_bytes(status.snapshot_bytes));
    for s in &status.snapshots {
        println!(
            "  seq {:>10}  {:<10}  {}",
            s.seq,
            format!("{:?}", s.origin).to_lowercase(),
            format_bytes(s.data_bytes)
        );
    }
    println!("markers:             {} ({} expired)", status.markers, status.expired_markers);
    let r = &status.retention;
    println!(
        "retention:           max size {}, max age {}, marker snapshots {}",
        r.max_bytes.map_or("none".to_string(), format_bytes),
        r.max_age_secs
            .map_or("none".to_string(), |s| humantime::format_duration(std::time::Duration::from_secs(s)).to_string()),
        if r.keep_marker_snapshots { "kept" } else { "not kept" }
    );
}
