//! The commands of the control protocol as types: each command with its arguments, which
//! channels offer it, and how it is read from and written as QMP input. The daemon parses
//! requests into [`Command`]; the CLI builds the same values and sends them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::arguments::{CommandError, CommandInput};
use crate::journal::Seq;
use crate::recovery::RecoveryTarget;
use crate::retention::RetentionPolicy;
use crate::units::parse_rfc3339_ns;

/// The socket a command arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// The host control socket: every command.
    Host,
    /// The guest-agent socket: [`AgentCommand`]s only.
    Agent,
}

/// Commands both sockets offer: a guest can add and read markers and read the status. The
/// wire name is the variant's name in kebab-case (and `qmp_capabilities`), the arguments its
/// fields, also in kebab-case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", rename_all_fields = "kebab-case", deny_unknown_fields)]
pub enum AgentCommand {
    /// Ends capabilities negotiation.
    #[serde(rename = "qmp_capabilities")]
    QmpCapabilities(Empty),
    MarkerAdd {
        name: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        note: Option<String>,
    },
    MarkerList,
    MarkerGet {
        name: String,
    },
    QueryStatus,
}

/// Commands only the host socket offers, so a guest can never start a recovery, write a host
/// path or change retention. Named as [`AgentCommand`]s are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", rename_all_fields = "kebab-case", deny_unknown_fields)]
pub enum HostCommand {
    SnapshotTake,
    SnapshotList,
    QueryJournal,
    RetentionSet(RetentionChange),
    Recover(RecoverArgs),
    QueryJobs,
    PointExportAdd(PointExportArgs),
    PointExportRemove {
        export_id: String,
    },
    QueryPointExports,
    PointExportPromote {
        export_id: String,
        output: PathBuf,
    },
    /// How far shipping to the replica has got (`serve --replicate`).
    QueryReplication,
}

/// Any command. Which of the two types a command belongs to decides which channels offer it,
/// so a new command cannot be added without that decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Command {
    Agent(AgentCommand),
    Host(HostCommand),
}

impl From<AgentCommand> for Command {
    fn from(command: AgentCommand) -> Self {
        Self::Agent(command)
    }
}

impl From<HostCommand> for Command {
    fn from(command: HostCommand) -> Self {
        Self::Host(command)
    }
}

/// An object with nothing in it: `qmp_capabilities`' reply, and its arguments (QEMU's
/// `enable` has nothing to enable here; whatever a client sends is ignored, as it always was).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

/// `retention-set`: the settings to change; the others are kept.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RetentionChange {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_age_secs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_marker_snapshots: Option<bool>,
}

impl RetentionChange {
    pub fn apply_to(&self, policy: &mut RetentionPolicy) {
        if let Some(max) = self.max_bytes {
            policy.max_bytes = Some(max);
        }
        if let Some(age) = self.max_age_secs {
            policy.max_age_secs = Some(age);
        }
        if let Some(keep) = self.keep_marker_snapshots {
            policy.keep_marker_snapshots = keep;
        }
    }
}

/// `recover`: exactly one of `marker`, `seq` and `time` (RFC 3339), and the image to write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoverArgs {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub marker: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<Seq>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    pub output: PathBuf,
}

/// A point as the `marker`, `seq` and `time` arguments name it (exactly one of them).
type PointFields = (Option<String>, Option<Seq>, Option<String>);

fn point_fields(target: &RecoveryTarget) -> PointFields {
    match target {
        RecoveryTarget::Marker(name) => (Some(name.clone()), None, None),
        RecoveryTarget::Seq(seq) => (None, Some(*seq), None),
        RecoveryTarget::Time(ns) => {
            // To the nanosecond, so the daemon resolves exactly the time asked for.
            let time = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(*ns);
            (None, None, Some(humantime::format_rfc3339_nanos(time).to_string()))
        }
    }
}

fn point_target(
    command: &str,
    marker: &Option<String>,
    seq: Option<Seq>,
    time: &Option<String>,
) -> Result<RecoveryTarget, CommandError> {
    match (marker, seq, time) {
        (Some(name), None, None) => Ok(RecoveryTarget::Marker(name.clone())),
        (None, Some(seq), None) => Ok(RecoveryTarget::Seq(seq)),
        (None, None, Some(time)) => parse_rfc3339_ns(time)
            .map(RecoveryTarget::Time)
            .map_err(|reason| CommandError::Invalid { name: "time".into(), reason }),
        _ => Err(CommandError::Other(format!("{command} needs exactly one of 'marker', 'seq' and 'time'"))),
    }
}

impl RecoverArgs {
    pub fn new(target: &RecoveryTarget, output: PathBuf) -> Self {
        let (marker, seq, time) = point_fields(target);
        Self { marker, seq, time, output }
    }

    /// The point to recover to.
    pub fn target(&self) -> Result<RecoveryTarget, CommandError> {
        point_target("recover", &self.marker, self.seq, &self.time)
    }
}

/// `point-export-add`: exactly one of `marker`, `seq` and `time` (RFC 3339), and the
/// vhost-user socket to serve the point on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointExportArgs {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub marker: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<Seq>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    pub socket: PathBuf,
}

impl PointExportArgs {
    pub fn new(target: &RecoveryTarget, socket: PathBuf) -> Self {
        let (marker, seq, time) = point_fields(target);
        Self { marker, seq, time, socket }
    }

    /// The point to export.
    pub fn target(&self) -> Result<RecoveryTarget, CommandError> {
        point_target("point-export-add", &self.marker, self.seq, &self.time)
    }
}

/// Whether `T` has a command named `execute` (its arguments unchecked).
fn has_command<'de, T: Deserialize<'de>>(execute: &str) -> bool {
    !matches!(T::deserialize(CommandInput::new(execute, Map::new())), Err(CommandError::UnknownCommand(_)))
}

impl Command {
    /// The command named `execute` with its `arguments` (QMP input without `arguments` has
    /// none: pass an empty map), if `channel` offers it. A command the channel does not offer
    /// is refused before its arguments are looked at.
    pub fn parse(execute: &str, arguments: Map<String, Value>, channel: Channel) -> Result<Self, CommandError> {
        if has_command::<AgentCommand>(execute) {
            return AgentCommand::deserialize(CommandInput::new(execute, arguments)).map(Self::Agent);
        }
        if !has_command::<HostCommand>(execute) {
            return Err(CommandError::UnknownCommand(execute.to_string()));
        }
        match channel {
            Channel::Host => HostCommand::deserialize(CommandInput::new(execute, arguments)).map(Self::Host),
            Channel::Agent => Err(CommandError::NotOnChannel(execute.to_string())),
        }
    }

    /// The QMP input that runs this command: `{"execute": NAME, "arguments": {…}}`.
    pub fn to_message(&self) -> serde_json::Result<Value> {
        // serde writes an enum as "name" (no fields) or {"name": fields}.
        match serde_json::to_value(self)? {
            Value::String(name) => Ok(json!({"execute": name})),
            Value::Object(tagged) if tagged.len() == 1 => {
                let (name, arguments) = tagged.into_iter().next().unwrap_or_default();
                Ok(json!({"execute": name, "arguments": arguments}))
            }
            other => Err(serde::ser::Error::custom(format!("{other} is not a command"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_on(channel: Channel, command: &str, arguments: Value) -> Result<Command, CommandError> {
        let Value::Object(arguments) = arguments else { panic!("arguments are an object") };
        Command::parse(command, arguments, channel)
    }

    fn parse(command: &str, arguments: Value) -> Result<Command, CommandError> {
        parse_on(Channel::Host, command, arguments)
    }

    #[test]
    fn commands_and_their_arguments_are_read_with_errors_naming_the_argument() {
        assert_eq!(parse("marker-list", json!({})), Ok(AgentCommand::MarkerList.into()));
        assert_eq!(
            parse("marker-add", json!({"name": "a"})),
            Ok(AgentCommand::MarkerAdd { name: "a".into(), note: None }.into())
        );
        assert_eq!(
            parse("retention-set", json!({"max-bytes": 5})),
            Ok(HostCommand::RetentionSet(RetentionChange { max_bytes: Some(5), ..Default::default() }).into())
        );
        assert_eq!(
            parse("qmp_capabilities", json!({"enable": ["oob"]})),
            Ok(AgentCommand::QmpCapabilities(Empty {}).into())
        );
        assert_eq!(parse("no-such", json!({})), Err(CommandError::UnknownCommand("no-such".into())));
        assert_eq!(parse("marker-add", json!({})), Err(CommandError::Missing("name".into())));
        assert_eq!(parse("marker-add", json!({"nome": "x"})), Err(CommandError::Unexpected("nome".into())));
        assert_eq!(parse("marker-list", json!({"all": true})), Err(CommandError::Unexpected("all".into())));
        assert_eq!(parse("recover", json!({"seq": 1})), Err(CommandError::Missing("output".into())));
        let Err(CommandError::Invalid { name, reason }) = parse("retention-set", json!({"max-bytes": "lots"})) else {
            panic!("a string for a number is invalid")
        };
        assert_eq!(name, "max-bytes");
        assert!(reason.contains("invalid type"), "{reason}");
    }

    #[test]
    fn commands_are_written_as_qmp_input_that_reads_back() {
        let target = RecoveryTarget::Time(1_700_000_000_123_456_789);
        for command in [
            AgentCommand::QmpCapabilities(Empty {}).into(),
            AgentCommand::QueryStatus.into(),
            AgentCommand::MarkerAdd { name: "m".into(), note: Some("n".into()) }.into(),
            HostCommand::Recover(RecoverArgs::new(&target, "/x.img".into())).into(),
            HostCommand::PointExportAdd(PointExportArgs::new(&target, "/x.sock".into())).into(),
            HostCommand::PointExportAdd(PointExportArgs::new(&RecoveryTarget::Marker("m".into()), "/x".into())).into(),
            HostCommand::PointExportRemove { export_id: "export-1".into() }.into(),
            HostCommand::PointExportPromote { export_id: "export-1".into(), output: "/p.img".into() }.into(),
            HostCommand::QueryPointExports.into(),
        ] {
            let message = Command::to_message(&command).unwrap();
            let arguments = message.get("arguments").cloned().unwrap_or_else(|| json!({}));
            let execute = message["execute"].as_str().unwrap();
            assert_eq!(parse(execute, arguments).as_ref(), Ok(&command), "{message}");
        }
        let recover = parse("recover", json!({"time": "2023-11-14T22:13:20.123456789Z", "output": "/x"}));
        let Ok(Command::Host(HostCommand::Recover(args))) = recover else { panic!("{recover:?}") };
        assert_eq!(args.target(), Ok(target));
        let both = RecoverArgs { seq: Some(1), ..RecoverArgs::new(&RecoveryTarget::Marker("m".into()), "/x".into()) };
        assert!(both.target().is_err());
    }

    #[test]
    fn the_agent_channel_refuses_host_commands_before_their_arguments() {
        assert_eq!(parse_on(Channel::Agent, "marker-list", json!({})), Ok(AgentCommand::MarkerList.into()));
        for (command, arguments) in
            [("query-jobs", json!({})), ("query-jobs", json!({"junk": 1})), ("recover", json!({}))]
        {
            assert_eq!(
                parse_on(Channel::Agent, command, arguments),
                Err(CommandError::NotOnChannel(command.into())),
                "{command}"
            );
        }
        assert_eq!(parse_on(Channel::Agent, "no-such", json!({})), Err(CommandError::UnknownCommand("no-such".into())));
    }
}
