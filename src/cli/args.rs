//! The command line: every subcommand and its arguments.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};

use crate::control::protocol::RetentionChange;
use crate::recovery::RecoveryTarget;
use crate::retention::RetentionPolicy;
use crate::store::DEFAULT_SEGMENT_CAPACITY;
use crate::units::{parse_cpu_list, parse_duration, parse_rfc3339_ns, parse_size, CpuList};

#[derive(Parser, Debug)]
#[command(name = "rewind", version, about = "A journaling block store: rewind a VM disk to any marker")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a sparse raw image (or adopt an existing one) and its store.
    Init(InitArgs),
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
    Recover(RecoverArgs),
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
    Serve(ServeArgs),
    /// Change the retention settings (if any are given) and free what they no longer keep.
    Retention(RetentionCommandArgs),
    /// Serve retained points of a running daemon's disk on sockets of their own, at once and
    /// without copying (writes go to a scratch overlay); keep one with `promote`.
    Export {
        #[command(subcommand)]
        command: ExportCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum ExportCommand {
    /// Export the point at a marker, sequence number or time on a new vhost-user socket.
    Add {
        /// The control socket of the daemon serving the image.
        #[arg(long)]
        control: PathBuf,
        #[command(flatten)]
        target: TargetArgs,
        /// The vhost-user socket to serve the point on.
        #[arg(long)]
        socket: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the open exports.
    List {
        /// The control socket of the daemon serving the image.
        #[arg(long)]
        control: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Stop serving an export and drop what its guest wrote.
    Remove {
        /// The export's id (`export list`).
        id: String,
        /// The control socket of the daemon serving the image.
        #[arg(long)]
        control: PathBuf,
    },
    /// Write an export as its guest sees it now (the point plus its writes) into a new image,
    /// while it keeps serving.
    Promote {
        /// The export's id (`export list`).
        id: String,
        /// The new image to write (must not exist).
        #[arg(long)]
        output: PathBuf,
        /// The control socket of the daemon serving the image.
        #[arg(long)]
        control: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct InitArgs {
    pub image: PathBuf,
    /// Size of a new image (e.g. 10G); an existing image keeps its size.
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    #[command(flatten)]
    pub store: StoreArg,
    /// Size of one journal segment file.
    #[arg(long, value_parser = parse_size, default_value_t = DEFAULT_SEGMENT_CAPACITY)]
    pub segment_size: u64,
    #[command(flatten)]
    pub retention: RetentionArgs,
}

#[derive(Args, Debug)]
pub struct RecoverArgs {
    #[command(flatten)]
    pub place: Place,
    #[command(flatten)]
    pub target: TargetArgs,
    /// The new image to write (must not exist).
    #[arg(long)]
    pub output: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    pub image: PathBuf,
    /// The vhost-user socket to listen on (QEMU: -chardev socket,path=…).
    #[arg(long)]
    pub socket: PathBuf,
    /// Size of a new image when the store does not exist yet.
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    #[arg(long, default_value_t = 1)]
    pub num_queues: usize,
    #[arg(long, default_value_t = 256)]
    pub queue_size: usize,
    /// Serial number the guest reads (GET_ID), at most 20 bytes; default from the store UUID.
    #[arg(long)]
    pub serial: Option<String>,
    #[arg(long)]
    pub read_only: bool,
    /// Take a snapshot this often (e.g. 10m).
    #[arg(long, value_parser = parse_duration)]
    pub snapshot_every: Option<std::time::Duration>,
    /// The host control socket (QMP framing, every command).
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// The guest-agent socket (markers and status only), for a virtio-serial port.
    #[arg(long)]
    pub agent_socket: Option<PathBuf>,
    #[command(flatten)]
    pub store: StoreArg,
    #[command(flatten)]
    pub retention: RetentionArgs,
    /// Ship the volume's history to this replica while serving: s3://BUCKET/PREFIX (endpoint,
    /// keys, region and allow-http from the AWS_* environment variables) or file:///DIR.
    #[arg(long, value_name = "URL")]
    pub replicate: Option<String>,
    /// Remote retention: free points older than this (e.g. 30d) from the replica, keeping every
    /// later point recoverable. Without it the replica keeps everything.
    #[arg(long, value_parser = parse_duration, requires = "replicate")]
    pub replica_max_age: Option<std::time::Duration>,
    /// Store a remote snapshot (a delta) in the replica each time this much journal (e.g. 64G)
    /// was shipped after the last one, so that recovering a late point from the replica
    /// replays at most about this much journal; 0: none. Default: 4 times the volume's size.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, requires = "replicate")]
    pub replica_delta_every: Option<u64>,
    /// Run the housekeeping threads (replication, preparing journal segments, dropping cached
    /// pages) on these CPUs only (e.g. 3 or 2-3,6), away from the cores serving guest I/O.
    #[arg(long, value_name = "CPUS", value_parser = parse_cpu_list)]
    pub housekeeping_cpus: Option<CpuList>,
    #[command(flatten)]
    pub at: AtArgs,
}

/// `serve --at-*`: a retained point to serve instead of the live volume.
#[derive(Args, Debug)]
#[group(required = false, multiple = false)]
pub struct AtArgs {
    /// Serve the volume as it was at this marker (writes go to a scratch overlay).
    #[arg(long)]
    pub at_marker: Option<String>,
    /// Serve the volume as it was after this sequence number.
    #[arg(long)]
    pub at_seq: Option<u64>,
    /// Serve the volume as it was at the last record at or before this RFC 3339 time.
    #[arg(long, value_parser = parse_rfc3339_ns)]
    pub at_time: Option<u64>,
}

impl AtArgs {
    pub fn target(&self) -> Option<RecoveryTarget> {
        target_of(&self.at_marker, self.at_seq, self.at_time)
    }
}

/// The point a marker, sequence number or time flag names (clap lets at most one through).
fn target_of(marker: &Option<String>, seq: Option<u64>, time_ns: Option<u64>) -> Option<RecoveryTarget> {
    match (marker, seq, time_ns) {
        (Some(name), _, _) => Some(RecoveryTarget::Marker(name.clone())),
        (_, Some(seq), _) => Some(RecoveryTarget::Seq(seq)),
        (_, _, Some(ns)) => Some(RecoveryTarget::Time(ns)),
        _ => None,
    }
}

#[derive(Args, Debug)]
pub struct RetentionCommandArgs {
    pub image: PathBuf,
    #[command(flatten)]
    pub store: StoreArg,
    #[command(flatten)]
    pub retention: RetentionArgs,
    /// Remove the size limit.
    #[arg(long, conflicts_with = "journal_max")]
    pub no_journal_max: bool,
    /// Remove the age limit.
    #[arg(long, conflicts_with = "journal_max_age")]
    pub no_journal_max_age: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
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
    #[arg(long, conflicts_with = "from")]
    control: Option<PathBuf>,
    /// A replica (s3://BUCKET/PREFIX or file:///DIR), read-only.
    #[arg(long, value_name = "URL")]
    from: Option<String>,
    #[command(flatten)]
    store: StoreArg,
}

impl NamedMarker {
    /// Where to act, and the marker name.
    pub fn split(&self) -> Result<(Where<'_>, &str)> {
        match (self.args.as_slice(), &self.control, &self.from) {
            ([name], Some(control), None) => Ok((Where::Online(control), name)),
            ([name], None, Some(url)) => Ok((Where::Replica(url), name)),
            ([image, name], None, None) => Ok((Where::Offline(Path::new(image), &self.store), name)),
            (_, Some(_), _) => bail!("with --control, give only the marker NAME"),
            (_, _, Some(_)) => bail!("with --from, give only the marker NAME"),
            _ => bail!("give IMAGE NAME, or NAME with --control PATH or --from URL"),
        }
    }
}

/// Where a command acts: on the image directly, through the control socket of the
/// `rewind serve` that serves it, or on a replica in an object store.
#[derive(Args, Debug)]
pub struct Place {
    /// The image (offline: it must not be served); or give --control or --from instead.
    #[arg(required_unless_present_any = ["control", "from"], conflicts_with_all = ["control", "from"])]
    pub image: Option<PathBuf>,
    /// The control socket of the daemon serving the image.
    #[arg(long, conflicts_with = "from")]
    pub control: Option<PathBuf>,
    /// A replica (s3://BUCKET/PREFIX or file:///DIR) that `serve --replicate` ships to; S3
    /// endpoint, keys and region come from the AWS_* environment variables.
    #[arg(long, value_name = "URL")]
    pub from: Option<String>,
    #[command(flatten)]
    pub store: StoreArg,
}

/// Where a `Place` or a `NamedMarker` points.
pub enum Where<'a> {
    Online(&'a Path),
    Offline(&'a Path, &'a StoreArg),
    Replica(&'a str),
}

impl Place {
    pub fn resolve(&self) -> Where<'_> {
        match (&self.control, &self.from, &self.image) {
            (Some(control), _, _) => Where::Online(control),
            (None, Some(url), _) => Where::Replica(url),
            (None, None, Some(image)) => Where::Offline(image, &self.store),
            (None, None, None) => unreachable!("clap requires IMAGE, --control or --from"),
        }
    }
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
    /// The point of this marker.
    #[arg(long)]
    pub marker: Option<String>,
    /// The point after this sequence number.
    #[arg(long)]
    pub seq: Option<u64>,
    /// The last record at or before this RFC 3339 time.
    #[arg(long, value_parser = parse_rfc3339_ns)]
    pub time: Option<u64>,
}

impl TargetArgs {
    pub fn target(&self) -> RecoveryTarget {
        target_of(&self.marker, self.seq, self.time).expect("clap requires exactly one target")
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
    /// The settings given, as the control protocol's `retention-set` takes them.
    pub fn change(&self) -> RetentionChange {
        RetentionChange {
            max_bytes: self.journal_max,
            max_age_secs: self.journal_max_age.map(|age| age.as_secs()),
            keep_marker_snapshots: self.keep_marker_snapshots,
        }
    }

    pub fn apply_to(&self, policy: &mut RetentionPolicy) {
        self.change().apply_to(policy);
    }
}
