//! The control plane: a QMP-framed JSON protocol on unix sockets, so QMP clients work
//! unchanged. The host socket has every command; the guest-agent socket only the
//! [`AgentCommand`]s, so a guest can never start a recovery, write a host path or change
//! retention. See docs/control.md.
//!
//! - [`protocol`]: the commands, as one type, read from and written as QMP input;
//! - [`replies`]: the greeting, every reply and event, shared with the CLI;
//! - [`errors`]: the error classes, and which error gets which;
//! - `server` (sockets, sessions), `dispatch` (running commands, jobs), `reader` (framing);
//! - [`DeviceStatus`]: all the control plane sees of the device.

mod arguments;
mod device;
mod dispatch;
pub mod errors;
pub mod protocol;
mod reader;
pub mod replies;
mod server;

pub use arguments::CommandError;
pub use device::DeviceStatus;
pub use errors::{ErrorClass, QmpError};
pub use protocol::{AgentCommand, Channel, Command, HostCommand};
pub use server::{bind_private, wake_accept, ControlServer};
/// What the fuzz targets (`fuzz/`) drive directly: the message framing and the split of a
/// message into a command name and arguments. Not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use super::reader::{MessageReader, ReadError, MAX_MESSAGE};
    pub use super::server::split_request;
}
