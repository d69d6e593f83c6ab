//! The generation loop over a checkpoint.
//!
//! Prefill runs the ordinary forward pass over the prompt (the model is built for one sequence
//! of `block_size` tokens; causal attention makes the padding after the last real token
//! irrelevant to its logits), which leaves every layer's keys and values in its activation
//! buffers. Each further token then runs through [`KvDecoder`] alone, attending over that cache.
//!
//! When the cache is full (prompt plus output reach `block_size`), it cannot slide by one: with
//! learned absolute positions every cached row depends on its position, and with RoPE the cached
//! keys are rotated at their positions in the old window, which differ from those a forward pass
//! over the slid window would use (the scores agree in exact arithmetic, not in f32).
//! [`ContextWindow`] says what happens then: by default ([`ContextWindow::Restart`]) the last
//! `block_size / 2` tokens are prefilled again at positions 0.. and decoding continues from
//! there, so the context holds between half and all of the block and each token costs one
//! decode step; [`ContextWindow::Slide`] recomputes the last `block_size` tokens for every
//! further token, as nanoGPT's `generate` does (a full forward pass per token).
//! [`Generator::set_kv_cache`]`(false)` recomputes the context for every token from the first,
//! following the same window rule (slowest; the reference the cache is tested against).

use super::processors::{SamplingParams, next_token};
use super::stop::StopMatcher;
use crate::cpu::gpt::GptBatch;
use crate::data::Tokenizer;
use crate::gpu::{Gpu, GpuOptions};
use crate::model::Config;
use crate::model::decode::KvDecoder;
use crate::model::gpu::{GptGpu, WeightBytes};
use crate::quant::weights::ModelWeights;
use crate::{Error, Result};
use rand::SeedableRng;
use std::path::{Path, PathBuf};

/// What generation does once prompt and output fill the context (`block_size` tokens).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContextWindow {
    /// Keep the last `block_size / 2` tokens, prefill them again and go on decoding with the
    /// cache: one cheap decode step per token, but the model then sees between half and all of
    /// the block, so the output differs from a sliding window's.
    #[default]
    Restart,
    /// A sliding window of the last `block_size` tokens, recomputed for every token past the
    /// context: exactly what nanoGPT's `generate` computes, at the cost of a whole forward pass
    /// per token.
    Slide,
}

impl std::str::FromStr for ContextWindow {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "restart" => Ok(ContextWindow::Restart),
            "slide" => Ok(ContextWindow::Slide),
            _ => Err(Error::invalid("window", s, "expected restart or slide")),
        }
    }
}

/// A model loaded from a checkpoint, ready to generate.
pub struct Generator {
    gpu: Gpu,
    model: GptGpu,
    /// The KV-cache decoder, where it supports the model (every architecture, up to
    /// [`crate::kernels::decode::MAX_POSITIONS`] positions; else every token recomputes the
    /// context).
    decoder: Option<KvDecoder>,
    kv_cache: bool,
    window: ContextWindow,
    folder: PathBuf,
    description: String,
    defaults: SamplingParams,
    tokenizer: Tokenizer,
    block_size: usize,
}

/// What one generation produced.
#[derive(Clone, Debug)]
pub struct Generation {
    /// The generated text (stop sequence excluded).
    pub text: String,
    /// Tokens generated.
    pub tokens: usize,
    /// Their ids.
    pub ids: Vec<u32>,
    /// Prompt tokens the prefill ran on (after any truncation).
    pub prompt_tokens: usize,
    /// Prompt tokens dropped from the front because the prompt was longer than the context.
    pub truncated_prompt_tokens: usize,
    /// Seconds of the prompt's forward pass (its logits read back).
    pub prefill_s: f64,
    /// Seconds from the end of the prefill to the last token: sampling every token and running
    /// all but the first through the decoder.
    pub decode_s: f64,
}

impl Generator {
    /// Loads the latest checkpoint under `dir` (or `dir` itself if it is a checkpoint folder,
    /// float or quantised by `kiln quantize`) into a model built for inference.
    pub fn load(dir: &Path, options: &GpuOptions) -> Result<Generator> {
        Generator::from_model_weights(&ModelWeights::load(dir)?, options)
    }

    /// A generator over weights already loaded (e.g. a base with a LoRA adapter attached:
    /// [`ModelWeights::load_with_adapter`]).
    pub fn from_model_weights(weights: &ModelWeights, options: &GpuOptions) -> Result<Generator> {
        let tokenizer = Tokenizer::from_json(&weights.tokenizer_json)?;
        let gpu = Gpu::with_options(options)?;
        Generator::build(gpu, weights, tokenizer)
    }

    /// A generator on `gpu` for a model of `config` with the f32 master weights `master`, laid
    /// out as a model of that config lays them out on that device (what
    /// [`crate::Trainer::master_weights`] returns), e.g. a model just trained.
    /// `source` names the weights in error messages.
    pub fn from_weights(
        gpu: Gpu,
        config: &Config,
        tokenizer: Tokenizer,
        master: &[f32],
        source: &str,
    ) -> Result<Generator> {
        let vocab = tokenizer.vocab_size();
        let layout = GptGpu::config_layout(&gpu, config, vocab)?;
        let expected = layout.buffer_len();
        if master.len() != expected {
            return Err(Error::shape(
                "generator weights",
                format!(
                    "{} values for a model whose layout holds {expected} on this device",
                    master.len()
                ),
            ));
        }
        let weights = ModelWeights {
            folder: PathBuf::from(source),
            config: config.clone(),
            tokenizer_json: tokenizer.to_json()?,
            vocab,
            layout,
            values: master.to_vec(),
            quantized: Default::default(),
            settings: None,
        };
        Generator::build(gpu, &weights, tokenizer)
    }

    /// The inference model for one sequence of `block_size` tokens holding `weights`, and
    /// the decoder.
    fn build(gpu: Gpu, weights: &ModelWeights, tokenizer: Tokenizer) -> Result<Generator> {
        gpu.tuning().set_enabled(false);
        let block_size = weights.config.model.block_size;
        let batch = GptBatch {
            batch: 1,
            seq: block_size,
        };
        let model = GptGpu::inference(&gpu, weights, batch)?;
        let (folder, description) = (weights.folder.clone(), weights.describe());
        let decoder = if KvDecoder::supports(&gpu, &model) {
            Some(KvDecoder::new(&gpu, &model)?)
        } else {
            None
        };
        Ok(Generator {
            gpu,
            model,
            decoder,
            kv_cache: true,
            window: ContextWindow::default(),
            folder,
            description,
            defaults: weights.config.sample.clone(),
            tokenizer,
            block_size,
        })
    }

    /// Bytes of the model's weights resident on the GPU.
    pub fn weight_bytes(&self) -> WeightBytes {
        self.model.weight_bytes()
    }

    /// Bytes of the scratch textures the device holds (operands the texture matmul stages,
    /// on software adapters; shared by every product of one shape).
    pub fn scratch_bytes(&self) -> u64 {
        self.gpu.scratch_texture_bytes()
    }

    /// The context length (the model's block size).
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// What the weights are: `float`, or the quantisation settings.
    pub fn weights_description(&self) -> &str {
        &self.description
    }

    /// The logits of the token after `context` (1 to block_size tokens), by a forward pass over
    /// it: what generation samples from at that point, for comparing models token by token.
    pub fn logits_after(&self, context: &[u32]) -> Result<Vec<f32>> {
        if context.is_empty() || context.len() > self.block_size {
            return Err(Error::invalid(
                "context",
                format!("{} tokens", context.len()),
                format!("must hold 1 to {} tokens", self.block_size),
            ));
        }
        self.prefill(context)
    }

    /// The logits after every token of `context` (1 to block_size tokens), by one forward pass:
    /// row i is what the model predicts after `context[..=i]`.
    pub fn logits_all(&self, context: &[u32]) -> Result<Vec<Vec<f32>>> {
        self.logits_after(context)?;
        let all = self.model.read_logits(&self.gpu)?;
        let vocab = all.len() / self.block_size;
        Ok(all
            .chunks_exact(vocab)
            .take(context.len())
            .map(<[f32]>::to_vec)
            .collect())
    }

    /// The sampling settings of the checkpoint's config (its `[sample]` table).
    pub fn default_params(&self) -> &SamplingParams {
        &self.defaults
    }

    /// Whether tokens after the prompt run through the key/value cache (the default) or
    /// recompute the whole context for every token. Both compute the same function (the
    /// context each token sees follows the [`ContextWindow`] either way); recomputing is the
    /// slow reference the cache is tested against.
    pub fn set_kv_cache(&mut self, on: bool) {
        self.kv_cache = on;
    }

    /// Whether generation runs through the key/value cache: it is on ([`Generator::set_kv_cache`])
    /// and the decoder supports the model ([`KvDecoder::supports`]).
    pub fn uses_kv_cache(&self) -> bool {
        self.kv_cache && self.decoder.is_some()
    }

    /// What happens once the context is full (see [`ContextWindow`]).
    pub fn set_window(&mut self, window: ContextWindow) {
        self.window = window;
    }

    /// The forward pass over `context` (at most block_size tokens), filling the cache; returns
    /// the logits after its last token.
    fn prefill(&self, context: &[u32]) -> Result<Vec<f32>> {
        let mut inputs = vec![0u32; self.block_size];
        inputs[..context.len()].copy_from_slice(context);
        self.model.set_batch(&self.gpu, &inputs, &inputs)?;
        self.gpu
            .submit("prefill", |encoder| self.model.record_logits(encoder))?;
        self.model.read_logits_row(&self.gpu, context.len() - 1)
    }

    /// The logits after the last of `tokens`, whose context so far is `tokens[*start..]` with
    /// all but the last token in the cache. A context that would outgrow the block is re-based
    /// first ([`ContextWindow`]); then the last token runs through the decoder at its position
    /// in the context, or, after a re-base or without the cache, the context is recomputed.
    /// Either way the logits are those of a forward pass over `tokens[*start..]` at positions
    /// 0.., so the cache changes the cost and never the function.
    fn next_logits(&self, tokens: &[u32], start: &mut usize) -> Result<Vec<f32>> {
        let rebase = tokens.len() - *start > self.block_size;
        if rebase {
            *start = tokens.len()
                - match self.window {
                    // At least one token, for a block of one.
                    ContextWindow::Restart => (self.block_size / 2).max(1),
                    ContextWindow::Slide => self.block_size,
                };
        }
        match self.decoder.as_ref().filter(|_| self.kv_cache && !rebase) {
            Some(decoder) => {
                let last = tokens[tokens.len() - 1];
                decoder.decode(&self.gpu, last, tokens.len() - 1 - *start)
            }
            None => self.prefill(&tokens[*start..]),
        }
    }

    /// Refuses logits that are not all finite: sampling from them would print text that means
    /// nothing.
    fn check_logits(&self, logits: &[f32], position: usize) -> Result<()> {
        match logits.iter().position(|x| !x.is_finite()) {
            None => Ok(()),
            Some(i) => Err(Error::NonFinite {
                what: "logits".into(),
                message: format!(
                    "the model in {} gives {} for token {i} at output position {position}: its \
                     weights are damaged or the run had diverged when it was saved; sample from \
                     an earlier checkpoint with --checkpoint RUN/step-N",
                    self.folder.display(),
                    logits[i]
                ),
            }),
        }
    }

    /// The tokenizer of the checkpoint.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Generates from `prompt`, calling `on_text` with each piece of text as soon as it is
    /// certain not to be part of a stop sequence. A prompt longer than the context keeps its last
    /// `block_size` tokens (reported in [`Generation::truncated_prompt_tokens`]).
    pub fn generate(
        &self,
        prompt: &str,
        params: &SamplingParams,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        params.validate()?;
        let mut tokens = self.tokenizer.encode(prompt)?;
        if tokens.is_empty() {
            return Err(Error::invalid(
                "prompt",
                "\"\"",
                "must contain at least one token",
            ));
        }
        let truncated = tokens.len().saturating_sub(self.block_size);
        let mut rng = rand::rngs::StdRng::seed_from_u64(params.seed);
        let mut out_ids: Vec<u32> = Vec::new();
        let mut matcher = StopMatcher::new(&params.stop);
        let mut bytes = Vec::new();
        let t0 = std::time::Instant::now();
        // The model's context is tokens[start..]: the prompt's last block_size tokens, then
        // re-based by the window rule whenever it would outgrow the block.
        let mut start = truncated;
        let prompt_tokens = tokens.len() - start;
        let mut logits = self.prefill(&tokens[start..])?;
        let prefill_s = t0.elapsed().as_secs_f64();
        let t1 = std::time::Instant::now();
        for i in 0..params.max_tokens {
            if i > 0 {
                logits = self.next_logits(&tokens, &mut start)?;
            }
            self.check_logits(&logits, i)?;
            let next = next_token(&mut logits, &tokens, params, &mut rng);
            tokens.push(next);
            out_ids.push(next);
            bytes = self.tokenizer.decode_bytes(&out_ids)?;
            let piece = matcher.push(&bytes);
            if !piece.is_empty() {
                on_text(&piece);
            }
            if matcher.stopped() {
                break;
            }
        }
        let rest = matcher.finish(&bytes);
        if !rest.is_empty() {
            on_text(&rest);
        }
        Ok(Generation {
            tokens: out_ids.len(),
            ids: out_ids,
            prompt_tokens,
            text: matcher.text().to_string(),
            truncated_prompt_tokens: truncated,
            prefill_s,
            decode_s: t1.elapsed().as_secs_f64(),
        })
    }
}
