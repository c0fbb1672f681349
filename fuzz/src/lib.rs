//! What several fuzz targets share: scratch directories in memory, journal segment files
//! built from fuzzer input, valid enough (magic, checksums, numbering) for the scanner to get
//! deep, with every field open to damage, and the checks on a parsed control command.

use std::fs;
use std::path::{Path, PathBuf};

use arbitrary::Arbitrary;
use rewind::control::fuzzing::split_request;
use rewind::control::{Channel, Command, CommandError, HostCommand, QmpError};
use rewind_engine::journal::record::{padded_len, RECORD_MAGIC};
use rewind_engine::journal::segment::{Segment, SEGMENT_MAGIC};
use rewind_engine::marker::{encode_payload, MarkerSource};
use rewind_engine::FORMAT_VERSION;
use serde_json::Value;

/// A directory of this process's own, in memory where possible: `/dev/shm/rewind-fuzz-NAME-PID`.
/// Created empty on first use. `scripts/fuzz` removes these after a run.
pub fn scratch(name: &str) -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    let dir = base.join(format!("rewind-fuzz-{name}-{}", std::process::id()));
    fresh(&dir);
    dir
}

/// Empties `dir` (creating it if needed).
pub fn fresh(dir: &Path) {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).expect("creating a scratch directory");
}

/// The store UUID every fuzzed segment is made for (unless told otherwise).
pub const UUID: [u8; 16] = *b"rewind-fuzz-uuid";

/// A sequence number relative to the one the scanner expects next.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum SeqChoice {
    Next,
    Skip(u8),
    Back(u8),
    Abs(u64),
    /// Around the limits the journal checks: 0, 1 << 62, u64::MAX.
    Edge(u8),
}

impl SeqChoice {
    pub fn resolve(self, expected: u64) -> u64 {
        match self {
            Self::Next => expected,
            Self::Skip(n) => expected.saturating_add(u64::from(n) + 1),
            Self::Back(n) => expected.saturating_sub(u64::from(n) + 1),
            Self::Abs(seq) => seq,
            Self::Edge(e) => [0, 1, (1 << 62) - 1, 1 << 62, (1 << 62) + 1, u64::MAX - 1, u64::MAX][e as usize % 7],
        }
    }
}

#[derive(Arbitrary, Debug)]
pub enum SegmentName {
    /// The canonical name of a small index (so several files make a run of segments).
    Index(u8),
    /// The canonical name of any index (u64::MAX included).
    AnyIndex(u64),
    /// A spare, which `open` leaves alone and a new segment may reuse.
    Spare(u8),
    /// A half-made spare, which `open` removes.
    Preparing(u8),
    /// Names that must not count as segments.
    Odd(u8),
}

impl SegmentName {
    pub fn file_name(&self) -> String {
        match *self {
            Self::Index(i) => Segment::file_name(u64::from(i % 8)),
            Self::AnyIndex(i) => Segment::file_name(i),
            Self::Spare(i) => format!("spare-{:016x}.seg", u64::from(i % 4)),
            Self::Preparing(i) => format!("preparing-{i:016x}.tmp"),
            Self::Odd(i) => [
                "0.seg",
                "000000000000000A.seg",
                "+000000000000001.seg",
                "00000000000000001.seg",
                "0000000000000001.seg.tmp",
                "0000000000000001",
                "-000000000000001.seg",
                "0000000000000x01.seg",
            ][i as usize % 8]
                .to_string(),
        }
    }

    /// The index the name stands for, if it is a segment's.
    pub fn index(&self) -> Option<u64> {
        Segment::parse_file_name(&self.file_name())
    }
}

#[derive(Arbitrary, Debug)]
pub enum HeaderSpec {
    /// Magic, version, checksum right (unless told), fields chosen.
    Built {
        /// None: the index the file name says.
        index: Option<u64>,
        first_seq: SeqChoice,
        other_store: bool,
        bad_version: bool,
        bad_crc: bool,
    },
    /// Whatever bytes: a short, zeroed or garbage header.
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
pub enum PayloadSpec {
    Bytes(Vec<u8>),
    /// A marker record's payload, valid or not as the fields make it.
    Marker {
        id: u64,
        guest: bool,
        name: String,
        note: Option<String>,
    },
    /// Only zeroes, of this many 512-byte sectors: writes the size of real ones.
    Sectors(u8),
}

#[derive(Arbitrary, Debug)]
pub struct RecordSpec {
    /// 1..=5 are the kinds; anything else is not one.
    pub kind: u8,
    pub seq: SeqChoice,
    pub timestamp_ns: u64,
    /// Volume offset, in sectors (or raw with `raw_range`).
    pub offset: u32,
    /// Volume length for non-write records, in sectors (or raw with `raw_range`).
    pub length: u32,
    pub raw_range: Option<(u64, u64)>,
    pub payload: PayloadSpec,
    /// Overrides the payload length the header states.
    pub payload_len: Option<u32>,
    pub bad_payload_crc: bool,
    pub bad_header_crc: bool,
    /// Flips bits of one byte of the header (after its checksum).
    pub flip: Option<(u8, u8)>,
}

#[derive(Arbitrary, Debug)]
pub struct SegmentSpec {
    pub name: SegmentName,
    pub header: HeaderSpec,
    pub records: Vec<RecordSpec>,
    /// Zeroes after the records (an unused segment's rest), in 64-byte units.
    pub zeroes: u8,
    /// Bytes after those.
    pub tail: Vec<u8>,
    /// Cuts the file to this length.
    pub truncate: Option<u16>,
}

/// A sequence number the next segment may start at, carried from file to file.
pub struct Numbering {
    pub next_seq: u64,
}

impl SegmentSpec {
    /// The file's bytes. `numbering` is what the previous segment ended at.
    pub fn build(&self, numbering: &mut Numbering) -> Vec<u8> {
        let mut bytes = match &self.header {
            HeaderSpec::Built { index, first_seq, other_store, bad_version, bad_crc } => {
                let mut h = [0u8; 64];
                h[0..8].copy_from_slice(&SEGMENT_MAGIC);
                let version = if *bad_version { FORMAT_VERSION + 1 } else { FORMAT_VERSION };
                h[8..12].copy_from_slice(&version.to_le_bytes());
                let uuid = if *other_store { [0xee; 16] } else { UUID };
                h[16..32].copy_from_slice(&uuid);
                let index = index.or(self.name.index()).unwrap_or(0);
                h[32..40].copy_from_slice(&index.to_le_bytes());
                let first = first_seq.resolve(numbering.next_seq);
                numbering.next_seq = first;
                h[40..48].copy_from_slice(&first.to_le_bytes());
                let crc = crc32c::crc32c(&h[0..48]) ^ u32::from(*bad_crc);
                h[48..52].copy_from_slice(&crc.to_le_bytes());
                h.to_vec()
            }
            HeaderSpec::Raw(raw) => raw.iter().copied().take(64).collect(),
        };
        if matches!(self.name, SegmentName::Spare(_)) {
            // A spare is a segment freed by retention, or zeroes: past its header (which a
            // reuse overwrites) it starts with a valid record of an earlier life, numbered
            // below anything later, or with zeroes. What follows that is anything.
            bytes.resize(64, 0);
            match self.records.first() {
                Some(record) => bytes.extend_from_slice(&record.build_valid(0)),
                None => {
                    bytes.resize(64 + 64 * usize::from(self.zeroes.max(1)), 0);
                    return bytes;
                }
            }
        } else {
            for record in &self.records {
                let seq = record.seq.resolve(numbering.next_seq);
                numbering.next_seq = seq.saturating_add(1);
                bytes.extend_from_slice(&record.build(seq));
            }
        }
        bytes.resize(bytes.len() + 64 * usize::from(self.zeroes), 0);
        bytes.extend_from_slice(&self.tail);
        if let Some(len) = self.truncate {
            bytes.truncate(usize::from(len));
        }
        bytes
    }
}

impl RecordSpec {
    /// The record as the journal writes them: a kind, checksums and lengths that agree.
    pub fn build_valid(&self, seq: u64) -> Vec<u8> {
        let valid = Self {
            kind: self.kind % 5 + 1,
            seq: SeqChoice::Next,
            raw_range: None,
            payload: match &self.payload {
                PayloadSpec::Bytes(bytes) => PayloadSpec::Bytes(bytes.clone()),
                PayloadSpec::Marker { id, guest, name, note } => {
                    PayloadSpec::Marker { id: *id, guest: *guest, name: name.clone(), note: note.clone() }
                }
                PayloadSpec::Sectors(n) => PayloadSpec::Sectors(*n),
            },
            payload_len: None,
            bad_payload_crc: false,
            bad_header_crc: false,
            flip: None,
            ..*self
        };
        valid.build(seq)
    }

    /// The record: header and padded payload.
    pub fn build(&self, seq: u64) -> Vec<u8> {
        let payload = match &self.payload {
            PayloadSpec::Bytes(bytes) => bytes.clone(),
            PayloadSpec::Marker { id, guest, name, note } => {
                let source = if *guest { MarkerSource::Guest } else { MarkerSource::Host };
                encode_payload(*id, source, name, note.as_deref())
            }
            PayloadSpec::Sectors(n) => vec![0; 512 * usize::from(*n)],
        };
        let (offset, length) = match self.raw_range {
            Some(range) => range,
            None => (u64::from(self.offset) * 512, u64::from(self.length) * 512),
        };
        // A write's length is its payload's, as the decoder insists.
        let length = if self.kind == 1 && self.raw_range.is_none() { payload.len() as u64 } else { length };
        let payload_len = self.payload_len.unwrap_or(payload.len() as u32);
        let mut h = [0u8; 64];
        h[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        h[4] = self.kind;
        h[8..16].copy_from_slice(&seq.to_le_bytes());
        h[16..24].copy_from_slice(&self.timestamp_ns.to_le_bytes());
        h[24..32].copy_from_slice(&offset.to_le_bytes());
        h[32..40].copy_from_slice(&length.to_le_bytes());
        h[40..44].copy_from_slice(&payload_len.to_le_bytes());
        let payload_crc = crc32c::crc32c(&payload) ^ u32::from(self.bad_payload_crc);
        h[44..48].copy_from_slice(&payload_crc.to_le_bytes());
        let crc = crc32c::crc32c(&h) ^ u32::from(self.bad_header_crc);
        h[48..52].copy_from_slice(&crc.to_le_bytes());
        if let Some((at, mask)) = self.flip {
            h[at as usize % 64] ^= mask;
        }
        let mut bytes = h.to_vec();
        bytes.extend_from_slice(&payload);
        bytes.resize(64 + padded_len(payload.len() as u64) as usize, 0);
        bytes
    }
}

/// Writes up to `max` segment files into `dir` (emptied first); returns their names.
pub fn write_segments(dir: &Path, specs: &[SegmentSpec], max: usize) -> Vec<String> {
    fresh(dir);
    let mut numbering = Numbering { next_seq: 1 };
    let mut names = Vec::new();
    for spec in specs.iter().take(max) {
        let name = spec.name.file_name();
        fs::write(dir.join(&name), spec.build(&mut numbering)).expect("writing a segment");
        names.push(name);
    }
    names
}

/// Parses a command as both channels would, and checks what the two make of it.
pub fn check_command(name: &str, arguments: serde_json::Map<String, Value>) {
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
}
