//! Helpers for the tests that run the `kiln` command on a tiny model: a corpus, the arguments of
//! a tiny run, fresh folders and the logged losses. Included with `#[path]` by the test files
//! that train, so the other test binaries do not compile it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Whether this machine's adapter opens with f16 storage (SHADER_F16); `auto` may still be f32.
pub fn f16_granted() -> bool {
    kiln::Gpu::with_options(&kiln::GpuOptions {
        precision: kiln::PrecisionChoice::F16,
        ..Default::default()
    })
    .is_ok()
}

pub fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

/// A few kilobytes of repetitive play-like text (so a tiny model can learn something).
pub fn corpus(dir: &Path) -> PathBuf {
    let names = ["ROMEO", "JULIET", "NURSE", "FRIAR"];
    let lines = [
        "What light through yonder window breaks?",
        "O, swear not by the moon.",
        "Good night, good night!",
        "These violent delights have violent ends.",
    ];
    let mut text = String::new();
    for i in 0..300 {
        text.push_str(&format!(
            "{}:\n{}\n\n",
            names[i % 4],
            lines[(i * 3 + i / 4) % 4]
        ));
    }
    let path = dir.join("corpus.txt");
    std::fs::write(&path, text).unwrap();
    path
}

pub fn tiny_args(data: &Path, out: &Path, max_steps: u32) -> Vec<String> {
    [
        "train",
        "--quiet",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--set",
        "model.n_layer=2",
        "--set",
        "model.n_head=2",
        "--set",
        "model.n_embd=32",
        "--set",
        "model.block_size=16",
        "--set",
        "train.batch_size=4",
        "--set",
        "train.warmup_steps=5",
        "--set",
        "train.eval_batches=2",
        "--set",
        "train.eval_interval=30",
        "--set",
        "train.checkpoint_interval=30",
        "--set",
        "train.lr=3e-3",
        "--set",
        "train.min_lr=3e-4",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(["--set".into(), format!("train.max_steps={max_steps}")])
    .collect()
}

pub fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// step → the train_loss text as logged (the JSON of an f32, so equal text is equal bits).
pub fn train_losses(out: &Path) -> BTreeMap<u64, String> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let mut map = BTreeMap::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v.get("val_loss").is_none() && v.get("train_loss").is_some() {
            map.insert(v["step"].as_u64().unwrap(), v["train_loss"].to_string());
        }
    }
    map
}

/// Trains the tiny model for `steps` steps on a fresh corpus in a fresh folder and checks it
/// succeeded; returns (corpus, run folder).
pub fn train_tiny(name: &str, steps: u32) -> (PathBuf, PathBuf) {
    let dir = tempdir(name);
    let data = corpus(&dir);
    let out = dir.join("run");
    let st = kiln().args(tiny_args(&data, &out, steps)).output().unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    (data, out)
}
