//! Reference RMS normalisation (Llama's `LlamaRMSNorm`), forward and backward.

use crate::Result;
use crate::ops::{Extent, RmsNormSpec};

/// `out = inp · rstd · weight` row by row, with `rstd = 1 / sqrt(mean(inp²) + eps)`, saving
/// each row's rstd for the backward. A row whose mean(inp²) overflows f32 gets a NaN rstd,
/// not 0, as the kernel gives.
///
/// The sum of squares accumulates in f64: the GPU sums in a tree whose order a loop cannot
/// reproduce, so the reference aims at the exact sum instead (as the layernorm reference does).
pub fn rmsnorm_forward(
    out: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    spec: &RmsNormSpec,
) -> Result<()> {
    spec.validate(
        "rmsnorm_forward",
        &[
            ("out", Extent::Elements, out.len()),
            ("rstd", Extent::Rows, rstd.len()),
            ("inp", Extent::Elements, inp.len()),
            ("weight", Extent::Channels, weight.len()),
        ],
    )?;
    let c = spec.channels;
    for r in 0..spec.rows {
        let x = &inp[r * c..(r + 1) * c];
        // mean(x²), then the f32 reciprocal square root the GPU's inverseSqrt approximates.
        let ms = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / c as f64;
        let s = 1.0 / (ms as f32 + spec.eps).sqrt();
        // An overflowed mean square leaves no f32 normalisation: NaN, as the kernel gives, not 0.
        let s = if s == 0.0 { f32::NAN } else { s };
        for (i, o) in out[r * c..(r + 1) * c].iter_mut().enumerate() {
            *o = x[i] * s * weight[i];
        }
        rstd[r] = s;
    }
    Ok(())
}

/// Gradients of [`rmsnorm_forward`] given `dout`, from the saved `rstd`.
///
/// With `n = x·rstd` and `g = dout·weight`, per row: `d rstd / d x_i = -rstd³·x_i / C`, so
/// `dinp = rstd · (g - n · mean(g·n))`; `dweight = Σ_rows dout·n`. Sums accumulate in f64, as
/// in the forward. `spec.accumulate_input` adds into `dinp`, `spec.accumulate_params` into
/// `dweight`; otherwise they are overwritten.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    dinp: &mut [f32],
    dweight: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    rstd: &[f32],
    spec: &RmsNormSpec,
) -> Result<()> {
    spec.validate(
        "rmsnorm_backward",
        &[
            ("dinp", Extent::Elements, dinp.len()),
            ("dweight", Extent::Channels, dweight.len()),
            ("dout", Extent::Elements, dout.len()),
            ("inp", Extent::Elements, inp.len()),
            ("weight", Extent::Channels, weight.len()),
            ("rstd", Extent::Rows, rstd.len()),
        ],
    )?;
    let c = spec.channels;
    let mut dw = vec![0.0f64; c];
    for (r, &s) in rstd.iter().enumerate() {
        let row = r * c..(r + 1) * c;
        let (x, dy) = (&inp[row.clone()], &dout[row.clone()]);
        let norm = |i: usize| x[i] * s;
        // mean(g·n) over the row.
        let gn_sum: f64 = (0..c).map(|i| f64::from(dy[i] * weight[i] * norm(i))).sum();
        let gn_mean = (gn_sum / c as f64) as f32;
        for (i, d) in dinp[row].iter_mut().enumerate() {
            let n = norm(i);
            let v = s * (dy[i] * weight[i] - n * gn_mean);
            *d = if spec.accumulate_input { *d + v } else { v };
            dw[i] += f64::from(dy[i] * n);
        }
    }
    for (d, &w) in dweight.iter_mut().zip(&dw) {
        let w = w as f32;
        *d = if spec.accumulate_params { *d + w } else { w };
    }
    Ok(())
}
