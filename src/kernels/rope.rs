//! The rope family (shaders/rope.wgsl): rotary position embedding in Hugging Face Llama's
//! rotate-half convention, forward and backward, in place on the heads a [`RopeSpec`] selects
//! (the q and k heads of a fused qkv buffer with [`RopeSpec::qkv`]).
//!
//! cos and sin are computed in the shader in f32 from `f32(position) · inv_freq_i`, with
//! `inv_freq` (head_dim/2 f32) computed once on the host by [`RopeSpec::inv_freq`] exactly as the
//! CPU reference does. No table of positions: any position up to 2^24 works without sizing a
//! buffer for the longest context. A caller that owns the op moves it to other positions by
//! rewriting its uniform ([`Rope::set_first_position`]); the KV-cache decoder's op reads the
//! position from the decoder's step buffer instead ([`Rope::forward_at_step`]).

use super::checks::expect_tensor;
use super::{Dispatch, ELEMENTWISE_WG, float_precision, grid};
use crate::gpu::{Bind, DType, Gpu, GpuTensor, Specialisation};
use crate::ops::RopeSpec;
use crate::{Error, Result};

/// The uniform block `Dims` of the shader.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Dims {
    n: u32,
    groups_x: u32,
    half: u32,
    heads: u32,
    seq: u32,
    offset: u32,
    row_stride: u32,
    first_position: u32,
}

/// A prepared in-place rotation, forward ([`Rope::forward`]) or backward ([`Rope::backward`]).
pub struct Rope {
    dispatch: Dispatch,
    dims_buffer: wgpu::Buffer,
    dims: Dims,
    spec: RopeSpec,
    /// Kept alive for the bind group.
    _inv_freq: GpuTensor,
}

impl Rope {
    /// Prepares the forward rotation of the heads of `x` that `spec` selects, in place.
    pub fn forward(gpu: &Gpu, x: &GpuTensor, spec: &RopeSpec) -> Result<Self> {
        Self::new(gpu, "rope_forward", x, spec, false, None)
    }

    /// Prepares the backward, in place on the gradient `dx` (the gradient of the rotated
    /// tensor in, the gradient of the unrotated one out): the rotation by the opposite angle.
    pub fn backward(gpu: &Gpu, dx: &GpuTensor, spec: &RopeSpec) -> Result<Self> {
        Self::new(gpu, "rope_backward", dx, spec, true, None)
    }

    /// Prepares the forward rotation with the positions moved on by word 1 of `step`, the
    /// KV-cache decoder's u32 (token, pos), read when the dispatch runs: row t is at position
    /// `spec.first_position + pos + t`. One prepared dispatch thus serves every decode step
    /// (the host rewrites `step` before each), with exactly the arithmetic of [`Rope::forward`]
    /// (the same shader function), so a row rotated at pos is bit-identical to row pos of the
    /// training forward's rotation. `spec` is checked at `first_position` only: the caller keeps
    /// the positions it writes below [`RopeSpec::MAX_POSITION`].
    pub fn forward_at_step(
        gpu: &Gpu,
        x: &GpuTensor,
        spec: &RopeSpec,
        step: &GpuTensor,
    ) -> Result<Self> {
        const OP: &str = "rope_at_step";
        expect_tensor(OP, "step", step, DType::U32, 2)?;
        Self::new(gpu, OP, x, spec, false, Some(step))
    }

    fn new(
        gpu: &Gpu,
        op: &'static str,
        x: &GpuTensor,
        spec: &RopeSpec,
        inverse: bool,
        step: Option<&GpuTensor>,
    ) -> Result<Self> {
        let precision = float_precision(op, x)?;
        spec.validate(op, x.len())?;
        let half = spec.head_dim / 2;
        let n = spec.batch * spec.seq * spec.heads * half;
        if n > u32::MAX as usize {
            return Err(Error::shape(
                op,
                format!("{n} pairs exceed the 2^32 invocations a kernel indexes"),
            ));
        }
        let workgroups = grid(gpu, op, n.div_ceil(ELEMENTWISE_WG))?;
        let inv_freq = spec.inv_freq();
        let inv_freq = gpu.upload("rope inv_freq", &[half], DType::F32, &inv_freq)?;
        let dims = Dims {
            n: n as u32,
            groups_x: workgroups[0],
            half: half as u32,
            heads: spec.heads as u32,
            seq: spec.seq as u32,
            offset: spec.offset as u32,
            row_stride: spec.row_stride as u32,
            first_position: spec.first_position as u32,
        };
        let dims_buffer = gpu.uniform("rope dims", &dims);
        let mut binds = vec![
            (0, Bind::whole(&dims_buffer)),
            (1, x.bind()),
            (2, inv_freq.bind()),
        ];
        let entry = match step {
            Some(step) => {
                binds.push((3, step.bind()));
                "rope_at_step"
            }
            None => "rope",
        };
        let dispatch = Dispatch::new(
            gpu,
            "rope",
            entry,
            precision,
            Specialisation::default()
                .with("WG", ELEMENTWISE_WG as u32)
                .with("INVERSE", inverse as u8),
            &binds,
            workgroups,
        )?;
        Ok(Rope {
            dispatch,
            dims_buffer,
            dims,
            spec: *spec,
            _inv_freq: inv_freq,
        })
    }

    /// Moves the rotation to positions `first_position..first_position + seq` (the decoder's
    /// next token) by rewriting the uniform; takes effect for work submitted after this call.
    pub fn set_first_position(&mut self, gpu: &Gpu, first_position: usize) -> Result<()> {
        let spec = self.spec.positions_from(first_position);
        spec.validate("rope_set_first_position", spec.min_len())?;
        self.spec = spec;
        self.dims.first_position = first_position as u32;
        gpu.queue()
            .write_buffer(&self.dims_buffer, 0, bytemuck::bytes_of(&self.dims));
        Ok(())
    }

    /// The spec the op runs (with the latest first position).
    pub fn spec(&self) -> &RopeSpec {
        &self.spec
    }

    /// Adds the dispatch to `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
    }

    /// Records and submits on its own (does not wait).
    pub fn run(&self, gpu: &Gpu) -> Result<()> {
        gpu.run_pass("rope", |pass| self.record(pass))
    }
}

/// RoPE in place on the GPU, submitted at once (does not wait). Same argument order as
/// [`crate::cpu::rope::rope_forward`].
pub fn rope_forward(gpu: &Gpu, x: &GpuTensor, spec: &RopeSpec) -> Result<()> {
    Rope::forward(gpu, x, spec)?.run(gpu)
}

/// RoPE's backward in place on the gradient on the GPU, submitted at once (does not wait). Same
/// argument order as [`crate::cpu::rope::rope_backward`].
pub fn rope_backward(gpu: &Gpu, dx: &GpuTensor, spec: &RopeSpec) -> Result<()> {
    Rope::backward(gpu, dx, spec)?.run(gpu)
}
