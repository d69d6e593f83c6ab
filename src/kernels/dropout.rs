//! The dropout family (shaders/dropout.wgsl): inverted dropout whose mask is recomputed from a
//! counter-based hash, in place or into another tensor. The backward of a dropout is the same
//! dispatch on the gradient with the same site and state.

use super::checks::expect_tensor;
use super::{Dispatch, ELEMENTWISE_WG, common_precision, distinct, grid};
use crate::gpu::{Bind, DType, Gpu, GpuTensor, Specialisation};
use crate::{Error, Result};

pub use crate::cpu::dropout::DropoutState;

/// The uniform block `Dims` of the shader.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Dims {
    n: u32,
    groups_x: u32,
    site: u32,
    _pad: u32,
}

/// A prepared dropout at one site of the network, ready to record.
pub struct Dropout {
    dispatch: Dispatch,
}

impl Dropout {
    /// Prepares `dst = dropout(src)`, or `dst = dropout(dst)` when `src` is `None`. `state` is a
    /// 4-word u32 tensor holding a [`DropoutState`] (written by the host per step); `site`
    /// distinguishes the masks of different places in one step.
    pub fn new(
        gpu: &Gpu,
        dst: &GpuTensor,
        src: Option<&GpuTensor>,
        state: &GpuTensor,
        site: u32,
    ) -> Result<Self> {
        const OP: &str = "dropout";
        expect_tensor(OP, "state", state, DType::U32, 4)?;
        let n = dst.len();
        let mut buffers = vec![(1, state.bind()), (3, dst.bind())];
        let entry = match src {
            Some(src) => {
                common_precision(OP, &[dst, src])?;
                if src.len() != n {
                    return Err(Error::shape(
                        OP,
                        format!(
                            "src {} has {} elements but dst {} has {n}",
                            src.label(),
                            src.len(),
                            dst.label()
                        ),
                    ));
                }
                distinct(OP, &[dst], &[dst, src])?;
                buffers.push((2, src.bind()));
                "dropout_copy"
            }
            None => "dropout_inplace",
        };
        let precision = common_precision(OP, &[dst])?;
        let workgroups = grid(gpu, OP, n.div_ceil(ELEMENTWISE_WG))?;
        let dims = gpu.uniform(
            entry,
            &Dims {
                n: n as u32,
                groups_x: workgroups[0],
                site,
                _pad: 0,
            },
        );
        buffers.push((0, Bind::whole(&dims)));
        let dispatch = Dispatch::new(
            gpu,
            "dropout",
            entry,
            precision,
            Specialisation::default().with("WG", ELEMENTWISE_WG as u32),
            &buffers,
            workgroups,
        )?;
        Ok(Dropout { dispatch })
    }

    /// Adds the dispatch to `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
    }

    /// Records and submits on its own (does not wait).
    pub fn run(&self, gpu: &Gpu) -> Result<()> {
        gpu.run_pass("dropout", |pass| self.record(pass))
    }
}

/// Writes `state` into a 4-word u32 tensor (does not wait).
pub fn write_state(gpu: &Gpu, tensor: &GpuTensor, state: &DropoutState) -> Result<()> {
    gpu.write_u32(tensor, bytemuck::cast_slice(std::slice::from_ref(state)))
}

/// One dropout on the GPU, submitted at once (does not wait). Same argument order as
/// [`crate::cpu::dropout::dropout`]; the state is uploaded for the call.
pub fn dropout(
    gpu: &Gpu,
    dst: &GpuTensor,
    src: &GpuTensor,
    state: &DropoutState,
    site: u32,
) -> Result<()> {
    let s = gpu.upload_u32(
        "dropout state",
        &[4],
        bytemuck::cast_slice(std::slice::from_ref(state)),
    )?;
    Dropout::new(gpu, dst, Some(src), &s, site)?.run(gpu)
}
