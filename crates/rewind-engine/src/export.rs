//! Point-in-time exports: a [`PointView`] made writable by an overlay, so a second machine can
//! boot the point (fsck, start its services) without touching the store or the live volume.
//!
//! Writes go to a sparse scratch file of the volume's size, at their own offsets, and the
//! ranges written are recorded; reads of those ranges come from the overlay, the rest from the
//! view. The scratch file is removed when the export is dropped: what the guest wrote lasts
//! only as long as the export, unless it is promoted ([`PointExport::promote`]) into an image.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

use crate::error::{Error, IoContext, Result};
use crate::extent_map::{ExtentMap, ExtentSource};
use crate::fsutil;
use crate::recovery::{create_output, Progress};
use crate::store::VolumeOp;
use crate::view::PointView;
use crate::Seq;

/// A range the guest wrote: its bytes are in the overlay file at the same offset.
#[derive(Debug, Clone, Copy)]
struct Written;

impl ExtentSource for Written {
    fn skip(self, _bytes: u64) -> Self {
        self
    }
}

/// Bytes promote reads and writes at a time.
const PROMOTE_CHUNK: usize = 1 << 20;

/// A point-in-time view with a writable overlay (see the module documentation).
pub struct PointExport {
    view: PointView,
    overlay: File,
    overlay_path: PathBuf,
    written: RwLock<ExtentMap<Written>>,
}

impl PointExport {
    /// An export of `view` whose writes go to a new sparse file at `overlay_path`.
    pub fn create(view: PointView, overlay_path: &Path) -> Result<Self> {
        let overlay = create_output(overlay_path)?;
        let export =
            Self { overlay, overlay_path: overlay_path.to_path_buf(), view, written: RwLock::new(ExtentMap::new()) };
        export.overlay.set_len(export.view.volume_size()).context(|| format!("sizing {}", overlay_path.display()))?;
        Ok(export)
    }

    /// The point exported.
    pub fn seq(&self) -> Seq {
        self.view.seq()
    }

    pub fn volume_size(&self) -> u64 {
        self.view.volume_size()
    }

    pub fn view(&self) -> &PointView {
        &self.view
    }

    /// Bytes of the volume the guest has written (or zeroed) so far.
    pub fn overlay_bytes(&self) -> u64 {
        self.written_map().iter().map(|(_, len, _)| len).sum()
    }

    fn written_map(&self) -> std::sync::RwLockReadGuard<'_, ExtentMap<Written>> {
        // The map is changed by single inserts: a panic elsewhere cannot leave it half changed.
        self.written.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Carries out `ops` on the overlay, in order. The store and the live volume never see them.
    pub fn write(&self, ops: &[VolumeOp<'_>]) -> Result<()> {
        for op in ops {
            let (offset, len) = op.range();
            check_range(offset, len, self.volume_size())?;
            match op {
                VolumeOp::Write { data, .. } => {
                    let mut at = offset;
                    for piece in data.iter() {
                        self.overlay
                            .write_all_at(piece, at)
                            .context(|| format!("writing {} at {at}", self.overlay_path.display()))?;
                        at += piece.len() as u64;
                    }
                }
                VolumeOp::WriteZeroes { .. } | VolumeOp::Discard { .. } => {
                    fsutil::zero_range(&self.overlay, offset, len)
                        .context(|| format!("zeroing {} at {offset}", self.overlay_path.display()))?;
                }
            }
            // Recorded only once the bytes are in the overlay, so a concurrent read of the
            // range gets either the point's bytes or the new ones, never a hole.
            self.written.write().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(offset, len, Written);
        }
        Ok(())
    }

    /// Reads the volume as the guest of the export sees it: the overlay where it wrote, the
    /// point elsewhere.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = check_range(offset, buf.len() as u64, self.volume_size())?;
        let written = self.written_map();
        let mut pos = offset;
        for (start, len, Written) in written.overlapping(offset, end) {
            if start > pos {
                self.view.read(pos, &mut buf[(pos - offset) as usize..(start - offset) as usize])?;
                pos = start;
            }
            let piece_end = (start + len).min(end);
            self.overlay
                .read_exact_at(&mut buf[(pos - offset) as usize..(piece_end - offset) as usize], pos)
                .context(|| format!("reading {} at {pos}", self.overlay_path.display()))?;
            pos = piece_end;
        }
        if pos < end {
            self.view.read(pos, &mut buf[(pos - offset) as usize..])?;
        }
        Ok(())
    }

    /// Writes the export as its guest sees it now (the point plus the overlay) into a new image
    /// at `output`, holes where it reads zeroes. The export keeps serving meanwhile; a write
    /// racing the copy of its range may or may not be in the image. The output is removed on
    /// failure, and when `stop` is set ([`Error::Cancelled`]). Returns the data bytes written.
    pub fn promote(&self, output: &Path, progress: Progress<'_>, stop: &AtomicBool) -> Result<u64> {
        let file = create_output(output)?;
        let volume_size = self.volume_size();
        let mut copy = || -> Result<u64> {
            file.set_len(volume_size).context(|| format!("sizing {}", output.display()))?;
            let mut chunk = vec![0u8; PROMOTE_CHUNK];
            let mut data_bytes = 0;
            let mut pos = 0;
            while pos < volume_size {
                if stop.load(Ordering::Relaxed) {
                    return Err(Error::Cancelled);
                }
                let n = (volume_size - pos).min(PROMOTE_CHUNK as u64) as usize;
                self.read(pos, &mut chunk[..n])?;
                // The new image is sparse: ranges that read as zeroes stay holes.
                if chunk[..n].iter().any(|&b| b != 0) {
                    file.write_all_at(&chunk[..n], pos).context(|| format!("writing {}", output.display()))?;
                    data_bytes += n as u64;
                }
                pos += n as u64;
                progress(pos, volume_size);
            }
            file.sync_all().context(|| format!("syncing {}", output.display()))?;
            Ok(data_bytes)
        };
        copy().inspect_err(|_| {
            let _ = std::fs::remove_file(output);
        })
    }
}

impl Drop for PointExport {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.overlay_path) {
            log::warn!("cannot remove the export overlay {}: {e}", self.overlay_path.display());
        }
    }
}

fn check_range(offset: u64, len: u64, volume_size: u64) -> Result<u64> {
    match offset.checked_add(len) {
        Some(end) if end <= volume_size => Ok(end),
        _ => Err(Error::OutOfRange { offset, len, volume_size }),
    }
}
