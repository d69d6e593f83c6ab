//! Mixture-of-experts models end to end: the GPU training step against the CPU reference (GPT-2
//! and Llama, dropless and with capacity drops, one and two micro-batches), bit-identical
//! repeated runs, the statistics, the parameter report, decoding and checkpoints.

mod common;

use common::{Tolerance, assert_close, gpu, random};
use kiln::Precision;
use kiln::cpu::gpt::{GptBatch, gpt_loss_grads_and_moe};
use kiln::model::gpu::GptGpu;
use kiln::model::{ArchKind, Component, ModelConfig, MoeConfig, ParamKind, ParamLayout};
use kiln::training::AdamWStep;

fn moe(capacity: Option<f64>, every: usize) -> MoeConfig {
    MoeConfig {
        n_experts: 4,
        top_k: 2,
        capacity_factor: capacity,
        dropless: capacity.is_none(),
        aux_loss_coef: 0.5,
        router_z_loss_coef: 0.25,
        every,
    }
}

fn gpt(moe: MoeConfig) -> ModelConfig {
    ModelConfig {
        n_layer: 2,
        n_head: 2,
        n_embd: 8,
        block_size: 6,
        mlp_hidden: Some(12),
        moe: Some(moe),
        ..ModelConfig::default()
    }
}

fn llama(moe: MoeConfig) -> ModelConfig {
    ModelConfig {
        arch: ArchKind::Llama,
        n_layer: 2,
        n_head: 4,
        n_kv_head: Some(2),
        n_embd: 16,
        block_size: 6,
        mlp_hidden: Some(12),
        moe: Some(moe),
        ..ModelConfig::default()
    }
}

/// Small random weights, norm gains near 1, token embeddings of RMS ~1 (see tests/llama.rs),
/// routers 5× larger so the experts' probabilities are well apart (no near-tie can make the
/// GPU and the CPU choose differently).
fn init(layout: &ParamLayout, seed: u64) -> Vec<f32> {
    let mut p: Vec<f32> = random(layout.buffer_len(), seed)
        .iter()
        .map(|x| 0.3 * x)
        .collect();
    for t in layout.tensors() {
        let scale = if Some(t) == layout.token_table() {
            4.0
        } else if t.name.contains("router") || t.name.contains("moe.gate") {
            5.0
        } else {
            1.0
        };
        for x in &mut p[t.offset..t.offset + t.len()] {
            *x *= scale;
            if t.component == Component::Norm && t.kind == ParamKind::Weight {
                *x += 1.0;
            }
        }
    }
    p
}

fn batch_data(n: usize, vocab: usize, seed: usize) -> (Vec<u32>, Vec<u32>) {
    let inputs = (0..n).map(|i| ((i * 7 + seed) % vocab) as u32).collect();
    let targets = (0..n)
        .map(|i| ((i * 5 + 3 * seed + 1) % vocab) as u32)
        .collect();
    (inputs, targets)
}

/// A full training step through the GPU and through the CPU reference on the same weights and
/// batches: the loss, every gradient tensor (the auxiliary losses' included), each routed
/// layer's statistics, then the weights after AdamW.
///
/// Tolerances (f32), those of the dense whole-step tests (tests/gpt.rs, tests/llama.rs) for the
/// same reasons: loss 1e-5 relative; gradients 2e-5 absolute plus 1e-3 relative (chains of
/// ≤ ~6 f32 reductions in different orders). The routing adds none longer: the softmax over E,
/// sums over K slots, the gate gradient over C channels, the expert products over R ≤ B·T rows.
/// Routing decisions (top-k, counts, drops) must agree exactly, and do when no two
/// probabilities are within rounding of each other (the routers' scale in `init`). Statistics:
/// fractions are exact ratios of equal counts; P_e, the aux loss and the z-loss are f32 sums of
/// B·T terms of driver exp/log results: 1e-5 relative.
#[test]
fn moe_gpu_step_matches_cpu_step() {
    let Some(gpu) = gpu(Precision::F32) else {
        return;
    };
    let cases = [
        ("gpt2 dropless", gpt(moe(None, 1)), 1),
        ("gpt2 capacity 1.0", gpt(moe(Some(1.0), 1)), 1),
        ("gpt2 every 2, two micro-batches", gpt(moe(None, 2)), 2),
        ("llama dropless", llama(moe(None, 1)), 1),
        (
            "llama capacity 0.75, two micro-batches",
            llama(moe(Some(0.75), 1)),
            2,
        ),
    ];
    for (what, model, micro) in cases {
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

        let mut cpu_grads = vec![0.0; master.len()];
        let (mut cpu_loss, mut cpu_stats) = (0.0, Vec::new());
        for (i, (inp, tgt)) in micro_batches.iter().enumerate() {
            (cpu_loss, cpu_stats) = gpt_loss_grads_and_moe(
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
        let gpu_stats = g.read_moe_stats(gpu).unwrap();
        let routed = if model.moe.as_ref().unwrap().every == 2 {
            1
        } else {
            2
        };
        assert_eq!(gpu_stats.len(), routed, "{what}: routed layers");
        assert_eq!(cpu_stats.len(), routed, "{what}: routed layers (CPU)");
        for (c, gs) in cpu_stats.iter().zip(&gpu_stats) {
            assert_eq!(c.fractions, gs.fractions, "{what}: expert fractions");
            assert_eq!(c.dropped, gs.dropped, "{what}: dropped assignments");
            let tol = Tolerance {
                abs: 0.0,
                rel: 1e-5,
            };
            assert_close(
                &format!("{what} aux, z"),
                &[c.aux_loss, c.z_loss],
                &[gs.aux_loss, gs.z_loss],
                tol,
            );
            assert_close(&format!("{what} P_e"), &c.mean_probs, &gs.mean_probs, tol);
        }
        if what.contains("capacity") {
            assert!(
                gpu_stats.iter().any(|s| s.dropped > 0),
                "{what}: the capacity must drop something for the test to mean anything"
            );
        }
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
            &layout.adamw_segments(),
            &cpu_step,
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

/// Two models built alike and stepped alike end with the same bits: losses, gradients,
/// statistics and weights after three steps (no float atomics; every sum in a fixed order),
/// in f32 and f16.
#[test]
fn two_identical_runs_are_bit_identical() {
    for precision in [Precision::F32, Precision::F16] {
        let Some(gpu) = gpu(precision) else {
            continue;
        };
        let model = llama(moe(Some(1.0), 1));
        let run = || {
            let batch = GptBatch { batch: 3, seq: 6 };
            let g = GptGpu::new(gpu, &model, 11, batch, 1).unwrap();
            g.set_weights(gpu, &init(g.layout(), 5)).unwrap();
            let mut losses = Vec::new();
            for t in 1..=3 {
                let step = AdamWStep {
                    t,
                    lr: 1e-2,
                    ..AdamWStep::new(t)
                };
                g.step(gpu, &[batch_data(18, 11, t as usize)], &step, |_| {})
                    .unwrap();
                losses.push(g.read_loss(gpu).unwrap().to_bits());
            }
            let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
            let stats: Vec<u32> = g
                .read_moe_stats(gpu)
                .unwrap()
                .into_iter()
                .flat_map(|s| {
                    [s.aux_loss, s.z_loss]
                        .into_iter()
                        .chain(s.fractions)
                        .chain(s.mean_probs)
                        .map(f32::to_bits)
                        .collect::<Vec<_>>()
                })
                .collect();
            (
                losses,
                bits(g.read_grads(gpu).unwrap()),
                bits(g.read_master(gpu).unwrap()),
                stats,
            )
        };
        let (a, b) = (run(), run());
        assert!(
            a.0 == b.0,
            "{precision:?}: losses differ: {:?} vs {:?}",
            a.0,
            b.0
        );
        assert!(a.1 == b.1, "{precision:?}: gradients differ");
        assert!(a.2 == b.2, "{precision:?}: weights differ");
        assert!(a.3 == b.3, "{precision:?}: statistics differ");
    }
}

mod decode_and_checkpoints {
    use super::{gpt, init, llama, moe};
    use crate::common::{Tolerance, assert_close, gpu};
    use kiln::Precision;
    use kiln::cpu::gpt::GptBatch;
    use kiln::generate::processors::SamplingParams;
    use kiln::generate::sampler::{ContextWindow, Generator};
    use kiln::model::decode::KvDecoder;
    use kiln::model::gpu::GptGpu;
    use kiln::model::{Config, ModelConfig, ParamLayout};
    use kiln::train::checkpoint::{self, Checkpoint, TrainingState};
    use kiln::{GpuOptions, PrecisionChoice};

    const VOCAB: &str = "abcdefghijklmnopqrstuvwxyz .,\n";

    fn with_context(mut m: ModelConfig, block: usize) -> ModelConfig {
        m.block_size = block;
        m
    }

    /// The decoder's logits after each token equal those of a full forward pass over the
    /// sequence so far (dropless models, where the two compute the same function), GPT-2 and
    /// Llama: 1e-4 absolute + 1e-4 relative, as for dense models in tests/decode.rs (the same
    /// products summed in other orders; routing decisions are equal, the probabilities being
    /// far apart with `init`'s routers).
    #[test]
    fn moe_decoder_logits_match_the_full_forward() {
        let Some(gpu) = gpu(Precision::F32) else {
            return;
        };
        let tol = Tolerance {
            abs: 1e-4,
            rel: 1e-4,
        };
        for m in [
            with_context(gpt(moe(None, 1)), 32),
            with_context(llama(moe(None, 2)), 32),
        ] {
            let vocab = VOCAB.chars().count();
            let batch = GptBatch {
                batch: 1,
                seq: m.block_size,
            };
            let g = GptGpu::new(gpu, &m, vocab, batch, 1).unwrap();
            g.set_weights(gpu, &init(g.layout(), 3)).unwrap();
            let dec = KvDecoder::new(gpu, &g).unwrap();
            let seq: Vec<u32> = (0..20).map(|i| ((i * 7 + 3) % vocab) as u32).collect();
            let full = |len: usize| {
                let mut inputs = vec![0u32; m.block_size];
                inputs[..len].copy_from_slice(&seq[..len]);
                g.set_batch(gpu, &inputs, &inputs).unwrap();
                gpu.submit("forward", |encoder| g.record_logits(encoder))
                    .unwrap();
                g.read_logits_row(gpu, len - 1).unwrap()
            };
            let _ = full(4);
            let decoded: Vec<Vec<f32>> = (4..seq.len())
                .map(|pos| dec.decode(gpu, seq[pos], pos).unwrap())
                .collect();
            for (i, logits) in decoded.iter().enumerate() {
                let what = format!("{:?}: logits after {} tokens", m.arch, 5 + i);
                assert_close(&what, &full(5 + i), logits, tol);
            }
        }
    }

    fn checkpoint_of(m: &ModelConfig) -> Checkpoint {
        let vocab = VOCAB.chars().count();
        let layout = ParamLayout::gpt(m, vocab, 1).unwrap();
        let n = layout.buffer_len();
        Checkpoint {
            config: Config {
                model: m.clone(),
                ..Config::default()
            },
            tokenizer_json: serde_json::json!({"type": "char", "chars": VOCAB}).to_string(),
            state: TrainingState::default(),
            master: init(&layout, 4),
            m: vec![0.0; n],
            v: vec![0.0; n],
            layout,
        }
    }

    /// A routed model's checkpoint saves and loads bit for bit (the (E, out, in) expert tensors
    /// and the routers under their names), a run with other MoE settings is refused by name,
    /// and generation from it with the KV cache gives the tokens recomputing the context gives
    /// (greedy and sampled, 100 tokens past the 32-token context). The Llama model has a
    /// capacity: an inference model routes dropless, so prefill and decode agree.
    #[test]
    fn moe_checkpoints_load_and_generate_with_the_cache() {
        for (name, m) in [
            ("moe-ckpt-gpt", with_context(gpt(moe(None, 1)), 32)),
            ("moe-ckpt-llama", with_context(llama(moe(Some(1.0), 1)), 32)),
        ] {
            let ck = checkpoint_of(&m);
            let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
            let _ = std::fs::remove_dir_all(&dir);
            let saved = checkpoint::save(&dir, &ck, 1).unwrap();
            let back = checkpoint::load(&saved).unwrap();
            assert_eq!(back.master, ck.master, "{name}: weights");
            assert!(
                back.layout
                    .tensors()
                    .iter()
                    .any(|t| t.name.contains("experts") && t.shape.len() == 3 && t.shape[0] == 4),
                "{name}: expert tensors are (E, out, in)"
            );
            let mut other = back.config.clone();
            other.model.moe.as_mut().unwrap().top_k = 1;
            let err = checkpoint::check_compatible(&back, &other, &back.layout)
                .unwrap_err()
                .to_string();
            assert!(err.contains("model.moe"), "{name}: {err}");

            let options = GpuOptions {
                adapter: None,
                precision: PrecisionChoice::F32,
            };
            let mut g = Generator::load(&dir, &options).unwrap();
            g.set_window(ContextWindow::Restart);
            for temperature in [0.0, 1.0] {
                let params = SamplingParams {
                    temperature,
                    seed: 11,
                    max_tokens: 100,
                    ..SamplingParams::default()
                };
                let mut runs = Vec::new();
                for kv in [true, false] {
                    g.set_kv_cache(kv);
                    assert_eq!(g.uses_kv_cache(), kv, "{name}: the decoder serves MoE");
                    runs.push(g.generate("the king", &params, |_| {}).unwrap().ids);
                }
                assert_eq!(runs[0], runs[1], "{name} temperature {temperature}");
            }
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}

/// Inconsistent `[model.moe]` settings are refused with the key, the value and the rule.
#[test]
fn inconsistent_moe_settings_are_refused() {
    let base = "[model]\nn_layer = 2\n[model.moe]\nn_experts = 4\ntop_k = 2\ndropless = true\n";
    let cases = [
        ("n_experts = 1", "model.moe.n_experts"),
        ("top_k = 5", "model.moe.top_k"),
        ("top_k = 0", "model.moe.top_k"),
        ("capacity_factor = 1.25", "model.moe.capacity_factor"),
        ("aux_loss_coef = -1", "model.moe.aux_loss_coef"),
        ("router_z_loss_coef = nan", "model.moe.router_z_loss_coef"),
        ("every = 3", "model.moe.every"),
        ("every = 0", "model.moe.every"),
    ];
    for (line, key) in cases {
        let text = base
            .replace("n_experts = 4\n", "")
            .replace("top_k = 2\n", "")
            + line
            + "\n";
        let text = if line.starts_with("n_experts") {
            text + "top_k = 1\n"
        } else if line.starts_with("top_k") {
            text + "n_experts = 4\n"
        } else {
            text + "n_experts = 4\ntop_k = 2\n"
        };
        let err = kiln::model::Config::from_toml(&text, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "{line}: {err}");
    }
    let no_capacity = "[model]\nn_layer = 2\n[model.moe]\nn_experts = 4\ntop_k = 2\n";
    let err = kiln::model::Config::from_toml(no_capacity, &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.moe.dropless") && err.contains("capacity_factor"),
        "{err}"
    );
    let bad_factor = "[model]\nn_layer = 2\n[model.moe]\ncapacity_factor = 0\n";
    let err = kiln::model::Config::from_toml(bad_factor, &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.moe.capacity_factor"), "{err}");
    // --set reaches the table.
    let c = kiln::model::Config::from_toml(base, &["model.moe.top_k=1".into()]).unwrap();
    assert_eq!(c.model.moe.unwrap().top_k, 1);
}
