// Each test file uses a different part of these helpers.
#![allow(dead_code)]

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crashfs::{Model, Mount};

/// A fresh directory under /tmp, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "crashfs-test-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::SeqCst)
        ));
        fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub fn fuse_available() -> bool {
    if Path::new("/dev/fuse").exists() {
        return true;
    }
    eprintln!("SKIPPED: /dev/fuse is missing, crashfs cannot mount here");
    false
}

/// A mount over an empty backing directory. Fields drop in order: unmount, then remove.
pub struct Fixture {
    pub mount: Mount,
    pub dir: TempDir,
}

impl Fixture {
    /// None (with a message) where FUSE is not available.
    pub fn new(model: Model) -> Option<Fixture> {
        Self::with_backing(model, |_| {})
    }

    /// `prepare` fills the backing directory before the mount: that content is durable.
    pub fn with_backing(model: Model, prepare: impl FnOnce(&Path)) -> Option<Fixture> {
        if !fuse_available() {
            return None;
        }
        let dir = TempDir::new();
        let (backing, mnt) = (dir.0.join("backing"), dir.0.join("mnt"));
        fs::create_dir(&backing).unwrap();
        fs::create_dir(&mnt).unwrap();
        prepare(&backing);
        let mount = Mount::start(&backing, &mnt, model).unwrap();
        Some(Fixture { mount, dir })
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mount.mountpoint().join(rel)
    }

    pub fn backing(&self, rel: &str) -> PathBuf {
        self.dir.0.join("backing").join(rel)
    }
}

pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let file = OpenOptions::new().write(true).create(true).truncate(false).open(path).unwrap();
    file.write_all_at(data, offset).unwrap();
}

pub fn fsync(path: &Path) {
    File::open(path).unwrap().sync_all().unwrap();
}

pub fn fdatasync(path: &Path) {
    File::open(path).unwrap().sync_data().unwrap();
}

/// fsync of a directory, the only way to make the names in it durable.
pub fn fsync_dir(path: &Path) {
    File::open(path).unwrap().sync_all().unwrap();
}

/// Deterministic bytes for a seed, different for each seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    (0..len).map(|_| rng.next() as u8).collect()
}

/// xorshift64*: enough for reproducible test inputs.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Every file under `root` (relative path -> content) and every directory (content None).
pub fn tree(root: &Path) -> std::collections::BTreeMap<String, Option<Vec<u8>>> {
    fn walk(root: &Path, dir: &Path, out: &mut std::collections::BTreeMap<String, Option<Vec<u8>>>) {
        for entry in fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let rel = path.strip_prefix(root).unwrap().to_str().unwrap().to_string();
            if entry.file_type().unwrap().is_dir() {
                out.insert(rel, None);
                walk(root, &path, out);
            } else {
                out.insert(rel, Some(fs::read(&path).unwrap()));
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(root, root, &mut out);
    out
}
