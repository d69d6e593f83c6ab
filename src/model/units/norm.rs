//! The norm unit over the channels of each row: GPT-2's layer norm (gain, optional shift) or
//! Llama's RMSNorm (gain only).

use super::{CpuBackward, CpuCtx, DecodeCtx, GpuCtx, Ops, alias, grad_mut};
use crate::Result;
use crate::gpu::GpuTensor;
use crate::kernels::Record;
use crate::kernels::layernorm::{LayerNormBackward, LayerNormForward};
use crate::kernels::rmsnorm::{RmsNormBackward, RmsNormForward};
use crate::model::NormKind;
use crate::model::layout::{Component, LayoutBuilder, ParamKind};
use crate::ops::{LayerNormSpec, RmsNormSpec};

/// A layer norm called `prefix` (`h.0.ln_1`, `ln_f`).
#[derive(Clone, Debug)]
pub(crate) struct Norm {
    pub prefix: String,
    pub kind: NormKind,
    pub eps: f32,
    pub channels: usize,
    /// A shift (layer norm only).
    pub bias: bool,
}

impl Norm {
    fn weight(&self) -> String {
        format!("{}.weight", self.prefix)
    }
    fn bias_name(&self) -> String {
        format!("{}.bias", self.prefix)
    }
    fn ln_spec(&self, rows: usize) -> LayerNormSpec {
        LayerNormSpec {
            eps: self.eps,
            ..LayerNormSpec::new(rows, self.channels)
        }
    }
    fn rms_spec(&self, rows: usize) -> RmsNormSpec {
        RmsNormSpec::new(rows, self.channels).eps(self.eps)
    }

    /// The forward op of `rows` rows (layer norm's `mean` is unused by RMSNorm).
    #[allow(clippy::too_many_arguments)]
    fn op(
        &self,
        gpu: &crate::gpu::Gpu,
        out: &GpuTensor,
        mean: &GpuTensor,
        rstd: &GpuTensor,
        x: &GpuTensor,
        weight: &GpuTensor,
        bias: &GpuTensor,
        rows: usize,
    ) -> Result<Box<dyn Record>> {
        Ok(match self.kind {
            NormKind::LayerNorm => Box::new(LayerNormForward::new(
                gpu,
                out,
                mean,
                rstd,
                x,
                weight,
                bias,
                &self.ln_spec(rows),
            )?),
            NormKind::RmsNorm => Box::new(RmsNormForward::new(
                gpu,
                out,
                rstd,
                x,
                weight,
                &self.rms_spec(rows),
            )?),
        })
    }

    /// Gain (and shift), never decayed.
    pub fn declare(&self, l: &mut LayoutBuilder) {
        l.add(
            self.weight(),
            vec![self.channels],
            ParamKind::Weight,
            Component::Norm,
            false,
        );
        if self.bias {
            l.add(
                self.bias_name(),
                vec![self.channels],
                ParamKind::Bias,
                Component::Norm,
                false,
            );
        }
    }

    /// Records `out = norm(x)`; the returned state records the backward.
    pub fn forward(&self, ctx: &mut GpuCtx<'_>, ops: &mut Ops, x: &GpuTensor) -> Result<NormGpu> {
        let (bt, c) = (ctx.rows(), self.channels);
        let s = NormGpu {
            unit: self.clone(),
            input: alias(x)?,
            out: ctx.act(&self.prefix, bt * c)?,
            mean: ctx.stat(&format!("{} mean", self.prefix))?,
            rstd: ctx.stat(&format!("{} rstd", self.prefix))?,
        };
        let zero_bias = ctx.shared("zero norm bias", c)?;
        let bias = ctx.p.opt(&self.bias_name())?;
        ops.push(self.op(
            ctx.gpu,
            &s.out,
            &s.mean,
            &s.rstd,
            x,
            &ctx.p.get(&self.weight())?,
            bias.as_ref().unwrap_or(&zero_bias),
            bt,
        )?);
        Ok(s)
    }

    /// The one-row forward of the decoder.
    pub fn decode(&self, d: &mut DecodeCtx<'_>, ops: &mut Ops, x: &GpuTensor) -> Result<GpuTensor> {
        let c = self.channels;
        let out = d.act(&format!("decode {}", self.prefix), c)?;
        let (mean, rstd) = (d.stat("decode mean")?, d.stat("decode rstd")?);
        let zero_bias = d.act("decode zero bias", c)?;
        let bias = d.param_opt(&self.bias_name())?;
        ops.push(self.op(
            d.gpu,
            &out,
            &mean,
            &rstd,
            x,
            &d.param(&self.weight())?,
            bias.as_ref().unwrap_or(&zero_bias),
            1,
        )?);
        Ok(out)
    }

    /// CPU forward; returns the output and the state of the backward.
    pub fn cpu_forward(&self, c: &CpuCtx<'_>, x: Vec<f32>) -> Result<(Vec<f32>, NormCpu)> {
        let (bt, ch) = (c.rows(), self.channels);
        let zeros = vec![0.0f32; ch];
        let mut s = NormCpu {
            unit: self.clone(),
            mean: vec![0.0; bt],
            rstd: vec![0.0; bt],
            input: x,
        };
        let mut out = vec![0.0; bt * ch];
        match self.kind {
            NormKind::LayerNorm => crate::cpu::layernorm::layernorm_forward(
                &mut out,
                &mut s.mean,
                &mut s.rstd,
                &s.input,
                c.get(&self.weight())?,
                c.opt(&self.bias_name()).unwrap_or(&zeros),
                &self.ln_spec(bt),
            )?,
            NormKind::RmsNorm => crate::cpu::rmsnorm::rmsnorm_forward(
                &mut out,
                &mut s.rstd,
                &s.input,
                c.get(&self.weight())?,
                &self.rms_spec(bt),
            )?,
        }
        Ok((out, s))
    }
}

/// The GPU state of a norm's backward.
pub(crate) struct NormGpu {
    unit: Norm,
    pub input: GpuTensor,
    pub out: GpuTensor,
    mean: GpuTensor,
    rstd: GpuTensor,
}

impl NormGpu {
    /// Records dx (+)= ∂/∂x given dy; parameter gradients accumulate. `accumulate_input` adds
    /// into dx (the residual stream's gradient already sits there).
    pub fn backward(
        &self,
        ctx: &mut GpuCtx<'_>,
        ops: &mut Ops,
        dx: &GpuTensor,
        dy: &GpuTensor,
        accumulate_input: bool,
    ) -> Result<()> {
        let u = &self.unit;
        let rows = ctx.rows();
        // A frozen gain's gradient goes to scratch nobody reads (the kernels write it with the
        // input gradient they exist for).
        let gw = match ctx.g.opt(&u.weight())? {
            Some(g) => g,
            None => ctx.shared(&format!("frozen norm grad {}", u.channels), u.channels)?,
        };
        if u.kind == NormKind::RmsNorm {
            let spec = RmsNormSpec {
                accumulate_params: true,
                accumulate_input,
                ..u.rms_spec(rows)
            };
            ops.push(Box::new(RmsNormBackward::new(
                ctx.gpu,
                dx,
                &gw,
                dy,
                &self.input,
                &ctx.p.get(&u.weight())?,
                &self.rstd,
                &spec,
            )?));
            return Ok(());
        }
        let spec = LayerNormSpec {
            accumulate_params: true,
            accumulate_input,
            ..u.ln_spec(rows)
        };
        // Without biases the shift's gradient goes to a scratch buffer nobody reads.
        let scratch = ctx.shared("unused norm bias grad", u.channels)?;
        let gb = ctx.g.opt(&u.bias_name())?;
        ops.push(Box::new(LayerNormBackward::new(
            ctx.gpu,
            dx,
            &gw,
            gb.as_ref().unwrap_or(&scratch),
            dy,
            &self.input,
            &ctx.p.get(&u.weight())?,
            &self.mean,
            &self.rstd,
            &spec,
        )?));
        Ok(())
    }
}

/// The CPU state of a norm's backward.
pub(crate) struct NormCpu {
    unit: Norm,
    pub input: Vec<f32>,
    mean: Vec<f32>,
    rstd: Vec<f32>,
}

impl NormCpu {
    /// dx (+)= ∂/∂x given dy; parameter gradients accumulate into `g`.
    pub fn backward(
        &self,
        c: &CpuCtx<'_>,
        g: &mut [f32],
        dx: &mut [f32],
        dy: &[f32],
        accumulate_input: bool,
    ) -> Result<()> {
        let u = &self.unit;
        if u.kind == NormKind::RmsNorm {
            let spec = RmsNormSpec {
                accumulate_params: true,
                accumulate_input,
                ..u.rms_spec(c.rows())
            };
            let mut dw = grad_mut(c.layout, g, &u.weight())?.to_vec();
            crate::cpu::rmsnorm::rmsnorm_backward(
                dx,
                &mut dw,
                dy,
                &self.input,
                c.get(&u.weight())?,
                &self.rstd,
                &spec,
            )?;
            grad_mut(c.layout, g, &u.weight())?.copy_from_slice(&dw);
            return Ok(());
        }
        let spec = LayerNormSpec {
            accumulate_params: true,
            accumulate_input,
            ..u.ln_spec(c.rows())
        };
        let mut dw = grad_mut(c.layout, g, &u.weight())?.to_vec();
        let mut db = match c.layout.get(&u.bias_name()) {
            Some(_) => grad_mut(c.layout, g, &u.bias_name())?.to_vec(),
            None => vec![0.0; u.channels],
        };
        crate::cpu::layernorm::layernorm_backward(
            dx,
            &mut dw,
            &mut db,
            dy,
            &self.input,
            c.get(&u.weight())?,
            &self.mean,
            &self.rstd,
            &spec,
        )?;
        grad_mut(c.layout, g, &u.weight())?.copy_from_slice(&dw);
        if c.layout.get(&u.bias_name()).is_some() {
            grad_mut(c.layout, g, &u.bias_name())?.copy_from_slice(&db);
        }
        Ok(())
    }
}

/// The final norm as a unit of its own (its output is the head's input).
pub(crate) struct FinalNormCpu(pub NormCpu);

impl CpuBackward for FinalNormCpu {
    fn backward(
        self: Box<Self>,
        c: &CpuCtx<'_>,
        g: &mut [f32],
        dy: Vec<f32>,
    ) -> Result<Option<Vec<f32>>> {
        let mut dx = vec![0.0f32; c.rows() * self.0.unit.channels];
        self.0.backward(c, g, &mut dx, &dy, false)?;
        Ok(Some(dx))
    }
}

/// The GPU side of [`FinalNormCpu`]: its input gradient is the residual stream's, `dresid`.
pub(crate) struct FinalNormGpu(pub NormGpu);

impl super::GpuBackward for FinalNormGpu {
    fn backward(
        &self,
        ctx: &mut GpuCtx<'_>,
        ops: &mut Ops,
        dy: &GpuTensor,
    ) -> Result<Option<GpuTensor>> {
        let dx = ctx.shared("dresid", ctx.rows() * self.0.unit.channels)?;
        self.0.backward(ctx, ops, &dx, dy, false)?;
        Ok(Some(dx))
    }
}
