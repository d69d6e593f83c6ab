//! Quantised models end to end, for both architectures: `quantize_checkpoint` → the quantised
//! checkpoint folder → an inference model whose products and lookups read the packed weights.
//! The quantised model must compute exactly the float model of its dequantised weights (forward,
//! decoder, generation), report the bytes it holds, and every damaged file or bad request must
//! be refused with a message that says what is wrong.

mod common;

use common::{Tolerance, assert_close, gpu};
use kiln::cpu::gpt::GptBatch;
use kiln::cpu::quant::dequantize;
use kiln::generate::processors::SamplingParams;
use kiln::generate::sampler::Generator;
use kiln::model::decode::KvDecoder;
use kiln::model::gpu::GptGpu;
use kiln::model::init::gpt2_init;
use kiln::model::{ArchKind, Component, Config, ModelConfig, ParamLayout};
use kiln::quant::convert::quantize_checkpoint;
use kiln::quant::weights::ModelWeights;
use kiln::quant::{QuantKind, QuantSettings};
use kiln::train::checkpoint::{self, Checkpoint, TrainingState};
use kiln::train::eval::{EvalText, eval_checkpoints};
use kiln::{Gpu, GpuOptions, Precision, PrecisionChoice};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const VOCAB: &str = "abcdefghijklmnopqrstuvwxyz .,\n";

fn gpt() -> ModelConfig {
    ModelConfig {
        n_layer: 2,
        n_head: 2,
        n_embd: 64,
        block_size: 32,
        bias: true,
        ..ModelConfig::default()
    }
}

/// RoPE, RMSNorm, SwiGLU 128 wide, 2 key/value heads for 4 query heads, a separate head.
fn llama() -> ModelConfig {
    ModelConfig {
        arch: ArchKind::Llama,
        n_layer: 2,
        n_head: 4,
        n_kv_head: Some(2),
        n_embd: 64,
        block_size: 32,
        mlp_hidden: Some(128),
        ..ModelConfig::default()
    }
}

fn vocab() -> usize {
    VOCAB.chars().count()
}

fn options() -> GpuOptions {
    GpuOptions {
        adapter: None,
        precision: PrecisionChoice::F32,
    }
}

/// A fresh folder under the target's temporary directory.
fn fresh(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("quant-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A float checkpoint of `m` in `dir/float`, with a corpus of the vocabulary's characters
/// recorded as its training data. GPT-2 initialisation 8 times larger (norm gains left at 1),
/// so that next-token distributions are peaked and greedy choices are not near-ties.
fn float_checkpoint(dir: &Path, m: &ModelConfig) -> PathBuf {
    let corpus = dir.join("corpus.txt");
    let text: String = (0..400)
        .map(|i| ["the king, ", "and the queen.\n", "a horse, a horse "][i % 3])
        .collect();
    std::fs::write(&corpus, text).unwrap();
    let mut config = Config {
        model: m.clone(),
        ..Config::default()
    };
    config.data.path = corpus.display().to_string();
    config.train.batch_size = 2;
    config.train.eval_batches = 2;
    let layout = ParamLayout::gpt(m, vocab(), 1).unwrap();
    let mut w = gpt2_init(&layout, m, 3);
    for t in layout.tensors() {
        if t.component != Component::Norm {
            for x in &mut w[t.offset..t.offset + t.len()] {
                *x *= 8.0;
            }
        }
    }
    let n = layout.buffer_len();
    let ck = Checkpoint {
        config,
        tokenizer_json: serde_json::json!({"type": "char", "chars": VOCAB}).to_string(),
        state: TrainingState::default(),
        master: w,
        m: vec![0.0; n],
        v: vec![0.0; n],
        layout,
    };
    checkpoint::save(&dir.join("float"), &ck, 1).unwrap()
}

/// The float model of a quantised model's dequantised weights.
fn dequantised(w: &ModelWeights) -> ModelWeights {
    let layout = ParamLayout::gpt(&w.config.model, w.vocab, 1).unwrap();
    let mut values = vec![0.0; layout.buffer_len()];
    for t in layout.tensors() {
        let dst = &mut values[t.offset..t.offset + t.len()];
        match (w.quantized.get(&t.name), w.layout.get(&t.name)) {
            (Some(q), _) => dst.copy_from_slice(&dequantize(q)),
            (None, Some(f)) => dst.copy_from_slice(&w.values[f.offset..f.offset + f.len()]),
            (None, None) => panic!("{} is nowhere", t.name),
        }
    }
    ModelWeights {
        layout,
        values,
        quantized: Default::default(),
        settings: None,
        ..w.clone()
    }
}

fn logits(w: &ModelWeights, tokens: &[u32], batch: GptBatch) -> Vec<f32> {
    let gpu = gpu(Precision::F32).unwrap();
    let model = GptGpu::inference(gpu, w, batch).unwrap();
    model.set_batch(gpu, tokens, tokens).unwrap();
    gpu.submit("forward", |encoder| model.record_logits(encoder))
        .unwrap();
    model.read_logits(gpu).unwrap()
}

/// The settings the tests cover: q8 with everything quantised, q4 with its default (token
/// table and head in float) in groups of 64, and q4 with the embeddings quantised too.
fn settings() -> Vec<QuantSettings> {
    vec![
        QuantSettings::new(QuantKind::Q8, 32, None).unwrap(),
        QuantSettings::new(QuantKind::Q4, 64, None).unwrap(),
        QuantSettings::new(QuantKind::Q4, 32, Some(true)).unwrap(),
    ]
}

/// The quantised model's logits equal those of the float model holding its dequantised
/// weights. Both multiply by the same f32 weights (d·q is exact); only the kernels differ (the
/// quantised product against the float matmul's variant), and both sum f32 products over k,
/// so through two layers the logits (of size ~10) agree to 1e-4 absolute + 1e-4 relative, the
/// decoder test's tolerance for the same kind of difference.
#[test]
fn quantised_forward_equals_the_dequantised_float_model() {
    for (arch, m) in [("gpt", gpt()), ("llama", llama())] {
        let dir = fresh(&format!("forward-{arch}"));
        let float = float_checkpoint(&dir, &m);
        let batch = GptBatch {
            batch: 2,
            seq: m.block_size,
        };
        let tokens: Vec<u32> = (0..2 * m.block_size)
            .map(|i| ((i * 7 + 3) % vocab()) as u32)
            .collect();
        for s in settings() {
            let out = dir.join(format!("{}-{}-{}", s.kind, s.group_size, s.embeddings));
            quantize_checkpoint(&float, s, &out).unwrap();
            let q = ModelWeights::load(&out).unwrap();
            assert_eq!(q.settings, Some(s));
            // What was quantised: every linear layer, and the token table/head as asked.
            let tokens_name = match m.arch {
                ArchKind::Gpt2 => "wte.weight",
                ArchKind::Llama => "model.embed_tokens.weight",
            };
            assert_eq!(q.quantized.contains_key(tokens_name), s.embeddings);
            assert_eq!(q.quantized.len(), 4 * m.n_layer + embedding_tensors(&m, s));
            let what = format!(
                "{arch} {} group {} embeddings {}",
                s.kind, s.group_size, s.embeddings
            );
            assert_close(
                &what,
                &logits(&dequantised(&q), &tokens, batch),
                &logits(&q, &tokens, batch),
                Tolerance {
                    abs: 1e-4,
                    rel: 1e-4,
                },
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Quantised tables beside the linear layers: the token table, and a Llama head.
fn embedding_tensors(m: &ModelConfig, s: QuantSettings) -> usize {
    match (s.embeddings, m.arch) {
        (false, _) => 0,
        (true, ArchKind::Gpt2) => 1,
        (true, ArchKind::Llama) => 2,
    }
}

/// The key/value-cache decoder over a quantised GPT and Llama (its one-row quantised products,
/// embedding lookup and, for Llama, a quantised separate head) gives the logits of fresh full
/// forward passes at every length, within the tolerance of tests/decode.rs (f32 sums in other
/// orders through two layers).
#[test]
fn quantised_decoder_matches_the_full_forward() {
    let gpu = gpu(Precision::F32).unwrap();
    for (arch, m) in [("gpt", gpt()), ("llama", llama())] {
        let dir = fresh(&format!("decoder-{arch}"));
        let float = float_checkpoint(&dir, &m);
        decoder_matches_full_forward(gpu, arch, &m, &dir, &float);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

fn decoder_matches_full_forward(gpu: &Gpu, arch: &str, m: &ModelConfig, dir: &Path, float: &Path) {
    for s in settings() {
        let out = dir.join(format!("{}-{}-{}", s.kind, s.group_size, s.embeddings));
        quantize_checkpoint(float, s, &out).unwrap();
        let w = ModelWeights::load(&out).unwrap();
        let batch = GptBatch {
            batch: 1,
            seq: m.block_size,
        };
        let g = GptGpu::inference(gpu, &w, batch).unwrap();
        assert!(KvDecoder::supports(gpu, &g), "{arch}");
        let dec = KvDecoder::new(gpu, &g).unwrap();
        let seq: Vec<u32> = (0..20).map(|i| ((i * 11 + 5) % vocab()) as u32).collect();
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
            assert_close(
                &format!(
                    "{arch} {} group {}: logits after {} tokens",
                    s.kind,
                    s.group_size,
                    5 + i
                ),
                &full(5 + i),
                logits,
                Tolerance {
                    abs: 1e-4,
                    rel: 1e-4,
                },
            );
        }
    }
}

/// Generation from a quantised checkpoint: with the cache it equals recomputing every window,
/// GPT and Llama.
/// Both report the weight bytes they hold, fewer than the float model's.
#[test]
fn quantised_generation_is_consistent_and_smaller() {
    for (arch, m) in [("gpt", gpt()), ("llama", llama())] {
        let dir = fresh(&format!("generate-{arch}"));
        let float = float_checkpoint(&dir, &m);
        let out = dir.join("q8");
        quantize_checkpoint(&float, settings()[0], &out).unwrap();
        // Within the context (8 + 20 < 32 positions): past it the cache restarts from half the
        // block while recomputing slides, which are different functions.
        let params = SamplingParams {
            temperature: 0.0,
            max_tokens: 20,
            ..SamplingParams::default()
        };
        let mut g = Generator::load(&out, &options()).unwrap();
        let mut runs = Vec::new();
        for kv in [true, false] {
            g.set_kv_cache(kv);
            runs.push(g.generate("the king", &params, |_| {}).unwrap().ids);
        }
        assert_eq!(runs[0].len(), 20, "{arch}");
        assert_eq!(runs[0], runs[1], "{arch}: cache and recompute differ");
        let f = Generator::load(&float, &options()).unwrap();
        let (qb, fb) = (g.weight_bytes(), f.weight_bytes());
        assert!(g.weights_description().starts_with("q8"), "{arch}");
        assert_eq!(f.weights_description(), "float");
        assert_eq!((fb.packed, fb.scales), (0, 0));
        assert!(
            qb.total() * 3 < fb.total(),
            "{arch}: q8 holds {qb:?}, float {fb:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// The bytes reported are the buffers' sizes: the float tensors in the device layout (f32
/// here), one byte (q8) or half a byte (q4) per quantised weight, and the f16 scales padded to
/// whole u32 words per matrix.
#[test]
fn weight_bytes_are_the_buffers() {
    let gpu = gpu(Precision::F32).unwrap();
    let m = gpt();
    let dir = fresh("bytes");
    let float = float_checkpoint(&dir, &m);
    for s in settings() {
        let out = dir.join(format!("{}-{}-{}", s.kind, s.group_size, s.embeddings));
        quantize_checkpoint(&float, s, &out).unwrap();
        let w = ModelWeights::load(&out).unwrap();
        let batch = GptBatch { batch: 1, seq: 8 };
        let b = GptGpu::inference(gpu, &w, batch).unwrap().weight_bytes();
        let (mut packed, mut scales) = (0, 0);
        for q in w.quantized.values() {
            packed += (q.rows() * q.cols() * q.kind().bits() / 8) as u64;
            scales += (q.rows() * q.groups_per_row()).div_ceil(2) as u64 * 4;
        }
        assert_eq!((b.packed, b.scales), (packed, scales), "{s:?}");
        let float_elements: usize = w.layout.tensors().iter().map(|t| t.len()).sum();
        // The device layout pads tensors to the adapter's alignment: at least the elements.
        assert!(b.float >= 4 * float_elements as u64, "{s:?}");
        assert!(b.float < 4 * float_elements as u64 + 4 * 256 * w.layout.tensors().len() as u64);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `eval_checkpoints` scores a quantised model and its source on the same tokens. With these
/// peaked random weights q8 (groups of 32) must stay within 2% of the float perplexity and q4
/// within 10%: a product that read the wrong weights would be far off.
#[test]
fn eval_compares_on_the_same_tokens() {
    let m = gpt();
    let dir = fresh("eval");
    let float = float_checkpoint(&dir, &m);
    for (s, bound) in [(settings()[0], 0.02), (settings()[1], 0.10)] {
        let out = dir.join(format!("{}", s.kind));
        quantize_checkpoint(&float, s, &out).unwrap();
        let r = eval_checkpoints(&[&out, &float], EvalText::FullValidation, &options()).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].tokens, r[1].tokens);
        assert!(r[0].tokens > 0);
        let change = (r[0].perplexity - r[1].perplexity).abs() / r[1].perplexity;
        assert!(
            change < bound,
            "{}: {} vs {}",
            s.kind,
            r[0].perplexity,
            r[1].perplexity
        );
        assert!(r[0].weight_bytes.total() < r[1].weight_bytes.total());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn err<T>(r: kiln::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

/// Rewrites `dir/model.safetensors` with `edit` applied to its tensors (name → dtype, shape,
/// bytes), keeping its header metadata.
fn rewrite(
    dir: &Path,
    edit: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut tensors: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let meta: Option<HashMap<String, String>> = meta.metadata().clone();
    std::fs::write(&path, safetensors::serialize(views, meta).unwrap()).unwrap();
}

/// Damaged quantised checkpoints and bad requests are refused with what is wrong and what to
/// do: missing scales, a packed tensor of the wrong length, a header that lies about a tensor's
/// bytes, an unknown format version, quantising a quantised checkpoint, training from one, a
/// group size that does not divide a layer or is 0, an output folder in use.
#[test]
fn bad_quantised_checkpoints_and_requests_are_refused() {
    let m = gpt();
    let dir = fresh("bad");
    let float = float_checkpoint(&dir, &m);
    let good = dir.join("good");
    quantize_checkpoint(&float, settings()[0], &good).unwrap();
    let copy = |name: &str| {
        let to = dir.join(name);
        std::fs::create_dir_all(&to).unwrap();
        for f in ["model.safetensors", "config.toml", "tokenizer.json"] {
            std::fs::copy(good.join(f), to.join(f)).unwrap();
        }
        to
    };
    let scales = "h.1.mlp.c_proj.weight.scales";
    let packed = "h.0.attn.c_attn.weight.qweight";

    let d = copy("no-scales");
    rewrite(&d, |t| t.retain(|(n, ..)| n != scales));
    let e = err(ModelWeights::load(&d));
    assert!(e.contains(scales) && e.contains("missing"), "{e}");

    let d = copy("short-packed");
    rewrite(&d, |t| {
        let p = t.iter_mut().find(|(n, ..)| n == packed).unwrap();
        p.2[1] -= 32;
        p.3.truncate(p.2[0] * p.2[1]);
    });
    let e = err(ModelWeights::load(&d));
    assert!(e.contains(packed) && e.contains("wrong length"), "{e}");

    let d = copy("lying-header");
    let path = d.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.truncate(bytes.len() - 8);
    std::fs::write(&path, bytes).unwrap();
    let e = err(ModelWeights::load(&d));
    assert!(e.contains("not a valid safetensors file"), "{e}");

    let d = copy("version");
    let path = d.join("model.safetensors");
    let text = std::fs::read(&path).unwrap();
    let needle = br#"\"version\":1"#;
    let at = text
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap();
    let mut text = text;
    text[at + needle.len() - 1] = b'7';
    std::fs::write(&path, text).unwrap();
    let e = err(ModelWeights::load(&d));
    assert!(e.contains("version 7"), "{e}");

    let e = err(quantize_checkpoint(
        &good,
        settings()[0],
        &dir.join("twice"),
    ));
    assert!(
        e.contains("quantised checkpoint") && e.contains("quantised again"),
        "{e}"
    );
    assert!(!dir.join("twice").exists());
    let e = err(checkpoint::load(&good));
    assert!(
        e.contains("quantised checkpoint") && e.contains("trained"),
        "{e}"
    );
    let e = err(checkpoint::latest_dir(&good));
    assert!(e.contains("quantised checkpoint"), "{e}");

    // A model whose MLP is 96 wide: 64 does not divide it; 32 does.
    let narrow = ModelConfig {
        n_embd: 96,
        n_head: 2,
        ..gpt()
    };
    let ndir = fresh("bad-narrow");
    let nfloat = float_checkpoint(&ndir, &narrow);
    let s64 = QuantSettings::new(QuantKind::Q8, 64, None).unwrap();
    let e = err(quantize_checkpoint(&nfloat, s64, &ndir.join("q")));
    assert!(
        e.contains("96") && e.contains("wte.weight") && e.contains("(32 does)"),
        "{e}"
    );
    let s32 = QuantSettings::new(QuantKind::Q8, 32, None).unwrap();
    quantize_checkpoint(&nfloat, s32, &ndir.join("q")).unwrap();
    let e = err(quantize_checkpoint(&nfloat, s32, &ndir.join("q")));
    assert!(e.contains("not empty"), "{e}");
    let e = err(QuantSettings::new(QuantKind::Q4, 0, None));
    assert!(e.contains("--group-size = 0"), "{e}");

    // An inference model does not train.
    let gpu = gpu(Precision::F32).unwrap();
    let w = ModelWeights::load(&good).unwrap();
    let model = GptGpu::inference(gpu, &w, GptBatch { batch: 1, seq: 4 }).unwrap();
    let e = err(model.set_weights(gpu, &[]));
    assert!(e.contains("inference"), "{e}");
    let e = err(model.read_grads(gpu));
    assert!(e.contains("inference"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&ndir).unwrap();
}

/// The command line: `kiln quantize` (and its refusals), `kiln eval --compare` printing both
/// perplexities, `kiln sample` printing the weight bytes.
#[test]
fn the_commands_quantize_compare_and_report() {
    let kiln = || std::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
    let dir = fresh("cli");
    let float = float_checkpoint(&dir, &gpt());
    let q = dir.join("q4");
    let run = |args: &[&str]| {
        let out = kiln().args(args).output().unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    };
    let f = float.to_str().unwrap();
    let (ok, _, e) = run(&[
        "quantize",
        "--checkpoint",
        f,
        "--type",
        "q4",
        "--group-size",
        "48",
        "--out",
        q.to_str().unwrap(),
    ]);
    assert!(!ok && e.contains("multiple of 32"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    let (ok, json, e) = run(&[
        "quantize",
        "--checkpoint",
        f,
        "--type",
        "q4",
        "--out",
        q.to_str().unwrap(),
    ]);
    assert!(ok, "{e}");
    assert!(
        e.contains("h.0.attn.c_attn.weight") && e.contains("smaller"),
        "{e}"
    );
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(report["settings"]["type"], "q4");
    let (ok, json, e) = run(&[
        "eval",
        "--checkpoint",
        q.to_str().unwrap(),
        "--compare",
        f,
        "--full-split",
    ]);
    assert!(ok, "{e}");
    assert!(e.contains("perplexity") && e.contains(" vs "), "{e}");
    let both: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(both["model"]["tokens"], both["base"]["tokens"]);
    assert!(both["perplexity_change"].is_number());
    let (ok, _, e) = run(&[
        "sample",
        "--checkpoint",
        q.to_str().unwrap(),
        "--max-tokens",
        "5",
    ]);
    assert!(ok, "{e}");
    assert!(e.contains("bytes on the GPU") && e.contains("q4"), "{e}");
    let (ok, _, e) = run(&[
        "quantize",
        "--checkpoint",
        q.to_str().unwrap(),
        "--type",
        "q8",
        "--out",
        dir.join("again").to_str().unwrap(),
    ]);
    assert!(!ok && e.contains("quantised checkpoint"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
