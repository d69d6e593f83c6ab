//! The pre-norm residual sublayer: `out = x + dropout(body(norm(x)))`, where the body is an
//! attention or an MLP unit. A transformer block is two of these.

use super::attention::{Attention, AttentionCpu, AttentionGpu};
use super::mlp::{Mlp, MlpCpu, MlpGpu};
use super::moe::{Moe, MoeCpu, MoeGpu};
use super::norm::{Norm, NormCpu, NormGpu};
use super::{CpuBackward, CpuCtx, DecodeCtx, GpuBackward, GpuCtx, Ops};
use crate::Result;
use crate::gpu::GpuTensor;
use crate::kernels::dropout::Dropout;
use crate::kernels::residual::ResidualForward;
use crate::model::layout::LayoutBuilder;

/// What a residual branch computes after its norm.
#[derive(Clone, Debug)]
pub(crate) enum Body {
    Attention(Attention),
    Mlp(Mlp),
    /// A routed MLP (mixture of experts).
    Moe(Moe),
}

/// `x + dropout(body(norm(x)))`.
#[derive(Clone, Debug)]
pub(crate) struct Residual {
    pub norm: Norm,
    pub body: Body,
    /// Dropout site of the branch output (distinct across the network).
    pub dropout_site: u32,
    /// Name of the output activation (`h.0.resid`, `h.0.out`).
    pub out_name: String,
}

enum BodyGpu {
    // Built once per layer: the size difference between the variants does not matter.
    Attention(Box<AttentionGpu>),
    Mlp(Box<MlpGpu>),
    Moe(Box<MoeGpu>),
}

enum BodyCpu {
    Attention(AttentionCpu),
    Mlp(MlpCpu),
    Moe(Box<MoeCpu>),
}

impl Residual {
    pub fn declare(&self, l: &mut LayoutBuilder) {
        self.norm.declare(l);
        match &self.body {
            Body::Attention(a) => a.declare(l),
            Body::Mlp(m) => m.declare(l),
            Body::Moe(m) => m.declare(l),
        }
    }

    pub fn forward(
        &self,
        ctx: &mut GpuCtx<'_>,
        ops: &mut Ops,
        x: &GpuTensor,
    ) -> Result<(Box<dyn GpuBackward>, GpuTensor)> {
        let norm = self.norm.forward(ctx, ops, x)?;
        let out = ctx.act(&self.out_name, x.len())?;
        // Without dropout on the branch, the add goes into the branch's output projection
        // (`Matmul::with_residual`): one dispatch and one pass over a B·T·C activation fewer per
        // sublayer, and no separate branch output buffer. With dropout the branch output must
        // exist on its own to be dropped first.
        let fuse = (!ctx.dropping).then_some((&out, x));
        let (body, y, fused) = match &self.body {
            Body::Attention(a) => {
                let (s, y, f) = a.forward(ctx, ops, &norm.out, fuse)?;
                (BodyGpu::Attention(Box::new(s)), y, f)
            }
            Body::Mlp(m) => {
                let (s, y, f) = m.forward(ctx, ops, &norm.out, fuse)?;
                (BodyGpu::Mlp(Box::new(s)), y, f)
            }
            Body::Moe(m) => {
                let (s, y) = m.forward(ctx, ops, &norm.out)?;
                (BodyGpu::Moe(Box::new(s)), y, false)
            }
        };
        if ctx.dropping {
            ops.push(Box::new(Dropout::new(
                ctx.gpu,
                &y,
                None,
                ctx.dropout_state,
                self.dropout_site,
            )?));
        }
        if !fused {
            ops.push(Box::new(ResidualForward::new(ctx.gpu, &out, x, &y)?));
        }
        let state = ResidualGpu {
            dropout_site: self.dropout_site,
            norm,
            body,
            _y: y,
        };
        Ok((Box::new(state), out))
    }

    pub fn decode(&self, d: &mut DecodeCtx<'_>, ops: &mut Ops, x: &GpuTensor) -> Result<GpuTensor> {
        let n = self.norm.decode(d, ops, x)?;
        let y = match &self.body {
            Body::Attention(a) => a.decode(d, ops, &n)?,
            Body::Mlp(m) => m.decode(d, ops, &n)?,
            Body::Moe(m) => m.decode(d, ops, &n)?,
        };
        let out = d.act(&format!("decode {}", self.out_name), x.len())?;
        ops.push(Box::new(ResidualForward::new(d.gpu, &out, x, &y)?));
        Ok(out)
    }

    pub fn cpu_forward(
        &self,
        c: &CpuCtx<'_>,
        x: Vec<f32>,
    ) -> Result<(Box<dyn CpuBackward>, Vec<f32>)> {
        let (n, norm) = self.norm.cpu_forward(c, x)?;
        let (body, y) = match &self.body {
            Body::Attention(a) => {
                let (s, y) = a.cpu_forward(c, n)?;
                (BodyCpu::Attention(s), y)
            }
            Body::Mlp(m) => {
                let (s, y) = m.cpu_forward(c, n)?;
                (BodyCpu::Mlp(s), y)
            }
            Body::Moe(m) => {
                let (s, y) = m.cpu_forward(c, n)?;
                (BodyCpu::Moe(Box::new(s)), y)
            }
        };
        let mut out = vec![0.0; y.len()];
        crate::cpu::residual::residual_forward(&mut out, &norm.input, &y)?;
        Ok((Box::new(ResidualCpu { norm, body }), out))
    }
}

struct ResidualGpu {
    dropout_site: u32,
    norm: NormGpu,
    body: BodyGpu,
    // The branch output, kept with the plan.
    _y: GpuTensor,
}

impl GpuBackward for ResidualGpu {
    /// The residual passes dy through unchanged; the branch's input gradient is added to it in
    /// place by the norm's backward, so dx is dy's buffer.
    fn backward(
        &self,
        ctx: &mut GpuCtx<'_>,
        ops: &mut Ops,
        dy: &GpuTensor,
    ) -> Result<Option<GpuTensor>> {
        // The gradient reaching a dropped branch: dropout(dy), same mask.
        let dbranch = if ctx.dropping {
            let d = ctx.shared("dbranch", dy.len())?;
            ops.push(Box::new(Dropout::new(
                ctx.gpu,
                &d,
                Some(dy),
                ctx.dropout_state,
                self.dropout_site,
            )?));
            d
        } else {
            super::alias(dy)?
        };
        let dn = match &self.body {
            BodyGpu::Attention(s) => s.backward(ctx, ops, &dbranch)?,
            BodyGpu::Mlp(s) => s.backward(ctx, ops, &dbranch)?,
            BodyGpu::Moe(s) => s.backward(ctx, ops, &dbranch)?,
        };
        self.norm.backward(ctx, ops, dy, &dn, true)?;
        Ok(Some(super::alias(dy)?))
    }
}

struct ResidualCpu {
    norm: NormCpu,
    body: BodyCpu,
}

impl CpuBackward for ResidualCpu {
    fn backward(
        self: Box<Self>,
        c: &CpuCtx<'_>,
        g: &mut [f32],
        mut dy: Vec<f32>,
    ) -> Result<Option<Vec<f32>>> {
        let dn = match &self.body {
            BodyCpu::Attention(s) => s.backward(c, g, &dy)?,
            BodyCpu::Mlp(s) => s.backward(c, g, &dy)?,
            BodyCpu::Moe(s) => s.backward(c, g, &dy)?,
        };
        self.norm.backward(c, g, &mut dy, &dn, true)?;
        Ok(Some(dy))
    }
}
