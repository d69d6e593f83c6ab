//! Token + position embedding (shaders/embedding.wgsl) and its deterministic backward.

use super::{Dispatch, common_precision, grid};
use crate::gpu::{Bind, DType, Gpu, GpuTensor, Specialisation};
use crate::ops::EmbeddingShape;
use crate::{Error, Result};

const WG: usize = 64;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    batch: u32,
    seq: u32,
    channels: u32,
    vocab: u32,
    groups_x: u32,
    positions: u32,
    _pad: [u32; 2],
}

/// One of the family's entry points over `items` invocations, with its parameter block.
#[allow(clippy::too_many_arguments)]
fn dispatch(
    gpu: &Gpu,
    entry: &'static str,
    shape: &EmbeddingShape,
    items: usize,
    accumulate: bool,
    precision: crate::Precision,
    buffers: &[(u32, Bind<'_>)],
) -> Result<Dispatch> {
    let workgroups = grid(gpu, "embedding", items.div_ceil(WG))?;
    let params = gpu.uniform(
        "embedding params",
        &Params {
            batch: shape.batch as u32,
            seq: shape.seq as u32,
            channels: shape.channels as u32,
            vocab: shape.vocab as u32,
            groups_x: workgroups[0],
            positions: shape.positions as u32,
            _pad: [0; 2],
        },
    );
    let mut entries = vec![(0, Bind::whole(&params))];
    entries.extend_from_slice(buffers);
    let constants = Specialisation::default()
        .with("WG", WG as u32)
        .with("ACCUMULATE", accumulate as u8);
    Dispatch::new(
        gpu,
        "embedding",
        entry,
        precision,
        constants,
        &entries,
        workgroups,
    )
}

fn check_sizes(
    shape: &EmbeddingShape,
    tokens: &GpuTensor,
    wte: usize,
    wpe: usize,
    out: usize,
) -> Result<()> {
    if tokens.dtype() != DType::U32 {
        return Err(Error::shape(
            "embedding",
            format!("tokens {} must be u32", tokens.label()),
        ));
    }
    // Token values live on the GPU; they are checked where the host writes them (token_index).
    let fake = vec![0u32; tokens.len()];
    shape.validate(&fake, wte, wpe, out)
}

/// The forward pass, prepared once.
pub struct EmbeddingForward(Dispatch);

impl EmbeddingForward {
    /// `out[b, t, :] = wte[tokens[b, t], :] + wpe[t, :]`.
    pub fn new(
        gpu: &Gpu,
        out: &GpuTensor,
        tokens: &GpuTensor,
        wte: &GpuTensor,
        wpe: &GpuTensor,
        shape: &EmbeddingShape,
    ) -> Result<Self> {
        check_sizes(shape, tokens, wte.len(), wpe.len(), out.len())?;
        let p = common_precision("embedding", &[out, wte, wpe])?;
        let items = shape.batch * shape.seq * shape.channels;
        let buffers = [
            (1, tokens.bind()),
            (2, wte.bind()),
            (3, wpe.bind()),
            (4, out.bind()),
        ];
        Ok(EmbeddingForward(dispatch(
            gpu,
            "embedding_forward",
            shape,
            items,
            false,
            p,
            &buffers,
        )?))
    }

    /// Adds the dispatch to `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.0.record(pass);
    }

    /// Records and submits on its own (does not wait).
    pub fn run(&self, gpu: &Gpu) -> Result<()> {
        gpu.run_pass("embedding forward", |pass| self.record(pass))
    }
}

/// The backward pass, prepared once. `order` (B·T) and `starts` (V + 1) are the batch's
/// [`crate::cpu::embedding::token_index`], written by the host beside the tokens each step.
pub struct EmbeddingBackward {
    wte: Dispatch,
    wpe: Dispatch,
}

impl EmbeddingBackward {
    /// Gradients into `dwte` (V, C) and `dwpe` (positions, C), in the precision of `dout`, added
    /// to their contents when `accumulate`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        gpu: &Gpu,
        dwte: &GpuTensor,
        dwpe: &GpuTensor,
        dout: &GpuTensor,
        order: &GpuTensor,
        starts: &GpuTensor,
        shape: &EmbeddingShape,
        accumulate: bool,
    ) -> Result<Self> {
        check_sizes(shape, order, dwte.len(), dwpe.len(), dout.len())?;
        if starts.dtype() != DType::U32 || starts.len() != shape.vocab + 1 {
            return Err(Error::shape(
                "embedding",
                format!(
                    "starts must be u32 of length vocab + 1 = {}, got {:?} {:?}",
                    shape.vocab + 1,
                    starts.dtype(),
                    starts.shape()
                ),
            ));
        }
        let p = common_precision("embedding", &[dwte, dwpe, dout])?;
        let (c, v) = (shape.channels, shape.vocab);
        let wte = dispatch(
            gpu,
            "embedding_backward_wte",
            shape,
            v * c,
            accumulate,
            p,
            &[
                (5, dout.bind()),
                (6, order.bind()),
                (7, starts.bind()),
                (8, dwte.bind()),
            ],
        )?;
        let wpe = dispatch(
            gpu,
            "embedding_backward_wpe",
            shape,
            shape.positions * c,
            accumulate,
            p,
            &[(5, dout.bind()), (9, dwpe.bind())],
        )?;
        Ok(EmbeddingBackward { wte, wpe })
    }

    /// Adds the two dispatches to `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.wte.record(pass);
        self.wpe.record(pass);
    }

    /// Records and submits on its own (does not wait).
    pub fn run(&self, gpu: &Gpu) -> Result<()> {
        gpu.run_pass("embedding backward", |pass| self.record(pass))
    }
}
