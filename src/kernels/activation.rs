//! The activation family (shaders/activation.wgsl): GPT-2's tanh-approximated GELU, forward and
//! backward, one invocation per element.

use super::{Dispatch, common_precision, distinct, elementwise_dispatch};
use crate::Result;
use crate::gpu::{Gpu, GpuTensor, Specialisation};
use crate::ops::elementwise_len;

/// `out = gelu(inp)`, ready to record.
pub struct GeluForward {
    dispatch: Dispatch,
}

impl GeluForward {
    /// Prepares `out = gelu(inp)`; the two tensors must have the same number of elements.
    pub fn new(gpu: &Gpu, out: &GpuTensor, inp: &GpuTensor) -> Result<Self> {
        let op = "gelu_forward";
        let precision = common_precision(op, &[out, inp])?;
        let n = elementwise_len(op, &[("out", out.len()), ("inp", inp.len())])?;
        distinct(op, &[out], &[out, inp])?;
        let dispatch = elementwise_dispatch(
            gpu,
            op,
            "activation",
            "gelu_forward",
            precision,
            Specialisation::default(),
            n,
            &[(1, inp.bind()), (2, out.bind())],
        )?;
        Ok(GeluForward { dispatch })
    }

    /// Adds the dispatch to `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
    }

    /// Records and submits on its own (does not wait).
    pub fn run(&self, gpu: &Gpu) -> Result<()> {
        gpu.run_pass("gelu_forward", |pass| self.record(pass))
    }
}

/// `dinp (+)= dout·gelu'(inp)`, ready to record.
pub struct GeluBackward {
    dispatch: Dispatch,
}

impl GeluBackward {
    /// Prepares `dinp = dout·gelu'(inp)`, or `dinp += ...` with `accumulate`.
    pub fn new(
        gpu: &Gpu,
        dinp: &GpuTensor,
        dout: &GpuTensor,
        inp: &GpuTensor,
        accumulate: bool,
    ) -> Result<Self> {
        let op = "gelu_backward";
        let precision = common_precision(op, &[dinp, dout, inp])?;
        let n = elementwise_len(
            op,
            &[
                ("dinp", dinp.len()),
                ("dout", dout.len()),
                ("inp", inp.len()),
            ],
        )?;
        distinct(op, &[dinp], &[dinp, dout, inp])?;
        let dispatch = elementwise_dispatch(
            gpu,
            op,
            "activation",
            "gelu_backward",
            precision,
            Specialisation::default().with("ACCUMULATE", accumulate as u8),
            n,
            &[(1, inp.bind()), (3, dout.bind()), (4, dinp.bind())],
        )?;
        Ok(GeluBackward { dispatch })
    }

    /// Adds the dispatch to `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
    }

    /// Records and submits on its own (does not wait).
    pub fn run(&self, gpu: &Gpu) -> Result<()> {
        gpu.run_pass("gelu_backward", |pass| self.record(pass))
    }
}

/// `out = gelu(inp)` on the GPU, submitted at once (does not wait). Same argument order as
/// [`crate::cpu::activation::gelu_forward`].
pub fn gelu_forward(gpu: &Gpu, out: &GpuTensor, inp: &GpuTensor) -> Result<()> {
    GeluForward::new(gpu, out, inp)?.run(gpu)
}

/// `dinp (+)= dout·gelu'(inp)` on the GPU, submitted at once (does not wait). Same argument order
/// as [`crate::cpu::activation::gelu_backward`].
pub fn gelu_backward(
    gpu: &Gpu,
    dinp: &GpuTensor,
    dout: &GpuTensor,
    inp: &GpuTensor,
    accumulate: bool,
) -> Result<()> {
    GeluBackward::new(gpu, dinp, dout, inp, accumulate)?.run(gpu)
}
