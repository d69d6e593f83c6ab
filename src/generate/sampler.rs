//! The generation loop over a checkpoint.
//!
//! Prefill runs the ordinary forward pass over the prompt (the model is built for one sequence
//! of `block_size` tokens; causal attention makes the padding after the last real token
//! irrelevant to its logits), which leaves every layer's keys and values in its activation
//! buffers. Each further token then runs through [`KvDecoder`] alone, attending over that cache.
//!
//! When the cache is full (prompt plus output reach `block_size`), the model's learned absolute
//! positions rule out sliding the cache by one, so the last `block_size / 2` tokens are prefilled
//! again and decoding continues from there: the context then holds between half and all of the
//! block. [`Generator::set_kv_cache`]`(false)` recomputes the last `block_size` tokens for every
//! token instead (slower; the reference the cache is tested against).

use super::processors::{SamplingParams, next_token};
use crate::cpu::gpt::GptBatch;
use crate::data::Tokenizer;
use crate::gpu::{Gpu, GpuOptions};
use crate::model::decode::KvDecoder;
use crate::model::gpu::GptGpu;
use crate::train::checkpoint;
use crate::{Error, Result};
use rand::SeedableRng;
use std::path::Path;

/// A model loaded from a checkpoint, ready to generate.
pub struct Generator {
    gpu: Gpu,
    model: GptGpu,
    decoder: KvDecoder,
    kv_cache: bool,
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
    /// Loads the latest checkpoint under `dir` (or `dir` itself if it is a checkpoint folder).
    pub fn load(dir: &Path, options: &GpuOptions) -> Result<Generator> {
        let ck = if dir.join("state.json").exists() {
            checkpoint::load(dir)?
        } else {
            checkpoint::load_latest(dir)?
        };
        let tokenizer = Tokenizer::from_json(&ck.tokenizer_json)?;
        let gpu = Gpu::with_options(options)?;
        gpu.tuning().set_enabled(false);
        let block_size = ck.config.model.block_size;
        let model = GptGpu::new(
            &gpu,
            &ck.config.model,
            tokenizer.vocab_size(),
            GptBatch {
                batch: 1,
                seq: block_size,
            },
            1,
        )?;
        let layout = model.layout().clone();
        let ck = ck.with_layout(&layout)?;
        model.set_weights(&gpu, &ck.master)?;
        let decoder = KvDecoder::new(&gpu, &model)?;
        Ok(Generator {
            gpu,
            model,
            decoder,
            kv_cache: true,
            defaults: ck.config.sample.clone(),
            tokenizer,
            block_size,
        })
    }

    /// The sampling settings of the checkpoint's config (its `[sample]` table).
    pub fn default_params(&self) -> &SamplingParams {
        &self.defaults
    }

    /// Whether tokens after the prompt run through the key/value cache (the default) or
    /// recompute the whole window.
    pub fn set_kv_cache(&mut self, on: bool) {
        self.kv_cache = on;
    }

    /// The forward pass over `context` (at most block_size tokens), filling the cache; returns
    /// the logits after its last token.
    fn prefill(&self, context: &[u32]) -> Result<Vec<f32>> {
        let mut inputs = vec![0u32; self.block_size];
        inputs[..context.len()].copy_from_slice(context);
        self.model.set_batch(&self.gpu, &inputs, &inputs)?;
        self.gpu
            .run_pass("prefill", |pass| self.model.record_logits(pass))?;
        self.model.read_logits_row(&self.gpu, context.len() - 1)
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
        let mut printed = 0usize; // bytes of decoded output already handed to on_text
        let mut text = String::new();
        let t0 = std::time::Instant::now();
        let window = &tokens[truncated..];
        let prompt_tokens = window.len();
        let mut logits = self.prefill(window)?;
        // The position the next token takes in the cache.
        let mut pos = window.len();
        let prefill_s = t0.elapsed().as_secs_f64();
        let t1 = std::time::Instant::now();
        for i in 0..params.max_tokens {
            if i > 0 {
                let last = *tokens.last().unwrap_or(&0);
                logits = if !self.kv_cache {
                    self.prefill(&tokens[tokens.len().saturating_sub(self.block_size)..])?
                } else if pos == self.block_size {
                    let keep = &tokens[tokens.len() - self.block_size / 2..];
                    pos = keep.len();
                    self.prefill(keep)?
                } else {
                    pos += 1;
                    self.decoder.decode(&self.gpu, last, pos - 1)?
                };
            }
            let next = next_token(&mut logits, &tokens, params, &mut rng);
            tokens.push(next);
            out_ids.push(next);
            text = String::from_utf8_lossy(&self.tokenizer.decode_bytes(&out_ids)?).into_owned();
            if let Some(cut) = params
                .stop
                .iter()
                .filter_map(|s| text.find(s.as_str()))
                .min()
            {
                text.truncate(cut);
                if cut > printed {
                    on_text(&text[printed..cut]);
                }
                printed = cut;
                break;
            }
            // Hold back what could still become the start of a stop sequence.
            let hold = params
                .stop
                .iter()
                .map(|s| {
                    (1..s.len())
                        .rev()
                        .find(|&k| text.ends_with(&s[..k]) && s.is_char_boundary(k))
                        .unwrap_or(0)
                })
                .max()
                .unwrap_or(0);
            let mut upto = text.len() - hold;
            while !text.is_char_boundary(upto) {
                upto -= 1;
            }
            if upto > printed {
                on_text(&text[printed..upto]);
                printed = upto;
            }
        }
        if text.len() > printed {
            on_text(&text[printed..]);
        }
        Ok(Generation {
            tokens: out_ids.len(),
            ids: out_ids,
            prompt_tokens,
            text,
            truncated_prompt_tokens: truncated,
            prefill_s,
            decode_s: t1.elapsed().as_secs_f64(),
        })
    }
}
