//! The attention unit: fused q|k|v projection, optional rotary embedding of q and k, causal
//! multi-head or grouped-query attention (with dropout on the probabilities), output projection.
//! GPT-2's `attn.c_attn` / `attn.c_proj`; Llama's `self_attn.qkv_proj` (q_proj, k_proj and
//! v_proj stacked by rows) / `self_attn.o_proj`.
//!
//! The GPU step computes the attention itself either with the reference kernels (matmuls around
//! a causal softmax, keeping the (B, n_head, T, T) probabilities) or with the fused
//! FlashAttention-style kernels (keeping a (B, n_head, T) log-sum-exp), as
//! `model.attention_kernel` and [`crate::kernels::flash_attention::prefer_fused`] decide.

use super::{CpuCtx, DecodeCtx, GpuCtx, Linear, Ops, alias, lora_dropout_site};
use crate::Result;
use crate::finetune::LoraTarget;
use crate::gpu::GpuTensor;
use crate::kernels::RowKernel;
use crate::kernels::attention::{AttentionBackward, AttentionDropout, AttentionForward};
use crate::kernels::decode::AttendOne;
use crate::kernels::flash_attention::{
    self, FlashAttentionBackward, FlashAttentionForward, FlashDropout,
};
use crate::kernels::rope::Rope;
use crate::model::AttentionKernel;
use crate::model::layout::{Component, LayoutBuilder, ParamKind};
use crate::ops::{AttendOneShape, AttentionShape, GroupedAttentionShape, RopeSpec};

/// Layer `layer`'s attention.
#[derive(Clone, Debug)]
pub(crate) struct Attention {
    pub layer: usize,
    /// Prefixes of the fused q|k|v projection and of the output projection.
    pub qkv_prefix: String,
    pub proj_prefix: String,
    pub channels: usize,
    pub heads: usize,
    /// Key/value heads (= heads: multi-head attention; fewer: grouped-query).
    pub kv_heads: usize,
    pub bias: bool,
    /// RoPE's base, when queries and keys are rotated.
    pub rope_theta: Option<f32>,
    /// Dropout site of the probabilities (distinct across the network).
    pub dropout_site: u32,
    /// Which kernels the GPU step uses for the attention itself.
    pub kernel: AttentionKernel,
}

impl Attention {
    fn qkv_prefix(&self) -> String {
        self.qkv_prefix.clone()
    }
    fn proj_prefix(&self) -> String {
        self.proj_prefix.clone()
    }
    fn head_dim(&self) -> usize {
        self.channels / self.heads
    }
    /// Width of a q|k|v row.
    pub(crate) fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim()
    }
    fn linears<'n>(&self, qkv: &'n str, proj: &'n str) -> (Linear<'n>, Linear<'n>) {
        let c = self.channels;
        (
            Linear {
                prefix: qkv,
                fan_in: c,
                fan_out: self.qkv_width(),
                lora_site: lora_dropout_site(self.layer, LoraTarget::AttnQkv),
            },
            Linear {
                prefix: proj,
                fan_in: c,
                fan_out: c,
                lora_site: lora_dropout_site(self.layer, LoraTarget::AttnProj),
            },
        )
    }

    pub fn declare(&self, l: &mut LayoutBuilder) {
        let c = self.channels;
        for (prefix, out) in [
            (self.qkv_prefix(), self.qkv_width()),
            (self.proj_prefix(), c),
        ] {
            l.add(
                format!("{prefix}.weight"),
                vec![out, c],
                ParamKind::Weight,
                Component::Attention,
                true,
            );
            if self.bias {
                l.add(
                    format!("{prefix}.bias"),
                    vec![out],
                    ParamKind::Bias,
                    Component::Attention,
                    false,
                );
            }
        }
    }

    fn shape(&self, batch: usize, seq: usize) -> AttentionShape {
        AttentionShape {
            batch,
            seq,
            channels: self.channels,
            heads: self.heads,
        }
    }

    fn grouped(&self, batch: usize, seq: usize) -> GroupedAttentionShape {
        GroupedAttentionShape {
            batch,
            seq,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim(),
        }
    }

    /// Grouped-query kernels when key/value heads are shared; GPT-2's multi-head ones otherwise
    /// (the same products, kept so that GPT-2's results do not change by a bit).
    fn is_grouped(&self) -> bool {
        self.kv_heads != self.heads
    }

    fn rope(&self, batch: usize, seq: usize) -> Option<RopeSpec> {
        self.rope_theta.map(|theta| {
            RopeSpec::qkv(batch, seq, self.heads, self.kv_heads, self.head_dim()).theta(theta)
        })
    }

    /// Whether the GPU step uses the fused kernels for `shape`: as configured, or by the auto
    /// rule; a forced `fused` that cannot run is an error naming why.
    fn use_fused(&self, gpu: &crate::Gpu, shape: &GroupedAttentionShape) -> Result<bool> {
        match self.kernel {
            AttentionKernel::Reference => Ok(false),
            AttentionKernel::Fused => flash_attention::supports(gpu, shape).map(|()| true),
            AttentionKernel::Auto => Ok(flash_attention::prefer_fused(gpu, shape)),
        }
    }

    /// Records `y = proj(attention(qkv(x)))`; with `fuse = Some((out, resid))` where the
    /// projection can take it, `out = resid + proj(...)` in the projection's epilogue, and the
    /// returned flag says so (the caller then adds nothing).
    pub fn forward(
        &self,
        ctx: &mut GpuCtx<'_>,
        ops: &mut Ops,
        x: &GpuTensor,
        fuse: Option<(&GpuTensor, &GpuTensor)>,
    ) -> Result<(AttentionGpu, GpuTensor, bool)> {
        let (bt, c) = (ctx.rows(), self.channels);
        let g = self.grouped(ctx.batch.batch, ctx.batch.seq);
        let name = |s: &str| format!("h.{}.{s}", self.layer);
        let saved = if self.use_fused(ctx.gpu, &g)? {
            Saved::Fused {
                lse: ctx
                    .gpu
                    .zeros(&name("lse"), &[g.lse_len()], crate::gpu::DType::F32)?,
            }
        } else {
            Saved::Reference {
                probs: ctx.act(&name("probs"), g.probs_len())?,
                dropped: if ctx.dropping {
                    Some(ctx.act(&name("probs dropped"), g.probs_len())?)
                } else {
                    None
                },
            }
        };
        let s = AttentionGpu {
            unit: self.clone(),
            input: alias(x)?,
            qkv: ctx.act(&name("qkv"), bt * self.qkv_width())?,
            att: ctx.act(&name("att"), bt * c)?,
            saved,
        };
        let (qp, pp) = (self.qkv_prefix(), self.proj_prefix());
        let (lq, lp) = self.linears(&qp, &pp);
        let fuse = fuse.filter(|_| lp.fuses_residual(ctx));
        let y = match fuse {
            Some((out, _)) => alias(out)?,
            None => ctx.act(&name("attn proj"), bt * c)?,
        };
        lq.forward(ctx, ops, &s.qkv, x)?;
        if let Some(spec) = self.rope(ctx.batch.batch, ctx.batch.seq) {
            ops.push(Box::new(Rope::forward(ctx.gpu, &s.qkv, &spec)?));
        }
        ops.push(s.attention_forward(ctx)?);
        lp.forward_residual(ctx, ops, &y, &s.att, fuse.map(|f| f.1))?;
        ctx.qkv.push(alias(&s.qkv)?);
        Ok((s, y, fuse.is_some()))
    }

    /// The decode step's attention over the prefill model's cache of `positions` rows.
    pub fn decode_shape(&self, positions: usize) -> AttendOneShape {
        AttendOneShape {
            positions,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim(),
        }
    }

    /// The one-row forward of the decoder: the row's q|k|v, its q and k heads rotated at the
    /// step's position (with RoPE, as the training forward rotates row pos), attention over this
    /// layer's cache (the prefill model's q|k|v activation, whose q and k the training forward
    /// left rotated) appending the row's k and v to it, and the output projection.
    pub fn decode(&self, d: &mut DecodeCtx<'_>, ops: &mut Ops, x: &GpuTensor) -> Result<GpuTensor> {
        let c = self.channels;
        let (qkv, att) = (
            d.act("decode qkv", self.qkv_width())?,
            d.act("decode att", c)?,
        );
        let y = d.act("decode proj", c)?;
        let (qp, pp) = (self.qkv_prefix(), self.proj_prefix());
        let (lq, lp) = self.linears(&qp, &pp);
        lq.decode(d, ops, &qkv, x)?;
        if let Some(spec) = self.rope(1, 1) {
            ops.push(Box::new(Rope::forward_at_step(d.gpu, &qkv, &spec, d.step)?));
        }
        let cache = d.model.layer_qkv(self.layer);
        let shape = self.decode_shape(d.model.batch().seq);
        ops.push(Box::new(AttendOne::new(
            d.gpu, &att, cache, &qkv, d.step, &shape,
        )?));
        lp.decode(d, ops, &y, &att)?;
        Ok(y)
    }

    pub fn cpu_forward(&self, c: &CpuCtx<'_>, x: Vec<f32>) -> Result<(AttentionCpu, Vec<f32>)> {
        let (bt, ch) = (c.rows(), self.channels);
        let shape = self.shape(c.batch.batch, c.batch.seq);
        let mut s = AttentionCpu {
            unit: self.clone(),
            qkv: vec![0.0; bt * self.qkv_width()],
            probs: vec![0.0; shape.probs_len()],
            att: vec![0.0; bt * ch],
            input: x,
        };
        let (qp, pp) = (self.qkv_prefix(), self.proj_prefix());
        let (lq, lp) = self.linears(&qp, &pp);
        lq.cpu_forward(c, &mut s.qkv, &s.input)?;
        if let Some(spec) = self.rope(c.batch.batch, c.batch.seq) {
            crate::cpu::rope::rope_forward(&mut s.qkv, &spec)?;
        }
        if self.is_grouped() {
            let g = self.grouped(c.batch.batch, c.batch.seq);
            crate::cpu::attention::grouped_attention_forward(&mut s.att, &mut s.probs, &s.qkv, &g)?;
        } else {
            crate::cpu::attention::attention_forward(&mut s.att, &mut s.probs, &s.qkv, &shape)?;
        }
        let mut y = vec![0.0; bt * ch];
        lp.cpu_forward(c, &mut y, &s.att)?;
        Ok((s, y))
    }
}

/// What an attention's forward keeps for its backward besides q|k|v and the output.
enum Saved {
    /// The reference kernels: the softmax probabilities and, with dropout, their dropped copy.
    Reference {
        probs: GpuTensor,
        dropped: Option<GpuTensor>,
    },
    /// The fused kernels: each row's log-sum-exp, (B, n_head, T) f32.
    Fused { lse: GpuTensor },
}

/// The GPU state of an attention's backward.
pub(crate) struct AttentionGpu {
    unit: Attention,
    input: GpuTensor,
    qkv: GpuTensor,
    att: GpuTensor,
    saved: Saved,
}

impl AttentionGpu {
    /// The reference path's dropout: its dropped copy of the probabilities, when there is one.
    fn dropout<'a>(
        &'a self,
        dropped: &'a Option<GpuTensor>,
        state: &'a GpuTensor,
    ) -> Option<AttentionDropout<'a>> {
        dropped.as_ref().map(|dropped| AttentionDropout {
            dropped,
            state,
            site: self.unit.dropout_site,
        })
    }

    /// The fused path's dropout (the same mask, drawn inside the kernels).
    fn flash_dropout<'a>(&self, ctx: &GpuCtx<'a>) -> Option<FlashDropout<'a>> {
        ctx.dropping.then_some(FlashDropout {
            state: ctx.dropout_state,
            site: self.unit.dropout_site,
        })
    }

    /// The attention itself, att from qkv, with the kernels `saved` was made for.
    fn attention_forward(&self, ctx: &GpuCtx<'_>) -> Result<Box<dyn crate::kernels::Record>> {
        let u = &self.unit;
        let g = u.grouped(ctx.batch.batch, ctx.batch.seq);
        Ok(match &self.saved {
            Saved::Fused { lse } => Box::new(FlashAttentionForward::new(
                ctx.gpu,
                &self.att,
                lse,
                &self.qkv,
                &g,
                self.flash_dropout(ctx),
            )?),
            Saved::Reference { probs, dropped } => {
                let dropout = self.dropout(dropped, ctx.dropout_state);
                Box::new(if u.is_grouped() {
                    // Three passes over a row in the forward softmax, two in the backward (as
                    // AttentionForward::grouped and AttentionBackward::grouped choose).
                    let kernel = RowKernel::for_rows(ctx.gpu, g.seq, 3);
                    AttentionForward::grouped_with_row_kernel(
                        ctx.gpu, &self.att, probs, &self.qkv, &g, dropout, kernel,
                    )?
                } else {
                    let shape = u.shape(ctx.batch.batch, ctx.batch.seq);
                    AttentionForward::with_dropout(
                        ctx.gpu, &self.att, probs, &self.qkv, &shape, dropout,
                    )?
                })
            }
        })
    }

    /// The attention's backward, dqkv from datt.
    fn attention_backward(
        &self,
        ctx: &mut GpuCtx<'_>,
        dqkv: &GpuTensor,
        datt: &GpuTensor,
    ) -> Result<Box<dyn crate::kernels::Record>> {
        let u = &self.unit;
        let g = u.grouped(ctx.batch.batch, ctx.batch.seq);
        Ok(match &self.saved {
            Saved::Fused { lse } => Box::new(FlashAttentionBackward::new(
                ctx.gpu,
                dqkv,
                datt,
                &self.qkv,
                &self.att,
                lse,
                &g,
                self.flash_dropout(ctx),
            )?),
            Saved::Reference { probs, dropped } => {
                let dprobs = ctx.shared("dprobs", g.probs_len())?;
                let dropout = self.dropout(dropped, ctx.dropout_state);
                Box::new(if u.is_grouped() {
                    let kernel = RowKernel::for_rows(ctx.gpu, g.seq, 2);
                    AttentionBackward::grouped_with_row_kernel(
                        ctx.gpu, dqkv, &dprobs, datt, &self.qkv, probs, &g, dropout, kernel,
                    )?
                } else {
                    let shape = u.shape(ctx.batch.batch, ctx.batch.seq);
                    AttentionBackward::with_dropout(
                        ctx.gpu, dqkv, &dprobs, datt, &self.qkv, probs, &shape, dropout,
                    )?
                })
            }
        })
    }

    /// Records the backward given dy; returns dx (a buffer shared across layers).
    pub fn backward(
        &self,
        ctx: &mut GpuCtx<'_>,
        ops: &mut Ops,
        dy: &GpuTensor,
    ) -> Result<GpuTensor> {
        let u = &self.unit;
        let (bt, c) = (ctx.rows(), u.channels);
        let datt = ctx.shared("datt", bt * c)?;
        let dqkv = ctx.shared(&format!("dqkv {}", u.qkv_width()), bt * u.qkv_width())?;
        let dx = ctx.shared("dln", bt * c)?;
        let (qp, pp) = (u.qkv_prefix(), u.proj_prefix());
        let (lq, lp) = u.linears(&qp, &pp);
        lp.backward(ctx, ops, &datt, dy, &self.att)?;
        ops.push(self.attention_backward(ctx, &dqkv, &datt)?);
        if let Some(spec) = u.rope(ctx.batch.batch, ctx.batch.seq) {
            ops.push(Box::new(Rope::backward(ctx.gpu, &dqkv, &spec)?));
        }
        lq.backward(ctx, ops, &dx, &dqkv, &self.input)?;
        Ok(dx)
    }
}

/// The CPU state of an attention's backward.
pub(crate) struct AttentionCpu {
    unit: Attention,
    input: Vec<f32>,
    qkv: Vec<f32>,
    probs: Vec<f32>,
    att: Vec<f32>,
}

impl AttentionCpu {
    pub fn backward(&self, c: &CpuCtx<'_>, g: &mut [f32], dy: &[f32]) -> Result<Vec<f32>> {
        let u = &self.unit;
        let (bt, ch) = (c.rows(), u.channels);
        let (qp, pp) = (u.qkv_prefix(), u.proj_prefix());
        let (lq, lp) = u.linears(&qp, &pp);
        let mut datt = vec![0.0f32; bt * ch];
        lp.cpu_backward(c, g, &mut datt, dy, &self.att)?;
        let mut dqkv = vec![0.0f32; bt * u.qkv_width()];
        if u.is_grouped() {
            let g = u.grouped(c.batch.batch, c.batch.seq);
            crate::cpu::attention::grouped_attention_backward(
                &mut dqkv,
                &datt,
                &self.qkv,
                &self.probs,
                &g,
            )?;
        } else {
            crate::cpu::attention::attention_backward(
                &mut dqkv,
                &datt,
                &self.qkv,
                &self.probs,
                &u.shape(c.batch.batch, c.batch.seq),
            )?;
        }
        if let Some(spec) = u.rope(c.batch.batch, c.batch.seq) {
            crate::cpu::rope::rope_backward(&mut dqkv, &spec)?;
        }
        let mut dx = vec![0.0f32; bt * ch];
        lq.cpu_backward(c, g, &mut dx, &dqkv, &self.input)?;
        Ok(dx)
    }
}
