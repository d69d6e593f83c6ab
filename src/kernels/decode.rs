//! The decode family (shaders/decode.wgsl): the two kernels a one-token decode step with a
//! key/value cache needs beyond the ordinary ones (matmul, layer norm, GELU, residual): the
//! embedding of one token at a position, and single-query attention over the cache.

use super::checks::expect_tensor;
use super::{Dispatch, common_precision};
use crate::gpu::{Bind, DType, Gpu, GpuTensor, Specialisation};
use crate::{Error, Result};

/// Most positions [`AttendOne`] can attend over (the shader's `MAX_POS`: its f32 scores live in
/// 8 KiB of workgroup memory).
pub const MAX_POSITIONS: usize = 2048;

/// The uniform block `Dims` of the shader.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Dims {
    channels: u32,
    heads: u32,
    head_size: u32,
    scale: f32,
}

fn dims(gpu: &Gpu, channels: usize, heads: usize) -> wgpu::Buffer {
    let hs = channels / heads.max(1);
    gpu.uniform(
        "decode dims",
        &Dims {
            channels: channels as u32,
            heads: heads as u32,
            head_size: hs as u32,
            scale: 1.0 / (hs as f32).sqrt(),
        },
    )
}

/// `x = wte[token] + wpe[pos]` for the (token, pos) in the 2-word u32 `step` tensor.
pub struct EmbedOne {
    dispatch: Dispatch,
}

impl EmbedOne {
    /// Prepares the embedding of one token: `x` has `channels` elements, `wte` and `wpe` are the
    /// (rows, channels) tables.
    pub fn new(
        gpu: &Gpu,
        x: &GpuTensor,
        step: &GpuTensor,
        wte: &GpuTensor,
        wpe: &GpuTensor,
        channels: usize,
    ) -> Result<Self> {
        const OP: &str = "embed_one";
        let precision = common_precision(OP, &[x, wte, wpe])?;
        expect_tensor(OP, "step", step, DType::U32, 2)?;
        expect_tensor(OP, "x", x, x.dtype(), channels)?;
        if channels == 0
            || !wte.len().is_multiple_of(channels)
            || !wpe.len().is_multiple_of(channels)
        {
            return Err(Error::shape(
                OP,
                format!(
                    "wte ({}) and wpe ({}) must be whole rows of {channels} channels",
                    wte.len(),
                    wpe.len()
                ),
            ));
        }
        let dims = dims(gpu, channels, 1);
        let dispatch = Dispatch::new(
            gpu,
            "decode",
            "embed_one",
            precision,
            Specialisation::default(),
            &[
                (0, Bind::whole(&dims)),
                (1, step.bind()),
                (2, wte.bind()),
                (3, wpe.bind()),
                (4, x.bind()),
            ],
            [1, 1, 1],
        )?;
        Ok(EmbedOne { dispatch })
    }

    /// Adds the dispatch to `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
    }
}

/// Causal attention of the newest token over a layer's cache, one workgroup per head.
pub struct AttendOne {
    dispatch: Dispatch,
}

impl AttendOne {
    /// Prepares the attention of the token whose q|k|v row (3·channels) is `qkv_new`, at the
    /// position in `step` (u32 token, pos), over `cache` (positions × 3·channels, the layer's
    /// q|k|v rows): writes its k and v into row pos of the cache and the heads' outputs into `out`
    /// (channels).
    pub fn new(
        gpu: &Gpu,
        out: &GpuTensor,
        cache: &GpuTensor,
        qkv_new: &GpuTensor,
        step: &GpuTensor,
        heads: usize,
        channels: usize,
    ) -> Result<Self> {
        const OP: &str = "attend_one";
        let precision = common_precision(OP, &[out, cache, qkv_new])?;
        expect_tensor(OP, "step", step, DType::U32, 2)?;
        if heads == 0 || !channels.is_multiple_of(heads) {
            return Err(Error::shape(
                OP,
                format!("{channels} channels do not split into {heads} heads"),
            ));
        }
        expect_tensor(OP, "out", out, out.dtype(), channels)?;
        expect_tensor(OP, "qkv_new", qkv_new, qkv_new.dtype(), 3 * channels)?;
        let positions = cache.len() / (3 * channels);
        if cache.len() != positions * 3 * channels || positions > MAX_POSITIONS {
            return Err(Error::shape(
                OP,
                format!(
                    "the cache must hold whole rows of {} and at most {MAX_POSITIONS} of them; it \
                     has {} elements",
                    3 * channels,
                    cache.len()
                ),
            ));
        }
        let dims = dims(gpu, channels, heads);
        let dispatch = Dispatch::new(
            gpu,
            "decode",
            "attend_one",
            precision,
            Specialisation::default(),
            &[
                (0, Bind::whole(&dims)),
                (1, step.bind()),
                (5, qkv_new.bind()),
                (6, cache.bind()),
                (7, out.bind()),
            ],
            [heads as u32, 1, 1],
        )?;
        Ok(AttendOne { dispatch })
    }

    /// Adds the dispatch to `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
    }

    /// Records and submits on its own (does not wait).
    pub fn run(&self, gpu: &Gpu) -> Result<()> {
        gpu.run_pass("attend_one", |pass| self.record(pass))
    }
}
