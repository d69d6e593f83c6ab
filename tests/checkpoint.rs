//! Checkpoints: bit-exact round trips, the standard file format, crash leftovers, retention,
//! compatibility checks and a clear error for each kind of damaged file.

use kiln::model::{Config, ModelConfig, ParamLayout};
use kiln::train::checkpoint::{self, Checkpoint, Metric, TrainingState};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use std::fs;
use std::path::{Path, PathBuf};

const VOCAB: usize = 11;

fn model(n_layer: usize, n_embd: usize) -> ModelConfig {
    ModelConfig {
        n_layer,
        n_head: 2,
        n_embd,
        block_size: 4,
        bias: true,
        ..ModelConfig::default()
    }
}

fn config() -> Config {
    let mut c = Config {
        model: model(2, 8),
        ..Config::default()
    };
    c.train.lr = 3e-4;
    c.train.min_lr = 3e-5;
    c
}

/// A fresh, empty directory under the target's scratch space.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("checkpoint-{name}"));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Random finite f32s drawn from all bit patterns (subnormals, -0.0 and extremes included), so
/// that any conversion that is not bit-exact shows.
fn random_finite(n: usize, seed: &mut u64) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let x = f32::from_bits(*seed as u32);
        if x.is_finite() {
            out.push(x);
        }
    }
    out
}

/// A checkpoint over `layout` with random tensors and zero padding.
fn checkpoint(step: u64, config: &Config, layout: &ParamLayout, seed: u64) -> Checkpoint {
    let mut seed = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut buffer = || {
        let mut flat = vec![0.0f32; layout.buffer_len()];
        for t in layout.tensors() {
            flat[t.offset..t.offset + t.len()].copy_from_slice(&random_finite(t.len(), &mut seed));
        }
        flat
    };
    let (master, m, v) = (buffer(), buffer(), buffer());
    Checkpoint {
        config: config.clone(),
        tokenizer_json: r#"{"chars":"abcdefghijk","type":"char"}"#.into(),
        state: TrainingState {
            step,
            tokens_seen: step * 4096,
            loss_scale: 32768.0,
            loss_scale_run: 17,
            skipped_steps: 3,
            best_val_loss: Some(1.875),
            best_step: Some(step),
            evals_without_improvement: 2,
            rng_seed: 0xDEAD_BEEF_0000_0001,
            metrics: vec![Metric {
                step,
                name: "train_loss".into(),
                value: 2.5,
            }],
        },
        layout: layout.clone(),
        master,
        m,
        v,
    }
}

fn dense_layout() -> ParamLayout {
    ParamLayout::gpt(&config().model, VOCAB, 1).unwrap()
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

fn assert_same(a: &Checkpoint, b: &Checkpoint) {
    assert_eq!(a.config, b.config);
    assert_eq!(a.tokenizer_json, b.tokenizer_json);
    assert_eq!(a.state, b.state);
    assert_eq!(a.layout, b.layout);
    assert!(bits(&a.master) == bits(&b.master), "master differs");
    assert!(bits(&a.m) == bits(&b.m), "m differs");
    assert!(bits(&a.v) == bits(&b.v), "v differs");
}

#[test]
fn round_trip_is_bit_identical_across_layouts() {
    let root = scratch("round-trip");
    let config = config();
    // An aligned device layout: the file must not depend on the padding.
    let aligned = ParamLayout::gpt(&config.model, VOCAB, 16).unwrap();
    assert!(aligned.buffer_len() > aligned.num_params());
    let mut saved = checkpoint(7, &config, &aligned, 1);
    saved.state.metrics.push(Metric {
        step: 7,
        name: "val_loss".into(),
        value: f64::NAN,
    });
    let dir = checkpoint::save(&root, &saved, 3).unwrap();
    assert_eq!(dir, root.join("step-7"));

    let loaded = checkpoint::load(&dir).unwrap();
    assert_eq!(
        loaded.layout,
        dense_layout(),
        "load returns the dense layout"
    );
    // JSON has no NaN: the metric comes back as NaN through null, everything else unchanged.
    assert!(loaded.state.metrics[1].value.is_nan());
    let mut expected_state = saved.state.clone();
    expected_state.metrics.pop();
    let mut got_state = loaded.state.clone();
    got_state.metrics.pop();
    assert_eq!(got_state, expected_state);

    // NaN is not equal to itself: compare the rest of the state.
    let mut back = loaded.with_layout(&aligned).unwrap();
    back.state.metrics.pop();
    saved.state.metrics.pop();
    assert_same(&back, &saved);
    assert_eq!(checkpoint::latest_dir(&root).unwrap(), dir);
}

#[test]
fn model_file_is_standard_safetensors() {
    let root = scratch("standard");
    let layout = dense_layout();
    let ckpt = checkpoint(1, &config(), &layout, 2);
    let dir = checkpoint::save(&root, &ckpt, 3).unwrap();

    let bytes = fs::read(dir.join("model.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<&str> = file.names();
    names.sort();
    let mut expected: Vec<&str> = layout.tensors().iter().map(|t| t.name.as_str()).collect();
    expected.sort();
    assert_eq!(names, expected);
    assert!(names.contains(&"h.1.attn.c_attn.weight"));
    for t in layout.tensors() {
        let view = file.tensor(&t.name).unwrap();
        assert_eq!(view.dtype(), Dtype::F32, "{}", t.name);
        assert_eq!(view.shape(), &t.shape[..], "{}", t.name);
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(
            bits(&values),
            bits(&ckpt.master[t.offset..t.offset + t.len()])
        );
    }

    let bytes = fs::read(dir.join("optimizer.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(file.len(), 2 * layout.tensors().len());
    let t = layout.get("h.0.mlp.c_proj.weight").unwrap();
    let v = file.tensor("v.h.0.mlp.c_proj.weight").unwrap();
    assert_eq!(v.shape(), &t.shape[..]);
    assert_eq!(
        &v.data()[..4],
        &ckpt.v[t.offset].to_le_bytes(),
        "v.<name> holds the second moment"
    );
    assert!(file.tensor("m.wte.weight").is_ok());

    let toml = fs::read_to_string(dir.join("config.toml")).unwrap();
    assert_eq!(Config::from_toml(&toml, &[]).unwrap(), config());
    let state: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["version"], 1);
    assert_eq!(state["step"], 1);
}

#[test]
fn crash_leftovers_do_not_hide_the_previous_checkpoint() {
    let root = scratch("crash");
    let layout = dense_layout();
    checkpoint::save(&root, &checkpoint(1, &config(), &layout, 1), 3).unwrap();
    let second = checkpoint(2, &config(), &layout, 2);
    checkpoint::save(&root, &second, 3).unwrap();

    // A save of step 3 killed mid-way: a half-filled temporary folder (no step-3 yet) and a
    // half-written pointer update.
    let tmp = root.join(".tmp-step-3-4242");
    fs::create_dir(&tmp).unwrap();
    fs::write(tmp.join("model.safetensors"), [1u8, 2, 3]).unwrap();
    fs::write(root.join("latest.tmp"), "ste").unwrap();
    assert_same(&checkpoint::load_latest(&root).unwrap(), &second);

    // Killed after the folder rename but before the pointer moved: the pointer still names
    // step-2, which is complete and is what loads.
    fs::write(root.join("latest.tmp"), "step-3\n").unwrap();
    assert_eq!(checkpoint::latest_dir(&root).unwrap(), root.join("step-2"));

    // The next save cleans up the leftovers.
    checkpoint::save(&root, &checkpoint(3, &config(), &layout, 3), 3).unwrap();
    assert!(!tmp.exists(), "leftover temporary folder survived a save");
    assert!(!root.join("latest.tmp").exists());
    assert_eq!(checkpoint::load_latest(&root).unwrap().state.step, 3);
}

#[test]
fn broken_pointer_falls_back_to_the_newest_complete_folder() {
    let root = scratch("pointer");
    let layout = dense_layout();
    let first = checkpoint(10, &config(), &layout, 1);
    checkpoint::save(&root, &first, 3).unwrap();
    checkpoint::save(&root, &checkpoint(20, &config(), &layout, 2), 3).unwrap();
    assert_eq!(
        fs::read_to_string(root.join("latest")).unwrap().trim(),
        "step-20"
    );

    // The pointer names a deleted folder.
    fs::remove_dir_all(root.join("step-20")).unwrap();
    assert_same(&checkpoint::load_latest(&root).unwrap(), &first);

    // An incomplete folder of a higher step is not a candidate.
    fs::create_dir(root.join("step-30")).unwrap();
    fs::write(root.join("step-30/state.json"), "{}").unwrap();
    for pointer in [None, Some("garbage\n"), Some("../step-10"), Some("step-30")] {
        match pointer {
            Some(text) => fs::write(root.join("latest"), text).unwrap(),
            None => {
                let _ = fs::remove_file(root.join("latest"));
            }
        }
        assert_eq!(
            checkpoint::latest_dir(&root).unwrap(),
            root.join("step-10"),
            "pointer {pointer:?}"
        );
    }

    let empty = scratch("pointer-empty");
    let e = checkpoint::load_latest(&empty).unwrap_err().to_string();
    assert!(e.contains("no checkpoint here"), "{e}");
    let e = checkpoint::load_latest(&empty.join("absent"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no such directory"), "{e}");
}

#[test]
fn retention_keeps_the_newest_k_and_resaving_a_step_replaces_it() {
    let root = scratch("retention");
    let layout = dense_layout();
    for step in 1..=5 {
        checkpoint::save(&root, &checkpoint(step, &config(), &layout, step), 2).unwrap();
    }
    let mut names: Vec<String> = fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["latest", "step-4", "step-5"]);

    for step in 6..=9 {
        checkpoint::save(
            &root,
            &checkpoint(step, &config(), &layout, step),
            checkpoint::DEFAULT_KEEP,
        )
        .unwrap();
    }
    assert!(root.join("step-7").is_dir() && root.join("step-9").is_dir());
    assert!(!root.join("step-6").exists());

    // A re-run reaching step 9 again replaces it, leaving nothing moved aside.
    let again = checkpoint(9, &config(), &layout, 99);
    checkpoint::save(&root, &again, 3).unwrap();
    assert_same(&checkpoint::load_latest(&root).unwrap(), &again);
    let leftovers: Vec<_> = fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A crash between moving the old step-9 aside and renaming the new one into place leaves
    // only the moved-aside copy, which still loads.
    fs::rename(root.join("step-9"), root.join(".old-step-9-77")).unwrap();
    fs::remove_dir_all(root.join("step-8")).unwrap();
    fs::remove_dir_all(root.join("step-7")).unwrap();
    assert_same(&checkpoint::load_latest(&root).unwrap(), &again);
}

#[test]
fn check_compatible_names_the_differences() {
    let layout = dense_layout();
    let ckpt = checkpoint(1, &config(), &layout, 1);
    let mut fine_tune = config();
    fine_tune.train.lr = 1e-5;
    fine_tune.train.min_lr = 1e-6;
    fine_tune.model.dropout = 0.1;
    checkpoint::check_compatible(&ckpt, &fine_tune, &layout).unwrap();

    let mut other = config();
    other.model = model(6, 16);
    let other_layout = ParamLayout::gpt(&other.model, 13, 1).unwrap();
    let e = checkpoint::check_compatible(&ckpt, &other, &other_layout)
        .unwrap_err()
        .to_string();
    for want in [
        "different config",
        "model.n_layer 2 vs 6",
        "model.n_embd 8 vs 16",
        "model.vocab_size 11 vs 13",
        "wte.weight [11, 8] vs [13, 16]",
        "more",
    ] {
        assert!(e.contains(want), "{want:?} not in: {e}");
    }
    assert!(ckpt.clone().with_layout(&other_layout).is_err());

    let mut vocab_only = config();
    vocab_only.model.vocab_size = 12;
    let e = checkpoint::check_compatible(
        &ckpt,
        &vocab_only,
        &ParamLayout::gpt(&vocab_only.model, 12, 1).unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("model.vocab_size 11 vs 12"), "{e}");
    assert!(!e.contains("n_layer"), "{e}");
}

#[test]
fn save_refuses_what_load_would_reject() {
    let root = scratch("refuse");
    let layout = dense_layout();
    let mut ckpt = checkpoint(1, &config(), &layout, 1);
    let t = layout.get("h.1.mlp.c_fc.weight").unwrap();
    ckpt.master[t.offset + 5] = f32::INFINITY;
    let e = checkpoint::save(&root, &ckpt, 3).unwrap_err().to_string();
    assert!(e.contains("h.1.mlp.c_fc.weight[5]"), "{e}");

    let mut ckpt = checkpoint(1, &config(), &layout, 1);
    ckpt.v[layout.get("wpe.weight").unwrap().offset] = f32::NAN;
    let e = checkpoint::save(&root, &ckpt, 3).unwrap_err().to_string();
    assert!(e.contains("checkpoint v wpe.weight[0] = NaN"), "{e}");

    let mut ckpt = checkpoint(1, &config(), &layout, 1);
    ckpt.m.pop();
    let e = checkpoint::save(&root, &ckpt, 3).unwrap_err().to_string();
    assert!(e.contains("buffer m"), "{e}");

    let mut ckpt = checkpoint(1, &config(), &layout, 1);
    ckpt.config.model.n_layer = 3;
    let e = checkpoint::save(&root, &ckpt, 3).unwrap_err().to_string();
    assert!(e.contains("h.2.ln_1.weight"), "{e}");
    assert!(!root.join("step-1").exists() && !root.join("latest").exists());
}

/// Saves a fresh checkpoint, damages its folder with `damage` and returns `load`'s error.
fn load_error(name: &str, damage: impl FnOnce(&Path)) -> String {
    let root = scratch(&format!("damaged-{name}"));
    let dir = checkpoint::save(&root, &checkpoint(1, &config(), &dense_layout(), 5), 3).unwrap();
    damage(&dir);
    match checkpoint::load(&dir) {
        Ok(_) => panic!("{name}: damaged checkpoint loaded"),
        Err(e) => e.to_string(),
    }
}

fn assert_contains(e: &str, wanted: &[&str]) {
    for w in wanted {
        assert!(e.contains(w), "{w:?} not in: {e}");
    }
}

type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

/// Rewrites a safetensors file through `edit` on its tensor list.
fn rewrite(path: &Path, edit: impl FnOnce(&mut Tensors)) {
    let bytes = fs::read(path).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Tensors = file
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let views = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()));
    fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// Writes a safetensors file from a raw header, so that it can lie.
fn write_raw(path: &Path, header: &str, data: &[u8]) {
    let mut header = header.as_bytes().to_vec();
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header);
    bytes.extend(data);
    fs::write(path, bytes).unwrap();
}

#[test]
fn missing_files_are_named() {
    for file in [
        "model.safetensors",
        "optimizer.safetensors",
        "config.toml",
        "tokenizer.json",
        "state.json",
    ] {
        let e = load_error(&format!("missing-{file}"), |d| {
            fs::remove_file(d.join(file)).unwrap()
        });
        assert_contains(&e, &[file, "missing", "load an earlier checkpoint"]);
    }
}

#[test]
fn truncated_safetensors_files_are_reported() {
    let e = load_error("short", |d| {
        fs::write(d.join("model.safetensors"), [7u8; 5]).unwrap()
    });
    assert_contains(&e, &["model.safetensors", "truncated", "5 bytes"]);

    let e = load_error("cut-header", |d| {
        let path = d.join("optimizer.safetensors");
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..40]).unwrap();
    });
    assert_contains(&e, &["optimizer.safetensors", "truncated", "only 32 bytes"]);

    // Cut inside the data: the header is intact but promises more than is there.
    let e = load_error("cut-data", |d| {
        let path = d.join("model.safetensors");
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
    });
    assert_contains(&e, &["model.safetensors", "lies about sizes", "beyond"]);
}

#[test]
fn lying_headers_are_reported() {
    let e = load_error("offsets-past-end", |d| {
        write_raw(
            &d.join("model.safetensors"),
            r#"{"wte.weight":{"dtype":"F32","shape":[11,8],"data_offsets":[0,352000]}}"#,
            &[0u8; 352],
        )
    });
    assert_contains(
        &e,
        &["tensor wte.weight", "data_offsets [0, 352000]", "352 bytes"],
    );

    let e = load_error("length-vs-shape", |d| {
        write_raw(
            &d.join("model.safetensors"),
            r#"{"ln_f.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}}"#,
            &[0u8; 12],
        )
    });
    assert_contains(
        &e,
        &["tensor ln_f.weight", "[2, 2]", "needs 16 bytes", "span 12"],
    );

    // Sizes right, but a gap between tensors: the safetensors crate's own rule.
    let e = load_error("gap", |d| {
        write_raw(
            &d.join("model.safetensors"),
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},
                "b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#,
            &[0u8; 12],
        )
    });
    assert_contains(&e, &["not a valid safetensors file", "invalid offset"]);

    let e = load_error("not-json", |d| {
        write_raw(&d.join("model.safetensors"), "{not json", &[])
    });
    assert_contains(&e, &["header is not a JSON object"]);
}

#[test]
fn wrong_dtype_is_reported() {
    let e = load_error("dtype", |d| {
        rewrite(&d.join("model.safetensors"), |ts| {
            let t = ts.iter_mut().find(|t| t.0 == "wpe.weight").unwrap();
            t.1 = Dtype::F16;
            t.3.truncate(t.3.len() / 2);
        })
    });
    assert_contains(&e, &["tensor wpe.weight has dtype F16", "F32"]);
}

#[test]
fn tensors_that_do_not_match_the_layout_are_reported() {
    let e = load_error("missing-tensor", |d| {
        rewrite(&d.join("model.safetensors"), |ts| {
            ts.retain(|t| t.0 != "h.1.mlp.c_fc.weight")
        })
    });
    assert_contains(
        &e,
        &[
            "model.safetensors",
            "missing tensors: h.1.mlp.c_fc.weight [32, 8]",
        ],
    );

    let e = load_error("shape", |d| {
        rewrite(&d.join("model.safetensors"), |ts| {
            ts.iter_mut().find(|t| t.0 == "ln_f.weight").unwrap().2 = vec![2, 4];
        })
    });
    assert_contains(&e, &["ln_f.weight has shape [2, 4]", "says [8]"]);

    let e = load_error("extra", |d| {
        rewrite(&d.join("optimizer.safetensors"), |ts| {
            ts.push(("lm_head.weight".into(), Dtype::F32, vec![1], vec![0; 4]));
            ts.push(("m.h.7.ln_1.weight".into(), Dtype::F32, vec![1], vec![0; 4]));
        })
    });
    assert_contains(
        &e,
        &[
            "optimizer.safetensors",
            "extra tensors",
            "lm_head.weight",
            "m.h.7.ln_1.weight",
        ],
    );

    // Moments under the wrong prefix are both missing and extra.
    let e = load_error("prefix", |d| {
        rewrite(&d.join("optimizer.safetensors"), |ts| {
            for t in ts.iter_mut() {
                if let Some(rest) = t.0.strip_prefix("v.") {
                    t.0 = format!("second.{rest}");
                }
            }
        })
    });
    assert_contains(
        &e,
        &[
            "missing tensors: v.wte.weight [11, 8]",
            "extra tensors not in the config's layout: second.h.0.",
        ],
    );
}

#[test]
fn non_finite_values_name_the_tensor() {
    let e = load_error("nan", |d| {
        rewrite(&d.join("model.safetensors"), |ts| {
            let t = ts
                .iter_mut()
                .find(|t| t.0 == "h.0.attn.c_proj.weight")
                .unwrap();
            t.3[12..16].copy_from_slice(&f32::NAN.to_le_bytes());
        })
    });
    assert_contains(
        &e,
        &["tensor h.0.attn.c_proj.weight holds NaN at element 3"],
    );
}

#[test]
fn bad_state_and_config_are_reported() {
    let e = load_error("version", |d| {
        let path = d.join("state.json");
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"version\": 1"), "{text}");
        fs::write(&path, text.replace("\"version\": 1", "\"version\": 99")).unwrap();
    });
    assert_contains(&e, &["state.json", "format version 99", "reads version 1"]);

    let e = load_error("no-version", |d| {
        fs::write(d.join("state.json"), r#"{"step": 1}"#).unwrap()
    });
    assert_contains(&e, &["state.json", "no format `version`"]);

    let e = load_error("state-fields", |d| {
        fs::write(d.join("state.json"), r#"{"version": 1, "step": "one"}"#).unwrap()
    });
    assert_contains(&e, &["state.json", "not a valid training state"]);

    let e = load_error("config", |d| {
        fs::write(d.join("config.toml"), "model = [").unwrap()
    });
    assert_contains(&e, &["config.toml", "does not parse"]);

    let e = load_error("config-invalid", |d| {
        fs::write(d.join("config.toml"), "[model]\nn_head = 3\nn_embd = 8\n").unwrap()
    });
    assert_contains(&e, &["config.toml", "model.n_embd"]);

    let e = load_error("tokenizer", |d| {
        fs::write(d.join("tokenizer.json"), "{\"vo").unwrap()
    });
    assert_contains(&e, &["tokenizer.json", "not valid JSON"]);
}
