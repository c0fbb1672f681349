//! A small synchronous QMP client: what the `--control` forms of the CLI use to talk to a
//! running `rewind serve`. Commands and replies are the control plane's own types.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use crate::control::protocol::{AgentCommand, Command, Empty};
use crate::control::replies::{Event, Greeting, Outcome, Response};
use crate::control::QmpError;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the control socket {path}: {cause}")]
    Connect { path: PathBuf, cause: std::io::Error },
    #[error("control socket connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("unexpected reply from the control socket: {0}")]
    Protocol(String),
    #[error(transparent)]
    Command(#[from] QmpError),
}

pub struct QmpClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: VecDeque<Event>,
}

/// `message` as a `T`, or a protocol error showing it.
fn decode<T: DeserializeOwned>(message: &Value) -> Result<T, ClientError> {
    T::deserialize(message).map_err(|e| ClientError::Protocol(format!("{e}: {message}")))
}

/// An event message as an [`Event`]; `None` for events this client does not know, which QMP
/// clients are to ignore.
fn known_event(message: &Value) -> Option<Event> {
    match Event::deserialize(message) {
        Ok(event) => Some(event),
        Err(e) => {
            log::debug!("ignoring event {message}: {e}");
            None
        }
    }
}

impl QmpClient {
    /// Connects, reads the greeting and negotiates capabilities.
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream =
            UnixStream::connect(path).map_err(|cause| ClientError::Connect { path: path.to_path_buf(), cause })?;
        let mut client = Self { reader: BufReader::new(stream.try_clone()?), writer: stream, events: VecDeque::new() };
        let _: Greeting = decode(&client.read_message()?)?;
        let _: Empty = client.execute(AgentCommand::QmpCapabilities(Empty {}))?;
        Ok(client)
    }

    fn read_message(&mut self) -> Result<Value, ClientError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(ClientError::Protocol("the daemon closed the connection".into()));
        }
        serde_json::from_str(&line).map_err(|e| ClientError::Protocol(format!("{e}: {line}")))
    }

    /// Runs a command and reads its reply as an `R`; events that arrive meanwhile are kept
    /// for `next_event`.
    pub fn execute<R: DeserializeOwned>(&mut self, command: impl Into<Command>) -> Result<R, ClientError> {
        let message = command.into().to_message().map_err(|e| ClientError::Protocol(e.to_string()))?;
        let mut line = message.to_string().into_bytes();
        line.push(b'\n');
        self.writer.write_all(&line)?;
        loop {
            let message = self.read_message()?;
            if message.get("event").is_some() {
                self.events.extend(known_event(&message));
                continue;
            }
            let response: Response = decode(&message)?;
            return match response.outcome {
                Outcome::Return(value) => decode(&value),
                Outcome::Error(error) => Err(error.into()),
            };
        }
    }

    /// The next asynchronous event, waiting for it if none is queued.
    pub fn next_event(&mut self) -> Result<Event, ClientError> {
        if let Some(event) = self.events.pop_front() {
            return Ok(event);
        }
        loop {
            let message = self.read_message()?;
            if message.get("event").is_some() {
                if let Some(event) = known_event(&message) {
                    return Ok(event);
                }
            }
        }
    }
}
