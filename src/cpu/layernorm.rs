//! Reference layer normalisation, forward and backward.

use crate::Result;
use crate::ops::{Extent, LayerNormSpec};

/// `out = (inp - mean) · rstd · weight + bias` row by row, saving each row's mean and
/// `rstd = 1 / sqrt(var + eps)` (biased variance) for the backward. A row whose variance
/// overflows f32 gets a NaN rstd (so a NaN row), not 0: see `rstd_of` in layernorm.wgsl.
///
/// Two passes over each row (mean, then the squared deviations), as the GPU kernel does: the
/// one-pass `E[x²] - E[x]²` loses every significant digit when the mean is large against the
/// spread. Row sums accumulate in f64: the GPU sums in a tree whose order a sequential loop cannot
/// reproduce, so the reference aims at the exact sum instead (a sequential f32 sum of 769
/// channels around a mean of 2 is itself off by ~1e-6 relative, as much as the GPU's error).
pub fn layernorm_forward(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    spec: &LayerNormSpec,
) -> Result<()> {
    spec.validate(
        "layernorm_forward",
        &[
            ("out", Extent::Elements, out.len()),
            ("mean", Extent::Rows, mean.len()),
            ("rstd", Extent::Rows, rstd.len()),
            ("inp", Extent::Elements, inp.len()),
            ("weight", Extent::Channels, weight.len()),
            ("bias", Extent::Channels, bias.len()),
        ],
    )?;
    let c = spec.channels;
    for r in 0..spec.rows {
        let x = &inp[r * c..(r + 1) * c];
        let m = (x.iter().map(|&v| f64::from(v)).sum::<f64>() / c as f64) as f32;
        let var = x.iter().map(|&v| f64::from((v - m) * (v - m))).sum::<f64>() / c as f64;
        let s = 1.0 / (var as f32 + spec.eps).sqrt();
        // An overflowed variance leaves no f32 normalisation: NaN, as the kernels give, not 0.
        let s = if s == 0.0 { f32::NAN } else { s };
        for (i, o) in out[r * c..(r + 1) * c].iter_mut().enumerate() {
            *o = (x[i] - m) * s * weight[i] + bias[i];
        }
        mean[r] = m;
        rstd[r] = s;
    }
    Ok(())
}

/// Gradients of [`layernorm_forward`] given `dout`, from the saved `mean` and `rstd`.
///
/// With `n = (x - mean)·rstd` and `g = dout·weight`, per row:
/// `dinp = rstd · (g - mean(g) - n · mean(g·n))` (the two means come from differentiating
/// through the row's mean and variance); `dweight = Σ_rows dout·n`, `dbias = Σ_rows dout`. Sums
/// accumulate in f64, as in the forward. `spec.accumulate_input` adds into `dinp`,
/// `spec.accumulate_params` into `dweight` and `dbias`; otherwise they are overwritten.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dinp: &mut [f32],
    dweight: &mut [f32],
    dbias: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    mean: &[f32],
    rstd: &[f32],
    spec: &LayerNormSpec,
) -> Result<()> {
    spec.validate(
        "layernorm_backward",
        &[
            ("dinp", Extent::Elements, dinp.len()),
            ("dweight", Extent::Channels, dweight.len()),
            ("dbias", Extent::Channels, dbias.len()),
            ("dout", Extent::Elements, dout.len()),
            ("inp", Extent::Elements, inp.len()),
            ("weight", Extent::Channels, weight.len()),
            ("mean", Extent::Rows, mean.len()),
            ("rstd", Extent::Rows, rstd.len()),
        ],
    )?;
    let c = spec.channels;
    let mut dw = vec![0.0f64; c];
    let mut db = vec![0.0f64; c];
    for r in 0..spec.rows {
        let row = r * c..(r + 1) * c;
        let (x, dy) = (&inp[row.clone()], &dout[row.clone()]);
        let norm = |i: usize| (x[i] - mean[r]) * rstd[r];
        let mut g_sum = 0.0f64;
        let mut gn_sum = 0.0f64;
        for i in 0..c {
            let g = dy[i] * weight[i];
            g_sum += f64::from(g);
            gn_sum += f64::from(g * norm(i));
        }
        let g_mean = (g_sum / c as f64) as f32;
        let gn_mean = (gn_sum / c as f64) as f32;
        for (i, d) in dinp[row].iter_mut().enumerate() {
            let n = norm(i);
            let v = rstd[r] * (dy[i] * weight[i] - g_mean - n * gn_mean);
            *d = if spec.accumulate_input { *d + v } else { v };
            dw[i] += f64::from(dy[i] * n);
            db[i] += f64::from(dy[i]);
        }
    }
    for i in 0..c {
        let (w, b) = (dw[i] as f32, db[i] as f32);
        if spec.accumulate_params {
            dweight[i] += w;
            dbias[i] += b;
        } else {
            dweight[i] = w;
            dbias[i] = b;
        }
    }
    Ok(())
}
