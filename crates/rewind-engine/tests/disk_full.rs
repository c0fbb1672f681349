//! A full disk: the failing append reports an error, nothing acknowledged is lost, and the
//! store works again once there is room. In a test binary of its own: it runs `mount`, and a
//! child forked while another test thread holds a store's lock would briefly hold it too.

use std::fs;
use std::path::Path;

use rewind_engine::recovery::RecoveryTarget;
use rewind_engine::{CreateOptions, Store};

/// Fills a small tmpfs until an append fails, then checks nothing acknowledged was lost and
/// the store works again once there is room. Needs root for the mount; without it the test
/// says so and checks nothing.
#[test]
fn a_full_disk_fails_the_write_and_loses_nothing() {
    let mount = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(mount.path())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIPPED: cannot mount a tmpfs here (not root?)");
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(mount.path());

    let image = mount.path().join("disk.img");
    let options = CreateOptions { size: Some(256 * 1024), segment_capacity: 64 * 1024, ..Default::default() };
    let (store, _) = Store::create(&image, None, &options, &mut |_, _| {}).unwrap();
    // Leave little room: a filler file takes most of the space.
    let filler = mount.path().join("filler");
    let mut states = vec![vec![0u8; 256 * 1024]];
    let _ = fs::write(&filler, vec![1u8; 1024 * 1024 + 512 * 1024]);
    let mut failures = 0;
    for i in 0..400u64 {
        let offset = (i * 4096) % (256 * 1024);
        let data = vec![(i % 250) as u8 + 1; 4096];
        match store.write(offset, &data) {
            Ok(seq) => {
                let mut next = states.last().unwrap().clone();
                next[offset as usize..offset as usize + 4096].copy_from_slice(&data);
                states.push(next);
                assert_eq!(seq as usize, states.len() - 1);
            }
            Err(err) => {
                failures += 1;
                assert!(err.to_string().contains("No space left"), "unexpected error: {err}");
                // A failed write may have reached the journal before the volume refused it;
                // the head says which, and the model follows.
                if store.head() as usize == states.len() {
                    let mut next = states.last().unwrap().clone();
                    next[offset as usize..offset as usize + 4096].copy_from_slice(&data);
                    states.push(next);
                }
                if failures >= 3 {
                    break;
                }
            }
        }
    }
    assert!(failures > 0, "the disk never filled up");
    // Reads keep working, and every acknowledged write is there.
    let mut volume = vec![0u8; 256 * 1024];
    store.read(0, &mut volume).unwrap();
    fs::remove_file(&filler).unwrap();
    let seq = store.write(0, &[9u8; 512]).unwrap();
    assert_eq!(seq as usize, states.len());
    let mut next = states.last().unwrap().clone();
    next[..512].fill(9);
    states.push(next);
    store.close().unwrap();
    let (store, _) = Store::open(&image, None).unwrap();
    assert_eq!(store.head() as usize, states.len() - 1);
    assert!(fs::read(&image).unwrap() == *states.last().unwrap());
    store.verify(&mut |_, _| {}).unwrap();
    let output = mount.path().join("recovered.img");
    store.recover(&RecoveryTarget::Seq(3), &output, &mut |_, _| {}).unwrap();
    let recovered = fs::read(&output).unwrap();
    assert!(recovered == states[3]);
    store.close().unwrap();
}
