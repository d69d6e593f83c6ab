//! The embedding unit: token embedding plus, with learned positions, the position embedding
//! (GPT-2's wte + wpe; Llama's `model.embed_tokens` alone, positions entering through RoPE).
//!
//! Without a position table the kernels (which always add one) read a shared all-zero table and
//! write its gradient to a scratch buffer: exact (x + 0 = x), at the cost of one more read.

use super::{CpuBackward, CpuCtx, DecodeCtx, GpuBackward, GpuCtx, Ops};
use crate::gpu::GpuTensor;
use crate::kernels::decode::EmbedOne;
use crate::kernels::embedding::{EmbeddingBackward, EmbeddingForward};
use crate::kernels::quant::QEmbedding;
use crate::model::layout::{Component, LayoutBuilder, ParamKind};
use crate::ops::EmbeddingShape;
use crate::{Error, Result};

/// `x[b, t] = wte[token] (+ wpe[t])`.
#[derive(Clone, Debug)]
pub(crate) struct Embedding {
    /// The token table's name (`wte.weight`).
    pub tokens: String,
    /// The position table's name, with learned positions.
    pub table: Option<String>,
    pub vocab: usize,
    pub channels: usize,
    /// Positions the model addresses (the block size: rows of the position table).
    pub positions: usize,
    /// Whether AdamW decays the position table.
    pub decay_positions: bool,
}

impl Embedding {
    pub fn declare(&self, l: &mut LayoutBuilder) {
        let c = self.channels;
        l.add(
            self.tokens.clone(),
            vec![self.vocab, c],
            ParamKind::Weight,
            Component::Embedding,
            true,
        );
        if let Some(table) = &self.table {
            l.add(
                table.clone(),
                vec![self.positions, c],
                ParamKind::Weight,
                Component::Embedding,
                self.decay_positions,
            );
        }
    }

    fn shape(&self, batch: usize, seq: usize) -> EmbeddingShape {
        EmbeddingShape {
            batch,
            seq,
            channels: self.channels,
            vocab: self.vocab,
            positions: self.positions,
        }
    }

    /// The position table of the GPU step, or the shared zero table.
    fn wpe(&self, ctx: &mut GpuCtx<'_>) -> Result<GpuTensor> {
        match &self.table {
            Some(t) => ctx.p.get(t),
            None => ctx.shared("zero positions", self.positions * self.channels),
        }
    }

    /// Where the position gradient goes when there is no table to train (none, or frozen).
    fn wpe_scratch(&self, ctx: &mut GpuCtx<'_>) -> Result<GpuTensor> {
        ctx.shared("unused position grad", self.positions * self.channels)
    }

    pub fn forward(
        &self,
        ctx: &mut GpuCtx<'_>,
        ops: &mut Ops,
    ) -> Result<(Box<dyn GpuBackward>, GpuTensor)> {
        let out = ctx.act("embedded", ctx.rows() * self.channels)?;
        let wpe = self.wpe(ctx)?;
        if let Some(table) = ctx.quant.get(&self.tokens) {
            let q = QEmbedding::rows(ctx.gpu, &out, ctx.tokens, table, &wpe, ctx.batch.seq)?;
            ops.push(Box::new(q));
            return Ok((Box::new(self.clone()), out));
        }
        ops.push(Box::new(EmbeddingForward::new(
            ctx.gpu,
            &out,
            ctx.tokens,
            &ctx.p.get(&self.tokens)?,
            &wpe,
            &self.shape(ctx.batch.batch, ctx.batch.seq),
        )?));
        Ok((Box::new(self.clone()), out))
    }

    pub fn decode(&self, d: &mut DecodeCtx<'_>, ops: &mut Ops) -> Result<GpuTensor> {
        let x = d.act("decode x", self.channels)?;
        let wpe = match &self.table {
            Some(t) => d.param(t)?,
            None => d.act("decode zero positions", self.positions * self.channels)?,
        };
        if let Some(table) = d.model.quantized(&self.tokens) {
            ops.push(Box::new(QEmbedding::one(d.gpu, &x, d.step, table, &wpe)?));
            return Ok(x);
        }
        ops.push(Box::new(EmbedOne::new(
            d.gpu,
            &x,
            d.step,
            &d.param(&self.tokens)?,
            &wpe,
            self.channels,
        )?));
        Ok(x)
    }

    pub fn cpu_forward(&self, c: &CpuCtx<'_>) -> Result<(Box<dyn CpuBackward>, Vec<f32>)> {
        let mut x = vec![0.0f32; c.rows() * self.channels];
        let zeros = vec![0.0f32; self.positions * self.channels];
        let wpe = match &self.table {
            Some(t) => c.get(t)?,
            None => &zeros,
        };
        crate::cpu::embedding::embedding_forward(
            &mut x,
            c.inputs,
            c.get(&self.tokens)?,
            wpe,
            &self.shape(c.batch.batch, c.batch.seq),
        )?;
        Ok((Box::new(self.clone()), x))
    }
}

impl GpuBackward for Embedding {
    fn backward(
        &self,
        ctx: &mut GpuCtx<'_>,
        ops: &mut Ops,
        dy: &GpuTensor,
    ) -> Result<Option<GpuTensor>> {
        // A frozen table has no gradient view: its gradient goes to scratch when the other
        // table trains, and the whole backward is skipped when neither does.
        let dwte = ctx.g.opt(&self.tokens)?;
        let dwpe = match &self.table {
            Some(t) => ctx.g.opt(t)?,
            None => None,
        };
        if dwte.is_none() && dwpe.is_none() {
            return Ok(None);
        }
        let dwte = match dwte {
            Some(t) => t,
            None => ctx.shared("frozen token table grad", self.vocab * self.channels)?,
        };
        let dwpe = match dwpe {
            Some(t) => t,
            None => self.wpe_scratch(ctx)?,
        };
        ops.push(Box::new(EmbeddingBackward::new(
            ctx.gpu,
            &dwte,
            &dwpe,
            dy,
            ctx.order,
            ctx.starts,
            &self.shape(ctx.batch.batch, ctx.batch.seq),
            true,
        )?));
        Ok(None)
    }
}

impl CpuBackward for Embedding {
    fn backward(
        self: Box<Self>,
        c: &CpuCtx<'_>,
        g: &mut [f32],
        dy: Vec<f32>,
    ) -> Result<Option<Vec<f32>>> {
        let shape = self.shape(c.batch.batch, c.batch.seq);
        let wte = c
            .layout
            .get(&self.tokens)
            .ok_or_else(|| Error::shape("gpt", "the layout has no token table"))?;
        let Some(wpe) = self.table.as_ref().and_then(|t| c.layout.get(t)) else {
            let mut dwpe = vec![0.0f32; self.positions * self.channels];
            let dwte = &mut g[wte.offset..wte.offset + wte.len()];
            crate::cpu::embedding::embedding_backward(
                dwte, &mut dwpe, &dy, c.inputs, &shape, true,
            )?;
            return Ok(None);
        };
        if wte.offset >= wpe.offset {
            return Err(Error::shape("gpt", "layout must place wte before wpe"));
        }
        let (lo, hi) = g.split_at_mut(wpe.offset);
        crate::cpu::embedding::embedding_backward(
            &mut lo[wte.offset..wte.offset + wte.len()],
            &mut hi[..wpe.len()],
            &dy,
            c.inputs,
            &shape,
            true,
        )?;
        Ok(None)
    }
}
