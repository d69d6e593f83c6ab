//! Inference with the key/value cache: single-query attention (multi-head and grouped-query)
//! against the CPU reference, the decoder's logits against a full forward pass at every position
//! (GPT-2, and Llama with RoPE and n_kv_head = 1, 2, 4), and generation with the cache against
//! recomputing the context, for 200 tokens, GPT-2 within the context and Llama past it under
//! both window rules.

mod common;

use common::{Tolerance, assert_close, gpu, random, round_to};
use kiln::cpu::gpt::GptBatch;
use kiln::generate::processors::SamplingParams;
use kiln::generate::sampler::{ContextWindow, Generator};
use kiln::gpu::DType;
use kiln::kernels::decode::{AttendOne, MAX_POSITIONS};
use kiln::model::decode::KvDecoder;
use kiln::model::gpu::GptGpu;
use kiln::model::init::gpt2_init;
use kiln::model::{ArchKind, Component, Config, ModelConfig, ParamLayout};
use kiln::ops::AttendOneShape;
use kiln::train::checkpoint::{self, Checkpoint, TrainingState};
use kiln::{GpuOptions, Precision, PrecisionChoice};

/// (positions, heads, kv_heads, head_dim, pos): a one-row cache; the last row of caches that
/// end before, at, and after a workgroup's 64 positions and at the 2048 limit; head dims of 1, 3,
/// 5 and 10 (not multiples of 4), 32 and 64; n_kv_head = 1, n_head, and in between.
const SHAPES: [(usize, usize, usize, usize, usize); 10] = [
    (1, 1, 1, 4, 0),
    (3, 2, 1, 1, 1),
    (10, 3, 3, 4, 9),
    (64, 4, 1, 3, 63),
    (70, 6, 2, 5, 64),
    (150, 4, 4, 32, 100),
    (129, 8, 4, 10, 128),
    (200, 4, 2, 32, 199),
    (300, 12, 3, 64, 0),
    (2048, 2, 1, 64, 2047),
];

fn shape_of(
    &(positions, heads, kv_heads, head_dim, _): &(usize, usize, usize, usize, usize),
) -> AttendOneShape {
    AttendOneShape {
        positions,
        heads,
        kv_heads,
        head_dim,
    }
}

/// GPU against CPU on [`SHAPES`], both precisions, inputs uniform in [-1, 1) (f16-rounded for
/// f16), so scores are at most head_dim/√head_dim = √64 = 8 and every softmax weight is at least
/// e^-16 of the largest.
/// - The cache must match exactly: the new row's key/value heads are copied, and nothing else
///   is written.
/// - f32: the kernel forms each score, and each output's weighted sum over positions, in the
///   reference's order; only the maximum (exact either way) and the softmax denominator (a tree
///   over 64 invocations instead of a left-to-right sum, ≤ 2048 positive terms: relative error
///   ≲ 11 ulp ≈ 7e-7 against ≲ 2048 ulp worst case, ~45 typical, for the reference's loop) and
///   the driver's exp (≈ 1 ulp) differ. Outputs are weighted means of values in [-1, 1), so
///   1e-5 absolute + 1e-5 relative leaves a wide margin (measured worst: printed by the test).
/// - f16: on top of that the output is rounded to f16 once (2^-11 relative, ≤ 4.9e-4 for
///   |out| < 1): 1e-3 absolute + 2e-3 relative.
#[test]
fn attend_one_matches_cpu() {
    for p in [Precision::F32, Precision::F16] {
        let Some(gpu) = gpu(p) else { continue };
        let dt = DType::from(p);
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
        let mut worst = 0.0f32;
        for (i, case) in SHAPES.iter().enumerate() {
            let (shape, pos) = (shape_of(case), case.4);
            let cache = round_to(p, &random(shape.cache_len(), 1 + i as u64));
            let qkv = round_to(p, &random(shape.qkv_width(), 100 + i as u64));
            let mut want_cache = cache.clone();
            let mut want = vec![0.0; shape.out_len()];
            kiln::cpu::decode::attend_one(&mut want, &mut want_cache, &qkv, pos, &shape).unwrap();
            let g_cache = gpu.upload("cache", &[cache.len()], dt, &cache).unwrap();
            let g_qkv = gpu.upload("qkv", &[qkv.len()], dt, &qkv).unwrap();
            let out = gpu.zeros("out", &[shape.out_len()], dt).unwrap();
            let step = gpu.upload_u32("step", &[2], &[0, pos as u32]).unwrap();
            AttendOne::new(gpu, &out, &g_cache, &g_qkv, &step, &shape)
                .unwrap()
                .run(gpu)
                .unwrap();
            let what = format!("{p} {shape:?} pos={pos}");
            assert_eq!(gpu.read(&g_cache).unwrap(), want_cache, "{what}: cache");
            let got = gpu.read(&out).unwrap();
            assert_close(&what, &want, &got, tol);
            for (w, g) in want.iter().zip(&got) {
                worst = worst.max((w - g).abs() / (tol.abs + tol.rel * w.abs()));
            }
        }
        eprintln!("{p}: worst attend_one difference {worst:.3} of the tolerance");
    }
}

/// Grouped-query attention is multi-head attention with each key/value head repeated for its
/// group: on the CPU and on the GPU, the grouped call over a cache gives bit for bit what the
/// multi-head call gives over the same cache with its kv heads physically repeated (the same
/// products in the same order), and writes the new row's heads to the same places.
#[test]
fn grouped_attend_one_equals_multi_head_on_repeated_heads() {
    let (positions, heads, kv, hd, pos) = (37, 6, 2, 6, 30);
    let grouped = AttendOneShape {
        positions,
        heads,
        kv_heads: kv,
        head_dim: hd,
    };
    let multi = AttendOneShape::multi_head(positions, heads, heads * hd);
    let group = heads / kv;
    // A grouped row (q | k of kv heads | v of kv heads) and the multi-head row repeating them.
    let repeat = |row: &[f32]| {
        let mut out = row[..heads * hd].to_vec();
        for part in [heads, heads + kv] {
            for h in 0..heads {
                let g = part + h / group;
                out.extend_from_slice(&row[g * hd..(g + 1) * hd]);
            }
        }
        out
    };
    let cache = random(grouped.cache_len(), 7);
    let qkv = random(grouped.qkv_width(), 8);
    let rep_cache: Vec<f32> = cache
        .chunks(grouped.qkv_width())
        .flat_map(&repeat)
        .collect();
    let rep_qkv = repeat(&qkv);
    let run_cpu = |shape: &AttendOneShape, cache: &[f32], qkv: &[f32]| {
        let (mut out, mut cache) = (vec![0.0; shape.out_len()], cache.to_vec());
        kiln::cpu::decode::attend_one(&mut out, &mut cache, qkv, pos, shape).unwrap();
        (out, cache)
    };
    let (want, want_cache) = run_cpu(&multi, &rep_cache, &rep_qkv);
    let (got, got_cache) = run_cpu(&grouped, &cache, &qkv);
    assert_eq!(got, want, "cpu output");
    let got_rows: Vec<f32> = got_cache
        .chunks(grouped.qkv_width())
        .flat_map(&repeat)
        .collect();
    assert_eq!(got_rows, want_cache, "cpu cache");
    let gpu = gpu(Precision::F32).unwrap();
    let run_gpu = |shape: &AttendOneShape, cache: &[f32], qkv: &[f32]| {
        let g_cache = gpu
            .upload("cache", &[cache.len()], DType::F32, cache)
            .unwrap();
        let g_qkv = gpu.upload("qkv", &[qkv.len()], DType::F32, qkv).unwrap();
        let out = gpu.zeros("out", &[shape.out_len()], DType::F32).unwrap();
        let step = gpu.upload_u32("step", &[2], &[0, pos as u32]).unwrap();
        AttendOne::new(gpu, &out, &g_cache, &g_qkv, &step, shape)
            .unwrap()
            .run(gpu)
            .unwrap();
        gpu.read(&out).unwrap()
    };
    assert_eq!(
        run_gpu(&grouped, &cache, &qkv),
        run_gpu(&multi, &rep_cache, &rep_qkv),
        "gpu output"
    );
}

/// Bad shapes and buffers are `Error::Shape`s naming the problem, on both sides, never panics.
#[test]
fn attend_one_refuses_bad_shapes() {
    let gpu = gpu(Precision::F32).unwrap();
    let ok = AttendOneShape {
        positions: 5,
        heads: 4,
        kv_heads: 2,
        head_dim: 3,
    };
    let t = |n: usize| gpu.zeros("t", &[n], DType::F32).unwrap();
    let step = gpu.upload_u32("step", &[2], &[0, 0]).unwrap();
    let (cache, qkv, out) = (t(ok.cache_len()), t(ok.qkv_width()), t(ok.out_len()));
    assert!(AttendOne::new(gpu, &out, &cache, &qkv, &step, &ok).is_ok());
    let cases = [
        (AttendOneShape { kv_heads: 3, ..ok }, "does not divide"),
        (AttendOneShape { kv_heads: 0, ..ok }, "must be positive"),
        (AttendOneShape { positions: 6, ..ok }, "cache has"),
        (AttendOneShape { head_dim: 4, ..ok }, "elements, expected"),
    ];
    for (shape, needle) in cases {
        let e = AttendOne::new(gpu, &out, &cache, &qkv, &step, &shape)
            .err()
            .unwrap_or_else(|| panic!("{shape:?} accepted"));
        assert!(e.to_string().contains(needle), "{shape:?}: {e}");
        let (mut o, mut c) = (vec![0.0; out.len()], vec![0.0; cache.len()]);
        let e = kiln::cpu::decode::attend_one(&mut o, &mut c, &vec![0.0; qkv.len()], 0, &shape)
            .err()
            .unwrap_or_else(|| panic!("cpu: {shape:?} accepted"));
        assert!(e.to_string().contains(needle), "cpu {shape:?}: {e}");
    }
    let long = AttendOneShape {
        positions: MAX_POSITIONS + 1,
        ..ok
    };
    let e = AttendOne::new(gpu, &out, &t(long.cache_len()), &qkv, &step, &long)
        .err()
        .expect("past MAX_POSITIONS");
    assert!(e.to_string().contains("at most 2048"), "{e}");
    let e = AttendOne::new(gpu, &out, &cache, &qkv, &t(2), &ok)
        .err()
        .expect("a float step");
    assert!(e.to_string().contains("step"), "{e}");
    let (mut o, mut c) = (vec![0.0; out.len()], vec![0.0; cache.len()]);
    let e = kiln::cpu::decode::attend_one(&mut o, &mut c, &vec![0.0; qkv.len()], 5, &ok)
        .expect_err("pos past the cache");
    assert!(e.to_string().contains("past the 5 rows"), "{e}");
}

/// The tiny GPT-2 the decoder was first tested on.
fn gpt() -> ModelConfig {
    ModelConfig {
        n_layer: 2,
        n_head: 2,
        n_embd: 32,
        block_size: 256,
        bias: true,
        ..ModelConfig::default()
    }
}

/// A tiny Llama (RoPE, RMSNorm, SwiGLU, separate head, no biases): 2 layers, 4 query heads of 8
/// and `kv` key/value heads, in a context of `block_size`.
fn llama(kv: usize, block_size: usize) -> ModelConfig {
    ModelConfig {
        arch: ArchKind::Llama,
        n_layer: 2,
        n_head: 4,
        n_kv_head: Some(kv),
        n_embd: 32,
        block_size,
        mlp_hidden: Some(40),
        ..ModelConfig::default()
    }
}

/// GPT-2 initialisation with everything but the norms made 8 times larger, so that the
/// next-token distribution is peaked (a trained model's is) and greedy choices are not
/// near-ties.
fn weights(layout: &ParamLayout, m: &ModelConfig) -> Vec<f32> {
    let mut w = gpt2_init(layout, m, 3);
    for t in layout.tensors() {
        if t.component != Component::Norm {
            for x in &mut w[t.offset..t.offset + t.len()] {
                *x *= 8.0;
            }
        }
    }
    w
}

const VOCAB: &str = "abcdefghijklmnopqrstuvwxyz .,\n";

/// Prefills the first 5 tokens of a 40-token sequence, decodes the rest one at a time, and
/// compares the logits after each token with those of a fresh full forward pass over the
/// sequence so far (run afterwards, so each refills the cache from scratch): the comparison is
/// at every length. Returns the worst difference as a fraction of the tolerance.
fn decoder_against_full_forward(precision: Precision, m: &ModelConfig, tol: Tolerance) -> f32 {
    let Some(gpu) = gpu(precision) else {
        return 0.0;
    };
    let vocab = VOCAB.chars().count();
    let batch = GptBatch {
        batch: 1,
        seq: m.block_size,
    };
    let g = GptGpu::new(gpu, m, vocab, batch, 1).unwrap();
    g.set_weights(gpu, &weights(g.layout(), m)).unwrap();
    let dec = KvDecoder::new(gpu, &g).unwrap();
    let seq: Vec<u32> = (0..40).map(|i| ((i * 7 + 3) % vocab) as u32).collect();
    let full = |len: usize| {
        let mut inputs = vec![0u32; m.block_size];
        inputs[..len].copy_from_slice(&seq[..len]);
        g.set_batch(gpu, &inputs, &inputs).unwrap();
        gpu.submit("forward", |encoder| g.record_logits(encoder))
            .unwrap();
        g.read_logits_row(gpu, len - 1).unwrap()
    };
    let _ = full(5);
    let mut decoded = Vec::new();
    for (pos, &token) in seq.iter().enumerate().skip(5) {
        decoded.push(dec.decode(gpu, token, pos).unwrap());
    }
    let mut worst = 0.0f32;
    for (i, logits) in decoded.iter().enumerate() {
        let len = 6 + i;
        let want = full(len);
        let what = format!(
            "{precision} {:?} kv={:?}: logits after {len} tokens",
            m.arch, m.n_kv_head
        );
        assert_close(&what, &want, logits, tol);
        for (w, g) in want.iter().zip(logits) {
            worst = worst.max((w - g).abs() / (tol.abs + tol.rel * w.abs()));
        }
    }
    assert!(dec.decode(gpu, 0, m.block_size).is_err(), "past the cache");
    worst
}

/// The decoder's logits equal the full forward's within f32 reordering, for GPT-2 and for Llama
/// with n_kv_head = 1, 2 (grouped) and 4 (= n_head): 1e-4 absolute + 1e-4 relative on logits of
/// size ~1-10 (the two paths sum the same products in different orders through 2 layers, and
/// attention's softmax is formed by different kernels). A decoder that skipped RoPE, rotated at
/// another position, or read the wrong key/value head is off by O(1).
#[test]
fn decoder_logits_match_the_full_forward() {
    let tol = Tolerance {
        abs: 1e-4,
        rel: 1e-4,
    };
    for m in [gpt(), llama(2, 64), llama(1, 64), llama(4, 64)] {
        let worst = decoder_against_full_forward(Precision::F32, &m, tol);
        eprintln!(
            "f32 {:?} kv={:?}: worst {worst:.3} of the tolerance",
            m.arch, m.n_kv_head
        );
    }
}

/// The same in f16, for the grouped Llama. Both paths store every activation in f16 but round
/// differently: the full forward stores attention's scores and probabilities in f16, while the
/// decoder keeps them in f32 in workgroup memory. Each such rounding is 2^-11 relative, and the
/// weights (8 times GPT-2's) amplify the differences through 2 layers to logits of size ~1-30:
/// 2e-2 absolute + 5e-3 relative (measured worst: 0.28 of it on lavapipe, printed), while
/// skipping RoPE moves logits by ~0.25 and more.
#[test]
fn decoder_logits_match_the_full_forward_f16() {
    let tol = Tolerance {
        abs: 2e-2,
        rel: 5e-3,
    };
    let worst = decoder_against_full_forward(Precision::F16, &llama(2, 64), tol);
    eprintln!("f16 llama kv=2: worst {worst:.3} of the tolerance");
}

/// Saves a checkpoint of `m` with [`weights`] and the character vocabulary [`VOCAB`] under the
/// test's target temporary folder, and loads a generator on it (f32).
fn generator(name: &str, m: &ModelConfig) -> (Generator, std::path::PathBuf) {
    let config = Config {
        model: m.clone(),
        ..Config::default()
    };
    let vocab = VOCAB.chars().count();
    let layout = ParamLayout::gpt(m, vocab, 1).unwrap();
    let n = layout.buffer_len();
    let ck = Checkpoint {
        config,
        tokenizer_json: serde_json::json!({"type": "char", "chars": VOCAB}).to_string(),
        state: TrainingState::default(),
        master: weights(&layout, m),
        m: vec![0.0; n],
        v: vec![0.0; n],
        layout,
    };
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    checkpoint::save(&dir, &ck, 1).unwrap();
    let options = GpuOptions {
        adapter: None,
        precision: PrecisionChoice::F32,
    };
    (Generator::load(&dir, &options).unwrap(), dir)
}

/// Greedy at temperature 0, and sampling at temperature 1 from one seed, which visits many more
/// contexts than a greedy loop of a small model does (a sample flips only if the two paths'
/// probabilities straddle the uniform draw, ~1e-6 apart).
fn greedy_and_sampled(max_tokens: usize) -> [SamplingParams; 2] {
    let greedy = SamplingParams {
        temperature: 0.0,
        max_tokens,
        ..SamplingParams::default()
    };
    let sampled = SamplingParams {
        temperature: 1.0,
        seed: 11,
        ..greedy.clone()
    };
    [greedy, sampled]
}

/// Generates with the cache and by recomputing the context for every token (same window rule),
/// greedy and sampled, and checks that they are the same tokens; returns the cached runs' ids.
fn cached_equals_recomputed(g: &mut Generator, window: ContextWindow, max: usize) -> Vec<Vec<u32>> {
    g.set_window(window);
    let mut ids = Vec::new();
    for params in greedy_and_sampled(max) {
        let mut runs = Vec::new();
        for kv in [true, false] {
            g.set_kv_cache(kv);
            assert_eq!(g.uses_kv_cache(), kv);
            runs.push(g.generate("the king", &params, |_| {}).unwrap());
        }
        let (cached, recomputed) = (&runs[0], &runs[1]);
        assert_eq!(cached.tokens, max);
        assert_eq!(
            cached.ids, recomputed.ids,
            "{window:?}, temperature {}: tokens differ:\n{:?}\n{:?}",
            params.temperature, cached.text, recomputed.text
        );
        ids.push(cached.ids.clone());
    }
    let distinct: std::collections::HashSet<_> = ids[1].iter().collect();
    assert!(
        distinct.len() >= 10,
        "only {} distinct tokens",
        distinct.len()
    );
    ids
}

#[test]
fn greedy_with_cache_equals_recompute_for_200_tokens() {
    let (mut g, dir) = generator("decode-greedy", &gpt());
    let within = cached_equals_recomputed(&mut g, ContextWindow::Restart, 200);
    // Past the context (8 + 300 > 256 positions) the cache is refilled from the last half
    // block, and generation goes on; up to that point it is the run above.
    g.set_kv_cache(true);
    let [_, sampled] = greedy_and_sampled(300);
    let long = g.generate("the king", &sampled, |_| {}).unwrap();
    assert_eq!(long.tokens, 300);
    assert_eq!(long.ids[..200], within[1][..]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The must-show on the Llama architecture with grouped-query attention (4 query heads,
/// 2 key/value heads) and RoPE: 200 greedy (and 200 sampled) tokens from the KV-cache decoder
/// are the tokens recomputing the context gives. The context is 64 tokens, so the 8-token prompt
/// and 200 tokens overflow it: with `restart` the decoder goes on after each refill at positions
/// re-based to 0 (what the recomputed window uses), with `slide` the cache serves the first 56
/// tokens and every later one is recomputed. The two rules agree until the context is full and
/// not after (they are different functions past it, which is why the comparison is per rule).
#[test]
fn llama_greedy_with_cache_equals_recompute_for_200_tokens() {
    let m = llama(2, 64);
    let (mut g, dir) = generator("decode-greedy-llama", &m);
    let restart = cached_equals_recomputed(&mut g, ContextWindow::Restart, 200);
    let slide = cached_equals_recomputed(&mut g, ContextWindow::Slide, 200);
    let within = m.block_size - "the king".len();
    for (r, s) in restart.iter().zip(&slide) {
        assert_eq!(r[..within], s[..within], "identical within the context");
        assert_ne!(r, s, "the window rules differ past the context");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
