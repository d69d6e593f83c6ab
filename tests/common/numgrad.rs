//! Finite-difference gradient checks for the CPU reference backward passes.

use super::Tolerance;

/// Compares `analytic` (dL/dx) with central differences (L(x + h·e_i) − L(x − h·e_i)) / 2h of the
/// scalar `loss`, computed in f64 from the f32 input, at up to `max_checks` indices spread over
/// the input. Returns a message naming the first index out of tolerance.
pub fn check_gradient(
    what: &str,
    x: &[f32],
    analytic: &[f32],
    loss: impl Fn(&[f32]) -> f64,
    h: f32,
    tol: Tolerance,
    max_checks: usize,
) -> Result<(), String> {
    assert_eq!(x.len(), analytic.len(), "{what}: gradient length");
    let stride = x.len().div_ceil(max_checks).max(1);
    let mut xp = x.to_vec();
    for i in (0..x.len()).step_by(stride) {
        let orig = xp[i];
        xp[i] = orig + h;
        let up = loss(&xp);
        xp[i] = orig - h;
        let down = loss(&xp);
        xp[i] = orig;
        // The step actually taken in f32, not the nominal h.
        let step = (f64::from(orig + h) - f64::from(orig - h)) as f32;
        let numeric = ((up - down) / f64::from(step)) as f32;
        let a = analytic[i];
        let diff = (numeric - a).abs();
        if diff > tol.abs + tol.rel * numeric.abs() {
            return Err(format!(
                "{what}: index {i}: analytic {a}, numeric {numeric}, difference {diff:e}, allowed {:e}",
                tol.abs + tol.rel * numeric.abs()
            ));
        }
    }
    Ok(())
}

/// L = Σ w_i · y_i in f64: a loss whose gradient with respect to y is the weight vector.
pub fn weighted_sum(y: &[f32], w: &[f32]) -> f64 {
    y.iter()
        .zip(w)
        .map(|(&a, &b)| f64::from(a) * f64::from(b))
        .sum()
}
