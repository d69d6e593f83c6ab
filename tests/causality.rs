//! The whole forward pass is causal and keeps sequences apart: changing the token at position t
//! of one sequence leaves the logits of every earlier position, and every position of the other
//! sequence, bit for bit unchanged, for GPT-2 and for Llama (RoPE, grouped-query attention), in
//! both precisions. A leak anywhere (a mask off by one, a RoPE or attention kernel reading a row
//! past its own, a tile that mixes sequences) would let the model see the token it predicts: the
//! training loss would fall and sampling would not follow. The per-kernel tests check each kernel
//! against its reference; this checks the assembled model.

mod common;

use common::gpu;
use kiln::Precision;
use kiln::cpu::gpt::GptBatch;
use kiln::model::gpu::GptGpu;
use kiln::model::init::gpt2_init;
use kiln::model::{ArchKind, ModelConfig};

const VOCAB: usize = 29;
/// Not a multiple of any tile or workgroup size.
const SEQ: usize = 37;

fn gpt() -> ModelConfig {
    ModelConfig {
        n_layer: 2,
        n_head: 2,
        n_embd: 24,
        block_size: SEQ,
        bias: true,
        ..ModelConfig::default()
    }
}

fn llama() -> ModelConfig {
    ModelConfig {
        arch: ArchKind::Llama,
        n_layer: 2,
        n_head: 4,
        n_kv_head: Some(2),
        n_embd: 32,
        block_size: SEQ,
        mlp_hidden: Some(40),
        ..ModelConfig::default()
    }
}

/// Logits of every row of both sequences after a forward pass over `inputs` (2 × SEQ tokens).
fn logits(gpu: &kiln::Gpu, model: &GptGpu, inputs: &[u32]) -> Vec<Vec<f32>> {
    model.set_batch(gpu, inputs, inputs).unwrap();
    gpu.submit("forward", |encoder| model.record_logits(encoder))
        .unwrap();
    let all = model.read_logits(gpu).unwrap();
    all.chunks(VOCAB).map(<[f32]>::to_vec).collect()
}

fn check(m: &ModelConfig) {
    for precision in [Precision::F32, Precision::F16] {
        let Some(gpu) = gpu(precision) else { continue };
        let batch = GptBatch { batch: 2, seq: SEQ };
        let model = GptGpu::new(gpu, m, VOCAB, batch, 1).unwrap();
        // Weights 4 times GPT-2's initialisation, so that a changed token moves later logits
        // well above rounding (the test below also asserts that it does).
        let w: Vec<f32> = gpt2_init(model.layout(), m, 11)
            .into_iter()
            .map(|x| 4.0 * x)
            .collect();
        model.set_weights(gpu, &w).unwrap();
        let base: Vec<u32> = (0..2 * SEQ)
            .map(|i| ((i * 11 + 5) % VOCAB) as u32)
            .collect();
        let before = logits(gpu, &model, &base);
        // Positions at the start, in the middle and at the end of the second sequence.
        for t in [0, 1, 18, SEQ - 1] {
            let mut changed = base.clone();
            let row = SEQ + t;
            changed[row] = (changed[row] + 7) % VOCAB as u32;
            let after = logits(gpu, &model, &changed);
            let what = format!("{precision} {:?}: token {t} of sequence 1 changed", m.arch);
            for r in 0..row {
                assert_eq!(before[r], after[r], "{what}: row {r} moved");
            }
            // The changed position's own logits must move, or the test saw nothing.
            let moved = before[row]
                .iter()
                .zip(&after[row])
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(moved > 1e-2, "{what}: its own logits moved only {moved}");
        }
    }
}

#[test]
fn gpt2_forward_is_causal_and_keeps_sequences_apart() {
    check(&gpt());
}

#[test]
fn llama_forward_is_causal_and_keeps_sequences_apart() {
    check(&llama());
}
