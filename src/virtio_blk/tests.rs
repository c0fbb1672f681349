use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

const MEM: u64 = 0x10000;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
}

fn limits() -> Limits {
    Limits {
        capacity_bytes: 1 << 20,
        seg_max: 4,
        max_transfer: 1 << 20,
        max_discard_sectors: 2048,
        max_discard_segments: 1,
        read_only: false,
    }
}

fn header(mem: &GuestMemoryMmap, request_type: u32, sector: u64) -> Desc {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&request_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(0x100)).unwrap();
    Desc { addr: GuestAddress(0x100), len: 16, write_only: false, has_next: false }
}

fn data(addr: u64, len: u32, write_only: bool) -> Desc {
    Desc { addr: GuestAddress(addr), len, write_only, has_next: false }
}

fn status() -> Desc {
    Desc { addr: GuestAddress(0x200), len: 1, write_only: true, has_next: false }
}

#[test]
fn reads_and_writes_parse_with_their_buffers() {
    let mem = memory();
    let read = parse(
        &[header(&mem, VIRTIO_BLK_T_IN, 8), data(0x1000, 512, true), data(0x3000, 1024, true), status()],
        &mem,
        &limits(),
    )
    .unwrap();
    assert_eq!(
        read,
        Parsed {
            request: Request::Read {
                offset: 4096,
                buffers: vec![(GuestAddress(0x1000), 512), (GuestAddress(0x3000), 1024)]
            },
            status: GuestAddress(0x200)
        }
    );
    let write =
        parse(&[header(&mem, VIRTIO_BLK_T_OUT, 0), data(0x1000, 4096, false), status()], &mem, &limits()).unwrap();
    assert_eq!(write.request, Request::Write { offset: 0, buffers: vec![(GuestAddress(0x1000), 4096)] });
}

/// (what, header type and sector if the chain starts with one, the other descriptors, has a status)
type Case = (&'static str, Option<(u32, u64)>, Vec<Desc>, bool);

#[test]
fn malformed_chains_are_refused_with_the_status_when_there_is_one() {
    let mem = memory();
    let l = limits();
    let cases: Vec<Case> = vec![
        ("wrong direction for a read", Some((VIRTIO_BLK_T_IN, 0)), vec![data(0x1000, 512, false), status()], true),
        ("wrong direction for a write", Some((VIRTIO_BLK_T_OUT, 0)), vec![data(0x1000, 512, true), status()], true),
        ("length not a multiple of 512", Some((VIRTIO_BLK_T_OUT, 0)), vec![data(0x1000, 500, false), status()], true),
        ("zero length", Some((VIRTIO_BLK_T_IN, 0)), vec![status()], true),
        ("sector past the end", Some((VIRTIO_BLK_T_IN, 2047)), vec![data(0x1000, 1024, true), status()], true),
        ("sector overflow", Some((VIRTIO_BLK_T_IN, u64::MAX / 256)), vec![data(0x1000, 512, true), status()], true),
        ("buffer outside memory", Some((VIRTIO_BLK_T_IN, 0)), vec![data(MEM - 256, 512, true), status()], true),
        (
            "too many segments",
            Some((VIRTIO_BLK_T_IN, 0)),
            {
                let mut v = vec![];
                v.extend((0..5).map(|i| data(0x1000 + i * 512, 512, true)));
                v.push(status());
                v
            },
            true,
        ),
        ("read-only status", Some((VIRTIO_BLK_T_IN, 0)), vec![data(0x1000, 512, true), data(0x200, 1, false)], false),
        (
            "status outside memory",
            Some((VIRTIO_BLK_T_IN, 0)),
            vec![data(0x1000, 512, true), data(MEM + 10, 1, true)],
            false,
        ),
        ("header writable", None, vec![data(0x100, 16, true), data(0x1000, 512, true), status()], true),
        ("header short", None, vec![data(0x100, 8, false), status()], true),
        ("status only", None, vec![status()], true),
    ];
    for (what, start, rest, has_status) in cases {
        let descs: Vec<Desc> = start.map(|(t, sector)| header(&mem, t, sector)).into_iter().chain(rest).collect();
        let err = parse(&descs, &mem, &l).expect_err(what);
        assert_eq!(err.status.is_some(), has_status, "{what}: {err}");
    }
    assert!(parse(&[], &mem, &l).unwrap_err().status.is_none());
    let cut_short = Desc { has_next: true, ..status() };
    assert!(parse(&[header(&mem, VIRTIO_BLK_T_IN, 0), data(0x1000, 512, true), cut_short], &mem, &l)
        .unwrap_err()
        .status
        .is_none());
    let ro = Limits { read_only: true, ..l };
    assert!(parse(&[header(&mem, VIRTIO_BLK_T_OUT, 0), data(0x1000, 512, false), status()], &mem, &ro).is_err());
}

#[test]
fn discard_and_write_zeroes_segments() {
    let mem = memory();
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&16u64.to_le_bytes());
    seg[8..12].copy_from_slice(&8u32.to_le_bytes());
    seg[12..16].copy_from_slice(&1u32.to_le_bytes());
    mem.write_slice(&seg, GuestAddress(0x1000)).unwrap();
    let parsed =
        parse(&[header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0), data(0x1000, 16, false), status()], &mem, &limits())
            .unwrap();
    assert_eq!(parsed.request, Request::WriteZeroes { ranges: vec![(8192, 4096)], unmap: true });
    let parsed =
        parse(&[header(&mem, VIRTIO_BLK_T_DISCARD, 0), data(0x1000, 16, false), status()], &mem, &limits()).unwrap();
    assert_eq!(parsed.request, Request::Discard { ranges: vec![(8192, 4096)] });
    seg[0..8].copy_from_slice(&2047u64.to_le_bytes());
    mem.write_slice(&seg, GuestAddress(0x1000)).unwrap();
    assert!(
        parse(&[header(&mem, VIRTIO_BLK_T_DISCARD, 0), data(0x1000, 16, false), status()], &mem, &limits()).is_err()
    );
    assert!(
        parse(&[header(&mem, VIRTIO_BLK_T_DISCARD, 0), data(0x1000, 12, false), status()], &mem, &limits()).is_err()
    );
}

#[test]
fn vendor_requests_and_unknown_types() {
    let mem = memory();
    mem.write_slice(b"before-upgrade", GuestAddress(0x1000)).unwrap();
    let add =
        parse(&[header(&mem, VIRTIO_BLK_T_REWIND_MARKER_ADD, 0), data(0x1000, 14, false), status()], &mem, &limits())
            .unwrap();
    assert_eq!(add.request, Request::MarkerAdd { name: b"before-upgrade".to_vec() });
    let get = parse(
        &[header(&mem, VIRTIO_BLK_T_REWIND_MARKER_GET, 0), data(0x1000, 14, false), data(0x2000, 256, true), status()],
        &mem,
        &limits(),
    )
    .unwrap();
    assert_eq!(
        get.request,
        Request::MarkerGet { name: Some(b"before-upgrade".to_vec()), reply: vec![(GuestAddress(0x2000), 256)] }
    );
    let newest =
        parse(&[header(&mem, VIRTIO_BLK_T_REWIND_MARKER_GET, 0), data(0x2000, 256, true), status()], &mem, &limits())
            .unwrap();
    assert_eq!(newest.request, Request::MarkerGet { name: None, reply: vec![(GuestAddress(0x2000), 256)] });
    assert!(parse(
        &[header(&mem, VIRTIO_BLK_T_REWIND_MARKER_GET, 0), data(0x1000, 14, false), status()],
        &mem,
        &limits()
    )
    .is_err());
    let unknown = parse(&[header(&mem, 99, 0), status()], &mem, &limits()).unwrap();
    assert_eq!(unknown.request, Request::Unsupported { request_type: 99 });
}

#[test]
fn config_space_layout() {
    let config = ConfigSpace {
        capacity_sectors: 2048,
        seg_max: 126,
        blk_size: 512,
        physical_block_size: 4096,
        writeback: true,
        num_queues: 2,
        max_discard_sectors: 1 << 20,
        max_discard_segments: 1,
    };
    let b = config.to_bytes();
    assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), 2048);
    assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 126);
    assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 512);
    assert_eq!(b[24], 3, "4096-byte physical blocks are 2^3 logical blocks");
    assert_eq!(u16::from_le_bytes(b[26..28].try_into().unwrap()), 8);
    assert_eq!(b[32], 1);
    assert_eq!(u16::from_le_bytes(b[34..36].try_into().unwrap()), 2);
    assert_eq!(u32::from_le_bytes(b[36..40].try_into().unwrap()), 1 << 20);
}
