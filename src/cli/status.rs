//! `status`: the store's state offline; the device's and the journal's through the control
//! socket.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use rewind_replica::{Remote, Replica, ReplicaStatus, ReplicationStatus};
use serde::Serialize;

use super::args::{Place, Where};
use super::{emit, open_replica, with_store};
use crate::control::protocol::{AgentCommand, HostCommand};
use crate::control::replies::{Journal, Status as DeviceStatus};
use crate::qmp_client::QmpClient;
use crate::store::Status;
use crate::units::{format_bytes, format_time_ns};

/// `status --control --json`: the `query-status` and `query-journal` replies, and
/// `query-replication`'s when the daemon ships to a replica.
#[derive(Serialize)]
struct OnlineStatus {
    status: DeviceStatus,
    journal: Journal,
    #[serde(skip_serializing_if = "Option::is_none")]
    replication: Option<ReplicationStatus>,
}

/// `status IMAGE --json`: the store's status and, when it was served with `--replicate`, what
/// that replica holds.
#[derive(Serialize)]
struct OfflineStatus {
    #[serde(flatten)]
    status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    replication: Option<RememberedReplica>,
}

/// The replica a store remembers, and what it holds or why that could not be read.
#[derive(Serialize)]
struct RememberedReplica {
    url: String,
    #[serde(flatten)]
    held: Held,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
enum Held {
    Replica(ReplicaStatus),
    /// A replica that cannot be read is reported, not an error of the store's status.
    Error(String),
}

/// How long offline status waits for the replica: it is a side note there, not worth a hang.
const REMEMBERED_REPLICA_TIMEOUT: Duration = Duration::from_secs(5);

fn remembered_replica(store: &Path) -> Result<Option<RememberedReplica>> {
    let Some(url) = rewind_replica::remembered::remembered(store)? else { return Ok(None) };
    let read = Remote::open_with_timeout(&url, REMEMBERED_REPLICA_TIMEOUT)
        .and_then(Replica::from_remote)
        .and_then(|replica| replica.status());
    let held = read.map_or_else(|e| Held::Error(e.to_string()), Held::Replica);
    Ok(Some(RememberedReplica { url, held }))
}

pub(super) fn status(place: &Place, json: bool) -> Result<()> {
    match place.resolve() {
        Where::Online(control) => {
            let mut client = QmpClient::connect(control)?;
            let both = OnlineStatus {
                status: client.execute(AgentCommand::QueryStatus)?,
                journal: client.execute(HostCommand::QueryJournal)?,
                // An error here only says that replication is off.
                replication: client.execute(HostCommand::QueryReplication).ok(),
            };
            emit(json, &both, || print_online_status(&both))
        }
        Where::Offline(image, store) => {
            let status = with_store(image, store, |s| Ok(s.status()))?;
            let replication = remembered_replica(&status.store)?;
            let both = OfflineStatus { status, replication };
            emit(json, &both, || {
                print_status(&both.status);
                if let Some(replication) = &both.replication {
                    print_remembered_replica(replication);
                }
            })
        }
        Where::Replica(url) => {
            let status = open_replica(url)?.status().with_context(|| format!("listing the replica at {url}"))?;
            emit(json, &status, || print_replica_status(&status))
        }
    }
}

fn print_replica_status(status: &ReplicaStatus) {
    println!("replica:             {}", status.url);
    println!("store:               uuid {} ({})", status.store_uuid, format_bytes(status.volume_size));
    println!(
        "recoverable:         seq {}..={} ({} .. {})",
        status.oldest_recoverable,
        status.shipped_seq,
        format_time_ns(status.oldest_time_ns),
        format_time_ns(status.shipped_time_ns)
    );
    println!(
        "stored:              base {}, {} delta(s) {}, journal {} in {} object(s)",
        format_bytes(status.base_bytes),
        status.deltas,
        format_bytes(status.delta_bytes),
        format_bytes(status.journal_bytes),
        status.journal_objects
    );
    println!("markers:             {} ({} expired)", status.markers, status.expired_markers);
    if let Some(age) = status.max_age_secs {
        println!("remote retention:    max age {}", humantime::format_duration(std::time::Duration::from_secs(age)));
    }
    println!("updated:             {}", format_time_ns(status.updated_ns));
}

fn print_remembered_replica(remembered: &RememberedReplica) {
    match &remembered.held {
        Held::Replica(status) => {
            println!(
                "replica:             {} holds seq {}..={} ({} .. {})",
                remembered.url,
                status.oldest_recoverable,
                status.shipped_seq,
                format_time_ns(status.oldest_time_ns),
                format_time_ns(status.shipped_time_ns)
            );
            println!(
                "replica markers:     {} ({} expired); base {}, {} delta(s) {}, journal {} in {} object(s)",
                status.markers,
                status.expired_markers,
                format_bytes(status.base_bytes),
                status.deltas,
                format_bytes(status.delta_bytes),
                format_bytes(status.journal_bytes),
                status.journal_objects
            );
        }
        Held::Error(error) => println!("replica:             {} (cannot read it: {error})", remembered.url),
    }
}

fn print_replication(replication: &ReplicationStatus) {
    println!("replica:             {}", replication.url);
    println!(
        "shipped:             seq {} of {} ({:.1} s behind, {} pending{})",
        replication.shipped_seq,
        replication.head,
        replication.seconds_behind,
        format_bytes(replication.bytes_pending),
        if replication.journal_over_limit { ", local journal over its limit" } else { "" }
    );
    println!(
        "remote snapshots:    base at seq {}, {} delta(s), newest at seq {}{}",
        replication.remote_oldest_seq,
        replication.remote_deltas,
        replication.remote_snapshot_seq,
        if replication.making_delta { " (making the next)" } else { "" }
    );
    if let Some(error) = &replication.last_error {
        let state = if replication.failing { "failing" } else { "recovered" };
        println!("last error:          {error} ({state})");
    }
}

fn print_online_status(OnlineStatus { status, journal, replication }: &OnlineStatus) {
    println!("image:               {} ({} bytes)", status.image.display(), status.size);
    println!(
        "vhost socket:        {} (frontend connected: {})",
        status.vhost_socket.display(),
        status.frontend_connected
    );
    println!("queues:              {}", status.queues);
    println!("sequence range:      {}..={}", journal.first_seq, journal.head);
    println!("oldest recoverable:  seq {}", journal.oldest_recoverable);
    println!("journal:             {} bytes in {} segment(s)", journal.bytes, journal.segments);
    println!("snapshots:           {}", journal.snapshots);
    let c = &status.counters;
    println!(
        "requests:            {} ({} bytes read, {} bytes written, {} flushes, {} errors)",
        c.requests, c.bytes_read, c.bytes_written, c.flushes, c.errors
    );
    if let Some(replication) = replication {
        print_replication(replication);
    }
}

fn print_status(status: &Status) {
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
