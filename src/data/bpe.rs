//! Byte-level BPE (GPT-2's scheme), trained and run by Hugging Face's `tokenizers` crate and
//! stored in its `tokenizer.json` format, so a kiln tokenizer loads in `transformers` and a GPT-2
//! `tokenizer.json` loads in kiln.
//!
//! The `tokenizers` crate takes `&str`; kiln corpora and sampled ids are bytes. Byte-level BPE
//! maps each of the 256 bytes to a printable character that is in the base vocabulary, so any byte
//! string has an encoding: valid UTF-8 runs go through the full pipeline (pre-tokenizer regex, then
//! merges) and each byte of an invalid run becomes its base token. Decoding maps tokens back to
//! bytes through the same table, which makes `decode_bytes(encode_bytes(x)) == x` for every `x`.

use crate::{Error, Result};
use std::collections::HashMap;
use std::str::FromStr;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::models::{ModelWrapper, TrainerWrapper};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

/// Text is encoded in pieces of about this many bytes, split where the pre-tokenizer would split
/// anyway, so that encoding and training run on all cores and the per-token bookkeeping of
/// `tokenizers` (offsets, strings) stays bounded for large corpora.
const CHUNK_BYTES: usize = 1 << 16;
/// Chunks handed to `encode_batch` at once, for the same memory bound.
const CHUNKS_PER_BATCH: usize = 64;

/// A byte-level BPE tokenizer. Ids are dense: `0..vocab_size()`.
#[derive(Clone, Debug)]
pub struct BpeTokenizer {
    // Boxed, as is `byte_ids`, to keep `Tokenizer` small wherever it is moved.
    hf: Box<tokenizers::Tokenizer>,
    /// The bytes each id decodes to.
    id_bytes: Vec<Box<[u8]>>,
    /// The base token of each byte, for bytes outside valid UTF-8.
    byte_ids: Box<[u32; 256]>,
}

impl BpeTokenizer {
    /// Trains on `corpus` (any bytes) until the vocabulary has `vocab_size` tokens: the 256 bytes
    /// first, then one token per merge. Stops earlier if no pair occurs any more. The result
    /// depends only on the corpus and `vocab_size`: merge ties break on token ids, never on hash
    /// order.
    pub fn train(corpus: &[u8], vocab_size: usize) -> Result<BpeTokenizer> {
        if vocab_size < 257 {
            return Err(Error::invalid(
                "data.bpe_vocab_size",
                vocab_size,
                "must be at least 257 (the 256 bytes plus one merge)",
            ));
        }
        if u32::try_from(vocab_size).is_err() {
            return Err(Error::invalid(
                "data.bpe_vocab_size",
                vocab_size,
                "must fit token ids in 32 bits",
            ));
        }
        let mut hf = tokenizers::Tokenizer::new(BPE::default());
        // GPT-2's settings: no prefix space, so that encoding is a pure function of the bytes.
        hf.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        hf.with_post_processor(Some(ByteLevel::new(false, true, true)));
        hf.with_decoder(Some(ByteLevel::new(false, true, true)));
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .show_progress(false)
            .vocab_size(vocab_size)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build()
            .into();
        // Invalid UTF-8 bytes take part only as base tokens: the trainer sees the valid runs.
        let chunks: Vec<&str> = corpus
            .utf8_chunks()
            .flat_map(|c| split_text(c.valid()))
            .collect();
        hf.train(&mut trainer, chunks.into_iter())
            .map_err(|e| Error::data(format!("BPE training failed: {e}")))?;
        BpeTokenizer::from_hf(hf)
    }

    /// Wraps a Hugging Face tokenizer after checking that it is a byte-level BPE that kiln can
    /// round-trip bytes through.
    pub fn from_hf(hf: tokenizers::Tokenizer) -> Result<BpeTokenizer> {
        let not_byte_level = |why: String| {
            Error::data(format!(
                "the tokenizer is not a byte-level BPE that kiln can use: {why}. kiln needs a \
                 GPT-2-style tokenizer.json (model BPE, ByteLevel pre-tokenizer, no normalizer); \
                 retrain one with data.tokenizer = \"bpe\""
            ))
        };
        if !matches!(hf.get_model(), ModelWrapper::BPE(_)) {
            return Err(not_byte_level("its model is not BPE".into()));
        }
        if hf.get_normalizer().is_some() {
            return Err(not_byte_level(
                "it has a normalizer, which would change bytes before encoding".into(),
            ));
        }
        let vocab = hf.get_vocab(true);
        let n = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0);
        let added = hf.get_added_tokens_decoder();
        let char_bytes: HashMap<char, u8> = byte_chars()
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        let mut id_bytes: Vec<Option<Box<[u8]>>> = vec![None; n];
        for (token, &id) in &vocab {
            // Added (special) tokens hold their text verbatim; model tokens hold byte characters.
            let bytes: Box<[u8]> = if added.contains_key(&id) {
                token.as_bytes().into()
            } else {
                token
                    .chars()
                    .map(|c| char_bytes.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .ok_or_else(|| {
                        not_byte_level(format!(
                            "token {token:?} (id {id}) has a character that stands for no byte"
                        ))
                    })?
                    .into()
            };
            id_bytes[id as usize] = Some(bytes);
        }
        let id_bytes = id_bytes
            .into_iter()
            .enumerate()
            .map(|(id, b)| b.ok_or_else(|| not_byte_level(format!("no token has id {id}"))))
            .collect::<Result<Vec<_>>>()?;
        let mut byte_ids = [0u32; 256];
        for (b, c) in byte_chars().iter().enumerate() {
            byte_ids[b] = hf.token_to_id(&c.to_string()).ok_or_else(|| {
                not_byte_level(format!("byte 0x{b:02X} has no base token ({c:?})"))
            })?;
        }
        let tokenizer = BpeTokenizer {
            hf: Box::new(hf),
            id_bytes,
            byte_ids: Box::new(byte_ids),
        };
        // The structure checks above cannot see the pre-tokenizer's byte mapping; a probe can.
        let probe = "Hello, world!\n\n\tnaïve café — 日本語 🙂 0123 it'll  x\r\n".as_bytes();
        let back = tokenizer
            .encode_bytes(probe)
            .and_then(|ids| tokenizer.decode_bytes(&ids))
            .map_err(|e| not_byte_level(format!("it fails on a probe text: {e}")))?;
        if back != probe {
            return Err(not_byte_level(format!(
                "encoding then decoding {:?} gives {:?}",
                String::from_utf8_lossy(probe),
                String::from_utf8_lossy(&back)
            )));
        }
        Ok(tokenizer)
    }

    /// Reads Hugging Face `tokenizer.json` text.
    pub fn from_json(json: &str) -> Result<BpeTokenizer> {
        let hf = tokenizers::Tokenizer::from_str(json).map_err(|e| {
            Error::data(format!(
                "not a valid Hugging Face tokenizer.json: {e}; pass a file written by kiln or by \
                 `tokenizers`"
            ))
        })?;
        BpeTokenizer::from_hf(hf)
    }

    /// Hugging Face `tokenizer.json` text.
    pub fn to_json(&self) -> Result<String> {
        self.hf
            .to_string(false)
            .map_err(|e| Error::data(format!("could not serialise the BPE tokenizer: {e}")))
    }

    /// The wrapped Hugging Face tokenizer.
    pub fn hf(&self) -> &tokenizers::Tokenizer {
        &self.hf
    }

    /// Number of ids.
    pub fn vocab_size(&self) -> usize {
        self.id_bytes.len()
    }

    /// The ids of `text`, as the Hugging Face tokenizer gives them.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(text.len() / 3);
        self.encode_text_into(text, &mut ids)?;
        Ok(ids)
    }

    /// The ids of any byte string: valid UTF-8 runs as [`BpeTokenizer::encode`], other bytes as
    /// their base tokens.
    pub fn encode_bytes(&self, bytes: &[u8]) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(bytes.len() / 3);
        for chunk in bytes.utf8_chunks() {
            self.encode_text_into(chunk.valid(), &mut ids)?;
            ids.extend(chunk.invalid().iter().map(|&b| self.byte_ids[b as usize]));
        }
        Ok(ids)
    }

    fn encode_text_into(&self, text: &str, ids: &mut Vec<u32>) -> Result<()> {
        let pieces = split_text(text);
        for group in pieces.chunks(CHUNKS_PER_BATCH) {
            let encodings = self
                .hf
                .encode_batch(group.to_vec(), false)
                .map_err(|e| Error::data(format!("BPE encoding failed: {e}")))?;
            for encoding in encodings {
                ids.extend_from_slice(encoding.get_ids());
            }
        }
        Ok(())
    }

    /// The bytes of `ids`. Errors on an id outside the vocabulary.
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        let mut bytes = Vec::with_capacity(ids.len() * 3);
        for (position, &id) in ids.iter().enumerate() {
            match self.id_bytes.get(id as usize) {
                Some(b) => bytes.extend_from_slice(b),
                None => {
                    return Err(Error::data(format!(
                        "token id {id} at position {position} is outside the BPE tokenizer's \
                         vocabulary (ids 0..{}); the ids come from a different tokenizer or model",
                        self.id_bytes.len()
                    )));
                }
            }
        }
        Ok(bytes)
    }
}

/// Splits `text` into pieces of at least [`CHUNK_BYTES`] (but the last) that the byte-level
/// pre-tokenizer splits exactly as it splits the whole. A cut sits just before a `'\n'` whose
/// predecessor is a visible ASCII character: no alternative of GPT-2's regex matches a visible
/// character followed by whitespace, so no pre-token spans the cut; and the regex has no
/// look-behind, so matching after the cut does not depend on what came before. (A cut after a
/// newline would not do: `\s+(?!\S)` looks ahead, and would match differently at the end of a
/// piece.)
fn split_text(text: &str) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut pieces = Vec::with_capacity(text.len() / CHUNK_BYTES + 1);
    let mut start = 0;
    let mut at = CHUNK_BYTES;
    while at < bytes.len() {
        match bytes[at..].iter().position(|&b| b == b'\n').map(|i| at + i) {
            Some(cut) if bytes[cut - 1].is_ascii_graphic() => {
                pieces.push(&text[start..cut]);
                start = cut;
                at = cut + CHUNK_BYTES;
            }
            Some(cut) => at = cut + 1,
            None => break,
        }
    }
    if start < bytes.len() {
        pieces.push(&text[start..]);
    }
    pieces
}

/// GPT-2's printable stand-in for each byte (`bytes_to_unicode` in its `encoder.py`): printable
/// Latin-1 bytes stand for themselves, the rest are shifted to U+0100 and up.
pub(crate) fn byte_chars() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut table = ['\0'; 256];
    let mut shifted = 0u32;
    for b in 0..=255u8 {
        table[b as usize] = if printable(b) {
            char::from(b)
        } else {
            shifted += 1;
            char::from_u32(255 + shifted).expect("U+0100..U+0143 are characters")
        };
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_chars_match_gpt2() {
        let t = byte_chars();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[0xAD], 'Ń');
        let alphabet = ByteLevel::alphabet();
        assert_eq!(alphabet.len(), 256);
        assert!(t.iter().all(|c| alphabet.contains(c)));
    }

    #[test]
    fn split_pieces_encode_like_the_whole() {
        // Blank lines, indentation, trailing spaces and CRLF around every candidate cut.
        let mut text = String::new();
        for i in 0..12000 {
            text.push_str(match i % 7 {
                0 => "First Citizen:\n",
                1 => "Before we proceed any further, hear me speak.\n\n",
                2 => "  indented line with trailing space \n",
                3 => "numbers 12 345 and it's fine.\r\n",
                4 => "\n\n\n",
                5 => "naïve — ünïcödé 日本語!\n \n",
                _ => "x\n",
            });
        }
        let pieces = split_text(&text);
        assert!(pieces.len() > 3, "the test text must be cut");
        assert_eq!(pieces.concat(), text);
        let tok = BpeTokenizer::train(text.as_bytes(), 300).unwrap();
        let whole = tok.hf.encode(text.as_str(), false).unwrap();
        assert_eq!(tok.encode(&text).unwrap(), whole.get_ids());
    }
}
