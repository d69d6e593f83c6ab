//! The gradnorm family (shaders/gradnorm.wgsl): global L2 norm of a gradient buffer and an
//! inf/NaN flag, both left on the GPU for the optimizer.

use super::checks::{expect_distinct, expect_tensor};
use super::{Dispatch, float_precision};
use crate::Result;
use crate::gpu::Bind;
use crate::gpu::{DType, Gpu, GpuTensor, Specialisation};

/// Elements per invocation aimed for in the first stage before more workgroups are added. A GPU
/// wants many workgroups in flight, and 4 per invocation still gives n/1024 of them. On a
/// CPU-backed adapter each workgroup's tree reduction is eight barriers, and each barrier is a
/// switch through all 256 invocations: 782 workgroups made the baby GPT's norm (0.8M gradients)
/// cost 26 ms on lavapipe, so there each invocation sums 256 elements (a dozen workgroups for the
/// baby, still 1024 partial sums at most).
fn per_invocation(gpu: &Gpu) -> usize {
    if gpu.capabilities().adapter.software {
        256
    } else {
        4
    }
}
/// Invocations per workgroup (the shader's `WG`).
const WG: usize = 256;
/// Most partial sums; the second stage's single workgroup reads them all.
const MAX_PARTIALS: usize = 1024;

/// The uniform block `Params` of the shader.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    chunk: u32,
    groups: u32,
    _pad: u32,
}

/// A prepared norm: two dispatches and the scratch buffer of per-workgroup partial sums
/// (`groups` f32 sums and u32 flags, at most 8 KiB), built once.
///
/// The split of the buffer into chunks depends only on its length and the kind of adapter, and every sum runs in a fixed
/// order, so the norm is bit-identical from run to run on one device.
pub struct GradNorm {
    partial: Dispatch,
    last: Dispatch,
}

impl GradNorm {
    /// Prepares `norm` (f32, 1 element) = ‖grads‖₂ and `flag` (u32, 1 element) = 1 when some
    /// gradient is inf or NaN or the sum of squares overflows f32, else 0. `grads` is f32 or f16
    /// of any length.
    pub fn new(gpu: &Gpu, norm: &GpuTensor, flag: &GpuTensor, grads: &GpuTensor) -> Result<Self> {
        const OP: &str = "gradnorm";
        let precision = float_precision(OP, grads)?;
        expect_tensor(OP, "norm", norm, DType::F32, 1)?;
        expect_tensor(OP, "flag", flag, DType::U32, 1)?;
        expect_distinct(OP, &[("norm", norm), ("flag", flag), ("grads", grads)])?;
        let n = grads.len();
        let groups = n.div_ceil(WG * per_invocation(gpu)).clamp(1, MAX_PARTIALS);
        let chunk = n.div_ceil(groups).max(1);
        let params = gpu.uniform(
            "gradnorm params",
            &Params {
                n: n as u32,
                chunk: chunk as u32,
                groups: groups as u32,
                _pad: 0,
            },
        );
        let partials = gpu.zeros("gradnorm partials", &[groups], DType::F32)?;
        let partial_flags = gpu.zeros("gradnorm partial flags", &[groups], DType::U32)?;
        let dispatch = |entry, buffers: &[(u32, Bind<'_>)], groups: usize| {
            Dispatch::new(
                gpu,
                "gradnorm",
                entry,
                precision,
                Specialisation::default(),
                buffers,
                [groups as u32, 1, 1],
            )
        };
        let partial = dispatch(
            "gradnorm_partial",
            &[
                (0, Bind::whole(&params)),
                (1, grads.bind()),
                (2, partials.bind()),
                (3, partial_flags.bind()),
            ],
            groups,
        )?;
        let last = dispatch(
            "gradnorm_final",
            &[
                (0, Bind::whole(&params)),
                (2, partials.bind()),
                (3, partial_flags.bind()),
                (4, norm.bind()),
                (5, flag.bind()),
            ],
            1,
        )?;
        gpu.check("preparing gradnorm")?;
        Ok(GradNorm { partial, last })
    }

    /// Adds both stages to `pass` (wgpu orders them).
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.partial.record(pass);
        self.last.record(pass);
    }

    /// Records and submits on its own (does not wait).
    pub fn run(&self, gpu: &Gpu) -> Result<()> {
        gpu.run_pass("gradnorm", |pass| self.record(pass))
    }
}

/// Norm and inf/NaN flag on the GPU, submitted at once (does not wait). Same argument order as
/// [`crate::cpu::gradnorm::gradnorm`].
pub fn gradnorm(gpu: &Gpu, norm: &GpuTensor, flag: &GpuTensor, grads: &GpuTensor) -> Result<()> {
    GradNorm::new(gpu, norm, flag, grads)?.run(gpu)
}
