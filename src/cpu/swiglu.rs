//! Reference SwiGLU (Llama's MLP activation), forward and backward, over a (rows, 2·hidden) input
//! holding the gate half then the up half of each row.

use crate::Result;
use crate::ops::SwiGluSpec;

/// `(sigmoid(x), 1 - sigmoid(x))`, each to full relative precision and without overflow: only
/// `exp(-|x|)` (in (0, 1]) is formed, so there is never an inf / inf.
pub fn sigmoid_pair(x: f32) -> (f32, f32) {
    let e = (-x.abs()).exp();
    let q = 1.0 / (1.0 + e);
    let p = e * q;
    if x >= 0.0 { (q, p) } else { (p, q) }
}

/// `silu(x) = x·sigmoid(x)`; 0 where sigmoid underflows to 0 (x below ~-88, and x = -inf, where
/// `x·0` would be NaN).
pub fn silu(x: f32) -> f32 {
    let (s, _) = sigmoid_pair(x);
    if s == 0.0 { 0.0 } else { x * s }
}

/// `silu'(x) = s·(1 + x·(1 - s))` with `s = sigmoid(x)`: 0 where s is 0, and 1 where 1 - s is 0
/// (x above ~17, and x = +inf), never `0·inf`.
pub fn silu_grad(x: f32) -> f32 {
    let (s, one_minus_s) = sigmoid_pair(x);
    if s == 0.0 {
        return 0.0;
    }
    let t = if one_minus_s == 0.0 {
        0.0
    } else {
        x * one_minus_s
    };
    s * (1.0 + t)
}

/// `out[r, j] = silu(gate) · up` with `gate = inp[r, j]`, `up = inp[r, hidden + j]`.
pub fn swiglu_forward(out: &mut [f32], inp: &[f32], spec: &SwiGluSpec) -> Result<()> {
    spec.validate(
        "swiglu_forward",
        &[("out", false, out.len()), ("inp", true, inp.len())],
    )?;
    let h = spec.hidden;
    for (o_row, x_row) in out.chunks_exact_mut(h).zip(inp.chunks_exact(2 * h)) {
        let (gate, up) = x_row.split_at(h);
        for ((o, &g), &u) in o_row.iter_mut().zip(gate).zip(up) {
            *o = silu(g) * u;
        }
    }
    Ok(())
}

/// Gradients of [`swiglu_forward`] into the two halves of `dinp` (same layout as `inp`):
/// `dgate = dout·up·silu'(gate)`, `dup = dout·silu(gate)`. With `accumulate` they are added to
/// `dinp`; otherwise they overwrite it.
pub fn swiglu_backward(
    dinp: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    spec: &SwiGluSpec,
    accumulate: bool,
) -> Result<()> {
    spec.validate(
        "swiglu_backward",
        &[
            ("dinp", true, dinp.len()),
            ("dout", false, dout.len()),
            ("inp", true, inp.len()),
        ],
    )?;
    let h = spec.hidden;
    for ((d_row, dy_row), x_row) in dinp
        .chunks_exact_mut(2 * h)
        .zip(dout.chunks_exact(h))
        .zip(inp.chunks_exact(2 * h))
    {
        let (dgate, dup) = d_row.split_at_mut(h);
        let (gate, up) = x_row.split_at(h);
        for j in 0..h {
            let (g, u, dy) = (gate[j], up[j], dy_row[j]);
            let dg = dy * u * silu_grad(g);
            let du = dy * silu(g);
            if accumulate {
                dgate[j] += dg;
                dup[j] += du;
            } else {
                dgate[j] = dg;
                dup[j] = du;
            }
        }
    }
    Ok(())
}
