//! The control socket's message reader fed a byte stream in reads of fuzzed sizes, each message
//! then split into a command and parsed on both channels as a session does. The messages (and
//! errors) must not depend on how the stream was cut into reads; every command that parses
//! must be one the channel offers and write back as QMP input that parses to it again.

#![no_main]

use std::io::Read;

use libfuzzer_sys::fuzz_target;
use rewind::control::fuzzing::{split_request, MessageReader, ReadError};
use serde_json::Value;

/// Hands out its bytes in reads of the given sizes (cycled), then end of stream.
struct Reads<'a> {
    bytes: &'a [u8],
    sizes: Vec<usize>,
    next: usize,
}

impl Read for Reads<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let size = if self.sizes.is_empty() { usize::MAX } else { self.sizes[self.next % self.sizes.len()] };
        self.next += 1;
        let n = size.min(out.len()).min(self.bytes.len());
        out[..n].copy_from_slice(&self.bytes[..n]);
        self.bytes = &self.bytes[n..];
        Ok(n)
    }
}

fn messages(bytes: &[u8], sizes: Vec<usize>) -> Vec<Result<Value, ReadError>> {
    let mut reader = MessageReader::new(Reads { bytes, sizes, next: 0 });
    let mut out = Vec::new();
    loop {
        match reader.next_message() {
            Ok(Some(message)) => out.push(Ok(message)),
            Ok(None) | Err(ReadError::Closed) => return out,
            Err(e) => out.push(Err(e)),
        }
        assert!(out.len() <= bytes.len(), "more messages than bytes");
    }
}

// The input: a count n (mod 17), n read sizes (a byte each, 0 read as 1), then the stream.
fuzz_target!(|data: &[u8]| {
    let Some((&count, rest)) = data.split_first() else { return };
    let count = usize::from(count % 17).min(rest.len());
    let (sizes, stream) = rest.split_at(count);
    let sizes: Vec<usize> = sizes.iter().map(|&s| usize::from(s).max(1)).collect();
    let cut = messages(stream, sizes);
    let whole = messages(stream, Vec::new());
    assert_eq!(cut, whole, "messages depend on how the stream was read");
    for message in whole.into_iter().flatten() {
        if let Ok((name, arguments)) = split_request(&message) {
            rewind_fuzz::check_command(name, arguments);
        }
    }
});
