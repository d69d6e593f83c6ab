//! The character tokenizer: one id per distinct character of the corpus, as nanoGPT's
//! `shakespeare_char` (65 ids for tinyshakespeare).

use crate::{Error, Result};
use std::collections::HashMap;

/// One id per character, in code-point order of the characters of the corpus it was built from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CharTokenizer {
    chars: Vec<char>,
    /// ASCII is nearly every character of typical corpora, so it gets a table; the rest a map.
    ascii: Box<[Option<u32>; 128]>,
    other: HashMap<char, u32>,
}

impl CharTokenizer {
    /// The vocabulary of `text`: its distinct characters, sorted by code point.
    pub fn from_text(text: &str) -> Result<CharTokenizer> {
        let mut seen_ascii = [false; 128];
        let mut rest = std::collections::BTreeSet::new();
        for c in text.chars() {
            if c.is_ascii() {
                seen_ascii[c as usize] = true;
            } else {
                rest.insert(c);
            }
        }
        let chars: Vec<char> = (0u8..128)
            .filter(|&b| seen_ascii[b as usize])
            .map(char::from)
            .chain(rest)
            .collect();
        CharTokenizer::from_chars(chars)
    }

    /// A tokenizer whose id `i` is `chars[i]`. Errors if `chars` is empty or repeats a character.
    pub fn from_chars(chars: Vec<char>) -> Result<CharTokenizer> {
        if chars.is_empty() {
            return Err(Error::data(
                "the char tokenizer has an empty vocabulary; build it from a non-empty corpus",
            ));
        }
        let mut ascii = Box::new([None; 128]);
        let mut other = HashMap::new();
        for (id, &c) in chars.iter().enumerate() {
            let id = id as u32;
            let previous = if c.is_ascii() {
                ascii[c as usize].replace(id)
            } else {
                other.insert(c, id)
            };
            if let Some(first) = previous {
                return Err(Error::data(format!(
                    "the char tokenizer's vocabulary lists {c:?} twice (ids {first} and {id}); \
                     each character must appear once — rebuild the tokenizer from the corpus"
                )));
            }
        }
        Ok(CharTokenizer {
            chars,
            ascii,
            other,
        })
    }

    /// The characters, in id order.
    pub fn chars(&self) -> &[char] {
        &self.chars
    }

    /// Number of ids.
    pub fn vocab_size(&self) -> usize {
        self.chars.len()
    }

    /// The id of `c`, if it is in the vocabulary.
    pub fn id(&self, c: char) -> Option<u32> {
        if c.is_ascii() {
            self.ascii[c as usize]
        } else {
            self.other.get(&c).copied()
        }
    }

    /// One id per character of `text`. Errors on the first character outside the vocabulary.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(text.len());
        for (position, (offset, c)) in text.char_indices().enumerate() {
            match self.id(c) {
                Some(id) => ids.push(id),
                None => {
                    return Err(Error::data(format!(
                        "character {c:?} (U+{:04X}) at character {position} (byte offset {offset}) \
                         is not in the char tokenizer's vocabulary of {} characters, which was \
                         built from the training corpus; remove or replace that character, or use \
                         the byte-level BPE tokenizer (data.tokenizer = \"bpe\"), which encodes any \
                         text",
                        c as u32,
                        self.chars.len()
                    )));
                }
            }
        }
        Ok(ids)
    }

    /// The text of `ids`. Errors on an id outside the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut text = String::with_capacity(ids.len());
        for (position, &id) in ids.iter().enumerate() {
            match self.chars.get(id as usize) {
                Some(&c) => text.push(c),
                None => {
                    return Err(Error::data(format!(
                        "token id {id} at position {position} is outside the char tokenizer's \
                         vocabulary (ids 0..{}); the ids come from a different tokenizer or model",
                        self.chars.len()
                    )));
                }
            }
        }
        Ok(text)
    }
}
