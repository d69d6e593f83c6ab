//! The Llama-style architecture (RoPE, RMSNorm, SwiGLU, grouped-query attention, separate head):
//! the CPU reference step against finite differences, and the GPU step against the CPU step.

mod common;

use common::gradcheck::{GradCheck, check_gradient};
use common::random;
use kiln::cpu::gpt::{GptBatch, gpt_loss_and_grads};
use kiln::model::{ArchKind, Component, ModelConfig, ParamKind, ParamLayout};

/// A tiny Llama: 2 layers, 4 query heads of 4, `kv` key/value heads, SwiGLU 24 wide.
fn tiny(kv: usize) -> ModelConfig {
    ModelConfig {
        arch: ArchKind::Llama,
        n_layer: 2,
        n_head: 4,
        n_kv_head: Some(kv),
        n_embd: 16,
        block_size: 6,
        mlp_hidden: Some(24),
        ..ModelConfig::default()
    }
}

/// Small random weights, norm gains near 1, and token embeddings of RMS ~1: RMSNorm's curvature
/// grows as 1/rms², so on rows of RMS ~0.2 a finite-difference step of 1e-2 would be a 5% change
/// of the row's scale and the central difference's O(h²) error would reach several percent.
fn init(layout: &ParamLayout, seed: u64) -> Vec<f32> {
    let mut p: Vec<f32> = random(layout.buffer_len(), seed)
        .iter()
        .map(|x| 0.3 * x)
        .collect();
    if let Some(t) = layout.token_table() {
        for x in &mut p[t.offset..t.offset + t.len()] {
            *x *= 4.0;
        }
    }
    for t in layout.tensors() {
        if t.component == Component::Norm && t.kind == ParamKind::Weight {
            for x in &mut p[t.offset..t.offset + t.len()] {
                *x += 1.0;
            }
        }
    }
    p
}

#[test]
fn llama_layout_uses_hugging_face_names() {
    let layout = ParamLayout::gpt(&tiny(2), 11, 1).unwrap();
    let names: Vec<&str> = layout.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names[0], "model.embed_tokens.weight");
    assert!(names.contains(&"model.layers.1.self_attn.o_proj.weight"));
    assert!(names.contains(&"model.layers.0.post_attention_layernorm.weight"));
    assert_eq!(*names.last().unwrap(), "lm_head.weight");
    // q (4 heads) | k (2) | v (2), head size 4, by rows.
    let qkv = layout
        .get("model.layers.0.self_attn.qkv_proj.weight")
        .unwrap();
    assert_eq!(qkv.shape, vec![(4 + 2 * 2) * 4, 16]);
    let gate_up = layout
        .get("model.layers.0.mlp.gate_up_proj.weight")
        .unwrap();
    assert_eq!(gate_up.shape, vec![48, 16]);
    assert!(layout.tensors().iter().all(|t| t.kind == ParamKind::Weight));
}

#[test]
fn cpu_llama_gradients_match_finite_differences() {
    for kv in [1, 2, 4] {
        let model = tiny(kv);
        let vocab = 7;
        let layout = ParamLayout::gpt(&model, vocab, 1).unwrap();
        let params = init(&layout, 1);
        let batch = GptBatch { batch: 2, seq: 5 };
        let inputs: Vec<u32> = (0..10).map(|i| (i * 3 % vocab) as u32).collect();
        let targets: Vec<u32> = (0..10).map(|i| ((i * 5 + 1) % vocab) as u32).collect();
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
        // As tests/gpt.rs: f32 loss rounding ~2e-7 over 2h = 2e-2 is ~2e-5 of noise, truncation
        // O(h²). 1e-4 absolute + 1e-2 relative.
        let fd = GradCheck {
            h: 1e-2,
            abs: 1e-4,
            rel: 1e-2,
        };
        check_gradient(&format!("llama kv={kv}"), &params, &grads, loss, fd).unwrap();
        // A gradient with one tensor's sign flipped must fail the same check.
        let mut wrong = grads.clone();
        let t = layout
            .get("model.layers.1.self_attn.qkv_proj.weight")
            .unwrap();
        for g in &mut wrong[t.offset..t.offset + t.len()] {
            *g = -*g;
        }
        assert!(check_gradient("wrong", &params, &wrong, loss, fd).is_err());
    }
}

mod gpu_step {
    use super::{init, tiny};
    use crate::common::{Tolerance, assert_close, gpu};
    use kiln::Precision;
    use kiln::cpu::gpt::{GptBatch, gpt_loss_and_grads};
    use kiln::model::gpu::GptGpu;
    use kiln::training::AdamWStep;

    fn batch_data(n: usize, vocab: usize, seed: usize) -> (Vec<u32>, Vec<u32>) {
        let inputs = (0..n).map(|i| ((i * 7 + seed) % vocab) as u32).collect();
        let targets = (0..n)
            .map(|i| ((i * 5 + 3 * seed + 1) % vocab) as u32)
            .collect();
        (inputs, targets)
    }

    /// A full training step of the tiny Llama through the GPU and through the CPU reference on
    /// the same weights and batches, for multi-head (kv = n_head = 4), grouped (kv = 2) and
    /// multi-query (kv = 1) attention, with one and two micro-batches: the loss, every gradient
    /// tensor, then the weights after AdamW.
    ///
    /// Tolerances (f32), those of GPT-2's whole-step test in tests/gpt.rs, for the same reasons:
    /// loss 1e-5 relative (B·T·V exp terms summed in different orders); gradients 2e-5 absolute
    /// plus 1e-3 relative (≤ ~6 chained f32 reductions of length ≤ 2·hidden or B·T in different
    /// orders). The new ops add no longer chains: RMSNorm is one reduction per row (like layer
    /// norm's), RoPE is elementwise with f32 cos/sin (its angles agree to ~1e-7 relative between
    /// the shader's range reduction and the CPU's), SwiGLU is elementwise, and a shared key/value
    /// head's gradient sums ≤ 4 query heads' products. Weights after one AdamW step, computed on
    /// the CPU from the GPU's gradients: the same f32 operations per element, 1e-6 + 1e-6.
    #[test]
    fn llama_gpu_step_matches_cpu_step() {
        let Some(gpu) = gpu(Precision::F32) else {
            return;
        };
        for (kv, micro) in [(4, 1), (2, 1), (1, 1), (2, 2), (1, 2)] {
            let model = tiny(kv);
            let vocab = 11;
            let batch = GptBatch { batch: 3, seq: 6 };
            let g = GptGpu::new(gpu, &model, vocab, batch, micro).unwrap();
            let layout = g.layout().clone();
            let master = init(&layout, 2);
            g.set_weights(gpu, &master).unwrap();
            let micro_batches: Vec<_> = (0..micro).map(|s| batch_data(18, vocab, s)).collect();
            let step = AdamWStep {
                t: 1,
                lr: 1e-2,
                weight_decay: 0.1,
                grad_clip: 0.0,
                ..AdamWStep::new(1)
            };
            g.step(gpu, &micro_batches, &step, |_| {}).unwrap();
            let what = format!("kv={kv} micro={micro}");

            let mut cpu_grads = vec![0.0; master.len()];
            let mut cpu_loss = 0.0;
            for (i, (inp, tgt)) in micro_batches.iter().enumerate() {
                cpu_loss = gpt_loss_and_grads(
                    &mut cpu_grads,
                    &master,
                    &layout,
                    &model,
                    vocab,
                    inp,
                    tgt,
                    &batch,
                    1.0,
                    i > 0,
                )
                .unwrap();
            }
            let gpu_loss = g.read_loss(gpu).unwrap();
            assert!(
                (gpu_loss - cpu_loss).abs() <= 1e-5 * cpu_loss.abs(),
                "{what}: loss GPU {gpu_loss} CPU {cpu_loss}"
            );
            let gpu_grads = g.read_grads(gpu).unwrap();
            let tol = Tolerance {
                abs: 2e-5,
                rel: 1e-3,
            };
            for t in layout.tensors() {
                let r = t.offset..t.offset + t.len();
                assert!(
                    cpu_grads[r.clone()].iter().any(|&x| x != 0.0),
                    "{what}: gradient of {} is all zero",
                    t.name
                );
                assert_close(
                    &format!("{what} grad {}", t.name),
                    &cpu_grads[r.clone()],
                    &gpu_grads[r],
                    tol,
                );
            }

            let (mut norm, mut flag) = (0.0, 0);
            kiln::cpu::gradnorm::gradnorm(&mut norm, &mut flag, &gpu_grads);
            let segments = layout.adamw_segments();
            let n = master.len();
            let (mut w, mut working, mut m, mut v, mut skipped) =
                (master.clone(), vec![0.0; n], vec![0.0; n], vec![0.0; n], 0);
            let cpu_step = AdamWStep {
                loss_scale: micro as f64,
                ..step
            };
            kiln::cpu::adamw::adamw(
                &mut w,
                &mut working,
                &mut m,
                &mut v,
                &mut skipped,
                &gpu_grads,
                norm,
                flag,
                &segments,
                &cpu_step,
            )
            .unwrap();
            let gpu_w = g.read_master(gpu).unwrap();
            assert_close(
                &format!("{what} weights after AdamW"),
                &w,
                &gpu_w,
                Tolerance {
                    abs: 1e-6,
                    rel: 1e-6,
                },
            );
            assert!(
                w.iter().zip(&master).any(|(a, b)| a != b),
                "the step must change the weights"
            );
        }
    }
}

/// Inconsistent parts are refused with the key, the value and the rule.
#[test]
fn inconsistent_parts_are_refused() {
    use kiln::Error;
    use kiln::model::Config;
    let cases = [
        (
            "model.n_kv_head=3",
            "model.n_kv_head",
            "must divide model.n_head",
        ),
        (
            "model.rope_theta=500000.0",
            "model.rope_theta",
            "applies only",
        ),
        ("model.n_embd=12", "model.positions", "even head size"),
        ("model.norm_eps=0.0", "model.norm_eps", "> 0"),
        ("model.mlp_hidden=0", "model.mlp_hidden", "at least 1"),
    ];
    for (set, want_key, want_rule) in cases {
        let arch = if set.contains("rope_theta") {
            "gpt2"
        } else {
            "llama"
        };
        let err = Config::from_toml(
            &format!("[model]\narch = \"{arch}\"\nn_head = 4\nn_embd = 16\n"),
            &[set.to_string()],
        )
        .unwrap_err();
        match err {
            Error::Invalid { key, rule, .. } => {
                assert_eq!(key, want_key, "{set}");
                assert!(rule.contains(want_rule), "{set}: {rule}");
            }
            other => panic!("{set}: {other}"),
        }
    }
    let err = Config::from_toml("[model]\narch = \"mamba\"\n", &[]).unwrap_err();
    assert!(err.to_string().contains("mamba"), "{err}");
    // A model built in code is checked too, not divided by zero heads.
    let model = ModelConfig {
        n_head: 0,
        ..tiny(1)
    };
    assert!(ParamLayout::gpt(&model, 11, 1).is_err());
}
