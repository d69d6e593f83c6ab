//! kiln's tokenizers in Hugging Face's `tokenizer.json` form and back.
//!
//! Byte-level BPE already is a `tokenizer.json` and goes through unchanged. The char tokenizer
//! becomes a BPE model with one token per character and no merges, no normalizer, no
//! pre-tokenizer and the `Fuse` decoder: `tokenizers` then splits the text into characters and
//! finds each one's id, which is exactly kiln's encoding, and decoding concatenates the
//! characters. Import recognises that shape and turns it back into kiln's char tokenizer, so the
//! round trip gives the same tokenizer JSON.

use crate::data::{CharTokenizer, Tokenizer};
use crate::{Error, Result};
use serde_json::{Value, json};

/// `tokenizer.json` text for `t`.
pub fn to_hf_tokenizer_json(t: &Tokenizer) -> Result<String> {
    match t {
        Tokenizer::Bpe(_) => t.to_json(),
        Tokenizer::Char(c) => {
            let vocab: serde_json::Map<String, Value> = c
                .chars()
                .iter()
                .enumerate()
                .map(|(id, ch)| (ch.to_string(), json!(id)))
                .collect();
            let v = json!({
                "version": "1.0",
                "truncation": null,
                "padding": null,
                "added_tokens": [],
                "normalizer": null,
                "pre_tokenizer": null,
                "post_processor": null,
                "decoder": {"type": "Fuse"},
                "model": {
                    "type": "BPE",
                    "dropout": null,
                    "unk_token": null,
                    "continuing_subword_prefix": null,
                    "end_of_word_suffix": null,
                    "fuse_unk": false,
                    "byte_fallback": false,
                    "ignore_merges": false,
                    "vocab": vocab,
                    "merges": [],
                },
            });
            serde_json::to_string_pretty(&v)
                .map_err(|e| Error::data(format!("cannot encode the char tokenizer: {e}")))
        }
    }
}

/// The end-of-text token of a BPE tokenizer (`<|endoftext|>` as GPT-2 has it, or the first
/// special added token), if any: it becomes `eos_token_id` in the exported configs.
pub fn end_of_text(t: &Tokenizer) -> Option<(u32, String)> {
    let Tokenizer::Bpe(b) = t else { return None };
    let added = b.hf().get_added_tokens_decoder();
    let mut special: Vec<(u32, String)> = added
        .iter()
        .filter(|(_, a)| a.special)
        .map(|(&id, a)| (id, a.content.clone()))
        .collect();
    special.sort();
    special
        .iter()
        .find(|(_, s)| s == "<|endoftext|>")
        .or(special.first())
        .cloned()
}

/// `tokenizer_config.json` for `t` in a model of context `block_size`: the fast tokenizer class
/// (the file above is all it needs) and the end-of-text token where there is one.
pub fn tokenizer_config(t: &Tokenizer, block_size: usize) -> Value {
    let mut v = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": block_size,
        "clean_up_tokenization_spaces": false,
        "add_bos_token": false,
        "add_eos_token": false,
    });
    if let Some((_, eos)) = end_of_text(t) {
        let o = v.as_object_mut().expect("a JSON object");
        o.insert("eos_token".into(), eos.clone().into());
        o.insert("bos_token".into(), eos.into());
    }
    v
}

/// A kiln tokenizer from Hugging Face `tokenizer.json` text: the char shape
/// [`to_hf_tokenizer_json`] writes becomes kiln's char tokenizer, anything else must be a
/// byte-level BPE kiln can use.
pub fn from_hf_tokenizer_json(json: &str) -> Result<Tokenizer> {
    if let Some(chars) = char_vocabulary(json) {
        return CharTokenizer::from_chars(chars).map(Tokenizer::Char);
    }
    Tokenizer::from_json(json)
}

/// The characters in id order, when `json` is a one-character-per-token BPE with no merges and
/// nothing that changes the text before or after the model.
fn char_vocabulary(json: &str) -> Option<Vec<char>> {
    let v: Value = serde_json::from_str(json).ok()?;
    let model = v.get("model")?;
    let plain = |k: &str| v.get(k).is_none_or(Value::is_null);
    if model.get("type")?.as_str()? != "BPE"
        || !model.get("merges")?.as_array()?.is_empty()
        || !plain("normalizer")
        || !plain("pre_tokenizer")
        || v.get("added_tokens")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty())
    {
        return None;
    }
    let vocab = model.get("vocab")?.as_object()?;
    let mut chars = vec![None; vocab.len()];
    for (token, id) in vocab {
        let mut it = token.chars();
        let (c, None) = (it.next()?, it.next()) else {
            return None;
        };
        *chars.get_mut(usize::try_from(id.as_u64()?).ok()?)? = Some(c);
    }
    chars.into_iter().collect()
}

/// The tokens (in id order) and merges of a tokenizer as llama.cpp's `gpt2` tokenizer model
/// wants them: byte-level strings (GPT-2's printable stand-ins for bytes) and `"a b"` merges.
/// A char tokenizer maps each character to its byte's stand-in, which needs every character to
/// be one byte (ASCII); others are refused.
pub fn gguf_vocabulary(t: &Tokenizer) -> Result<(Vec<String>, Vec<String>, Vec<i32>)> {
    match t {
        Tokenizer::Char(c) => {
            let table = crate::data::bpe_byte_chars();
            let tokens = c
                .chars()
                .iter()
                .map(|&ch| {
                    if ch.is_ascii() {
                        Ok(table[ch as usize].to_string())
                    } else {
                        Err(Error::invalid(
                            "tokenizer",
                            format!("{ch:?}"),
                            "a char tokenizer exports to GGUF only with ASCII characters \
                             (llama.cpp's byte-level tokenizer would need merges for the others); \
                             use data.tokenizer = \"bpe\"",
                        ))
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            let types = vec![1; tokens.len()];
            Ok((tokens, Vec::new(), types))
        }
        Tokenizer::Bpe(b) => {
            let hf = b.hf();
            let n = t.vocab_size();
            let mut tokens = vec![String::new(); n];
            for (tok, id) in hf.get_vocab(true) {
                tokens[id as usize] = tok;
            }
            let added = hf.get_added_tokens_decoder();
            // llama.cpp's token types: 1 normal, 3 control (special), 4 user-defined.
            let types = (0..n as u32)
                .map(|id| match added.get(&id) {
                    Some(a) if a.special => 3,
                    Some(_) => 4,
                    None => 1,
                })
                .collect();
            let v: Value = serde_json::from_str(&b.to_json()?)
                .map_err(|e| Error::data(format!("BPE tokenizer JSON: {e}")))?;
            let merges = v["model"]["merges"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|m| match m {
                            Value::String(s) => Some(s.clone()),
                            Value::Array(p) => {
                                Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?))
                            }
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default();
            Ok((tokens, merges, types))
        }
    }
}
