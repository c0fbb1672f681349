//! `marker add`, `marker list` and `marker get`, offline or through the control socket; both
//! print the control protocol's marker.

use anyhow::{bail, Context, Result};

use super::args::{MarkerCommand, NamedMarker, Place, Where};
use super::{emit, open_replica, with_store};
use crate::control::protocol::AgentCommand;
use crate::control::replies::{Marker, MarkerAdded};
use crate::marker::MarkerSource;
use crate::qmp_client::QmpClient;
use crate::units::format_time_ns;

pub(super) fn run(command: MarkerCommand) -> Result<()> {
    match command {
        MarkerCommand::Add { marker, note, json } => add(&marker, note, json),
        MarkerCommand::List { place, json } => list(&place, json),
        MarkerCommand::Get { marker, json } => get(&marker, json),
    }
}

fn add(marker: &NamedMarker, note: Option<String>, json: bool) -> Result<()> {
    let (place, name) = marker.split()?;
    let added: Marker = match place {
        Where::Online(control) => {
            let mut client = QmpClient::connect(control)?;
            let command = AgentCommand::MarkerAdd { name: name.to_string(), note };
            let _: MarkerAdded = client.execute(command).with_context(|| format!("adding marker {name:?}"))?;
            client.execute(AgentCommand::MarkerGet { name: name.to_string() })?
        }
        Where::Offline(image, store) => with_store(image, store, |s| {
            s.add_marker(name, note.as_deref(), MarkerSource::Host)
                .with_context(|| format!("adding marker {name:?}"))?;
            Ok(s.marker(name)?.into())
        })?,
        Where::Replica(url) => bail!("{url} is a replica, read-only: add markers to the image or through --control"),
    };
    emit(json, &added, || println!("marker {:?} (id {}) at seq {}", added.name, added.id, added.seq))
}

fn list(place: &Place, json: bool) -> Result<()> {
    let markers: Vec<Marker> = match place.resolve() {
        Where::Online(control) => QmpClient::connect(control)?.execute(AgentCommand::MarkerList)?,
        Where::Offline(image, store) => {
            with_store(image, store, |s| Ok(s.markers().into_iter().map(Marker::from).collect()))?
        }
        Where::Replica(url) => open_replica(url)?.markers().into_iter().map(Marker::from).collect(),
    };
    emit(json, &markers, || print_markers(&markers))
}

fn get(marker: &NamedMarker, json: bool) -> Result<()> {
    let (place, name) = marker.split()?;
    let found: Marker = match place {
        Where::Online(control) => {
            QmpClient::connect(control)?.execute(AgentCommand::MarkerGet { name: name.to_string() })?
        }
        Where::Offline(image, store) => with_store(image, store, |s| Ok(s.marker(name)?.into()))?,
        Where::Replica(url) => open_replica(url)?
            .markers()
            .into_iter()
            .find(|m| m.marker.name == name)
            .ok_or_else(|| crate::Error::UnknownMarker(name.to_string()))?
            .into(),
    };
    emit(json, &found, || print_markers(std::slice::from_ref(&found)))
}

fn print_markers(markers: &[Marker]) {
    if markers.is_empty() {
        println!("no markers");
        return;
    }
    println!("{:>5}  {:>10}  {:<24}  {:<6}  {:<8}  NAME", "ID", "SEQ", "TIME", "SOURCE", "STATE");
    for m in markers {
        let source = match m.source {
            MarkerSource::Host => "host",
            MarkerSource::Guest => "guest",
        };
        let note = m.note.as_deref().map(|n| format!("  ({n})")).unwrap_or_default();
        println!(
            "{:>5}  {:>10}  {:<24}  {:<6}  {:<8}  {}{}",
            m.id,
            m.seq,
            format_time_ns(m.time_ns),
            source,
            if m.expired { "expired" } else { "ok" },
            m.name,
            note
        );
    }
}
