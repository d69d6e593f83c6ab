//! The rmsnorm family (shaders/rmsnorm.wgsl): Llama's RMS normalisation (no mean, no bias),
//! forward and backward, in the same two row layouts as the layernorm family.

use super::{Dispatch, RowKernel, common_precision, distinct, expect_f32, grid, groups};
use crate::gpu::{Bind, DType, Gpu, GpuTensor, Specialisation};
use crate::ops::{Extent, RmsNormSpec};
use crate::{Error, Result};

/// Invocations per row of the forward and the input-gradient kernel (power of two: tree
/// reduction).
const WG: u32 = 256;
/// Invocations per workgroup, along channels, of the two parameter-gradient stages.
const PARAM_WG: usize = 64;
/// Rows each invocation of the partial parameter stage sums (as in the layernorm family): the
/// scratch, blocks · channels f32, stays 1/32 of an f32 activation.
const ROWS_PER_BLOCK: usize = 32;
/// Walks over a row of the forward (sum of squares, output) and of the input gradient (one sum,
/// output).
const FORWARD_PASSES: usize = 2;
const BACKWARD_PASSES: usize = 2;

/// The uniform block `Dims` of the shader.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Dims {
    rows: u32,
    channels: u32,
    groups_x: u32,
    rows_per_block: u32,
    blocks: u32,
    eps: f32,
    _pad0: u32,
    _pad1: u32,
}

/// The row grid and the uniform block for `spec`.
fn dims(
    gpu: &Gpu,
    op: &'static str,
    spec: &RmsNormSpec,
    kernel: RowKernel,
) -> Result<([u32; 3], Dims)> {
    let rows = grid(gpu, op, kernel.workgroups(spec.rows))?;
    let max = gpu
        .capabilities()
        .limits
        .max_compute_workgroups_per_dimension as usize;
    // At most `max` blocks, so that the partial stage's y extent fits.
    let rows_per_block = ROWS_PER_BLOCK.max(spec.rows.div_ceil(max));
    let blocks = spec.rows.div_ceil(rows_per_block);
    if spec.channels.div_ceil(PARAM_WG) > max {
        return Err(Error::shape(
            op,
            format!(
                "channels={} needs more than the adapter's {max} workgroups of {PARAM_WG}",
                spec.channels
            ),
        ));
    }
    Ok((
        rows,
        Dims {
            rows: spec.rows as u32,
            channels: spec.channels as u32,
            groups_x: rows[0],
            rows_per_block: rows_per_block as u32,
            blocks: blocks as u32,
            eps: spec.eps,
            _pad0: 0,
            _pad1: 0,
        },
    ))
}

/// The forward, ready to record: one workgroup or one invocation per row ([`RowKernel`]).
pub struct RmsNormForward {
    dispatch: Dispatch,
}

impl RmsNormForward {
    /// Prepares `out = inp · rstd · weight`, saving `rstd = 1/sqrt(mean(inp²) + eps)` (an f32
    /// tensor of `spec.rows` elements whatever the storage precision), in the adapter's row
    /// layout ([`RowKernel::for_rows`]).
    pub fn new(
        gpu: &Gpu,
        out: &GpuTensor,
        rstd: &GpuTensor,
        inp: &GpuTensor,
        weight: &GpuTensor,
        spec: &RmsNormSpec,
    ) -> Result<Self> {
        let kernel = RowKernel::for_rows(gpu, spec.channels, FORWARD_PASSES);
        Self::with_kernel(gpu, kernel, out, rstd, inp, weight, spec)
    }

    /// As [`RmsNormForward::new`] with an explicit row layout.
    pub fn with_kernel(
        gpu: &Gpu,
        kernel: RowKernel,
        out: &GpuTensor,
        rstd: &GpuTensor,
        inp: &GpuTensor,
        weight: &GpuTensor,
        spec: &RmsNormSpec,
    ) -> Result<Self> {
        let op = "rmsnorm_forward";
        let precision = common_precision(op, &[out, inp, weight])?;
        expect_f32(op, rstd)?;
        spec.validate(
            op,
            &[
                ("out", Extent::Elements, out.len()),
                ("rstd", Extent::Rows, rstd.len()),
                ("inp", Extent::Elements, inp.len()),
                ("weight", Extent::Channels, weight.len()),
            ],
        )?;
        distinct(op, &[out, rstd], &[out, rstd, inp, weight])?;
        kernel.check(gpu, op, spec.channels, FORWARD_PASSES)?;
        let (rows, dims) = dims(gpu, op, spec, kernel)?;
        let dims = gpu.uniform("rmsnorm dims", &dims);
        let (entry, constants) = kernel.entry(
            ("rmsnorm_forward", Specialisation::default().with("WG", WG)),
            "rmsnorm_forward_rows",
        );
        let dispatch = Dispatch::new(
            gpu,
            "rmsnorm",
            entry,
            precision,
            constants,
            &[
                (0, Bind::whole(&dims)),
                (1, inp.bind()),
                (2, weight.bind()),
                (3, out.bind()),
                (4, rstd.bind()),
            ],
            rows,
        )?;
        Ok(RmsNormForward { dispatch })
    }

    /// Adds the dispatch to `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
    }

    /// Records and submits on its own (does not wait).
    pub fn run(&self, gpu: &Gpu) -> Result<()> {
        gpu.run_pass("rmsnorm_forward", |pass| self.record(pass))
    }
}

/// The backward, ready to record: three dispatches (input gradient, per-block weight-gradient
/// sums, their fixed-order total) and the scratch buffer the last two share.
pub struct RmsNormBackward {
    input: Dispatch,
    partial: Dispatch,
    total: Dispatch,
    scratch: GpuTensor,
}

impl RmsNormBackward {
    /// Prepares the gradients of [`RmsNormForward`]: `dinp` (overwritten, or added to with
    /// `spec.accumulate_input`) and `dweight` (overwritten, or added to with
    /// `spec.accumulate_params`), from `dout`, the forward's input and weight and its saved
    /// `rstd` (f32). Allocates a scratch of ⌈rows/32⌉ · channels f32. Uses the adapter's row
    /// layout ([`RowKernel::for_rows`]) for the input gradient.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        gpu: &Gpu,
        dinp: &GpuTensor,
        dweight: &GpuTensor,
        dout: &GpuTensor,
        inp: &GpuTensor,
        weight: &GpuTensor,
        rstd: &GpuTensor,
        spec: &RmsNormSpec,
    ) -> Result<Self> {
        let kernel = RowKernel::for_rows(gpu, spec.channels, BACKWARD_PASSES);
        Self::with_kernel(gpu, kernel, dinp, dweight, dout, inp, weight, rstd, spec)
    }

    /// As [`RmsNormBackward::new`] with an explicit row layout.
    #[allow(clippy::too_many_arguments)]
    pub fn with_kernel(
        gpu: &Gpu,
        kernel: RowKernel,
        dinp: &GpuTensor,
        dweight: &GpuTensor,
        dout: &GpuTensor,
        inp: &GpuTensor,
        weight: &GpuTensor,
        rstd: &GpuTensor,
        spec: &RmsNormSpec,
    ) -> Result<Self> {
        let op = "rmsnorm_backward";
        let precision = common_precision(op, &[dinp, dweight, dout, inp, weight])?;
        expect_f32(op, rstd)?;
        spec.validate(
            op,
            &[
                ("dinp", Extent::Elements, dinp.len()),
                ("dweight", Extent::Channels, dweight.len()),
                ("dout", Extent::Elements, dout.len()),
                ("inp", Extent::Elements, inp.len()),
                ("weight", Extent::Channels, weight.len()),
                ("rstd", Extent::Rows, rstd.len()),
            ],
        )?;
        distinct(
            op,
            &[dinp, dweight],
            &[dinp, dweight, dout, inp, weight, rstd],
        )?;
        kernel.check(gpu, op, spec.channels, BACKWARD_PASSES)?;
        let (rows, d) = dims(gpu, op, spec, kernel)?;
        let blocks = d.blocks as usize;
        let scratch = gpu.zeros(
            "rmsnorm_backward scratch",
            &[blocks, spec.channels],
            DType::F32,
        )?;
        let dims = gpu.uniform("rmsnorm dims", &d);
        let (entry, constants) = kernel.entry(
            (
                "rmsnorm_backward_input",
                Specialisation::default().with("WG", WG),
            ),
            "rmsnorm_backward_input_rows",
        );
        let input = Dispatch::new(
            gpu,
            "rmsnorm",
            entry,
            precision,
            constants.with("ACCUMULATE_INPUT", spec.accumulate_input as u8),
            &[
                (0, Bind::whole(&dims)),
                (1, inp.bind()),
                (2, weight.bind()),
                (5, dout.bind()),
                (6, rstd.bind()),
                (7, dinp.bind()),
            ],
            rows,
        )?;
        let channel_groups = groups(spec.channels, PARAM_WG);
        let partial = Dispatch::new(
            gpu,
            "rmsnorm",
            "rmsnorm_backward_params_partial",
            precision,
            Specialisation::default().with("PARAM_WG", PARAM_WG as u32),
            &[
                (0, Bind::whole(&dims)),
                (1, inp.bind()),
                (5, dout.bind()),
                (6, rstd.bind()),
                (8, scratch.bind()),
            ],
            [channel_groups, blocks as u32, 1],
        )?;
        let total = Dispatch::new(
            gpu,
            "rmsnorm",
            "rmsnorm_backward_params_final",
            precision,
            Specialisation::default()
                .with("PARAM_WG", PARAM_WG as u32)
                .with("ACCUMULATE_PARAMS", spec.accumulate_params as u8),
            &[
                (0, Bind::whole(&dims)),
                (9, scratch.bind()),
                (10, dweight.bind()),
            ],
            [channel_groups, 1, 1],
        )?;
        Ok(RmsNormBackward {
            input,
            partial,
            total,
            scratch,
        })
    }

    /// Adds the three dispatches to `pass`, in order (WebGPU makes each dispatch's writes visible
    /// to the next).
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.input.record(pass);
        self.partial.record(pass);
        self.total.record(pass);
    }

    /// Records and submits on its own (does not wait).
    pub fn run(&self, gpu: &Gpu) -> Result<()> {
        gpu.run_pass("rmsnorm_backward", |pass| self.record(pass))
    }

    /// Bytes of scratch this op holds.
    pub fn scratch_bytes(&self) -> u64 {
        self.scratch.bytes()
    }
}

/// RMS normalisation on the GPU, submitted at once (does not wait). Same argument order as
/// [`crate::cpu::rmsnorm::rmsnorm_forward`].
pub fn rmsnorm_forward(
    gpu: &Gpu,
    out: &GpuTensor,
    rstd: &GpuTensor,
    inp: &GpuTensor,
    weight: &GpuTensor,
    spec: &RmsNormSpec,
) -> Result<()> {
    RmsNormForward::new(gpu, out, rstd, inp, weight, spec)?.run(gpu)
}

/// RMS normalisation's backward on the GPU, submitted at once (does not wait). Same argument
/// order as [`crate::cpu::rmsnorm::rmsnorm_backward`].
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    gpu: &Gpu,
    dinp: &GpuTensor,
    dweight: &GpuTensor,
    dout: &GpuTensor,
    inp: &GpuTensor,
    weight: &GpuTensor,
    rstd: &GpuTensor,
    spec: &RmsNormSpec,
) -> Result<()> {
    RmsNormBackward::new(gpu, dinp, dweight, dout, inp, weight, rstd, spec)?.run(gpu)
}
