//! LoRA adapters and frozen tensors: the CPU reference's adapter gradients against finite
//! differences, the GPU step against the CPU step with adapters (GPT-2 and Llama, f32), and
//! frozen tensors staying bit-identical through training steps.

mod common;

use common::gradcheck::{GradCheck, check_gradient};
use common::{Tolerance, assert_close, gpu, random};
use kiln::Precision;
use kiln::cpu::dropout::DropoutState;
use kiln::cpu::gpt::{GptBatch, gpt_loss_and_grads, gpt_loss_and_grads_lora_dropout};
use kiln::finetune::layout::adapted;
use kiln::finetune::{Adaptation, LoraConfig, LoraTarget};
use kiln::model::gpu::GptGpu;
use kiln::model::{ArchKind, Component, ModelConfig, ParamKind, ParamLayout};
use kiln::training::AdamWStep;

fn gpt2() -> ModelConfig {
    ModelConfig {
        n_layer: 2,
        n_head: 2,
        n_embd: 8,
        block_size: 6,
        bias: true,
        ..ModelConfig::default()
    }
}

/// Grouped-query attention (2 key/value heads for 4 query heads), SwiGLU 24 wide.
fn llama() -> ModelConfig {
    ModelConfig {
        arch: ArchKind::Llama,
        n_layer: 2,
        n_head: 4,
        n_kv_head: Some(2),
        n_embd: 16,
        block_size: 6,
        mlp_hidden: Some(24),
        ..ModelConfig::default()
    }
}

fn lora(rank: usize) -> Adaptation {
    lora_dropping(rank, 0.0)
}

/// [`lora`] with adapter dropout `p`.
fn lora_dropping(rank: usize, p: f32) -> Adaptation {
    Adaptation {
        freeze: Vec::new(),
        lora: Some(LoraConfig {
            rank,
            alpha: 2.0 * rank as f64,
            dropout: p,
            targets: LoraTarget::ALL.to_vec(),
        }),
    }
}

/// The largest `|e − a| / (abs + rel·|e|)` over the elements: below 1 is within `tol`.
fn worst_ratio(expected: &[f32], actual: &[f32], tol: Tolerance) -> f32 {
    expected
        .iter()
        .zip(actual)
        .map(|(&e, &a)| (e - a).abs() / (tol.abs + tol.rel * e.abs()))
        .fold(0.0, f32::max)
}

/// Small random weights, norm gains near 1, token rows of RMS ~1 (RMSNorm's curvature grows as
/// 1/rms², see tests/llama.rs), and adapters of the size a trained B reaches (B is not zero
/// here, or A's gradient would be zero and prove nothing).
fn init(layout: &ParamLayout, seed: u64) -> Vec<f32> {
    let mut p: Vec<f32> = random(layout.buffer_len(), seed)
        .iter()
        .map(|x| 0.3 * x)
        .collect();
    for t in layout.tensors() {
        let r = &mut p[t.offset..t.offset + t.len()];
        if t.component == Component::Norm && t.kind == ParamKind::Weight {
            r.iter_mut().for_each(|x| *x += 1.0);
        }
        if t.name == "model.embed_tokens.weight" {
            r.iter_mut().for_each(|x| *x *= 4.0);
        }
    }
    p
}

fn data(n: usize, vocab: usize, seed: usize) -> (Vec<u32>, Vec<u32>) {
    let inputs = (0..n).map(|i| ((i * 7 + seed) % vocab) as u32).collect();
    let targets = (0..n)
        .map(|i| ((i * 5 + 3 * seed + 1) % vocab) as u32)
        .collect();
    (inputs, targets)
}

/// The adapter tensors' elements, concatenated in layout order, and a function writing such a
/// vector back into a full parameter buffer.
fn adapter_ranges(layout: &ParamLayout) -> Vec<std::ops::Range<usize>> {
    layout
        .tensors()
        .iter()
        .filter(|t| t.name.contains(".lora_"))
        .map(|t| t.offset..t.offset + t.len())
        .collect()
}

fn gather(v: &[f32], ranges: &[std::ops::Range<usize>]) -> Vec<f32> {
    ranges.iter().flat_map(|r| v[r.clone()].to_vec()).collect()
}

fn scatter(into: &mut [f32], from: &[f32], ranges: &[std::ops::Range<usize>]) {
    let mut i = 0;
    for r in ranges {
        into[r.clone()].copy_from_slice(&from[i..i + r.len()]);
        i += r.len();
    }
}

/// The CPU reference's gradients of every A and B against central differences of the loss,
/// on both architectures; then the same check must reject B's gradient with alpha/rank left
/// out (a plausible mistake) and A's gradient with one element off.
#[test]
fn cpu_adapter_gradients_match_finite_differences() {
    for (model, vocab) in [(gpt2(), 7), (llama(), 11)] {
        let layout = adapted(&model, vocab, 1, &lora(3)).unwrap();
        assert_eq!(layout.lora_scale(), Some(2.0));
        let params = init(&layout, 5);
        let batch = GptBatch { batch: 2, seq: 5 };
        let (inputs, mut targets) = data(10, vocab, 1);
        targets[3] = u32::MAX;
        let mut grads = vec![0.0; params.len()];
        gpt_loss_and_grads(
            &mut grads, &params, &layout, &model, vocab, &inputs, &targets, &batch, 1.0, false,
        )
        .unwrap();
        let ranges = adapter_ranges(&layout);
        let x = gather(&params, &ranges);
        let analytic = gather(&grads, &ranges);
        assert!(analytic.iter().all(|g| g.is_finite()));
        assert!(analytic.iter().filter(|g| **g != 0.0).count() > analytic.len() / 2);
        let loss = |a: &[f32]| {
            let mut p = params.clone();
            scatter(&mut p, a, &ranges);
            let mut g = vec![0.0; p.len()];
            f64::from(
                gpt_loss_and_grads(
                    &mut g, &p, &layout, &model, vocab, &inputs, &targets, &batch, 1.0, false,
                )
                .unwrap(),
            )
        };
        // As in tests/gpt.rs: the f32 loss carries ~2e-7 of rounding, ~2e-5 in the quotient
        // with h = 1e-2; truncation is O(h²) relative. 1e-4 absolute + 1e-2 relative.
        let fd = GradCheck {
            h: 1e-2,
            abs: 1e-4,
            rel: 1e-2,
        };
        let what = format!("{:?} adapters", model.arch);
        check_gradient(&what, &x, &analytic, loss, fd).unwrap();

        // B's gradient without the alpha/rank factor (half of the right one here).
        let mut wrong = grads.clone();
        let b = layout.get(&adapter_b(&model)).unwrap();
        for g in &mut wrong[b.offset..b.offset + b.len()] {
            *g /= 2.0;
        }
        assert!(check_gradient("unscaled B", &x, &gather(&wrong, &ranges), loss, fd).is_err());
        let mut wrong = analytic.clone();
        let big = (0..wrong.len())
            .max_by(|&i, &j| wrong[i].abs().total_cmp(&wrong[j].abs()))
            .unwrap();
        wrong[big] += 0.05 * wrong[big].abs().max(1e-2);
        assert!(check_gradient("one element off", &x, &wrong, loss, fd).is_err());
    }
}

/// With adapter dropout (p = 0.3, one fixed mask): the CPU reference's gradients of every A and
/// B against central differences of the loss under the same mask, on both architectures. The
/// adapters of layer 0 get their gradient through layer 1's linears, so this also checks the
/// gradient to x going back through each adapter's mask. The checker must reject the gradients
/// of the same loss without dropout (a dropout wired into the forward only) and one element
/// off. Tolerances as in `cpu_adapter_gradients_match_finite_differences`.
#[test]
fn cpu_adapter_gradients_with_dropout_match_finite_differences() {
    for (model, vocab) in [(gpt2(), 7), (llama(), 11)] {
        let layout = adapted(&model, vocab, 1, &lora_dropping(3, 0.3)).unwrap();
        let params = init(&layout, 5);
        let batch = GptBatch { batch: 2, seq: 5 };
        let (inputs, mut targets) = data(10, vocab, 1);
        targets[3] = u32::MAX;
        let mask = DropoutState::new(0.3, DropoutState::key_for(9, 4, 0));
        let run = |p: &[f32], g: &mut [f32], dropping: bool| {
            if dropping {
                gpt_loss_and_grads_lora_dropout(
                    g, p, &layout, &model, vocab, &inputs, &targets, &batch, 1.0, false, &mask,
                )
            } else {
                gpt_loss_and_grads(
                    g, p, &layout, &model, vocab, &inputs, &targets, &batch, 1.0, false,
                )
            }
            .unwrap()
        };
        let mut grads = vec![0.0; params.len()];
        let dropped_loss = run(&params, &mut grads, true);
        let mut plain = vec![0.0; params.len()];
        let plain_loss = run(&params, &mut plain, false);
        assert_ne!(dropped_loss, plain_loss, "the mask changes nothing");
        let ranges = adapter_ranges(&layout);
        let x = gather(&params, &ranges);
        let analytic = gather(&grads, &ranges);
        assert!(analytic.iter().all(|g| g.is_finite()));
        assert!(analytic.iter().filter(|g| **g != 0.0).count() > analytic.len() / 2);
        let loss = |a: &[f32]| {
            let mut p = params.clone();
            scatter(&mut p, a, &ranges);
            let mut g = vec![0.0; p.len()];
            f64::from(run(&p, &mut g, true))
        };
        let fd = GradCheck {
            h: 1e-2,
            abs: 1e-4,
            rel: 1e-2,
        };
        let what = format!("{:?} adapters with dropout", model.arch);
        let worst = check_gradient(&what, &x, &analytic, loss, fd).unwrap();
        eprintln!("{what}: worst error {worst:.3} of the allowed");

        let unmasked = gather(&plain, &ranges);
        assert!(check_gradient("no dropout in the backward", &x, &unmasked, loss, fd).is_err());
        let mut wrong = analytic.clone();
        let big = (0..wrong.len())
            .max_by(|&i, &j| wrong[i].abs().total_cmp(&wrong[j].abs()))
            .unwrap();
        wrong[big] += 0.05 * wrong[big].abs().max(1e-2);
        assert!(check_gradient("one element off", &x, &wrong, loss, fd).is_err());
    }
}

fn adapter_b(model: &ModelConfig) -> String {
    match model.arch {
        ArchKind::Gpt2 => "h.1.mlp.c_fc.lora_B.weight".into(),
        ArchKind::Llama => "model.layers.0.self_attn.qkv_proj.lora_B.weight".into(),
    }
}

/// One training step through the GPU and through the CPU reference, with adapters on every
/// target and the base frozen: the loss, the gradient of every A and B, the adapters after
/// AdamW, and every base tensor bit-identical after the step.
///
/// Tolerances (f32), as in tests/gpt.rs's whole step: the loss 1e-5 relative (the same sums in
/// other orders); gradients 2e-5 absolute + 1e-3 relative (up to ~6 chained f32 reductions of
/// length ≤ 4C or B·T in other orders, plus the adapters' two thin products, each ~1e-7
/// relative of its operands); the update on the CPU from the GPU's gradients 1e-6 (the same
/// f32 operations per element).
#[test]
fn gpu_step_with_adapters_matches_cpu_step() {
    let Some(gpu) = gpu(Precision::F32) else {
        return;
    };
    for (model, vocab) in [(gpt2(), 11), (llama(), 13)] {
        let what = format!("{:?}", model.arch);
        let batch = GptBatch { batch: 3, seq: 6 };
        let g = GptGpu::adapted(gpu, &model, &lora(2), vocab, batch, 1).unwrap();
        let layout = g.layout().clone();
        let tn = layout.trainable_len();
        assert!(tn < layout.buffer_len(), "{what}: the base must be frozen");
        let master = init(&layout, 2);
        g.set_weights(gpu, &master).unwrap();
        let micro = vec![data(18, vocab, 0)];
        let step = AdamWStep {
            t: 1,
            lr: 1e-2,
            weight_decay: 0.1,
            grad_clip: 0.0,
            ..AdamWStep::new(1)
        };
        g.step(gpu, &micro, &step, |_| {}).unwrap();
        let mut cpu_grads = vec![0.0; master.len()];
        let (inp, tgt) = &micro[0];
        let cpu_loss = gpt_loss_and_grads(
            &mut cpu_grads,
            &master,
            &layout,
            &model,
            vocab,
            inp,
            tgt,
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
        assert_eq!(
            gpu_grads.len(),
            tn,
            "{what}: gradients for the adapters only"
        );
        let tol = Tolerance {
            abs: 2e-5,
            rel: 1e-3,
        };
        for t in &layout.tensors()[..layout.trainable_count()] {
            assert!(t.name.contains(".lora_"), "{what}: {} trains", t.name);
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
        let segments = layout.trainable_layout().adamw_segments();
        let (mut w, mut working, mut m, mut v, mut skipped) = (
            master[..tn].to_vec(),
            vec![0.0; tn],
            vec![0.0; tn],
            vec![0.0; tn],
            0,
        );
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
            &step,
        )
        .unwrap();
        let after = g.read_master(gpu).unwrap();
        let exact = Tolerance {
            abs: 1e-6,
            rel: 1e-6,
        };
        assert_close(
            &format!("{what} adapters after AdamW"),
            &w,
            &after[..tn],
            exact,
        );
        assert!(
            w.iter().zip(&master).any(|(a, b)| a != b),
            "{what}: no update"
        );
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let working = g.read_params(gpu).unwrap();
        assert_eq!(
            bits(&working[tn..]),
            bits(&master[tn..]),
            "{what}: base moved"
        );
        assert_eq!(
            bits(&after[tn..]),
            bits(&master[tn..]),
            "{what}: base moved"
        );
    }
}

/// One training step of two micro-batches with adapter dropout (p = 0.25, dropout seed 7, step
/// 3) through the GPU and through the CPU reference given the same masks (key
/// `key_for(7, 3, micro)`), on both architectures, f32: the last micro-batch's loss and the
/// accumulated gradient of every A and B, within the tolerances of
/// `gpu_step_with_adapters_matches_cpu_step` (the masks are exact: an element is kept or not on
/// both sides by the same integer hash, and the kept ones are scaled by the same f32). The
/// gradients must be far from the no-dropout reference's (else the masks did nothing), and an
/// evaluation pass afterwards must drop nothing (its loss is the CPU's without dropout). Per
/// adapted linear the step records three more dispatches than with dropout 0 (the dropped
/// input in the forward, again in the backward, and the mask on dX).
#[test]
fn gpu_step_with_adapter_dropout_matches_cpu_step() {
    let Some(gpu) = gpu(Precision::F32) else {
        return;
    };
    let p = 0.25;
    for (model, vocab) in [(gpt2(), 11), (llama(), 13)] {
        let what = format!("{:?} lora.dropout {p}", model.arch);
        let batch = GptBatch { batch: 3, seq: 6 };
        let mut g = GptGpu::adapted(gpu, &model, &lora_dropping(2, p), vocab, batch, 2).unwrap();
        g.set_dropout_seed(7);
        // Counted on a device with the fixed variant rule: measured choices depend on timing
        // and on each operand's vec4 alignment, which the dropping model's extra buffers move,
        // so under autotuning the two models may pick variants of different dispatch counts.
        let fixed = kiln::Gpu::with_options(&kiln::GpuOptions {
            adapter: None,
            precision: kiln::PrecisionChoice::F32,
        })
        .unwrap();
        fixed.tuning().set_enabled(false);
        let dropping = GptGpu::adapted(&fixed, &model, &lora_dropping(2, p), vocab, batch, 2);
        let plain = GptGpu::adapted(&fixed, &model, &lora(2), vocab, batch, 2).unwrap();
        let adapted_linears = 4 * model.n_layer as u64;
        assert_eq!(
            dropping.unwrap().dispatches_per_step(&fixed, 2),
            plain.dispatches_per_step(&fixed, 2) + 2 * 3 * adapted_linears,
            "{what}: dispatches"
        );
        let layout = g.layout().clone();
        let tn = layout.trainable_len();
        let master = init(&layout, 2);
        g.set_weights(gpu, &master).unwrap();
        let micro = vec![data(18, vocab, 0), data(18, vocab, 3)];
        let step = AdamWStep {
            t: 3,
            lr: 1e-2,
            weight_decay: 0.1,
            grad_clip: 0.0,
            ..AdamWStep::new(1)
        };
        g.step(gpu, &micro, &step, |_| {}).unwrap();
        let gpu_loss = g.read_loss(gpu).unwrap();
        let gpu_grads = g.read_grads(gpu).unwrap();
        let (mut cpu_grads, mut undropped) = (vec![0.0; master.len()], vec![0.0; master.len()]);
        let mut cpu_loss = 0.0;
        for (i, (inp, tgt)) in micro.iter().enumerate() {
            let mask = DropoutState::new(p, DropoutState::key_for(7, 3, i as u32));
            cpu_loss = gpt_loss_and_grads_lora_dropout(
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
                &mask,
            )
            .unwrap();
            gpt_loss_and_grads(
                &mut undropped,
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
        let loss_err = (gpu_loss - cpu_loss).abs() / cpu_loss.abs();
        eprintln!("{what}: loss relative difference {loss_err:e} (tolerance 1e-5)");
        assert!(
            loss_err <= 1e-5,
            "{what}: loss GPU {gpu_loss} CPU {cpu_loss}"
        );
        let tol = Tolerance {
            abs: 2e-5,
            rel: 1e-3,
        };
        let mut worst: f32 = 0.0;
        let mut far: f32 = 0.0;
        for t in &layout.tensors()[..layout.trainable_count()] {
            let r = t.offset..t.offset + t.len();
            assert_close(
                &format!("{what} grad {}", t.name),
                &cpu_grads[r.clone()],
                &gpu_grads[r.clone()],
                tol,
            );
            worst = worst.max(worst_ratio(
                &cpu_grads[r.clone()],
                &gpu_grads[r.clone()],
                tol,
            ));
            far = far.max(worst_ratio(&undropped[r.clone()], &gpu_grads[r], tol));
        }
        eprintln!(
            "{what}: worst gradient difference {worst:.3} of the tolerance; against the \
             no-dropout reference {far:.1}"
        );
        assert!(far > 10.0, "{what}: the masks changed little ({far})");

        // Evaluation after the step: dropout off, the adapters included.
        let params = g.read_params(gpu).unwrap();
        let (inp, tgt) = &micro[0];
        g.set_batch(gpu, inp, tgt).unwrap();
        gpu.submit("eval", |encoder| g.record_eval(encoder))
            .unwrap();
        let eval = g.read_loss(gpu).unwrap();
        let mut scratch = vec![0.0; params.len()];
        let reference = gpt_loss_and_grads(
            &mut scratch,
            &params,
            &layout,
            &model,
            vocab,
            inp,
            tgt,
            &batch,
            1.0,
            false,
        )
        .unwrap();
        assert!(
            (eval - reference).abs() <= 1e-5 * reference.abs(),
            "{what}: evaluation GPU {eval} CPU without dropout {reference}"
        );
        assert!(tn < layout.buffer_len());
    }
}

/// `finetune.freeze` on the GPU: the trainable tensors' gradients equal the CPU reference's
/// (same tolerance as above), the frozen ones have none, and after 5 steps every frozen tensor
/// is bit-identical to where it started while the others moved.
#[test]
fn frozen_tensors_get_no_gradient_and_stay_bit_identical() {
    let Some(gpu) = gpu(Precision::F32) else {
        return;
    };
    let cases = [
        (gpt2(), vec!["embedding", "layers.0"]),
        (llama(), vec!["layers.1.attn", "head", "final_norm"]),
    ];
    for (model, patterns) in cases {
        let what = format!("{:?} {patterns:?}", model.arch);
        let vocab = 11;
        let adapt = Adaptation {
            freeze: patterns.iter().map(|s| s.to_string()).collect(),
            lora: None,
        };
        let batch = GptBatch { batch: 2, seq: 6 };
        let g = GptGpu::adapted(gpu, &model, &adapt, vocab, batch, 1).unwrap();
        let layout = g.layout().clone();
        let (tn, count) = (layout.trainable_len(), layout.trainable_count());
        let frozen: Vec<_> = layout.tensors()[count..].iter().map(|t| &t.name).collect();
        assert!(!frozen.is_empty() && count > 0, "{what}");
        let master = init(&layout, 4);
        g.set_weights(gpu, &master).unwrap();
        let micro = vec![data(12, vocab, 2)];
        let step = |t| AdamWStep {
            t,
            lr: 1e-2,
            weight_decay: 0.1,
            ..AdamWStep::new(1)
        };
        g.step(gpu, &micro, &step(1), |_| {}).unwrap();
        let mut cpu = vec![0.0; master.len()];
        let (inp, tgt) = &micro[0];
        gpt_loss_and_grads(
            &mut cpu, &master, &layout, &model, vocab, inp, tgt, &batch, 1.0, false,
        )
        .unwrap();
        let gpu_grads = g.read_grads(gpu).unwrap();
        assert_eq!(gpu_grads.len(), tn);
        for t in &layout.tensors()[..count] {
            let r = t.offset..t.offset + t.len();
            let tol = Tolerance {
                abs: 2e-5,
                rel: 1e-3,
            };
            assert_close(
                &format!("{what} {}", t.name),
                &cpu[r.clone()],
                &gpu_grads[r],
                tol,
            );
        }
        for t in 2..=5 {
            g.step(gpu, &micro, &step(t), |_| {}).unwrap();
        }
        let after = g.read_master(gpu).unwrap();
        let working = g.read_params(gpu).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&after[tn..]),
            bits(&master[tn..]),
            "{what}: {frozen:?} moved"
        );
        assert_eq!(
            bits(&working[tn..]),
            bits(&master[tn..]),
            "{what}: {frozen:?} moved"
        );
        for t in &layout.tensors()[..count] {
            let r = t.offset..t.offset + t.len();
            assert_ne!(
                bits(&after[r.clone()]),
                bits(&master[r]),
                "{what}: {} stuck",
                t.name
            );
        }
    }
}

/// Bad settings are refused with the key and the rule: rank 0, a rank above a layer's smaller
/// dimension, an adapter dropout outside [0, 1), nothing left to train, a pattern that matches nothing.
#[test]
fn bad_adaptations_are_refused() {
    let m = gpt2();
    for (adapt, key, words) in [
        (lora(0), "lora.rank", "at least 1"),
        (lora(9), "lora.rank", "at most 8"),
        (lora_dropping(2, 1.0), "lora.dropout", "[0, 1)"),
        (lora_dropping(2, -0.1), "lora.dropout", "[0, 1)"),
        (lora_dropping(2, f32::NAN), "lora.dropout", "[0, 1)"),
        (
            Adaptation {
                freeze: vec!["embedding".into(), "layers.0-1".into(), "final_norm".into()],
                lora: None,
            },
            "finetune.freeze",
            "nothing would train",
        ),
        (
            Adaptation {
                freeze: vec!["layers.0.ffn".into()],
                lora: None,
            },
            "finetune.freeze",
            "unknown block part",
        ),
    ] {
        let e = adapted(&m, 7, 1, &adapt).unwrap_err().to_string();
        assert!(e.contains(key) && e.contains(words), "{e}");
    }
}

/// A Llama adapter in PEFT's layout: one PEFT adapter per HF projection of kiln's fused q|k|v
/// and gate|up (the same lora_A, each its rows of lora_B), read back bit for bit; an adapter
/// whose fused projections disagree on lora_A is refused; and the merged weights give the
/// logits of base + adapter to 1e-5 (f32; see tests/finetune.rs for the GPT-2 case through
/// the command line).
#[test]
fn llama_adapter_round_trips_through_peft_names_and_merges() {
    use kiln::finetune::peft::{ADAPTER_MODEL_FILE, attach, load_adapter, write_adapter};
    use kiln::quant::weights::ModelWeights;
    let Some(gpu) = gpu(Precision::F32) else {
        return;
    };
    let model = llama();
    let vocab = 13;
    let mut config = kiln::Config {
        model: model.clone(),
        ..Default::default()
    };
    config.lora = lora(3).lora;
    let layout = kiln::model::ParamLayout::for_config(&config, vocab, 1).unwrap();
    let values = init(&layout, 9);
    let dir = std::env::temp_dir().join(format!("kiln-lora-llama-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    write_adapter(&dir, &config, &layout, &values).unwrap();
    let bytes = std::fs::read(dir.join(ADAPTER_MODEL_FILE)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let p = "base_model.model.model.layers.1";
    for (name, shape) in [
        ("self_attn.q_proj.lora_A", [3, 16]),
        ("self_attn.q_proj.lora_B", [16, 3]),
        ("self_attn.k_proj.lora_B", [8, 3]),
        ("self_attn.v_proj.lora_B", [8, 3]),
        ("self_attn.o_proj.lora_B", [16, 3]),
        ("mlp.gate_proj.lora_B", [24, 3]),
        ("mlp.up_proj.lora_A", [3, 16]),
        ("mlp.down_proj.lora_A", [3, 24]),
    ] {
        let t = st.tensor(&format!("{p}.{name}.weight")).unwrap();
        assert_eq!(t.shape(), shape, "{name}");
    }
    let adapter = load_adapter(&dir, &model, vocab).unwrap();
    assert_eq!(adapter.tensors.len(), layout.trainable_count());
    for (name, _, v) in &adapter.tensors {
        let t = layout.get(name).unwrap();
        assert_eq!(
            v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            values[t.offset..t.offset + t.len()]
                .iter()
                .map(|x| x.to_bits())
                .collect::<Vec<_>>(),
            "{name}"
        );
    }

    // Base + adapter against the merged weights, on the same tokens.
    let plain = kiln::model::ParamLayout::gpt(&model, vocab, 1).unwrap();
    let base_values = kiln::finetune::layout::move_by_name(&values, &layout, &plain).unwrap();
    let base = ModelWeights {
        folder: dir.clone(),
        config: kiln::Config {
            model: model.clone(),
            ..Default::default()
        },
        tokenizer_json: String::new(),
        vocab,
        layout: plain.clone(),
        values: base_values,
        quantized: Default::default(),
        settings: None,
    };
    let with = attach(&base, &adapter).unwrap();
    let merged = ModelWeights {
        values: kiln::finetune::lora::merge(&with.layout, &with.values, &plain).unwrap(),
        ..base.clone()
    };
    let batch = GptBatch { batch: 2, seq: 6 };
    let tokens: Vec<u32> = (0..12).map(|i| (i * 5 % vocab) as u32).collect();
    let logits = |w: &ModelWeights| {
        let m = GptGpu::inference(gpu, w, batch).unwrap();
        m.set_batch(gpu, &tokens, &tokens).unwrap();
        gpu.submit("forward", |encoder| m.record_logits(encoder))
            .unwrap();
        m.read_logits(gpu).unwrap()
    };
    let (x, y, z) = (logits(&with), logits(&merged), logits(&base));
    let diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f32::max)
    };
    assert!(
        diff(&x, &y) <= 1e-5,
        "merged vs base + adapter: {:e}",
        diff(&x, &y)
    );
    assert!(diff(&x, &z) > 1e-3, "the adapter must change the logits");

    // k_proj's lora_A no longer equals q_proj's: not one rank-r update of the fused layer.
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            let v = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (n, t.shape().to_vec(), v)
        })
        .collect();
    let k = format!("{p}.self_attn.k_proj.lora_A.weight");
    tensors.iter_mut().find(|t| t.0 == k).unwrap().2[0] += 0.5;
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, v)| {
            let b: &[u8] = bytemuck::cast_slice(v);
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    std::fs::write(
        dir.join(ADAPTER_MODEL_FILE),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    let e = load_adapter(&dir, &model, vocab).unwrap_err().to_string();
    assert!(e.contains("k_proj.lora_A") && e.contains("differs"), "{e}");
}

/// The one-token decoder adds the adapters too: generating from a GPT-2 with adapters through
/// the key/value cache gives the tokens of recomputing the whole context for every token,
/// greedy and sampled (a sample flips only if the two paths' probabilities straddle the draw).
#[test]
fn decoder_with_adapters_equals_recomputing() {
    use kiln::generate::Generator;
    use kiln::quant::weights::ModelWeights;
    use kiln::{GpuOptions, PrecisionChoice, SamplingParams};
    let chars = "abcdefghijk ";
    let vocab = chars.len();
    let model = ModelConfig {
        block_size: 16,
        ..gpt2()
    };
    let mut config = kiln::Config {
        model,
        ..Default::default()
    };
    config.lora = lora(2).lora;
    let layout = kiln::model::ParamLayout::for_config(&config, vocab, 1).unwrap();
    let weights = ModelWeights {
        folder: "test".into(),
        config,
        tokenizer_json: serde_json::json!({"type": "char", "chars": chars}).to_string(),
        vocab,
        values: init(&layout, 12),
        layout,
        quantized: Default::default(),
        settings: None,
    };
    let options = GpuOptions {
        adapter: None,
        precision: PrecisionChoice::F32,
    };
    let mut g = Generator::from_model_weights(&weights, &options).unwrap();
    for temperature in [0.0, 1.0] {
        let params = SamplingParams {
            temperature,
            max_tokens: 24,
            seed: 5,
            ..SamplingParams::default()
        };
        let mut ids = Vec::new();
        for kv in [true, false] {
            g.set_kv_cache(kv);
            assert_eq!(g.uses_kv_cache(), kv);
            ids.push(g.generate("abc", &params, |_| {}).unwrap().ids);
        }
        assert_eq!(ids[0], ids[1], "temperature {temperature}");
    }
}
