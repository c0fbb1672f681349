//! `status`: the store's state offline; the device's and the journal's through the control
//! socket.

use anyhow::{Context, Result};
use rewind_replica::{ReplicaStatus, ReplicationStatus};
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
            emit(json, &status, || print_status(&status))
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
        "stored:              base {}, journal {} in {} object(s)",
        format_bytes(status.base_bytes),
        format_bytes(status.journal_bytes),
        status.journal_objects
    );
    println!("markers:             {} ({} expired)", status.markers, status.expired_markers);
    if let Some(age) = status.max_age_secs {
        println!("remote retention:    max age {}", humantime::format_duration(std::time::Duration::from_secs(age)));
    }
    println!("updated:             {}", format_time_ns(status.updated_ns));
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
