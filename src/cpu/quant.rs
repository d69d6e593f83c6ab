//! Reference quantisation: quantise a weight matrix, dequantise it, and the quantised product
//! `Y = X·Wᵀ (+ b)` the GPU kernels ([`crate::kernels::quant`]) are tested against. The storage
//! layout is described in [`crate::quant`].

use crate::quant::{QuantKind, QuantMatrix, pack_row};
use crate::{Error, Result};
use half::f16;

/// Quantises the row-major `rows × cols` matrix `w` with one scale per `group_size` inputs.
///
/// Per group: `amax = max|w|`, the scale `d` is the f16 nearest to `amax / qmax` (raised by
/// f16 steps in the rare case, near f16's smallest values, where rounding made
/// `amax / d > qmax + ½`), and each element's integer is `q = round(w / d)` clamped to
/// `[−qmax, qmax]`, computed in f64 against the stored (rounded) `d`. Every element then
/// satisfies `|w − d·q| ≤ d/2`. An all-zero group gets `d = 0` and `q = 0` (exact).
///
/// Fails if `cols` is not a multiple of `group_size` (itself a positive multiple of 32), if a
/// weight is not finite, or if a group's scale would overflow f16 (`amax / qmax > 65504`).
pub fn quantize(
    w: &[f32],
    rows: usize,
    cols: usize,
    kind: QuantKind,
    group_size: usize,
) -> Result<QuantMatrix> {
    crate::quant::QuantSettings::new(kind, group_size, None)?.check_width("the matrix", cols)?;
    if w.len() != rows * cols {
        return Err(Error::shape(
            "quantize",
            format!("{} values for a {rows}×{cols} matrix", w.len()),
        ));
    }
    if let Some(i) = w.iter().position(|x| !x.is_finite()) {
        return Err(Error::invalid(
            format!("weight [{}, {}]", i / cols.max(1), i % cols.max(1)),
            w[i],
            "weights must be finite to be quantised",
        ));
    }
    let qmax = kind.qmax();
    let mut packed = Vec::with_capacity(rows * cols / kind.per_word());
    let mut scales = Vec::with_capacity(rows * cols / group_size);
    let mut q = vec![0i32; cols];
    for row in w.chunks_exact(cols.max(1)).take(rows) {
        for (g, group) in row.chunks_exact(group_size).enumerate() {
            let amax = group.iter().fold(0.0f64, |m, &x| m.max(f64::from(x).abs()));
            let d = group_scale(amax, qmax)?;
            scales.push(d);
            let d = d.to_f64();
            for (c, &x) in group.iter().enumerate() {
                q[g * group_size + c] = if d == 0.0 {
                    0
                } else {
                    // Rounds half away from zero, like llama.cpp's roundf.
                    ((f64::from(x) / d).round() as i32).clamp(-qmax, qmax)
                };
            }
        }
        packed.extend(pack_row(kind, &q));
    }
    QuantMatrix::new("the matrix", kind, group_size, rows, cols, packed, scales)
}

/// The f16 scale of a group whose largest magnitude is `amax` (see [`quantize`]).
fn group_scale(amax: f64, qmax: i32) -> Result<f16> {
    if amax == 0.0 {
        return Ok(f16::ZERO);
    }
    let qmax = f64::from(qmax);
    let mut d = f16::from_f64(amax / qmax);
    if d == f16::ZERO {
        d = f16::from_bits(1);
    }
    // Rounding to f16 can only lower d by a relative 2^-11 for normal values, which keeps
    // amax / d under qmax + 0.06; only subnormal scales (amax below ~1e-5) need raising.
    while d.is_finite() && amax / d.to_f64() > qmax + 0.5 {
        d = f16::from_bits(d.to_bits() + 1);
    }
    if !d.is_finite() {
        return Err(Error::invalid(
            "weight magnitude",
            amax,
            format!(
                "is too large for an f16 scale (at most {} for this type); the model's \
                 weights are outside any trained model's range",
                f64::from(f16::MAX) * qmax
            ),
        ));
    }
    Ok(d)
}

/// The weights a quantised matrix stands for: `d · q`, row-major `rows × cols`. Each product is
/// exact in f32 (an f16 scale has 11 significant bits and `q` at most 8), so this is also what
/// every GPU kernel multiplies by.
pub fn dequantize(m: &QuantMatrix) -> Vec<f32> {
    let mut out = Vec::with_capacity(m.rows() * m.cols());
    for r in 0..m.rows() {
        out.extend(dequantize_row(m, r));
    }
    out
}

/// Row `r` of [`dequantize`].
fn dequantize_row(m: &QuantMatrix, r: usize) -> Vec<f32> {
    (0..m.cols())
        .map(|c| m.scale(r, c / m.group_size()) * m.q(r, c) as f32)
        .collect()
}

/// `y = x·Wᵀ (+ bias)` for `rows` rows of `x` (`rows × W.cols`, row-major) and the quantised
/// `W` (`out × in`), giving `rows × W.rows`. Each output sums `x[i, k] · (d·q)[j, k]` as one
/// f32 fused multiply-add per k in increasing k, then adds the bias, as
/// [`crate::cpu::matmul::matmul`] does for float weights.
pub fn qmatmul(
    y: &mut [f32],
    x: &[f32],
    w: &QuantMatrix,
    bias: Option<&[f32]>,
    rows: usize,
) -> Result<()> {
    let (k, n) = (w.cols(), w.rows());
    if x.len() != rows * k || y.len() != rows * n || bias.is_some_and(|b| b.len() != n) {
        return Err(Error::shape(
            "qmatmul",
            format!(
                "x has {} elements (want {rows}×{k}), y {} (want {rows}×{n}), bias {:?} (want {n})",
                x.len(),
                y.len(),
                bias.map(<[f32]>::len)
            ),
        ));
    }
    for j in 0..n {
        // One weight row at a time, dequantised once for every row of x.
        let wj = dequantize_row(w, j);
        for i in 0..rows {
            let xi = &x[i * k..(i + 1) * k];
            let acc = xi
                .iter()
                .zip(&wj)
                .fold(0.0f32, |acc, (&a, &b)| a.mul_add(b, acc));
            y[i * n + j] = acc + bias.map_or(0.0, |b| b[j]);
        }
    }
    Ok(())
}
