//! The crossentropy family (shaders/crossentropy.wgsl): fused softmax + cross-entropy loss and its
//! gradient with respect to the logits, one workgroup per position.

use super::checks::{expect_distinct, expect_tensor};
use super::{RowKernel, common_precision};

/// Walks over a row: the online max and sum, then the gradient.
const PASSES: usize = 2;
use crate::gpu::Bind;
use crate::gpu::{DType, Gpu, GpuTensor, PipelineKey, Specialisation};
use crate::training::CrossEntropySpec;
use crate::{Error, Result};
use std::sync::Arc;

/// The uniform block `Params` of the shader.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    v: u32,
    ignore_index: u32,
    groups_x: u32,
}

/// A prepared loss + gradient: the target-count and per-row dispatches, built once.
///
/// The count of non-ignored targets is computed on the GPU (a one-workgroup dispatch recorded
/// just before the rows), so a training step never waits on the host; it stays readable in
/// [`CrossEntropy::count`], e.g. to turn the per-row losses into a mean. `dlogits` is a separate
/// tensor from `logits` (binding one buffer both read-only and writable is not allowed).
pub struct CrossEntropy {
    count_pipeline: Arc<wgpu::ComputePipeline>,
    count_bind_group: wgpu::BindGroup,
    pipeline: Arc<wgpu::ComputePipeline>,
    bind_group: wgpu::BindGroup,
    workgroups: [u32; 3],
    count: GpuTensor,
    spec: CrossEntropySpec,
    /// Bytes bound by the count and the main dispatch, for the census.
    bytes: [u64; 2],
}

impl CrossEntropy {
    /// Prepares `loss` (f32, n) and `dlogits` (T, n×v) from `logits` (T, n×v) and `targets`
    /// (u32, n). `dloss_scale`, a one-element f32 tensor, multiplies the gradient (the fp16
    /// loss-scaling factor, read on the GPU at run time); `None` means 1.
    pub fn new(
        gpu: &Gpu,
        loss: &GpuTensor,
        dlogits: &GpuTensor,
        logits: &GpuTensor,
        targets: &GpuTensor,
        dloss_scale: Option<&GpuTensor>,
        spec: &CrossEntropySpec,
    ) -> Result<Self> {
        let kernel = RowKernel::for_rows(gpu, spec.v, PASSES);
        Self::with_row_kernel(
            gpu,
            kernel,
            loss,
            dlogits,
            logits,
            targets,
            dloss_scale,
            spec,
        )
    }

    /// [`CrossEntropy::new`] with an explicit row layout.
    #[allow(clippy::too_many_arguments)]
    pub fn with_row_kernel(
        gpu: &Gpu,
        kernel: RowKernel,
        loss: &GpuTensor,
        dlogits: &GpuTensor,
        logits: &GpuTensor,
        targets: &GpuTensor,
        dloss_scale: Option<&GpuTensor>,
        spec: &CrossEntropySpec,
    ) -> Result<Self> {
        const OP: &str = "crossentropy";
        let precision = common_precision(OP, &[logits, dlogits])?;
        spec.validate(logits.len(), targets.len(), loss.len(), dlogits.len())?;
        expect_tensor(OP, "targets", targets, DType::U32, spec.n)?;
        expect_tensor(OP, "loss", loss, DType::F32, spec.n)?;
        let mut all = vec![
            ("loss", loss),
            ("dlogits", dlogits),
            ("logits", logits),
            ("targets", targets),
        ];
        if let Some(s) = dloss_scale {
            expect_tensor(OP, "dloss_scale", s, DType::F32, 1)?;
            all.push(("dloss_scale", s));
        }
        expect_distinct(OP, &all)?;
        kernel.check(gpu, OP, spec.v, PASSES)?;

        let max = gpu
            .capabilities()
            .limits
            .max_compute_workgroups_per_dimension as usize;
        // One workgroup per row (or per ROWS_WG rows), folded into a second dimension past the
        // per-dimension limit.
        let groups = kernel.workgroups(spec.n);
        let groups_x = groups.clamp(1, max);
        let groups_y = groups.div_ceil(groups_x);
        if groups_y > max {
            return Err(Error::shape(
                OP,
                format!(
                    "{} rows exceed the adapter's {max} × {max} workgroups",
                    spec.n
                ),
            ));
        }
        let workgroups = [groups_x as u32, groups_y as u32, 1];

        let key = |entry, constants| PipelineKey {
            family: "crossentropy",
            entry,
            precision,
            constants,
        };
        let count_pipeline = gpu.pipeline(&key("count_targets", Specialisation::default()))?;
        let (entry, constants) = kernel.entry(
            ("crossentropy", Specialisation::default()),
            "crossentropy_rows",
        );
        let pipeline = gpu.pipeline(&key(entry, constants))?;
        let params = gpu.uniform(
            "crossentropy params",
            &Params {
                n: spec.n as u32,
                v: spec.v as u32,
                ignore_index: spec.ignore_index,
                groups_x: groups_x as u32,
            },
        );
        let count = gpu.zeros("crossentropy count", &[1], DType::U32)?;
        let one;
        let scale = match dloss_scale {
            Some(s) => s,
            None => {
                one = gpu.upload("crossentropy dloss_scale", &[1], DType::F32, &[1.0])?;
                &one
            }
        };
        let count_entries = [
            (0, Bind::whole(&params)),
            (2, targets.bind()),
            (6, count.bind()),
        ];
        let count_bind_group =
            gpu.bind_group("crossentropy count", &count_pipeline, &count_entries);
        let entries = [
            (0, Bind::whole(&params)),
            (1, logits.bind()),
            (2, targets.bind()),
            (3, loss.bind()),
            (4, dlogits.bind()),
            (5, scale.bind()),
            (6, count.bind()),
        ];
        let bind_group = gpu.bind_group("crossentropy", &pipeline, &entries);
        let bytes = [
            super::census::bound_bytes(&count_entries),
            super::census::bound_bytes(&entries),
        ];
        gpu.check("preparing crossentropy")?;
        Ok(CrossEntropy {
            count_pipeline,
            count_bind_group,
            pipeline,
            bind_group,
            workgroups,
            count,
            spec: *spec,
            bytes,
        })
    }

    /// Adds both dispatches to `pass` (wgpu orders them: the count is written before it is read).
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        pass.set_pipeline(&self.count_pipeline);
        pass.set_bind_group(0, &self.count_bind_group, &[]);
        pass.dispatch_workgroups(1, 1, 1);
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.bind_group, &[]);
        let [x, y, z] = self.workgroups;
        pass.dispatch_workgroups(x, y, z);
        super::census::dispatch(self.bytes[0]);
        super::census::dispatch(self.bytes[1]);
    }

    /// Records and submits on its own (does not wait).
    pub fn run(&self, gpu: &Gpu) -> Result<()> {
        gpu.run_pass("crossentropy", |pass| self.record(pass))
    }

    /// One-element u32 tensor: the number of non-ignored targets, written by each run.
    pub fn count(&self) -> &GpuTensor {
        &self.count
    }

    /// The shape.
    pub fn spec(&self) -> &CrossEntropySpec {
        &self.spec
    }
}

/// Loss and logit gradient on the GPU, submitted at once (does not wait). Same argument order as
/// [`crate::cpu::crossentropy::crossentropy`].
pub fn crossentropy(
    gpu: &Gpu,
    loss: &GpuTensor,
    dlogits: &GpuTensor,
    logits: &GpuTensor,
    targets: &GpuTensor,
    dloss_scale: Option<&GpuTensor>,
    spec: &CrossEntropySpec,
) -> Result<()> {
    CrossEntropy::new(gpu, loss, dlogits, logits, targets, dloss_scale, spec)?.run(gpu)
}
