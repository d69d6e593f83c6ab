//! The output head: logits = x·Wᵀ over the vocabulary. GPT-2 ties W to the token embedding
//! (`wte.weight`), so the head declares no tensor of its own; Llama's is `lm_head.weight`.

use super::{CpuBackward, CpuCtx, DecodeCtx, GpuBackward, GpuCtx, Linear, Ops, alias};
use crate::Result;
use crate::gpu::GpuTensor;
use crate::model::layout::{Component, LayoutBuilder, ParamKind};

/// The head, tied to the `weight` tensor (fan-in `channels`, fan-out `vocab`).
#[derive(Clone, Debug)]
pub(crate) struct Head {
    /// Prefix of the weight (`wte` when tied).
    pub prefix: String,
    /// Whether the weight is the token embedding's (declared there, not here).
    pub tied: bool,
    pub channels: usize,
    pub vocab: usize,
}

impl Head {
    fn linear(&self) -> Linear<'_> {
        Linear {
            prefix: &self.prefix,
            fan_in: self.channels,
            fan_out: self.vocab,
            // The head is never a LoRA target: no adapter, so no adapter dropout.
            lora_site: 0,
        }
    }

    /// A tied head declares nothing; a separate one its (vocab, channels) weight, decayed.
    pub fn declare(&self, l: &mut LayoutBuilder) {
        if !self.tied {
            l.add(
                format!("{}.weight", self.prefix),
                vec![self.vocab, self.channels],
                ParamKind::Weight,
                Component::Head,
                true,
            );
        }
    }

    pub fn forward(
        &self,
        ctx: &mut GpuCtx<'_>,
        ops: &mut Ops,
        x: &GpuTensor,
    ) -> Result<(Box<dyn GpuBackward>, GpuTensor)> {
        let logits = ctx.act("logits", ctx.rows() * self.vocab)?;
        self.linear().forward(ctx, ops, &logits, x)?;
        Ok((
            Box::new(HeadGpu {
                unit: self.clone(),
                input: alias(x)?,
            }),
            logits,
        ))
    }

    pub fn decode(&self, d: &mut DecodeCtx<'_>, ops: &mut Ops, x: &GpuTensor) -> Result<GpuTensor> {
        let logits = d.act("decode logits", self.vocab)?;
        self.linear().decode(d, ops, &logits, x)?;
        Ok(logits)
    }

    pub fn cpu_forward(
        &self,
        c: &CpuCtx<'_>,
        x: Vec<f32>,
    ) -> Result<(Box<dyn CpuBackward>, Vec<f32>)> {
        let mut logits = vec![0.0; c.rows() * self.vocab];
        self.linear().cpu_forward(c, &mut logits, &x)?;
        Ok((
            Box::new(HeadCpu {
                unit: self.clone(),
                input: x,
            }),
            logits,
        ))
    }
}

struct HeadGpu {
    unit: Head,
    input: GpuTensor,
}

impl GpuBackward for HeadGpu {
    fn backward(
        &self,
        ctx: &mut GpuCtx<'_>,
        ops: &mut Ops,
        dy: &GpuTensor,
    ) -> Result<Option<GpuTensor>> {
        let dx = ctx.shared("dlnf", ctx.rows() * self.unit.channels)?;
        self.unit
            .linear()
            .backward(ctx, ops, &dx, dy, &self.input)?;
        Ok(Some(dx))
    }
}

struct HeadCpu {
    unit: Head,
    input: Vec<f32>,
}

impl CpuBackward for HeadCpu {
    fn backward(
        self: Box<Self>,
        c: &CpuCtx<'_>,
        g: &mut [f32],
        dy: Vec<f32>,
    ) -> Result<Option<Vec<f32>>> {
        let mut dx = vec![0.0f32; c.rows() * self.unit.channels];
        self.unit
            .linear()
            .cpu_backward(c, g, &mut dx, &dy, &self.input)?;
        Ok(Some(dx))
    }
}
