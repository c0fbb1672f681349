//! Names: in `data-and-metadata`, a create, rename or unlink is durable only once a directory
//! it touches was fsynced; in `data`, names are always kept.

mod common;

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use common::*;
use crashfs::Model;

type Tree = std::collections::BTreeMap<String, Option<Vec<u8>>>;

fn file(name: &str, content: &[u8]) -> (String, Option<Vec<u8>>) {
    (name.to_string(), Some(content.to_vec()))
}

fn dir(name: &str) -> (String, Option<Vec<u8>>) {
    (name.to_string(), None)
}

/// A file created, written and fsynced, with its directory never fsynced.
fn created_and_synced(fx: &Fixture) {
    let path = fx.path("f");
    fs::write(&path, b"synced").unwrap();
    fsync(&path);
    write_at(&path, 0, b"SYNCED, then changed");
}

#[test]
fn fsync_of_a_new_file_does_not_make_its_name_durable() {
    let Some(fx) = Fixture::new(Model::DataAndMetadata) else { return };
    created_and_synced(&fx);
    let report = fx.mount.crash().unwrap();
    assert_eq!(report.entries_reverted, 1, "{report}");
    assert_eq!(tree(&fx.path("")), Tree::new());
    assert!(!fx.backing("f").exists());
}

#[test]
fn data_model_keeps_the_new_name_with_its_synced_content() {
    let Some(fx) = Fixture::new(Model::Data) else { return };
    created_and_synced(&fx);
    fx.mount.crash().unwrap();
    assert_eq!(tree(&fx.path("")), [file("f", b"synced")].into());
}

#[test]
fn fsync_of_the_directory_makes_the_name_durable() {
    let Some(fx) = Fixture::new(Model::DataAndMetadata) else { return };
    created_and_synced(&fx);
    fsync_dir(&fx.path(""));
    fx.mount.crash().unwrap();
    assert_eq!(tree(&fx.path("")), [file("f", b"synced")].into());
}

/// `a` and `b` durable with their contents.
fn two_files(fx: &Fixture) {
    fs::write(fx.path("a"), b"aaa").unwrap();
    fs::write(fx.path("b"), b"bbb").unwrap();
    fsync(&fx.path("a"));
    fsync(&fx.path("b"));
    fsync_dir(&fx.path(""));
}

#[test]
fn rename_over_an_existing_file_is_reverted_until_the_directory_is_synced() {
    let Some(fx) = Fixture::new(Model::DataAndMetadata) else { return };
    two_files(&fx);
    fs::rename(fx.path("a"), fx.path("b")).unwrap();
    assert_eq!(tree(&fx.path("")), [file("b", b"aaa")].into());
    fx.mount.crash().unwrap();
    assert_eq!(tree(&fx.path("")), [file("a", b"aaa"), file("b", b"bbb")].into());

    fs::rename(fx.path("a"), fx.path("b")).unwrap();
    fsync_dir(&fx.path(""));
    fx.mount.crash().unwrap();
    assert_eq!(tree(&fx.path("")), [file("b", b"aaa")].into());
    assert_eq!(fs::read_dir(fx.backing(".crashfs/trash")).unwrap().count(), 0, "the replaced file is freed");
}

#[test]
fn the_write_then_rename_idiom_without_a_directory_sync() {
    // The classic bug: new content written to a temporary file, synced, renamed over the
    // old file, and the directory never synced. The old file must come back.
    let Some(fx) = Fixture::new(Model::DataAndMetadata) else { return };
    fs::write(fx.path("config"), b"old").unwrap();
    fsync(&fx.path("config"));
    fsync_dir(&fx.path(""));
    fs::write(fx.path("config.tmp"), b"new").unwrap();
    fsync(&fx.path("config.tmp"));
    fs::rename(fx.path("config.tmp"), fx.path("config")).unwrap();
    fx.mount.crash().unwrap();
    assert_eq!(tree(&fx.path("")), [file("config", b"old")].into());
}

#[test]
fn unlink_is_reverted_with_the_durable_content() {
    let Some(fx) = Fixture::new(Model::DataAndMetadata) else { return };
    two_files(&fx);
    write_at(&fx.path("a"), 0, b"AAAA unsynced");
    fs::remove_file(fx.path("a")).unwrap();
    fx.mount.crash().unwrap();
    assert_eq!(tree(&fx.path("")), [file("a", b"aaa"), file("b", b"bbb")].into());

    fs::remove_file(fx.path("a")).unwrap();
    fsync_dir(&fx.path(""));
    fx.mount.crash().unwrap();
    assert_eq!(tree(&fx.path("")), [file("b", b"bbb")].into());
}

#[test]
fn data_model_keeps_renames_and_unlinks() {
    let Some(fx) = Fixture::new(Model::Data) else { return };
    two_files(&fx);
    fs::rename(fx.path("a"), fx.path("c")).unwrap();
    fs::remove_file(fx.path("b")).unwrap();
    fx.mount.crash().unwrap();
    assert_eq!(tree(&fx.path("")), [file("c", b"aaa")].into());
    assert_eq!(fs::read_dir(fx.backing(".crashfs/trash")).unwrap().count(), 0);
}

#[test]
fn a_new_directory_needs_its_parent_synced() {
    let Some(fx) = Fixture::new(Model::DataAndMetadata) else { return };
    fs::create_dir(fx.path("d")).unwrap();
    fs::write(fx.path("d/f"), b"in d").unwrap();
    fsync(&fx.path("d/f"));
    fsync_dir(&fx.path("d"));
    fx.mount.crash().unwrap();
    assert_eq!(tree(&fx.path("")), Tree::new(), "d itself was never made durable");

    fs::create_dir(fx.path("d")).unwrap();
    fs::write(fx.path("d/f"), b"in d").unwrap();
    fsync(&fx.path("d/f"));
    fsync_dir(&fx.path(""));
    fx.mount.crash().unwrap();
    assert_eq!(tree(&fx.path("")), [dir("d")].into(), "d/f's name was never made durable");

    fs::write(fx.path("d/f"), b"in d").unwrap();
    fsync(&fx.path("d/f"));
    fsync_dir(&fx.path("d"));
    fx.mount.crash().unwrap();
    assert_eq!(tree(&fx.path("")), [dir("d"), file("d/f", b"in d")].into());
}

#[test]
fn rmdir_and_directory_renames_are_reverted() {
    let Some(fx) = Fixture::with_backing(Model::DataAndMetadata, |backing| {
        fs::create_dir_all(backing.join("d/sub")).unwrap();
        fs::write(backing.join("d/sub/deep"), b"deep").unwrap();
        fs::create_dir(backing.join("empty")).unwrap();
    }) else {
        return;
    };
    let before = tree(&fx.path(""));
    fs::remove_dir(fx.path("empty")).unwrap();
    fs::rename(fx.path("d"), fx.path("moved")).unwrap();
    fs::rename(fx.path("moved/sub/deep"), fx.path("deep")).unwrap();
    fs::remove_dir(fx.path("moved/sub")).unwrap();
    fs::create_dir(fx.path("moved/new")).unwrap();
    fs::write(fx.path("moved/new/x"), b"x").unwrap();
    fx.mount.crash().unwrap();
    assert_eq!(tree(&fx.path("")), before);
}

#[test]
fn a_cross_directory_rename_is_atomic_and_durable_after_either_directory_is_synced() {
    for synced in ["src", "dst"] {
        let Some(fx) = Fixture::with_backing(Model::DataAndMetadata, |backing| {
            fs::create_dir(backing.join("src")).unwrap();
            fs::create_dir(backing.join("dst")).unwrap();
            fs::write(backing.join("src/f"), b"f").unwrap();
        }) else {
            return;
        };
        fs::rename(fx.path("src/f"), fx.path("dst/f")).unwrap();
        fsync_dir(&fx.path(synced));
        fx.mount.crash().unwrap();
        assert_eq!(tree(&fx.path("")), [dir("dst"), file("dst/f", b"f"), dir("src")].into(), "{synced} synced");
    }
}

#[test]
fn a_rename_whose_target_moved_away_keeps_both_files() {
    // x -> y over nothing (y was moved to z first), with only the first directory synced:
    // committing the second rename must not lose the file that used to be y.
    let Some(fx) = Fixture::with_backing(Model::DataAndMetadata, |backing| {
        fs::create_dir(backing.join("d")).unwrap();
        fs::write(backing.join("d/y"), b"old y").unwrap();
        fs::write(backing.join("x"), b"x").unwrap();
    }) else {
        return;
    };
    fs::rename(fx.path("d/y"), fx.path("z")).unwrap();
    fs::rename(fx.path("x"), fx.path("d/y")).unwrap();
    fsync_dir(&fx.path("d"));
    fx.mount.crash().unwrap();
    let files: Vec<Vec<u8>> = tree(&fx.path("")).into_values().flatten().collect();
    assert!(files.contains(&b"old y".to_vec()) && files.contains(&b"x".to_vec()), "{files:?}");
    assert_eq!(tree(&fx.path("")), [dir("d"), file("d/y", b"x"), file("z", b"old y")].into());
}

fn renameat2(from: &Path, to: &Path, flags: u32) -> std::io::Result<()> {
    let (from, to) = (CString::new(from.as_os_str().as_bytes())?, CString::new(to.as_os_str().as_bytes())?);
    // SAFETY: both paths are NUL-terminated and outlive the call.
    let rc = unsafe { libc::renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), flags) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[test]
fn rename_noreplace_and_exchange() {
    let Some(fx) = Fixture::new(Model::DataAndMetadata) else { return };
    two_files(&fx);
    let err = renameat2(&fx.path("a"), &fx.path("b"), libc::RENAME_NOREPLACE).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
    let err = renameat2(&fx.path("a"), &fx.path("b"), libc::RENAME_EXCHANGE).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    renameat2(&fx.path("a"), &fx.path("c"), libc::RENAME_NOREPLACE).unwrap();
    assert_eq!(tree(&fx.path("")), [file("b", b"bbb"), file("c", b"aaa")].into());
}

#[test]
fn o_excl_and_the_hidden_directory() {
    let Some(fx) = Fixture::new(Model::DataAndMetadata) else { return };
    fs::write(fx.path("a"), b"a").unwrap();
    let err = fs::OpenOptions::new().write(true).create_new(true).open(fx.path("a")).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
    assert!(fx.backing(".crashfs").is_dir());
    assert!(!fx.path(".crashfs").exists());
    assert_eq!(fs::create_dir(fx.path(".crashfs")).unwrap_err().raw_os_error(), Some(libc::EPERM));
    assert_eq!(tree(&fx.path("")), [file("a", b"a")].into());
}
