//! The GPT on the GPU: every buffer and every dispatch of a training step built once, then
//! recorded each step with no allocation and no waiting on the host.
//!
//! Parameters live in one flat buffer (the working copy, in the storage precision) described by
//! [`ParamLayout`]; gradients (same precision) mirror it, as do the f32 master weights and Adam
//! moments. Kernels address single tensors through views of those buffers, which the layout
//! aligns to the adapter's storage-offset alignment. The forward, loss and backward of one
//! micro-batch are one list of prepared ops ([`Record`]); the optimizer is another. The sequence
//! mirrors [`crate::cpu::gpt`] op for op, which is what the whole-step test compares.

use super::{ModelConfig, ParamLayout};
use crate::cpu::gpt::GptBatch;
use crate::gpu::{DType, Gpu, GpuTensor};
use crate::kernels::Record;
use crate::kernels::activation::{GeluBackward, GeluForward};
use crate::kernels::adamw::AdamW;
use crate::kernels::attention::{AttentionBackward, AttentionDropout, AttentionForward};
use crate::kernels::crossentropy::CrossEntropy;
use crate::kernels::dropout::{Dropout, DropoutState};
use crate::kernels::embedding::{EmbeddingBackward, EmbeddingForward};
use crate::kernels::gradnorm::GradNorm;
use crate::kernels::layernorm::{LayerNormBackward, LayerNormForward};
use crate::kernels::lossscale::LossScaler;
use crate::kernels::matmul::Matmul;
use crate::kernels::residual::ResidualForward;
use crate::ops::{AttentionShape, EmbeddingShape, LayerNormSpec, Layout, MatmulSpec};
use crate::training::{AdamWStep, CrossEntropySpec, LossScaling};
use crate::{Error, Precision, Result};

/// Per-layer activations kept for the backward pass.
struct LayerActs {
    input: GpuTensor,
    ln1: GpuTensor,
    ln1_mean: GpuTensor,
    ln1_rstd: GpuTensor,
    qkv: GpuTensor,
    probs: GpuTensor,
    att: GpuTensor,
    resid: GpuTensor,
    ln2: GpuTensor,
    ln2_mean: GpuTensor,
    ln2_rstd: GpuTensor,
    fc: GpuTensor,
    gelu: GpuTensor,
    /// The attention probabilities after dropout (only with dropout).
    dropped: Option<GpuTensor>,
}

impl LayerActs {
    /// The dropout of this layer's attention probabilities, when there is one.
    fn attention_dropout<'a>(
        &'a self,
        state: &'a GpuTensor,
        site: u32,
    ) -> Option<AttentionDropout<'a>> {
        self.dropped.as_ref().map(|dropped| AttentionDropout {
            dropped,
            state,
            site,
        })
    }
}

/// Layer `l`'s dropout sites, distinct across the network: attention probabilities, attention
/// branch, MLP branch.
fn dropout_sites(l: usize) -> [u32; 3] {
    let base = 3 * l as u32;
    [base, base + 1, base + 2]
}

/// u32 words of a staged [`DropoutState`].
const DROPOUT_WORDS: usize = 4;

/// Buffers of the whole run (see the module docs).
pub struct GptGpu {
    model: ModelConfig,
    vocab: usize,
    batch: GptBatch,
    precision: Precision,
    layout: ParamLayout,
    params: GpuTensor,
    grads: GpuTensor,
    master: GpuTensor,
    exp_avg: GpuTensor,
    exp_avg_sq: GpuTensor,
    skipped: GpuTensor,
    norm: GpuTensor,
    flag: GpuTensor,
    tokens: GpuTensor,
    staged: GpuTensor,
    micro_batches: usize,
    targets: GpuTensor,
    order: GpuTensor,
    starts: GpuTensor,
    loss_scale: GpuTensor,
    scale_run: GpuTensor,
    dropout_state: GpuTensor,
    dropout_seed: u64,
    scaler: Option<LossScaler>,
    losses: GpuTensor,
    forward: Vec<Box<dyn Record>>,
    loss: CrossEntropy,
    backward: Vec<Box<dyn Record>>,
    update: Vec<Box<dyn Record>>,
    adamw: AdamW,
    logits: GpuTensor,
    // Kept alive for the bind groups above (wgpu keeps buffers alive through bind groups too;
    // holding them also lets tests read intermediate values).
    acts: Vec<LayerActs>,
    _scratch: Vec<GpuTensor>,
}

/// One op of a training step timed on its own ([`GptGpu::profile`]).
#[derive(Clone, Debug)]
pub struct OpTime {
    /// `forward`, `loss`, `backward` or `update`.
    pub phase: &'static str,
    /// The op's type, e.g. `matmul::Matmul`.
    pub name: &'static str,
    /// Median seconds of the op alone, submit to completion.
    pub seconds: f64,
}

/// Views of one flat buffer by tensor name.
struct Views<'a> {
    layout: &'a ParamLayout,
    flat: &'a GpuTensor,
}

impl Views<'_> {
    fn get(&self, name: &str) -> Result<GpuTensor> {
        let t = self
            .layout
            .get(name)
            .ok_or_else(|| Error::shape("gpt", format!("the layout has no tensor {name}")))?;
        self.flat.view(name, t.offset, &t.shape)
    }
    fn opt(&self, name: &str) -> Result<Option<GpuTensor>> {
        match self.layout.get(name) {
            Some(_) => self.get(name).map(Some),
            None => Ok(None),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn linear(
    gpu: &Gpu,
    y: &GpuTensor,
    x: &GpuTensor,
    w: &GpuTensor,
    b: Option<&GpuTensor>,
    rows: usize,
    fan_in: usize,
    fan_out: usize,
) -> Result<Box<dyn Record>> {
    Ok(Box::new(Matmul::new(
        gpu,
        y,
        x,
        w,
        b,
        &MatmulSpec::new(Layout::NT, rows, fan_out, fan_in),
    )?))
}

/// dX = dY·W (overwritten), dW += dYᵀ·X, db += 1ᵀ·dY.
#[allow(clippy::too_many_arguments)]
fn linear_backward(
    gpu: &Gpu,
    ops: &mut Vec<Box<dyn Record>>,
    dx: &GpuTensor,
    dw: &GpuTensor,
    db: Option<&GpuTensor>,
    dy: &GpuTensor,
    x: &GpuTensor,
    w: &GpuTensor,
    ones: &GpuTensor,
    (rows, fan_in, fan_out): (usize, usize, usize),
) -> Result<()> {
    ops.push(Box::new(Matmul::new(
        gpu,
        dx,
        dy,
        w,
        None,
        &MatmulSpec::new(Layout::NN, rows, fan_in, fan_out),
    )?));
    ops.push(Box::new(Matmul::new(
        gpu,
        dw,
        dy,
        x,
        None,
        &MatmulSpec::new(Layout::TN, fan_out, fan_in, rows).accumulate(true),
    )?));
    if let Some(db) = db {
        // The bias gradient is a column sum: a 1×rows by rows×fan_out product, deterministic.
        ops.push(Box::new(Matmul::new(
            gpu,
            db,
            ones,
            dy,
            None,
            &MatmulSpec::new(Layout::TN, 1, fan_out, rows).accumulate(true),
        )?));
    }
    Ok(())
}

impl GptGpu {
    /// Allocates every buffer and prepares every dispatch for micro-batches of `batch`.
    /// `micro_batches` is the most micro-batches one optimizer step will use (gradient
    /// accumulation): their token buffers are allocated here too.
    pub fn new(
        gpu: &Gpu,
        model: &ModelConfig,
        vocab: usize,
        batch: GptBatch,
        micro_batches: usize,
    ) -> Result<Self> {
        if micro_batches == 0 {
            return Err(Error::invalid(
                "train.grad_accum_steps",
                0,
                "must be at least 1",
            ));
        }
        if batch.seq == 0 || batch.batch == 0 || batch.seq > model.block_size {
            return Err(Error::shape(
                "gpt",
                format!(
                    "batch {batch:?} must be non-empty with T ≤ block_size = {}",
                    model.block_size
                ),
            ));
        }
        let precision = gpu.precision();
        let dt = DType::from(precision);
        // Every tensor starts where any storage binding may (alignment counted in the smallest
        // element, f16), and at a multiple of 4 elements for the vectorised matmul.
        let align = (gpu
            .capabilities()
            .limits
            .min_storage_buffer_offset_alignment as usize
            / 2)
        .max(4);
        let layout = ParamLayout::gpt(model, vocab, align)?;
        let n = layout.buffer_len();
        let params = gpu.zeros("params", &[n], dt)?;
        let grads = gpu.zeros("grads", &[n], dt)?;
        let master = gpu.zeros("master", &[n], DType::F32)?;
        let exp_avg = gpu.zeros("adam m", &[n], DType::F32)?;
        let exp_avg_sq = gpu.zeros("adam v", &[n], DType::F32)?;
        let skipped = gpu.zeros("skipped steps", &[1], DType::U32)?;
        let norm = gpu.zeros("grad norm", &[1], DType::F32)?;
        let flag = gpu.zeros("nonfinite flag", &[1], DType::U32)?;

        let (b, t, c) = (batch.batch, batch.seq, model.n_embd);
        let bt = b * t;
        let tokens = gpu.zeros("tokens", &[bt], DType::U32)?;
        let targets = gpu.zeros("targets", &[bt], DType::U32)?;
        let order = gpu.zeros("token order", &[bt], DType::U32)?;
        let starts = gpu.zeros("token starts", &[vocab + 1], DType::U32)?;
        // Every micro-batch of a step is uploaded at once and copied into place inside the step's
        // single submission (see `step`).
        let staged = gpu.zeros(
            "staged batches",
            &[micro_batches * (3 * bt + vocab + 1 + DROPOUT_WORDS)],
            DType::U32,
        )?;
        // The dynamic loss scale (1 until enable_loss_scaling) and its run of clean steps.
        let loss_scale = gpu.upload("loss scale", &[1], DType::F32, &[1.0])?;
        let scale_run = gpu.zeros("loss scale clean run", &[1], DType::U32)?;
        // Staged with each micro-batch (a fresh mask per step and micro-batch); off until then.
        let dropout_state = gpu.zeros("dropout state", &[DROPOUT_WORDS], DType::U32)?;
        let dropping = model.dropout > 0.0;
        let losses = gpu.zeros("losses", &[bt], DType::F32)?;
        let ones = gpu.upload("ones", &[bt], dt, &vec![1.0; bt])?;
        let zero_bias = gpu.zeros("zero norm bias", &[c], dt)?;
        let scratch_dbias = gpu.zeros("unused norm bias grad", &[c], dt)?;

        let p = Views {
            layout: &layout,
            flat: &params,
        };
        let g = Views {
            layout: &layout,
            flat: &grads,
        };
        let act = |name: &str, len: usize| gpu.zeros(name, &[len], dt);
        let stat = |name: &str| gpu.zeros(name, &[bt], DType::F32);
        let ln_spec = LayerNormSpec::new(bt, c);
        let att_shape = AttentionShape {
            batch: b,
            seq: t,
            channels: c,
            heads: model.n_head,
        };
        let emb = EmbeddingShape {
            batch: b,
            seq: t,
            channels: c,
            vocab,
            positions: model.block_size,
        };

        // ---- forward ----
        let mut forward: Vec<Box<dyn Record>> = Vec::new();
        let embedded = act("embedded", bt * c)?;
        forward.push(Box::new(EmbeddingForward::new(
            gpu,
            &embedded,
            &tokens,
            &p.get("wte.weight")?,
            &p.get("wpe.weight")?,
            &emb,
        )?));
        let mut acts: Vec<LayerActs> = Vec::new();
        let mut x = embedded;
        for l in 0..model.n_layer {
            let name = |s: &str| format!("h.{l}.{s}");
            let a = LayerActs {
                input: x,
                ln1: act(&name("ln1"), bt * c)?,
                ln1_mean: stat(&name("ln1 mean"))?,
                ln1_rstd: stat(&name("ln1 rstd"))?,
                qkv: act(&name("qkv"), bt * 3 * c)?,
                probs: act(&name("probs"), att_shape.probs_len())?,
                att: act(&name("att"), bt * c)?,
                resid: act(&name("resid"), bt * c)?,
                ln2: act(&name("ln2"), bt * c)?,
                ln2_mean: stat(&name("ln2 mean"))?,
                ln2_rstd: stat(&name("ln2 rstd"))?,
                fc: act(&name("fc"), bt * 4 * c)?,
                gelu: act(&name("gelu"), bt * 4 * c)?,
                dropped: if dropping {
                    Some(act(&name("probs dropped"), att_shape.probs_len())?)
                } else {
                    None
                },
            };
            let proj = act(&name("attn proj"), bt * c)?;
            let mlp = act(&name("mlp out"), bt * c)?;
            let out = act(&name("out"), bt * c)?;
            let ln1_b = p.opt(&name("ln_1.bias"))?;
            forward.push(Box::new(LayerNormForward::new(
                gpu,
                &a.ln1,
                &a.ln1_mean,
                &a.ln1_rstd,
                &a.input,
                &p.get(&name("ln_1.weight"))?,
                ln1_b.as_ref().unwrap_or(&zero_bias),
                &ln_spec,
            )?));
            forward.push(linear(
                gpu,
                &a.qkv,
                &a.ln1,
                &p.get(&name("attn.c_attn.weight"))?,
                p.opt(&name("attn.c_attn.bias"))?.as_ref(),
                bt,
                c,
                3 * c,
            )?);
            let [site_probs, site_attn, site_mlp] = dropout_sites(l);
            let att_dropout = a.attention_dropout(&dropout_state, site_probs);
            forward.push(Box::new(AttentionForward::with_dropout(
                gpu,
                &a.att,
                &a.probs,
                &a.qkv,
                &att_shape,
                att_dropout,
            )?));
            forward.push(linear(
                gpu,
                &proj,
                &a.att,
                &p.get(&name("attn.c_proj.weight"))?,
                p.opt(&name("attn.c_proj.bias"))?.as_ref(),
                bt,
                c,
                c,
            )?);
            if dropping {
                forward.push(Box::new(Dropout::new(
                    gpu,
                    &proj,
                    None,
                    &dropout_state,
                    site_attn,
                )?));
            }
            forward.push(Box::new(ResidualForward::new(
                gpu, &a.resid, &a.input, &proj,
            )?));
            let ln2_b = p.opt(&name("ln_2.bias"))?;
            forward.push(Box::new(LayerNormForward::new(
                gpu,
                &a.ln2,
                &a.ln2_mean,
                &a.ln2_rstd,
                &a.resid,
                &p.get(&name("ln_2.weight"))?,
                ln2_b.as_ref().unwrap_or(&zero_bias),
                &ln_spec,
            )?));
            forward.push(linear(
                gpu,
                &a.fc,
                &a.ln2,
                &p.get(&name("mlp.c_fc.weight"))?,
                p.opt(&name("mlp.c_fc.bias"))?.as_ref(),
                bt,
                c,
                4 * c,
            )?);
            forward.push(Box::new(GeluForward::new(gpu, &a.gelu, &a.fc)?));
            forward.push(linear(
                gpu,
                &mlp,
                &a.gelu,
                &p.get(&name("mlp.c_proj.weight"))?,
                p.opt(&name("mlp.c_proj.bias"))?.as_ref(),
                bt,
                4 * c,
                c,
            )?);
            if dropping {
                forward.push(Box::new(Dropout::new(
                    gpu,
                    &mlp,
                    None,
                    &dropout_state,
                    site_mlp,
                )?));
            }
            forward.push(Box::new(ResidualForward::new(gpu, &out, &a.resid, &mlp)?));
            acts.push(a);
            x = out;
        }
        let final_in = x;
        let lnf = act("lnf", bt * c)?;
        let (lnf_mean, lnf_rstd) = (stat("lnf mean")?, stat("lnf rstd")?);
        let lnf_b = p.opt("ln_f.bias")?;
        forward.push(Box::new(LayerNormForward::new(
            gpu,
            &lnf,
            &lnf_mean,
            &lnf_rstd,
            &final_in,
            &p.get("ln_f.weight")?,
            lnf_b.as_ref().unwrap_or(&zero_bias),
            &ln_spec,
        )?));
        let logits = act("logits", bt * vocab)?;
        let wte = p.get("wte.weight")?;
        forward.push(linear(gpu, &logits, &lnf, &wte, None, bt, c, vocab)?);

        // ---- loss: per-row loss and dlogits in one kernel ----
        let dlogits = act("dlogits", bt * vocab)?;
        let ce = CrossEntropy::new(
            gpu,
            &losses,
            &dlogits,
            &logits,
            &targets,
            Some(&loss_scale),
            &CrossEntropySpec::new(bt, vocab),
        )?;
        let loss = ce;

        // ---- backward: the forward in reverse ----
        let mut backward: Vec<Box<dyn Record>> = Vec::new();
        let dlnf = act("dlnf", bt * c)?;
        let dresid = act("dresid", bt * c)?;
        linear_backward(
            gpu,
            &mut backward,
            &dlnf,
            &g.get("wte.weight")?,
            None,
            &dlogits,
            &lnf,
            &wte,
            &ones,
            (bt, c, vocab),
        )?;
        let acc_params = LayerNormSpec {
            accumulate_params: true,
            ..ln_spec
        };
        let gb_lnf = g.opt("ln_f.bias")?;
        backward.push(Box::new(LayerNormBackward::new(
            gpu,
            &dresid,
            &g.get("ln_f.weight")?,
            gb_lnf.as_ref().unwrap_or(&scratch_dbias),
            &dlnf,
            &final_in,
            &p.get("ln_f.weight")?,
            &lnf_mean,
            &lnf_rstd,
            &acc_params,
        )?));
        let dgelu = act("dgelu", bt * 4 * c)?;
        let dfc = act("dfc", bt * 4 * c)?;
        let dln = act("dln", bt * c)?;
        let datt = act("datt", bt * c)?;
        let dqkv = act("dqkv", bt * 3 * c)?;
        let dprobs = act("dprobs", att_shape.probs_len())?;
        let acc_both = LayerNormSpec {
            accumulate_input: true,
            ..acc_params
        };
        // The gradient reaching a dropped residual branch: dropout(dresid), same mask.
        let dbranch = act("dbranch", bt * c)?;
        let branch_grad = |backward: &mut Vec<Box<dyn Record>>, site| -> Result<&GpuTensor> {
            if !dropping {
                return Ok(&dresid);
            }
            backward.push(Box::new(Dropout::new(
                gpu,
                &dbranch,
                Some(&dresid),
                &dropout_state,
                site,
            )?));
            Ok(&dbranch)
        };
        for l in (0..model.n_layer).rev() {
            let a = &acts[l];
            let name = |s: &str| format!("h.{l}.{s}");
            let [site_probs, site_attn, site_mlp] = dropout_sites(l);
            let dmlp = branch_grad(&mut backward, site_mlp)?;
            linear_backward(
                gpu,
                &mut backward,
                &dgelu,
                &g.get(&name("mlp.c_proj.weight"))?,
                g.opt(&name("mlp.c_proj.bias"))?.as_ref(),
                dmlp,
                &a.gelu,
                &p.get(&name("mlp.c_proj.weight"))?,
                &ones,
                (bt, 4 * c, c),
            )?;
            backward.push(Box::new(GeluBackward::new(
                gpu, &dfc, &dgelu, &a.fc, false,
            )?));
            linear_backward(
                gpu,
                &mut backward,
                &dln,
                &g.get(&name("mlp.c_fc.weight"))?,
                g.opt(&name("mlp.c_fc.bias"))?.as_ref(),
                &dfc,
                &a.ln2,
                &p.get(&name("mlp.c_fc.weight"))?,
                &ones,
                (bt, c, 4 * c),
            )?;
            let gb = g.opt(&name("ln_2.bias"))?;
            backward.push(Box::new(LayerNormBackward::new(
                gpu,
                &dresid,
                &g.get(&name("ln_2.weight"))?,
                gb.as_ref().unwrap_or(&scratch_dbias),
                &dln,
                &a.resid,
                &p.get(&name("ln_2.weight"))?,
                &a.ln2_mean,
                &a.ln2_rstd,
                &acc_both,
            )?));
            let dproj = branch_grad(&mut backward, site_attn)?;
            linear_backward(
                gpu,
                &mut backward,
                &datt,
                &g.get(&name("attn.c_proj.weight"))?,
                g.opt(&name("attn.c_proj.bias"))?.as_ref(),
                dproj,
                &a.att,
                &p.get(&name("attn.c_proj.weight"))?,
                &ones,
                (bt, c, c),
            )?;
            let att_dropout = a.attention_dropout(&dropout_state, site_probs);
            backward.push(Box::new(AttentionBackward::with_dropout(
                gpu,
                &dqkv,
                &dprobs,
                &datt,
                &a.qkv,
                &a.probs,
                &att_shape,
                att_dropout,
            )?));
            linear_backward(
                gpu,
                &mut backward,
                &dln,
                &g.get(&name("attn.c_attn.weight"))?,
                g.opt(&name("attn.c_attn.bias"))?.as_ref(),
                &dqkv,
                &a.ln1,
                &p.get(&name("attn.c_attn.weight"))?,
                &ones,
                (bt, c, 3 * c),
            )?;
            let gb = g.opt(&name("ln_1.bias"))?;
            backward.push(Box::new(LayerNormBackward::new(
                gpu,
                &dresid,
                &g.get(&name("ln_1.weight"))?,
                gb.as_ref().unwrap_or(&scratch_dbias),
                &dln,
                &a.input,
                &p.get(&name("ln_1.weight"))?,
                &a.ln1_mean,
                &a.ln1_rstd,
                &acc_both,
            )?));
        }
        backward.push(Box::new(EmbeddingBackward::new(
            gpu,
            &g.get("wte.weight")?,
            &g.get("wpe.weight")?,
            &dresid,
            &order,
            &starts,
            &emb,
            true,
        )?));

        // ---- update: global norm, then AdamW over the whole buffer ----
        let segments = layout.adamw_segments();
        let grad_norm = GradNorm::new(gpu, &norm, &flag, &grads)?;
        let adamw = AdamW::new(
            gpu,
            &master,
            &params,
            &exp_avg,
            &exp_avg_sq,
            &skipped,
            &grads,
            &norm,
            &flag,
            &loss_scale,
            &segments,
            &AdamWStep::new(1),
        )?;
        let update: Vec<Box<dyn Record>> = vec![Box::new(grad_norm)];

        Ok(GptGpu {
            model: model.clone(),
            vocab,
            batch,
            precision,
            layout,
            params,
            grads,
            master,
            exp_avg,
            exp_avg_sq,
            skipped,
            norm,
            flag,
            tokens,
            staged,
            micro_batches,
            targets,
            order,
            starts,
            loss_scale,
            scale_run,
            dropout_state,
            dropout_seed: 0,
            scaler: None,
            losses,
            forward,
            loss,
            backward,
            update,
            adamw,
            logits,
            acts,
            _scratch: vec![
                ones,
                zero_bias,
                scratch_dbias,
                dlogits,
                dlnf,
                dresid,
                dgelu,
                dfc,
                dln,
                datt,
                dqkv,
                dprobs,
                lnf,
                final_in,
                lnf_mean,
                lnf_rstd,
            ],
        })
    }

    /// The parameter layout (aligned for this adapter).
    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    /// Storage precision of parameters, gradients and activations.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The micro-batch geometry the plan was built for.
    pub fn batch(&self) -> GptBatch {
        self.batch
    }

    /// Number of dispatches of one optimizer step with `micro_batches` micro-batches.
    pub fn dispatches_per_step(&self, micro_batches: usize) -> usize {
        micro_batches * (self.forward.len() + 1 + self.backward.len()) + self.update.len() + 1
    }

    /// Sets the f32 master weights and the working copy from a flat buffer laid out by
    /// [`GptGpu::layout`], and zeroes the Adam moments.
    pub fn set_weights(&self, gpu: &Gpu, master: &[f32]) -> Result<()> {
        self.set_state(gpu, master, None)
    }

    /// Sets master weights, working copy and (when given) the Adam moments, e.g. from a checkpoint.
    pub fn set_state(
        &self,
        gpu: &Gpu,
        master: &[f32],
        moments: Option<(&[f32], &[f32])>,
    ) -> Result<()> {
        gpu.write(&self.master, master)?;
        gpu.write(&self.params, master)?;
        match moments {
            Some((m, v)) => {
                gpu.write(&self.exp_avg, m)?;
                gpu.write(&self.exp_avg_sq, v)?;
            }
            None => {
                let zeros = vec![0.0; master.len()];
                gpu.write(&self.exp_avg, &zeros)?;
                gpu.write(&self.exp_avg_sq, &zeros)?;
            }
        }
        Ok(())
    }

    /// The u32 words of one micro-batch as the GPU wants them: tokens, targets, then the token
    /// index (positions grouped by token, and each token's start) the embedding backward uses.
    fn batch_words(
        &self,
        inputs: &[u32],
        targets: &[u32],
        dropout: &DropoutState,
    ) -> Result<Vec<u32>> {
        let n = self.batch.batch * self.batch.seq;
        if inputs.len() != n || targets.len() != n {
            return Err(Error::shape(
                "gpt",
                format!(
                    "a micro-batch needs {n} inputs and targets, got {} and {}",
                    inputs.len(),
                    targets.len()
                ),
            ));
        }
        if let Some(t) = targets
            .iter()
            .find(|&&t| t != u32::MAX && t as usize >= self.vocab)
        {
            return Err(Error::shape(
                "gpt",
                format!("target {t} is outside the vocabulary of {}", self.vocab),
            ));
        }
        let (order, starts) = crate::cpu::embedding::token_index(inputs, self.vocab)?;
        let mut words = Vec::with_capacity(3 * n + starts.len());
        words.extend_from_slice(inputs);
        words.extend_from_slice(targets);
        words.extend_from_slice(&order);
        words.extend_from_slice(&starts);
        words.extend_from_slice(bytemuck::cast_slice(std::slice::from_ref(dropout)));
        Ok(words)
    }

    /// Records the copies that put staged micro-batch `i` in place for the next pass.
    fn record_unstage(&self, encoder: &mut wgpu::CommandEncoder, i: usize) {
        let n = (self.batch.batch * self.batch.seq) as u64;
        let words = 3 * n + self.vocab as u64 + 1 + DROPOUT_WORDS as u64;
        let mut from = self.staged.offset_bytes() + 4 * words * i as u64;
        let src = self.staged.buffer();
        for (dst, len) in [
            (&self.tokens, n),
            (&self.targets, n),
            (&self.order, n),
            (&self.starts, self.vocab as u64 + 1),
            (&self.dropout_state, DROPOUT_WORDS as u64),
        ] {
            encoder.copy_buffer_to_buffer(src, from, dst.buffer(), dst.offset_bytes(), 4 * len);
            from += 4 * len;
        }
    }

    /// Writes one micro-batch directly, with dropout off (evaluation and tests; a training step
    /// stages its micro-batches instead). See [`GptGpu::set_dropout`] to turn it on.
    pub fn set_batch(&self, gpu: &Gpu, inputs: &[u32], targets: &[u32]) -> Result<()> {
        let words = self.batch_words(inputs, targets, &DropoutState::off())?;
        let n = inputs.len();
        let q = gpu.queue();
        let end = words.len() - DROPOUT_WORDS;
        for (dst, range) in [
            (&self.tokens, 0..n),
            (&self.targets, n..2 * n),
            (&self.order, 2 * n..3 * n),
            (&self.starts, 3 * n..end),
            (&self.dropout_state, end..words.len()),
        ] {
            q.write_buffer(
                dst.buffer(),
                dst.offset_bytes(),
                bytemuck::cast_slice(&words[range]),
            );
        }
        Ok(())
    }

    /// Records forward, loss and backward of the micro-batch last set; parameter gradients are
    /// added to the gradient buffer (see [`GptGpu::record_zero_grads`]).
    pub fn record_micro_batch(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.record_eval(pass);
        for op in &self.backward {
            op.record_into(pass);
        }
    }

    /// Records forward and loss only (evaluation).
    pub fn record_eval(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.record_logits(pass);
        self.loss.record(pass);
    }

    /// Records the forward to the logits only (inference).
    pub fn record_logits(&self, pass: &mut wgpu::ComputePass<'_>) {
        for op in &self.forward {
            op.record_into(pass);
        }
    }

    /// Clears the gradient buffer (before the first micro-batch of a step).
    pub fn record_zero_grads(&self, encoder: &mut wgpu::CommandEncoder) {
        encoder.clear_buffer(self.grads.buffer(), 0, None);
    }

    /// Records gradient norm, AdamW (whose step values [`GptGpu::set_step`] wrote) and, when
    /// enabled, the loss-scale update.
    pub fn record_update(&self, pass: &mut wgpu::ComputePass<'_>) {
        for op in &self.update {
            op.record_into(pass);
        }
        self.adamw.record(pass);
        if let Some(scaler) = &self.scaler {
            scaler.record(pass);
        }
    }

    /// Writes the optimizer's per-step values for a step of `micro_batches`.
    ///
    /// Each micro-batch adds the (loss-scaled) gradient of its own mean loss to the gradient
    /// buffer, so the sum is `micro_batches` times the gradient of the step's mean loss: AdamW
    /// divides by `step.loss_scale × micro_batches × ` the dynamic scale.
    pub fn set_step(&self, gpu: &Gpu, step: &AdamWStep, micro_batches: usize) -> Result<()> {
        let mut step = *step;
        step.loss_scale *= micro_batches as f64;
        self.adamw.set_step(gpu, &step)
    }

    /// Seeds the dropout masks of the training steps: step `t`'s micro-batch `i` uses the stream
    /// [`DropoutState::key_for`]`(seed, t, i)`, so a resumed run draws the same masks.
    pub fn set_dropout_seed(&mut self, seed: u64) {
        self.dropout_seed = seed;
    }

    /// Sets the dropout of the next passes recorded after [`GptGpu::set_batch`] (tests use it to
    /// run a forward and backward with a known mask).
    pub fn set_dropout(&self, gpu: &Gpu, state: &DropoutState) -> Result<()> {
        crate::kernels::dropout::write_state(gpu, &self.dropout_state, state)
    }

    /// Turns on dynamic loss scaling (for f16 gradients): from the next step on, the loss
    /// gradient is multiplied by a scale that backs off when gradients overflow and grows after
    /// a run of clean steps, all on the GPU. Sets the scale to `settings.init_scale`.
    pub fn enable_loss_scaling(&mut self, gpu: &Gpu, settings: &LossScaling) -> Result<()> {
        self.scaler = Some(LossScaler::new(
            gpu,
            &self.loss_scale,
            &self.scale_run,
            &self.flag,
            settings,
        )?);
        self.set_loss_scale_state(gpu, settings.init_scale, 0)
    }

    /// The dynamic loss scale and its run of clean steps (waits for the device).
    pub fn loss_scale_state(&self, gpu: &Gpu) -> Result<(f32, u32)> {
        Ok((
            gpu.read(&self.loss_scale)?[0],
            gpu.read_u32(&self.scale_run)?[0],
        ))
    }

    /// Restores the dynamic loss scale and its run of clean steps (a resumed run).
    pub fn set_loss_scale_state(&self, gpu: &Gpu, scale: f32, run: u32) -> Result<()> {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(Error::invalid(
                "loss scale",
                scale,
                "must be finite and > 0",
            ));
        }
        gpu.write(&self.loss_scale, &[scale])?;
        gpu.write_u32(&self.scale_run, &[run])
    }

    /// One optimizer step over `micro` (inputs, targets) pairs as ONE submission: the
    /// micro-batches are uploaded together, then the command buffer clears the gradients, and for
    /// each micro-batch copies its tokens into place and records forward, loss and backward, and
    /// ends with the update. `after` may append more (the training loop's loss copy). Returns
    /// the host seconds spent encoding (before the submit).
    pub fn step(
        &self,
        gpu: &Gpu,
        micro: &[(Vec<u32>, Vec<u32>)],
        step: &AdamWStep,
        after: impl FnOnce(&mut wgpu::CommandEncoder),
    ) -> Result<f64> {
        if micro.is_empty() || micro.len() > self.micro_batches {
            return Err(Error::shape(
                "gpt",
                format!(
                    "a step takes 1 to {} micro-batches (as built), got {}",
                    self.micro_batches,
                    micro.len()
                ),
            ));
        }
        let start = std::time::Instant::now();
        self.set_step(gpu, step, micro.len())?;
        let mut words = Vec::new();
        for (i, (inputs, targets)) in micro.iter().enumerate() {
            let key = DropoutState::key_for(self.dropout_seed, u64::from(step.t), i as u32);
            let dropout = DropoutState::new(self.model.dropout, key);
            words.extend(self.batch_words(inputs, targets, &dropout)?);
        }
        gpu.queue().write_buffer(
            self.staged.buffer(),
            self.staged.offset_bytes(),
            bytemuck::cast_slice(&words),
        );
        let mut encoder = gpu
            .device()
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("training step"),
            });
        self.record_zero_grads(&mut encoder);
        for i in 0..micro.len() {
            self.record_unstage(&mut encoder, i);
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("micro-batch"),
                timestamp_writes: None,
            });
            self.record_micro_batch(&mut pass);
        }
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("update"),
                timestamp_writes: None,
            });
            self.record_update(&mut pass);
        }
        after(&mut encoder);
        let commands = encoder.finish();
        let encode_s = start.elapsed().as_secs_f64();
        gpu.queue().submit([commands]);
        gpu.check("training step")?;
        Ok(encode_s)
    }

    /// Times every prepared op of a step on its own: `runs` submissions of the op alone after a
    /// warm-up, each waited for, median kept. Runs the update too, so the weights change; use a
    /// model built for profiling, with a batch already set ([`GptGpu::set_batch`]) and the step
    /// values written ([`GptGpu::set_step`]). Each time includes one submission's overhead,
    /// which a real step pays once for all ops.
    pub fn profile(&self, gpu: &Gpu, runs: usize) -> Result<Vec<OpTime>> {
        let mut phases: Vec<(&'static str, Vec<&dyn Record>)> = vec![
            ("forward", self.forward.iter().map(|o| o.as_ref()).collect()),
            ("loss", vec![&self.loss as &dyn Record]),
            (
                "backward",
                self.backward.iter().map(|o| o.as_ref()).collect(),
            ),
        ];
        let mut update: Vec<&dyn Record> = self.update.iter().map(|o| o.as_ref()).collect();
        update.push(&self.adamw);
        if let Some(scaler) = &self.scaler {
            update.push(scaler);
        }
        phases.push(("update", update));
        let mut times = Vec::new();
        for (phase, ops) in phases {
            for op in ops {
                let t = gpu.time_runs(op.op_name(), 1, runs, |p| op.record_into(p))?;
                times.push(OpTime {
                    phase,
                    name: op.op_name(),
                    seconds: crate::gpu::median(&t),
                });
            }
        }
        Ok(times)
    }

    /// Mean loss over the non-ignored targets of the micro-batch last run (waits for the device).
    pub fn read_loss(&self, gpu: &Gpu) -> Result<f32> {
        let losses = gpu.read(&self.losses)?;
        let count = gpu.read_u32(self.loss.count())?[0].max(1);
        Ok((losses.iter().map(|&l| f64::from(l)).sum::<f64>() / f64::from(count)) as f32)
    }

    /// The one-element u32 tensor holding the number of non-ignored targets of the last loss.
    pub fn target_count(&self) -> &GpuTensor {
        self.loss.count()
    }

    /// The whole gradient buffer as f32 (waits), laid out by [`GptGpu::layout`].
    pub fn read_grads(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        gpu.read(&self.grads)
    }

    /// The f32 master weights (waits).
    pub fn read_master(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        gpu.read(&self.master)
    }

    /// The Adam moments (waits).
    pub fn read_moments(&self, gpu: &Gpu) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok((gpu.read(&self.exp_avg)?, gpu.read(&self.exp_avg_sq)?))
    }

    /// Steps skipped for non-finite gradients so far, the last global norm and its flag (waits).
    pub fn read_update_stats(&self, gpu: &Gpu) -> Result<(u32, f32, u32)> {
        Ok((
            gpu.read_u32(&self.skipped)?[0],
            gpu.read(&self.norm)?[0],
            gpu.read_u32(&self.flag)?[0],
        ))
    }

    /// The logits of the micro-batch last run (waits).
    pub fn read_logits(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        gpu.read(&self.logits)
    }

    /// One position's logits of the batch last run forward (waits).
    pub fn read_logits_row(&self, gpu: &Gpu, row: usize) -> Result<Vec<f32>> {
        let view = self
            .logits
            .view("logits row", row * self.vocab, &[self.vocab])?;
        gpu.read(&view)
    }

    /// The per-row loss tensor (f32, B·T), for asynchronous read-back by the training loop.
    pub fn losses(&self) -> &GpuTensor {
        &self.losses
    }

    /// A view of one parameter tensor of the working (T) copy, by layout name.
    pub(crate) fn param(&self, name: &str) -> Result<GpuTensor> {
        Views {
            layout: &self.layout,
            flat: &self.params,
        }
        .get(name)
    }

    /// [`GptGpu::param`] for a tensor the layout may lack (biases).
    pub(crate) fn param_opt(&self, name: &str) -> Result<Option<GpuTensor>> {
        Views {
            layout: &self.layout,
            flat: &self.params,
        }
        .opt(name)
    }

    /// Layer `l`'s q|k|v activations, (B·T, 3C): what the key/value cache of inference reuses.
    pub(crate) fn layer_qkv(&self, l: usize) -> &GpuTensor {
        &self.acts[l].qkv
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// The model configuration.
    pub fn model(&self) -> &ModelConfig {
        &self.model
    }

    /// The gradient buffer (for tests that inject values).
    pub fn grads(&self) -> &GpuTensor {
        &self.grads
    }
}
