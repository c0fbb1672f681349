//! Splits a client's byte stream into JSON values, with or without newlines between them (QMP
//! clients send both ways), holding at most [`MAX_MESSAGE`] bytes of one message.

use std::io::Read;
use std::os::unix::net::UnixStream;

use serde_json::Value;

/// Larger messages get an error and are discarded.
pub(super) const MAX_MESSAGE: usize = 1 << 20;

pub(super) enum ReadError {
    /// The client went away or the connection broke.
    Closed,
    /// Not JSON, or too large: the description to send back.
    Malformed(String),
}

pub(super) struct MessageReader {
    stream: UnixStream,
    buf: Vec<u8>,
    /// After an oversized message: drop bytes up to the next newline.
    skipping: bool,
}

impl MessageReader {
    pub(super) fn new(stream: UnixStream) -> Self {
        Self { stream, buf: Vec::new(), skipping: false }
    }

    /// The next message; `None` once the client has closed the connection.
    pub(super) fn next_message(&mut self) -> Result<Option<Value>, ReadError> {
        loop {
            if self.skipping {
                match self.buf.iter().position(|&b| b == b'\n') {
                    Some(end) => {
                        self.buf.drain(..=end);
                        self.skipping = false;
                    }
                    None => self.buf.clear(),
                }
            }
            if !self.skipping {
                let start = self.buf.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(self.buf.len());
                self.buf.drain(..start);
                if !self.buf.is_empty() {
                    let mut values = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
                    match values.next() {
                        Some(Ok(value)) => {
                            let used = values.byte_offset();
                            self.buf.drain(..used);
                            if used > MAX_MESSAGE {
                                return Err(ReadError::Malformed(format!(
                                    "message over {MAX_MESSAGE} bytes, discarded"
                                )));
                            }
                            return Ok(Some(value));
                        }
                        Some(Err(e)) if e.is_eof() => {
                            if self.buf.len() > MAX_MESSAGE {
                                self.skipping = true;
                                return Err(ReadError::Malformed(format!(
                                    "message over {MAX_MESSAGE} bytes, discarded"
                                )));
                            }
                        }
                        Some(Err(e)) => {
                            // Resynchronise at the next line.
                            match self.buf.iter().position(|&b| b == b'\n') {
                                Some(end) => drop(self.buf.drain(..=end)),
                                None => self.skipping = true,
                            }
                            return Err(ReadError::Malformed(format!("JSON parse error: {e}")));
                        }
                        None => self.buf.clear(),
                    }
                }
            }
            let mut chunk = [0u8; 64 * 1024];
            let n = self.stream.read(&mut chunk).map_err(|_| ReadError::Closed)?;
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}
