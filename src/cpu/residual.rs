//! Reference residual connection: `out = a + b`, whose backward hands the same gradient to both
//! branches (done with [`add_inplace`] into each branch's gradient).

use crate::Result;
use crate::ops::elementwise_len;

/// `out = a + b` element-wise.
pub fn residual_forward(out: &mut [f32], a: &[f32], b: &[f32]) -> Result<()> {
    elementwise_len(
        "residual_forward",
        &[("out", out.len()), ("a", a.len()), ("b", b.len())],
    )?;
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = x + y;
    }
    Ok(())
}

/// `dst += src` element-wise: the residual backward adds the output gradient into each branch.
pub fn add_inplace(dst: &mut [f32], src: &[f32]) -> Result<()> {
    elementwise_len("add_inplace", &[("dst", dst.len()), ("src", src.len())])?;
    for (d, &s) in dst.iter_mut().zip(src) {
        *d += s;
    }
    Ok(())
}
