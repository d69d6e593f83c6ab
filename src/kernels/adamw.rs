//! The adamw family (shaders/adamw.wgsl): one fused AdamW step over the whole flat parameter
//! buffer in one dispatch, reading the gradient norm and inf/NaN flag that
//! [`super::gradnorm::GradNorm`] left on the GPU.

use super::checks::{expect_distinct, expect_tensor};
use crate::gpu::Bind;
use crate::gpu::{DType, Gpu, GpuTensor, PipelineKey, Specialisation};
use crate::training::{AdamWStep, ParamSegment, decayed_ranges};
use crate::{Error, Precision, Result};
use std::sync::Arc;
use wgpu::util::DeviceExt;

/// Invocations per workgroup (the shader's `WG`).
const WG: usize = 256;

/// Elements each invocation updates (the shader strides, so loads stay coalesced). The per-step
/// scalars and the decayed-range lookup are paid once per invocation, so more elements amortise
/// them; a GPU wants enough invocations to fill its cores, and four per invocation still leaves
/// n/1024 workgroups. A CPU-backed adapter runs a handful of threads, and there every invocation
/// costs its setup and every storage load a loop over the SIMD lanes. Counted in units of the
/// entry's access (four elements for the `_vec4` entries).
fn elements_per_invocation(gpu: &Gpu) -> usize {
    if gpu.capabilities().adapter.software {
        64
    } else {
        4
    }
}

/// The uniform block `Params` of the shader.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    n_ranges: u32,
    groups: u32,
    _pad: u32,
}

/// A prepared optimizer step: pipeline, bound buffers, the decay table and the per-step
/// settings buffer, built once and recorded every step.
///
/// The per-step values live in a 48-byte storage buffer that [`AdamW::set_step`] overwrites with
/// `queue.write_buffer`, which is ordered before any later submission: a training loop writes the
/// next step's settings and records the step without ever waiting for the device.
pub struct AdamW {
    pipeline: Arc<wgpu::ComputePipeline>,
    bind_group: wgpu::BindGroup,
    step: wgpu::Buffer,
    groups: u32,
    /// Bytes bound, for the census.
    bytes: u64,
}

impl AdamW {
    /// Prepares the step over `params` (f32 master weights), `exp_avg` and `exp_avg_sq` (f32
    /// moments), writing `working` (the T copy the forward pass reads) and counting skipped steps
    /// in `skipped` (u32, 1 element). `grads` are f32 or T; `norm` (f32) and `flag` (u32) are
    /// [`super::gradnorm::GradNorm`]'s outputs for those gradients. `scale` (f32, 1 element) is
    /// the dynamic loss scale, which multiplies `step.loss_scale` (1 when there is none).
    /// `segments` must tile the buffer; `step` gives the first step's settings (see
    /// [`AdamW::set_step`]).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        gpu: &Gpu,
        params: &GpuTensor,
        working: &GpuTensor,
        exp_avg: &GpuTensor,
        exp_avg_sq: &GpuTensor,
        skipped: &GpuTensor,
        grads: &GpuTensor,
        norm: &GpuTensor,
        flag: &GpuTensor,
        scale: &GpuTensor,
        segments: &[ParamSegment],
        step: &AdamWStep,
    ) -> Result<Self> {
        const OP: &str = "adamw";
        let n = params.len();
        expect_tensor(OP, "params", params, DType::F32, n)?;
        expect_tensor(OP, "exp_avg", exp_avg, DType::F32, n)?;
        expect_tensor(OP, "exp_avg_sq", exp_avg_sq, DType::F32, n)?;
        expect_tensor(OP, "skipped", skipped, DType::U32, 1)?;
        expect_tensor(OP, "norm", norm, DType::F32, 1)?;
        expect_tensor(OP, "flag", flag, DType::U32, 1)?;
        expect_tensor(OP, "scale", scale, DType::F32, 1)?;
        let precision = match working.dtype() {
            DType::F16 => Precision::F16,
            DType::F32 => Precision::F32,
            DType::U32 => {
                return Err(Error::shape(
                    OP,
                    format!(
                        "working (tensor {}) is u32; it must be f16 or f32",
                        working.label()
                    ),
                ));
            }
        };
        expect_tensor(OP, "working", working, working.dtype(), n)?;
        // Gradients are either the working precision or f32 (kept in f32 under f16 storage).
        let entry = match (grads.dtype(), precision) {
            (DType::F32, Precision::F16) => "adamw_f32_grads",
            (d, _) if d == DType::from(precision) => "adamw",
            _ => {
                return Err(Error::shape(
                    OP,
                    format!(
                        "grads (tensor {}) is {:?} but working is {:?}; gradients must be f32 or \
                         the working precision",
                        grads.label(),
                        grads.dtype(),
                        working.dtype()
                    ),
                ));
            }
        };
        expect_tensor(OP, "grads", grads, grads.dtype(), n)?;
        expect_distinct(
            OP,
            &[
                ("params", params),
                ("working", working),
                ("exp_avg", exp_avg),
                ("exp_avg_sq", exp_avg_sq),
                ("skipped", skipped),
                ("grads", grads),
                ("norm", norm),
                ("flag", flag),
                ("scale", scale),
            ],
        )?;
        step.validate()?;
        let ranges = decayed_ranges(segments, n)?;

        let max = gpu
            .capabilities()
            .limits
            .max_compute_workgroups_per_dimension as usize;
        // Four elements per memory access where the length allows it (the `_vec4` entries: same
        // arithmetic per element, bit-identical results); the scalar entries otherwise.
        let vec4 = n.is_multiple_of(4) && n > 0;
        let entry = match (entry, vec4) {
            ("adamw", true) => "adamw_vec4",
            ("adamw_f32_grads", true) => "adamw_f32_grads_vec4",
            (e, _) => e,
        };
        let units = if vec4 { n / 4 } else { n };
        // Invocation 0 must run even for an empty buffer: it counts skipped steps.
        let groups = units
            .div_ceil(WG * elements_per_invocation(gpu))
            .clamp(1, max);
        let pipeline = gpu.pipeline(&PipelineKey {
            family: "adamw",
            entry,
            precision,
            constants: Specialisation::default(),
        })?;
        let uniform = gpu.uniform(
            "adamw params",
            &Params {
                n: n as u32,
                n_ranges: ranges.len() as u32,
                groups: groups as u32,
                _pad: 0,
            },
        );
        // A binding cannot be empty: with no decayed tensor the table holds one unread entry.
        let table: &[[u32; 2]] = if ranges.is_empty() {
            &[[0, 0]]
        } else {
            &ranges
        };
        let device = gpu.device();
        let ranges_buf = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("adamw decayed ranges"),
            contents: bytemuck::cast_slice(table),
            usage: wgpu::BufferUsages::STORAGE,
        });
        let step_buf = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("adamw step"),
            contents: bytemuck::bytes_of(&step.scalars()),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        });
        let grads_binding = match entry {
            "adamw" => 6,
            "adamw_f32_grads" => 7,
            "adamw_vec4" => 17,
            _ => 18,
        };
        let b = if vec4 { 11 } else { 0 };
        let entries = [
            (0, Bind::whole(&uniform)),
            (1, Bind::whole(&step_buf)),
            (2 + b, params.bind()),
            (3 + b, exp_avg.bind()),
            (4 + b, exp_avg_sq.bind()),
            (5 + b, working.bind()),
            (grads_binding, grads.bind()),
            (8, norm.bind()),
            (9, flag.bind()),
            (10, skipped.bind()),
            (11, Bind::whole(&ranges_buf)),
            (12, scale.bind()),
        ];
        let bind_group = gpu.bind_group("adamw", &pipeline, &entries);
        let bytes = super::census::bound_bytes(&entries);
        gpu.check("preparing adamw")?;
        Ok(AdamW {
            pipeline,
            bind_group,
            step: step_buf,
            groups: groups as u32,
            bytes,
        })
    }

    /// Sets the values the next recorded steps use (validated here, then written with
    /// `queue.write_buffer`; does not wait).
    pub fn set_step(&self, gpu: &Gpu, step: &AdamWStep) -> Result<()> {
        step.validate()?;
        gpu.queue()
            .write_buffer(&self.step, 0, bytemuck::bytes_of(&step.scalars()));
        gpu.check("writing the adamw step")
    }

    /// Adds the dispatch to `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.bind_group, &[]);
        pass.dispatch_workgroups(self.groups, 1, 1);
        super::census::dispatch(self.bytes);
    }

    /// Records and submits on its own (does not wait).
    pub fn run(&self, gpu: &Gpu) -> Result<()> {
        gpu.run_pass("adamw", |pass| self.record(pass))
    }
}

/// One AdamW step on the GPU, submitted at once (does not wait). Same argument order as
/// [`crate::cpu::adamw::adamw`].
#[allow(clippy::too_many_arguments)]
pub fn adamw(
    gpu: &Gpu,
    params: &GpuTensor,
    working: &GpuTensor,
    exp_avg: &GpuTensor,
    exp_avg_sq: &GpuTensor,
    skipped: &GpuTensor,
    grads: &GpuTensor,
    norm: &GpuTensor,
    flag: &GpuTensor,
    segments: &[ParamSegment],
    step: &AdamWStep,
) -> Result<()> {
    // No dynamic scale here: step.loss_scale is the whole factor.
    let one = gpu.upload("adamw unit scale", &[1], DType::F32, &[1.0])?;
    AdamW::new(
        gpu, params, working, exp_avg, exp_avg_sq, skipped, grads, norm, flag, &one, segments, step,
    )?
    .run(gpu)
}
