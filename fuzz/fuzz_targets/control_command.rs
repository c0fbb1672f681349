//! Command dispatch parsing: `Command::parse` on a fuzzed JSON message (QMP input), on both
//! channels. A command the agent channel accepts is the same command on the host channel;
//! a host-only command is refused on the agent channel before its arguments are looked at;
//! every command parsed writes back as QMP input that parses to the same command.

#![no_main]

use libfuzzer_sys::fuzz_target;
use rewind::control::fuzzing::split_request;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(message) = serde_json::from_slice::<Value>(data) else { return };
    let Ok((name, arguments)) = split_request(&message) else { return };
    rewind_fuzz::check_command(name, arguments);
});
