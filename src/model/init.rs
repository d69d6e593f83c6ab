//! GPT-2 initialisation of a parameter buffer.

use super::{ModelConfig, ParamLayout};
use rand::{RngExt, SeedableRng};

/// Fills a flat buffer laid out by `layout` as GPT-2 (and nanoGPT) initialise: weights from
/// N(0, 0.02²), the residual output projections (`c_proj`) scaled down by √(2·n_layer) so the
/// residual stream's variance does not grow with depth, biases zero, norm gains one. Padding
/// between tensors stays zero. Deterministic in `seed`.
pub fn gpt2_init(layout: &ParamLayout, model: &ModelConfig, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = vec![0.0f32; layout.buffer_len()];
    let proj_std = 0.02 / (2.0 * model.n_layer as f64).sqrt();
    for t in layout.tensors() {
        let dst = &mut out[t.offset..t.offset + t.len()];
        if t.name.contains("ln_") {
            if t.name.ends_with(".weight") {
                dst.fill(1.0);
            }
            continue;
        }
        if t.name.ends_with(".bias") {
            continue;
        }
        let std = if t.name.ends_with("c_proj.weight") {
            proj_std
        } else {
            0.02
        };
        for x in dst.iter_mut() {
            *x = (normal(&mut rng) * std) as f32;
        }
    }
    out
}

/// A standard normal sample (Box–Muller; rand's distributions live in another crate).
fn normal(rng: &mut impl rand::Rng) -> f64 {
    let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.random_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}
