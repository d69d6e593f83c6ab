//! Reference AdamW step over a flat parameter buffer, in PyTorch's order.

use crate::training::{AdamWStep, ParamSegment, decayed_ranges};
use crate::{Error, Result};

/// One AdamW step over the flat buffer `params` with moments `exp_avg` and `exp_avg_sq`, then
/// `working = params` (the copy the forward pass reads; the caller rounds it to its precision).
///
/// `norm` and `flag` are the outputs of [`super::gradnorm::gradnorm`] on the raw (loss-scaled)
/// gradients. A set flag skips the step (nothing is written) and increments `skipped`. Otherwise,
/// per element, with the scalars of [`AdamWStep::scalars`] and each operation rounded to f32 in
/// this order (PyTorch's `_single_tensor_adamw`):
///
/// 1. `g = grad / loss_scale`, then `g *= grad_clip / (norm / loss_scale)` if
///    `norm / loss_scale > grad_clip > 0` (the clip coefficient has no `+1e-6`, unlike
///    `torch.nn.utils.clip_grad_norm_`);
/// 2. `w *= 1 - lr·wd` for elements of decayed segments (decoupled decay, before the Adam step);
/// 3. `m = lerp(m, g, 1 - beta1)` with PyTorch's two-branch lerp;
/// 4. `v = v·beta2 + ((1 - beta2)·g)·g`;
/// 5. `w += (-(lr / bc1)·m) / (sqrt(v) / sqrt(bc2) + eps)`.
#[allow(clippy::too_many_arguments)]
pub fn adamw(
    params: &mut [f32],
    working: &mut [f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
    skipped: &mut u32,
    grads: &[f32],
    norm: f32,
    flag: u32,
    segments: &[ParamSegment],
    step: &AdamWStep,
) -> Result<()> {
    let n = params.len();
    for (what, len) in [
        ("working", working.len()),
        ("exp_avg", exp_avg.len()),
        ("exp_avg_sq", exp_avg_sq.len()),
        ("grads", grads.len()),
    ] {
        if len != n {
            return Err(Error::shape(
                "adamw",
                format!("{what} has {len} elements but params has {n}"),
            ));
        }
    }
    step.validate()?;
    let ranges = decayed_ranges(segments, n)?;
    if flag != 0 {
        *skipped += 1;
        return Ok(());
    }
    let s = step.scalars();
    let unscaled = norm / s.loss_scale;
    let clip = if s.grad_clip > 0.0 && unscaled > s.grad_clip {
        s.grad_clip / unscaled
    } else {
        1.0
    };
    let mut decayed = vec![false; n];
    for &[start, end] in &ranges {
        decayed[start as usize..end as usize].fill(true);
    }
    for i in 0..n {
        let g = grads[i] / s.loss_scale * clip;
        let mut w = params[i];
        if decayed[i] {
            w *= s.decay_factor;
        }
        let wt = s.one_minus_beta1;
        let m = exp_avg[i];
        let m = if wt.abs() < 0.5 {
            m + wt * (g - m)
        } else {
            g - (g - m) * (1.0 - wt)
        };
        let v = exp_avg_sq[i] * s.beta2 + s.one_minus_beta2 * g * g;
        let denom = v.sqrt() / s.bc2_sqrt + s.eps;
        w += (-s.step_size * m) / denom;
        params[i] = w;
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        working[i] = w;
    }
    Ok(())
}
