//! The journal's fixed-size decoders: record headers, segment headers and segment file names.
//! The first byte says which checks to fix up (magic, checksum) so the fuzzer reaches the
//! field checks; what decodes must encode back to the same value.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use rewind_engine::journal::record::{RecordHeader, HEADER_LEN, MAX_PAYLOAD, RECORD_MAGIC};
use rewind_engine::journal::segment::{Segment, SegmentHeader, SEGMENT_HEADER_LEN, SEGMENT_MAGIC};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut buf = [0u8; 64];
    let n = rest.len().min(64);
    buf[..n].copy_from_slice(&rest[..n]);

    // Record header.
    let mut record = buf;
    if mode & 1 != 0 {
        record[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    }
    if mode & 2 != 0 {
        record[48..52].fill(0);
        let crc = crc32c::crc32c(&record);
        record[48..52].copy_from_slice(&crc.to_le_bytes());
    }
    const _: () = assert!(HEADER_LEN == 64);
    if let Ok(header) = RecordHeader::decode(&record) {
        assert!(header.payload_len <= MAX_PAYLOAD);
        let len = header.record_len();
        assert!(len >= 64 && len % 64 == 0 && len <= 64 + u64::from(MAX_PAYLOAD) + 63);
        assert_eq!(RecordHeader::decode(&header.encode()), Ok(header), "a decoded header re-encodes");
    }

    // Segment header.
    let mut segment = buf;
    if mode & 4 != 0 {
        segment[0..8].copy_from_slice(&SEGMENT_MAGIC);
    }
    if mode & 8 != 0 {
        segment[8..12].copy_from_slice(&rewind_engine::FORMAT_VERSION.to_le_bytes());
    }
    if mode & 16 != 0 {
        let crc = crc32c::crc32c(&segment[0..48]);
        segment[48..52].copy_from_slice(&crc.to_le_bytes());
    }
    const _: () = assert!(SEGMENT_HEADER_LEN == 64);
    if let Ok(header) = SegmentHeader::decode(&segment, Path::new("x.seg")) {
        assert_eq!(SegmentHeader::decode(&header.encode(), Path::new("x.seg")).ok(), Some(header));
    }

    // Segment file names: only canonical names parse, and they name their index.
    if let Ok(name) = std::str::from_utf8(rest) {
        if let Some(index) = Segment::parse_file_name(name) {
            assert_eq!(Segment::file_name(index), name, "a non-canonical name parsed");
        }
    }
});
