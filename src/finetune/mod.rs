//! Adapting a trained model: fine-tuning from a checkpoint's weights, freezing tensors and LoRA
//! adapters (saved in Hugging Face PEFT's layout).
//!
//! The config's `[finetune]` table names the tensors to keep fixed and records the checkpoint a
//! run started from; `[lora]` adds low-rank adapters to chosen linear layers and freezes every
//! base weight. Both work by ordering the parameter layout ([`crate::model::ParamLayout`]):
//! trainable tensors first, frozen ones after, so that gradients, f32 master weights and Adam
//! moments exist only for the leading, trainable part of the flat buffer (see
//! [`layout::adapted`]). The units read the LoRA tensors through the layout, as they read
//! quantised matrices through the context: a linear layer whose `PREFIX.lora_A.weight` exists
//! adds `(alpha/rank)·B·(A·x)` to its output.

pub mod corpus;
pub mod freeze;
pub mod layout;
pub mod lora;
pub mod merge;
pub mod peft;

use crate::model::{MlpKind, ModelConfig};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// `[finetune]`: what a run adapted from a checkpoint keeps fixed, and where it started.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FinetuneConfig {
    /// Tensors kept fixed (see [`freeze`] for the patterns): no weight gradients, no AdamW
    /// work, no master copy or moments on the GPU.
    pub freeze: Vec<String>,
    /// The checkpoint folder the run's weights came from (`kiln train --init-from`), recorded
    /// for provenance and as the adapter's `base_model_name_or_path`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_from: Option<String>,
}

impl FinetuneConfig {
    /// True when the table says nothing (it is then left out of a saved config.toml).
    pub fn is_empty(&self) -> bool {
        self.freeze.is_empty() && self.init_from.is_none()
    }
}

/// A linear layer of every block that LoRA can adapt, named the same in both architectures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum LoraTarget {
    /// The fused query|key|value projection (GPT-2 `attn.c_attn`; Llama `q_proj`, `k_proj`,
    /// `v_proj`).
    #[serde(rename = "attn.qkv")]
    AttnQkv,
    /// The attention output projection (GPT-2 `attn.c_proj`; Llama `o_proj`).
    #[serde(rename = "attn.proj")]
    AttnProj,
    /// The MLP's input projection (GPT-2 `mlp.c_fc`; Llama `gate_proj` and `up_proj`).
    #[serde(rename = "mlp.fc")]
    MlpFc,
    /// The MLP's output projection (GPT-2 `mlp.c_proj`; Llama `down_proj`).
    #[serde(rename = "mlp.proj")]
    MlpProj,
}

impl LoraTarget {
    /// Every target, in block order.
    pub const ALL: [LoraTarget; 4] = [
        LoraTarget::AttnQkv,
        LoraTarget::AttnProj,
        LoraTarget::MlpFc,
        LoraTarget::MlpProj,
    ];

    /// The name used in configs.
    pub fn name(self) -> &'static str {
        match self {
            LoraTarget::AttnQkv => "attn.qkv",
            LoraTarget::AttnProj => "attn.proj",
            LoraTarget::MlpFc => "mlp.fc",
            LoraTarget::MlpProj => "mlp.proj",
        }
    }

    /// (fan_in, fan_out) of this layer in `model`.
    pub fn dims(self, model: &ModelConfig) -> (usize, usize) {
        let p = model.parts();
        let c = model.n_embd;
        let head_dim = c / model.n_head.max(1);
        match self {
            LoraTarget::AttnQkv => (c, (model.n_head + 2 * p.n_kv_head) * head_dim),
            LoraTarget::AttnProj => (c, c),
            LoraTarget::MlpFc => match p.mlp {
                MlpKind::Gelu => (c, p.mlp_hidden),
                MlpKind::SwiGlu => (c, 2 * p.mlp_hidden),
            },
            LoraTarget::MlpProj => (p.mlp_hidden, c),
        }
    }
}

/// `[lora]`: low-rank adapters on the `targets` of every block. The base weights are frozen;
/// each adapted layer computes `W·x + (alpha/rank)·B·(A·x)` (with `dropout` on the adapter's
/// x while training) with A (rank × fan_in, drawn as
/// PEFT does) and B (fan_out × rank, zero at the start), the only trainable tensors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank r of the update: at least 1, at most the smaller dimension of every adapted layer.
    pub rank: usize,
    /// The update is scaled by alpha / rank.
    pub alpha: f64,
    /// Dropout on the adapter's input (PEFT's `lora_dropout`), in [0, 1): while training, each
    /// adapted layer computes `W·x + (alpha/rank)·B·A·dropout(x)` (inverted dropout, its own
    /// mask per layer, micro-batch and step); evaluation, sampling and merging never drop.
    pub dropout: f32,
    /// The layers adapted in every block.
    pub targets: Vec<LoraTarget>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: vec![LoraTarget::AttnQkv, LoraTarget::AttnProj],
        }
    }
}

impl LoraConfig {
    /// alpha / rank, the factor of B·A.
    pub fn scale(&self) -> f32 {
        (self.alpha / self.rank as f64) as f32
    }

    /// Checks the settings against each other and against `model`'s layer sizes.
    pub fn validate(&self, model: &ModelConfig) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::invalid(
                "lora.rank",
                0,
                "must be at least 1 (the rank of the update B·A)",
            ));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(Error::invalid(
                "lora.alpha",
                self.alpha,
                "must be a finite number > 0 (the update is scaled by alpha / rank)",
            ));
        }
        // `contains` is false for NaN too.
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::invalid(
                "lora.dropout",
                self.dropout,
                "must be in [0, 1): the probability of dropping an element of each adapter's \
                 input while training (PEFT's lora_dropout)",
            ));
        }
        if self.targets.is_empty() {
            return Err(Error::invalid(
                "lora.targets",
                "[]",
                "name at least one of \"attn.qkv\", \"attn.proj\", \"mlp.fc\", \"mlp.proj\"",
            ));
        }
        let mut seen = self.targets.clone();
        seen.sort();
        seen.dedup();
        if seen.len() != self.targets.len() {
            return Err(Error::invalid(
                "lora.targets",
                format!(
                    "{:?}",
                    self.targets.iter().map(|t| t.name()).collect::<Vec<_>>()
                ),
                "names a layer twice",
            ));
        }
        for t in &self.targets {
            let (fan_in, fan_out) = t.dims(model);
            let limit = fan_in.min(fan_out);
            if self.rank > limit {
                return Err(Error::invalid(
                    "lora.rank",
                    self.rank,
                    format!(
                        "must not exceed the smaller dimension of every adapted layer: {} is \
                         {fan_out}×{fan_in}, so at most {limit}",
                        t.name()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// How a model is adapted: the config's `[finetune]` freeze list and `[lora]` table, as the
/// layout builder takes them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Adaptation {
    /// Freeze patterns ([`freeze`]).
    pub freeze: Vec<String>,
    /// LoRA adapters, if any.
    pub lora: Option<LoraConfig>,
}

impl Adaptation {
    /// True when nothing is frozen and there are no adapters: the plain layout.
    pub fn is_none(&self) -> bool {
        self.freeze.is_empty() && self.lora.is_none()
    }
}
