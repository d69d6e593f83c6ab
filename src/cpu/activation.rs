//! Reference GELU (GPT-2's tanh approximation), forward and backward.

use crate::Result;
use crate::ops::elementwise_len;

/// √(2/π), the scale inside GPT-2's tanh approximation.
pub const GELU_SCALE: f32 = 0.797_884_6;
/// The cubic coefficient of the approximation.
pub const GELU_CUBIC: f32 = 0.044_715;

/// `gelu(x) = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
pub fn gelu(x: f32) -> f32 {
    let u = GELU_SCALE * (x + GELU_CUBIC * x * x * x);
    0.5 * x * (1.0 + u.tanh())
}

/// d gelu / dx: `0.5·(1 + t) + 0.5·x·(1 - t²)·√(2/π)·(1 + 3·0.044715·x²)` with `t = tanh(u)`.
pub fn gelu_grad(x: f32) -> f32 {
    let u = GELU_SCALE * (x + GELU_CUBIC * x * x * x);
    let t = u.tanh();
    let sech2 = 1.0 - t * t;
    // Once tanh is exactly ±1 the second term is below f32's resolution; skipping it avoids
    // 0·inf = NaN when x² overflows (|x| > ~1e19).
    if sech2 == 0.0 {
        return 0.5 * (1.0 + t);
    }
    let du = GELU_SCALE * (1.0 + 3.0 * GELU_CUBIC * x * x);
    0.5 * (1.0 + t) + 0.5 * x * sech2 * du
}

/// `out = gelu(inp)` element-wise.
pub fn gelu_forward(out: &mut [f32], inp: &[f32]) -> Result<()> {
    elementwise_len("gelu_forward", &[("out", out.len()), ("inp", inp.len())])?;
    for (o, &x) in out.iter_mut().zip(inp) {
        *o = gelu(x);
    }
    Ok(())
}

/// `dinp = dout·gelu'(inp)`, or `dinp += dout·gelu'(inp)` with `accumulate`.
pub fn gelu_backward(dinp: &mut [f32], dout: &[f32], inp: &[f32], accumulate: bool) -> Result<()> {
    elementwise_len(
        "gelu_backward",
        &[
            ("dinp", dinp.len()),
            ("dout", dout.len()),
            ("inp", inp.len()),
        ],
    )?;
    for ((d, &dy), &x) in dinp.iter_mut().zip(dout).zip(inp) {
        let v = dy * gelu_grad(x);
        *d = if accumulate { *d + v } else { v };
    }
    Ok(())
}
