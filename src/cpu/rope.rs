//! Reference rotary position embedding (rotate-half convention, as Hugging Face's Llama), forward
//! and backward, in place.

use crate::Result;
use crate::ops::RopeSpec;

/// Rotates every (i, i + d/2) pair of every selected head by `sign·angle`, where
/// `angle = position · inv_freq_i` in f32 (the same f32 product the GPU forms) and cos/sin come
/// from Rust's f32 `sin_cos` (correctly range-reduced for any angle).
fn rotate(x: &mut [f32], spec: &RopeSpec, sign: f32) {
    let inv_freq = spec.inv_freq();
    let (d, half) = (spec.head_dim, spec.head_dim / 2);
    for b in 0..spec.batch {
        for t in 0..spec.seq {
            let row = (b * spec.seq + t) * spec.row_stride + spec.offset;
            let pos = (spec.first_position + t) as f32;
            for h in 0..spec.heads {
                let head = &mut x[row + h * d..row + (h + 1) * d];
                for (i, &f) in inv_freq.iter().enumerate() {
                    let (s, c) = (pos * f).sin_cos();
                    let s = sign * s;
                    let (lo, hi) = (head[i], head[i + half]);
                    // rotate_half(x) = (-x[d/2..], x[..d/2]); out = x·cos + rotate_half(x)·sin.
                    head[i] = lo * c - hi * s;
                    head[i + half] = hi * c + lo * s;
                }
            }
        }
    }
}

/// Applies RoPE in place to the heads `spec` selects (see [`RopeSpec`]); every other element of
/// `x` is left as it is.
pub fn rope_forward(x: &mut [f32], spec: &RopeSpec) -> Result<()> {
    spec.validate("rope_forward", x.len())?;
    rotate(x, spec, 1.0);
    Ok(())
}

/// The backward of [`rope_forward`], in place on the gradient: each rotation is orthogonal, so
/// its transpose is the rotation by the opposite angle.
pub fn rope_backward(dx: &mut [f32], spec: &RopeSpec) -> Result<()> {
    spec.validate("rope_backward", dx.len())?;
    rotate(dx, spec, -1.0);
    Ok(())
}
