//! `export add|list|remove|promote`: point-in-time exports of a running daemon, through its
//! control socket (an export serves from the daemon's process, so there is no offline form;
//! `rewind serve --at-*` serves one point without a daemon).

use anyhow::{Context, Result};

use super::args::ExportCommand;
use super::recover::follow_job;
use super::{emit, progress_bar};
use crate::control::protocol::{Empty, HostCommand, PointExportArgs};
use crate::control::replies::{JobStarted, PointExportAdded};
use crate::point_exports::ExportInfo;
use crate::qmp_client::QmpClient;

pub(super) fn run(command: ExportCommand) -> Result<()> {
    match command {
        ExportCommand::Add { control, target, socket, json } => {
            let target = target.target();
            let socket = std::path::absolute(&socket).context("resolving --socket")?;
            let command = HostCommand::PointExportAdd(PointExportArgs::new(&target, socket.clone()));
            let added: PointExportAdded =
                QmpClient::connect(&control)?.execute(command).with_context(|| format!("exporting {target}"))?;
            emit(json, &added, || {
                println!("{}: seq {} ({target}) served on {}", added.export_id, added.seq, socket.display())
            })
        }
        ExportCommand::List { control, json } => {
            let exports: Vec<ExportInfo> = QmpClient::connect(&control)?.execute(HostCommand::QueryPointExports)?;
            emit(json, &exports, || {
                for e in &exports {
                    let connected = if e.frontend_connected { "connected" } else { "waiting for a frontend" };
                    println!(
                        "{}  seq {} ({})  {}  {connected}, {} bytes written",
                        e.export_id,
                        e.seq,
                        e.target,
                        e.socket.display(),
                        e.overlay_bytes
                    );
                }
            })
        }
        ExportCommand::Remove { id, control } => {
            let _: Empty = QmpClient::connect(&control)?
                .execute(HostCommand::PointExportRemove { export_id: id.clone() })
                .with_context(|| format!("removing {id}"))?;
            println!("{id} removed");
            Ok(())
        }
        ExportCommand::Promote { id, output, control, json } => {
            let output = std::path::absolute(&output).context("resolving --output")?;
            let mut client = QmpClient::connect(&control)?;
            let command = HostCommand::PointExportPromote { export_id: id.clone(), output: output.clone() };
            let started: JobStarted = client.execute(command).with_context(|| format!("promoting {id}"))?;
            let bar = progress_bar("promoting");
            let job = follow_job(&mut client, &started, &mut |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })
            .with_context(|| format!("promoting {id} failed"))?;
            bar.finish_and_clear();
            emit(json, &job, || println!("{id} written into {} (job {})", output.display(), job.id))
        }
    }
}
