//! Inference with the key/value cache: single-query attention against the CPU reference, the
//! decoder's logits against a full forward pass at every position, and greedy generation with
//! the cache against recomputing the window, for 200 tokens.

mod common;

use common::{Tolerance, assert_close, gpu, random, round_to};
use kiln::cpu::gpt::GptBatch;
use kiln::generate::processors::SamplingParams;
use kiln::generate::sampler::Generator;
use kiln::gpu::DType;
use kiln::kernels::decode::AttendOne;
use kiln::model::decode::KvDecoder;
use kiln::model::gpu::GptGpu;
use kiln::model::init::gpt2_init;
use kiln::model::{Config, ModelConfig, ParamLayout};
use kiln::train::checkpoint::{self, Checkpoint, TrainingState};
use kiln::{GpuOptions, Precision, PrecisionChoice};

/// Positions straddling the workgroup (64) and heads of 1, 3 and 4 channels... 32 channels.
#[test]
fn attend_one_matches_cpu() {
    for p in [Precision::F32, Precision::F16] {
        let Some(gpu) = gpu(p) else { continue };
        let dt = DType::from(p);
        for (heads, c, positions, pos) in [
            (1, 4, 3, 0),
            (3, 12, 10, 9),
            (2, 16, 150, 100),
            (4, 128, 200, 199),
        ] {
            let cache = round_to(p, &random(positions * 3 * c, 1));
            let qkv = round_to(p, &random(3 * c, 2));
            let mut want_cache = cache.clone();
            let mut want = vec![0.0; c];
            kiln::cpu::decode::attend_one(&mut want, &mut want_cache, &qkv, pos, heads, c);
            let g_cache = gpu.upload("cache", &[cache.len()], dt, &cache).unwrap();
            let g_qkv = gpu.upload("qkv", &[3 * c], dt, &qkv).unwrap();
            let out = gpu.zeros("out", &[c], dt).unwrap();
            let step = gpu.upload_u32("step", &[2], &[0, pos as u32]).unwrap();
            AttendOne::new(gpu, &out, &g_cache, &g_qkv, &step, heads, c)
                .unwrap()
                .run(gpu)
                .unwrap();
            let what = format!("{p} heads={heads} C={c} pos={pos}");
            // The new row is copied, so the cache must match exactly.
            assert_eq!(gpu.read(&g_cache).unwrap(), want_cache, "{what}: cache");
            // f32: sums of ≤ 200 products in another order, ~1e-6; f16 adds the output's rounding
            // (2^-11 relative).
            let tol = match p {
                Precision::F32 => Tolerance {
                    abs: 1e-5,
                    rel: 1e-5,
                },
                Precision::F16 => Tolerance {
                    abs: 1e-3,
                    rel: 2e-3,
                },
            };
            assert_close(&what, &want, &gpu.read(&out).unwrap(), tol);
        }
    }
}

fn model() -> ModelConfig {
    ModelConfig {
        n_layer: 2,
        n_head: 2,
        n_embd: 32,
        block_size: 256,
        bias: true,
        ..ModelConfig::default()
    }
}

/// GPT-2 initialisation made 8 times larger, so that the next-token distribution is peaked (a
/// trained model's is) and greedy choices are not near-ties.
fn weights(layout: &ParamLayout, m: &ModelConfig) -> Vec<f32> {
    let mut w = gpt2_init(layout, m, 3);
    for t in layout.tensors() {
        if !t.name.contains("ln_") {
            for x in &mut w[t.offset..t.offset + t.len()] {
                *x *= 8.0;
            }
        }
    }
    w
}

const VOCAB: &str = "abcdefghijklmnopqrstuvwxyz .,\n";

/// The decoder's logits after each token equal those of the full forward over the sequence so
/// far, within f32 reordering: 1e-4 absolute + 1e-4 relative on logits of size ~1-10 (the two
/// paths sum the same products in different orders through 2 layers).
#[test]
fn decoder_logits_match_the_full_forward() {
    let Some(gpu) = gpu(Precision::F32) else {
        return;
    };
    let m = model();
    let vocab = VOCAB.chars().count();
    let g = GptGpu::new(
        gpu,
        &m,
        vocab,
        GptBatch {
            batch: 1,
            seq: m.block_size,
        },
        1,
    )
    .unwrap();
    g.set_weights(gpu, &weights(g.layout(), &m)).unwrap();
    let dec = KvDecoder::new(gpu, &g).unwrap();
    let seq: Vec<u32> = (0..40).map(|i| ((i * 7 + 3) % vocab) as u32).collect();
    let full = |len: usize| {
        let mut inputs = vec![0u32; m.block_size];
        inputs[..len].copy_from_slice(&seq[..len]);
        g.set_batch(gpu, &inputs, &inputs).unwrap();
        gpu.run_pass("forward", |pass| g.record_logits(pass))
            .unwrap();
        g.read_logits_row(gpu, len - 1).unwrap()
    };
    let tol = Tolerance {
        abs: 1e-4,
        rel: 1e-4,
    };
    // Prefill 5 tokens, then decode the rest one at a time; check against fresh full passes (run
    // afterwards, so each refills the cache from scratch: the comparison is at every length).
    let _ = full(5);
    let mut decoded = Vec::new();
    for (pos, &token) in seq.iter().enumerate().skip(5) {
        decoded.push(dec.decode(gpu, token, pos).unwrap());
    }
    for (i, logits) in decoded.iter().enumerate() {
        let len = 6 + i;
        assert_close(
            &format!("logits after {len} tokens"),
            &full(len),
            logits,
            tol,
        );
    }
    assert!(dec.decode(gpu, 0, m.block_size).is_err(), "past the cache");
}

#[test]
fn greedy_with_cache_equals_recompute_for_200_tokens() {
    let m = model();
    let config = Config {
        model: m.clone(),
        ..Config::default()
    };
    let vocab = VOCAB.chars().count();
    let layout = ParamLayout::gpt(&m, vocab, 1).unwrap();
    let n = layout.buffer_len();
    let ck = Checkpoint {
        config,
        tokenizer_json: serde_json::json!({"type": "char", "chars": VOCAB}).to_string(),
        state: TrainingState::default(),
        master: weights(&layout, &m),
        m: vec![0.0; n],
        v: vec![0.0; n],
        layout,
    };
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("decode-greedy");
    let _ = std::fs::remove_dir_all(&dir);
    checkpoint::save(&dir, &ck, 1).unwrap();
    let options = GpuOptions {
        adapter: None,
        precision: PrecisionChoice::F32,
    };
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: 200,
        ..SamplingParams::default()
    };
    let mut g = Generator::load(&dir, &options).unwrap();
    // Greedy, as asked; and sampling at temperature 1 from one seed, which visits many more
    // contexts than a greedy loop of a small model does (a sample flips only if the two paths'
    // probabilities straddle the uniform draw, ~1e-6 apart).
    let sampled = SamplingParams {
        temperature: 1.0,
        seed: 11,
        ..params.clone()
    };
    let mut runs = Vec::new();
    for kv in [true, false] {
        g.set_kv_cache(kv);
        let greedy = g.generate("the king", &params, |_| {}).unwrap();
        let sample = g.generate("the king", &sampled, |_| {}).unwrap();
        runs.push((greedy, sample));
    }
    let (cached, recomputed) = (&runs[0], &runs[1]);
    assert_eq!(cached.0.tokens, 200);
    assert_eq!(
        cached.0.ids, recomputed.0.ids,
        "greedy tokens differ:\n{:?}\n{:?}",
        cached.0.text, recomputed.0.text
    );
    assert_eq!(
        cached.1.ids, recomputed.1.ids,
        "sampled tokens differ:\n{:?}\n{:?}",
        cached.1.text, recomputed.1.text
    );
    let distinct: std::collections::HashSet<_> = cached.1.ids.iter().collect();
    assert!(
        distinct.len() >= 10,
        "only {} distinct tokens",
        distinct.len()
    );
    // Past the context (8 + 300 > 256 positions) the cache is refilled from the last half
    // block, and generation goes on; up to that point it is the run above.
    g.set_kv_cache(true);
    let long = g
        .generate(
            "the king",
            &SamplingParams {
                max_tokens: 300,
                ..sampled
            },
            |_| {},
        )
        .unwrap();
    assert_eq!(long.tokens, 300);
    assert_eq!(long.ids[..200], cached.1.ids[..]);
    std::fs::remove_dir_all(&dir).unwrap();
}
