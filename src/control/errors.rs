//! QMP errors: a class a client can branch on and a description for people. Every error the
//! control plane reports gets its class here, and only here.

use serde::{Deserialize, Serialize};

use super::arguments::CommandError;

/// The `class` of an error reply (docs/control.md lists when each is used).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorClass {
    /// An unknown command, one the channel does not offer, or out of negotiation order.
    CommandNotFound,
    /// Anything without a class of its own: bad arguments, malformed input, I/O errors.
    GenericError,
    /// No marker has the name given.
    MarkerNotFound,
    /// `marker-add` with the name of an existing marker.
    MarkerExists,
    /// A guest's `marker-add` over the guest's rate or count limit: retry later, or ask the
    /// host to make room.
    MarkerLimit,
    /// A point outside the recoverable range: an expired marker, a sequence number past the
    /// head or freed, a time before the journal.
    PointNotRecoverable,
    /// No point export has the id given.
    ExportNotFound,
}

impl std::fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// The `error` member of a reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{desc} ({class})")]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QmpError {
    pub fn generic(desc: impl Into<String>) -> Self {
        Self { class: ErrorClass::GenericError, desc: desc.into() }
    }

    pub fn command_not_found(desc: impl Into<String>) -> Self {
        Self { class: ErrorClass::CommandNotFound, desc: desc.into() }
    }
}

impl From<CommandError> for QmpError {
    fn from(e: CommandError) -> Self {
        let class = match e {
            CommandError::UnknownCommand(_) | CommandError::NotOnChannel(_) => ErrorClass::CommandNotFound,
            CommandError::Missing(_)
            | CommandError::Unexpected(_)
            | CommandError::Invalid { .. }
            | CommandError::Other(_) => ErrorClass::GenericError,
        };
        Self { class, desc: e.to_string() }
    }
}

impl From<crate::point_exports::ExportError> for QmpError {
    fn from(e: crate::point_exports::ExportError) -> Self {
        use crate::point_exports::ExportError as E;
        match e {
            E::Store(e) => e.into(),
            E::Unknown(_) => Self { class: ErrorClass::ExportNotFound, desc: e.to_string() },
            E::TooMany { .. } | E::Socket { .. } | E::RelativeSocket(_) | E::Thread(_) => Self::generic(e.to_string()),
        }
    }
}

/// Engine errors keep their meaning: those a client would act on get a class of their own.
/// Every variant is listed, so a new one needs a decision here.
impl From<crate::Error> for QmpError {
    fn from(e: crate::Error) -> Self {
        use crate::Error as E;
        let class = match &e {
            E::UnknownMarker(_) => ErrorClass::MarkerNotFound,
            E::DuplicateMarker(_) => ErrorClass::MarkerExists,
            E::GuestMarkerLimit(_) => ErrorClass::MarkerLimit,
            E::Unrecoverable { .. } | E::TimeBeforeJournal(_) => ErrorClass::PointNotRecoverable,
            E::Io { .. }
            | E::Locked { .. }
            | E::NoStore(_)
            | E::StoreExists(_)
            | E::BadMetadata { .. }
            | E::UnsupportedVersion { .. }
            | E::JournalCorrupt { .. }
            | E::SnapshotCorrupt { .. }
            | E::OutOfRange { .. }
            | E::InvalidMarkerName(_)
            | E::NoteTooLong { .. }
            | E::OutputExists(_)
            | E::VolumeBehind(_)
            | E::NotDurable(_)
            | E::Cancelled
            | E::VerifyFailed(_) => ErrorClass::GenericError,
        };
        Self { class, desc: e.to_string() }
    }
}
