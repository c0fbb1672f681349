//! A `file:///DIR` replica: one file per object, at `DIR/KEY`, the layout object_store's local
//! store uses, so replicas it wrote read the same.
//!
//! Written here rather than through object_store because the replica must survive the host's
//! power loss like the bucket would: an object is written to a hidden partial file, synced,
//! renamed into place, and its directory synced, before the call returns, so a manifest
//! (written last) never lists an object a crash can take back. object_store's local store syncs
//! nothing. A stored object's pages are dropped from the page cache once synced: the replica is
//! written once and read on another day, and the freed pages hold the next object's bytes
//! (fresh pages cost several times more on virtual machines that return free memory).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use rewind_engine::fsutil;

use crate::remote::Listed;

/// Partial files start with this; listings skip every hidden file, and files object_store's
/// local store left half-written (named `KEY#N`).
const PARTIAL_PREFIX: &str = ".partial.";

#[derive(Debug)]
pub struct Directory {
    root: PathBuf,
    /// The number of the newest put of each key. A put whose caller timed out goes on in its
    /// thread (a blocking write cannot be cancelled); when it ends after a newer put of the same
    /// key began, it must not rename its older bytes over the newer ones (a manifest going back
    /// to name objects since deleted).
    newest_put: Mutex<HashMap<String, u64>>,
}

/// Numbers puts, which also keeps their partial files apart.
static PUTS: AtomicU64 = AtomicU64::new(0);

impl Directory {
    pub fn open(root: PathBuf) -> io::Result<Self> {
        let directory = Self { root, newest_put: Mutex::default() };
        directory.create_durably(&directory.root)?;
        // Best effort: readers may open a replica on a read-only mount.
        if let Err(e) = directory.sync_folders() {
            log::warn!("replica: cannot sync the folders of {}: {e}", directory.root.display());
        }
        Ok(directory)
    }

    /// Syncs the root and every folder under it: a process killed after creating a folder and
    /// before syncing its parent leaves a folder whose entry a power loss would take, and later
    /// puts into it sync only the folder itself.
    fn sync_folders(&self) -> io::Result<()> {
        let mut pending = vec![self.root.clone()];
        while let Some(dir) = pending.pop() {
            fsutil::sync_dir_entries(&dir)?;
            for entry in fs::read_dir(&dir)? {
                let entry = entry?;
                if entry.file_type()?.is_dir() {
                    pending.push(entry.path());
                }
            }
        }
        Ok(())
    }

    /// The file of `key`, which must be a relative path of plain names (keys come from the
    /// layout and from listings; nothing may point outside the directory).
    fn path(&self, key: &str) -> io::Result<PathBuf> {
        let relative = Path::new(key);
        let plain = relative.components().all(|c| matches!(c, Component::Normal(_)));
        if key.is_empty() || !plain {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("not an object key: {key:?}")));
        }
        Ok(self.root.join(relative))
    }

    /// Stores `bytes` as `key`, durably (see the module documentation), replacing any object
    /// of that key at once.
    pub fn put(&self, key: &str, bytes: &[u8]) -> io::Result<()> {
        let put = self.begin_put(key);
        self.finish_put(key, put, bytes)
    }

    /// Numbers a put of `key`, which makes every put of it begun before stale.
    fn begin_put(&self, key: &str) -> u64 {
        let put = PUTS.fetch_add(1, Ordering::Relaxed);
        self.newest_puts().insert(key.to_string(), put);
        put
    }

    /// Stores `bytes` as `key` for put number `put`, unless a newer put of `key` began.
    fn finish_put(&self, key: &str, put: u64, bytes: &[u8]) -> io::Result<()> {
        let stored = self.store(key, put, bytes);
        // Forgotten once done (keys are mostly used once); a put still running then finds no
        // number and stores nothing.
        let mut newest = self.newest_puts();
        if newest.get(key) == Some(&put) {
            newest.remove(key);
        }
        stored
    }

    fn store(&self, key: &str, put: u64, bytes: &[u8]) -> io::Result<()> {
        let path = self.path(key)?;
        let parent = path.parent().unwrap_or(&self.root);
        self.create_durably(parent)?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let partial = parent.join(format!("{PARTIAL_PREFIX}{name}.{}.{put}", std::process::id()));
        let written = (|| {
            let mut file = File::create(&partial)?;
            file.write_all(bytes)?;
            file.sync_data()?;
            if let Err(e) = fsutil::drop_from_cache(&file, bytes.len() as u64) {
                log::debug!("replica: cannot drop {} from the page cache: {e}", partial.display());
            }
            {
                // The check and the rename under one lock: no newer put of the key renames
                // in between.
                let newest = self.newest_puts();
                if newest.get(key) != Some(&put) {
                    return Err(io::Error::other(format!("{key}: a newer write of it began; this one is dropped")));
                }
                fs::rename(&partial, &path)?;
            }
            fsutil::sync_dir_entries(parent)
        })();
        if written.is_err() {
            let _ = fs::remove_file(&partial);
        }
        written
    }

    fn newest_puts(&self) -> MutexGuard<'_, HashMap<String, u64>> {
        // Single inserts and reads: a panic elsewhere cannot leave the map half changed.
        self.newest_put.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Creates `dir` and whatever of its ancestors is missing, each made durable in its parent.
    fn create_durably(&self, dir: &Path) -> io::Result<()> {
        let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.is_dir()).collect();
        if missing.is_empty() {
            return Ok(());
        }
        fs::create_dir_all(dir)?;
        for created in missing.iter().rev() {
            fsutil::sync_dir_entries(fsutil::parent_dir(created))?;
        }
        Ok(())
    }

    pub fn get(&self, key: &str) -> io::Result<Vec<u8>> {
        fs::read(self.path(key)?)
    }

    /// Every object under `prefix` (a folder such as `journal/`), at any depth; none when the
    /// folder does not exist.
    pub fn list(&self, prefix: &str) -> io::Result<Vec<Listed>> {
        let mut listed = Vec::new();
        let folder = prefix.trim_matches('/');
        let start = if folder.is_empty() { self.root.clone() } else { self.path(folder)? };
        let mut pending = vec![(start, folder.to_string())];
        while let Some((dir, key_prefix)) = pending.pop() {
            let entries = match fs::read_dir(&dir) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                other => other?,
            };
            for entry in entries {
                let entry = entry?;
                let Ok(name) = entry.file_name().into_string() else { continue };
                if name.starts_with('.') || name.contains('#') {
                    continue;
                }
                let key = if key_prefix.is_empty() { name } else { format!("{key_prefix}/{name}") };
                let kind = entry.file_type()?;
                if kind.is_dir() {
                    pending.push((entry.path(), key));
                } else if kind.is_file() {
                    match entry.metadata() {
                        Ok(metadata) => listed.push(Listed { key, size: metadata.len() }),
                        // Deleted since the directory was read.
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        listed.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(listed)
    }

    pub fn delete(&self, key: &str) -> io::Result<()> {
        fs::remove_file(self.path(key)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn directory() -> (tempfile::TempDir, Directory) {
        let dir = tempfile::tempdir().unwrap();
        let directory = Directory::open(dir.path().join("replica")).unwrap();
        (dir, directory)
    }

    #[test]
    fn objects_round_trip_and_list_by_folder_without_partial_files() {
        let (_dir, directory) = directory();
        directory.put("rewind-replica.json", b"{}").unwrap();
        directory.put("journal/1-5", b"first").unwrap();
        directory.put("journal/6-9", b"second!").unwrap();
        directory.put("journal/6-9", b"replaced").unwrap();
        directory.put("base/7-0", b"part").unwrap();
        // What a crash mid-put, or object_store's local store, can leave behind.
        fs::write(directory.root.join("journal/.partial.10-12.77.3"), b"cut").unwrap();
        fs::write(directory.root.join("journal/10-12#3"), b"cut").unwrap();

        assert_eq!(directory.get("journal/6-9").unwrap(), b"replaced");
        let journal = directory.list("journal/").unwrap();
        let expected =
            vec![Listed { key: "journal/1-5".into(), size: 5 }, Listed { key: "journal/6-9".into(), size: 8 }];
        assert_eq!(journal, expected);
        let all: Vec<String> = directory.list("").unwrap().into_iter().map(|l| l.key).collect();
        assert_eq!(all, ["base/7-0", "journal/1-5", "journal/6-9", "rewind-replica.json"]);
        assert!(directory.list("snapshots").unwrap().is_empty());

        directory.delete("journal/1-5").unwrap();
        assert_eq!(directory.get("journal/1-5").unwrap_err().kind(), io::ErrorKind::NotFound);
        assert_eq!(directory.delete("journal/1-5").unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    /// A put that ends after a newer put of the same key began (its caller timed out while a
    /// blocking write went on) leaves the newer bytes, and no partial file.
    #[test]
    fn a_put_overtaken_by_a_newer_one_of_the_same_key_stores_nothing() {
        let (_dir, directory) = directory();
        let older = directory.begin_put("rewind-replica.json");
        let newer = directory.begin_put("rewind-replica.json");
        directory.finish_put("rewind-replica.json", newer, b"newer").unwrap();
        assert!(directory.finish_put("rewind-replica.json", older, b"older").is_err());
        assert_eq!(directory.get("rewind-replica.json").unwrap(), b"newer");
        let other = directory.begin_put("journal/1-5");
        directory.finish_put("journal/1-5", other, b"another key is not affected").unwrap();
        let files: Vec<_> = fs::read_dir(&directory.root).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(files.len(), 2, "{files:?}");
    }

    #[test]
    fn keys_cannot_leave_the_directory() {
        let (dir, directory) = directory();
        for key in ["../outside", "/etc/passwd", "journal/../../outside", ""] {
            let error = directory.put(key, b"x").unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::InvalidInput, "{key}");
            assert_eq!(directory.get(key).unwrap_err().kind(), io::ErrorKind::InvalidInput, "{key}");
        }
        assert!(!dir.path().join("outside").exists());
    }
}
