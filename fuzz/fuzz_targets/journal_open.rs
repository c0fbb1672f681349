//! `Journal::open` over 1 to 4 fuzzed segment files (valid names mostly, headers and records
//! valid enough to get deep). Open must return, never panic. When it succeeds, the journal it
//! returns must be consistent (segments numbered without gaps, every record it visited still
//! there), and, when it read every payload, open again cleanly (a repair leaves nothing to
//! repair) and take an append that a further open finds.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rewind_engine::journal::{Journal, NewRecord, Payloads, RecordKind};
use rewind_engine::marker::decode_payload;
use rewind_fuzz::{scratch, write_segments, SegmentSpec, UUID};

#[derive(Arbitrary, Debug)]
struct Input {
    segments: Vec<SegmentSpec>,
    capacity: u8,
    durable_through: u8,
    payloads: u8,
    append_len: u16,
}

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| scratch("journal"))
}

type Opened = (Journal, Option<rewind_engine::journal::TailRepair>, Vec<u64>);

fn open(capacity: u64, durable_through: u64, payloads: Payloads) -> rewind_engine::Result<Opened> {
    let mut seen = Vec::new();
    let (journal, repair) = Journal::open(dir(), UUID, capacity, durable_through, payloads, |rec| {
        if rec.header.kind == RecordKind::Marker {
            if let Some(payload) = rec.payload {
                let _ = decode_payload(payload, rec.header.seq, rec.header.timestamp_ns);
            }
        }
        seen.push(rec.header.seq);
        Ok(())
    })?;
    Ok((journal, repair, seen))
}

fuzz_target!(|input: Input| {
    if input.segments.is_empty() {
        return;
    }
    write_segments(dir(), &input.segments, 4);
    let capacity = [4096, 8192, 65536, 1 << 20][input.capacity as usize % 4];
    let durable_through = u64::from(input.durable_through);
    let payloads = match input.payloads % 3 {
        0 => Payloads::Skip,
        1 => Payloads::OfKinds(&[RecordKind::Marker]),
        _ => Payloads::All,
    };
    let Ok((journal, _repair, seen)) = open(capacity, durable_through, payloads) else { return };

    // The journal is one run of numbers, and holds every record the scan visited.
    let segments = journal.segments();
    assert!(!segments.is_empty());
    for pair in segments.windows(2) {
        assert!(pair[0].index < pair[1].index, "segments out of order");
        assert_eq!(pair[0].next_seq, pair[1].first_seq, "a gap between segments");
    }
    for s in segments {
        assert!(s.first_seq <= s.next_seq && s.end >= 64, "segment {s:?}");
    }
    assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "records visited out of order: {seen:?}");
    if let (Some(&first), Some(&last)) = (seen.first(), seen.last()) {
        assert_eq!(journal.first_seq(), first, "the first record visited is gone");
        assert_eq!(journal.next_seq(), last + 1, "records visited are gone, or unvisited ones kept");
    }
    let mut again = Vec::new();
    let next = journal.next_seq();
    let first = journal.first_seq();
    if next > first {
        journal
            .view()
            .for_each(first, next - 1, Payloads::Skip, |rec| {
                again.push(rec.header.seq);
                Ok(())
            })
            .expect("the records open accepted read back");
        assert_eq!(again, (first..next).collect::<Vec<_>>());
    }
    drop(journal);

    // Open reads the payloads of checkpointed records in sealed segments only when asked; a
    // segment that becomes the last one when a torn tail past it is cut is read in full only by
    // the next open, which may find damage the first one did not look for (and cut it, or
    // refuse). Reopening is held to the checks below when the first open read every payload.
    if payloads != Payloads::All {
        let _ = open(capacity, durable_through, payloads);
        return;
    }

    // Opening again finds nothing left to repair.
    let (mut journal, repair, _) = open(capacity, durable_through, payloads).expect("a repaired journal reopens");
    assert_eq!(repair, None, "a second open repaired again");
    assert_eq!((journal.first_seq(), journal.next_seq()), (first, next), "a second open changed the journal");

    // An append is found by the next open.
    let payload = vec![0x5a; usize::from(input.append_len % 8192)];
    let pieces = [payload.as_slice()];
    let record = NewRecord { kind: RecordKind::Write, offset: 0, length: payload.len() as u64, payload: &pieces };
    let seq = journal.append(&[record]).expect("appending");
    assert_eq!(seq, next);
    drop(journal);
    let (journal, repair, _) = open(capacity, durable_through, payloads).expect("a journal reopens after an append");
    assert_eq!(repair, None, "an append left something to repair");
    assert_eq!(journal.next_seq(), next + 1, "the append is lost");
});
