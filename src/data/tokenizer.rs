//! The tokenizer a run uses, whichever kind it is, and its JSON form (a checkpoint stores it).

use super::bpe::BpeTokenizer;
use super::char::CharTokenizer;
use crate::model::TokenizerKind;
use crate::{Error, Result};
use std::path::Path;

/// Turns text into token ids and back.
#[derive(Clone, Debug)]
pub enum Tokenizer {
    /// One id per distinct character of the corpus.
    Char(CharTokenizer),
    /// Byte-level BPE in Hugging Face's format.
    Bpe(BpeTokenizer),
}

impl Tokenizer {
    /// Which kind this is.
    pub fn kind(&self) -> TokenizerKind {
        match self {
            Tokenizer::Char(_) => TokenizerKind::Char,
            Tokenizer::Bpe(_) => TokenizerKind::Bpe,
        }
    }

    /// Number of ids; every id is below it.
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Char(t) => t.vocab_size(),
            Tokenizer::Bpe(t) => t.vocab_size(),
        }
    }

    /// The ids of `text`. The char tokenizer errors on a character outside its vocabulary.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Char(t) => t.encode(text),
            Tokenizer::Bpe(t) => t.encode(text),
        }
    }

    /// The ids of a byte string. BPE takes any bytes; the char tokenizer needs UTF-8 and errors
    /// with the offset of the first invalid byte.
    pub fn encode_bytes(&self, bytes: &[u8]) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Char(t) => t.encode(utf8_for_char(bytes, "the input")?),
            Tokenizer::Bpe(t) => t.encode_bytes(bytes),
        }
    }

    /// The text of `ids`. Ids outside the vocabulary are an error. A BPE id sequence may end, or
    /// even start, inside a multi-byte character (a sampler cut it there, or it is a slice of a
    /// longer sequence); such bytes decode to U+FFFD here, and [`Tokenizer::decode_bytes`] gives
    /// them exactly.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Tokenizer::Char(t) => t.decode(ids),
            Tokenizer::Bpe(t) => Ok(String::from_utf8_lossy(&t.decode_bytes(ids)?).into_owned()),
        }
    }

    /// The bytes of `ids`: for BPE, `decode_bytes(encode_bytes(x)) == x` for every byte string.
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        match self {
            Tokenizer::Char(t) => t.decode(ids).map(String::into_bytes),
            Tokenizer::Bpe(t) => t.decode_bytes(ids),
        }
    }

    /// JSON text: `{"type":"char","chars":"…"}` for the char tokenizer, Hugging Face's
    /// `tokenizer.json` for BPE.
    pub fn to_json(&self) -> Result<String> {
        match self {
            Tokenizer::Char(t) => {
                let chars: String = t.chars().iter().collect();
                Ok(serde_json::json!({ "type": "char", "chars": chars }).to_string())
            }
            Tokenizer::Bpe(t) => t.to_json(),
        }
    }

    /// Reads either JSON form of [`Tokenizer::to_json`]; which one is told by its content.
    pub fn from_json(json: &str) -> Result<Tokenizer> {
        let value: serde_json::Value = serde_json::from_str(json).map_err(|e| {
            Error::data(format!(
                "tokenizer JSON does not parse: {e}; the file is damaged or not a tokenizer"
            ))
        })?;
        if value.get("type").and_then(|t| t.as_str()) == Some("char") {
            let chars = value.get("chars").and_then(|c| c.as_str()).ok_or_else(|| {
                Error::data(
                    "char tokenizer JSON has no \"chars\" string; expected \
                         {\"type\":\"char\",\"chars\":\"...\"} as kiln writes it",
                )
            })?;
            return CharTokenizer::from_chars(chars.chars().collect()).map(Tokenizer::Char);
        }
        if value.get("model").is_some() {
            return BpeTokenizer::from_json(json).map(Tokenizer::Bpe);
        }
        Err(Error::data(
            "JSON is neither a kiln char tokenizer ({\"type\":\"char\",...}) nor a Hugging Face \
             tokenizer.json (with a \"model\" object); pass a tokenizer file written by kiln",
        ))
    }

    /// Writes [`Tokenizer::to_json`] to `path` (atomically: a crash leaves the old file or the new
    /// one, never half of one).
    pub fn save(&self, path: &Path) -> Result<()> {
        super::write_atomic(path, self.to_json()?.as_bytes())
    }

    /// Reads a file written by [`Tokenizer::save`], or a Hugging Face `tokenizer.json`.
    pub fn load(path: &Path) -> Result<Tokenizer> {
        let json = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        Tokenizer::from_json(&json).map_err(|e| match e {
            Error::Data { message } => Error::data(format!("{}: {message}", path.display())),
            other => other,
        })
    }
}

/// `bytes` as UTF-8 for the char tokenizer, or an error naming the first invalid byte.
pub(crate) fn utf8_for_char<'a>(bytes: &'a [u8], what: &str) -> Result<&'a str> {
    std::str::from_utf8(bytes).map_err(|e| {
        let at = e.valid_up_to();
        Error::data(format!(
            "{what} is not valid UTF-8: byte 0x{:02X} at byte offset {at} starts no valid \
             character. The char tokenizer needs UTF-8 text; convert the file (e.g. `iconv -f \
             latin1 -t utf-8`), or use the byte-level BPE tokenizer (data.tokenizer = \"bpe\"), \
             which takes any bytes",
            bytes[at]
        ))
    })
}
