//! Interchange with the tools people run models in: Hugging Face `transformers` folders (export
//! and import) and llama.cpp's GGUF files (export).
//!
//! - [`hf_tensors`]: the one table of which kiln tensor makes which Hugging Face tensor (names,
//!   transposes, fused projections split by rows), walked in both directions.
//! - [`hf_config`]: `config.json` and `generation_config.json`, written and read.
//! - [`hf_tokenizer`]: the char tokenizer as a `tokenizer.json` and back.
//! - [`hf_export`] / [`hf_import`]: the folders.
//! - [`gguf`]: the GGUF v3 writer and llama.cpp's names, hyperparameter keys and tokenizer.
//!
//! Every file is written into a temporary sibling and renamed into place once complete and
//! synced, so an interrupted export leaves nothing that looks finished.

pub mod gguf;
mod gguf_tensors;
pub mod hf_config;
pub mod hf_export;
pub mod hf_import;
pub(crate) mod hf_tensors;
pub mod hf_tokenizer;

pub use gguf::{GgufType, export_gguf};
pub use hf_export::{HfDtype, export_hf};
pub use hf_import::import_hf;

use crate::train::checkpoint::{io_err, sync_dir, write_synced};
use crate::{Error, Result};
use std::fs;
use std::path::{Path, PathBuf};

/// Refuses an output folder that holds anything: an export or import never mixes its files
/// with others, and never replaces a folder someone may still need.
pub(crate) fn check_empty_out(out: &Path) -> Result<()> {
    if out.is_file() {
        return Err(Error::invalid(
            "--out",
            out.display(),
            "is a file; name a new folder",
        ));
    }
    if out.exists()
        && fs::read_dir(out)
            .map_err(|e| io_err(out, e))?
            .next()
            .is_some()
    {
        return Err(Error::invalid(
            "--out",
            out.display(),
            "exists and is not empty; choose a new folder or delete it",
        ));
    }
    Ok(())
}

/// Writes `files` (name, bytes) as the folder `out` (absent or empty): into a temporary sibling
/// first, each file synced, then renamed into place; on failure the temporary folder is removed.
pub(crate) fn write_folder(out: &Path, files: &[(&str, Vec<u8>)]) -> Result<PathBuf> {
    check_empty_out(out)?;
    let name = out
        .file_name()
        .map_or("export".into(), |n| n.to_string_lossy());
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
    let tmp = parent.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    }
    fs::create_dir(&tmp).map_err(|e| io_err(&tmp, e))?;
    let result = (|| {
        for (file, bytes) in files {
            write_synced(&tmp.join(file), bytes)?;
        }
        sync_dir(&tmp)?;
        if out.exists() {
            // Empty (checked above): rename cannot replace a directory on every platform.
            fs::remove_dir(out).map_err(|e| io_err(out, e))?;
        }
        fs::rename(&tmp, out).map_err(|e| io_err(&tmp, e))?;
        sync_dir(parent)
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result.map(|()| out.to_path_buf())
}

/// Pretty JSON bytes of `v`, newline-terminated.
pub(crate) fn json_bytes(v: &serde_json::Value) -> Vec<u8> {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
    s.push('\n');
    s.into_bytes()
}
