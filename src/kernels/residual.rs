//! The residual family (shaders/elementwise.wgsl): `out = a + b` for the residual stream, and
//! `dst += src`, with which the residual's backward adds the output gradient into each branch.

use super::{Dispatch, common_precision, distinct, elementwise_dispatch};
use crate::Result;
use crate::gpu::{Gpu, GpuTensor, Specialisation};
use crate::ops::elementwise_len;

/// `out = a + b`, ready to record.
pub struct ResidualForward {
    dispatch: Dispatch,
}

impl ResidualForward {
    /// Prepares `out = a + b`; all three must have the same number of elements, and `out` must
    /// be a tensor of its own (use [`AddInplace`] to add into an operand).
    pub fn new(gpu: &Gpu, out: &GpuTensor, a: &GpuTensor, b: &GpuTensor) -> Result<Self> {
        let op = "residual_forward";
        let precision = common_precision(op, &[out, a, b])?;
        let n = elementwise_len(op, &[("out", out.len()), ("a", a.len()), ("b", b.len())])?;
        distinct(op, &[out], &[out, a, b])?;
        let dispatch = elementwise_dispatch(
            gpu,
            op,
            "elementwise",
            "residual_forward",
            precision,
            Specialisation::default(),
            n,
            &[(1, a.bind()), (2, b.bind()), (3, out.bind())],
        )?;
        Ok(ResidualForward { dispatch })
    }

    /// Adds the dispatch to `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
    }

    /// Records and submits on its own (does not wait).
    pub fn run(&self, gpu: &Gpu) -> Result<()> {
        gpu.run_pass("residual_forward", |pass| self.record(pass))
    }
}

/// `dst += src`, ready to record.
pub struct AddInplace {
    dispatch: Dispatch,
}

impl AddInplace {
    /// Prepares `dst += src`; both must have the same number of elements and be distinct tensors.
    pub fn new(gpu: &Gpu, dst: &GpuTensor, src: &GpuTensor) -> Result<Self> {
        let op = "add_inplace";
        let precision = common_precision(op, &[dst, src])?;
        let n = elementwise_len(op, &[("dst", dst.len()), ("src", src.len())])?;
        distinct(op, &[dst], &[dst, src])?;
        let dispatch = elementwise_dispatch(
            gpu,
            op,
            "elementwise",
            "add_inplace",
            precision,
            Specialisation::default(),
            n,
            &[(4, src.bind()), (5, dst.bind())],
        )?;
        Ok(AddInplace { dispatch })
    }

    /// Adds the dispatch to `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
    }

    /// Records and submits on its own (does not wait).
    pub fn run(&self, gpu: &Gpu) -> Result<()> {
        gpu.run_pass("add_inplace", |pass| self.record(pass))
    }
}

/// `out = a + b` on the GPU, submitted at once (does not wait). Same argument order as
/// [`crate::cpu::residual::residual_forward`].
pub fn residual_forward(gpu: &Gpu, out: &GpuTensor, a: &GpuTensor, b: &GpuTensor) -> Result<()> {
    ResidualForward::new(gpu, out, a, b)?.run(gpu)
}

/// `dst += src` on the GPU, submitted at once (does not wait). Same argument order as
/// [`crate::cpu::residual::add_inplace`].
pub fn add_inplace(gpu: &Gpu, dst: &GpuTensor, src: &GpuTensor) -> Result<()> {
    AddInplace::new(gpu, dst, src)?.run(gpu)
}
