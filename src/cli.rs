//! The command-line interface: argument parsing, the offline commands that act on a store
//! directly, and their `--control` forms that ask a running `rewind serve`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::marker::MarkerSource;
use crate::recovery::RecoveryTarget;
use crate::retention::RetentionPolicy;
use serde_json::{json, Value};

use crate::qmp_client::QmpClient;
use crate::snapshot::SnapshotInfo;
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
        #[command(flatten)]
        place: Place,
        /// Print JSON instead of text.
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
        #[command(flatten)]
        place: Place,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild the volume as it was at a marker, sequence number or time into a new image.
    Recover {
        #[command(flatten)]
        place: Place,
        #[command(flatten)]
        target: TargetArgs,
        /// The new image to write (must not exist).
        #[arg(long)]
        output: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check every checksum and that the volume matches its journal.
    Verify {
        image: PathBuf,
        #[command(flatten)]
        store: StoreArg,
        /// Print JSON instead of text.
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
        /// The host control socket (QMP framing, every command).
        #[arg(long)]
        control: Option<PathBuf>,
        /// The guest-agent socket (markers and status only), for a virtio-serial port.
        #[arg(long)]
        agent_socket: Option<PathBuf>,
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
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum MarkerCommand {
    /// Record a named point in time: `marker add IMAGE NAME`, or `marker add NAME --control PATH`.
    Add {
        #[command(flatten)]
        marker: NamedMarker,
        /// A free-text note kept with the marker (at most 4096 bytes).
        #[arg(long)]
        note: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List markers (expired ones are flagged).
    List {
        #[command(flatten)]
        place: Place,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show one marker: `marker get IMAGE NAME`, or `marker get NAME --control PATH`.
    Get {
        #[command(flatten)]
        marker: NamedMarker,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// `[IMAGE] NAME`: the image and marker name offline, or only the name with --control.
#[derive(Args, Debug)]
pub struct NamedMarker {
    #[arg(value_name = "[IMAGE] NAME", num_args = 1..=2, required = true)]
    args: Vec<String>,
    /// The control socket of the daemon serving the image.
    #[arg(long)]
    control: Option<PathBuf>,
    #[command(flatten)]
    store: StoreArg,
}

impl NamedMarker {
    /// Where to act, and the marker name.
    fn split(&self) -> Result<(Where<'_>, &str)> {
        match (self.args.as_slice(), &self.control) {
            ([name], Some(control)) => Ok((Online(control), name)),
            ([image, name], None) => Ok((Offline(Path::new(image), &self.store), name)),
            (_, Some(_)) => bail!("with --control, give only the marker NAME"),
            _ => bail!("give IMAGE NAME, or NAME with --control PATH"),
        }
    }
}

/// Where a command acts: on the image directly, or through the control socket of the
/// `rewind serve` that serves it.
#[derive(Args, Debug)]
pub struct Place {
    /// The image (offline: it must not be served); or give --control instead.
    #[arg(required_unless_present = "control", conflicts_with = "control")]
    pub image: Option<PathBuf>,
    /// The control socket of the daemon serving the image.
    #[arg(long)]
    pub control: Option<PathBuf>,
    #[command(flatten)]
    pub store: StoreArg,
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
        Command::Status { place, json } => match place_of(&place) {
            Online(control) => {
                let mut client = QmpClient::connect(control)?;
                let status = client.execute("query-status", json!({}))?;
                let journal = client.execute("query-journal", json!({}))?;
                let both = json!({"status": status, "journal": journal});
                emit(json, &both, || print_online_status(&status, &journal));
            }
            Offline(image, store) => {
                let opened = open(image, store)?;
                let status = opened.status();
                emit(json, &status, || print_status(&status));
                opened.close()?;
            }
        },
        Command::Marker { command } => run_marker(command)?,
        Command::Snapshot { place, json } => {
            let info: SnapshotInfo = match place_of(&place) {
                Online(control) => {
                    let reply = QmpClient::connect(control)?.execute("snapshot-take", json!({}))?;
                    SnapshotInfo {
                        seq: reply["seq"].as_u64().unwrap_or_default(),
                        origin: serde_json::from_value(reply["origin"].clone())?,
                        created_ns: reply["created"].as_u64().unwrap_or_default(),
                        data_bytes: reply["data-bytes"].as_u64().unwrap_or_default(),
                        extents: reply["extents"].as_u64().unwrap_or_default(),
                    }
                }
                Offline(image, store) => {
                    let opened = open(image, store)?;
                    let info = opened.take_snapshot().context("taking a snapshot")?;
                    opened.close()?;
                    info
                }
            };
            emit(json, &info, || {
                println!("snapshot at seq {} ({} of changed data)", info.seq, format_bytes(info.data_bytes));
            });
        }
        Command::Recover { place, target, output, json } => {
            let target = target.target();
            let bar = progress_bar("recovering");
            let mut progress = |done: u64, total: u64| {
                bar.set_length(total);
                bar.set_position(done);
            };
            match place_of(&place) {
                Online(control) => {
                    let reply = recover_online(control, &target, &output, &mut progress)?;
                    bar.finish_and_clear();
                    emit(json, &reply, || {
                        println!(
                            "recovered to seq {} into {} (job {})",
                            reply["seq"],
                            output.display(),
                            reply["id"].as_str().unwrap_or("?")
                        );
                    });
                }
                Offline(image, store) => {
                    let opened = open(image, store)?;
                    let report = opened
                        .recover(&target, &output, &mut progress)
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
            }
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
            control,
            agent_socket,
            store,
            retention,
        } => crate::serve::serve(crate::serve::ServeConfig {
            image,
            store_dir: store.dir,
            socket,
            control,
            agent_socket,
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
        MarkerCommand::Add { marker, note, json } => {
            let (place, name) = marker.split()?;
            let added: Value = match place {
                Online(control) => {
                    let mut arguments = json!({"name": name});
                    if let Some(note) = &note {
                        arguments["note"] = json!(note);
                    }
                    let mut client = QmpClient::connect(control)?;
                    client.execute("marker-add", arguments).with_context(|| format!("adding marker {name:?}"))?;
                    client.execute("marker-get", json!({"name": name}))?
                }
                Offline(image, store) => {
                    let opened = open(image, store)?;
                    let marker = opened
                        .add_marker(name, note.as_deref(), MarkerSource::Host)
                        .with_context(|| format!("adding marker {name:?}"))?;
                    opened.close()?;
                    serde_json::to_value(marker)?
                }
            };
            emit(json, &added, || {
                println!("marker {} (id {}) at seq {}", added["name"], added["id"], added["seq"]);
            });
        }
        MarkerCommand::List { place, json } => {
            let markers: Vec<MarkerStatus> = match place_of(&place) {
                Online(control) => {
                    serde_json::from_value(QmpClient::connect(control)?.execute("marker-list", json!({}))?)?
                }
                Offline(image, store) => {
                    let opened = open(image, store)?;
                    let markers = opened.markers();
                    opened.close()?;
                    markers
                }
            };
            emit(json, &markers, || print_markers(&markers));
        }
        MarkerCommand::Get { marker, json } => {
            let (place, name) = marker.split()?;
            let found: MarkerStatus = match place {
                Online(control) => {
                    serde_json::from_value(QmpClient::connect(control)?.execute("marker-get", json!({"name": name}))?)?
                }
                Offline(image, store) => {
                    let opened = open(image, store)?;
                    let marker = opened.marker(name)?;
                    opened.close()?;
                    marker
                }
            };
            emit(json, &found, || print_markers(std::slice::from_ref(&found)));
        }
    }
    Ok(())
}

/// Where a `Place` points.
enum Where<'a> {
    Online(&'a Path),
    Offline(&'a Path, &'a StoreArg),
}
use Where::{Offline, Online};

fn place_of(place: &Place) -> Where<'_> {
    match (&place.control, &place.image) {
        (Some(control), _) => Online(control),
        (None, Some(image)) => Offline(image, &place.store),
        (None, None) => unreachable!("clap requires IMAGE or --control"),
    }
}

/// Starts a recovery job on the daemon and follows its events to the end.
fn recover_online(
    control: &Path,
    target: &RecoveryTarget,
    output: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Value> {
    let output = std::path::absolute(output).context("resolving --output")?;
    let mut arguments = json!({"output": output});
    match target {
        RecoveryTarget::Marker(name) => arguments["marker"] = json!(name),
        RecoveryTarget::Seq(seq) => arguments["seq"] = json!(seq),
        RecoveryTarget::Time(ns) => arguments["time"] = json!(format_time_ns(*ns)),
    }
    let mut client = QmpClient::connect(control)?;
    let started = client.execute("recover", arguments).with_context(|| format!("recovering to {target}"))?;
    let job = started["job-id"].clone();
    loop {
        let event = client.next_event()?;
        let data = &event["data"];
        if data["id"] != job {
            continue;
        }
        match event["event"].as_str() {
            Some("JOB_PROGRESS") => progress(data["done"].as_u64().unwrap_or(0), data["total"].as_u64().unwrap_or(0)),
            Some("JOB_COMPLETED") if data["status"] == "concluded" => return Ok(data.clone()),
            Some("JOB_COMPLETED") => {
                bail!("recovery to {target} failed: {}", data["error"].as_str().unwrap_or("unknown error"))
            }
            _ => {}
        }
    }
}

fn print_online_status(status: &Value, journal: &Value) {
    println!("image:               {} ({} bytes)", status["image"].as_str().unwrap_or("?"), status["size"]);
    println!(
        "vhost socket:        {} (frontend connected: {})",
        status["vhost-socket"].as_str().unwrap_or("?"),
        status["frontend-connected"]
    );
    println!("queues:              {}", status["queues"]);
    println!("sequence range:      {}..={}", journal["first-seq"], journal["head"]);
    println!("oldest recoverable:  seq {}", journal["oldest-recoverable"]);
    println!("journal:             {} bytes in {} segment(s)", journal["bytes"], journal["segments"]);
    println!("snapshots:           {}", journal["snapshots"]);
    let c = &status["counters"];
    println!(
        "requests:            {} ({} bytes read, {} bytes written, {} flushes, {} errors)",
        c["requests"], c["bytes-read"], c["bytes-written"], c["flushes"], c["errors"]
    );
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
