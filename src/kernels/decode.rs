//! The decode family (shaders/decode.wgsl): the two kernels a one-token decode step with a
//! key/value cache needs beyond the ordinary ones (matmul, the norms, the activations, RoPE,
//! residual): the embedding of one token at a position, and single-query attention over the
//! cache, multi-head or grouped-query.

use super::checks::expect_tensor;
use super::{Dispatch, common_precision, distinct, loop_budget_ok};
use crate::gpu::{Bind, DType, Gpu, GpuTensor, Specialisation};
use crate::ops::AttendOneShape;
use crate::{Error, Result};

/// Most positions [`AttendOne`] can attend over (the shader's `MAX_POS`: its f32 scores live in
/// 8 KiB of workgroup memory).
pub const MAX_POSITIONS: usize = 2048;

/// Invocations per workgroup (the shader's `WG`).
const WG: usize = 64;

/// The uniform block `Dims` of the shader.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Dims {
    channels: u32,
    heads: u32,
    kv_heads: u32,
    head_size: u32,
    scale: f32,
    _pad: [u32; 3],
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
        let dims = gpu.uniform(
            "decode dims",
            &Dims {
                channels: channels as u32,
                ..Dims::default()
            },
        );
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

/// Causal attention of the newest token over a layer's cache, one workgroup per query head,
/// multi-head or grouped-query ([`AttendOneShape`]).
pub struct AttendOne {
    dispatch: Dispatch,
}

impl AttendOne {
    /// Loop iterations one invocation runs at most (see [`loop_budget_ok`]): the scores and
    /// exponentials of every 64th position (head_dim + 2 each), the copy and weighted sum of
    /// every 64th element of the head (`positions` + 2 each) and the two reductions.
    fn iterations(shape: &AttendOneShape) -> usize {
        let (p, hs) = (shape.positions, shape.head_dim);
        p.div_ceil(WG) * (hs + 2) + hs.div_ceil(WG) * (p + 2) + 2 * WG.ilog2() as usize
    }

    /// Whether `gpu` runs the kernel on `shape` correctly: at most [`MAX_POSITIONS`] positions,
    /// and within llvmpipe's loop budget (a head dim in the thousands at 2048 positions is not).
    pub fn supports(gpu: &Gpu, shape: &AttendOneShape) -> bool {
        shape.positions <= MAX_POSITIONS && loop_budget_ok(gpu, Self::iterations(shape))
    }

    /// Prepares the attention of the token whose q|k|v row is `qkv_new`, at the position in
    /// `step` (u32 token, pos), over `cache` (the layer's q|k|v rows, see [`AttendOneShape`]):
    /// writes its key and value heads into row pos of the cache and the query heads' outputs
    /// into `out`. The position is read when the dispatch runs; the caller keeps it below
    /// `shape.positions` (the kernel does not check it).
    pub fn new(
        gpu: &Gpu,
        out: &GpuTensor,
        cache: &GpuTensor,
        qkv_new: &GpuTensor,
        step: &GpuTensor,
        shape: &AttendOneShape,
    ) -> Result<Self> {
        const OP: &str = "attend_one";
        let precision = common_precision(OP, &[out, cache, qkv_new])?;
        expect_tensor(OP, "step", step, DType::U32, 2)?;
        distinct(OP, &[out, cache], &[out, cache, qkv_new])?;
        shape.validate(OP, cache.len(), qkv_new.len(), out.len())?;
        if shape.positions > MAX_POSITIONS {
            return Err(Error::shape(
                OP,
                format!(
                    "the cache has {} positions; attend_one attends over at most {MAX_POSITIONS}",
                    shape.positions
                ),
            ));
        }
        if !loop_budget_ok(gpu, Self::iterations(shape)) {
            return Err(Error::shape(
                OP,
                format!(
                    "{shape:?} runs past this adapter's loop budget ({} iterations per \
                     invocation); recompute the window instead",
                    Self::iterations(shape)
                ),
            ));
        }
        let hs = shape.head_dim;
        let dims = gpu.uniform(
            "decode dims",
            &Dims {
                channels: shape.out_len() as u32,
                heads: shape.heads as u32,
                kv_heads: shape.kv_heads as u32,
                head_size: hs as u32,
                scale: 1.0 / (hs as f32).sqrt(),
                _pad: [0; 3],
            },
        );
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
            [shape.heads as u32, 1, 1],
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
