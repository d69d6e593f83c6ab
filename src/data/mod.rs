//! The data layer: read a corpus, turn it into token ids once (cached beside the corpus), split
//! it into training and validation ids, and draw batches that any step can recompute.
//!
//! - [`Tokenizer`]: [`CharTokenizer`] (one id per distinct character) or [`BpeTokenizer`]
//!   (byte-level BPE in Hugging Face's `tokenizer.json` format, trained on the corpus).
//! - [`read_corpus`] / [`read_corpus_bytes`]: the corpus as text (char) or bytes (BPE).
//! - [`Dataset`]: the token ids, split as nanoGPT splits them, with [`Dataset::train_batch`] and
//!   [`Dataset::val_batches`].

mod bpe;
mod char;
mod dataset;
mod tokenizer;

pub use bpe::BpeTokenizer;
pub(crate) use bpe::byte_chars as bpe_byte_chars;
pub use char::CharTokenizer;
pub use dataset::{Batch, CacheOutcome, Dataset};
pub use tokenizer::Tokenizer;

use crate::{Error, Result};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::Path;

/// Reads a corpus as UTF-8 text, for the char tokenizer. Errors, each saying what to do, for a
/// missing file, an empty file and a file that is not UTF-8 (naming the byte offset of the first
/// invalid byte).
pub fn read_corpus(path: &Path) -> Result<String> {
    let bytes = read_corpus_bytes(path)?;
    tokenizer::utf8_for_char(&bytes, &format!("corpus {}", path.display()))?;
    Ok(String::from_utf8(bytes).expect("checked just above"))
}

/// Reads a corpus as bytes, for the BPE tokenizer, which takes any. Errors, saying what to do,
/// for a missing or empty file.
pub fn read_corpus_bytes(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::data(format!(
                "corpus {} does not exist; check the path given with --data (or data.path in \
                 the config)",
                path.display()
            ))
        } else if path.is_dir() {
            Error::data(format!(
                "corpus {} is a folder; give a text file (--data FILE)",
                path.display()
            ))
        } else {
            Error::Io {
                path: path.display().to_string(),
                source,
            }
        }
    })?;
    if bytes.is_empty() {
        return Err(Error::data(format!(
            "corpus {} is empty (0 bytes); fill it with training text or point data.path at \
             another file",
            path.display()
        )));
    }
    Ok(bytes)
}

/// SHA-256 of `parts`, each prefixed by its length so that no two lists of parts collide by
/// concatenation.
fn digest(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(&h.finalize());
    out
}

/// The first 8 bytes of a digest as 16 hex digits: a file name.
fn hex16(d: &[u8; 32]) -> String {
    d[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `path` so that readers see the old file or the complete new one: a temporary file in
/// the same directory, flushed to disk, then renamed over `path`.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// [`write_atomic`] with the contents produced by `write`.
pub(crate) fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |source| Error::Io { path: p, source }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::data(format!("{} names no file", path.display())))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    // Unique per process and moment, so concurrent writers never share a temporary file.
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{nanos}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        let mut w = std::io::BufWriter::new(file);
        write(&mut w).map_err(io(&tmp))?;
        let file = w.into_inner().map_err(|e| io(&tmp)(e.into_error()))?;
        file.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    // The rename is durable only once the directory is; not every platform lets a directory be
    // opened for this, and the data itself is already safe, so failure here is ignored.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
