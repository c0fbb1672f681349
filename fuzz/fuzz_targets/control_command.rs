//! Command dispatch parsing: `Command::parse` on a fuzzed JSON message (QMP input), on both
//! channels. A command the agent channel accepts is the same command on the host channel;
//! a host-only command is refused on the agent channel before its arguments are looked at;
//! every command parsed writes back as QMP input that parses to the same command.

#![no_main]

use libfuzzer_sys::fuzz_target;
use rewind::control::fuzzing::split_request;
use rewind::control::{Channel, Command, CommandError, HostCommand, QmpError};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(message) = serde_json::from_slice::<Value>(data) else { return };
    let Ok((name, arguments)) = split_request(&message) else { return };
    let host = Command::parse(name, arguments.clone(), Channel::Host);
    let agent = Command::parse(name, arguments, Channel::Agent);
    match (&host, &agent) {
        (Ok(Command::Agent(_)), _) => assert_eq!(host, agent, "an agent command parsed differently per channel"),
        (Ok(Command::Host(_)), _) => {
            assert_eq!(agent, Err(CommandError::NotOnChannel(name.to_string())), "a host command on the agent channel")
        }
        (Err(_), Ok(_)) => panic!("the agent channel accepted what the host refused: {agent:?}"),
        (Err(_), Err(_)) => {}
    }
    if let Err(e) = &host {
        let _ = QmpError::from(e.clone());
    }
    let Ok(command) = host else { return };
    let message = command.to_message().expect("a command writes as QMP input");
    let (name2, arguments2) = split_request(&message).expect("written QMP input splits");
    assert_eq!(Command::parse(name2, arguments2, Channel::Host).as_ref(), Ok(&command), "{message}");
    if let Command::Host(HostCommand::Recover(args)) = &command {
        let _ = args.target();
    }
});
