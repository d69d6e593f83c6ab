//! Reference matrix multiply.

use crate::Result;
use crate::ops::MatmulSpec;

/// `c[z] = alpha·op(a[z])·op(b[z]) (+ bias) (+ c[z] if accumulating)` as [`MatmulSpec`] describes.
/// Accumulates each dot product in f32 in order of increasing k, as the GPU kernels do.
///
/// ```
/// use kiln::ops::{Layout, MatmulSpec};
/// // Y = X·Wᵀ + b for 2 tokens, 3 inputs, 2 outputs.
/// let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
/// let w = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0];
/// let mut y = [0.0; 4];
/// let spec = MatmulSpec::new(Layout::NT, 2, 2, 3);
/// kiln::cpu::matmul::matmul(&mut y, &x, &w, Some(&[0.5, -0.5]), &spec)?;
/// assert_eq!(y, [1.5, 4.5, 4.5, 10.5]);
/// # Ok::<(), kiln::Error>(())
/// ```
pub fn matmul(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    bias: Option<&[f32]>,
    spec: &MatmulSpec,
) -> Result<()> {
    spec.validate(a.len(), b.len(), bias.map(<[f32]>::len), c.len())?;
    let (ta, tb) = (spec.layout.trans_a(), spec.layout.trans_b());
    for z in 0..spec.batch {
        let (outer, inner) = (z / spec.batch_inner, z % spec.batch_inner);
        // A and B may be shared by consecutive inner indices (grouped-query attention).
        let a0 = spec.a.offset + outer * spec.a.outer + inner / spec.a_inner_div * spec.a.inner;
        let b0 = spec.b.offset + outer * spec.b.outer + inner / spec.b_inner_div * spec.b.inner;
        let c0 = spec.c.offset + outer * spec.c.outer + inner * spec.c.inner;
        // Row by row, k outer and j inner: each C element still sums its products in order of
        // increasing k (the GPU's order), while the inner loop runs along a contiguous row of B
        // in the plain layout, so the reference is a fair (if unblocked) CPU baseline.
        let mut row = vec![0.0f32; spec.n];
        for i in 0..spec.m {
            row.fill(0.0);
            for p in 0..spec.k {
                // op(A)[i, p], reading the stored layout.
                let av = if ta {
                    a[a0 + p * spec.a.ld + i]
                } else {
                    a[a0 + i * spec.a.ld + p]
                };
                for (j, acc) in row.iter_mut().enumerate() {
                    // op(B)[p, j].
                    let bv = if tb {
                        b[b0 + j * spec.b.ld + p]
                    } else {
                        b[b0 + p * spec.b.ld + j]
                    };
                    *acc = av.mul_add(bv, *acc);
                }
            }
            for (j, &acc) in row.iter().enumerate() {
                let mut v = spec.alpha * acc;
                if let Some(bias) = bias {
                    v += bias[spec.bias_offset + j];
                }
                let ci = c0 + i * spec.c.ld + j;
                c[ci] = if spec.accumulate { c[ci] + v } else { v };
            }
        }
    }
    Ok(())
}
