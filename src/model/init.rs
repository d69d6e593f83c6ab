//! GPT-2 initialisation of a parameter buffer (Llama-style models use the same recipe, as
//! nanoGPT-derived Llama trainers do).

use super::{Component, ModelConfig, ParamKind, ParamLayout};
use rand::{RngExt, SeedableRng};

/// Fills a flat buffer laid out by `layout` as GPT-2 (and nanoGPT) initialise: weights from
/// N(0, 0.02²), the residual output projections (GPT-2's `c_proj`, Llama's `o_proj` and
/// `down_proj`) scaled down by √(2·n_layer) so the residual stream's variance does not grow with
/// depth, biases zero, norm gains one. Padding
/// between tensors stays zero. Deterministic in `seed`.
pub fn gpt2_init(layout: &ParamLayout, model: &ModelConfig, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = vec![0.0f32; layout.buffer_len()];
    let proj_std = 0.02 / (2.0 * model.n_layer as f64).sqrt();
    for t in layout.tensors() {
        let dst = &mut out[t.offset..t.offset + t.len()];
        // Norms and biases draw nothing (so the draws of the other tensors, in layout order,
        // are GPT-2's whatever the biases).
        if t.component == Component::Norm {
            if t.kind == ParamKind::Weight {
                dst.fill(1.0);
            }
            continue;
        }
        if t.kind == ParamKind::Bias {
            continue;
        }
        let residual_out = ["c_proj.weight", "o_proj.weight", "down_proj.weight"];
        let std = if residual_out.iter().any(|s| t.name.ends_with(s)) {
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
