//! A sealed segment's header index (`.idx`, written for point-in-time views) as fuzzed bytes
//! beside a real segment. The first byte says which checks to fix up (magic and version, the
//! segment's numbers, the two checksums) so the fuzzer gets past them. Reading headers through
//! the index must never panic, and must yield exactly the segment's records: a usable index
//! describes them, and an unusable one is ignored for a walk of the segment.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rewind_engine::journal::header_index;
use rewind_engine::journal::{Journal, JournalView, NewRecord, RecordKind};
use rewind_fuzz::{scratch, UUID};

const RECORDS: u64 = 12;

/// A journal of 4 KiB segments whose first segment is sealed (and so has an index), and the
/// sequence numbers that segment holds, as the journal's own walk found them.
fn journal() -> &'static (JournalView, Vec<u64>) {
    static JOURNAL: OnceLock<(JournalView, Vec<u64>)> = OnceLock::new();
    JOURNAL.get_or_init(|| {
        let dir = scratch("header-index");
        let mut journal = Journal::create(&dir, UUID, 4096, 1).expect("creating a journal");
        let data = [7u8; 512];
        for i in 0..RECORDS {
            let record = NewRecord { kind: RecordKind::Write, offset: i * 512, length: 512, payload: &[&data] };
            journal.append(&[record]).expect("appending");
        }
        let view = journal.view();
        let first = view.segment(0).expect("the first segment");
        let seqs = (first.first_seq..first.next_seq).collect();
        (view, seqs)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let (view, expected) = journal();
    let segment = view.segment(0).expect("the first segment");
    let mut bytes = rest.to_vec();
    if bytes.len() >= 56 {
        if mode & 1 != 0 {
            bytes[0..8].copy_from_slice(b"RWSEGIX\0");
            bytes[8..12].copy_from_slice(&rewind_engine::FORMAT_VERSION.to_le_bytes());
        }
        if mode & 2 != 0 {
            for (at, value) in [(16, segment.index), (24, segment.first_seq), (32, segment.next_seq), (40, segment.end)] {
                bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
            }
        }
        if mode & 4 != 0 {
            let crc = crc32c::crc32c(&bytes[56..]);
            bytes[48..52].copy_from_slice(&crc.to_le_bytes());
        }
        if mode & 8 != 0 {
            let crc = crc32c::crc32c(&bytes[..52]);
            bytes[52..56].copy_from_slice(&crc.to_le_bytes());
        }
    }
    std::fs::write(header_index::index_path(&segment.path), &bytes).expect("writing the index");

    if let Some(records) = header_index::read(segment) {
        let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
        assert_eq!(&seqs, expected, "a usable index lists exactly the segment's records");
    }
    let mut seen = Vec::new();
    let walked = view.for_each_header(segment.first_seq, segment.next_seq - 1, |_, record| {
        seen.push(record.seq);
        Ok(())
    });
    if walked.is_ok() {
        assert_eq!(&seen, expected, "headers read through the index or a walk are the segment's");
    }
});
