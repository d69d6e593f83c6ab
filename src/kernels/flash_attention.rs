//! Fused causal attention, FlashAttention-2 style (shaders/flash_attention.wgsl): the forward is
//! one dispatch that never writes the (B, n_head, T, T) probabilities, keeping only each row's
//! log-sum-exp; the backward recomputes the probabilities from q, k and that statistic in three
//! dispatches (delta = rowsum(dO∘O), then dq, then dk and dv summed over each key/value head's
//! group in a fixed order). Same layouts and grouped-query heads as [`super::attention`], whose
//! matmul-based path stays the reference.
//!
//! Memory beyond the inputs and outputs: lse, (B, n_head, T) f32, saved by the forward; delta,
//! the same size, owned by the prepared backward. Both grow linearly in T.

use super::checks::expect_tensor;
use super::flash_tiling::{FlashPass, FlashTiling, WORKGROUP, head_class};
use super::{Dispatch, common_precision, distinct, expect_f32, grid};
use crate::gpu::{Bind, DType, Gpu, GpuTensor, Specialisation};
use crate::ops::GroupedAttentionShape;
use crate::{Error, Precision, Result};

pub use super::flash_tiling::MAX_HEAD_DIM;

const OP: &str = "flash attention";

/// The uniform block `Params` of the shader.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    seq: u32,
    heads: u32,
    kv_heads: u32,
    group: u32,
    head_dim: u32,
    qkv_width: u32,
    out_width: u32,
    k_offset: u32,
    v_offset: u32,
    tiles: u32,
    site: u32,
    groups_x: u32,
    rows: u32,
    scale: f32,
    scale_log2: f32,
    _pad: u32,
}

impl Params {
    fn new(shape: &GroupedAttentionShape, site: u32) -> Params {
        let (h, kv, d) = (shape.heads, shape.kv_heads, shape.head_dim);
        let scale = 1.0 / (d as f32).sqrt();
        Params {
            seq: shape.seq as u32,
            heads: h as u32,
            kv_heads: kv as u32,
            group: shape.group() as u32,
            head_dim: d as u32,
            qkv_width: shape.qkv_width() as u32,
            out_width: (h * d) as u32,
            k_offset: (h * d) as u32,
            v_offset: ((h + kv) * d) as u32,
            tiles: 0,
            site,
            groups_x: 0,
            rows: shape.lse_len() as u32,
            scale,
            scale_log2: scale * std::f32::consts::LOG2_E,
            _pad: 0,
        }
    }
}

/// Dropout on the attention probabilities of the fused path: the 4-word dropout state tensor
/// (see [`super::dropout::DropoutState`]) and this layer's site. The mask is the one
/// [`super::attention::AttentionDropout`] applies to the reference path's probabilities, element
/// ((b·n_head + h)·T + t)·T + s, so both paths drop the same elements. (Past 2³² elements of the
/// virtual (B, n_head, T, T) matrix the element number wraps; the reference path cannot allocate
/// such a matrix at all.)
#[derive(Clone, Copy)]
pub struct FlashDropout<'a> {
    /// The step's dropout state.
    pub state: &'a GpuTensor,
    /// Distinguishes this mask from the others of the step.
    pub site: u32,
}

/// Whether the fused kernels can run `shape` on `gpu` (head size, workgroup memory, loop budget,
/// grid); the error says why not. The attention unit falls back to the reference path on it.
pub fn supports(gpu: &Gpu, shape: &GroupedAttentionShape) -> Result<()> {
    shape.validate_fused(shape.qkv_len(), shape.out_len(), shape.lse_len())?;
    for pass in [FlashPass::Forward, FlashPass::Dq, FlashPass::DkDv] {
        let t = FlashTiling::plan(gpu, shape, pass, None)?;
        rows_grid(gpu, shape, &t, pass)?;
    }
    Ok(())
}

/// The rule behind `model.attention_kernel = "auto"`: the fused kernels wherever they can run,
/// except on CPU-backed adapters, where the reference path measured faster (see
/// docs/ARCHITECTURE.md, "Fused attention") unless its (B, n_head, T, T) probabilities exceed
/// the adapter's largest buffer binding. A fixed rule rather than a timing, since the two paths
/// round differently and a resumed run must replay the same arithmetic.
pub fn prefer_fused(gpu: &Gpu, shape: &GroupedAttentionShape) -> bool {
    if supports(gpu, shape).is_err() {
        return false;
    }
    let caps = gpu.capabilities();
    let probs_bytes = shape.probs_len() as u64 * gpu.precision().size() as u64;
    !caps.adapter.software
        || probs_bytes > caps.max_tensor_bytes()
        || shape.probs_len() > u32::MAX as usize
}

/// The grid of a tiled pass: one workgroup per tile of rows (x) and per (b, head) (y).
fn rows_grid(
    gpu: &Gpu,
    shape: &GroupedAttentionShape,
    t: &FlashTiling,
    pass: FlashPass,
) -> Result<[u32; 3]> {
    let tiles = shape.seq.div_ceil(t.rows_per_workgroup());
    let heads = match pass {
        FlashPass::DkDv => shape.kv_heads,
        _ => shape.heads,
    };
    let y = shape.batch * heads;
    let max = gpu
        .capabilities()
        .limits
        .max_compute_workgroups_per_dimension as usize;
    if tiles > max || y > max {
        return Err(Error::shape(
            OP,
            format!("{tiles} × {y} workgroups exceed the adapter's {max} per dimension"),
        ));
    }
    Ok([tiles as u32, y as u32, 1])
}

/// vec4 loads need every head row and every bound tensor to start on a multiple of 4 elements.
fn vec4_ok(shape: &GroupedAttentionShape, tensors: &[&GpuTensor]) -> bool {
    shape.head_dim.is_multiple_of(4)
        && tensors
            .iter()
            .all(|t| t.offset_bytes().is_multiple_of(4 * t.dtype().size() as u64))
}

/// What every dispatch of one op shares: the shape, precision, specialisation flags and the
/// 16-byte buffer bound to slots a specialisation leaves unread.
struct Common<'a> {
    gpu: &'a Gpu,
    shape: GroupedAttentionShape,
    precision: Precision,
    vec4: bool,
    dropout: Option<FlashDropout<'a>>,
    unused: GpuTensor,
}

impl<'a> Common<'a> {
    fn new(
        gpu: &'a Gpu,
        shape: &GroupedAttentionShape,
        precision: Precision,
        vec4: bool,
        dropout: Option<FlashDropout<'a>>,
    ) -> Result<Self> {
        if let Some(d) = dropout {
            expect_tensor(OP, "dropout state", d.state, DType::U32, 4)?;
        }
        Ok(Common {
            gpu,
            shape: *shape,
            precision,
            vec4,
            dropout,
            unused: gpu.zeros("flash attention unused", &[4], DType::U32)?,
        })
    }

    /// Slot 3: the dropout state, or the unused buffer without dropout.
    fn state(&self) -> Bind<'_> {
        match self.dropout {
            Some(d) => d.state.bind(),
            None => self.unused.bind(),
        }
    }

    /// The vec4 view of `t` for slots 2 and 7 (the unused buffer when loads are scalar).
    fn vec4_view<'t>(&'t self, t: &'t GpuTensor) -> Bind<'t> {
        if self.vec4 {
            t.bind()
        } else {
            self.unused.bind()
        }
    }

    /// One of the three tiled passes with its tiling and the given storage bindings.
    fn tiled(
        &self,
        entry: &'static str,
        pass: FlashPass,
        split: Option<usize>,
        buffers: &[(u32, Bind<'_>)],
    ) -> Result<Dispatch> {
        let t = FlashTiling::plan(self.gpu, &self.shape, pass, split)?;
        let workgroups = rows_grid(self.gpu, &self.shape, &t, pass)?;
        let site = self.dropout.map_or(0, |d| d.site);
        let params = self.gpu.uniform(
            entry,
            &Params {
                tiles: workgroups[0],
                ..Params::new(&self.shape, site)
            },
        );
        let mut entries = vec![(0, Bind::whole(&params))];
        entries.extend_from_slice(buffers);
        let constants = Specialisation::default()
            .with("WG", WORKGROUP as u32)
            .with("SPLIT", t.split as u32)
            .with("TILE", t.tile as u32)
            .with("STRIDE", t.stride as u32)
            .with("VEC4", self.vec4)
            .with("DROPOUT", self.dropout.is_some());
        Dispatch::new(
            self.gpu,
            t.module,
            entry,
            self.precision,
            constants,
            &entries,
            workgroups,
        )
    }
}

/// The forward pass, prepared once: `out = softmax(mask(q·kᵀ/√d))·v` (with dropout on the
/// probabilities when given) and `lse`, each row's natural log of its sum of exponentials.
pub struct FlashAttentionForward {
    dispatch: Dispatch,
}

impl FlashAttentionForward {
    /// Prepares the forward: `qkv` is (B, T, (n_head + 2·n_kv_head)·head_dim), `out`
    /// (B, T, n_head·head_dim) in the same precision, `lse` (B, n_head, T) f32.
    pub fn new(
        gpu: &Gpu,
        out: &GpuTensor,
        lse: &GpuTensor,
        qkv: &GpuTensor,
        shape: &GroupedAttentionShape,
        dropout: Option<FlashDropout<'_>>,
    ) -> Result<Self> {
        Self::build(gpu, out, lse, qkv, shape, dropout, None)
    }

    /// [`FlashAttentionForward::new`] with `split` lanes per query row rather than the rule's
    /// (tests and benchmarks: another split adds the partial sums in another order).
    pub fn with_split(
        gpu: &Gpu,
        out: &GpuTensor,
        lse: &GpuTensor,
        qkv: &GpuTensor,
        shape: &GroupedAttentionShape,
        dropout: Option<FlashDropout<'_>>,
        split: usize,
    ) -> Result<Self> {
        Self::build(gpu, out, lse, qkv, shape, dropout, Some(split))
    }

    fn build(
        gpu: &Gpu,
        out: &GpuTensor,
        lse: &GpuTensor,
        qkv: &GpuTensor,
        shape: &GroupedAttentionShape,
        dropout: Option<FlashDropout<'_>>,
        split: Option<usize>,
    ) -> Result<Self> {
        shape.validate_fused(qkv.len(), out.len(), lse.len())?;
        let precision = common_precision(OP, &[out, qkv])?;
        expect_f32(OP, lse)?;
        distinct(OP, &[out, lse], &[out, lse, qkv])?;
        let c = Common::new(gpu, shape, precision, vec4_ok(shape, &[qkv]), dropout)?;
        let dispatch = c.tiled(
            "flash_forward",
            FlashPass::Forward,
            split,
            &[
                (1, qkv.bind()),
                (2, c.vec4_view(qkv)),
                (3, c.state()),
                (4, out.bind()),
                (5, lse.bind()),
            ],
        )?;
        Ok(FlashAttentionForward { dispatch })
    }

    /// Adds the dispatch to `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
    }

    /// Records and submits on its own (does not wait).
    pub fn run(&self, gpu: &Gpu) -> Result<()> {
        gpu.run_pass("flash attention forward", |pass| self.record(pass))
    }
}

/// The backward pass, prepared once: `dqkv` (overwritten, every element) from `dout` and the
/// forward's `qkv`, `out` and `lse`.
pub struct FlashAttentionBackward {
    delta_pass: Dispatch,
    dq: Dispatch,
    dkdv: Dispatch,
    /// rowsum(dout∘out), (B, n_head, T) f32.
    delta: GpuTensor,
}

impl FlashAttentionBackward {
    /// Prepares the backward of [`FlashAttentionForward`] with the same shape and dropout.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        gpu: &Gpu,
        dqkv: &GpuTensor,
        dout: &GpuTensor,
        qkv: &GpuTensor,
        out: &GpuTensor,
        lse: &GpuTensor,
        shape: &GroupedAttentionShape,
        dropout: Option<FlashDropout<'_>>,
    ) -> Result<Self> {
        Self::build(gpu, dqkv, dout, qkv, out, lse, shape, dropout, None)
    }

    /// [`FlashAttentionBackward::new`] with `split` lanes per row in the dq and dk/dv kernels
    /// rather than the rule's (tests and benchmarks).
    #[allow(clippy::too_many_arguments)]
    pub fn with_split(
        gpu: &Gpu,
        dqkv: &GpuTensor,
        dout: &GpuTensor,
        qkv: &GpuTensor,
        out: &GpuTensor,
        lse: &GpuTensor,
        shape: &GroupedAttentionShape,
        dropout: Option<FlashDropout<'_>>,
        split: usize,
    ) -> Result<Self> {
        Self::build(gpu, dqkv, dout, qkv, out, lse, shape, dropout, Some(split))
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        gpu: &Gpu,
        dqkv: &GpuTensor,
        dout: &GpuTensor,
        qkv: &GpuTensor,
        out: &GpuTensor,
        lse: &GpuTensor,
        shape: &GroupedAttentionShape,
        dropout: Option<FlashDropout<'_>>,
        split: Option<usize>,
    ) -> Result<Self> {
        shape.validate_fused(qkv.len(), out.len(), lse.len())?;
        shape.validate_fused(dqkv.len(), dout.len(), lse.len())?;
        let precision = common_precision(OP, &[dqkv, dout, qkv, out])?;
        expect_f32(OP, lse)?;
        distinct(OP, &[dqkv], &[dqkv, dout, qkv, out, lse])?;
        if dqkv.buffer() == qkv.buffer() {
            return Err(Error::shape(
                OP,
                "dqkv must be a buffer of its own, not qkv's",
            ));
        }
        let delta = gpu.zeros("flash attention delta", &[shape.lse_len()], DType::F32)?;
        let c = Common::new(gpu, shape, precision, vec4_ok(shape, &[qkv, dout]), dropout)?;
        let delta_pass = delta_dispatch(&c, out, dout, &delta)?;
        let buffers = [
            (1, qkv.bind()),
            (2, c.vec4_view(qkv)),
            (3, c.state()),
            (5, lse.bind()),
            (6, dout.bind()),
            (7, c.vec4_view(dout)),
            (8, delta.bind()),
            (9, dqkv.bind()),
        ];
        let dq = c.tiled("flash_backward_dq", FlashPass::Dq, split, &buffers)?;
        let dkdv = c.tiled("flash_backward_dkdv", FlashPass::DkDv, split, &buffers)?;
        Ok(FlashAttentionBackward {
            delta_pass,
            dq,
            dkdv,
            delta,
        })
    }

    /// Bytes of the buffers the prepared backward owns (delta, (B, n_head, T) f32).
    pub fn scratch_bytes(&self) -> u64 {
        self.delta.bytes()
    }

    /// Adds the three dispatches to `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.delta_pass.record(pass);
        self.dq.record(pass);
        self.dkdv.record(pass);
    }

    /// Records and submits on its own (does not wait).
    pub fn run(&self, gpu: &Gpu) -> Result<()> {
        gpu.run_pass("flash attention backward", |pass| self.record(pass))
    }
}

/// `delta = rowsum(dout∘out)`: one invocation per (b, h, t) on the element-wise grid.
fn delta_dispatch(
    c: &Common<'_>,
    out: &GpuTensor,
    dout: &GpuTensor,
    delta: &GpuTensor,
) -> Result<Dispatch> {
    let (module, _) = head_class(c.shape.head_dim)?;
    let rows = c.shape.lse_len();
    let workgroups = grid(c.gpu, OP, rows.div_ceil(WORKGROUP))?;
    let params = c.gpu.uniform(
        "flash_delta",
        &Params {
            groups_x: workgroups[0],
            ..Params::new(&c.shape, 0)
        },
    );
    Dispatch::new(
        c.gpu,
        module,
        "flash_delta",
        c.precision,
        Specialisation::default()
            .with("WG", WORKGROUP as u32)
            .with("VEC4", c.vec4),
        &[
            (0, Bind::whole(&params)),
            (4, out.bind()),
            (6, dout.bind()),
            (7, c.vec4_view(dout)),
            (8, delta.bind()),
        ],
        workgroups,
    )
}
