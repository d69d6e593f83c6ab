//! The layernorm family (shaders/layernorm.wgsl): the pre-attention, pre-MLP and final
//! normalisations of a GPT-2 block, forward and backward.

use super::{Dispatch, RowKernel, common_precision, distinct, expect_f32, grid, groups};
use crate::gpu::{Bind, DType, Gpu, GpuTensor, Specialisation};
use crate::ops::{Extent, LayerNormSpec};
use crate::{Error, Result};

/// Invocations per row of the forward and the input-gradient kernel. 256 covers GPT-2's 768
/// channels in three strided steps; must be a power of two (tree reduction).
const WG: u32 = 256;
/// Invocations per workgroup, along channels, of the two parameter-gradient stages.
const PARAM_WG: usize = 64;
/// Rows each invocation of the partial parameter stage sums. Small enough that there are many
/// blocks to run in parallel, large enough that the scratch (2 · blocks · channels f32) stays a
/// fraction of the activation it reduces (2/32 of it at f32, 4/32 at f16).
const ROWS_PER_BLOCK: usize = 32;
/// Walks over a row of the forward (mean, variance, output) and of the input gradient.
const FORWARD_PASSES: usize = 3;
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
    spec: &LayerNormSpec,
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

/// Whether the one-invocation-per-row entries take four channels per memory access (their `_vec4`
/// forms, bit-identical): in that layout, when the channels divide by 4.
fn vec4_rows(kernel: RowKernel, spec: &LayerNormSpec) -> bool {
    kernel == RowKernel::Invocation && spec.channels.is_multiple_of(4)
}

/// The forward, ready to record: one workgroup or one invocation per row ([`RowKernel`]).
pub struct LayerNormForward {
    dispatch: Dispatch,
}

impl LayerNormForward {
    /// Prepares `out = layernorm(inp)·weight + bias`, saving `mean` and `rstd` (f32 tensors of
    /// `spec.rows` elements whatever the storage precision), in the adapter's row layout
    /// ([`RowKernel::for_rows`]).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        gpu: &Gpu,
        out: &GpuTensor,
        mean: &GpuTensor,
        rstd: &GpuTensor,
        inp: &GpuTensor,
        weight: &GpuTensor,
        bias: &GpuTensor,
        spec: &LayerNormSpec,
    ) -> Result<Self> {
        let kernel = RowKernel::for_rows(gpu, spec.channels, FORWARD_PASSES);
        Self::with_kernel(gpu, kernel, out, mean, rstd, inp, weight, bias, spec)
    }

    /// As [`LayerNormForward::new`] with an explicit row layout.
    #[allow(clippy::too_many_arguments)]
    pub fn with_kernel(
        gpu: &Gpu,
        kernel: RowKernel,
        out: &GpuTensor,
        mean: &GpuTensor,
        rstd: &GpuTensor,
        inp: &GpuTensor,
        weight: &GpuTensor,
        bias: &GpuTensor,
        spec: &LayerNormSpec,
    ) -> Result<Self> {
        let op = "layernorm_forward";
        let precision = common_precision(op, &[out, inp, weight, bias])?;
        expect_f32(op, mean)?;
        expect_f32(op, rstd)?;
        spec.validate(
            op,
            &[
                ("out", Extent::Elements, out.len()),
                ("mean", Extent::Rows, mean.len()),
                ("rstd", Extent::Rows, rstd.len()),
                ("inp", Extent::Elements, inp.len()),
                ("weight", Extent::Channels, weight.len()),
                ("bias", Extent::Channels, bias.len()),
            ],
        )?;
        distinct(
            op,
            &[out, mean, rstd],
            &[out, mean, rstd, inp, weight, bias],
        )?;
        kernel.check(gpu, op, spec.channels, FORWARD_PASSES)?;
        let (rows, dims) = dims(gpu, op, spec, kernel)?;
        let dims = gpu.uniform("layernorm dims", &dims);
        let (entry, constants) = kernel.entry(
            (
                "layernorm_forward",
                Specialisation::default().with("WG", WG),
            ),
            "layernorm_forward_rows",
        );
        let quads = vec4_rows(kernel, spec);
        let (entry, [inp_slot, weight_slot, bias_slot, out_slot]) = if quads {
            ("layernorm_forward_rows_vec4", [15, 16, 17, 18])
        } else {
            (entry, [1, 2, 3, 4])
        };
        let dispatch = Dispatch::new(
            gpu,
            "layernorm",
            entry,
            precision,
            constants,
            &[
                (0, Bind::whole(&dims)),
                (inp_slot, inp.bind()),
                (weight_slot, weight.bind()),
                (bias_slot, bias.bind()),
                (out_slot, out.bind()),
                (5, mean.bind()),
                (6, rstd.bind()),
            ],
            rows,
        )?;
        Ok(LayerNormForward { dispatch })
    }

    /// Adds the dispatch to `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
    }

    /// Records and submits on its own (does not wait).
    pub fn run(&self, gpu: &Gpu) -> Result<()> {
        gpu.run_pass("layernorm_forward", |pass| self.record(pass))
    }
}

/// The backward, ready to record: three dispatches (input gradient, per-block parameter sums,
/// their fixed-order total) and the scratch buffer the last two share.
pub struct LayerNormBackward {
    input: Dispatch,
    partial: Dispatch,
    total: Dispatch,
    scratch: GpuTensor,
}

impl LayerNormBackward {
    /// Prepares the gradients of [`LayerNormForward`]: `dinp` (overwritten, or added to with
    /// `spec.accumulate_input`), `dweight` and `dbias` (overwritten, or added to with
    /// `spec.accumulate_params`), from `dout`, the forward's input and weight and its saved
    /// `mean` and `rstd` (f32). Allocates a scratch of 2 · ⌈rows/32⌉ · channels f32. Uses the
    /// adapter's row layout ([`RowKernel::for_rows`]) for the input gradient.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        gpu: &Gpu,
        dinp: &GpuTensor,
        dweight: &GpuTensor,
        dbias: &GpuTensor,
        dout: &GpuTensor,
        inp: &GpuTensor,
        weight: &GpuTensor,
        mean: &GpuTensor,
        rstd: &GpuTensor,
        spec: &LayerNormSpec,
    ) -> Result<Self> {
        let kernel = RowKernel::for_rows(gpu, spec.channels, BACKWARD_PASSES);
        Self::with_kernel(
            gpu, kernel, dinp, dweight, dbias, dout, inp, weight, mean, rstd, spec,
        )
    }

    /// As [`LayerNormBackward::new`] with an explicit row layout.
    #[allow(clippy::too_many_arguments)]
    pub fn with_kernel(
        gpu: &Gpu,
        kernel: RowKernel,
        dinp: &GpuTensor,
        dweight: &GpuTensor,
        dbias: &GpuTensor,
        dout: &GpuTensor,
        inp: &GpuTensor,
        weight: &GpuTensor,
        mean: &GpuTensor,
        rstd: &GpuTensor,
        spec: &LayerNormSpec,
    ) -> Result<Self> {
        let op = "layernorm_backward";
        let precision = common_precision(op, &[dinp, dweight, dbias, dout, inp, weight])?;
        expect_f32(op, mean)?;
        expect_f32(op, rstd)?;
        spec.validate(
            op,
            &[
                ("dinp", Extent::Elements, dinp.len()),
                ("dweight", Extent::Channels, dweight.len()),
                ("dbias", Extent::Channels, dbias.len()),
                ("dout", Extent::Elements, dout.len()),
                ("inp", Extent::Elements, inp.len()),
                ("weight", Extent::Channels, weight.len()),
                ("mean", Extent::Rows, mean.len()),
                ("rstd", Extent::Rows, rstd.len()),
            ],
        )?;
        distinct(
            op,
            &[dinp, dweight, dbias],
            &[dinp, dweight, dbias, dout, inp, weight, mean, rstd],
        )?;
        kernel.check(gpu, op, spec.channels, BACKWARD_PASSES)?;
        let (rows, d) = dims(gpu, op, spec, kernel)?;
        let blocks = d.blocks as usize;
        let scratch = gpu.zeros(
            "layernorm_backward scratch",
            &[2, blocks, spec.channels],
            DType::F32,
        )?;
        let dims = gpu.uniform("layernorm dims", &d);
        let (entry, constants) = kernel.entry(
            (
                "layernorm_backward_input",
                Specialisation::default().with("WG", WG),
            ),
            "layernorm_backward_input_rows",
        );
        let (entry, [inp_slot, weight_slot, dout_slot, dinp_slot]) = if vec4_rows(kernel, spec) {
            ("layernorm_backward_input_rows_vec4", [15, 16, 19, 20])
        } else {
            (entry, [1, 2, 7, 10])
        };
        let input = Dispatch::new(
            gpu,
            "layernorm",
            entry,
            precision,
            constants.with("ACCUMULATE_INPUT", spec.accumulate_input as u8),
            &[
                (0, Bind::whole(&dims)),
                (inp_slot, inp.bind()),
                (weight_slot, weight.bind()),
                (dout_slot, dout.bind()),
                (8, mean.bind()),
                (9, rstd.bind()),
                (dinp_slot, dinp.bind()),
            ],
            rows,
        )?;
        let channel_groups = groups(spec.channels, PARAM_WG);
        // Four channels per invocation where they divide by 4 (coalesced 16-byte loads on a GPU,
        // a quarter of the memory instructions on lavapipe; the same sums in the same order).
        let (partial_entry, partial_groups, [inp_slot, dout_slot]) =
            if spec.channels.is_multiple_of(4) {
                (
                    "layernorm_backward_params_partial_vec4",
                    groups(spec.channels / 4, PARAM_WG),
                    [15, 19],
                )
            } else {
                ("layernorm_backward_params_partial", channel_groups, [1, 7])
            };
        let partial = Dispatch::new(
            gpu,
            "layernorm",
            partial_entry,
            precision,
            Specialisation::default().with("PARAM_WG", PARAM_WG as u32),
            &[
                (0, Bind::whole(&dims)),
                (inp_slot, inp.bind()),
                (dout_slot, dout.bind()),
                (8, mean.bind()),
                (9, rstd.bind()),
                (11, scratch.bind()),
            ],
            [partial_groups, blocks as u32, 1],
        )?;
        let total = Dispatch::new(
            gpu,
            "layernorm",
            "layernorm_backward_params_final",
            precision,
            Specialisation::default()
                .with("PARAM_WG", PARAM_WG as u32)
                .with("ACCUMULATE_PARAMS", spec.accumulate_params as u8),
            &[
                (0, Bind::whole(&dims)),
                (12, scratch.bind()),
                (13, dweight.bind()),
                (14, dbias.bind()),
            ],
            [channel_groups, 1, 1],
        )?;
        Ok(LayerNormBackward {
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
        gpu.run_pass("layernorm_backward", |pass| self.record(pass))
    }

    /// Bytes of scratch this op holds.
    pub fn scratch_bytes(&self) -> u64 {
        self.scratch.bytes()
    }
}

/// Layer normalisation on the GPU, submitted at once (does not wait). Same argument order as
/// [`crate::cpu::layernorm::layernorm_forward`].
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    gpu: &Gpu,
    out: &GpuTensor,
    mean: &GpuTensor,
    rstd: &GpuTensor,
    inp: &GpuTensor,
    weight: &GpuTensor,
    bias: &GpuTensor,
    spec: &LayerNormSpec,
) -> Result<()> {
    LayerNormForward::new(gpu, out, mean, rstd, inp, weight, bias, spec)?.run(gpu)
}

/// Layer normalisation's backward on the GPU, submitted at once (does not wait). Same argument
/// order as [`crate::cpu::layernorm::layernorm_backward`].
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    gpu: &Gpu,
    dinp: &GpuTensor,
    dweight: &GpuTensor,
    dbias: &GpuTensor,
    dout: &GpuTensor,
    inp: &GpuTensor,
    weight: &GpuTensor,
    mean: &GpuTensor,
    rstd: &GpuTensor,
    spec: &LayerNormSpec,
) -> Result<()> {
    LayerNormBackward::new(
        gpu, dinp, dweight, dbias, dout, inp, weight, mean, rstd, spec,
    )?
    .run(gpu)
}
