//! The data layer: tokenizers, corpus reading, the token cache, the split and batches.

use kiln::data::{
    BpeTokenizer, CacheOutcome, CharTokenizer, Dataset, Tokenizer, read_corpus, read_corpus_bytes,
};
use kiln::model::{DataConfig, TokenizerKind};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::path::{Path, PathBuf};

/// A fresh directory of this test's own under the system temp directory.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-data-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Deterministic English-like text: words, punctuation, line breaks and blank lines.
fn corpus_text(words: usize, seed: u64) -> String {
    const WORDS: &[&str] = &[
        "the", "king", "queen", "and", "of", "to", "my", "lord", "thou", "art", "shall", "not",
        "be", "what", "is", "love", "night", "day", "sweet", "death", "crown", "Rome", "hath",
        "speak", "I'll", "o'er", "heaven", "citizen", "First", "Second",
    ];
    let mut rng = StdRng::seed_from_u64(seed);
    let mut text = String::new();
    for i in 0..words {
        text.push_str(WORDS[rng.random_range(0..WORDS.len())]);
        text.push_str(match rng.random_range(0..12) {
            0 => ",\n",
            1 => ".\n\n",
            2 => "! ",
            3 => "; ",
            _ if i % 9 == 8 => "\n",
            _ => " ",
        });
    }
    text
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn data_config(kind: TokenizerKind, bpe_vocab_size: usize) -> DataConfig {
    DataConfig {
        tokenizer: kind,
        bpe_vocab_size,
        ..DataConfig::default()
    }
}

fn err_message<T: std::fmt::Debug>(r: kiln::Result<T>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn char_vocabulary_is_the_sorted_distinct_characters() {
    let t = CharTokenizer::from_text("hello world\nhé").unwrap();
    assert_eq!(
        t.chars(),
        &['\n', ' ', 'd', 'e', 'h', 'l', 'o', 'r', 'w', 'é']
    );
    assert_eq!(t.vocab_size(), 10);
    let t = Tokenizer::Char(t);
    assert_eq!(t.encode("hello").unwrap(), vec![4, 3, 5, 5, 6]);
    for text in ["hello world", "", "\nhé wold", "ééé"] {
        assert_eq!(t.decode(&t.encode(text).unwrap()).unwrap(), text);
        assert_eq!(
            t.decode_bytes(&t.encode(text).unwrap()).unwrap(),
            text.as_bytes()
        );
        assert_eq!(
            t.encode_bytes(text.as_bytes()).unwrap(),
            t.encode(text).unwrap()
        );
    }
}

#[test]
fn char_rejects_unknown_characters_and_ids() {
    let t = Tokenizer::Char(CharTokenizer::from_text("abc abc").unwrap());
    let e = err_message(t.encode("ab cz"));
    assert!(e.contains("'z'"), "{e}");
    assert!(e.contains("character 4"), "{e}");
    assert!(e.contains("bpe"), "{e}");
    let e = err_message(t.decode(&[0, 4]));
    assert!(e.contains("token id 4 at position 1"), "{e}");
    let e = err_message(t.encode_bytes(b"ab\xffc"));
    assert!(e.contains("byte offset 2"), "{e}");
}

#[test]
fn char_json_save_and_load() {
    let dir = scratch("char-json");
    let t = Tokenizer::Char(CharTokenizer::from_text("to be, or not\t\"to\" be").unwrap());
    let json: serde_json::Value = serde_json::from_str(&t.to_json().unwrap()).unwrap();
    assert_eq!(json["type"], "char");
    assert_eq!(json["chars"], "\t \",benort");
    let path = dir.join("tok.json");
    t.save(&path).unwrap();
    let back = Tokenizer::load(&path).unwrap();
    assert_eq!(back.kind(), TokenizerKind::Char);
    assert_eq!(back.to_json().unwrap(), t.to_json().unwrap());
    let text = "not \"to\" be, or";
    assert_eq!(back.encode(text).unwrap(), t.encode(text).unwrap());
    let e = err_message(Tokenizer::from_json(r#"{"type":"char","chars":"abca"}"#));
    assert!(e.contains("twice"), "{e}");
    let e = err_message(Tokenizer::from_json("{\"neither\": 1}"));
    assert!(e.contains("neither"), "{e}");
    let e = err_message(Tokenizer::from_json("not json"));
    assert!(e.contains("does not parse"), "{e}");
}

fn small_bpe() -> BpeTokenizer {
    BpeTokenizer::train(corpus_text(4000, 1).as_bytes(), 320).unwrap()
}

#[test]
fn bpe_trains_to_the_requested_size_and_compresses() {
    let text = corpus_text(4000, 1);
    let start = std::time::Instant::now();
    let t = BpeTokenizer::train(text.as_bytes(), 320).unwrap();
    eprintln!(
        "BPE training on {} bytes: {:?}",
        text.len(),
        start.elapsed()
    );
    assert_eq!(t.vocab_size(), 320);
    let ids = t.encode(&text).unwrap();
    assert!(
        ids.len() * 3 < text.len() * 2,
        "{} tokens for {} bytes",
        ids.len(),
        text.len()
    );
    assert!(ids.iter().all(|&id| (id as usize) < 320));
}

#[test]
fn bpe_round_trips_any_bytes() {
    let t = Tokenizer::Bpe(small_bpe());
    let every_byte: Vec<u8> = (0..=255u8).collect();
    let mut cases: Vec<Vec<u8>> = vec![
        Vec::new(),
        every_byte.clone(),
        every_byte.iter().rev().copied().collect(),
        b"the king\xff\xfe and \xc3 queen \xe2\x82".to_vec(),
        "naïve café — 日本語 🙂\r\n\n\n  the lord"
            .as_bytes()
            .to_vec(),
        corpus_text(300, 9).into_bytes(),
    ];
    for b in 0..=255u8 {
        cases.push(vec![b]);
        cases.push(vec![b'a', b, b' ', b]);
    }
    let mut rng = StdRng::seed_from_u64(42);
    for _ in 0..300 {
        let len = rng.random_range(0..200);
        cases.push((0..len).map(|_| rng.random::<u8>()).collect());
    }
    for bytes in &cases {
        let ids = t.encode_bytes(bytes).unwrap();
        assert_eq!(&t.decode_bytes(&ids).unwrap(), bytes, "ids {ids:?}");
        if let Ok(text) = std::str::from_utf8(bytes) {
            assert_eq!(t.encode(text).unwrap(), ids);
            assert_eq!(t.decode(&ids).unwrap(), text);
        }
    }
    // Every byte is a base token of its own.
    let ids = t.encode_bytes(&[0xff]).unwrap();
    assert_eq!(ids.len(), 1);
    // A cut inside a multi-byte character decodes lossily as text and exactly as bytes.
    let ids = t.encode_bytes("é".as_bytes()).unwrap();
    let partial = t.encode_bytes(&"é".as_bytes()[..1]).unwrap();
    assert_eq!(t.decode(&partial).unwrap(), "\u{FFFD}");
    assert_eq!(t.decode_bytes(&ids).unwrap(), "é".as_bytes());
    let e = err_message(t.decode(&[1, 320]));
    assert!(e.contains("token id 320 at position 1"), "{e}");
}

#[test]
fn bpe_saves_hugging_face_json_and_loads_identically() {
    let dir = scratch("bpe-json");
    let t = Tokenizer::Bpe(small_bpe());
    let path = dir.join("tokenizer.json");
    t.save(&path).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(json["model"]["type"], "BPE");
    assert_eq!(json["pre_tokenizer"]["type"], "ByteLevel");
    assert_eq!(json["model"]["vocab"].as_object().unwrap().len(), 320);
    assert_eq!(json["model"]["merges"].as_array().unwrap().len(), 320 - 256);
    let back = Tokenizer::load(&path).unwrap();
    assert_eq!(back.kind(), TokenizerKind::Bpe);
    assert_eq!(back.vocab_size(), 320);
    assert_eq!(back.to_json().unwrap(), t.to_json().unwrap());
    let text = corpus_text(500, 3);
    assert_eq!(back.encode(&text).unwrap(), t.encode(&text).unwrap());
    let bytes = b"\x00\x01 the queen\xff";
    assert_eq!(
        back.encode_bytes(bytes).unwrap(),
        t.encode_bytes(bytes).unwrap()
    );
}

#[test]
fn bpe_rejects_tokenizers_it_cannot_round_trip() {
    let json = small_bpe().to_json().unwrap();
    let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
    value["normalizer"] = serde_json::json!({"type": "Lowercase"});
    let e = err_message(Tokenizer::from_json(&value.to_string()));
    assert!(e.contains("normalizer"), "{e}");
    let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
    value["pre_tokenizer"] = serde_json::Value::Null;
    let e = err_message(Tokenizer::from_json(&value.to_string()));
    assert!(e.contains("not a byte-level BPE"), "{e}");
}

#[test]
fn bpe_training_is_deterministic() {
    let text = corpus_text(3000, 5);
    let a = BpeTokenizer::train(text.as_bytes(), 300).unwrap();
    let b = BpeTokenizer::train(text.as_bytes(), 300).unwrap();
    assert_eq!(a.to_json().unwrap(), b.to_json().unwrap());
    let other = BpeTokenizer::train(corpus_text(3000, 6).as_bytes(), 300).unwrap();
    assert_ne!(a.to_json().unwrap(), other.to_json().unwrap());
}

#[test]
fn corpus_reading_errors_say_what_to_do() {
    let dir = scratch("read");
    let e = err_message(read_corpus(&dir.join("missing.txt")));
    assert!(
        e.contains("does not exist") && e.contains("data.path"),
        "{e}"
    );
    let empty = write(&dir, "empty.txt", b"");
    let e = err_message(read_corpus(&empty));
    assert!(e.contains("is empty"), "{e}");
    let e = err_message(read_corpus_bytes(&empty));
    assert!(e.contains("is empty"), "{e}");
    let latin1 = write(&dir, "latin1.txt", b"caf\xe9 au lait");
    let e = err_message(read_corpus(&latin1));
    assert!(e.contains("byte offset 3") && e.contains("0xE9"), "{e}");
    assert!(e.contains("data.tokenizer = \"bpe\""), "{e}");
    assert_eq!(read_corpus_bytes(&latin1).unwrap(), b"caf\xe9 au lait");
    let good = write(&dir, "good.txt", "hé".as_bytes());
    assert_eq!(read_corpus(&good).unwrap(), "hé");
}

#[test]
fn dataset_errors_say_what_to_do() {
    let dir = scratch("dataset-errors");
    let char_config = data_config(TokenizerKind::Char, 512);
    let empty = write(&dir, "empty.txt", b"");
    let e = err_message(Dataset::load(&empty, &char_config, 8));
    assert!(e.contains("is empty"), "{e}");
    let short = write(&dir, "short.txt", &[b'a'; 100]);
    let e = err_message(Dataset::load(&short, &char_config, 16));
    assert!(e.contains("corpus shorter than one block"), "{e}");
    assert!(
        e.contains("validation split has 10 tokens") && e.contains("at least 17"),
        "{e}"
    );
    assert!(e.contains("100 tokens"), "{e}");
    let e = err_message(Dataset::load(&short, &char_config, 100));
    assert!(e.contains("training split has 90 tokens"), "{e}");
    let binary = write(&dir, "binary.txt", b"abcdef\x80abcdef");
    let e = err_message(Dataset::load(&binary, &char_config, 2));
    assert!(e.contains("byte offset 6") && e.contains("bpe"), "{e}");
    let bad_fraction = DataConfig {
        val_fraction: 1.0,
        ..char_config.clone()
    };
    let e = err_message(Dataset::load(&short, &bad_fraction, 2));
    assert!(e.contains("data.val_fraction"), "{e}");
}

#[test]
fn bpe_dataset_takes_any_bytes() {
    let dir = scratch("bpe-bytes");
    let mut bytes = corpus_text(2000, 8).into_bytes();
    bytes.extend_from_slice(b"\x80\xff\xfe binary tail \x00\x01");
    let path = write(&dir, "mixed.bin", &bytes);
    let ds = Dataset::load(&path, &data_config(TokenizerKind::Bpe, 300), 16).unwrap();
    assert_eq!(ds.tokenizer().vocab_size(), 300);
    assert_eq!(ds.tokenizer().decode_bytes(ds.tokens()).unwrap(), bytes);
}

#[test]
fn the_cache_hits_for_the_same_corpus_and_misses_for_a_changed_one() {
    let dir = scratch("cache");
    let text = corpus_text(3000, 2);
    let path = write(&dir, "input.txt", text.as_bytes());
    for (kind, vocab) in [(TokenizerKind::Char, 0), (TokenizerKind::Bpe, 300)] {
        let config = data_config(kind, vocab);
        let first = Dataset::load(&path, &config, 16).unwrap();
        assert_eq!(first.tokenizer_cache(), CacheOutcome::Stored, "{kind:?}");
        assert_eq!(first.token_cache(), CacheOutcome::Stored, "{kind:?}");
        let second = Dataset::load(&path, &config, 16).unwrap();
        assert_eq!(second.tokenizer_cache(), CacheOutcome::Hit, "{kind:?}");
        assert_eq!(second.token_cache(), CacheOutcome::Hit, "{kind:?}");
        assert_eq!(second.tokens(), first.tokens());
        assert_eq!(
            second.tokenizer().to_json().unwrap(),
            first.tokenizer().to_json().unwrap()
        );
        let expected = first.tokenizer().encode(&text).unwrap();
        assert_eq!(second.tokens(), expected.as_slice());
    }
    let cache_dir = dir.join("input.txt.kiln");
    let names: Vec<String> = std::fs::read_dir(&cache_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
    assert!(
        names
            .iter()
            .all(|n| n.len() == 16 + ".tokens".len() || n.len() == 16 + ".tokenizer.json".len())
    );

    // A changed corpus misses.
    let changed = format!("{text}\nand one more line.");
    std::fs::write(&path, &changed).unwrap();
    let config = data_config(TokenizerKind::Char, 0);
    let third = Dataset::load(&path, &config, 16).unwrap();
    assert_eq!(third.token_cache(), CacheOutcome::Stored);
    assert_eq!(third.tokens().len(), changed.chars().count());

    // A damaged entry is rebuilt, not trusted.
    for entry in std::fs::read_dir(&cache_dir).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "tokens") {
            let bytes = std::fs::read(&p).unwrap();
            std::fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
        }
    }
    let fourth = Dataset::load(&path, &config, 16).unwrap();
    assert_eq!(fourth.token_cache(), CacheOutcome::Stored);
    assert_eq!(fourth.tokens(), third.tokens());
}

#[test]
fn an_unwritable_cache_is_skipped() {
    let dir = scratch("nocache");
    let path = write(&dir, "input.txt", corpus_text(500, 4).as_bytes());
    // A file where the cache directory would go blocks it even for root, unlike permissions.
    std::fs::write(dir.join("input.txt.kiln"), b"in the way").unwrap();
    let config = data_config(TokenizerKind::Char, 0);
    for _ in 0..2 {
        let ds = Dataset::load(&path, &config, 8).unwrap();
        assert_eq!(ds.tokenizer_cache(), CacheOutcome::Unavailable);
        assert_eq!(ds.token_cache(), CacheOutcome::Unavailable);
        assert!(!ds.tokens().is_empty());
    }
}

#[test]
fn with_tokenizer_uses_the_given_vocabulary() {
    let dir = scratch("with-tokenizer");
    let path = write(&dir, "input.txt", b"abcabcabcabcabcabcabcabcabcabc");
    let tokenizer = Tokenizer::Char(CharTokenizer::from_chars(vec!['x', 'c', 'b', 'a']).unwrap());
    let ds = Dataset::with_tokenizer(&path, tokenizer, 0.2, 4).unwrap();
    assert_eq!(&ds.tokens()[..3], &[3, 2, 1]);
    assert_eq!(ds.token_cache(), CacheOutcome::Stored);
    let tokenizer = Tokenizer::Char(CharTokenizer::from_chars(vec!['x', 'c', 'b', 'a']).unwrap());
    let again = Dataset::with_tokenizer(&path, tokenizer, 0.2, 4).unwrap();
    assert_eq!(again.token_cache(), CacheOutcome::Hit);
    // A different tokenizer is a different cache entry.
    let other = Tokenizer::Char(CharTokenizer::from_text("abc").unwrap());
    let ds = Dataset::with_tokenizer(&path, other, 0.2, 4).unwrap();
    assert_eq!(ds.token_cache(), CacheOutcome::Stored);
    assert_eq!(&ds.tokens()[..3], &[0, 1, 2]);
    let narrow = Tokenizer::Char(CharTokenizer::from_text("ab").unwrap());
    let e = err_message(Dataset::with_tokenizer(&path, narrow, 0.2, 4));
    assert!(e.contains("'c'"), "{e}");
    let latin1 = write(&dir, "latin1.txt", b"abcabcabcabcabcabc\xe9abcabcabcabc");
    let tokenizer = Tokenizer::Char(CharTokenizer::from_text("abc").unwrap());
    let e = err_message(Dataset::with_tokenizer(&latin1, tokenizer, 0.2, 4));
    assert!(
        e.contains("latin1.txt") && e.contains("byte offset 18"),
        "{e}"
    );
}

fn char_dataset(len: usize, val_fraction: f64, block_size: usize) -> Dataset {
    let tokenizer =
        Tokenizer::Char(CharTokenizer::from_text("abcdefghijklmnopqrstuvwxyz").unwrap());
    let mut rng = StdRng::seed_from_u64(len as u64);
    let tokens = (0..len).map(|_| rng.random_range(0..26)).collect();
    Dataset::from_tokens(tokenizer, tokens, val_fraction, block_size).unwrap()
}

#[test]
fn split_is_first_train_then_val_as_nanogpt() {
    let ds = char_dataset(1000, 0.1, 8);
    assert_eq!(ds.train_tokens().len(), 900);
    assert_eq!(ds.val_tokens().len(), 100);
    assert_eq!([ds.train_tokens(), ds.val_tokens()].concat(), ds.tokens());
    // nanoGPT's int(n * 0.9) on tinyshakespeare's 1 115 394 characters.
    let ds = char_dataset(1_115_394, 0.1, 8);
    assert_eq!(ds.train_tokens().len(), 1_003_854);
    assert_eq!(ds.val_tokens().len(), 111_540);
    let tokenizer = Tokenizer::Char(CharTokenizer::from_text("ab").unwrap());
    let e = err_message(Dataset::from_tokens(tokenizer, vec![0, 1, 2], 0.5, 1));
    assert!(e.contains("token id 2 at position 2"), "{e}");
}

/// The offset of `window` in `ids`, if it occurs there.
fn find(ids: &[u32], window: &[u32]) -> Option<usize> {
    ids.windows(window.len()).position(|w| w == window)
}

#[test]
fn batches_are_windows_with_targets_shifted_by_one() {
    let ds = char_dataset(5000, 0.1, 32);
    let (b, t) = (6, 32);
    let batch = ds.train_batch(3, 1, b, t, 1337).unwrap();
    assert_eq!((batch.batch_size, batch.block_size), (b, t));
    assert_eq!(batch.inputs.len(), b * t);
    assert_eq!(batch.targets.len(), b * t);
    for row in 0..b {
        let inputs = &batch.inputs[row * t..(row + 1) * t];
        let targets = &batch.targets[row * t..(row + 1) * t];
        assert_eq!(&inputs[1..], &targets[..t - 1]);
        let mut window = inputs.to_vec();
        window.push(targets[t - 1]);
        assert!(
            find(ds.train_tokens(), &window).is_some(),
            "row {row} is not a window of the training split"
        );
    }
    for batch in ds.val_batches(3, b, t, 1337).unwrap() {
        for row in 0..b {
            let mut window = batch.inputs[row * t..(row + 1) * t].to_vec();
            window.push(batch.targets[(row + 1) * t - 1]);
            assert!(find(ds.val_tokens(), &window).is_some());
        }
    }
}

#[test]
fn batches_depend_only_on_seed_step_and_micro() {
    let ds = char_dataset(5000, 0.1, 16);
    let batch = |step, micro, seed| ds.train_batch(step, micro, 4, 16, seed).unwrap();
    let a = batch(10, 0, 1);
    // Drawing other batches in between changes nothing: no hidden state.
    let _ = batch(11, 0, 1);
    assert_eq!(batch(10, 0, 1), a);
    let again = char_dataset(5000, 0.1, 16)
        .train_batch(10, 0, 4, 16, 1)
        .unwrap();
    assert_eq!(again, a);
    assert_ne!(batch(11, 0, 1), a);
    assert_ne!(batch(10, 1, 1), a);
    assert_ne!(batch(10, 0, 2), a);
    // Different steps spread over the split rather than repeating a few windows.
    let starts: std::collections::HashSet<Vec<u32>> = (0..50)
        .map(|s| batch(s, 0, 1).inputs[..16].to_vec())
        .collect();
    assert!(starts.len() > 45, "{}", starts.len());
}

#[test]
fn validation_batches_are_fixed() {
    let ds = char_dataset(5000, 0.2, 16);
    let a = ds.val_batches(5, 4, 16, 7).unwrap();
    assert_eq!(a.len(), 5);
    assert_eq!(ds.val_batches(5, 4, 16, 7).unwrap(), a);
    assert_ne!(a[0], a[1]);
    assert_eq!(ds.val_batches(3, 4, 16, 7).unwrap(), a[..3]);
    let e = err_message(ds.train_batch(0, 0, 4, 5000, 7));
    assert!(e.contains("shorter than one block"), "{e}");
    let e = err_message(ds.val_batches(1, 0, 16, 7));
    assert!(e.contains("batch_size"), "{e}");
}

#[test]
fn bpe_loads_added_special_tokens_as_gpt2_has_them() {
    let json = small_bpe().to_json().unwrap();
    let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
    value["added_tokens"] = serde_json::json!([{
        "id": 320, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
        "rstrip": false, "normalized": false, "special": true
    }]);
    let t = Tokenizer::from_json(&value.to_string()).unwrap();
    assert_eq!(t.vocab_size(), 321);
    let ids = t.encode("the king<|endoftext|>the queen").unwrap();
    assert_eq!(ids.iter().filter(|&&id| id == 320).count(), 1, "{ids:?}");
    assert_eq!(t.decode(&ids).unwrap(), "the king<|endoftext|>the queen");
    assert_eq!(t.decode(&[320]).unwrap(), "<|endoftext|>");
}
