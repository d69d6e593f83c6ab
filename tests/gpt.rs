//! The whole GPT: the CPU reference's gradients against finite differences.

mod common;

use common::gradcheck::{GradCheck, check_gradient};
use common::random;
use kiln::cpu::gpt::{GptBatch, gpt_loss_and_grads};
use kiln::model::{ModelConfig, ParamLayout};

fn tiny(bias: bool) -> ModelConfig {
    ModelConfig {
        n_layer: 2,
        n_head: 2,
        n_embd: 8,
        block_size: 6,
        bias,
        ..ModelConfig::default()
    }
}

/// Small random weights (a trained model's scale), norm gains near 1.
fn init(layout: &ParamLayout, seed: u64) -> Vec<f32> {
    let mut p = random(layout.buffer_len(), seed)
        .iter()
        .map(|x| 0.3 * x)
        .collect::<Vec<_>>();
    for t in layout.tensors() {
        if t.name.contains("ln_") && t.name.ends_with("weight") {
            for x in &mut p[t.offset..t.offset + t.len()] {
                *x += 1.0;
            }
        }
    }
    p
}

#[test]
fn cpu_gpt_gradients_match_finite_differences() {
    for bias in [false, true] {
        let model = tiny(bias);
        let vocab = 7;
        let layout = ParamLayout::gpt(&model, vocab, 1).unwrap();
        let params = init(&layout, 1);
        let batch = GptBatch { batch: 2, seq: 5 };
        let inputs: Vec<u32> = (0..10).map(|i| (i * 3 % vocab) as u32).collect();
        let mut targets: Vec<u32> = (0..10).map(|i| ((i * 5 + 1) % vocab) as u32).collect();
        targets[3] = u32::MAX; // an ignored position
        let mut grads = vec![0.0; params.len()];
        gpt_loss_and_grads(
            &mut grads, &params, &layout, &model, vocab, &inputs, &targets, &batch, 1.0, false,
        )
        .unwrap();
        let loss = |p: &[f32]| {
            let mut g = vec![0.0; p.len()];
            f64::from(
                gpt_loss_and_grads(
                    &mut g, p, &layout, &model, vocab, &inputs, &targets, &batch, 1.0, false,
                )
                .unwrap(),
            )
        };
        // The loss is one f32 number (summed in f64 from f32 per-row losses): its rounding is
        // ~1e-7·|L| ≈ 2e-7, so (L+ − L−)/2h with h = 1e-2 carries ~2e-5 of noise; truncation is
        // O(h²) relative. 1e-4 absolute + 1e-2 relative.
        let fd = GradCheck {
            h: 1e-2,
            abs: 1e-4,
            rel: 1e-2,
        };
        check_gradient(&format!("gpt bias={bias}"), &params, &grads, loss, fd).unwrap();
        // A gradient with one tensor's sign flipped must fail the same check.
        let mut wrong = grads.clone();
        let t = layout.get("h.1.mlp.c_fc.weight").unwrap();
        for g in &mut wrong[t.offset..t.offset + t.len()] {
            *g = -*g;
        }
        assert!(check_gradient("wrong", &params, &wrong, loss, fd).is_err());
    }
}
