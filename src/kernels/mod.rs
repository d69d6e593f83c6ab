//! GPU kernels: one module per WGSL family, each with the shader's specialisation, bind-group
//! wiring, dispatch-size maths and a `record` call that adds its dispatches to a compute pass.

pub mod adamw;
mod checks;
pub mod crossentropy;
pub mod gradnorm;
pub mod matmul;
pub mod tune;

use crate::gpu::{DType, GpuTensor};
use crate::{Error, Precision, Result};

/// The precision of a float tensor (u32 tensors are rejected).
pub(crate) fn float_precision(op: &'static str, t: &GpuTensor) -> Result<Precision> {
    match t.dtype() {
        DType::F16 => Ok(Precision::F16),
        DType::F32 => Ok(Precision::F32),
        DType::U32 => Err(Error::shape(
            op,
            format!("tensor {} is u32; a float tensor is needed", t.label()),
        )),
    }
}

/// Checks that every tensor has the same float precision and returns it.
pub(crate) fn common_precision(op: &'static str, tensors: &[&GpuTensor]) -> Result<Precision> {
    let p = float_precision(op, tensors[0])?;
    for t in &tensors[1..] {
        if float_precision(op, t)? != p {
            return Err(Error::shape(
                op,
                format!(
                    "tensors must share one precision: {} is {:?} but {} is {:?}",
                    tensors[0].label(),
                    tensors[0].dtype(),
                    t.label(),
                    t.dtype()
                ),
            ));
        }
    }
    Ok(p)
}

/// Workgroups needed to cover `n` items with groups of `per`.
pub(crate) fn groups(n: usize, per: usize) -> u32 {
    n.div_ceil(per) as u32
}
