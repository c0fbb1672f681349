//! The replica a store ships to, remembered in the store's directory (`replica.json`), so that
//! offline commands can say what the replica holds without being told its URL.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

/// In the store's directory.
pub const FILE: &str = "replica.json";

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Remembered {
    url: String,
}

/// Records that the store in `store_dir` ships to `url` (replacing what was recorded).
pub fn remember(store_dir: &Path, url: &str) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(&Remembered { url: url.to_string() })
        .map_err(|e| Error::Io { context: format!("encoding {FILE}"), cause: e.into() })?;
    rewind_engine::fsutil::write_atomically(&store_dir.join(FILE), &bytes)?;
    Ok(())
}

/// The URL the store in `store_dir` was last served with `--replicate` to, if any.
pub fn remembered(store_dir: &Path) -> Result<Option<String>> {
    let path = store_dir.join(FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).context(|| format!("reading {}", path.display())),
    };
    let remembered: Remembered = serde_json::from_slice(&bytes)
        .map_err(|e| Error::Io { context: format!("decoding {}", path.display()), cause: e.into() })?;
    Ok(Some(remembered.url))
}
