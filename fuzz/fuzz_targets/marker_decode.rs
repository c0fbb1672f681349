//! Marker decoders: a marker record's payload (`decode_payload`) and the archive of markers
//! whose records were freed (`MarkerIndex::load_archive` over a fuzzed `markers.json`). What
//! decodes is a marker the store could have made, and encodes back to the same bytes; an
//! archive that loads saves and loads back to the same markers.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rewind_engine::marker::{decode_payload, encode_payload, validate_name, MarkerIndex, MAX_NOTE_LEN};
use rewind_fuzz::{fresh, scratch};
use serde_json::{json, Value};

#[derive(Arbitrary, Debug)]
struct MarkerSpec {
    id: u64,
    name: String,
    seq: u64,
    time_ns: u64,
    guest: bool,
    note: Option<String>,
    old_keys: bool,
}

#[derive(Arbitrary, Debug)]
enum Archive {
    Missing,
    Raw(Vec<u8>),
    Built(Vec<MarkerSpec>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    payload: Vec<u8>,
    seq: u64,
    time_ns: u64,
    archive: Archive,
    first_journal_seq: u64,
}

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| scratch("marker"))
}

fn marker_json(m: &MarkerSpec) -> Value {
    let mut v = json!({
        "id": m.id, "name": m.name, "seq": m.seq, "source": if m.guest { "guest" } else { "host" },
    });
    v[if m.old_keys { "time_ns" } else { "time-ns" }] = json!(m.time_ns);
    if let Some(note) = &m.note {
        v["note"] = json!(note);
    }
    v
}

fuzz_target!(|input: Input| {
    if let Some(marker) = decode_payload(&input.payload, input.seq, input.time_ns) {
        assert!(validate_name(marker.name.as_bytes()).is_ok(), "an invalid name decoded");
        assert!(marker.note.as_ref().is_none_or(|n| !n.is_empty() && n.len() <= MAX_NOTE_LEN));
        assert!(marker.id > 0 && marker.id.checked_add(1).is_some());
        let encoded = encode_payload(marker.id, marker.source, &marker.name, marker.note.as_deref());
        assert_eq!(encoded[..], input.payload[..encoded.len()], "a decoded payload re-encodes differently");
    }

    let dir = dir();
    fresh(dir);
    match &input.archive {
        Archive::Missing => {}
        Archive::Raw(bytes) => std::fs::write(dir.join("markers.json"), bytes).expect("archive"),
        Archive::Built(markers) => {
            let list: Vec<Value> = markers.iter().map(marker_json).collect();
            std::fs::write(dir.join("markers.json"), serde_json::to_vec(&list).expect("json")).expect("archive");
        }
    }
    let Ok(index) = MarkerIndex::load_archive(dir) else { return };
    let _ = index.next_id();
    let _ = index.guest_markers();
    let markers: Vec<_> = index.iter().cloned().collect();
    for m in &markers {
        assert!(validate_name(m.name.as_bytes()).is_ok());
        assert_eq!(index.get(&m.name), Some(m));
    }
    // Saved and loaded back: the same markers below the journal's start.
    index.save_archive(dir, input.first_journal_seq).expect("saving the archive");
    let reloaded = MarkerIndex::load_archive(dir).expect("a saved archive loads");
    let kept: Vec<_> = markers.iter().filter(|m| m.seq < input.first_journal_seq).cloned().collect();
    let again: Vec<_> = reloaded.iter().cloned().collect();
    assert_eq!(kept, again, "the archive did not load back as saved");
});
