//! Fine-tuning through the `kiln` command on a tiny model: `train --init-from` (full, frozen,
//! LoRA) and its resume, the PEFT adapter folder, `sample`/`eval --lora`, `lora merge` (its
//! logits against base + adapter), and every bad input refused with nothing written.

mod common;
#[path = "common/run.rs"]
mod run;

use kiln::finetune::peft::{ADAPTER_CONFIG_FILE, ADAPTER_MODEL_FILE};
use kiln::generate::Generator;
use kiln::quant::weights::ModelWeights;
use kiln::train::checkpoint;
use kiln::{GpuOptions, PrecisionChoice};
use run::{corpus, kiln, tempdir, tiny_args, train_losses, train_tiny};
use std::path::{Path, PathBuf};
use std::process::Output;

/// Another corpus in the same characters (so the base's char tokenizer encodes it).
fn new_corpus(dir: &Path) -> PathBuf {
    let lines = [
        "NURSE:\nGood night, good night!\n\n",
        "FRIAR:\nThese violent delights have violent ends.\n\n",
        "JULIET:\nO, swear not by the moon.\n\n",
    ];
    let text: String = (0..400).map(|i| lines[(i * 7 / 3) % 3]).collect();
    let path = dir.join("new.txt");
    std::fs::write(&path, text).unwrap();
    path
}

/// `tiny_args` for a fine-tuning run of `steps` steps from `base` on `data` into `out`.
fn finetune_args(base: &Path, data: &Path, out: &Path, steps: u32, extra: &[&str]) -> Vec<String> {
    let mut a = tiny_args(data, out, steps);
    a.extend(["--init-from".to_string(), base.display().to_string()]);
    for e in extra {
        a.extend(["--set".to_string(), e.to_string()]);
    }
    a
}

/// A fine-tuning run of `steps` steps made in two halves: stopped after `steps / 2` with
/// `--steps`, then continued with `--resume` (which must equal the run made in one go).
fn train_split_and_resumed(base: &Path, data: &Path, out: &Path, steps: u32, extra: &[&str]) {
    let mut a = finetune_args(base, data, out, steps, extra);
    a.extend(["--steps".into(), (steps / 2).to_string()]);
    run_ok(&a);
    run_ok(&[
        "train".into(),
        "--quiet".into(),
        "--out".into(),
        out.display().to_string(),
        "--data".into(),
        data.display().to_string(),
        "--resume".into(),
    ]);
}

fn run_ok(args: &[String]) -> Output {
    let o = kiln().args(args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

fn run_err(args: &[String]) -> String {
    let o = kiln().args(args).output().unwrap();
    assert!(!o.status.success(), "expected a failure: {args:?}");
    let e = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!e.contains("panicked"), "{e}");
    e
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(snapshot(&p));
        } else {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out.sort();
    out
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The values of tensor `name` in a checkpoint.
fn tensor<'a>(ck: &'a kiln::Checkpoint, name: &str) -> &'a [f32] {
    let t = ck.layout.get(name).unwrap();
    &ck.master[t.offset..t.offset + t.len()]
}

/// Full fine-tuning and a frozen fine-tune start from the base's weights (the first loss on the
/// new corpus is the base's, far below a fresh model's), never write the base, record where
/// they came from, and resume bit for bit; the frozen tensors end bit-identical to the base's.
#[test]
fn init_from_fine_tunes_freezes_and_resumes() {
    let (_, base) = train_tiny("ft-base", 60);
    let dir = base.parent().unwrap().to_path_buf();
    let data = new_corpus(&dir);
    let before = snapshot(&base);
    let full = dir.join("full");
    run_ok(&finetune_args(&base, &data, &full, 20, &[]));
    let scratch = dir.join("scratch");
    run_ok(&tiny_args(&data, &scratch, 20));
    let (ft, fresh) = (train_losses(&full), train_losses(&scratch));
    let first = |m: &std::collections::BTreeMap<u64, String>| m[&0].parse::<f64>().unwrap();
    assert!(
        first(&ft) < first(&fresh) - 0.5,
        "fine-tuning starts from the base: {} vs scratch {}",
        first(&ft),
        first(&fresh)
    );
    assert_eq!(snapshot(&base), before, "the base checkpoint was written");
    let ck = checkpoint::load_latest(&full).unwrap();
    let recorded = ck.config.finetune.init_from.clone().unwrap();
    assert!(recorded.contains("ft-base"), "{recorded}");
    assert_eq!(ck.state.step, 20);

    // Freezing, then a resume: 10 steps, stop, 10 more == 20 straight.
    let frozen = ["finetune.freeze=[\"embedding\",\"layers.0\"]"];
    let straight = dir.join("frozen");
    run_ok(&finetune_args(&base, &data, &straight, 20, &frozen));
    let split = dir.join("frozen-split");
    train_split_and_resumed(&base, &data, &split, 20, &frozen);
    assert_eq!(train_losses(&split), train_losses(&straight));
    let (b, f) = (
        checkpoint::load_latest(&base).unwrap(),
        checkpoint::load_latest(&straight).unwrap(),
    );
    for name in [
        "wte.weight",
        "wpe.weight",
        "h.0.attn.c_attn.weight",
        "h.0.ln_2.weight",
    ] {
        assert_eq!(
            bits(tensor(&f, name)),
            bits(tensor(&b, name)),
            "{name} moved"
        );
    }
    assert_ne!(
        bits(tensor(&f, "h.1.mlp.c_fc.weight")),
        bits(tensor(&b, "h.1.mlp.c_fc.weight"))
    );
}

/// A LoRA fine-tune of 50 steps: the base weights in its checkpoint are bit-identical to the
/// source's, the checkpoint folder is a PEFT adapter (PEFT's names and config), `sample` and
/// `eval` run base + adapter, and `lora merge` writes a checkpoint whose logits equal base +
/// adapter's to 1e-5 (f32: the merged product rounds W + s·B·A once per weight where base +
/// adapter rounds two products and a sum; logits of size ~5 agree to a few 1e-7).
#[test]
fn lora_fine_tune_adapter_sample_eval_and_merge() {
    let (_, base) = train_tiny("lora-base", 60);
    let dir = base.parent().unwrap().to_path_buf();
    let data = new_corpus(&dir);
    let out = dir.join("lora");
    let settings = [
        "lora.rank=4",
        "lora.alpha=8",
        "lora.targets=[\"attn.qkv\",\"attn.proj\",\"mlp.fc\",\"mlp.proj\"]",
        "train.precision=\"f32\"",
    ];
    let o = run_ok(&finetune_args(&base, &data, &out, 50, &settings));
    let summary = String::from_utf8_lossy(&o.stdout);
    assert!(summary.contains("\"steps\":50"), "{summary}");
    let (b, l) = (
        checkpoint::load_latest(&base).unwrap(),
        checkpoint::load_latest(&out).unwrap(),
    );
    for t in b.layout.tensors() {
        assert_eq!(
            bits(tensor(&l, &t.name)),
            bits(tensor(&b, &t.name)),
            "{} moved",
            t.name
        );
    }
    let a = tensor(&l, "h.0.attn.c_attn.lora_B.weight");
    assert!(a.iter().any(|x| *x != 0.0), "B never trained");

    let adapter = checkpoint::latest_dir(&out).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adapter.join(ADAPTER_CONFIG_FILE)).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 8.0);
    assert_eq!(cfg["fan_in_fan_out"], true);
    assert!(
        cfg["base_model_name_or_path"]
            .as_str()
            .unwrap()
            .contains("lora-base")
    );
    let bytes = std::fs::read(adapter.join(ADAPTER_MODEL_FILE)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let a = st
        .tensor("base_model.model.transformer.h.1.attn.c_attn.lora_A.weight")
        .unwrap();
    assert_eq!(a.shape(), [4, 32]);
    let b_t = st
        .tensor("base_model.model.transformer.h.1.mlp.c_proj.lora_B.weight")
        .unwrap();
    assert_eq!(b_t.shape(), [32, 4]);
    assert_eq!(st.names().len(), 2 * 4 * 2);

    let o = run_ok(&[
        "sample".into(),
        "--checkpoint".into(),
        base.display().to_string(),
        "--lora".into(),
        out.display().to_string(),
        "--max-tokens".into(),
        "20".into(),
        "--seed".into(),
        "3".into(),
    ]);
    assert!(!o.stdout.is_empty());
    let eval = |lora: bool| {
        let mut a = vec![
            "--precision".to_string(),
            "f32".into(),
            "eval".into(),
            "--checkpoint".into(),
            base.display().to_string(),
            "--data".into(),
            data.display().to_string(),
        ];
        if lora {
            a.extend(["--lora".into(), adapter.display().to_string()]);
        }
        let o = run_ok(&a);
        let text = String::from_utf8_lossy(&o.stderr).to_string();
        let loss: f64 = text
            .split("loss ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .unwrap()
            .parse()
            .unwrap();
        (loss, text)
    };
    let ((plain, _), (adapted, text)) = (eval(false), eval(true));
    assert!(text.contains("LoRA adapter"), "{text}");
    assert!(
        adapted < plain,
        "the adapter lowers the new corpus's loss: {adapted} vs {plain}"
    );

    let merged = dir.join("merged");
    run_ok(&[
        "lora".into(),
        "merge".into(),
        "--checkpoint".into(),
        base.display().to_string(),
        "--lora".into(),
        out.display().to_string(),
        "--out".into(),
        merged.display().to_string(),
    ]);
    let opts = GpuOptions {
        adapter: None,
        precision: PrecisionChoice::F32,
    };
    let with = ModelWeights::load_with_adapter(&base, Some(&adapter)).unwrap();
    let g1 = Generator::from_model_weights(&with, &opts).unwrap();
    let g2 = Generator::load(&merged, &opts).unwrap();
    let context: Vec<u32> = (0..16).map(|i| (i * 5 % 20) as u32).collect();
    let (x, y) = (
        g1.logits_after(&context).unwrap(),
        g2.logits_after(&context).unwrap(),
    );
    let worst = x
        .iter()
        .zip(&y)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    eprintln!("merged vs base + adapter: worst |logit difference| {worst:e} (bound 1e-5)");
    assert!(worst <= 1e-5, "merged vs base + adapter: {worst:e}");
    let base_only = Generator::load(&base, &opts)
        .unwrap()
        .logits_after(&context)
        .unwrap();
    let moved = x
        .iter()
        .zip(&base_only)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(moved > 1e-3, "the adapter changes the logits ({moved:e})");
}

/// A LoRA fine-tune with adapter dropout (`lora.dropout` = 0.1): 10 steps, stop, `--resume`
/// for 10 more is bit-identical to 20 straight (losses and every adapter tensor: the masks are a
/// function of the seed, step and micro-batch, not of the process); the losses differ from the
/// same run without dropout (the masks act); the PEFT folder's `adapter_config.json` says
/// `lora_dropout` 0.1 and reading the adapter back keeps it.
#[test]
fn lora_dropout_fine_tune_resumes_bit_for_bit_and_exports_its_dropout() {
    let (_, base) = train_tiny("lora-drop-base", 40);
    let dir = base.parent().unwrap().to_path_buf();
    let data = new_corpus(&dir);
    let settings = [
        "lora.rank=4",
        "lora.alpha=8",
        "lora.dropout=0.1",
        "lora.targets=[\"attn.qkv\",\"attn.proj\",\"mlp.fc\",\"mlp.proj\"]",
    ];
    let straight = dir.join("straight");
    run_ok(&finetune_args(&base, &data, &straight, 20, &settings));
    let split = dir.join("split");
    train_split_and_resumed(&base, &data, &split, 20, &settings);
    let losses = train_losses(&straight);
    assert!(losses.len() >= 10, "{losses:?}");
    assert_eq!(train_losses(&split), losses);
    let (s, r) = (
        checkpoint::load_latest(&straight).unwrap(),
        checkpoint::load_latest(&split).unwrap(),
    );
    assert_eq!((s.state.step, r.state.step), (20, 20));
    let adapters: Vec<_> = s
        .layout
        .tensors()
        .iter()
        .filter(|t| t.name.contains(".lora_"))
        .map(|t| t.name.clone())
        .collect();
    assert_eq!(adapters.len(), 2 * 4 * 2);
    for name in &adapters {
        assert_eq!(bits(tensor(&r, name)), bits(tensor(&s, name)), "{name}");
    }

    let undropped = dir.join("undropped");
    let mut plain = settings.to_vec();
    plain[2] = "lora.dropout=0";
    run_ok(&finetune_args(&base, &data, &undropped, 20, &plain));
    let other = train_losses(&undropped);
    assert_eq!(
        other[&0], losses[&0],
        "step 0's loss is the base's either way"
    );
    assert_ne!(other, losses, "lora.dropout changed no loss");

    let adapter = checkpoint::latest_dir(&straight).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adapter.join(ADAPTER_CONFIG_FILE)).unwrap())
            .unwrap();
    assert_eq!(cfg["lora_dropout"], 0.1);
    let with = ModelWeights::load_with_adapter(&base, Some(&adapter)).unwrap();
    assert_eq!(with.config.lora.as_ref().unwrap().dropout, 0.1);
}

/// Bad input: each a clear error, no panic, nothing written.
#[test]
fn bad_input_is_refused_and_nothing_is_written() {
    let (_, base) = train_tiny("ft-bad", 30);
    let dir = base.parent().unwrap().to_path_buf();
    let data = new_corpus(&dir);
    let fresh = |name: &str| dir.join(name);
    let refused = |args: Vec<String>, out: &Path, words: &[&str]| {
        let e = run_err(&args);
        for w in words {
            assert!(e.contains(w), "expected {w:?} in: {e}");
        }
        assert!(!out.exists(), "{} was written: {e}", out.display());
    };
    // --init-from a missing checkpoint, and a corrupt one.
    let out = fresh("o1");
    refused(
        finetune_args(&dir.join("nowhere"), &data, &out, 5, &[]),
        &out,
        &["nowhere"],
    );
    let broken = dir.join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    let src = checkpoint::latest_dir(&base).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, broken.join(p.file_name().unwrap())).unwrap();
    }
    let model = broken.join("model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    refused(
        finetune_args(&broken, &data, &out, 5, &[]),
        &out,
        &["model.safetensors"],
    );
    // Another model shape: the key is named.
    refused(
        finetune_args(&base, &data, &out, 5, &["model.n_embd=48"]),
        &out,
        &["model.n_embd"],
    );
    // Ranks of 0 and beyond the layer.
    refused(
        finetune_args(&base, &data, &out, 5, &["lora.rank=0"]),
        &out,
        &["lora.rank"],
    );
    refused(
        finetune_args(&base, &data, &out, 5, &["lora.rank=33"]),
        &out,
        &["lora.rank", "at most 32"],
    );
    // Characters the base's char tokenizer never saw, all named.
    let odd = dir.join("odd.txt");
    std::fs::write(&odd, "ROMEO:\nZounds! Qu'est-ce? 42\n".repeat(200)).unwrap();
    let e = run_err(&finetune_args(&base, &odd, &out, 5, &[]));
    for c in ["'Z'", "'Q'", "'4'", "'2'"] {
        assert!(e.contains(c), "{c} not named: {e}");
    }
    assert!(!out.exists(), "{} was written: {e}", out.display());

    // An adapter, then lies and other bases.
    let lora = fresh("lora");
    run_ok(&finetune_args(&base, &data, &lora, 3, &["lora.rank=2"]));
    let adapter = checkpoint::latest_dir(&lora).unwrap();
    // A refused corpus with --overwrite over an existing run: that run keeps every file.
    let kept = snapshot(&lora);
    let mut over = finetune_args(&base, &odd, &lora, 5, &[]);
    over.push("--overwrite".into());
    let e = run_err(&over);
    assert!(e.contains("'Z'"), "{e}");
    assert!(
        snapshot(&lora) == kept,
        "the refused run changed {}",
        lora.display()
    );
    // The run folder of the checkpoint fine-tuned from is never the output, even overwritten.
    let kept = snapshot(&base);
    let mut onto_base = finetune_args(&base, &data, &base, 5, &[]);
    onto_base.push("--overwrite".into());
    let e = run_err(&onto_base);
    assert!(e.contains("--out") && e.contains("--init-from"), "{e}");
    assert!(snapshot(&base) == kept, "the base run changed: {e}");
    let eval = |ck: &Path, lora: &Path| {
        vec![
            "eval".to_string(),
            "--checkpoint".into(),
            ck.display().to_string(),
            "--lora".into(),
            lora.display().to_string(),
            "--data".into(),
            data.display().to_string(),
        ]
    };
    let merge_out = fresh("merged");
    let merge = |ck: &Path, lora: &Path| {
        vec![
            "lora".to_string(),
            "merge".into(),
            "--checkpoint".into(),
            ck.display().to_string(),
            "--lora".into(),
            lora.display().to_string(),
            "--out".into(),
            merge_out.display().to_string(),
        ]
    };
    let liar = dir.join("liar");
    std::fs::create_dir_all(&liar).unwrap();
    std::fs::copy(
        adapter.join(ADAPTER_MODEL_FILE),
        liar.join(ADAPTER_MODEL_FILE),
    )
    .unwrap();
    let cfg = std::fs::read_to_string(adapter.join(ADAPTER_CONFIG_FILE)).unwrap();
    std::fs::write(
        liar.join(ADAPTER_CONFIG_FILE),
        cfg.replace("\"r\": 2", "\"r\": 3"),
    )
    .unwrap();
    refused(eval(&base, &liar), &merge_out, &["has shape", "r = 3"]);
    refused(merge(&base, &liar), &merge_out, &["has shape", "r = 3"]);
    // Another base: wider (shapes differ), and a Llama (names differ).
    let wide = dir.join("wide");
    let mut a = tiny_args(&corpus(&tempdir("ft-bad-wide")), &wide, 3);
    a.extend(["--set".into(), "model.n_embd=48".into()]);
    run_ok(&a);
    refused(eval(&wide, &adapter), &merge_out, &["shape"]);
    refused(merge(&wide, &adapter), &merge_out, &["shape"]);
    let llama = dir.join("llama");
    let mut a = tiny_args(&corpus(&tempdir("ft-bad-llama")), &llama, 3);
    a.extend(["--set".into(), "model.arch=\"llama\"".into()]);
    run_ok(&a);
    refused(eval(&llama, &adapter), &merge_out, &["another base"]);
    refused(merge(&llama, &adapter), &merge_out, &["another base"]);
}
