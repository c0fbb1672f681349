//! The name space as it is now and as a crash would leave it.
//!
//! The backing directory always holds the current tree, so that reads and writes are plain
//! pass-through. What a crash would bring back is kept beside it, in the hidden directory
//! `.crashfs` of the backing root: files whose last name was removed before the removal was
//! synced (trash/<ino>), and the durable bytes of pages changed since a file's last fsync
//! (undo files, see `undo`).
//!
//! Every node (file or directory) that crashfs has seen has a current location and a durable
//! one (parent inode and name; none for a removed or not yet durable name). They differ only
//! for the "pending" nodes whose name was created, renamed or removed since a directory sync
//! made it durable. Nodes never looked up are unchanged since the mount, so they are durable
//! where they are and need no record.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, Metadata};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::undo::Dirty;
use crate::{CrashReport, Model, Stats};

/// The hidden directory, in the backing root, that keeps what a crash may need.
pub(crate) const META: &str = ".crashfs";
pub(crate) const ROOT: u64 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Loc {
    parent: u64,
    name: OsString,
}

struct Node {
    cur: Option<Loc>,
    dur: Option<Loc>,
}

pub(crate) enum Handle {
    File(Arc<File>),
    Dir(Vec<DirEntry>),
}

pub(crate) struct DirEntry {
    pub ino: u64,
    pub kind: fs::FileType,
    pub name: OsString,
}

/// What a crash did, with what the kernel must forget about.
pub(crate) struct Crash {
    pub report: CrashReport,
    /// Files whose bytes or size changed.
    pub inodes: Vec<u64>,
    /// (parent, name) pairs whose entry may have changed.
    pub entries: Vec<(u64, OsString)>,
}

pub(crate) struct State {
    root: PathBuf,
    trash: PathBuf,
    undo: PathBuf,
    nodes: HashMap<u64, Node>,
    by_loc: HashMap<Loc, u64>,
    pending: BTreeSet<u64>,
    dirty: BTreeMap<u64, Dirty>,
    handles: HashMap<u64, Handle>,
    next_ino: u64,
    next_fh: u64,
    crashes: u64,
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// Removes a file or a whole directory tree.
fn remove_any(path: &Path) -> io::Result<()> {
    if fs::symlink_metadata(path)?.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
}

impl State {
    /// Takes `root` as it is as the durable state. A `.crashfs` left by an earlier run that
    /// ended without unmounting holds only what no name reaches any more, so it is removed.
    pub(crate) fn new(root: PathBuf) -> io::Result<State> {
        let meta = root.join(META);
        match remove_any(&meta) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let (trash, undo) = (meta.join("trash"), meta.join("undo"));
        fs::create_dir(&meta)?;
        fs::create_dir(&trash)?;
        fs::create_dir(&undo)?;
        let nodes = HashMap::from([(ROOT, Node { cur: None, dur: None })]);
        Ok(State {
            root,
            trash,
            undo,
            nodes,
            by_loc: HashMap::new(),
            pending: BTreeSet::new(),
            dirty: BTreeMap::new(),
            handles: HashMap::new(),
            next_ino: ROOT + 1,
            next_fh: 1,
            crashes: 0,
        })
    }

    fn is_hidden(parent: u64, name: &OsStr) -> bool {
        parent == ROOT && name == META
    }

    fn trash_path(&self, ino: u64) -> PathBuf {
        self.trash.join(ino.to_string())
    }

    /// The backing path of `ino` along its current (`dur` false) or durable locations; None
    /// if the chain breaks or loops before the root.
    fn chain_path(&self, ino: u64, dur: bool) -> Option<PathBuf> {
        let mut names = Vec::new();
        let mut at = ino;
        while at != ROOT {
            let node = self.nodes.get(&at)?;
            let loc = if dur { &node.dur } else { &node.cur };
            let loc = loc.as_ref()?;
            names.push(&loc.name);
            at = loc.parent;
            if names.len() > self.nodes.len() {
                return None;
            }
        }
        let mut path = self.root.clone();
        path.extend(names.iter().rev());
        Some(path)
    }

    /// Hops from the root to `ino` along durable locations; None if it does not hang from it.
    fn durable_depth(&self, ino: u64) -> Option<usize> {
        let mut depth = 0;
        let mut at = ino;
        while at != ROOT {
            at = self.nodes.get(&at)?.dur.as_ref()?.parent;
            depth += 1;
            if depth > self.nodes.len() {
                return None;
            }
        }
        Some(depth)
    }

    /// Where `ino` is now in the backing directory (in the trash once its name is gone).
    pub(crate) fn path(&self, ino: u64) -> io::Result<PathBuf> {
        match self.nodes.get(&ino) {
            Some(node) if ino != ROOT && node.cur.is_none() => Ok(self.trash_path(ino)),
            Some(_) => self.chain_path(ino, false).ok_or_else(|| errno(libc::ENOENT)),
            None => Err(errno(libc::ESTALE)),
        }
    }

    /// The backing path for a new name; the hidden directory's name is not available.
    pub(crate) fn child_path(&self, parent: u64, name: &OsStr) -> io::Result<PathBuf> {
        if Self::is_hidden(parent, name) {
            return Err(errno(libc::EPERM));
        }
        Ok(self.path(parent)?.join(name))
    }

    fn known(&mut self, loc: Loc) -> u64 {
        if let Some(&ino) = self.by_loc.get(&loc) {
            return ino;
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.by_loc.insert(loc.clone(), ino);
        self.nodes.insert(ino, Node { cur: Some(loc.clone()), dur: Some(loc) });
        ino
    }

    pub(crate) fn lookup(&mut self, parent: u64, name: &OsStr) -> io::Result<(u64, Metadata)> {
        if Self::is_hidden(parent, name) {
            return Err(errno(libc::ENOENT));
        }
        let loc = Loc { parent, name: name.to_owned() };
        if let Some(&ino) = self.by_loc.get(&loc) {
            return Ok((ino, fs::symlink_metadata(self.path(ino)?)?));
        }
        let md = fs::symlink_metadata(self.path(parent)?.join(name))?;
        Ok((self.known(loc), md))
    }

    /// Records a name just created in `parent`: not durable until `parent` is synced.
    pub(crate) fn created(&mut self, parent: u64, name: &OsStr) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        let loc = Loc { parent, name: name.to_owned() };
        self.by_loc.insert(loc.clone(), ino);
        self.nodes.insert(ino, Node { cur: Some(loc), dur: None });
        self.pending.insert(ino);
        ino
    }

    /// The entries of a directory, with "." and "..", the hidden directory left out.
    pub(crate) fn entries(&mut self, dir: u64) -> io::Result<Vec<DirEntry>> {
        let path = self.path(dir)?;
        let parent = self.nodes.get(&dir).and_then(|n| n.cur.as_ref()).map_or(ROOT, |loc| loc.parent);
        let kind = fs::symlink_metadata(&path)?.file_type();
        let mut entries =
            vec![DirEntry { ino: dir, kind, name: ".".into() }, DirEntry { ino: parent, kind, name: "..".into() }];
        for entry in fs::read_dir(&path)? {
            let entry = entry?;
            let name = entry.file_name();
            if Self::is_hidden(dir, &name) {
                continue;
            }
            let ino = self.known(Loc { parent: dir, name: name.clone() });
            entries.push(DirEntry { ino, kind: entry.file_type()?, name });
        }
        Ok(entries)
    }

    /// Removes a name (unlink, or rmdir when `dir`); the node goes to the trash until the
    /// removal is durable.
    pub(crate) fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> io::Result<()> {
        let (ino, md) = self.lookup(parent, name)?;
        let path = self.path(ino)?;
        match (dir, md.is_dir()) {
            (true, false) => return Err(errno(libc::ENOTDIR)),
            (false, true) => return Err(errno(libc::EISDIR)),
            (true, true) if fs::read_dir(&path)?.next().is_some() => return Err(errno(libc::ENOTEMPTY)),
            _ => {}
        }
        fs::rename(&path, self.trash_path(ino))?;
        self.unlinked(ino)
    }

    fn unlinked(&mut self, ino: u64) -> io::Result<()> {
        let Some(node) = self.nodes.get_mut(&ino) else { return Ok(()) };
        if let Some(loc) = node.cur.take() {
            self.by_loc.remove(&loc);
        }
        if node.dur.is_none() {
            self.discard(ino)
        } else {
            self.pending.insert(ino);
            Ok(())
        }
    }

    /// Forgets a node that no name reaches now or after any crash, and its trash copy.
    fn discard(&mut self, ino: u64) -> io::Result<()> {
        self.nodes.remove(&ino);
        self.pending.remove(&ino);
        self.dirty.remove(&ino);
        match remove_any(&self.trash_path(ino)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        // Durable names inside a directory that is durably gone can never come back.
        let orphans: Vec<u64> = self
            .pending
            .iter()
            .copied()
            .filter(|n| self.nodes.get(n).and_then(|n| n.dur.as_ref()).is_some_and(|d| d.parent == ino))
            .collect();
        for orphan in orphans {
            self.commit(orphan)?;
        }
        Ok(())
    }

    pub(crate) fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        no_replace: bool,
    ) -> io::Result<()> {
        let to = self.child_path(new_parent, new_name)?;
        let (ino, md) = self.lookup(parent, name)?;
        let from = self.path(ino)?;
        let target = match self.lookup(new_parent, new_name) {
            Ok((target, _)) if target == ino => return Ok(()),
            Ok(target) => Some(target),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        if let Some((target, target_md)) = &target {
            match (md.is_dir(), target_md.is_dir()) {
                _ if no_replace => return Err(errno(libc::EEXIST)),
                (false, true) => return Err(errno(libc::EISDIR)),
                (true, false) => return Err(errno(libc::ENOTDIR)),
                (true, true) if fs::read_dir(&to)?.next().is_some() => return Err(errno(libc::ENOTEMPTY)),
                _ => {}
            }
            // The replaced node must survive in the trash until the rename is durable.
            fs::rename(&to, self.trash_path(*target))?;
        }
        if let Err(e) = fs::rename(&from, &to) {
            if let Some((target, _)) = &target {
                if let Err(back) = fs::rename(self.trash_path(*target), &to) {
                    log::error!("rename failed ({e}) and {} could not be put back: {back}", to.display());
                }
            }
            return Err(e);
        }
        if let Some((target, _)) = target {
            self.unlinked(target)?;
        }
        let loc = Loc { parent: new_parent, name: new_name.to_owned() };
        self.by_loc.insert(loc.clone(), ino);
        if let Some(node) = self.nodes.get_mut(&ino) {
            if let Some(old) = node.cur.replace(loc) {
                self.by_loc.remove(&old);
            }
            if node.cur == node.dur {
                self.pending.remove(&ino);
            } else {
                self.pending.insert(ino);
            }
        }
        Ok(())
    }

    /// A directory fsync: every pending name change into or out of `dir` becomes durable.
    pub(crate) fn fsync_dir(&mut self, dir: u64) -> io::Result<()> {
        let touches = |node: &Node| [&node.cur, &node.dur].into_iter().flatten().any(|loc| loc.parent == dir);
        let affected: Vec<u64> =
            self.pending.iter().copied().filter(|n| self.nodes.get(n).is_some_and(touches)).collect();
        for ino in affected {
            self.commit(ino)?;
        }
        Ok(())
    }

    /// Makes the current location of `ino` its durable one, atomically: a node whose durable
    /// name it takes over moves durably to its own current location too (or is gone).
    fn commit(&mut self, ino: u64) -> io::Result<()> {
        if !self.pending.remove(&ino) {
            return Ok(());
        }
        let Some(node) = self.nodes.get_mut(&ino) else { return Ok(()) };
        node.dur = node.cur.clone();
        let Some(loc) = node.dur.clone() else { return self.discard(ino) };
        let displaced: Vec<u64> = self
            .pending
            .iter()
            .copied()
            .filter(|n| self.nodes.get(n).is_some_and(|node| node.dur.as_ref() == Some(&loc)))
            .collect();
        for other in displaced {
            self.commit(other)?;
        }
        Ok(())
    }

    pub(crate) fn fsync_file(&mut self, ino: u64) {
        self.dirty.remove(&ino);
    }

    /// Called before `[start, end)` of the file `ino` changes, or its size does: keeps what a
    /// crash must restore.
    pub(crate) fn track(&mut self, ino: u64, file: &File, start: u64, end: u64) -> io::Result<()> {
        if !self.nodes.contains_key(&ino) {
            // Gone for good (a durable removal while it was open): no crash brings it back.
            return Ok(());
        }
        let dirty = match self.dirty.entry(ino) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => entry.insert(Dirty::new(file.metadata()?.len())),
        };
        dirty.save(file, start, end, &self.undo.join(ino.to_string()))
    }

    pub(crate) fn sync_all(&mut self) -> io::Result<()> {
        self.commit_all()?;
        self.dirty.clear();
        Ok(())
    }

    fn commit_all(&mut self) -> io::Result<()> {
        while let Some(&ino) = self.pending.first() {
            self.commit(ino)?;
        }
        Ok(())
    }

    pub(crate) fn stats(&self) -> io::Result<Stats> {
        let mut stats =
            Stats { unsynced_files: self.dirty.len(), pending_entries: self.pending.len(), unsynced_bytes: 0 };
        for (&ino, dirty) in &self.dirty {
            let size = fs::symlink_metadata(self.path(ino)?)?.len();
            stats.unsynced_bytes += dirty.saved_bytes() + size.saturating_sub(dirty.durable_size());
        }
        Ok(stats)
    }

    /// Drops everything not durable under `model`. Handles stay open: the workload is meant to
    /// be dead by now, and a reader that is not still sees the new state.
    pub(crate) fn crash(&mut self, model: Model) -> io::Result<Crash> {
        self.crashes += 1;
        let mut report = CrashReport { model, ..CrashReport::default() };
        let mut entries = Vec::new();
        for node in self.pending.iter().filter_map(|n| self.nodes.get(n)) {
            entries.extend([&node.cur, &node.dur].into_iter().flatten().map(|loc| (loc.parent, loc.name.clone())));
        }
        match model {
            Model::DataAndMetadata => self.revert_names(&mut report)?,
            Model::Data | Model::Torn { .. } => self.commit_all()?,
        }
        let mut inodes = Vec::new();
        for (ino, dirty) in std::mem::take(&mut self.dirty) {
            let file = fs::OpenOptions::new().read(true).write(true).open(self.path(ino)?)?;
            let crash = self.crashes;
            let reverted = dirty.revert(&file, |page| match model {
                Model::Torn { seed } => survives(seed, crash, ino, page),
                Model::Data | Model::DataAndMetadata => false,
            })?;
            report.files_reverted += 1;
            report.bytes_restored += reverted.bytes;
            report.sizes_reverted += u64::from(reverted.size_changed);
            report.pages_kept += reverted.pages_kept;
            inodes.push(ino);
        }
        Ok(Crash { report, inodes, entries })
    }

    /// Puts every name back where the last directory syncs left it.
    fn revert_names(&mut self, report: &mut CrashReport) -> io::Result<()> {
        let pending: Vec<u64> = std::mem::take(&mut self.pending).into_iter().collect();
        report.entries_reverted = pending.len() as u64;

        // Out of the tree into the trash, deepest first so that no move carries another away.
        let mut out: Vec<(usize, u64)> =
            pending.iter().filter_map(|&ino| Some((self.chain_path(ino, false)?.components().count(), ino))).collect();
        out.sort_unstable_by(|a, b| b.cmp(a));
        for (_, ino) in out {
            fs::rename(self.path(ino)?, self.trash_path(ino))?;
            if let Some(loc) = self.nodes.get_mut(&ino).and_then(|node| node.cur.take()) {
                self.by_loc.remove(&loc);
            }
        }

        // Back to their durable names, parents first.
        let mut back: Vec<(usize, u64)> =
            pending.iter().filter_map(|&ino| Some((self.durable_depth(ino)?, ino))).collect();
        back.sort_unstable();
        for (_, ino) in back {
            let Some(loc) = self.nodes.get(&ino).and_then(|node| node.dur.clone()) else { continue };
            let parent = self.chain_path(loc.parent, true).ok_or_else(|| errno(libc::ENOENT))?;
            fs::rename(self.trash_path(ino), parent.join(&loc.name))?;
            self.by_loc.insert(loc.clone(), ino);
            if let Some(node) = self.nodes.get_mut(&ino) {
                node.cur = Some(loc);
            }
        }

        // Whatever does not hang from the root any more is gone, with all it contained.
        let gone: Vec<u64> =
            self.nodes.keys().copied().filter(|&ino| ino != ROOT && self.durable_depth(ino).is_none()).collect();
        for ino in gone {
            if let Some(loc) = self.nodes.remove(&ino).and_then(|node| node.cur) {
                self.by_loc.remove(&loc);
            }
            self.dirty.remove(&ino);
        }
        for entry in fs::read_dir(&self.trash)? {
            remove_any(&entry?.path())?;
        }
        Ok(())
    }

    pub(crate) fn remove_meta(&self) -> io::Result<()> {
        remove_any(&self.root.join(META))
    }

    pub(crate) fn open_handle(&mut self, handle: Handle) -> u64 {
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, handle);
        fh
    }

    pub(crate) fn handle(&self, fh: u64) -> io::Result<&Handle> {
        self.handles.get(&fh).ok_or_else(|| errno(libc::EBADF))
    }

    pub(crate) fn file(&self, fh: u64) -> io::Result<Arc<File>> {
        match self.handle(fh)? {
            Handle::File(file) => Ok(file.clone()),
            Handle::Dir(_) => Err(errno(libc::EISDIR)),
        }
    }

    pub(crate) fn close_handle(&mut self, fh: u64) {
        self.handles.remove(&fh);
    }
}

/// Whether a page of the `torn` model keeps its new content: a hash, so that the same seed
/// and workload give the same pages whatever order they are visited in.
fn survives(seed: u64, crash: u64, ino: u64, page: u64) -> bool {
    fn mix(mut z: u64) -> u64 {
        // splitmix64's finaliser.
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    mix(seed ^ mix(crash ^ mix(ino ^ mix(page)))) & 1 == 1
}
