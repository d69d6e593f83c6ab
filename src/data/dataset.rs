//! Token ids of a corpus, cached on disk, split, and sampled into batches.
//!
//! # Cache
//!
//! Tokenising (and, for BPE, training the tokenizer) happens once per corpus. The results go in
//! a directory beside the corpus, `<corpus>.kiln/`:
//!
//! - `<key>.tokenizer.json`, key = hash of the corpus bytes and the tokenizer settings (kind,
//!   BPE vocabulary size);
//! - `<key>.tokens`, key = hash of the corpus bytes and the tokenizer's JSON: a header (magic,
//!   the full 32-byte key, the count) then the ids as little-endian `u32`.
//!
//! Any change to the corpus or the tokenizer changes the key, so a stale entry is never read;
//! old entries are left for the user to delete. Entries are written atomically, and one that
//! fails its checks (header, length, ids within the vocabulary) is rebuilt. If the directory
//! cannot be created or written (a read-only corpus directory), kiln logs a warning and works
//! without the cache.
//!
//! # Batches
//!
//! The generator of each batch is seeded from `(seed, step, micro)` alone, so the batch of any
//! step is a pure function of those numbers and the data: a resumed run recomputes exactly the
//! batches it would have drawn, with no generator state in the checkpoint. The generator is
//! `rand`'s `StdRng`, whose algorithm `rand` may change between its major versions; `Cargo.lock`
//! pins it, so batches are reproducible across runs of the same kiln build (and of builds that
//! keep the same `rand`).

use super::tokenizer::utf8_for_char;
use super::{
    BpeTokenizer, CharTokenizer, Tokenizer, digest, hex16, read_corpus_bytes, write_atomic_with,
};
use crate::model::{DataConfig, TokenizerKind};
use crate::{Error, Result};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

const TOKENS_MAGIC: &[u8; 8] = b"KILNTOK1";
const TOKENS_HEADER: usize = 8 + 32 + 8;
/// Separates the training and validation generators, so no validation batch repeats a training
/// batch's windows by construction.
const TRAIN_STREAM: u64 = 0x7472_6169_6e00_0001;
const VAL_STREAM: u64 = 0x7661_6c00_0000_0002;

/// What the on-disk cache did for one artefact of a [`Dataset`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Read from the cache.
    Hit,
    /// Built, then written to the cache.
    Stored,
    /// Built; the cache could not be written (logged), or there is no corpus file to cache for.
    Unavailable,
}

/// `batch_size` windows of `block_size` tokens, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// `batch_size × block_size` input ids.
    pub inputs: Vec<u32>,
    /// The ids that follow each input: `targets[b][t] == inputs[b][t + 1]` within a row, and the
    /// last target of a row is the token after the window.
    pub targets: Vec<u32>,
    /// Rows.
    pub batch_size: usize,
    /// Tokens per row.
    pub block_size: usize,
}

/// A tokenised corpus, split into training ids (the first `1 − val_fraction`) and validation ids
/// (the rest), as nanoGPT splits it.
pub struct Dataset {
    tokenizer: Tokenizer,
    tokens: Vec<u32>,
    n_train: usize,
    tokenizer_cache: CacheOutcome,
    token_cache: CacheOutcome,
}

impl Dataset {
    /// Reads the corpus at `path`, trains the tokenizer `config` asks for (or reads it from the
    /// cache), tokenises (or reads the ids from the cache) and splits by `config.val_fraction`.
    /// Errors if either split is shorter than `block_size + 1` tokens.
    pub fn load(path: &Path, config: &DataConfig, block_size: usize) -> Result<Dataset> {
        check_val_fraction(config.val_fraction)?;
        let bytes = read_corpus_bytes(path)?;
        if config.tokenizer == TokenizerKind::Char {
            utf8_for_char(&bytes, &format!("corpus {}", path.display()))?;
        }
        let corpus_hash = digest(&[&bytes]);
        let cache = Cache::beside(path);
        let spec = match config.tokenizer {
            TokenizerKind::Char => "char".to_string(),
            TokenizerKind::Bpe => format!("bpe vocab_size={}", config.bpe_vocab_size),
        };
        let key = digest(&[b"kiln tokenizer v1", &corpus_hash, spec.as_bytes()]);
        let name = format!("{}.tokenizer.json", hex16(&key));
        let cached = cache.read(&name).and_then(|json| {
            let t = String::from_utf8(json)
                .map_err(|_| Error::data("not UTF-8"))
                .and_then(|json| Tokenizer::from_json(&json));
            match t {
                Ok(t) if t.kind() == config.tokenizer => Some(t),
                Ok(_) => None,
                Err(e) => {
                    log::warn!("ignoring damaged cache entry {name}: {e}");
                    None
                }
            }
        });
        let (tokenizer, tokenizer_cache) = match cached {
            Some(t) => (t, CacheOutcome::Hit),
            None => {
                let t = match config.tokenizer {
                    TokenizerKind::Char => {
                        let text = std::str::from_utf8(&bytes).expect("checked above");
                        Tokenizer::Char(CharTokenizer::from_text(text)?)
                    }
                    TokenizerKind::Bpe => {
                        let start = std::time::Instant::now();
                        let t = BpeTokenizer::train(&bytes, config.bpe_vocab_size)?;
                        log::info!(
                            "trained a BPE tokenizer of {} tokens on {} in {:.1?}",
                            t.vocab_size(),
                            path.display(),
                            start.elapsed()
                        );
                        Tokenizer::Bpe(t)
                    }
                };
                let outcome = cache.write(&name, |p| t.save(p));
                (t, outcome)
            }
        };
        let mut dataset = Dataset::tokenize(
            &bytes,
            &corpus_hash,
            &cache,
            tokenizer,
            config.val_fraction,
            block_size,
        )?;
        dataset.tokenizer_cache = tokenizer_cache;
        Ok(dataset)
    }

    /// Like [`Dataset::load`] with a given tokenizer, e.g. the one a checkpoint stored, so that a
    /// resumed or fine-tuning run sees the ids the model was trained with.
    pub fn with_tokenizer(
        path: &Path,
        tokenizer: Tokenizer,
        val_fraction: f64,
        block_size: usize,
    ) -> Result<Dataset> {
        check_val_fraction(val_fraction)?;
        let bytes = read_corpus_bytes(path)?;
        if tokenizer.kind() == TokenizerKind::Char {
            utf8_for_char(&bytes, &format!("corpus {}", path.display()))?;
        }
        let corpus_hash = digest(&[&bytes]);
        let cache = Cache::beside(path);
        Dataset::tokenize(
            &bytes,
            &corpus_hash,
            &cache,
            tokenizer,
            val_fraction,
            block_size,
        )
    }

    /// A dataset of text held in memory: trains the tokenizer `config` asks for on `text` (no
    /// file, no cache), encodes it and splits it by `config.val_fraction`, as [`Dataset::load`]
    /// does for a file with the same contents (`config.path` is not read).
    pub fn from_text(text: &str, config: &DataConfig, block_size: usize) -> Result<Dataset> {
        check_val_fraction(config.val_fraction)?;
        if text.is_empty() {
            return Err(Error::data(
                "the text is empty; give the dataset some training text",
            ));
        }
        let tokenizer = match config.tokenizer {
            TokenizerKind::Char => Tokenizer::Char(CharTokenizer::from_text(text)?),
            TokenizerKind::Bpe => {
                Tokenizer::Bpe(BpeTokenizer::train(text.as_bytes(), config.bpe_vocab_size)?)
            }
        };
        let tokens = tokenizer.encode_bytes(text.as_bytes())?;
        Dataset::from_tokens(tokenizer, tokens, config.val_fraction, block_size)
    }

    /// A dataset of ids already in memory (no corpus file, no cache).
    pub fn from_tokens(
        tokenizer: Tokenizer,
        tokens: Vec<u32>,
        val_fraction: f64,
        block_size: usize,
    ) -> Result<Dataset> {
        check_val_fraction(val_fraction)?;
        let vocab = tokenizer.vocab_size();
        if let Some((i, &id)) = tokens
            .iter()
            .enumerate()
            .find(|(_, id)| **id as usize >= vocab)
        {
            return Err(Error::data(format!(
                "token id {id} at position {i} is outside the tokenizer's vocabulary of {vocab}; \
                 the ids were made by a different tokenizer"
            )));
        }
        Dataset::split(
            tokenizer,
            tokens,
            val_fraction,
            block_size,
            CacheOutcome::Unavailable,
            CacheOutcome::Unavailable,
        )
    }

    fn tokenize(
        bytes: &[u8],
        corpus_hash: &[u8; 32],
        cache: &Cache,
        tokenizer: Tokenizer,
        val_fraction: f64,
        block_size: usize,
    ) -> Result<Dataset> {
        let json = tokenizer.to_json()?;
        let key = digest(&[b"kiln tokens v1", corpus_hash, json.as_bytes()]);
        let name = format!("{}.tokens", hex16(&key));
        let vocab = tokenizer.vocab_size();
        let cached = cache.read_with(&name, |r| read_tokens(r, &key, vocab));
        let (tokens, token_cache) = match cached {
            Some(tokens) => (tokens, CacheOutcome::Hit),
            None => {
                let start = std::time::Instant::now();
                let tokens = tokenizer.encode_bytes(bytes)?;
                log::info!(
                    "tokenised {} bytes into {} tokens in {:.1?}",
                    bytes.len(),
                    tokens.len(),
                    start.elapsed()
                );
                let outcome = cache.write(&name, |p| {
                    write_atomic_with(p, |w| write_tokens(w, &key, &tokens))
                });
                (tokens, outcome)
            }
        };
        Dataset::split(
            tokenizer,
            tokens,
            val_fraction,
            block_size,
            CacheOutcome::Unavailable,
            token_cache,
        )
    }

    fn split(
        tokenizer: Tokenizer,
        tokens: Vec<u32>,
        val_fraction: f64,
        block_size: usize,
        tokenizer_cache: CacheOutcome,
        token_cache: CacheOutcome,
    ) -> Result<Dataset> {
        let n = tokens.len();
        // nanoGPT's `int(n * 0.9)`, so the splits match its runs token for token.
        let n_train = (n as f64 * (1.0 - val_fraction)) as usize;
        let dataset = Dataset {
            tokenizer,
            tokens,
            n_train,
            tokenizer_cache,
            token_cache,
        };
        let splits = [
            ("training", dataset.train_tokens(), 1.0 - val_fraction),
            ("validation", dataset.val_tokens(), val_fraction),
        ];
        for (name, ids, share) in splits {
            if ids.len() < block_size + 1 {
                return Err(Error::data(format!(
                    "corpus shorter than one block: the {name} split has {} tokens ({:.1}% of \
                     the corpus's {n} tokens, data.val_fraction = {val_fraction}) but \
                     model.block_size = {block_size} needs at least {} (a block of inputs and the \
                     token after it); use a longer corpus, a smaller model.block_size or another \
                     data.val_fraction",
                    ids.len(),
                    share * 100.0,
                    block_size + 1
                )));
            }
        }
        Ok(dataset)
    }

    /// The tokenizer the ids were made with.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// All ids, training then validation.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The training ids: the first `1 − val_fraction` of the corpus.
    pub fn train_tokens(&self) -> &[u32] {
        &self.tokens[..self.n_train]
    }

    /// The validation ids: the last `val_fraction` of the corpus.
    pub fn val_tokens(&self) -> &[u32] {
        &self.tokens[self.n_train..]
    }

    /// Whether the tokenizer came from the cache ([`Dataset::load`] only).
    pub fn tokenizer_cache(&self) -> CacheOutcome {
        self.tokenizer_cache
    }

    /// Whether the ids came from the cache.
    pub fn token_cache(&self) -> CacheOutcome {
        self.token_cache
    }

    /// The training batch of micro-batch `micro` of optimizer step `step`: `batch_size` windows
    /// at uniformly random offsets of the training ids. A pure function of its arguments and the
    /// data (see the module documentation), so a resumed run redraws the same batches.
    pub fn train_batch(
        &self,
        step: u64,
        micro: u32,
        batch_size: usize,
        block_size: usize,
        seed: u64,
    ) -> Result<Batch> {
        let mut rng = StdRng::seed_from_u64(stream_seed(seed, TRAIN_STREAM, step, micro.into()));
        sample(
            self.train_tokens(),
            "training",
            &mut rng,
            batch_size,
            block_size,
        )
    }

    /// A fixed set of `n` validation batches: the same for the same arguments, on every call, so
    /// validation losses of different steps (and runs) are measured on the same windows.
    pub fn val_batches(
        &self,
        n: usize,
        batch_size: usize,
        block_size: usize,
        seed: u64,
    ) -> Result<Vec<Batch>> {
        (0..n as u64)
            .map(|i| {
                let mut rng = StdRng::seed_from_u64(stream_seed(seed, VAL_STREAM, i, 0));
                sample(
                    self.val_tokens(),
                    "validation",
                    &mut rng,
                    batch_size,
                    block_size,
                )
            })
            .collect()
    }
}

impl std::fmt::Debug for Dataset {
    // The ids can number billions; their counts say what matters.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset")
            .field("tokenizer", &self.tokenizer.kind())
            .field("vocab_size", &self.tokenizer.vocab_size())
            .field("train_tokens", &self.train_tokens().len())
            .field("val_tokens", &self.val_tokens().len())
            .field("tokenizer_cache", &self.tokenizer_cache)
            .field("token_cache", &self.token_cache)
            .finish()
    }
}

fn check_val_fraction(f: f64) -> Result<()> {
    if f > 0.0 && f < 1.0 {
        Ok(())
    } else {
        Err(Error::invalid("data.val_fraction", f, "must be in (0, 1)"))
    }
}

/// Draws `batch_size` windows of `block_size + 1` ids from `ids`.
fn sample(
    ids: &[u32],
    split: &str,
    rng: &mut StdRng,
    batch_size: usize,
    block_size: usize,
) -> Result<Batch> {
    if batch_size == 0 {
        return Err(Error::invalid("batch_size", 0, "must be at least 1"));
    }
    if block_size == 0 {
        return Err(Error::invalid("block_size", 0, "must be at least 1"));
    }
    if ids.len() < block_size + 1 {
        return Err(Error::data(format!(
            "corpus shorter than one block: the {split} split has {} tokens but block_size = \
             {block_size} needs at least {}; use a longer corpus or a smaller block_size",
            ids.len(),
            block_size + 1
        )));
    }
    let last_start = ids.len() - block_size - 1;
    let mut inputs = Vec::with_capacity(batch_size * block_size);
    let mut targets = Vec::with_capacity(batch_size * block_size);
    for _ in 0..batch_size {
        let start = rng.random_range(0..=last_start);
        inputs.extend_from_slice(&ids[start..start + block_size]);
        targets.extend_from_slice(&ids[start + 1..start + block_size + 1]);
    }
    Ok(Batch {
        inputs,
        targets,
        batch_size,
        block_size,
    })
}

/// Mixes the arguments into one seed with SplitMix64's finaliser, chained so that every argument
/// changes every output bit.
fn stream_seed(seed: u64, stream: u64, a: u64, b: u64) -> u64 {
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    mix(mix(mix(seed ^ stream) ^ a) ^ b)
}

fn write_tokens(w: &mut impl Write, key: &[u8; 32], tokens: &[u32]) -> std::io::Result<()> {
    w.write_all(TOKENS_MAGIC)?;
    w.write_all(key)?;
    w.write_all(&(tokens.len() as u64).to_le_bytes())?;
    let mut buf = Vec::with_capacity(1 << 18);
    for chunk in tokens.chunks(1 << 16) {
        buf.clear();
        buf.extend(chunk.iter().flat_map(|id| id.to_le_bytes()));
        w.write_all(&buf)?;
    }
    Ok(())
}

/// Reads a tokens file, or says why it is unusable.
fn read_tokens(
    r: &mut std::fs::File,
    key: &[u8; 32],
    vocab: usize,
) -> std::result::Result<Vec<u32>, String> {
    let len = r.metadata().map_err(|e| e.to_string())?.len();
    let mut header = [0u8; TOKENS_HEADER];
    r.read_exact(&mut header).map_err(|e| e.to_string())?;
    if &header[..8] != TOKENS_MAGIC || &header[8..40] != key {
        return Err("wrong header".into());
    }
    let count = u64::from_le_bytes(header[40..48].try_into().expect("8 bytes"));
    if Some(len) != count.checked_mul(4).map(|b| b + TOKENS_HEADER as u64) {
        return Err(format!("{len} bytes do not hold {count} ids"));
    }
    let mut tokens = vec![0u32; count as usize];
    r.read_exact(bytemuck::cast_slice_mut(&mut tokens))
        .map_err(|e| e.to_string())?;
    for id in &mut tokens {
        *id = u32::from_le(*id);
        if *id as usize >= vocab {
            return Err(format!("id {id} is outside the vocabulary of {vocab}"));
        }
    }
    Ok(tokens)
}

/// The cache directory beside a corpus. Every failure degrades to "not cached" with a warning:
/// the cache saves time, and its absence must never stop a run.
struct Cache {
    dir: PathBuf,
}

impl Cache {
    fn beside(corpus: &Path) -> Cache {
        let mut name = corpus.file_name().unwrap_or_default().to_os_string();
        name.push(".kiln");
        Cache {
            dir: corpus.with_file_name(name),
        }
    }

    fn read(&self, name: &str) -> Option<Vec<u8>> {
        std::fs::read(self.dir.join(name)).ok()
    }

    fn read_with<T>(
        &self,
        name: &str,
        parse: impl FnOnce(&mut std::fs::File) -> std::result::Result<T, String>,
    ) -> Option<T> {
        let path = self.dir.join(name);
        let mut file = std::fs::File::open(&path).ok()?;
        match parse(&mut file) {
            Ok(t) => {
                log::info!("read {} from the cache", path.display());
                Some(t)
            }
            Err(why) => {
                log::warn!("ignoring damaged cache entry {}: {why}", path.display());
                None
            }
        }
    }

    fn write(&self, name: &str, write: impl FnOnce(&Path) -> Result<()>) -> CacheOutcome {
        let path = self.dir.join(name);
        let result = std::fs::create_dir_all(&self.dir)
            .map_err(|source| Error::Io {
                path: self.dir.display().to_string(),
                source,
            })
            .and_then(|()| write(&path));
        match result {
            Ok(()) => CacheOutcome::Stored,
            Err(e) => {
                log::warn!(
                    "not caching {name}: {e}. kiln will redo this work on every load; make {} \
                     writable to cache it",
                    self.dir.display()
                );
                CacheOutcome::Unavailable
            }
        }
    }
}
