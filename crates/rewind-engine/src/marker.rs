//! Markers: named points in the journal, recorded independently of any write.
//!
//! A marker is a journal record of its own, so it is ordered with the writes around it and is as
//! durable as they are. The index here makes lookup by name and listing instant; it is rebuilt
//! from the journal on open, plus `markers.json`, which keeps the markers whose records
//! retention has freed.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fsutil;
use crate::Seq;

/// Longest marker name, in bytes.
pub const MAX_NAME_LEN: usize = 128;
/// Longest marker note, in bytes.
pub const MAX_NOTE_LEN: usize = 4096;
const ARCHIVE_FILE: &str = "markers.json";

/// Who added a marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MarkerSource {
    /// The CLI or the control socket on the host.
    Host,
    /// The guest agent, from inside the VM.
    Guest,
}

/// A named point in the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Marker {
    /// Numbered 1, 2, 3, … in the order markers were added.
    pub id: u64,
    /// Unique within the store.
    pub name: String,
    /// The marker's own record: recovering to the marker gives every write before it.
    pub seq: Seq,
    /// Wall-clock time of the record, ns since the epoch. (Stores written before keys were
    /// made kebab-case say `time_ns`.)
    #[serde(alias = "time_ns")]
    pub time_ns: u64,
    /// Who added it.
    pub source: MarkerSource,
    /// Free text given with the marker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Checks a marker name: UTF-8, 1 to 128 bytes, no control characters (names end up in logs,
/// terminals and JSON).
pub fn validate_name(bytes: &[u8]) -> Result<&str> {
    let name = std::str::from_utf8(bytes).map_err(|_| Error::InvalidMarkerName("not valid UTF-8".into()))?;
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(Error::InvalidMarkerName(format!("must be 1 to {MAX_NAME_LEN} bytes, got {}", name.len())));
    }
    if name.chars().any(char::is_control) {
        return Err(Error::InvalidMarkerName("contains control characters".into()));
    }
    Ok(name)
}

pub fn validate_note(note: &str) -> Result<()> {
    if note.len() > MAX_NOTE_LEN {
        return Err(Error::NoteTooLong { len: note.len(), max: MAX_NOTE_LEN });
    }
    Ok(())
}

/// Payload of a marker record: id u64, source u8, name length u16, note length u16, then the
/// name and note bytes (all little-endian; see docs/format.md).
pub fn encode_payload(id: u64, source: MarkerSource, name: &str, note: Option<&str>) -> Vec<u8> {
    let note = note.unwrap_or("");
    let mut payload = Vec::with_capacity(13 + name.len() + note.len());
    payload.extend_from_slice(&id.to_le_bytes());
    payload.push(match source {
        MarkerSource::Host => 0,
        MarkerSource::Guest => 1,
    });
    payload.extend_from_slice(&(name.len() as u16).to_le_bytes());
    payload.extend_from_slice(&(note.len() as u16).to_le_bytes());
    payload.extend_from_slice(name.as_bytes());
    payload.extend_from_slice(note.as_bytes());
    payload
}

pub fn decode_payload(payload: &[u8], seq: Seq, time_ns: u64) -> Option<Marker> {
    let id = u64::from_le_bytes(payload.get(0..8)?.try_into().ok()?);
    let source = match payload.get(8)? {
        0 => MarkerSource::Host,
        1 => MarkerSource::Guest,
        _ => return None,
    };
    let name_len = u16::from_le_bytes(payload.get(9..11)?.try_into().ok()?) as usize;
    let note_len = u16::from_le_bytes(payload.get(11..13)?.try_into().ok()?) as usize;
    let name = std::str::from_utf8(payload.get(13..13 + name_len)?).ok()?.to_string();
    let note = std::str::from_utf8(payload.get(13 + name_len..13 + name_len + note_len)?).ok()?;
    let marker = Marker { id, name, seq, time_ns, source, note: (!note.is_empty()).then(|| note.to_string()) };
    validate_stored(&marker).ok()?;
    Some(marker)
}

/// Checks a marker read back from the store as if it were being added: the same names and notes
/// (they reach logs, terminals, guests), and an id that leaves room to number more.
fn validate_stored(marker: &Marker) -> std::result::Result<(), String> {
    validate_name(marker.name.as_bytes()).map_err(|e| e.to_string())?;
    marker.note.as_deref().map_or(Ok(()), validate_note).map_err(|e| e.to_string())?;
    if marker.id == 0 || marker.id > MAX_ID {
        return Err(format!("marker {:?} has the impossible id {}", marker.name, marker.id));
    }
    Ok(())
}

/// Ids past this are refused: far beyond any real count, and `id + 1` can never overflow.
const MAX_ID: u64 = 1 << 62;

/// How many markers a guest may have in a store, and how fast it may add them: each holds up
/// to a few KiB of the daemon's memory, and a guest is not trusted to be reasonable.
pub const MAX_GUEST_MARKERS: usize = 10_000;
pub const GUEST_MARKERS_PER_SECOND: f64 = 10.0;
pub const GUEST_MARKER_BURST: f64 = 100.0;

#[derive(Debug, Default)]
pub struct MarkerIndex {
    by_name: HashMap<String, Marker>,
    by_seq: BTreeMap<Seq, String>,
    highest_id: u64,
    guest_markers: usize,
}

impl MarkerIndex {
    /// Loads the markers whose journal records were freed.
    pub fn load_archive(store_dir: &Path) -> Result<Self> {
        let path = store_dir.join(ARCHIVE_FILE);
        let mut index = Self::default();
        match fs::read(&path) {
            Ok(text) => {
                let markers: Vec<Marker> = serde_json::from_slice(&text)
                    .map_err(|e| Error::BadMetadata { path: path.clone(), reason: e.to_string() })?;
                for marker in markers {
                    validate_stored(&marker).map_err(|reason| Error::BadMetadata { path: path.clone(), reason })?;
                    index.insert(marker);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::Io { context: format!("reading {}", path.display()), cause: e }),
        }
        Ok(index)
    }

    /// Saves every marker numbered below `first_journal_seq`: their records are about to go.
    pub fn save_archive(&self, store_dir: &Path, first_journal_seq: Seq) -> Result<()> {
        let archived: Vec<&Marker> =
            self.by_seq.range(..first_journal_seq).map(|(_, name)| &self.by_name[name]).collect();
        let text = serde_json::to_vec_pretty(&archived).expect("markers serialise");
        fsutil::write_atomically(&store_dir.join(ARCHIVE_FILE), &text)
    }

    /// Adds `marker`, replacing any marker of the same name or at the same sequence number.
    /// The same marker read twice (from the archive and from the journal) is simply kept; two
    /// markers sharing a name or a record only come from a damaged store, and the last one read
    /// wins, so that the index never lists a marker twice nor keeps one it cannot list.
    pub fn insert(&mut self, marker: Marker) {
        self.highest_id = self.highest_id.max(marker.id);
        if let Some(displaced) = self.by_seq.insert(marker.seq, marker.name.clone()) {
            if displaced != marker.name {
                self.remove_name(&displaced);
            }
        }
        if let Some(replaced) = self.remove_name(&marker.name) {
            if replaced.seq != marker.seq {
                self.by_seq.remove(&replaced.seq);
            }
        }
        self.guest_markers += usize::from(marker.source == MarkerSource::Guest);
        self.by_name.insert(marker.name.clone(), marker);
    }

    fn remove_name(&mut self, name: &str) -> Option<Marker> {
        let removed = self.by_name.remove(name)?;
        self.guest_markers -= usize::from(removed.source == MarkerSource::Guest);
        Some(removed)
    }

    /// How many of the markers came from the guest.
    pub fn guest_markers(&self) -> usize {
        self.guest_markers
    }

    pub fn get(&self, name: &str) -> Option<&Marker> {
        self.by_name.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// Markers in sequence order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &Marker> + '_ {
        self.by_seq.values().map(|name| &self.by_name[name])
    }

    pub fn next_id(&self) -> u64 {
        // Stored ids are at most MAX_ID, so this cannot overflow.
        self.highest_id + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips() {
        let payload = encode_payload(9, MarkerSource::Guest, "before-upgrade", Some("db checkpoint 77"));
        let marker = decode_payload(&payload, 120, 5).unwrap();
        assert_eq!(
            marker,
            Marker {
                id: 9,
                name: "before-upgrade".into(),
                seq: 120,
                time_ns: 5,
                source: MarkerSource::Guest,
                note: Some("db checkpoint 77".into()),
            }
        );
        let bare = decode_payload(&encode_payload(1, MarkerSource::Host, "x", None), 1, 1).unwrap();
        assert_eq!(bare.note, None);
    }

    #[test]
    fn truncated_payload_is_rejected() {
        let payload = encode_payload(9, MarkerSource::Host, "name", None);
        for len in 0..payload.len() {
            assert!(decode_payload(&payload[..len], 1, 1).is_none(), "accepted {len} bytes");
        }
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_name(b"before-upgrade").is_ok());
        assert!(validate_name("größe ✓".as_bytes()).is_ok());
        assert!(validate_name(&[b'a'; 128]).is_ok());
        assert!(validate_name(&[b'a'; 129]).is_err());
        assert!(validate_name(b"").is_err());
        assert!(validate_name(&[0xff, 0xfe]).is_err());
        assert!(validate_name(b"line\nbreak").is_err());
    }

    /// Found by fuzzing (fuzz/fuzz_targets/marker_decode.rs): an archive naming a marker twice
    /// at two points listed it twice, and saved it twice, at the later point only.
    #[test]
    fn markers_sharing_a_name_or_a_point_are_listed_once() {
        let dir = tempfile::tempdir().unwrap();
        let marker = |id: u64, name: &str, seq: u64, source| Marker {
            id,
            name: name.into(),
            seq,
            time_ns: seq,
            source,
            note: None,
        };
        let stored = vec![
            marker(1, "a", 5, MarkerSource::Guest),
            marker(2, "a", 7, MarkerSource::Host),
            marker(3, "b", 9, MarkerSource::Guest),
            marker(4, "c", 9, MarkerSource::Guest),
            marker(5, "c", 9, MarkerSource::Guest),
        ];
        std::fs::write(dir.path().join(ARCHIVE_FILE), serde_json::to_vec(&stored).unwrap()).unwrap();
        let index = MarkerIndex::load_archive(dir.path()).unwrap();
        let listed: Vec<Marker> = index.iter().cloned().collect();
        assert_eq!(listed, [stored[1].clone(), stored[4].clone()]);
        assert_eq!(index.get("a"), Some(&stored[1]));
        assert!(!index.contains("b"));
        assert_eq!(index.guest_markers(), 1);
        assert_eq!(index.next_id(), 6);
        index.save_archive(dir.path(), 100).unwrap();
        let reloaded: Vec<Marker> = MarkerIndex::load_archive(dir.path()).unwrap().iter().cloned().collect();
        assert_eq!(reloaded, listed);
    }

    #[test]
    fn archive_keeps_only_markers_below_the_journal_start() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = MarkerIndex::default();
        for (i, seq) in [3u64, 10, 20].into_iter().enumerate() {
            index.insert(Marker {
                id: i as u64 + 1,
                name: format!("m{seq}"),
                seq,
                time_ns: seq,
                source: MarkerSource::Host,
                note: None,
            });
        }
        index.save_archive(dir.path(), 11).unwrap();
        let loaded = MarkerIndex::load_archive(dir.path()).unwrap();
        let names: Vec<&str> = loaded.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["m3", "m10"]);
        assert_eq!(index.next_id(), 4);
    }
}
