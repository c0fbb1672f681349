//! Splits a client's byte stream into JSON messages, with or without newlines between them (QMP
//! clients send both ways). Each byte is looked at once, as it arrives: a message is parsed
//! only when its closing bracket is in, so a message trickling in costs time in proportion to
//! its size, not to its size times the reads it took. What one message may cost is bounded
//! before it is parsed: at most [`MAX_MESSAGE`] bytes, [`MAX_DEPTH`] levels of nesting and
//! [`MAX_VALUES`] JSON values, so its parsed form stays within a small multiple of its size.
//! The clients include the guest agent, on behalf of the guest.

use std::io::Read;

use serde_json::Value;

/// Larger messages get an error and are discarded.
pub const MAX_MESSAGE: usize = 1 << 20;
/// Deeper nesting gets an error: no command needs more than a few levels.
const MAX_DEPTH: usize = 32;
/// More values (counted by the brackets, commas and colons that introduce them) get an error:
/// every command has a handful.
const MAX_VALUES: usize = 4096;

#[derive(Debug, PartialEq)]
pub enum ReadError {
    /// The client went away or the connection broke.
    Closed,
    /// Not JSON, or over a limit: the description to send back.
    Malformed(String),
}

/// Where the scan of the message at the front of the buffer stands.
#[derive(Debug, Default)]
struct Scan {
    /// Bytes of the buffer already looked at.
    scanned: usize,
    depth: usize,
    values: usize,
    in_string: bool,
    escaped: bool,
}

pub struct MessageReader<S> {
    stream: S,
    buf: Vec<u8>,
    scan: Scan,
    /// After a message that broke a limit or the framing: drop bytes up to the next newline.
    skipping: bool,
}

/// What the bytes scanned so far make of the message at the front.
enum Framed {
    /// Its last byte is at this index.
    Complete(usize),
    Incomplete,
    Malformed(String),
}

impl<S: Read> MessageReader<S> {
    pub fn new(stream: S) -> Self {
        Self { stream, buf: Vec::new(), scan: Scan::default(), skipping: false }
    }

    /// The next message; `None` once the client has closed the connection.
    pub fn next_message(&mut self) -> Result<Option<Value>, ReadError> {
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
                if start > 0 {
                    self.buf.drain(..start);
                    self.scan = Scan::default();
                }
                match self.frame() {
                    Framed::Complete(last) => {
                        let parsed = serde_json::from_slice::<Value>(&self.buf[..=last]);
                        self.buf.drain(..=last);
                        self.scan = Scan::default();
                        return parsed.map(Some).map_err(|e| ReadError::Malformed(format!("JSON parse error: {e}")));
                    }
                    Framed::Malformed(reason) => {
                        self.skipping = true;
                        self.scan = Scan::default();
                        return Err(ReadError::Malformed(reason));
                    }
                    Framed::Incomplete => {}
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

    /// Scans the bytes not yet scanned of the message at the front of the buffer (which starts
    /// with a non-blank byte, if any).
    fn frame(&mut self) -> Framed {
        let scan = &mut self.scan;
        if scan.scanned == 0 {
            match self.buf.first() {
                None => return Framed::Incomplete,
                Some(b'{' | b'[') => {}
                Some(_) => return Framed::Malformed("JSON parse error: a message must be a JSON object".into()),
            }
        }
        for (i, &byte) in self.buf.iter().enumerate().skip(scan.scanned) {
            if i >= MAX_MESSAGE {
                return Framed::Malformed(format!("message over {MAX_MESSAGE} bytes, discarded"));
            }
            scan.scanned = i + 1;
            if scan.in_string {
                match byte {
                    _ if scan.escaped => scan.escaped = false,
                    b'\\' => scan.escaped = true,
                    b'"' => scan.in_string = false,
                    _ => {}
                }
                continue;
            }
            match byte {
                b'"' => scan.in_string = true,
                b'{' | b'[' => {
                    scan.depth += 1;
                    scan.values += 1;
                    if scan.depth > MAX_DEPTH {
                        return Framed::Malformed(format!("message nested over {MAX_DEPTH} levels, discarded"));
                    }
                }
                b'}' | b']' => {
                    scan.depth -= 1;
                    if scan.depth == 0 {
                        return Framed::Complete(i);
                    }
                }
                b',' | b':' => scan.values += 1,
                _ => {}
            }
            if scan.values > MAX_VALUES {
                return Framed::Malformed(format!("message of over {MAX_VALUES} values, discarded"));
            }
        }
        Framed::Incomplete
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Hands out its bytes `step` at a time, counting the reads.
    struct Trickle {
        bytes: Vec<u8>,
        at: usize,
        step: usize,
    }

    impl Read for Trickle {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = self.step.min(out.len()).min(self.bytes.len() - self.at);
            out[..n].copy_from_slice(&self.bytes[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    fn reader(bytes: &[u8], step: usize) -> MessageReader<Trickle> {
        MessageReader::new(Trickle { bytes: bytes.to_vec(), at: 0, step })
    }

    fn all(bytes: &[u8], step: usize) -> Vec<Result<Value, ReadError>> {
        let mut reader = reader(bytes, step);
        std::iter::from_fn(|| match reader.next_message() {
            Ok(None) | Err(ReadError::Closed) => None,
            Ok(Some(value)) => Some(Ok(value)),
            Err(e) => Some(Err(e)),
        })
        .collect()
    }

    #[test]
    fn messages_are_split_wherever_the_reads_fall() {
        let stream = br#"{"execute":"a","arguments":{"note":"brace } and quote \" inside"}}
  {"execute":"b","id":[1,{"x":"]"}]}{"execute":"c"}
"#;
        let expected = vec![
            json!({"execute": "a", "arguments": {"note": "brace } and quote \" inside"}}),
            json!({"execute": "b", "id": [1, {"x": "]"}]}),
            json!({"execute": "c"}),
        ];
        for step in [1, 2, 3, 7, 64, 4096] {
            let got: Vec<Value> = all(stream, step).into_iter().map(Result::unwrap).collect();
            assert_eq!(got, expected, "reads of {step} bytes");
        }
    }

    #[test]
    fn malformed_messages_are_refused_and_the_next_line_is_read() {
        let deep = format!("{}{}\n", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        let wide = format!("[{}0]\n", "0,".repeat(MAX_VALUES));
        let mut long = br#"{"execute":"x","arguments":{"name":""#.to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_MESSAGE));
        long.extend_from_slice(b"\"}}\n");
        let cases: [(&[u8], &str); 5] = [
            (b"{not json}\n", "JSON parse error"),
            (b"123\n", "must be a JSON object"),
            (deep.as_bytes(), "nested over"),
            (wide.as_bytes(), "values"),
            (&long, "over 1048576 bytes"),
        ];
        for (bad, why) in cases {
            let mut stream = bad.to_vec();
            stream.extend_from_slice(b"{\"execute\":\"next\"}\n");
            let got = all(&stream, 1000);
            match &got[0] {
                Err(ReadError::Malformed(desc)) => assert!(desc.contains(why), "{desc}"),
                other => panic!("{why}: {other:?}"),
            }
            assert_eq!(got[1], Ok(json!({"execute": "next"})), "{why}");
        }
    }

    #[test]
    fn each_byte_is_scanned_once_however_the_message_trickles_in() {
        let mut message = br#"{"execute":"marker-add","arguments":{"name":"x","note":""#.to_vec();
        message.extend(std::iter::repeat_n(b'n', 256 << 10));
        message.extend_from_slice(b"\"}}");
        let mut reader = reader(&[], 1);
        let mut scanned = 0;
        for piece in message.chunks(512) {
            reader.buf.extend_from_slice(piece);
            let before = reader.scan.scanned;
            let framed = reader.frame();
            scanned += reader.scan.scanned - before;
            assert_eq!(matches!(framed, Framed::Complete(_)), reader.buf.len() == message.len());
        }
        assert_eq!(scanned, message.len(), "every byte scanned exactly once");
    }
}
