//! Reference global gradient norm and inf/NaN check.

/// `norm` = the L2 norm of `grads` (squares summed in f64, then rounded once to f32, so this is
/// the more accurate side of a comparison with the GPU's f32 sums); `flag` = 1 when some element
/// is inf or NaN or the sum of squares exceeds f32's range (where the GPU's f32 sum overflows to
/// inf), else 0.
pub fn gradnorm(norm: &mut f32, flag: &mut u32, grads: &[f32]) {
    let sum: f64 = grads.iter().map(|&g| g as f64 * g as f64).sum();
    *norm = sum.sqrt() as f32;
    *flag = (grads.iter().any(|g| !g.is_finite()) || sum > f32::MAX as f64) as u32;
}
