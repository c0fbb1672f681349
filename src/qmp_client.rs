//! A small synchronous QMP client: what the `--control` forms of the CLI use to talk to a
//! running `rewind serve`.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the control socket {path}: {cause}")]
    Connect { path: PathBuf, cause: std::io::Error },
    #[error("control socket connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("unexpected reply from the control socket: {0}")]
    Protocol(String),
    #[error("{desc} ({class})")]
    Command { class: String, desc: String },
}

pub struct QmpClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: VecDeque<Value>,
}

impl QmpClient {
    /// Connects, reads the greeting and negotiates capabilities.
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream =
            UnixStream::connect(path).map_err(|cause| ClientError::Connect { path: path.to_path_buf(), cause })?;
        let mut client = Self { reader: BufReader::new(stream.try_clone()?), writer: stream, events: VecDeque::new() };
        let greeting = client.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(ClientError::Protocol(format!("no QMP greeting: {greeting}")));
        }
        client.execute("qmp_capabilities", json!({}))?;
        Ok(client)
    }

    fn read_message(&mut self) -> Result<Value, ClientError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(ClientError::Protocol("the daemon closed the connection".into()));
        }
        serde_json::from_str(&line).map_err(|e| ClientError::Protocol(format!("{e}: {line}")))
    }

    /// Runs a command; events that arrive meanwhile are kept for `next_event`.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, ClientError> {
        let mut line =
            serde_json::to_vec(&json!({"execute": command, "arguments": arguments})).expect("JSON values serialise");
        line.push(b'\n');
        self.writer.write_all(&line)?;
        loop {
            let message = self.read_message()?;
            if message.get("event").is_some() {
                self.events.push_back(message);
            } else if let Some(value) = message.get("return") {
                return Ok(value.clone());
            } else if let Some(error) = message.get("error") {
                return Err(ClientError::Command {
                    class: error["class"].as_str().unwrap_or("GenericError").to_string(),
                    desc: error["desc"].as_str().unwrap_or("no description").to_string(),
                });
            } else {
                return Err(ClientError::Protocol(message.to_string()));
            }
        }
    }

    /// The next asynchronous event, waiting for it if none is queued.
    pub fn next_event(&mut self) -> Result<Value, ClientError> {
        if let Some(event) = self.events.pop_front() {
            return Ok(event);
        }
        loop {
            let message = self.read_message()?;
            if message.get("event").is_some() {
                return Ok(message);
            }
        }
    }
}
