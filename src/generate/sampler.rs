//! The generation loop over a checkpoint.
//!
//! This first version recomputes the whole window for every new token (the model is built for a
//! batch of one sequence of `block_size` tokens; causal attention makes the padding after the
//! last real token irrelevant to its logits). A key/value cache that processes only the new
//! token is the planned replacement.

use super::processors::{SamplingParams, next_token};
use crate::cpu::gpt::GptBatch;
use crate::data::Tokenizer;
use crate::gpu::{Gpu, GpuOptions};
use crate::model::gpu::GptGpu;
use crate::train::checkpoint;
use crate::{Error, Result};
use rand::SeedableRng;
use std::path::Path;

/// A model loaded from a checkpoint, ready to generate.
pub struct Generator {
    gpu: Gpu,
    model: GptGpu,
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
    /// Prompt tokens dropped from the front because the prompt was longer than the context.
    pub truncated_prompt_tokens: usize,
    /// Seconds spent on the prompt's first forward pass.
    pub prefill_s: f64,
    /// Seconds spent generating the rest.
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
        Ok(Generator {
            gpu,
            model,
            tokenizer,
            block_size,
        })
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
        let (mut prefill_s, mut decode_s) = (0.0, 0.0);
        let mut text = String::new();
        for i in 0..params.max_tokens {
            let t0 = std::time::Instant::now();
            let window = &tokens[tokens.len().saturating_sub(self.block_size)..];
            let mut inputs = vec![0u32; self.block_size];
            inputs[..window.len()].copy_from_slice(window);
            self.model.set_batch(&self.gpu, &inputs, &inputs)?;
            self.gpu
                .run_pass("generate", |pass| self.model.record_logits(pass))?;
            let mut logits = self.model.read_logits_row(&self.gpu, window.len() - 1)?;
            let next = next_token(&mut logits, &tokens, params, &mut rng);
            if i == 0 {
                prefill_s += t0.elapsed().as_secs_f64();
            } else {
                decode_s += t0.elapsed().as_secs_f64();
            }
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
            text,
            truncated_prompt_tokens: truncated,
            prefill_s,
            decode_s,
        })
    }
}
