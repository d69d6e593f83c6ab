//! The whole GPT on the CPU: forward, loss and backward of one micro-batch. It is the oracle the
//! GPU step is tested against, so it walks the same units of the architecture
//! ([`crate::model::arch`]) as the GPU step, each calling the reference ops of this module's
//! siblings with the same argument conventions (llm.c style); the backward is the exact reverse.

use super::dropout::DropoutState;
use super::moe::MoeStats;
use crate::model::arch::Arch;
use crate::model::units::CpuCtx;
use crate::model::{ModelConfig, ParamLayout};
use crate::training::CrossEntropySpec;
use crate::{Error, Result};

/// Batch geometry of one micro-batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GptBatch {
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence (at most the block size).
    pub seq: usize,
}

fn check(
    model: &ModelConfig,
    layout: &ParamLayout,
    params: usize,
    vocab: usize,
    inputs: &[u32],
    b: &GptBatch,
) -> Result<()> {
    if params != layout.buffer_len() {
        return Err(Error::shape(
            "gpt",
            format!(
                "parameter buffer has {params} elements, layout needs {}",
                layout.buffer_len()
            ),
        ));
    }
    if b.seq == 0 || b.batch == 0 || b.seq > model.block_size {
        return Err(Error::shape(
            "gpt",
            format!(
                "batch {b:?} must be non-empty with T ≤ block_size = {}",
                model.block_size
            ),
        ));
    }
    if inputs.len() != b.batch * b.seq {
        return Err(Error::shape(
            "gpt",
            format!(
                "{} input tokens for B×T = {}",
                inputs.len(),
                b.batch * b.seq
            ),
        ));
    }
    if let Some(t) = inputs.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::shape(
            "gpt",
            format!("token {t} is outside the vocabulary of {vocab}"),
        ));
    }
    Ok(())
}

/// Logits (B·T, vocab) of a batch of token ids.
pub fn gpt_logits(
    logits: &mut [f32],
    params: &[f32],
    layout: &ParamLayout,
    model: &ModelConfig,
    vocab: usize,
    inputs: &[u32],
    batch: &GptBatch,
) -> Result<()> {
    check(model, layout, params.len(), vocab, inputs, batch)?;
    let ctx = CpuCtx {
        layout,
        params,
        batch: *batch,
        inputs,
        dloss_scale: 1.0,
        moe_stats: Default::default(),
        lora_dropout: None,
    };
    let (_, out) = Arch::new(model, vocab)?.cpu_forward(&ctx)?;
    if logits.len() != out.len() {
        return Err(Error::shape(
            "gpt",
            format!(
                "logits has {} elements, expected {}",
                logits.len(),
                out.len()
            ),
        ));
    }
    logits.copy_from_slice(&out);
    Ok(())
}

/// One micro-batch: returns the mean cross-entropy over non-ignored targets and writes
/// `dloss_scale ×` the gradient of the training loss (the cross-entropy, plus the weighted
/// auxiliary losses of routed MLPs) with respect to every parameter into `grads` (laid out like
/// `params`), adding to what is there when `accumulate`.
#[allow(clippy::too_many_arguments)]
pub fn gpt_loss_and_grads(
    grads: &mut [f32],
    params: &[f32],
    layout: &ParamLayout,
    model: &ModelConfig,
    vocab: usize,
    inputs: &[u32],
    targets: &[u32],
    batch: &GptBatch,
    dloss_scale: f32,
    accumulate: bool,
) -> Result<f32> {
    gpt_loss_grads_and_moe(
        grads,
        params,
        layout,
        model,
        vocab,
        inputs,
        targets,
        batch,
        dloss_scale,
        accumulate,
    )
    .map(|(loss, _)| loss)
}

/// [`gpt_loss_and_grads`], also returning each routed MLP's statistics (load and unweighted
/// auxiliary losses), in layer order.
#[allow(clippy::too_many_arguments)]
pub fn gpt_loss_grads_and_moe(
    grads: &mut [f32],
    params: &[f32],
    layout: &ParamLayout,
    model: &ModelConfig,
    vocab: usize,
    inputs: &[u32],
    targets: &[u32],
    batch: &GptBatch,
    dloss_scale: f32,
    accumulate: bool,
) -> Result<(f32, Vec<MoeStats>)> {
    loss_and_grads(
        grads,
        params,
        layout,
        model,
        vocab,
        inputs,
        targets,
        batch,
        dloss_scale,
        accumulate,
        None,
    )
}

/// [`gpt_loss_and_grads`] with the LoRA adapters' input dropout (`lora.dropout`) drawn from
/// `lora_dropout`: each adapted linear's adapter sees `dropout(x)` at its own site, as the GPU
/// training step does for the micro-batch whose state this is (key
/// [`DropoutState::key_for`]`(seed, step, micro)`, probability `lora.dropout`). The base path
/// and the model's own dropout sites are unaffected (the reference has no model dropout).
#[allow(clippy::too_many_arguments)]
pub fn gpt_loss_and_grads_lora_dropout(
    grads: &mut [f32],
    params: &[f32],
    layout: &ParamLayout,
    model: &ModelConfig,
    vocab: usize,
    inputs: &[u32],
    targets: &[u32],
    batch: &GptBatch,
    dloss_scale: f32,
    accumulate: bool,
    lora_dropout: &DropoutState,
) -> Result<f32> {
    loss_and_grads(
        grads,
        params,
        layout,
        model,
        vocab,
        inputs,
        targets,
        batch,
        dloss_scale,
        accumulate,
        Some(*lora_dropout),
    )
    .map(|(loss, _)| loss)
}

#[allow(clippy::too_many_arguments)]
fn loss_and_grads(
    grads: &mut [f32],
    params: &[f32],
    layout: &ParamLayout,
    model: &ModelConfig,
    vocab: usize,
    inputs: &[u32],
    targets: &[u32],
    batch: &GptBatch,
    dloss_scale: f32,
    accumulate: bool,
    lora_dropout: Option<DropoutState>,
) -> Result<(f32, Vec<MoeStats>)> {
    check(model, layout, params.len(), vocab, inputs, batch)?;
    if grads.len() != params.len() || targets.len() != inputs.len() {
        return Err(Error::shape(
            "gpt",
            "grads must match params and targets must match inputs",
        ));
    }
    let ctx = CpuCtx {
        layout,
        params,
        batch: *batch,
        inputs,
        dloss_scale,
        moe_stats: Default::default(),
        lora_dropout,
    };
    let (states, logits) = Arch::new(model, vocab)?.cpu_forward(&ctx)?;
    let bt = batch.batch * batch.seq;

    // Loss and dlogits in one call, as the fused GPU kernel does.
    let spec = CrossEntropySpec::new(bt, vocab);
    let mut losses = vec![0.0f32; bt];
    let mut dlogits = vec![0.0f32; bt * vocab];
    let count = super::crossentropy::crossentropy(
        &mut losses,
        &mut dlogits,
        &logits,
        targets,
        dloss_scale,
        &spec,
    )?;
    let loss = (losses.iter().map(|&l| f64::from(l)).sum::<f64>() / count.max(1) as f64) as f32;

    // Gradients of this micro-batch go to a fresh buffer, then into `grads`.
    let mut g = vec![0.0f32; grads.len()];
    Arch::cpu_backward(states, &ctx, &mut g, dlogits)?;
    if accumulate {
        for (a, b) in grads.iter_mut().zip(&g) {
            *a += b;
        }
    } else {
        grads.copy_from_slice(&g);
    }
    Ok((loss, ctx.moe_stats.into_inner()))
}
