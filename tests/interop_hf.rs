//! Hugging Face interop: the transformers fixtures (scripts/make-interop-fixtures.py) imported
//! and compared with transformers' own logits; kiln → export → import → kiln bit for bit for
//! both architectures and both tokenizers; the exported char tokenizer encoding as kiln does;
//! and every refusal of bad input, with nothing left half-written.
//!
//! Tolerance for logits against transformers: 1e-4 absolute (the bound). Both sides
//! compute in f32 (the fixtures' logits in float64) with different summation orders; over
//! widths of 48–100 and logits of magnitude ~5 the rounding differences are a few 1e-6
//! (measured 2.4e-6 for GPT-2 and 3.8e-6 for Llama), so 1e-4 leaves room and still fails on
//! any wrong layout, transpose, permutation or eps (which move logits by 1e-2 and more).

mod common;

use kiln::data::{CharTokenizer, Tokenizer};
use kiln::generate::sampler::Generator;
use kiln::interop::{HfDtype, export_hf, import_hf};
use kiln::model::init::gpt2_init;
use kiln::model::{ArchKind, Config, ModelConfig, ParamLayout};
use kiln::train::checkpoint::{self, Checkpoint, TrainingState};
use kiln::{GpuOptions, PrecisionChoice};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A fresh folder under the target's temporary directory.
fn fresh(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("interop-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn f32_options() -> GpuOptions {
    GpuOptions {
        adapter: None,
        precision: PrecisionChoice::F32,
    }
}

/// Imports a transformers fixture and compares kiln's f32 logits on its prompt with the ones
/// transformers saved.
fn check_fixture(name: &str) {
    let dir = fresh(name);
    let run = dir.join("run");
    import_hf(&fixture(name), &run).unwrap();
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(name).join("expected.json")).unwrap(),
    )
    .unwrap();
    let g = Generator::load(&run, &f32_options()).unwrap();
    let tokens = g
        .tokenizer()
        .encode(expected["text"].as_str().unwrap())
        .unwrap();
    let want_tokens: Vec<u32> = serde_json::from_value(expected["tokens"].clone()).unwrap();
    assert_eq!(
        tokens, want_tokens,
        "kiln's BPE must encode as transformers did"
    );
    let got = g.logits_all(&tokens).unwrap();
    let want: Vec<Vec<f64>> = serde_json::from_value(expected["logits"].clone()).unwrap();
    let mut worst = (0.0f64, 0, 0);
    for (i, (g_row, w_row)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g_row.len(), w_row.len());
        for (j, (&a, &b)) in g_row.iter().zip(w_row).enumerate() {
            let d = (f64::from(a) - b).abs();
            if d > worst.0 {
                worst = (d, i, j);
            }
        }
    }
    eprintln!(
        "{name}: max |kiln - transformers| = {:.3e} at {:?}",
        worst.0,
        (worst.1, worst.2)
    );
    assert!(
        worst.0 <= 1e-4,
        "{name}: logit ({}, {}) differs by {:.3e} > 1e-4",
        worst.1,
        worst.2,
        worst.0
    );
}

#[test]
fn imported_gpt2_fixture_gives_transformers_logits() {
    check_fixture("hf-gpt2-tiny");
}

#[test]
fn imported_sharded_llama_fixture_gives_transformers_logits() {
    check_fixture("hf-llama-tiny");
}

#[test]
fn imported_config_has_the_fixtures_settings() {
    let dir = fresh("settings");
    import_hf(&fixture("hf-llama-tiny"), &dir.join("run")).unwrap();
    let c = checkpoint::read_config(&dir.join("run/step-0")).unwrap();
    let p = c.model.parts();
    assert_eq!(c.model.arch, ArchKind::Llama);
    assert_eq!(
        (c.model.n_layer, c.model.n_head, c.model.n_embd),
        (2, 4, 48)
    );
    assert_eq!((p.n_kv_head, p.mlp_hidden, c.model.block_size), (2, 80, 40));
    assert_eq!((p.rope_theta, p.norm_eps), (500.0, 1e-6));
    assert!(!p.tie_embeddings);
    // The root config makes the folder a run folder `kiln train --resume` accepts.
    assert_eq!(checkpoint::read_config(&dir.join("run")).unwrap(), c);
    // GPT-2's random biases are kept.
    import_hf(&fixture("hf-gpt2-tiny"), &dir.join("gpt2")).unwrap();
    let g = checkpoint::read_config(&dir.join("gpt2/step-0")).unwrap();
    assert!(g.model.bias && g.model.parts().tie_embeddings);
    assert_eq!(g.model.parts().mlp_hidden, 100);
}

/// A checkpoint of `model` with random weights (GPT-2's initialisation; gains and shifts
/// perturbed so that no tensor is trivially 0 or 1) and `tokenizer`, saved under `dir`.
fn kiln_checkpoint(dir: &Path, model: &ModelConfig, tokenizer: &Tokenizer) -> PathBuf {
    let vocab = tokenizer.vocab_size();
    let layout = ParamLayout::gpt(model, vocab, 1).unwrap();
    let mut w = gpt2_init(&layout, model, 5);
    for (x, r) in w.iter_mut().zip(common::random(layout.buffer_len(), 9)) {
        *x += 0.01 * r;
    }
    let mut config = Config {
        model: model.clone(),
        ..Config::default()
    };
    config.data.tokenizer = tokenizer.kind();
    config.sample.temperature = 0.0;
    let n = layout.buffer_len();
    let ck = Checkpoint {
        config,
        tokenizer_json: tokenizer.to_json().unwrap(),
        state: TrainingState::default(),
        master: w,
        m: vec![0.0; n],
        v: vec![0.0; n],
        layout,
    };
    checkpoint::save(&dir.join("orig"), &ck, 1).unwrap()
}

fn char_tokenizer() -> Tokenizer {
    Tokenizer::Char(
        CharTokenizer::from_text("the quick brown fox, jumps over: lazy dogs!\nÆé").unwrap(),
    )
}

fn bpe_tokenizer() -> Tokenizer {
    let text = "the quick brown fox jumps over the lazy dog. ".repeat(40);
    Tokenizer::Bpe(kiln::BpeTokenizer::train(text.as_bytes(), 280).unwrap())
}

fn gpt2(bias: bool) -> ModelConfig {
    ModelConfig {
        n_layer: 2,
        n_head: 2,
        n_embd: 40,
        block_size: 24,
        bias,
        mlp_hidden: Some(72),
        ..ModelConfig::default()
    }
}

fn llama(tied: bool) -> ModelConfig {
    ModelConfig {
        arch: ArchKind::Llama,
        n_layer: 2,
        n_head: 4,
        n_kv_head: Some(2),
        n_embd: 48,
        block_size: 24,
        mlp_hidden: Some(80),
        rope_theta: Some(777.0),
        norm_eps: Some(3e-6),
        tie_embeddings: Some(tied),
        ..ModelConfig::default()
    }
}

/// kiln → export (f32) → import → kiln gives the same weights bit for bit, the same model
/// settings, the same tokenizer and the same [sample] defaults.
fn round_trip(name: &str, model: ModelConfig, tokenizer: Tokenizer) {
    let dir = fresh(name);
    let orig = kiln_checkpoint(&dir, &model, &tokenizer);
    export_hf(&orig, &dir.join("hf"), HfDtype::F32).unwrap();
    let back = import_hf(&dir.join("hf"), &dir.join("back")).unwrap();
    let a = checkpoint::load(&orig).unwrap();
    let b = checkpoint::load(&back).unwrap();
    assert_eq!(a.layout, b.layout, "{name}: tensors");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert!(bits(&a.master) == bits(&b.master), "{name}: weights differ");
    assert_eq!(
        a.config.model.parts(),
        b.config.model.parts(),
        "{name}: parts"
    );
    let strip = |m: &ModelConfig| ModelConfig {
        vocab_size: 0,
        ..m.clone()
    };
    // The parts resolve equal; the explicit keys may differ (import writes every part out).
    let (ma, mb) = (strip(&a.config.model), strip(&b.config.model));
    assert_eq!(
        (
            ma.arch,
            ma.n_layer,
            ma.n_head,
            ma.n_embd,
            ma.block_size,
            ma.bias
        ),
        (
            mb.arch,
            mb.n_layer,
            mb.n_head,
            mb.n_embd,
            mb.block_size,
            mb.bias
        ),
        "{name}: shape"
    );
    assert_eq!(a.tokenizer_json, b.tokenizer_json, "{name}: tokenizer");
    assert_eq!(a.config.sample.temperature, b.config.sample.temperature);
    assert_eq!(a.config.sample.top_k, b.config.sample.top_k);
}

#[test]
fn round_trip_gpt2_without_biases_char() {
    round_trip("rt-gpt2-nobias", gpt2(false), char_tokenizer());
}

#[test]
fn round_trip_gpt2_with_biases_bpe() {
    round_trip("rt-gpt2-bias", gpt2(true), bpe_tokenizer());
}

#[test]
fn round_trip_llama_gqa_untied_and_tied() {
    round_trip("rt-llama", llama(false), char_tokenizer());
    round_trip("rt-llama-tied", llama(true), bpe_tokenizer());
}

#[test]
fn f16_export_rounds_each_weight_once() {
    let dir = fresh("f16");
    let orig = kiln_checkpoint(&dir, &gpt2(true), &char_tokenizer());
    export_hf(&orig, &dir.join("hf"), HfDtype::F16).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("hf/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["torch_dtype"], "float16");
    let back = import_hf(&dir.join("hf"), &dir.join("back")).unwrap();
    let (a, b) = (
        checkpoint::load(&orig).unwrap(),
        checkpoint::load(&back).unwrap(),
    );
    for (x, y) in a.master.iter().zip(&b.master) {
        assert_eq!(half::f16::from_f32(*x).to_f32().to_bits(), y.to_bits());
    }
}

#[test]
fn exported_char_tokenizer_encodes_as_kiln() {
    let dir = fresh("chartok");
    let t = char_tokenizer();
    let orig = kiln_checkpoint(&dir, &gpt2(false), &t);
    export_hf(&orig, &dir.join("hf"), HfDtype::F32).unwrap();
    // The `tokenizers` library is what transformers' fast tokenizers run.
    let hf = tokenizers::Tokenizer::from_file(dir.join("hf/tokenizer.json")).unwrap();
    let text = "the lazy dog, jumps!\n\nÆé over: fox";
    let ids = hf.encode(text, false).unwrap().get_ids().to_vec();
    assert_eq!(ids, t.encode(text).unwrap());
    assert_eq!(hf.decode(&ids, false).unwrap(), text);
}

/// Copies a fixture into a fresh folder so that a test can damage it.
fn copy_fixture(name: &str, to: &Path) -> PathBuf {
    let dst = to.join("hf");
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

fn edit_config(hf: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = hf.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(&path, v.to_string()).unwrap();
}

/// Imports `hf` into a fresh folder expecting an error containing every one of `needles`, and
/// nothing written.
fn refused(hf: &Path, needles: &[&str]) {
    let out = hf.parent().unwrap().join("out");
    let e = import_hf(hf, &out).unwrap_err().to_string();
    for n in needles {
        assert!(e.contains(n), "error {e:?} should mention {n:?}");
    }
    assert!(!out.exists(), "a refused import wrote {}", out.display());
}

/// An edit of a config.json object.
type ConfigEdit = Box<dyn Fn(&mut serde_json::Map<String, serde_json::Value>)>;

#[test]
fn bad_configs_are_refused_naming_the_key() {
    use serde_json::json;
    let cases: Vec<(&str, &str, ConfigEdit, Vec<&str>)> = vec![
        (
            "missing",
            "hf-gpt2-tiny",
            Box::new(|o| {
                o.remove("n_embd");
            }),
            vec!["n_embd", "missing"],
        ),
        (
            "model-type",
            "hf-gpt2-tiny",
            Box::new(|o| {
                o.insert("model_type".into(), json!("bert"));
            }),
            vec!["model_type", "bert"],
        ),
        (
            "n-ctx",
            "hf-gpt2-tiny",
            Box::new(|o| {
                o.insert("n_ctx".into(), json!(1024));
            }),
            vec!["n_ctx", "n_positions"],
        ),
        (
            "heads",
            "hf-gpt2-tiny",
            Box::new(|o| {
                o.insert("n_head".into(), json!(5));
            }),
            vec!["n_embd", "n_head"],
        ),
        (
            "gelu",
            "hf-gpt2-tiny",
            Box::new(|o| {
                o.insert("activation_function".into(), json!("gelu"));
            }),
            vec!["activation_function"],
        ),
        (
            "type",
            "hf-gpt2-tiny",
            Box::new(|o| {
                o.insert("n_layer".into(), json!("two"));
            }),
            vec!["n_layer", "whole number"],
        ),
        (
            "head-dim",
            "hf-llama-tiny",
            Box::new(|o| {
                o.insert("head_dim".into(), json!(16));
            }),
            vec!["head_dim"],
        ),
        (
            "kv",
            "hf-llama-tiny",
            Box::new(|o| {
                o.insert("num_key_value_heads".into(), json!(3));
            }),
            vec!["num_key_value_heads"],
        ),
        (
            "scaling",
            "hf-llama-tiny",
            Box::new(|o| {
                o.insert(
                    "rope_scaling".into(),
                    json!({"rope_type": "llama3", "factor": 8.0}),
                );
            }),
            vec!["rope_scaling", "llama3"],
        ),
        (
            "theta",
            "hf-llama-tiny",
            Box::new(|o| {
                o.insert("rope_theta".into(), json!(10000.0));
            }),
            vec!["rope_theta", "agree"],
        ),
        (
            "bias",
            "hf-llama-tiny",
            Box::new(|o| {
                o.insert("attention_bias".into(), json!(true));
            }),
            vec!["attention_bias"],
        ),
        (
            "vocab",
            "hf-llama-tiny",
            Box::new(|o| {
                o.insert("vocab_size".into(), json!(320));
            }),
            vec!["vocab_size", "300 tokens"],
        ),
    ];
    for (name, fix, edit, needles) in cases {
        let dir = fresh(&format!("bad-{name}"));
        let hf = copy_fixture(fix, &dir);
        edit_config(&hf, |o| edit(o));
        refused(&hf, &needles);
    }
}

/// Rewrites `file` of `hf` with its tensors passed through `edit` (name → (shape, f32 values)).
fn edit_tensors(
    hf: &Path,
    file: &str,
    edit: impl FnOnce(&mut std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>),
) {
    let path = hf.join(file);
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut m = std::collections::BTreeMap::new();
    for (name, v) in st.tensors() {
        let vals = v
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        m.insert(name, (v.shape().to_vec(), vals));
    }
    edit(&mut m);
    let raw: Vec<(String, Vec<usize>, Vec<u8>)> = m
        .into_iter()
        .map(|(n, (s, v))| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = raw
        .iter()
        .map(|(n, s, b)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b);
            (n.clone(), view.unwrap())
        })
        .collect();
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
}

#[test]
fn bad_tensors_are_refused_naming_the_tensor() {
    let dir = fresh("badt-missing");
    let hf = copy_fixture("hf-gpt2-tiny", &dir);
    edit_tensors(&hf, "model.safetensors", |m| {
        m.remove("transformer.h.1.mlp.c_fc.weight");
    });
    refused(&hf, &["transformer.h.1.mlp.c_fc.weight", "missing"]);

    let dir = fresh("badt-shape");
    let hf = copy_fixture("hf-gpt2-tiny", &dir);
    edit_tensors(&hf, "model.safetensors", |m| {
        let (s, v) = m.get_mut("transformer.h.0.attn.c_proj.weight").unwrap();
        v.truncate(48 * 47);
        *s = vec![48, 47];
    });
    refused(
        &hf,
        &["transformer.h.0.attn.c_proj.weight", "[48, 47]", "[48, 48]"],
    );

    let dir = fresh("badt-extra");
    let hf = copy_fixture("hf-gpt2-tiny", &dir);
    edit_tensors(&hf, "model.safetensors", |m| {
        m.insert(
            "transformer.h.0.attn.q_norm.weight".into(),
            (vec![4], vec![1.0; 4]),
        );
    });
    refused(&hf, &["transformer.h.0.attn.q_norm.weight", "no place"]);

    let dir = fresh("badt-nan");
    let hf = copy_fixture("hf-gpt2-tiny", &dir);
    edit_tensors(&hf, "model.safetensors", |m| {
        m.get_mut("transformer.ln_f.bias").unwrap().1[3] = f32::NAN;
    });
    refused(&hf, &["transformer.ln_f.bias", "NaN"]);

    // A shard the index names is gone.
    let dir = fresh("badt-shard");
    let hf = copy_fixture("hf-llama-tiny", &dir);
    std::fs::remove_file(hf.join("model-00002-of-00005.safetensors")).unwrap();
    refused(&hf, &["model-00002-of-00005.safetensors"]);

    // A truncated file.
    let dir = fresh("badt-truncated");
    let hf = copy_fixture("hf-gpt2-tiny", &dir);
    let bytes = std::fs::read(hf.join("model.safetensors")).unwrap();
    std::fs::write(hf.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    refused(&hf, &["model.safetensors", "safetensors"]);
}

#[test]
fn missing_files_and_used_folders_are_refused() {
    let dir = fresh("bad-files");
    let hf = copy_fixture("hf-gpt2-tiny", &dir);
    std::fs::remove_file(hf.join("tokenizer.json")).unwrap();
    refused(&hf, &["tokenizer.json"]);
    let hf = copy_fixture("hf-gpt2-tiny", &fresh("bad-files2"));
    std::fs::remove_file(hf.join("config.json")).unwrap();
    refused(&hf, &["config.json"]);
    let hf = copy_fixture("hf-gpt2-tiny", &fresh("bad-files3"));
    std::fs::remove_file(hf.join("model.safetensors")).unwrap();
    refused(&hf, &["model.safetensors.index.json"]);

    // An output folder in use is refused by import and export alike, and left as it was.
    let dir = fresh("used-out");
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let e = import_hf(&fixture("hf-gpt2-tiny"), &out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not empty"), "{e}");
    let orig = kiln_checkpoint(&dir, &gpt2(false), &char_tokenizer());
    let e = export_hf(&orig, &out, HfDtype::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not empty"), "{e}");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
    // A model transformers' classes cannot compute is refused before anything is written.
    let mut m = gpt2(false);
    m.positions = Some(kiln::PositionKind::Rope);
    let odd = kiln_checkpoint(&fresh("rope-gpt2"), &m, &char_tokenizer());
    let e = export_hf(&odd, &dir.join("rope"), HfDtype::F32)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.positions") && e.contains("GPT2LMHeadModel"),
        "{e}"
    );
    assert!(!dir.join("rope").exists());
    // No temporary folder is left beside the outputs.
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// The imported Llama is an ordinary checkpoint: the library's Trainer resumes it on new text
/// (20 full fine-tuning steps, the loss falling), and `kiln sample` and `kiln eval` take the
/// folder.
#[test]
fn imported_llama_fine_tunes_samples_and_evaluates() {
    let dir = fresh("finetune");
    let run = dir.join("run");
    let step0 = import_hf(&fixture("hf-llama-tiny"), &run).unwrap();
    let ck = checkpoint::load(&step0).unwrap();
    let tokenizer = Tokenizer::from_json(&ck.tokenizer_json).unwrap();
    let text = "The kiln was hot by noon, and the potter set the bowls in rows. ".repeat(30);
    let ids = tokenizer.encode(&text).unwrap();
    let mut config = ck.config.clone();
    config.train.batch_size = 4;
    config.train.lr = 3e-3;
    config.train.warmup_steps = 0;
    config.train.decay = kiln::Decay::Constant;
    config.train.max_steps = 20;
    config.train.precision = PrecisionChoice::F32;
    let dataset = kiln::Dataset::from_tokens(tokenizer, ids, 0.1, config.model.block_size).unwrap();
    let gpu = kiln::Gpu::with_options(&f32_options()).unwrap();
    let mut trainer = kiln::Trainer::from_checkpoint(gpu, config, dataset, ck).unwrap();
    let losses: Vec<f32> = (0..20).map(|_| trainer.step().unwrap().loss).collect();
    eprintln!("fine-tuning losses: {losses:?}");
    let (first, last) = (
        losses[..3].iter().sum::<f32>(),
        losses[17..].iter().sum::<f32>(),
    );
    assert!(last < 0.5 * first, "the loss did not fall: {losses:?}");

    let kiln = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "kiln {args:?}: {stderr}");
        (String::from_utf8_lossy(&out.stdout).into_owned(), stderr)
    };
    let run_s = run.to_str().unwrap();
    let (text_out, _) = kiln(&[
        "sample",
        "--checkpoint",
        run_s,
        "--prompt",
        "The potter",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
    ]);
    assert!(text_out.starts_with("The potter"), "{text_out}");
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, &text).unwrap();
    let (_, err) = kiln(&[
        "eval",
        "--checkpoint",
        run_s,
        "--data",
        corpus.to_str().unwrap(),
    ]);
    assert!(err.contains("perplexity"), "{err}");
    // And back out through the command line, to a folder transformers would load.
    let hf = dir.join("hf");
    kiln(&[
        "export",
        "--checkpoint",
        run_s,
        "--format",
        "hf",
        "--out",
        hf.to_str().unwrap(),
    ]);
    assert!(hf.join("model.safetensors").is_file() && hf.join("tokenizer_config.json").is_file());
}
