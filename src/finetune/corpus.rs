//! A fine-tuning corpus read with the base model's tokenizer.

use crate::data::{Dataset, Tokenizer};
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// Characters shown in the refusal before the rest are counted.
const SHOWN: usize = 24;

/// The corpus at `path` tokenised with `tokenizer` (the checkpoint's). A char tokenizer cannot
/// encode characters its training corpus lacked: they are all named in the error (with their
/// counts), rather than only the first one met.
pub fn dataset(
    path: &Path,
    tokenizer: Tokenizer,
    val_fraction: f64,
    block_size: usize,
) -> Result<Dataset> {
    if let Tokenizer::Char(chars) = &tokenizer {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        let mut unknown: BTreeMap<char, usize> = BTreeMap::new();
        for c in text.chars().filter(|&c| chars.id(c).is_none()) {
            *unknown.entry(c).or_default() += 1;
        }
        if !unknown.is_empty() {
            let mut list: Vec<String> = unknown
                .iter()
                .take(SHOWN)
                .map(|(c, n)| format!("{c:?} (U+{:04X}, {n}×)", *c as u32))
                .collect();
            if unknown.len() > SHOWN {
                list.push(format!("and {} more", unknown.len() - SHOWN));
            }
            return Err(Error::data(format!(
                "{} has {} distinct characters that the checkpoint's char tokenizer cannot \
                 encode (its vocabulary of {} characters came from the corpus it was trained \
                 on): {}; remove or replace them in the new corpus",
                path.display(),
                unknown.len(),
                chars.vocab_size(),
                list.join(", ")
            )));
        }
    }
    Dataset::with_tokenizer(path, tokenizer, val_fraction, block_size)
}
