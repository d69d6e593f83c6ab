//! Argument checks shared by the loss and optimizer wrappers, so that every misuse is an
//! `Error::Shape` naming the op and the tensors rather than a wgpu validation panic.

use crate::gpu::{DType, GpuTensor};
use crate::{Error, Result};

/// `t` must have element type `dtype` and `len` elements.
pub(crate) fn expect_tensor(
    op: &'static str,
    role: &str,
    t: &GpuTensor,
    dtype: DType,
    len: usize,
) -> Result<()> {
    if t.dtype() != dtype || t.len() != len {
        return Err(Error::shape(
            op,
            format!(
                "{role} (tensor {}) is {:?} with shape {:?}; expected {dtype:?} with {len} elements",
                t.label(),
                t.dtype(),
                t.shape()
            ),
        ));
    }
    Ok(())
}

/// No tensor may be passed twice: wgpu rejects a buffer bound as writable storage together with
/// any other binding of itself in one dispatch.
pub(crate) fn expect_distinct(op: &'static str, tensors: &[(&str, &GpuTensor)]) -> Result<()> {
    for (i, (a, ta)) in tensors.iter().enumerate() {
        for (b, tb) in &tensors[i + 1..] {
            if std::ptr::eq(*ta, *tb) {
                return Err(Error::shape(
                    op,
                    format!(
                        "tensor {} is passed as both {a} and {b}; they must be separate tensors",
                        ta.label()
                    ),
                ));
            }
        }
    }
    Ok(())
}
