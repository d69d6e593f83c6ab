//! Reference fused softmax + cross-entropy, forward and backward.

use crate::training::CrossEntropySpec;
use crate::{Error, Result};

/// Per-row loss `logsumexp(logits[r]) - logits[r, target]` (0 for ignored rows) and `dlogits`, the
/// gradient of the mean loss over the non-ignored rows times `dloss_scale`:
/// `(softmax(logits[r]) - onehot(target)) · dloss_scale / count`, zero for ignored rows.
/// Returns `count`, the number of non-ignored rows.
///
/// The row sums are accumulated in f64 after subtracting the row maximum, so this is the more
/// accurate side of any comparison with the GPU (which sums in f32). A target `>= v` other than
/// `ignore_index` is an error here; the GPU kernel, which cannot report one, writes NaN instead.
pub fn crossentropy(
    loss: &mut [f32],
    dlogits: &mut [f32],
    logits: &[f32],
    targets: &[u32],
    dloss_scale: f32,
    spec: &CrossEntropySpec,
) -> Result<usize> {
    spec.validate(logits.len(), targets.len(), loss.len(), dlogits.len())?;
    let v = spec.v;
    if let Some((r, &t)) = targets
        .iter()
        .enumerate()
        .find(|&(_, &t)| t != spec.ignore_index && t as usize >= v)
    {
        return Err(Error::shape(
            "crossentropy",
            format!("target {t} of row {r} is not a class (v = {v}) nor the ignore index"),
        ));
    }
    let count = targets.iter().filter(|&&t| t != spec.ignore_index).count();
    let coef = dloss_scale as f64 / count.max(1) as f64;
    for r in 0..spec.n {
        let row = &logits[r * v..(r + 1) * v];
        let grad = &mut dlogits[r * v..(r + 1) * v];
        let t = targets[r];
        if t == spec.ignore_index {
            loss[r] = 0.0;
            grad.fill(0.0);
            continue;
        }
        let t = t as usize;
        // Shifting by the maximum keeps every exponent <= 0, so nothing overflows whatever the
        // logits' magnitude; the largest term is exactly 1, so the sum cannot underflow either.
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
        loss[r] = ((max - row[t] as f64) + sum.ln()) as f32;
        for (j, (g, &x)) in grad.iter_mut().zip(row).enumerate() {
            let p = (x as f64 - max).exp() / sum;
            let onehot = if j == t { 1.0 } else { 0.0 };
            *g = ((p - onehot) * coef) as f32;
        }
    }
    Ok(count)
}
