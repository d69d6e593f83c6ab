//! The layer kinds a model is built from, each written once.
//!
//! A unit declares its parameters into the [`ParamLayout`], and has three faces that sit side by
//! side in its file: the GPU training step (forward ops, then a state whose `backward` adds the
//! backward ops), the CPU reference (the same ops on `f32` slices) and the one-token KV-cache
//! decoder. An architecture ([`super::arch::Arch`]) is a list of units; the GPU step, the CPU
//! reference and the decoder all walk that list, so they cannot drift apart.
//!
//! Every unit maps an input activation to an output activation, and in the backward the gradient
//! of its output to the gradient of its input. Backward scratch buffers that only live within one
//! unit's backward are shared across layers by name ([`GpuCtx::shared`]), as the hand-written
//! builder did, so memory does not grow with depth.

pub(crate) mod attention;
pub(crate) mod embedding;
pub(crate) mod head;
pub(crate) mod mlp;
pub(crate) mod moe;
pub(crate) mod norm;
pub(crate) mod residual;

use super::{ModelConfig, ParamLayout};
use crate::cpu::gpt::GptBatch;
use crate::gpu::{DType, Gpu, GpuTensor};
use crate::kernels::Record;
use crate::kernels::dropout::{Dropout, DropoutState};
use crate::kernels::matmul::{GeluEpilogue, Matmul};
use crate::kernels::quant::{QMatmul, QuantWeight};
use crate::ops::{Layout, MatmulSpec};
use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap};

/// Recorded ops of one phase.
pub(crate) type Ops = Vec<Box<dyn Record>>;

/// A second handle on the same tensor (bind groups and later units refer to it).
pub(crate) fn alias(t: &GpuTensor) -> Result<GpuTensor> {
    t.view(t.label(), 0, t.shape())
}

/// Views of one flat GPU buffer by tensor name.
pub(crate) struct Views<'a> {
    pub layout: &'a ParamLayout,
    pub flat: &'a GpuTensor,
}

impl Views<'_> {
    pub fn get(&self, name: &str) -> Result<GpuTensor> {
        let t = self
            .layout
            .get(name)
            .ok_or_else(|| Error::shape("gpt", format!("the layout has no tensor {name}")))?;
        self.flat.view(name, t.offset, &t.shape)
    }
    pub fn opt(&self, name: &str) -> Result<Option<GpuTensor>> {
        match self.layout.get(name) {
            Some(_) => self.get(name).map(Some),
            None => Ok(None),
        }
    }
}

/// What the units of a GPU training step share while it is built.
pub(crate) struct GpuCtx<'a> {
    pub gpu: &'a Gpu,
    pub batch: GptBatch,
    pub dt: DType,
    /// Parameters (working copy) and gradients.
    pub p: Views<'a>,
    pub g: Views<'a>,
    /// The micro-batch's token ids, and the token index of the embedding backward.
    pub tokens: &'a GpuTensor,
    pub order: &'a GpuTensor,
    pub starts: &'a GpuTensor,
    /// Dropout's per-micro-batch state, and whether the model drops anything at all.
    pub dropout_state: &'a GpuTensor,
    pub dropping: bool,
    /// The LoRA adapters' dropout state (`lora.dropout`, staged per micro-batch beside the
    /// model's), present only for a training model whose adapters drop: without it the
    /// adapters record exactly the dispatches they did before adapter dropout existed.
    pub lora_dropout: Option<&'a GpuTensor>,
    /// B·T ones (bias gradients as column sums).
    pub ones: &'a GpuTensor,
    /// Each attention layer's q|k|v activation, in layer order: the decoder's cache.
    pub qkv: Vec<GpuTensor>,
    /// Quantised matrices by tensor name (an inference model's), read in place of the
    /// parameter views of the same names.
    pub quant: &'a BTreeMap<String, QuantWeight>,
    /// A model built for inference (no backward; routed MLPs run dropless).
    pub inference: bool,
    /// The dynamic loss scale the loss gradient is multiplied by (what the routers' auxiliary
    /// gradients must be multiplied by too).
    pub loss_scale: Option<&'a GpuTensor>,
    /// Each routed MLP's statistics buffer, in layer order ([`crate::kernels::moe::stats_len`]).
    pub moe_stats: Vec<GpuTensor>,
    shared: HashMap<String, GpuTensor>,
}

/// The quantised matrices of a model that has none.
static NO_QUANT: BTreeMap<String, QuantWeight> = BTreeMap::new();

impl<'a> GpuCtx<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        gpu: &'a Gpu,
        model: &ModelConfig,
        batch: GptBatch,
        p: Views<'a>,
        g: Views<'a>,
        tokens: &'a GpuTensor,
        order: &'a GpuTensor,
        starts: &'a GpuTensor,
        dropout_state: &'a GpuTensor,
        ones: &'a GpuTensor,
    ) -> Self {
        GpuCtx {
            gpu,
            batch,
            dt: DType::from(gpu.precision()),
            p,
            g,
            tokens,
            order,
            starts,
            dropout_state,
            dropping: model.dropout > 0.0,
            lora_dropout: None,
            ones,
            qkv: Vec::new(),
            quant: &NO_QUANT,
            inference: false,
            loss_scale: None,
            moe_stats: Vec::new(),
            shared: HashMap::new(),
        }
    }

    /// B·T.
    pub fn rows(&self) -> usize {
        self.batch.batch * self.batch.seq
    }

    /// A fresh activation of `len` elements in the storage precision.
    pub fn act(&self, name: &str, len: usize) -> Result<GpuTensor> {
        self.gpu.zeros(name, &[len], self.dt)
    }

    /// A fresh f32 per-row statistic (B·T elements).
    pub fn stat(&self, name: &str) -> Result<GpuTensor> {
        self.gpu.zeros(name, &[self.rows()], DType::F32)
    }

    /// The scratch buffer called `name`, allocated on first use and shared by every unit that
    /// asks for it (backward temporaries that do not outlive one unit's backward).
    pub fn shared(&mut self, name: &str, len: usize) -> Result<GpuTensor> {
        if let Some(t) = self.shared.get(name) {
            if t.len() != len {
                return Err(Error::shape(
                    "gpt",
                    format!("shared buffer {name} is {} elements, not {len}", t.len()),
                ));
            }
            return alias(t);
        }
        let t = self.act(name, len)?;
        let out = alias(&t)?;
        self.shared.insert(name.to_string(), t);
        Ok(out)
    }

    /// The loss-scale buffer (a model's plan always sets one).
    pub fn loss_scale(&self) -> Result<GpuTensor> {
        alias(
            self.loss_scale
                .ok_or_else(|| Error::shape("gpt", "the plan set no loss-scale buffer"))?,
        )
    }

    /// The shared buffers, to keep with the plan.
    pub fn into_shared(self) -> (Vec<GpuTensor>, Vec<GpuTensor>) {
        (self.shared.into_values().collect(), self.qkv)
    }
}

/// The backward half of a unit of the GPU step, built by its forward.
pub(crate) trait GpuBackward {
    /// Records the backward given `dy`, the gradient of the unit's output; returns the gradient
    /// of its input (`None` for the embedding, whose input is token ids).
    fn backward(
        &self,
        ctx: &mut GpuCtx<'_>,
        ops: &mut Ops,
        dy: &GpuTensor,
    ) -> Result<Option<GpuTensor>>;
}

/// `Y = X·Wᵀ (+ b)` for `rows` rows.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear(
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

/// A linear layer's parameters by prefix (`prefix.weight`, optional `prefix.bias`).
pub(crate) struct Linear<'n> {
    pub prefix: &'n str,
    pub fan_in: usize,
    pub fan_out: usize,
    /// The dropout site of its LoRA adapter's input ([`lora_dropout_site`]).
    pub lora_site: u32,
}

/// The first dropout site of the LoRA adapters. The model's own sites are 3 per layer counted
/// from 0 (see [`super::arch::Arch::new`]), so starting at 2³¹ keeps the adapters' masks apart
/// from them while sharing the per-micro-batch key.
const LORA_SITE_BASE: u32 = 1 << 31;

/// The dropout site of the adapter on `target` in layer `layer`: one per adapted linear, so
/// that the masks differ between layers and targets, and a pure function of the architecture
/// (a resumed run draws the same masks).
pub(crate) fn lora_dropout_site(layer: usize, target: crate::finetune::LoraTarget) -> u32 {
    let index = crate::finetune::LoraTarget::ALL
        .iter()
        .position(|t| *t == target)
        .unwrap_or(0);
    LORA_SITE_BASE.wrapping_add((4 * layer + index) as u32)
}

impl Linear<'_> {
    pub fn weight(&self) -> String {
        format!("{}.weight", self.prefix)
    }
    pub fn bias(&self) -> String {
        format!("{}.bias", self.prefix)
    }

    /// The layer's LoRA adapters, when the layout has them.
    fn lora_names(&self) -> (String, String) {
        (
            crate::finetune::layout::lora_name(self.prefix, 'A'),
            crate::finetune::layout::lora_name(self.prefix, 'B'),
        )
    }

    /// Forward over the ctx's B·T rows: `Y = X·Wᵀ (+ b)`, plus `(alpha/rank)·(X·Aᵀ)·Bᵀ` when
    /// the layer has LoRA adapters (two thin products; B·A is never formed).
    pub fn forward(
        &self,
        ctx: &mut GpuCtx<'_>,
        ops: &mut Ops,
        y: &GpuTensor,
        x: &GpuTensor,
    ) -> Result<()> {
        self.forward_residual(ctx, ops, y, x, None)
    }

    /// Whether [`Linear::forward_residual`] can add a residual in its product's epilogue: not
    /// for a quantised weight, whose product has no such epilogue.
    pub fn fuses_residual(&self, ctx: &GpuCtx<'_>) -> bool {
        ctx.quant.get(&self.weight()).is_none()
    }

    /// [`Linear::forward`], with `resid` (C's shape) added in the base product's epilogue:
    /// `Y = resid + X·Wᵀ (+ b)`, then the LoRA term accumulated on top. Only where
    /// [`Linear::fuses_residual`].
    pub fn forward_residual(
        &self,
        ctx: &mut GpuCtx<'_>,
        ops: &mut Ops,
        y: &GpuTensor,
        x: &GpuTensor,
        resid: Option<&GpuTensor>,
    ) -> Result<()> {
        if let Some(resid) = resid {
            if !self.fuses_residual(ctx) {
                return Err(crate::Error::shape(
                    "linear",
                    format!("{}: a quantised product cannot add a residual", self.prefix),
                ));
            }
            ops.push(Box::new(Matmul::with_residual(
                ctx.gpu,
                None,
                y,
                x,
                &ctx.p.get(&self.weight())?,
                ctx.p.opt(&self.bias())?.as_ref(),
                resid,
                &MatmulSpec::new(Layout::NT, ctx.rows(), self.fan_out, self.fan_in),
            )?));
        } else if let Some(w) = ctx.quant.get(&self.weight()) {
            let bias = ctx.p.opt(&self.bias())?;
            ops.push(Box::new(QMatmul::new(
                ctx.gpu,
                y,
                x,
                w,
                bias.as_ref(),
                ctx.rows(),
            )?));
        } else {
            ops.push(linear(
                ctx.gpu,
                y,
                x,
                &ctx.p.get(&self.weight())?,
                ctx.p.opt(&self.bias())?.as_ref(),
                ctx.rows(),
                self.fan_in,
                self.fan_out,
            )?);
        }
        let (an, bn) = self.lora_names();
        let Some(a) = ctx.p.opt(&an)? else {
            return Ok(());
        };
        let (b, rows) = (ctx.p.get(&bn)?, ctx.rows());
        let (r, scale) = (a.shape()[0], lora_scale(ctx.p.layout));
        let u = ctx.shared(&format!("lora u {r}"), rows * r)?;
        let dropped = self.lora_dropped_input(ctx, ops, x)?;
        let x = dropped.as_ref().unwrap_or(x);
        ops.extend(lora_up(ctx.gpu, y, &u, x, &a, &b, scale, rows, self)?);
        Ok(())
    }

    /// Whether this layer's products can take a GELU epilogue ([`Linear::forward_gelu`],
    /// [`Linear::backward_gelu`]): a plain weight, neither quantised (no epilogue) nor with a
    /// LoRA adapter (whose term lands on Y and dX after the base product, so the GELU step would
    /// come too early).
    pub fn fuses_gelu(&self, ctx: &GpuCtx<'_>) -> Result<bool> {
        Ok(ctx.quant.get(&self.weight()).is_none() && ctx.p.opt(&self.lora_names().0)?.is_none())
    }

    /// `Y = X·Wᵀ (+ b)` and `act = gelu(Y)` in one pass (bit-identical to [`Linear::forward`]
    /// followed by the GELU kernel). Only where [`Linear::fuses_gelu`].
    pub fn forward_gelu(
        &self,
        ctx: &mut GpuCtx<'_>,
        ops: &mut Ops,
        y: &GpuTensor,
        act: &GpuTensor,
        x: &GpuTensor,
    ) -> Result<()> {
        self.check_fuses_gelu(ctx)?;
        ops.push(Box::new(Matmul::with_gelu(
            ctx.gpu,
            None,
            y,
            x,
            &ctx.p.get(&self.weight())?,
            ctx.p.opt(&self.bias())?.as_ref(),
            GeluEpilogue::Forward { activation: act },
            &MatmulSpec::new(Layout::NT, ctx.rows(), self.fan_out, self.fan_in),
        )?));
        Ok(())
    }

    fn check_fuses_gelu(&self, ctx: &GpuCtx<'_>) -> Result<()> {
        if self.fuses_gelu(ctx)? {
            return Ok(());
        }
        Err(crate::Error::shape(
            "linear",
            format!(
                "{}: a quantised or LoRA-adapted product cannot take a GELU epilogue",
                self.prefix
            ),
        ))
    }

    /// With adapter dropout: records `xd = dropout(x)` at the adapter's site into a scratch
    /// buffer shared by every layer of the same width (used at once, by this layer's adapter
    /// only; the backward draws the same mask again rather than keeping one per layer) and
    /// returns it. Without: records nothing and returns `None`.
    fn lora_dropped_input(
        &self,
        ctx: &mut GpuCtx<'_>,
        ops: &mut Ops,
        x: &GpuTensor,
    ) -> Result<Option<GpuTensor>> {
        let Some(state) = ctx.lora_dropout else {
            return Ok(None);
        };
        let xd = ctx.shared(&format!("lora dropped x {}", x.len()), x.len())?;
        ops.push(Box::new(Dropout::new(
            ctx.gpu,
            &xd,
            Some(x),
            state,
            self.lora_site,
        )?));
        Ok(Some(xd))
    }

    /// dX = dY·W (overwritten); dW += dYᵀ·X and db += 1ᵀ·dY unless frozen (the gradient
    /// layout lacks them); with LoRA, dB += s·dYᵀ·U and dA += dUᵀ·X with U = X·Aᵀ (recomputed:
    /// rows × rank) and dU = s·dY·B, and dX += dU·A.
    pub fn backward(
        &self,
        ctx: &mut GpuCtx<'_>,
        ops: &mut Ops,
        dx: &GpuTensor,
        dy: &GpuTensor,
        x: &GpuTensor,
    ) -> Result<()> {
        self.backward_with(ctx, ops, dx, dy, x, None)
    }

    /// [`Linear::backward`] with dX = (dY·W) ⊙ gelu'(`pre`) written in the same pass: the input
    /// gradient of an MLP's output projection taken through its GELU (bit-identical to the
    /// backward followed by the GELU backward kernel). Only where [`Linear::fuses_gelu`].
    pub fn backward_gelu(
        &self,
        ctx: &mut GpuCtx<'_>,
        ops: &mut Ops,
        dx: &GpuTensor,
        dy: &GpuTensor,
        x: &GpuTensor,
        pre: &GpuTensor,
    ) -> Result<()> {
        self.check_fuses_gelu(ctx)?;
        self.backward_with(ctx, ops, dx, dy, x, Some(pre))
    }

    fn backward_with(
        &self,
        ctx: &mut GpuCtx<'_>,
        ops: &mut Ops,
        dx: &GpuTensor,
        dy: &GpuTensor,
        x: &GpuTensor,
        gelu_pre: Option<&GpuTensor>,
    ) -> Result<()> {
        let (gpu, rows) = (ctx.gpu, ctx.rows());
        let (fan_in, fan_out) = (self.fan_in, self.fan_out);
        if ctx.quant.contains_key(&self.weight()) {
            return Err(Error::shape(
                "linear",
                format!(
                    "{} is quantised: inference only, no backward",
                    self.weight()
                ),
            ));
        }
        let w = ctx.p.get(&self.weight())?;
        let (an, bn) = self.lora_names();
        let adapter = ctx.p.opt(&an)?;
        // With adapter dropout, the adapter's part of dX goes through the mask, which must not
        // touch the base path's part: the adapter writes dX first and masks it in place, and
        // the base product then accumulates onto it (no extra buffer or add kernel).
        let masked_first = adapter.is_some() && ctx.lora_dropout.is_some();
        if let (Some(a), true) = (&adapter, masked_first) {
            self.lora_backward(ctx, ops, (&an, &bn), a, dx, dy, x)?;
        }
        let input_grad = MatmulSpec::new(Layout::NN, rows, fan_in, fan_out);
        ops.push(Box::new(match gelu_pre {
            Some(pre) => Matmul::with_gelu(
                gpu,
                None,
                dx,
                dy,
                &w,
                None,
                GeluEpilogue::Backward {
                    pre_activation: pre,
                },
                &input_grad,
            )?,
            None => Matmul::new(gpu, dx, dy, &w, None, &input_grad.accumulate(masked_first))?,
        }));
        if let Some(dw) = ctx.g.opt(&self.weight())? {
            ops.push(Box::new(Matmul::new(
                gpu,
                &dw,
                dy,
                x,
                None,
                &MatmulSpec::new(Layout::TN, fan_out, fan_in, rows).accumulate(true),
            )?));
        }
        if let Some(db) = ctx.g.opt(&self.bias())? {
            // The bias gradient is a column sum: a 1×rows by rows×fan_out product, deterministic.
            ops.push(Box::new(Matmul::new(
                gpu,
                &db,
                ctx.ones,
                dy,
                None,
                &MatmulSpec::new(Layout::TN, 1, fan_out, rows).accumulate(true),
            )?));
        }
        if let (Some(a), false) = (&adapter, masked_first) {
            self.lora_backward(ctx, ops, (&an, &bn), a, dx, dy, x)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn lora_backward(
        &self,
        ctx: &mut GpuCtx<'_>,
        ops: &mut Ops,
        (an, bn): (&str, &str),
        a: &GpuTensor,
        dx: &GpuTensor,
        dy: &GpuTensor,
        x: &GpuTensor,
    ) -> Result<()> {
        let (rows, r) = (ctx.rows(), a.shape()[0]);
        let (fan_in, fan_out) = (self.fan_in, self.fan_out);
        let scale = lora_scale(ctx.p.layout);
        let b = ctx.p.get(bn)?;
        let (da, db) = (ctx.g.get(an)?, ctx.g.get(bn)?);
        let u = ctx.shared(&format!("lora u {r}"), rows * r)?;
        let du = ctx.shared(&format!("lora du {r}"), rows * r)?;
        // With dropout the adapter saw xd = dropout(x): the same mask again (same state and
        // site), for U and dA. dX then gets dropout(dU·A), written before the base product
        // (see `backward`).
        let dropped = self.lora_dropped_input(ctx, ops, x)?;
        let masked = dropped.is_some();
        let x = dropped.as_ref().unwrap_or(x);
        let gpu = ctx.gpu;
        let mm = |c: &GpuTensor, a: &GpuTensor, b: &GpuTensor, spec: MatmulSpec| {
            Ok(Box::new(Matmul::new(gpu, c, a, b, None, &spec)?) as Box<dyn Record>)
        };
        let steps: [Result<Box<dyn Record>>; 5] = [
            mm(&u, x, a, MatmulSpec::new(Layout::NT, rows, r, fan_in)),
            mm(
                &db,
                dy,
                &u,
                MatmulSpec::new(Layout::TN, fan_out, r, rows)
                    .alpha(scale)
                    .accumulate(true),
            ),
            mm(
                &du,
                dy,
                &b,
                MatmulSpec::new(Layout::NN, rows, r, fan_out).alpha(scale),
            ),
            mm(
                &da,
                &du,
                x,
                MatmulSpec::new(Layout::TN, r, fan_in, rows).accumulate(true),
            ),
            mm(
                dx,
                &du,
                a,
                MatmulSpec::new(Layout::NN, rows, fan_in, r).accumulate(!masked),
            ),
        ];
        for s in steps {
            ops.push(s?);
        }
        if let (true, Some(state)) = (masked, ctx.lora_dropout) {
            ops.push(Box::new(Dropout::new(
                gpu,
                dx,
                None,
                state,
                self.lora_site,
            )?));
        }
        Ok(())
    }

    /// Forward of one row (the decoder), adapters included.
    pub fn decode(
        &self,
        d: &mut DecodeCtx<'_>,
        ops: &mut Ops,
        y: &GpuTensor,
        x: &GpuTensor,
    ) -> Result<()> {
        if let Some(w) = d.model.quantized(&self.weight()) {
            let bias = d.param_opt(&self.bias())?;
            ops.push(Box::new(QMatmul::new(d.gpu, y, x, w, bias.as_ref(), 1)?));
        } else {
            ops.push(linear(
                d.gpu,
                y,
                x,
                &d.param(&self.weight())?,
                d.param_opt(&self.bias())?.as_ref(),
                1,
                self.fan_in,
                self.fan_out,
            )?);
        }
        let (an, bn) = self.lora_names();
        let Some(a) = d.param_opt(&an)? else {
            return Ok(());
        };
        let b = d.param(&bn)?;
        let r = a.shape()[0];
        let u = d.act("decode lora u", r)?;
        let scale = lora_scale(d.model.layout());
        ops.extend(lora_up(d.gpu, y, &u, x, &a, &b, scale, 1, self)?);
        Ok(())
    }

    /// CPU forward: `y = x·Wᵀ (+ b) (+ s·(x·Aᵀ)·Bᵀ)`.
    pub fn cpu_forward(&self, c: &CpuCtx<'_>, y: &mut [f32], x: &[f32]) -> Result<()> {
        let rows = c.rows();
        crate::cpu::matmul::matmul(
            y,
            x,
            c.get(&self.weight())?,
            c.opt(&self.bias()),
            &MatmulSpec::new(Layout::NT, rows, self.fan_out, self.fan_in),
        )?;
        let (an, bn) = self.lora_names();
        let Some(a) = c.opt(&an) else {
            return Ok(());
        };
        let r = a.len() / self.fan_in;
        let mut u = vec![0.0f32; rows * r];
        let dropped = self.cpu_lora_dropped_input(c, x);
        crate::cpu::matmul::matmul(
            &mut u,
            dropped.as_deref().unwrap_or(x),
            a,
            None,
            &MatmulSpec::new(Layout::NT, rows, r, self.fan_in),
        )?;
        crate::cpu::matmul::matmul(
            y,
            &u,
            c.get(&bn)?,
            None,
            &MatmulSpec::new(Layout::NT, rows, self.fan_out, r)
                .alpha(lora_scale(c.layout))
                .accumulate(true),
        )
    }

    /// CPU backward: dX (overwritten), dW and db (accumulated), and the adapters' gradients.
    pub fn cpu_backward(
        &self,
        c: &CpuCtx<'_>,
        g: &mut [f32],
        dx: &mut [f32],
        dy: &[f32],
        x: &[f32],
    ) -> Result<()> {
        let (rows, fan_in, fan_out) = (c.rows(), self.fan_in, self.fan_out);
        crate::cpu::matmul::matmul(
            dx,
            dy,
            c.get(&self.weight())?,
            None,
            &MatmulSpec::new(Layout::NN, rows, fan_in, fan_out),
        )?;
        crate::cpu::matmul::matmul(
            grad_mut(c.layout, g, &self.weight())?,
            dy,
            x,
            None,
            &MatmulSpec::new(Layout::TN, fan_out, fan_in, rows).accumulate(true),
        )?;
        if c.layout.get(&self.bias()).is_some() {
            let db = grad_mut(c.layout, g, &self.bias())?;
            for r in 0..rows {
                for (g, d) in db.iter_mut().zip(&dy[r * fan_out..(r + 1) * fan_out]) {
                    *g += d;
                }
            }
        }
        let (an, bn) = self.lora_names();
        if let Some(a) = c.opt(&an) {
            let b = c.get(&bn)?;
            let r = a.len() / fan_in;
            let s = lora_scale(c.layout);
            let mm = crate::cpu::matmul::matmul;
            let dropped = self.cpu_lora_dropped_input(c, x);
            let x = dropped.as_deref().unwrap_or(x);
            let mut u = vec![0.0f32; rows * r];
            mm(
                &mut u,
                x,
                a,
                None,
                &MatmulSpec::new(Layout::NT, rows, r, fan_in),
            )?;
            let spec = MatmulSpec::new(Layout::TN, fan_out, r, rows);
            mm(
                grad_mut(c.layout, g, &bn)?,
                dy,
                &u,
                None,
                &spec.alpha(s).accumulate(true),
            )?;
            let mut du = vec![0.0f32; rows * r];
            let spec = MatmulSpec::new(Layout::NN, rows, r, fan_out).alpha(s);
            mm(&mut du, dy, b, None, &spec)?;
            let spec = MatmulSpec::new(Layout::TN, r, fan_in, rows).accumulate(true);
            mm(grad_mut(c.layout, g, &an)?, &du, x, None, &spec)?;
            match (&c.lora_dropout, dropped.is_some()) {
                (Some(state), true) => {
                    // dX += dropout(dU·A): the gradient to the adapter's input goes back
                    // through the same mask (and its 1/(1−p)) before meeting the base path's.
                    let mut dxd = vec![0.0f32; rows * fan_in];
                    let spec = MatmulSpec::new(Layout::NN, rows, fan_in, r);
                    mm(&mut dxd, &du, a, None, &spec)?;
                    let mut masked = vec![0.0f32; dxd.len()];
                    crate::cpu::dropout::dropout(&mut masked, &dxd, state, self.lora_site);
                    dx.iter_mut().zip(&masked).for_each(|(d, m)| *d += m);
                }
                _ => {
                    let spec = MatmulSpec::new(Layout::NN, rows, fan_in, r).accumulate(true);
                    mm(dx, &du, a, None, &spec)?;
                }
            }
        }
        Ok(())
    }

    /// The CPU reference's `dropout(x)` at the adapter's site, when the context's adapters drop.
    fn cpu_lora_dropped_input(&self, c: &CpuCtx<'_>, x: &[f32]) -> Option<Vec<f32>> {
        let state = c.lora_dropout.as_ref()?;
        let mut xd = vec![0.0f32; x.len()];
        crate::cpu::dropout::dropout(&mut xd, x, state, self.lora_site);
        Some(xd)
    }
}

/// alpha/rank of the layout's adapters (1 when it has none; no layer reads it then).
fn lora_scale(layout: &ParamLayout) -> f32 {
    layout.lora_scale().unwrap_or(1.0)
}

/// `u = x·Aᵀ`, then `y += scale·u·Bᵀ` over `rows` rows of the linear layer `l`.
#[allow(clippy::too_many_arguments)]
fn lora_up(
    gpu: &Gpu,
    y: &GpuTensor,
    u: &GpuTensor,
    x: &GpuTensor,
    a: &GpuTensor,
    b: &GpuTensor,
    scale: f32,
    rows: usize,
    l: &Linear<'_>,
) -> Result<[Box<dyn Record>; 2]> {
    let r = a.shape()[0];
    Ok([
        Box::new(Matmul::new(
            gpu,
            u,
            x,
            a,
            None,
            &MatmulSpec::new(Layout::NT, rows, r, l.fan_in),
        )?),
        Box::new(Matmul::new(
            gpu,
            y,
            u,
            b,
            None,
            &MatmulSpec::new(Layout::NT, rows, l.fan_out, r)
                .alpha(scale)
                .accumulate(true),
        )?),
    ])
}

/// What the units of the CPU reference share: the parameters and the micro-batch.
pub(crate) struct CpuCtx<'a> {
    pub layout: &'a ParamLayout,
    pub params: &'a [f32],
    pub batch: GptBatch,
    pub inputs: &'a [u32],
    /// The factor the loss gradient carries (routers multiply their auxiliary gradients by it).
    pub dloss_scale: f32,
    /// Each routed MLP's statistics, in layer order, as the forward computes them.
    pub moe_stats: std::cell::RefCell<Vec<crate::cpu::moe::MoeStats>>,
    /// The LoRA adapters' input dropout (training only; `None` keeps every element).
    pub lora_dropout: Option<DropoutState>,
}

impl<'a> CpuCtx<'a> {
    /// B·T.
    pub fn rows(&self) -> usize {
        self.batch.batch * self.batch.seq
    }
    pub fn get(&self, name: &str) -> Result<&'a [f32]> {
        let t = self
            .layout
            .get(name)
            .ok_or_else(|| Error::shape("gpt", format!("the layout has no tensor {name}")))?;
        Ok(&self.params[t.offset..t.offset + t.len()])
    }
    pub fn opt(&self, name: &str) -> Option<&'a [f32]> {
        self.layout
            .get(name)
            .map(|t| &self.params[t.offset..t.offset + t.len()])
    }
}

/// The gradient slice of tensor `name` in a flat gradient buffer.
pub(crate) fn grad_mut<'g>(
    layout: &ParamLayout,
    g: &'g mut [f32],
    name: &str,
) -> Result<&'g mut [f32]> {
    let t = layout
        .get(name)
        .ok_or_else(|| Error::shape("gpt", format!("the layout has no tensor {name}")))?;
    Ok(&mut g[t.offset..t.offset + t.len()])
}

/// The backward half of a unit of the CPU reference, built by its forward.
pub(crate) trait CpuBackward {
    /// Adds this unit's parameter gradients into `g` and returns the gradient of its input given
    /// that of its output (`None` for the embedding).
    fn backward(
        self: Box<Self>,
        c: &CpuCtx<'_>,
        g: &mut [f32],
        dy: Vec<f32>,
    ) -> Result<Option<Vec<f32>>>;
}

/// What the units of the one-token decoder share.
pub(crate) struct DecodeCtx<'a> {
    pub gpu: &'a Gpu,
    pub model: &'a super::gpu::GptGpu,
    /// u32 (token, pos) of the step.
    pub step: &'a GpuTensor,
    /// Buffers the plan keeps alive.
    pub keep: Vec<GpuTensor>,
}

impl DecodeCtx<'_> {
    /// A fresh one-row activation (the plan keeps it); returns a handle on it.
    pub fn act(&mut self, name: &str, len: usize) -> Result<GpuTensor> {
        let t = self
            .gpu
            .zeros(name, &[len], DType::from(self.model.precision()))?;
        let out = alias(&t)?;
        self.keep.push(t);
        Ok(out)
    }
    /// A fresh f32 scalar (the norms' statistics of the one row).
    pub fn stat(&mut self, name: &str) -> Result<GpuTensor> {
        let t = self.gpu.zeros(name, &[1], DType::F32)?;
        let out = alias(&t)?;
        self.keep.push(t);
        Ok(out)
    }
    pub fn param(&self, name: &str) -> Result<GpuTensor> {
        self.model.param(name)
    }
    pub fn param_opt(&self, name: &str) -> Result<Option<GpuTensor>> {
        self.model.param_opt(name)
    }
}
