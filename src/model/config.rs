//! Run configuration in TOML: model shape, training hyperparameters and data.
//!
//! Every field has a default (the nanoGPT "baby" Shakespeare run), unknown keys are errors, and
//! `--set section.key=value` overrides apply before validation, so a bad value is reported the
//! same way whether it came from the file or the command line.

use super::moe::MoeConfig;
use crate::finetune::{Adaptation, FinetuneConfig, LoraConfig};
use crate::generate::SamplingParams;
use crate::precision::PrecisionChoice;
use crate::training::LossScaling;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Everything a run needs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Model shape.
    pub model: ModelConfig,
    /// Optimisation and schedule.
    pub train: TrainConfig,
    /// Corpus and tokenizer.
    pub data: DataConfig,
    /// Default sampling settings of `kiln sample` for this model (its flags override them).
    pub sample: SamplingParams,
    /// Fine-tuning: frozen tensors and the checkpoint the run started from.
    #[serde(skip_serializing_if = "FinetuneConfig::is_empty")]
    pub finetune: FinetuneConfig,
    /// LoRA adapters (none unless the table is present).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraConfig>,
}

/// A decoder-only transformer. `arch` picks the defaults of every part (GPT-2: learned
/// positions, layer norm, GELU MLP 4× wide, tied head; Llama: RoPE, RMSNorm, SwiGLU MLP, separate
/// head); the part keys override them one by one. See [`ModelConfig::parts`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// The architecture whose defaults the parts take.
    pub arch: ArchKind,
    /// Transformer blocks.
    pub n_layer: usize,
    /// Attention heads per block; must divide `n_embd`.
    pub n_head: usize,
    /// Width of the residual stream.
    pub n_embd: usize,
    /// Context window: the longest sequence the model sees (rows of the position table).
    pub block_size: usize,
    /// Biases in the linear layers and layer norms.
    pub bias: bool,
    /// Dropout probability on attention probabilities and residual branches (0 disables it).
    pub dropout: f32,
    /// Vocabulary size; 0 takes it from the tokenizer.
    pub vocab_size: usize,
    /// Apply weight decay to the position embedding too (nanoGPT does; GPT-2's recipe doesn't).
    pub decay_position_embedding: bool,
    /// Normalisation (default: the architecture's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub norm: Option<NormKind>,
    /// Added under the norms' square root (default 1e-5).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub norm_eps: Option<f32>,
    /// How positions enter the model (default: the architecture's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub positions: Option<PositionKind>,
    /// RoPE's frequency base (default 10000; only with positions = "rope").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f32>,
    /// The MLP's activation (default: the architecture's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mlp: Option<MlpKind>,
    /// The MLP's hidden width (default 4·n_embd for GELU, 8·n_embd/3 rounded up to a multiple
    /// of 64 for SwiGLU, as Llama does).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mlp_hidden: Option<usize>,
    /// Key/value heads of grouped-query attention; must divide n_head (default n_head).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_kv_head: Option<usize>,
    /// Tie the output head to the token embedding (default: GPT-2 ties, Llama doesn't).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tie_embeddings: Option<bool>,
    /// The attention kernels of the GPU step (default auto; see [`AttentionKernel`]). Not a part
    /// of the model's function: both kernels compute the same attention, to rounding.
    #[serde(skip_serializing_if = "AttentionKernel::is_auto")]
    pub attention_kernel: AttentionKernel,
    /// A routed mixture-of-experts MLP (`[model.moe]`; none: every MLP is dense).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moe: Option<MoeConfig>,
}

/// Which kernels compute causal attention in the GPU step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionKernel {
    /// The fused kernels where they can run, except on CPU-backed adapters where the reference
    /// is faster and its T×T buffers fit (the rule of
    /// [`crate::kernels::flash_attention::prefer_fused`]).
    #[default]
    Auto,
    /// FlashAttention-style fused kernels: memory linear in T, no T×T matrix; an error where
    /// they cannot run (head size above 128).
    Fused,
    /// Matmuls around a causal softmax kernel, with the (B, n_head, T, T) probabilities in
    /// memory.
    Reference,
}

impl AttentionKernel {
    /// The default, left out of written configs.
    pub fn is_auto(&self) -> bool {
        *self == AttentionKernel::Auto
    }
}

/// Which architecture a model's parts default to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArchKind {
    /// GPT-2.
    #[default]
    Gpt2,
    /// Llama (2 and 3 without its RoPE frequency scaling).
    Llama,
}

/// The normalisation of the blocks and of the final norm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormKind {
    /// Mean and variance, gain and (with bias) shift.
    LayerNorm,
    /// Root mean square, gain only.
    RmsNorm,
}

/// How positions enter the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PositionKind {
    /// A learned table added to the token embedding.
    Learned,
    /// Rotary embedding of queries and keys (rotate-half convention).
    Rope,
}

/// The MLP's activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MlpKind {
    /// fc, GELU (tanh approximation), proj.
    Gelu,
    /// SiLU(gate)·up, down.
    SwiGlu,
}

/// Every part of a model, resolved from the architecture's defaults and the config's keys.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelParts {
    /// Normalisation.
    pub norm: NormKind,
    /// Its eps.
    pub norm_eps: f32,
    /// Positions.
    pub positions: PositionKind,
    /// RoPE's base (meaningful with RoPE only).
    pub rope_theta: f32,
    /// MLP activation.
    pub mlp: MlpKind,
    /// MLP hidden width.
    pub mlp_hidden: usize,
    /// Key/value heads.
    pub n_kv_head: usize,
    /// Head tied to the token embedding.
    pub tie_embeddings: bool,
}

impl ModelConfig {
    /// The parts of this model: the architecture's defaults with the config's keys applied.
    /// Does not validate them ([`Config::validate`] does).
    pub fn parts(&self) -> ModelParts {
        let llama = self.arch == ArchKind::Llama;
        let mlp = self.mlp.unwrap_or(if llama {
            MlpKind::SwiGlu
        } else {
            MlpKind::Gelu
        });
        let c = self.n_embd;
        let default_hidden = match mlp {
            MlpKind::Gelu => 4 * c,
            MlpKind::SwiGlu => (8 * c).div_ceil(3).div_ceil(64) * 64,
        };
        ModelParts {
            norm: self.norm.unwrap_or(if llama {
                NormKind::RmsNorm
            } else {
                NormKind::LayerNorm
            }),
            norm_eps: self.norm_eps.unwrap_or(1e-5),
            positions: self.positions.unwrap_or(if llama {
                PositionKind::Rope
            } else {
                PositionKind::Learned
            }),
            rope_theta: self.rope_theta.unwrap_or(10000.0),
            mlp,
            mlp_hidden: self.mlp_hidden.unwrap_or(default_hidden),
            n_kv_head: self.n_kv_head.unwrap_or(self.n_head),
            tie_embeddings: self.tie_embeddings.unwrap_or(!llama),
        }
    }

    /// Checks the shape and the parts against each other (part of [`Config::validate`]; the
    /// model builders call it too, for a config built in code).
    pub fn validate_parts(&self) -> Result<()> {
        for (key, v) in [
            ("model.n_layer", self.n_layer),
            ("model.n_head", self.n_head),
            ("model.n_embd", self.n_embd),
            ("model.block_size", self.block_size),
        ] {
            if v == 0 {
                return Err(Error::invalid(key, v, "must be at least 1"));
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(Error::invalid(
                "model.n_embd",
                self.n_embd,
                format!("must be divisible by model.n_head = {}", self.n_head),
            ));
        }
        let p = self.parts();
        if !(p.norm_eps.is_finite() && p.norm_eps > 0.0) {
            return Err(Error::invalid(
                "model.norm_eps",
                p.norm_eps,
                "must be a finite number > 0",
            ));
        }
        if p.mlp_hidden == 0 {
            return Err(Error::invalid("model.mlp_hidden", 0, "must be at least 1"));
        }
        if p.n_kv_head == 0 || !self.n_head.is_multiple_of(p.n_kv_head) {
            return Err(Error::invalid(
                "model.n_kv_head",
                p.n_kv_head,
                format!("must divide model.n_head = {}", self.n_head),
            ));
        }
        let head_dim = self.n_embd / self.n_head;
        let max_head = crate::kernels::flash_attention::MAX_HEAD_DIM;
        if self.attention_kernel == AttentionKernel::Fused && head_dim > max_head {
            return Err(Error::invalid(
                "model.attention_kernel",
                "fused",
                format!(
                    "the fused kernels take heads of at most {max_head}; n_embd / n_head = \
                     {head_dim} (use \"reference\" or \"auto\")"
                ),
            ));
        }
        if let Some(moe) = &self.moe {
            moe.validate(self.n_layer)?;
        }
        match p.positions {
            PositionKind::Rope => {
                let hd = self.n_embd / self.n_head.max(1);
                if !hd.is_multiple_of(2) {
                    return Err(Error::invalid(
                        "model.positions",
                        "rope",
                        format!("needs an even head size; n_embd / n_head = {hd}"),
                    ));
                }
                if !(p.rope_theta.is_finite() && p.rope_theta > 1.0) {
                    return Err(Error::invalid(
                        "model.rope_theta",
                        p.rope_theta,
                        "must be a finite number > 1",
                    ));
                }
                if self.decay_position_embedding {
                    return Err(Error::invalid(
                        "model.decay_position_embedding",
                        true,
                        "there is no position table with positions = \"rope\"",
                    ));
                }
            }
            PositionKind::Learned => {
                if let Some(theta) = self.rope_theta {
                    return Err(Error::invalid(
                        "model.rope_theta",
                        theta,
                        "applies only with model.positions = \"rope\"",
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            n_layer: 4,
            n_head: 4,
            n_embd: 128,
            block_size: 64,
            bias: false,
            dropout: 0.0,
            vocab_size: 0,
            decay_position_embedding: false,
            arch: ArchKind::Gpt2,
            norm: None,
            norm_eps: None,
            positions: None,
            rope_theta: None,
            mlp: None,
            mlp_hidden: None,
            n_kv_head: None,
            tie_embeddings: None,
            attention_kernel: AttentionKernel::Auto,
            moe: None,
        }
    }
}

/// How the learning rate falls after warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    /// Half a cosine from `lr` to `min_lr` over the steps after warm-up.
    Cosine,
    /// A straight line from `lr` to `min_lr`.
    Linear,
    /// Stay at `lr`.
    Constant,
}

/// Optimisation, schedule, evaluation and checkpointing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches whose gradients are summed before one optimizer step.
    pub grad_accum_steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Learning rate at the end of decay.
    pub min_lr: f64,
    /// Steps of linear warm-up from 0 to `lr`.
    pub warmup_steps: usize,
    /// Decay shape after warm-up.
    pub decay: Decay,
    /// Optimizer steps in the run.
    pub max_steps: usize,
    /// Decoupled (AdamW) weight decay on the decayed tensors.
    pub weight_decay: f64,
    /// Adam β1.
    pub beta1: f64,
    /// Adam β2.
    pub beta2: f64,
    /// Adam ε.
    pub eps: f64,
    /// Clip the global gradient norm to this (0 disables clipping).
    pub grad_clip: f64,
    /// Steps between evaluations of the validation loss.
    pub eval_interval: usize,
    /// Validation batches per evaluation.
    pub eval_batches: usize,
    /// When the run reaches max_steps, also score every token of the validation split (in
    /// consecutive windows, as `kiln eval --data` does): the exact validation loss rather than
    /// the eval_batches estimate. Costs one forward pass over the split.
    pub final_eval_full_split: bool,
    /// Steps between checkpoints (0: only at the end).
    pub checkpoint_interval: usize,
    /// Seed of initialisation, batches and dropout.
    pub seed: u64,
    /// Storage precision.
    pub precision: PrecisionChoice,
    /// The first dynamic loss scale of an f16 run (f32 runs need none and use none).
    pub init_loss_scale: f64,
    /// Clean steps in a row after which an f16 run doubles its loss scale (it halves it, and
    /// skips the step, when gradients overflow).
    pub loss_scale_growth_interval: usize,
    /// Stop the run after this many periodic evaluations in a row without an improvement of the
    /// best validation loss by more than `early_stopping_min_delta` (0: never stop early).
    pub early_stopping_patience: usize,
    /// How much lower than the best so far a validation loss must be to count as an
    /// improvement for early stopping (≥ 0; only with `early_stopping_patience`).
    pub early_stopping_min_delta: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            batch_size: 12,
            grad_accum_steps: 1,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 100,
            decay: Decay::Cosine,
            max_steps: 2000,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            grad_clip: 1.0,
            eval_interval: 250,
            eval_batches: 20,
            checkpoint_interval: 500,
            final_eval_full_split: true,
            seed: 1337,
            precision: PrecisionChoice::Auto,
            init_loss_scale: 65536.0,
            loss_scale_growth_interval: 2000,
            early_stopping_patience: 0,
            early_stopping_min_delta: 0.0,
        }
    }
}

/// Which tokenizer turns the corpus into ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerKind {
    /// One id per distinct character of the corpus.
    Char,
    /// Byte-level BPE trained on the corpus.
    Bpe,
}

/// Corpus and tokenizer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// UTF-8 text file (may be given on the command line instead).
    pub path: String,
    /// Tokenizer kind.
    pub tokenizer: TokenizerKind,
    /// Vocabulary size the BPE tokenizer trains to.
    pub bpe_vocab_size: usize,
    /// Fraction of the corpus, taken from its end, held out for validation.
    pub val_fraction: f64,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            path: String::new(),
            tokenizer: TokenizerKind::Char,
            bpe_vocab_size: 512,
            val_fraction: 0.1,
        }
    }
}

impl Config {
    /// Parses TOML text, applies `key=value` overrides and validates the result.
    pub fn from_toml(text: &str, overrides: &[String]) -> Result<Config> {
        let mut value: toml::Table = toml::from_str(text).map_err(|e| Error::Config {
            message: e.to_string(),
        })?;
        let file = value.clone();
        for o in overrides {
            apply_override(&mut value, o)?;
        }
        let config: Config = match Config::deserialize(value) {
            Ok(c) => c,
            Err(e) => return Err(blame(file, overrides, e)),
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads a TOML file (see [`Config::from_toml`]).
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml(&text, overrides).map_err(|e| match e {
            Error::Config { message } => Error::Config {
                message: format!("{}: {message}", path.display()),
            },
            other => other,
        })
    }

    /// The freeze list and LoRA settings, as the layout builder takes them.
    pub fn adaptation(&self) -> Adaptation {
        Adaptation {
            freeze: self.finetune.freeze.clone(),
            lora: self.lora.clone(),
        }
    }

    /// The dynamic loss scaling an f16 run uses.
    pub fn loss_scaling(&self) -> LossScaling {
        LossScaling {
            init_scale: self.train.init_loss_scale as f32,
            growth_interval: self.train.loss_scale_growth_interval as u32,
            ..LossScaling::default()
        }
    }

    /// Checks every rule that does not depend on the data or the adapter.
    pub fn validate(&self) -> Result<()> {
        let m = &self.model;
        let t = &self.train;
        let positive = [
            ("model.n_layer", m.n_layer),
            ("model.n_head", m.n_head),
            ("model.n_embd", m.n_embd),
            ("model.block_size", m.block_size),
            ("train.batch_size", t.batch_size),
            ("train.grad_accum_steps", t.grad_accum_steps),
            ("train.max_steps", t.max_steps),
            ("train.eval_interval", t.eval_interval),
            ("train.eval_batches", t.eval_batches),
            (
                "train.loss_scale_growth_interval",
                t.loss_scale_growth_interval,
            ),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(Error::invalid(key, v, "must be at least 1"));
            }
        }
        if !m.n_embd.is_multiple_of(m.n_head) {
            return Err(Error::invalid(
                "model.n_embd",
                m.n_embd,
                format!("must be divisible by model.n_head = {}", m.n_head),
            ));
        }
        m.validate_parts()?;
        if !(0.0..1.0).contains(&m.dropout) {
            return Err(Error::invalid(
                "model.dropout",
                m.dropout,
                "must be in [0, 1)",
            ));
        }
        let finite_nonneg = [
            ("train.lr", t.lr),
            ("train.min_lr", t.min_lr),
            ("train.weight_decay", t.weight_decay),
            ("train.grad_clip", t.grad_clip),
        ];
        for (key, v) in finite_nonneg {
            if !v.is_finite() || v < 0.0 {
                return Err(Error::invalid(key, v, "must be a finite number ≥ 0"));
            }
        }
        if t.min_lr > t.lr {
            return Err(Error::invalid(
                "train.min_lr",
                t.min_lr,
                format!("must not exceed train.lr = {}", t.lr),
            ));
        }
        for (key, v) in [("train.beta1", t.beta1), ("train.beta2", t.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(Error::invalid(key, v, "must be in [0, 1)"));
            }
        }
        if !(t.eps.is_finite() && t.eps > 0.0) {
            return Err(Error::invalid(
                "train.eps",
                t.eps,
                "must be a finite number > 0",
            ));
        }
        let limits = LossScaling::default();
        if !(t.init_loss_scale >= f64::from(limits.min_scale)
            && t.init_loss_scale <= f64::from(limits.max_scale))
        {
            return Err(Error::invalid(
                "train.init_loss_scale",
                t.init_loss_scale,
                format!(
                    "must be in [2^-24, 2^24] = [{}, {}]",
                    limits.min_scale, limits.max_scale
                ),
            ));
        }
        if t.loss_scale_growth_interval > u32::MAX as usize {
            return Err(Error::invalid(
                "train.loss_scale_growth_interval",
                t.loss_scale_growth_interval,
                "must fit in 32 bits",
            ));
        }
        validate_early_stopping(t)?;
        if let Some(lora) = &self.lora {
            lora.validate(m)?;
        }
        self.sample.validate().map_err(|e| match e {
            Error::Invalid { key, value, rule } => Error::Invalid {
                key: format!("sample.{}", key.trim_start_matches("sample.")),
                value,
                rule,
            },
            other => other,
        })?;
        let d = &self.data;
        if !(d.val_fraction > 0.0 && d.val_fraction < 1.0) {
            return Err(Error::invalid(
                "data.val_fraction",
                d.val_fraction,
                "must be in (0, 1)",
            ));
        }
        if d.tokenizer == TokenizerKind::Bpe && d.bpe_vocab_size < 257 {
            return Err(Error::invalid(
                "data.bpe_vocab_size",
                d.bpe_vocab_size,
                "must be at least 257 (the 256 bytes plus one merge)",
            ));
        }
        Ok(())
    }
}

/// The error for a config that does not deserialize: the file's own when the file alone fails,
/// else that of the first `--set` that makes it fail (so a bad override is not blamed on the file).
fn blame(file: toml::Table, overrides: &[String], error: toml::de::Error) -> Error {
    if Config::deserialize(file.clone()).is_err() {
        return Error::Config {
            message: error.to_string(),
        };
    }
    let mut value = file;
    for o in overrides {
        if apply_override(&mut value, o).is_err() {
            break;
        }
        if let Err(e) = Config::deserialize(value.clone()) {
            let message = e.to_string();
            return Error::invalid("--set", o, message.trim().replace('\n', " "));
        }
    }
    Error::Config {
        message: error.to_string(),
    }
}

/// Applies `section.key=value` to a parsed table. The value is read as a TOML value (number,
/// bool, quoted string, array), and as a bare string if it is not one.
fn apply_override(table: &mut toml::Table, text: &str) -> Result<()> {
    let (path, raw) = text
        .split_once('=')
        .ok_or_else(|| Error::invalid("--set", text, "expected section.key=value"))?;
    let keys: Vec<&str> = path.trim().split('.').collect();
    if !(2..=3).contains(&keys.len()) || keys.iter().any(|k| k.is_empty()) {
        return Err(Error::invalid(
            "--set",
            text,
            "expected section.key=value (or section.table.key=value, e.g. model.moe.top_k=1), \
             e.g. train.lr=3e-4",
        ));
    }
    let raw = raw.trim();
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let (last, tables) = keys.split_last().expect("two or three keys");
    let mut section = table;
    for (i, key) in tables.iter().enumerate() {
        section = section
            .entry(*key)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| {
                Error::invalid(
                    "--set",
                    text,
                    format!("{} is not a table", keys[..=i].join(".")),
                )
            })?;
    }
    section.insert(last.to_string(), value);
    Ok(())
}

/// Early stopping needs a threshold that can be met and evaluations to judge by.
fn validate_early_stopping(t: &TrainConfig) -> Result<()> {
    let delta = t.early_stopping_min_delta;
    if !delta.is_finite() || delta < 0.0 {
        return Err(Error::invalid(
            "train.early_stopping_min_delta",
            delta,
            "must be a finite number ≥ 0 (how much lower a validation loss must be to count as \
             an improvement)",
        ));
    }
    if t.early_stopping_patience == 0 {
        if delta > 0.0 {
            return Err(Error::invalid(
                "train.early_stopping_min_delta",
                delta,
                "has no effect without train.early_stopping_patience ≥ 1; set both or neither",
            ));
        }
        return Ok(());
    }
    // The periodic evaluations are the only ones early stopping counts; with one or none before
    // the last step there is nothing to compare.
    if t.eval_interval >= t.max_steps {
        return Err(Error::invalid(
            "train.early_stopping_patience",
            t.early_stopping_patience,
            format!(
                "needs evaluations during the run, but train.eval_interval = {} is not below \
                 train.max_steps = {}; lower train.eval_interval or turn early stopping off (0)",
                t.eval_interval, t.max_steps
            ),
        ));
    }
    Ok(())
}
