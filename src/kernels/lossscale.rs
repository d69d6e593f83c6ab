//! The lossscale family (shaders/lossscale.wgsl): dynamic loss scaling for f16 gradients, adapted
//! on the GPU from [`super::gradnorm::GradNorm`]'s overflow flag after every step.

use super::checks::{expect_distinct, expect_tensor};
use crate::gpu::{Bind, DType, Gpu, GpuTensor, PipelineKey, Specialisation};
use crate::training::LossScaling;
use crate::{Precision, Result};
use std::sync::Arc;

/// The uniform block `Params` of the shader.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    growth_factor: f32,
    backoff_factor: f32,
    growth_interval: u32,
    min_scale: f32,
    max_scale: f32,
    _pad: [u32; 3],
}

/// A prepared scale update: one single-invocation dispatch, recorded after AdamW.
pub struct LossScaler {
    pipeline: Arc<wgpu::ComputePipeline>,
    bind_group: wgpu::BindGroup,
    /// Bytes bound, for the census.
    bytes: u64,
}

impl LossScaler {
    /// Prepares the update of `scale` (f32, 1 element: the factor the loss gradient is multiplied
    /// by) and `run` (u32, 1 element: clean steps in a row) from `flag` (u32, 1 element: 1 when
    /// the step's gradients were not finite). Their initial values are the caller's to write.
    pub fn new(
        gpu: &Gpu,
        scale: &GpuTensor,
        run: &GpuTensor,
        flag: &GpuTensor,
        settings: &LossScaling,
    ) -> Result<Self> {
        const OP: &str = "lossscale";
        settings.validate()?;
        expect_tensor(OP, "scale", scale, DType::F32, 1)?;
        expect_tensor(OP, "run", run, DType::U32, 1)?;
        expect_tensor(OP, "flag", flag, DType::U32, 1)?;
        expect_distinct(OP, &[("scale", scale), ("run", run), ("flag", flag)])?;
        // The module has no T-typed data; f32 is the precision every adapter has.
        let pipeline = gpu.pipeline(&PipelineKey {
            family: "lossscale",
            entry: "loss_scale_update",
            precision: Precision::F32,
            constants: Specialisation::default(),
        })?;
        let params = gpu.uniform(
            "lossscale params",
            &Params {
                growth_factor: settings.growth_factor,
                backoff_factor: settings.backoff_factor,
                growth_interval: settings.growth_interval,
                min_scale: settings.min_scale,
                max_scale: settings.max_scale,
                _pad: [0; 3],
            },
        );
        let entries = [
            (0, Bind::whole(&params)),
            (1, flag.bind()),
            (2, scale.bind()),
            (3, run.bind()),
        ];
        let bind_group = gpu.bind_group("lossscale", &pipeline, &entries);
        gpu.check("preparing lossscale")?;
        Ok(LossScaler {
            pipeline,
            bind_group,
            bytes: super::census::bound_bytes(&entries),
        })
    }

    /// Adds the dispatch to `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.bind_group, &[]);
        pass.dispatch_workgroups(1, 1, 1);
        super::census::dispatch(self.bytes);
    }

    /// Records and submits on its own (does not wait).
    pub fn run(&self, gpu: &Gpu) -> Result<()> {
        gpu.run_pass("lossscale", |pass| self.record(pass))
    }
}

/// One scale update on the GPU, submitted at once (does not wait). Same argument order as
/// [`crate::cpu::lossscale::loss_scale_update`].
pub fn loss_scale_update(
    gpu: &Gpu,
    scale: &GpuTensor,
    run: &GpuTensor,
    flag: &GpuTensor,
    settings: &LossScaling,
) -> Result<()> {
    LossScaler::new(gpu, scale, run, flag, settings)?.run(gpu)
}
