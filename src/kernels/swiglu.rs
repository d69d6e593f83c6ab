//! The swiglu family (shaders/swiglu.wgsl): Llama's MLP activation `silu(gate)·up`, forward and
//! backward, one invocation per output element.
//!
//! Layout: the input is one (rows, 2·hidden) buffer, each row the gate half then the up half, as
//! one matmul by the concatenated `[W_gate; W_up]` weight (gate rows first) produces it; the
//! output is (rows, hidden); the input gradient has the input's layout (dgate, then dup).

use super::{Dispatch, ELEMENTWISE_WG, common_precision, distinct, grid};
use crate::gpu::{Bind, Gpu, GpuTensor, Specialisation};
use crate::ops::SwiGluSpec;
use crate::{Precision, Result};

/// The uniform block `Dims` of the shader.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Dims {
    n: u32,
    hidden: u32,
    groups_x: u32,
    _pad0: u32,
}

fn dispatch(
    gpu: &Gpu,
    op: &'static str,
    entry: &'static str,
    precision: Precision,
    constants: Specialisation,
    spec: &SwiGluSpec,
    buffers: &[(u32, Bind<'_>)],
) -> Result<Dispatch> {
    let n = spec.rows * spec.hidden;
    let workgroups = grid(gpu, op, n.div_ceil(ELEMENTWISE_WG))?;
    let dims = gpu.uniform(
        "swiglu dims",
        &Dims {
            n: n as u32,
            hidden: spec.hidden as u32,
            groups_x: workgroups[0],
            _pad0: 0,
        },
    );
    let mut entries = vec![(0, Bind::whole(&dims))];
    entries.extend_from_slice(buffers);
    Dispatch::new(
        gpu,
        "swiglu",
        entry,
        precision,
        constants.with("WG", ELEMENTWISE_WG as u32),
        &entries,
        workgroups,
    )
}

/// `out = silu(gate)·up`, ready to record.
pub struct SwiGluForward {
    dispatch: Dispatch,
}

impl SwiGluForward {
    /// Prepares `out[r, j] = silu(inp[r, j])·inp[r, hidden + j]`: `inp` is (rows, 2·hidden),
    /// gate half first, `out` is (rows, hidden).
    pub fn new(gpu: &Gpu, out: &GpuTensor, inp: &GpuTensor, spec: &SwiGluSpec) -> Result<Self> {
        let op = "swiglu_forward";
        let precision = common_precision(op, &[out, inp])?;
        spec.validate(op, &[("out", false, out.len()), ("inp", true, inp.len())])?;
        distinct(op, &[out], &[out, inp])?;
        let dispatch = dispatch(
            gpu,
            op,
            "swiglu_forward",
            precision,
            Specialisation::default(),
            spec,
            &[(1, inp.bind()), (2, out.bind())],
        )?;
        Ok(SwiGluForward { dispatch })
    }

    /// Adds the dispatch to `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
    }

    /// Records and submits on its own (does not wait).
    pub fn run(&self, gpu: &Gpu) -> Result<()> {
        gpu.run_pass("swiglu_forward", |pass| self.record(pass))
    }
}

/// `dinp (+)= (dout·up·silu'(gate), dout·silu(gate))`, ready to record.
pub struct SwiGluBackward {
    dispatch: Dispatch,
}

impl SwiGluBackward {
    /// Prepares the gradient of [`SwiGluForward`] into `dinp` ((rows, 2·hidden): dgate half,
    /// then dup half), overwritten, or added to with `accumulate`.
    pub fn new(
        gpu: &Gpu,
        dinp: &GpuTensor,
        dout: &GpuTensor,
        inp: &GpuTensor,
        spec: &SwiGluSpec,
        accumulate: bool,
    ) -> Result<Self> {
        let op = "swiglu_backward";
        let precision = common_precision(op, &[dinp, dout, inp])?;
        spec.validate(
            op,
            &[
                ("dinp", true, dinp.len()),
                ("dout", false, dout.len()),
                ("inp", true, inp.len()),
            ],
        )?;
        distinct(op, &[dinp], &[dinp, dout, inp])?;
        let dispatch = dispatch(
            gpu,
            op,
            "swiglu_backward",
            precision,
            Specialisation::default().with("ACCUMULATE", accumulate as u8),
            spec,
            &[(1, inp.bind()), (3, dout.bind()), (4, dinp.bind())],
        )?;
        Ok(SwiGluBackward { dispatch })
    }

    /// Adds the dispatch to `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
    }

    /// Records and submits on its own (does not wait).
    pub fn run(&self, gpu: &Gpu) -> Result<()> {
        gpu.run_pass("swiglu_backward", |pass| self.record(pass))
    }
}

/// `out = silu(gate)·up` on the GPU, submitted at once (does not wait). Same argument order as
/// [`crate::cpu::swiglu::swiglu_forward`].
pub fn swiglu_forward(
    gpu: &Gpu,
    out: &GpuTensor,
    inp: &GpuTensor,
    spec: &SwiGluSpec,
) -> Result<()> {
    SwiGluForward::new(gpu, out, inp, spec)?.run(gpu)
}

/// SwiGLU's backward on the GPU, submitted at once (does not wait). Same argument order as
/// [`crate::cpu::swiglu::swiglu_backward`].
pub fn swiglu_backward(
    gpu: &Gpu,
    dinp: &GpuTensor,
    dout: &GpuTensor,
    inp: &GpuTensor,
    spec: &SwiGluSpec,
    accumulate: bool,
) -> Result<()> {
    SwiGluBackward::new(gpu, dinp, dout, inp, spec, accumulate)?.run(gpu)
}
