//! LoRA's host-side arithmetic: drawing fresh adapters, and merging them into the base weights.

use super::layout::lora_name;
use crate::model::ParamLayout;
use crate::{Error, Result};
use rand::{RngExt, SeedableRng};

/// The adapted layers of `layout`: (weight prefix, A's tensor, B's tensor), in layout order.
pub fn adapter_pairs(layout: &ParamLayout) -> Vec<(String, String, String)> {
    layout
        .tensors()
        .iter()
        .filter_map(|t| t.name.strip_suffix(".lora_A.weight"))
        .map(|prefix| {
            (
                prefix.to_string(),
                lora_name(prefix, 'A'),
                lora_name(prefix, 'B'),
            )
        })
        .collect()
}

/// Draws every adapter of `layout` in `values` as PEFT does: A from Kaiming-uniform with
/// a = √5 (PyTorch's `nn.Linear` default), i.e. U(−1/√fan_in, 1/√fan_in), and B = 0, so the
/// adapted model starts equal to the base. Deterministic in `seed`.
pub fn init_adapters(layout: &ParamLayout, values: &mut [f32], seed: u64) {
    // A stream of its own, apart from the base initialisation's draws from the same seed.
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x4c6f_5241_4164_6170);
    for t in layout.tensors() {
        let dst = &mut values[t.offset..t.offset + t.len()];
        if t.name.ends_with(".lora_A.weight") {
            let bound = 1.0 / (t.shape[1] as f64).sqrt();
            for x in dst.iter_mut() {
                *x = rng.random_range(-bound..bound) as f32;
            }
        } else if t.name.ends_with(".lora_B.weight") {
            dst.fill(0.0);
        }
    }
}

/// `W + scale·B·A` for W (fan_out × fan_in), B (fan_out × r), A (r × fan_in), each sum in f64
/// in increasing r and rounded once.
pub fn merged_weight(w: &[f32], b: &[f32], a: &[f32], scale: f32, fan_out: usize) -> Vec<f32> {
    let fan_in = w.len() / fan_out.max(1);
    let r = b.len() / fan_out.max(1);
    let mut out = w.to_vec();
    for (o, row) in out.chunks_mut(fan_in).enumerate() {
        for (i, x) in row.iter_mut().enumerate() {
            let delta: f64 = (0..r)
                .map(|k| f64::from(b[o * r + k]) * f64::from(a[k * fan_in + i]))
                .sum();
            *x = (f64::from(*x) + f64::from(scale) * delta) as f32;
        }
    }
    out
}

/// The base model's weights with every adapter of `layout` merged in: `values` moved to
/// `base` (the layout of the same model without adapters) with `W += (alpha/rank)·B·A`.
pub fn merge(layout: &ParamLayout, values: &[f32], base: &ParamLayout) -> Result<Vec<f32>> {
    let scale = layout.lora_scale().ok_or_else(|| {
        Error::invalid("lora merge", "(layout)", "the model has no LoRA adapters")
    })?;
    let get = |name: &str| {
        layout
            .get(name)
            .map(|t| &values[t.offset..t.offset + t.len()])
            .ok_or_else(|| Error::shape("lora merge", format!("no tensor {name}")))
    };
    let mut out = vec![0.0f32; base.buffer_len()];
    for t in base.tensors() {
        out[t.offset..t.offset + t.len()].copy_from_slice(get(&t.name)?);
    }
    for (prefix, a, b) in adapter_pairs(layout) {
        let w = base
            .get(&format!("{prefix}.weight"))
            .ok_or_else(|| Error::shape("lora merge", format!("no base weight {prefix}.weight")))?;
        let merged = merged_weight(get(&w.name)?, get(&b)?, get(&a)?, scale, w.shape[0]);
        out[w.offset..w.offset + w.len()].copy_from_slice(&merged);
    }
    Ok(out)
}
