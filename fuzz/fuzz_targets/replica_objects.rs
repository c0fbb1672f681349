//! The replica's decoders of objects fetched from a bucket, which anyone with write access to it
//! can have changed: journal objects, base and delta parts, and the manifest. Whatever the
//! bytes, decoding returns an error or what the object names: records numbered as its key
//! says, ranges inside the volume, a manifest whose snapshots follow each other. Parts and
//! manifests that decode encode back to what decodes the same.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rewind_replica::layout::{
    decode_journal_object, decode_part, encode_part, journal_key, Manifest, PartData, PartExtent, PartOf, PartRange,
};

#[derive(Arbitrary, Debug)]
enum Extent {
    Bytes { offset: u32, data: Vec<u8> },
    Zeroes { offset: u32, len: u16 },
}

#[derive(Arbitrary, Debug)]
enum Input {
    Journal { first: u16, last: u16, bytes: Vec<u8> },
    Part { delta: bool, seq: u8, volume_size: u32, bytes: Vec<u8> },
    /// Made by the encoder, then damaged at one byte (or not).
    EncodedPart { delta: bool, extents: Vec<Extent>, flip: Option<(u16, u8)> },
    Manifest(Vec<u8>),
}

const STORE: uuid::Uuid = uuid::Uuid::from_bytes(*b"rewind-fuzz-uuid");
/// Large enough for every range the fuzzer can build (u32 offsets, short lengths).
const VOLUME: u64 = 1 << 40;

fn kind(delta: bool) -> PartOf {
    if delta {
        PartOf::Delta
    } else {
        PartOf::Base
    }
}

/// Decodes a part; returns its ranges as owned extents, checking each lies in the volume.
fn decoded(of: PartOf, seq: u64, volume_size: u64, bytes: &[u8]) -> Option<Vec<PartExtent>> {
    let mut extents = Vec::new();
    decode_part(of, &of.key(seq, 0), STORE, seq, volume_size, bytes, |offset, range| {
        let data = match range {
            PartRange::Bytes(data) => PartData::Bytes(data.to_vec()),
            PartRange::Zeroes(len) => PartData::Zeroes(len),
        };
        let len = match &data {
            PartData::Bytes(data) => data.len() as u64,
            PartData::Zeroes(len) => *len,
        };
        assert!(offset.checked_add(len).is_some_and(|end| end <= volume_size), "a range outside the volume");
        extents.push(PartExtent { offset, data });
        Ok(())
    })
    .ok()?;
    Some(extents)
}

fuzz_target!(|input: Input| match input {
    Input::Journal { first, last, bytes } => {
        let (first, last) = (u64::from(first), u64::from(last));
        let key = journal_key(first, last.max(first));
        let mut expected = first;
        let decoded = decode_journal_object(&key, STORE, &bytes, |header, payload| {
            assert_eq!(header.seq, expected, "records out of order");
            assert_eq!(payload.len(), header.payload_len as usize);
            expected += 1;
            Ok(())
        });
        if decoded.is_ok() {
            assert_eq!(expected, last.max(first) + 1, "an object decoded other records than its key names");
        }
    }
    Input::Part { delta, seq, volume_size, bytes } => {
        let _ = decoded(kind(delta), u64::from(seq), u64::from(volume_size), &bytes);
    }
    Input::EncodedPart { delta, extents, flip } => {
        let of = kind(delta);
        let extents: Vec<PartExtent> = extents
            .into_iter()
            .map(|e| match e {
                Extent::Bytes { offset, data } => PartExtent { offset: u64::from(offset), data: PartData::Bytes(data) },
                Extent::Zeroes { offset, len } => {
                    PartExtent { offset: u64::from(offset), data: PartData::Zeroes(u64::from(len)) }
                }
            })
            .collect();
        let mut bytes = encode_part(of, STORE, 7, 0, &extents);
        match flip {
            None => assert_eq!(decoded(of, 7, VOLUME, &bytes).as_ref(), Some(&extents), "a part did not round-trip"),
            Some((at, bit)) => {
                let at = usize::from(at) % bytes.len();
                bytes[at] ^= 1 << (bit % 8);
                assert!(decoded(of, 7, VOLUME, &bytes).is_none(), "a flipped bit at byte {at} went unnoticed");
            }
        }
    }
    Input::Manifest(bytes) => {
        let Ok(manifest) = Manifest::decode(&bytes) else { return };
        assert!(manifest.shipped_seq >= manifest.base.seq);
        let mut point = manifest.base.seq;
        for delta in &manifest.deltas {
            assert!(delta.seq > point && delta.seq <= manifest.shipped_seq, "a snapshot out of order decoded");
            assert!(if delta.full { delta.from == delta.seq } else { delta.from <= point });
            point = delta.seq;
        }
        let again = Manifest::decode(&manifest.encode()).expect("an encoded manifest decodes");
        assert_eq!(again, manifest, "a manifest did not round-trip");
    }
});
