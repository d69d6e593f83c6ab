//! The fused attention inside whole training steps: the baby GPT and a Llama-style model
//! (grouped-query heads, RoPE) built with `model.attention_kernel = "fused"` against the CPU
//! reference step, and against the reference kernels' GPU step with dropout on, which draws the
//! same masks.

mod common;

use common::{Tolerance, assert_close, gpu, random};
use kiln::Precision;
use kiln::cpu::gpt::{GptBatch, gpt_loss_and_grads};
use kiln::kernels::dropout::DropoutState;
use kiln::model::gpu::GptGpu;
use kiln::model::{ArchKind, AttentionKernel, Component, ModelConfig, ParamKind, ParamLayout};
use kiln::training::AdamWStep;

/// nanoGPT's baby GPT (configs/shakespeare-char-baby.toml): 4 layers, 4 heads of 32, 128 wide,
/// context 64.
fn baby(kernel: AttentionKernel, dropout: f32) -> ModelConfig {
    ModelConfig {
        n_layer: 4,
        n_head: 4,
        n_embd: 128,
        block_size: 64,
        bias: false,
        dropout,
        attention_kernel: kernel,
        ..ModelConfig::default()
    }
}

/// A Llama-style model: 2 layers, 4 query heads of 16 sharing 2 key/value heads, RoPE.
fn llama(kernel: AttentionKernel) -> ModelConfig {
    ModelConfig {
        arch: ArchKind::Llama,
        n_layer: 2,
        n_head: 4,
        n_kv_head: Some(2),
        n_embd: 64,
        block_size: 64,
        attention_kernel: kernel,
        ..ModelConfig::default()
    }
}

const VOCAB: usize = 65;

/// Weights of a model in training: U(-0.1, 0.1) (std 0.058, between GPT-2's 0.02 at
/// initialisation, where attention is nearly uniform, and values that saturate the softmax),
/// norm gains near 1.
fn init(layout: &ParamLayout, seed: u64) -> Vec<f32> {
    let mut p: Vec<f32> = random(layout.buffer_len(), seed)
        .iter()
        .map(|x| 0.1 * x)
        .collect();
    for t in layout.tensors() {
        if t.component == Component::Norm && t.kind == ParamKind::Weight {
            for x in &mut p[t.offset..t.offset + t.len()] {
                *x += 1.0;
            }
        }
    }
    p
}

fn tokens(n: usize, seed: usize) -> (Vec<u32>, Vec<u32>) {
    let inputs = (0..n).map(|i| ((i * 7 + seed) % VOCAB) as u32).collect();
    let targets = (0..n)
        .map(|i| ((i * 5 + 3 * seed + 1) % VOCAB) as u32)
        .collect();
    (inputs, targets)
}

/// Forward, loss and backward of one micro-batch on the GPU (gradients cleared first); returns
/// the loss and the gradients.
fn gpu_micro_batch(
    gpu: &kiln::Gpu,
    g: &GptGpu,
    master: &[f32],
    dropout: Option<DropoutState>,
) -> (f32, Vec<f32>) {
    g.set_weights(gpu, master).unwrap();
    let batch = g.batch();
    let (inputs, targets) = tokens(batch.batch * batch.seq, 1);
    g.set_batch(gpu, &inputs, &targets).unwrap();
    if let Some(state) = dropout {
        g.set_dropout(gpu, &state).unwrap();
    }
    gpu.submit("micro", |enc| {
        g.record_zero_grads(enc);
        g.record_micro_batch(enc);
    })
    .unwrap();
    (g.read_loss(gpu).unwrap(), g.read_grads(gpu).unwrap())
}

/// A full step (forward, backward, AdamW) with the fused kernels against the CPU reference step:
/// the loss, every gradient tensor, and the weights after AdamW.
///
/// Tolerances as tests/gpt.rs's whole-step test, which they were measured against here: loss 1e-5
/// relative (B·T·V exp terms summed in f32 in different orders); gradients 2e-5 absolute + 1e-3
/// relative (each gradient passes through a few chained f32 reductions summed in other orders;
/// the fused attention adds its own order, exp2 of base-2 scores and the per-tile rescaling, each
/// ~1e-7 relative); weights after one AdamW step from the same (GPU) gradients 1e-6.
#[test]
fn fused_step_matches_cpu_step() {
    let Some(gpu) = gpu(Precision::F32) else {
        return;
    };
    let cases = [
        (
            "baby GPT",
            baby(AttentionKernel::Fused, 0.0),
            GptBatch { batch: 3, seq: 64 },
        ),
        (
            "llama GQA",
            llama(AttentionKernel::Fused),
            GptBatch { batch: 2, seq: 37 },
        ),
    ];
    for (what, model, batch) in cases {
        let g = GptGpu::new(gpu, &model, VOCAB, batch, 1).unwrap();
        let layout = g.layout().clone();
        let master = init(&layout, 2);
        g.set_weights(gpu, &master).unwrap();
        let data = vec![tokens(batch.batch * batch.seq, 1)];
        let step = AdamWStep {
            t: 1,
            lr: 1e-2,
            weight_decay: 0.1,
            grad_clip: 0.0,
            ..AdamWStep::new(1)
        };
        g.step(gpu, &data, &step, |_| {}).unwrap();

        let mut cpu_grads = vec![0.0; master.len()];
        let (inputs, targets) = &data[0];
        let cpu_loss = gpt_loss_and_grads(
            &mut cpu_grads,
            &master,
            &layout,
            &model,
            VOCAB,
            inputs,
            targets,
            &batch,
            1.0,
            false,
        )
        .unwrap();
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
            assert_close(
                &format!("{what} grad {}", t.name),
                &cpu_grads[r.clone()],
                &gpu_grads[r],
                tol,
            );
        }
        let (mut norm, mut flag) = (0.0, 0);
        kiln::cpu::gradnorm::gradnorm(&mut norm, &mut flag, &gpu_grads);
        let n = master.len();
        let (mut w, mut working, mut m, mut v, mut skipped) =
            (master.clone(), vec![0.0; n], vec![0.0; n], vec![0.0; n], 0);
        kiln::cpu::adamw::adamw(
            &mut w,
            &mut working,
            &mut m,
            &mut v,
            &mut skipped,
            &gpu_grads,
            norm,
            flag,
            &layout.adamw_segments(),
            &step,
        )
        .unwrap();
        let tol = Tolerance {
            abs: 1e-6,
            rel: 1e-6,
        };
        assert_close(
            &format!("{what} weights after AdamW"),
            &w,
            &g.read_master(gpu).unwrap(),
            tol,
        );
    }
}

/// ||a − b|| / ||b|| over one tensor.
fn relative_distance(a: &[f32], b: &[f32]) -> f64 {
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        diff += f64::from(x - y).powi(2);
        norm += f64::from(y).powi(2);
    }
    (diff / norm.max(f64::MIN_POSITIVE)).sqrt()
}

/// With dropout 0.1 on the probabilities and the residual branches, the fused and the reference
/// kernels drop the same attention probabilities, so the two GPU steps agree to rounding. The
/// results must also differ in some bits: otherwise both configs ran the same kernels.
///
/// f32: elementwise, as the CPU comparison above (2e-5 + 1e-3 relative). f16: activations and
/// gradients are stored in f16 and the reference path also stores scores, probabilities and dP
/// in f16 (2^-11 relative each, a few roundings deep per layer, four layers), so elements near
/// zero carry large relative differences; each gradient tensor is compared as a whole instead:
/// ||fused − reference|| ≤ 2e-2·||reference|| (measured: see the output), and the loss to 2e-3.
#[test]
fn fused_step_matches_reference_step_with_dropout() {
    for p in Precision::ALL {
        let Some(gpu) = gpu(p) else { continue };
        let batch = GptBatch { batch: 2, seq: 64 };
        let state = DropoutState::new(0.1, DropoutState::key_for(7, 3, 0));
        let g = GptGpu::new(gpu, &baby(AttentionKernel::Fused, 0.1), VOCAB, batch, 1).unwrap();
        let reference = baby(AttentionKernel::Reference, 0.1);
        let g_ref = GptGpu::new(gpu, &reference, VOCAB, batch, 1).unwrap();
        assert_eq!(g.layout().buffer_len(), g_ref.layout().buffer_len());
        let master = init(g.layout(), 4);
        let (loss_off, _) = gpu_micro_batch(gpu, &g, &master, None);
        let (loss_f, grads_f) = gpu_micro_batch(gpu, &g, &master, Some(state));
        let (loss_r, grads_r) = gpu_micro_batch(gpu, &g_ref, &master, Some(state));
        assert!(loss_f != loss_off, "{p}: dropout must change the loss");
        assert!(
            grads_f
                .iter()
                .zip(&grads_r)
                .any(|(a, b)| a.to_bits() != b.to_bits()),
            "{p}: the fused and reference steps gave identical bits: the same kernels ran"
        );
        let loss_tol = if p == Precision::F32 { 1e-5 } else { 2e-3 };
        assert!(
            (loss_f - loss_r).abs() <= loss_tol * loss_r.abs(),
            "{p}: loss fused {loss_f} reference {loss_r}"
        );
        let mut worst = 0.0f64;
        for t in g.layout().tensors() {
            let r = t.offset..t.offset + t.len();
            let what = format!("{p} grad {}", t.name);
            match p {
                Precision::F32 => assert_close(
                    &what,
                    &grads_r[r.clone()],
                    &grads_f[r],
                    Tolerance {
                        abs: 2e-5,
                        rel: 1e-3,
                    },
                ),
                Precision::F16 => {
                    let d = relative_distance(&grads_f[r.clone()], &grads_r[r]);
                    worst = worst.max(d);
                    assert!(d <= 2e-2, "{what}: relative distance {d:e}");
                }
            }
        }
        if p == Precision::F16 {
            eprintln!("f16: worst relative distance of a gradient tensor {worst:e}");
        }
    }
}

/// A forced fused path that cannot run is refused when the config is read, naming the key.
#[test]
fn fused_with_a_head_too_wide_is_refused() {
    let err = kiln::model::Config::from_toml(
        "[model]\nn_head = 1\nn_embd = 256\nattention_kernel = \"fused\"\n",
        &[],
    )
    .unwrap_err();
    match err {
        kiln::Error::Invalid { key, rule, .. } => {
            assert_eq!(key, "model.attention_kernel");
            assert!(rule.contains("at most 128"), "{rule}");
        }
        other => panic!("{other}"),
    }
    // The same model is fine with the reference kernels.
    kiln::model::Config::from_toml(
        "[model]\nn_head = 1\nn_embd = 256\nattention_kernel = \"reference\"\n",
        &[],
    )
    .unwrap();
}
