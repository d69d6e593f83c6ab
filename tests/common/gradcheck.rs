//! Finite-difference checks of the CPU reference's backward passes.
//!
//! The loss is `L(x) = Σ dout·f(x)`, so its gradient with respect to any input is exactly what a
//! backward given `dout` must return. `L` runs the f32 forward and sums in f64; each input element
//! is moved by ±h and the central difference `(L(x+h) - L(x-h)) / (2h)` is compared with the
//! analytic gradient element by element.
//!
//! Two errors bound the agreement of a correct gradient: truncation, `h²/6·L'''`, and the f32
//! rounding of the forward, which is not smooth in x: about `ε·Σ|dout·f|` over the outputs the
//! element touches, divided by `2h`. Callers state h and the tolerance for their op.

use std::fmt::Write;

/// Step and tolerance of one check: an element passes when
/// `|numeric - analytic| <= abs + rel·|analytic|`.
#[derive(Clone, Copy, Debug)]
pub struct GradCheck {
    /// Perturbation of each input element.
    pub h: f32,
    /// Absolute part of the tolerance.
    pub abs: f64,
    /// Relative part of the tolerance.
    pub rel: f64,
}

/// `Σ dout·out` accumulated in f64: the loss whose gradient with respect to `out` is `dout`.
pub fn weighted_sum(dout: &[f32], out: &[f32]) -> f64 {
    assert_eq!(dout.len(), out.len(), "weighted_sum: lengths differ");
    dout.iter()
        .zip(out)
        .map(|(&d, &o)| f64::from(d) * f64::from(o))
        .sum()
}

/// Central differences of `loss` at `x`, one element at a time. The perturbed inputs are f32, so
/// the step in the quotient is the exact (f64) difference of the two rounded values, not 2h.
pub fn numeric_gradient(x: &[f32], h: f32, mut loss: impl FnMut(&[f32]) -> f64) -> Vec<f64> {
    let mut xs = x.to_vec();
    (0..x.len())
        .map(|i| {
            let (up, down) = (x[i] + h, x[i] - h);
            xs[i] = up;
            let l_up = loss(&xs);
            xs[i] = down;
            let l_down = loss(&xs);
            xs[i] = x[i];
            (l_up - l_down) / (f64::from(up) - f64::from(down))
        })
        .collect()
}

/// Compares `analytic` with central differences of `loss` at `x`. Returns the largest error
/// seen (as a fraction of the allowed error, so < 1 passes) or a message naming how many
/// elements failed and the worst one.
pub fn check_gradient(
    what: &str,
    x: &[f32],
    analytic: &[f32],
    loss: impl FnMut(&[f32]) -> f64,
    check: GradCheck,
) -> Result<f64, String> {
    assert_eq!(x.len(), analytic.len(), "{what}: gradient length differs");
    let numeric = numeric_gradient(x, check.h, loss);
    let mut worst = (0.0f64, 0usize);
    let mut failed = 0;
    for (i, (&n, &a)) in numeric.iter().zip(analytic).enumerate() {
        let a = f64::from(a);
        let ratio = (n - a).abs() / (check.abs + check.rel * a.abs());
        // A NaN anywhere is a failure, not a pass by failed comparison.
        if ratio.is_nan() || ratio > 1.0 {
            failed += 1;
        }
        if ratio.is_nan() || ratio > worst.0 {
            worst = (if ratio.is_nan() { f64::INFINITY } else { ratio }, i);
        }
    }
    if failed == 0 {
        return Ok(worst.0);
    }
    let i = worst.1;
    let mut msg = String::new();
    let _ = write!(
        msg,
        "{what}: {failed} of {} gradient elements disagree with central differences (h = {}); \
         worst at index {i}: analytic {}, numeric {}, allowed {:e} (abs {:e} + rel {:e})",
        x.len(),
        check.h,
        analytic[i],
        numeric[i],
        check.abs + check.rel * f64::from(analytic[i]).abs(),
        check.abs,
        check.rel
    );
    Err(msg)
}
