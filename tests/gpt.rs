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

mod gpu_step {
    use super::{init, tiny};
    use crate::common::{Tolerance, assert_close, gpu};
    use kiln::Precision;
    use kiln::cpu::gpt::{GptBatch, gpt_loss_and_grads};
    use kiln::kernels::dropout::DropoutState;
    use kiln::model::gpu::GptGpu;
    use kiln::training::{AdamWStep, LossScaling};

    /// Clears the gradients and runs forward, loss and backward of the batch last set, as one
    /// submission (no update).
    fn run_micro_batch(gpu: &kiln::Gpu, g: &GptGpu) {
        gpu.submit("micro", |enc| {
            g.record_zero_grads(enc);
            g.record_micro_batch(enc);
        })
        .unwrap();
    }

    fn batch_data(n: usize, vocab: usize, seed: usize) -> (Vec<u32>, Vec<u32>) {
        let inputs = (0..n).map(|i| ((i * 7 + seed) % vocab) as u32).collect();
        let targets = (0..n)
            .map(|i| ((i * 5 + 3 * seed + 1) % vocab) as u32)
            .collect();
        (inputs, targets)
    }

    /// A full training step through the GPU and through the CPU reference on the same weights
    /// and batch: the loss, every gradient tensor, then the weights after AdamW.
    ///
    /// Tolerances (f32 path). Loss: both sides sum ~B·T·V exp terms in f32 in different orders;
    /// 1e-5 relative. Gradients: every tensor passes through up to ~6 chained f32 reductions of
    /// length ≤ 4C or B·T (matmul, layer norm, softmax) summed in different orders (the CPU layer
    /// norm sums in f64), each contributing ~1e-7 relative of its operands; gradients of size
    /// ~1e-2 that are sums of cancelling terms of size ~1e-1 come out ~1e-6 absolute apart, so
    /// 2e-5 absolute + 1e-3 relative. Weights after one AdamW step at lr 1e-2, computed on the CPU
    /// from the same (GPU) gradients: both sides do the same f32 operations per element in the
    /// same order, so 1e-6 absolute + 1e-6 relative.
    #[test]
    fn gpu_step_matches_cpu_step() {
        let Some(gpu) = gpu(Precision::F32) else {
            return;
        };
        for (bias, micro) in [(false, 1), (true, 1), (true, 2)] {
            let model = tiny(bias);
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
            let what = format!("bias={bias} micro={micro}");

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
                    // Each micro-batch adds its own mean loss's gradient; AdamW divides by the
                    // micro-batch count.
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
                assert_close(
                    &format!("{what} grad {}", t.name),
                    &cpu_grads[r.clone()],
                    &gpu_grads[r],
                    tol,
                );
            }

            // The update, on the CPU from the GPU's gradients: they were compared above, and Adam's
            // first step divides each gradient by its own magnitude, so where |g| is near eps the
            // allowed gradient differences would show up undamped in the weights.
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

    /// A NaN in the gradients skips the update: weights and moments stay bit-identical and the
    /// skip is counted.
    #[test]
    fn nan_gradient_skips_the_step() {
        let Some(gpu) = gpu(Precision::F32) else {
            return;
        };
        let model = tiny(false);
        let vocab = 11;
        let g = GptGpu::new(gpu, &model, vocab, GptBatch { batch: 2, seq: 4 }, 1).unwrap();
        let master = init(g.layout(), 3);
        g.set_weights(gpu, &master).unwrap();
        let data = vec![batch_data(8, vocab, 0)];
        let step = AdamWStep {
            t: 1,
            lr: 1e-2,
            ..AdamWStep::new(1)
        };
        g.step(gpu, &data, &step, |_| {}).unwrap();
        let before = (g.read_master(gpu).unwrap(), g.read_moments(gpu).unwrap());
        // Run forward/backward, then poison one gradient before the update.
        g.set_step(gpu, &AdamWStep { t: 2, ..step }, 1).unwrap();
        g.set_batch(gpu, &data[0].0, &data[0].1).unwrap();
        run_micro_batch(gpu, &g);
        let wte = g.layout().get("wte.weight").unwrap().offset;
        let poisoned = g.grads().unwrap().view("poison", wte, &[1]).unwrap();
        gpu.write(&poisoned, &[f32::NAN]).unwrap();
        gpu.run_pass("update", |pass| g.record_update(pass))
            .unwrap();
        let after = (g.read_master(gpu).unwrap(), g.read_moments(gpu).unwrap());
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&before.0), bits(&after.0), "weights changed");
        assert_eq!(bits(&before.1.0), bits(&after.1.0), "first moments changed");
        assert_eq!(
            bits(&before.1.1),
            bits(&after.1.1),
            "second moments changed"
        );
        let (skipped, _, flag) = g.read_update_stats(gpu).unwrap();
        assert_eq!((skipped, flag), (1, 1));
    }

    /// Dynamic loss scaling by a power of two changes nothing in f32: the gradients come out
    /// exactly `scale` times larger (every op is linear in the loss gradient and scaling by 2^k
    /// is exact away from overflow and underflow) and AdamW divides it out again, so two steps
    /// with and without scaling leave bit-identical weights, and a clean run grows the scale
    /// after `growth_interval` steps.
    #[test]
    fn loss_scaling_is_exact_and_grows() {
        let Some(gpu) = gpu(Precision::F32) else {
            return;
        };
        let model = tiny(true);
        let vocab = 11;
        let batch = GptBatch { batch: 2, seq: 5 };
        let data = vec![batch_data(10, vocab, 1), batch_data(10, vocab, 2)];
        let run = |scaling: Option<LossScaling>| {
            let mut g = GptGpu::new(gpu, &model, vocab, batch, 2).unwrap();
            g.set_weights(gpu, &init(g.layout(), 5)).unwrap();
            if let Some(s) = scaling {
                g.enable_loss_scaling(gpu, &s).unwrap();
            }
            let mut grads = Vec::new();
            for t in 1..=3 {
                let step = AdamWStep {
                    lr: 1e-2,
                    grad_clip: 1.0,
                    ..AdamWStep::new(t)
                };
                g.step(gpu, &data, &step, |_| {}).unwrap();
                grads.push(g.read_grads(gpu).unwrap());
            }
            let scale = scaling.map(|_| g.loss_scale_state(gpu).unwrap());
            (g.read_master(gpu).unwrap(), grads, scale)
        };
        let (plain_w, plain_g, _) = run(None);
        let settings = LossScaling {
            init_scale: 1024.0,
            growth_interval: 2,
            ..LossScaling::default()
        };
        let (scaled_w, scaled_g, state) = run(Some(settings));
        // Steps 1 and 2 ran at 1024; the second clean step doubled the scale for step 3.
        for (step, (p, s)) in plain_g.iter().zip(&scaled_g).enumerate() {
            let factor = if step < 2 { 1024.0 } else { 2048.0 };
            let bad = p.iter().zip(s).position(|(p, s)| p * factor != *s);
            assert_eq!(bad, None, "step {}: gradient not exactly scaled", step + 1);
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&plain_w),
            bits(&scaled_w),
            "scaling changed the weights"
        );
        assert_eq!(state, Some((2048.0, 1)));
    }

    /// An f16 run whose scale is far too large overflows, skips those steps without touching the
    /// weights, halves the scale each time, and then trains.
    #[test]
    fn overflowing_scale_backs_off() {
        let Some(gpu) = gpu(Precision::F16) else {
            return;
        };
        let model = tiny(false);
        let vocab = 11;
        let mut g = GptGpu::new(gpu, &model, vocab, GptBatch { batch: 2, seq: 4 }, 1).unwrap();
        g.set_weights(gpu, &init(g.layout(), 3)).unwrap();
        // 2^24 times a gradient of order 1e-1 is far past f16's 65504.
        g.enable_loss_scaling(
            gpu,
            &LossScaling {
                init_scale: 16_777_216.0,
                ..LossScaling::default()
            },
        )
        .unwrap();
        let data = vec![batch_data(8, vocab, 0)];
        let start = g.read_master(gpu).unwrap();
        let mut skipped_before = 0;
        let mut scale = 16_777_216.0;
        let mut trained = false;
        for t in 1..=24 {
            let step = AdamWStep {
                lr: 1e-2,
                ..AdamWStep::new(t)
            };
            g.step(gpu, &data, &step, |_| {}).unwrap();
            let (skipped, _, flag) = g.read_update_stats(gpu).unwrap();
            let (new_scale, _) = g.loss_scale_state(gpu).unwrap();
            if flag != 0 {
                assert_eq!(skipped, skipped_before + 1, "step {t}: skip not counted");
                assert_eq!(new_scale, scale / 2.0, "step {t}: scale not halved");
                assert!(
                    !trained,
                    "step {t}: overflow after a clean step at a lower scale"
                );
                assert_eq!(
                    g.read_master(gpu).unwrap(),
                    start,
                    "step {t}: weights changed"
                );
            } else {
                trained = true;
                assert_eq!(new_scale, scale, "step {t}: a clean step changed the scale");
            }
            skipped_before = skipped;
            scale = new_scale;
        }
        assert!(
            skipped_before >= 3,
            "only {skipped_before} overflowing steps at 2^24"
        );
        assert!(trained, "still overflowing at scale {scale}");
        assert_ne!(
            g.read_master(gpu).unwrap(),
            start,
            "the clean steps did not train"
        );
    }

    /// With dropout on (p = 0.2 on the attention probabilities and both residual branches), the
    /// backward must use the forward's masks: the directional derivative of the loss along a
    /// random direction d, by central differences of two forwards with the same mask, matches
    /// grads·d. Tolerance: the f32 loss (~2.5) is rounded at ~3e-7, so the quotient with h = 1e-3
    /// carries ~3e-4 of noise, and truncation is O(h²); 1e-3 absolute + 1e-2 relative. The same
    /// check with the gradients of another mask must fail, and turning dropout off must change
    /// the loss.
    #[test]
    fn dropout_backward_uses_the_forward_masks() {
        let Some(gpu) = gpu(Precision::F32) else {
            return;
        };
        let model = kiln::model::ModelConfig {
            dropout: 0.2,
            ..tiny(true)
        };
        let vocab = 11;
        let g = GptGpu::new(gpu, &model, vocab, GptBatch { batch: 2, seq: 6 }, 1).unwrap();
        let w = init(g.layout(), 8);
        let (inputs, targets) = batch_data(12, vocab, 4);
        let run = |w: &[f32], dropout: Option<DropoutState>| {
            g.set_weights(gpu, w).unwrap();
            g.set_batch(gpu, &inputs, &targets).unwrap();
            if let Some(d) = dropout {
                g.set_dropout(gpu, &d).unwrap();
            }
            run_micro_batch(gpu, &g);
            (g.read_loss(gpu).unwrap(), g.read_grads(gpu).unwrap())
        };
        let mask = DropoutState::new(0.2, 1234);
        let (loss, grads) = run(&w, Some(mask));
        let (loss_off, _) = run(&w, None);
        assert_ne!(loss, loss_off, "dropout did not change the loss");
        let (_, other_grads) = run(&w, Some(DropoutState::new(0.2, 4321)));

        let d = crate::common::random(w.len(), 77);
        let h = 1e-3f32;
        let shifted =
            |sign: f32| -> Vec<f32> { w.iter().zip(&d).map(|(w, d)| w + sign * h * d).collect() };
        let numeric = (f64::from(run(&shifted(1.0), Some(mask)).0)
            - f64::from(run(&shifted(-1.0), Some(mask)).0))
            / (2.0 * f64::from(h));
        let along = |g: &[f32]| -> f64 {
            g.iter()
                .zip(&d)
                .map(|(g, d)| f64::from(*g) * f64::from(*d))
                .sum()
        };
        let tol = |a: f64| 1e-3 + 1e-2 * a.abs();
        let analytic = along(&grads);
        assert!(
            (numeric - analytic).abs() <= tol(analytic),
            "directional derivative: finite differences {numeric}, backward {analytic}"
        );
        let wrong = along(&other_grads);
        assert!(
            (numeric - wrong).abs() > tol(wrong),
            "another mask's gradient also passed: {numeric} vs {wrong}"
        );
    }
}
