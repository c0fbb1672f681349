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

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};

use rewind_engine::fsutil;

use crate::remote::Listed;

/// Partial files start with this; listings skip every hidden file, and files object_store's
/// local store left half-written (named `KEY#N`).
const PARTIAL_PREFIX: &str = ".partial.";

#[derive(Debug)]
pub struct Directory {
    root: PathBuf,
}

impl Directory {
    pub fn open(root: PathBuf) -> io::Result<Self> {
        let directory = Self { root };
        directory.create_durably(&directory.root)?;
        Ok(directory)
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
        let path = self.path(key)?;
        let parent = path.parent().unwrap_or(&self.root);
        self.create_durably(parent)?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let partial = parent.join(format!("{PARTIAL_PREFIX}{name}"));
        let written = (|| {
            let mut file = File::create(&partial)?;
            file.write_all(bytes)?;
            file.sync_data()?;
            if let Err(e) = fsutil::drop_from_cache(&file, bytes.len() as u64) {
                log::debug!("replica: cannot drop {} from the page cache: {e}", partial.display());
            }
            fs::rename(&partial, &path)?;
            sync_directory(parent)
        })();
        if written.is_err() {
            let _ = fs::remove_file(&partial);
        }
        written
    }

    /// Creates `dir` and whatever of its ancestors is missing, each made durable in its parent.
    fn create_durably(&self, dir: &Path) -> io::Result<()> {
        let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.is_dir()).collect();
        if missing.is_empty() {
            return Ok(());
        }
        fs::create_dir_all(dir)?;
        for created in missing.iter().rev() {
            sync_directory(created.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))?;
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
                    listed.push(Listed { key, size: entry.metadata()?.len() });
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

/// Makes a directory's entries (a rename or a new file) durable.
fn sync_directory(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
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
        fs::write(directory.root.join("journal/.partial.10-12"), b"cut").unwrap();
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
