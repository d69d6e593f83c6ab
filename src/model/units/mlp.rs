//! The MLP unit: GPT-2's `mlp.c_fc`, GELU (tanh approximation), `mlp.c_proj`; or Llama's
//! `mlp.gate_up_proj` (gate_proj and up_proj stacked by rows), SiLU(gate)·up, `mlp.down_proj`.

use super::{CpuCtx, DecodeCtx, GpuCtx, Linear, Ops, alias, lora_dropout_site};
use crate::Result;
use crate::finetune::LoraTarget;
use crate::gpu::GpuTensor;
use crate::kernels::Record;
use crate::kernels::activation::{GeluBackward, GeluForward};
use crate::kernels::swiglu::{SwiGluBackward, SwiGluForward};
use crate::model::MlpKind;
use crate::model::layout::{Component, LayoutBuilder, ParamKind};
use crate::ops::SwiGluSpec;

/// Layer `layer`'s MLP.
#[derive(Clone, Debug)]
pub(crate) struct Mlp {
    pub layer: usize,
    pub kind: MlpKind,
    /// Prefixes of the input projection (fc, or gate|up) and of the output projection.
    pub fc_prefix: String,
    pub proj_prefix: String,
    pub channels: usize,
    pub hidden: usize,
    pub bias: bool,
}

impl Mlp {
    fn fc_prefix(&self) -> String {
        self.fc_prefix.clone()
    }
    fn proj_prefix(&self) -> String {
        self.proj_prefix.clone()
    }
    /// Width of the input projection's output: SwiGLU's gate|up is twice the hidden width.
    pub(crate) fn fc_width(&self) -> usize {
        match self.kind {
            MlpKind::Gelu => self.hidden,
            MlpKind::SwiGlu => 2 * self.hidden,
        }
    }
    fn linears<'n>(&self, fc: &'n str, proj: &'n str) -> (Linear<'n>, Linear<'n>) {
        let (c, h) = (self.channels, self.hidden);
        (
            Linear {
                prefix: fc,
                fan_in: c,
                fan_out: self.fc_width(),
                lora_site: lora_dropout_site(self.layer, LoraTarget::MlpFc),
            },
            Linear {
                prefix: proj,
                fan_in: h,
                fan_out: c,
                lora_site: lora_dropout_site(self.layer, LoraTarget::MlpProj),
            },
        )
    }

    /// The activation's forward over `rows` rows.
    fn activation(
        &self,
        gpu: &crate::gpu::Gpu,
        out: &GpuTensor,
        inp: &GpuTensor,
        rows: usize,
    ) -> Result<Box<dyn Record>> {
        Ok(match self.kind {
            MlpKind::Gelu => Box::new(GeluForward::new(gpu, out, inp)?),
            MlpKind::SwiGlu => Box::new(SwiGluForward::new(
                gpu,
                out,
                inp,
                &SwiGluSpec::new(rows, self.hidden),
            )?),
        })
    }

    pub fn declare(&self, l: &mut LayoutBuilder) {
        let (c, h) = (self.channels, self.hidden);
        for (prefix, shape) in [
            (self.fc_prefix(), [self.fc_width(), c]),
            (self.proj_prefix(), [c, h]),
        ] {
            l.add(
                format!("{prefix}.weight"),
                shape.to_vec(),
                ParamKind::Weight,
                Component::Mlp,
                true,
            );
            if self.bias {
                l.add(
                    format!("{prefix}.bias"),
                    vec![shape[0]],
                    ParamKind::Bias,
                    Component::Mlp,
                    false,
                );
            }
        }
    }

    /// Records `y = proj(gelu(fc(x)))`; `fuse` as in
    /// [`super::attention::Attention::forward`].
    pub fn forward(
        &self,
        ctx: &mut GpuCtx<'_>,
        ops: &mut Ops,
        x: &GpuTensor,
        fuse: Option<(&GpuTensor, &GpuTensor)>,
    ) -> Result<(MlpGpu, GpuTensor, bool)> {
        let (bt, c, h) = (ctx.rows(), self.channels, self.hidden);
        let name = |s: &str| format!("h.{}.{s}", self.layer);
        let s = MlpGpu {
            unit: self.clone(),
            input: alias(x)?,
            fc: ctx.act(&name("fc"), bt * self.fc_width())?,
            gelu: ctx.act(&name("gelu"), bt * h)?,
        };
        let (fp, pp) = (self.fc_prefix(), self.proj_prefix());
        let (lf, lp) = self.linears(&fp, &pp);
        let fuse = fuse.filter(|_| lp.fuses_residual(ctx));
        let y = match fuse {
            Some((out, _)) => alias(out)?,
            None => ctx.act(&name("mlp out"), bt * c)?,
        };
        if self.kind == MlpKind::Gelu && lf.fuses_gelu(ctx)? {
            // The activation in the first product's epilogue (bit-identical, one pass fewer).
            lf.forward_gelu(ctx, ops, &s.fc, &s.gelu, x)?;
        } else {
            lf.forward(ctx, ops, &s.fc, x)?;
            ops.push(self.activation(ctx.gpu, &s.gelu, &s.fc, bt)?);
        }
        lp.forward_residual(ctx, ops, &y, &s.gelu, fuse.map(|f| f.1))?;
        Ok((s, y, fuse.is_some()))
    }

    pub fn decode(&self, d: &mut DecodeCtx<'_>, ops: &mut Ops, x: &GpuTensor) -> Result<GpuTensor> {
        let (c, h) = (self.channels, self.hidden);
        let (fc, gelu) = (
            d.act("decode fc", self.fc_width())?,
            d.act("decode gelu", h)?,
        );
        let y = d.act("decode mlp", c)?;
        let (fp, pp) = (self.fc_prefix(), self.proj_prefix());
        let (lf, lp) = self.linears(&fp, &pp);
        lf.decode(d, ops, &fc, x)?;
        ops.push(self.activation(d.gpu, &gelu, &fc, 1)?);
        lp.decode(d, ops, &y, &gelu)?;
        Ok(y)
    }

    pub fn cpu_forward(&self, c: &CpuCtx<'_>, x: Vec<f32>) -> Result<(MlpCpu, Vec<f32>)> {
        let (bt, ch, h) = (c.rows(), self.channels, self.hidden);
        let mut s = MlpCpu {
            unit: self.clone(),
            fc: vec![0.0; bt * self.fc_width()],
            gelu: vec![0.0; bt * h],
            input: x,
        };
        let (fp, pp) = (self.fc_prefix(), self.proj_prefix());
        let (lf, lp) = self.linears(&fp, &pp);
        lf.cpu_forward(c, &mut s.fc, &s.input)?;
        match self.kind {
            MlpKind::Gelu => crate::cpu::activation::gelu_forward(&mut s.gelu, &s.fc)?,
            MlpKind::SwiGlu => {
                crate::cpu::swiglu::swiglu_forward(&mut s.gelu, &s.fc, &SwiGluSpec::new(bt, h))?
            }
        }
        let mut y = vec![0.0; bt * ch];
        lp.cpu_forward(c, &mut y, &s.gelu)?;
        Ok((s, y))
    }
}

/// The GPU state of an MLP's backward.
pub(crate) struct MlpGpu {
    unit: Mlp,
    input: GpuTensor,
    fc: GpuTensor,
    gelu: GpuTensor,
}

impl MlpGpu {
    /// Records the backward given dy; returns dx (a buffer shared across layers).
    pub fn backward(
        &self,
        ctx: &mut GpuCtx<'_>,
        ops: &mut Ops,
        dy: &GpuTensor,
    ) -> Result<GpuTensor> {
        let u = &self.unit;
        let (bt, c, h) = (ctx.rows(), u.channels, u.hidden);
        let dfc = ctx.shared(&format!("dfc {}", u.fc_width()), bt * u.fc_width())?;
        let dx = ctx.shared("dln", bt * c)?;
        let (fp, pp) = (u.fc_prefix(), u.proj_prefix());
        let (lf, lp) = u.linears(&fp, &pp);
        if u.kind == MlpKind::Gelu && lp.fuses_gelu(ctx)? {
            // dfc straight from the projection's input-gradient product, through gelu'(fc).
            lp.backward_gelu(ctx, ops, &dfc, dy, &self.gelu, &self.fc)?;
        } else {
            let dgelu = ctx.shared("dgelu", bt * h)?;
            lp.backward(ctx, ops, &dgelu, dy, &self.gelu)?;
            let spec = SwiGluSpec::new(bt, h);
            ops.push(match u.kind {
                MlpKind::Gelu => {
                    Box::new(GeluBackward::new(ctx.gpu, &dfc, &dgelu, &self.fc, false)?)
                        as Box<dyn Record>
                }
                MlpKind::SwiGlu => Box::new(SwiGluBackward::new(
                    ctx.gpu, &dfc, &dgelu, &self.fc, &spec, false,
                )?),
            });
        }
        lf.backward(ctx, ops, &dx, &dfc, &self.input)?;
        Ok(dx)
    }
}

/// The CPU state of an MLP's backward.
pub(crate) struct MlpCpu {
    unit: Mlp,
    input: Vec<f32>,
    fc: Vec<f32>,
    gelu: Vec<f32>,
}

impl MlpCpu {
    pub fn backward(&self, c: &CpuCtx<'_>, g: &mut [f32], dy: &[f32]) -> Result<Vec<f32>> {
        let u = &self.unit;
        let (bt, ch, h) = (c.rows(), u.channels, u.hidden);
        let (fp, pp) = (u.fc_prefix(), u.proj_prefix());
        let (lf, lp) = u.linears(&fp, &pp);
        let mut dgelu = vec![0.0f32; bt * h];
        lp.cpu_backward(c, g, &mut dgelu, dy, &self.gelu)?;
        let mut dfc = vec![0.0f32; bt * u.fc_width()];
        match u.kind {
            MlpKind::Gelu => {
                crate::cpu::activation::gelu_backward(&mut dfc, &dgelu, &self.fc, false)?
            }
            MlpKind::SwiGlu => crate::cpu::swiglu::swiglu_backward(
                &mut dfc,
                &dgelu,
                &self.fc,
                &SwiGluSpec::new(bt, h),
                false,
            )?,
        }
        let mut dx = vec![0.0f32; bt * ch];
        lf.cpu_backward(c, g, &mut dx, &dfc, &self.input)?;
        Ok(dx)
    }
}
