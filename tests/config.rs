//! Config parsing and validation, and the parameter layout.

use kiln::Error;
use kiln::model::{Component, Config, ParamKind, ParamLayout};

fn err(text: &str, overrides: &[&str]) -> String {
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    match Config::from_toml(text, &o) {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn gpt2_small_has_124_439_808_parameters() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/configs/gpt2-small.toml"
    ))
    .unwrap();
    let config = Config::from_toml(&text, &[]).unwrap();
    let layout = ParamLayout::gpt(&config.model, 50257, 1).unwrap();
    assert_eq!(layout.num_params(), 124_439_808);
    assert_eq!(
        layout.count(Component::Embedding, ParamKind::Weight),
        50257 * 768 + 1024 * 768
    );
    assert_eq!(layout.count_kind(ParamKind::Bias), 102_144);
    assert_eq!(
        layout.count(Component::Head, ParamKind::Weight),
        0,
        "the head is tied"
    );
    // 12 layers × 12 tensors + wte, wpe, ln_f.weight, ln_f.bias
    assert_eq!(layout.tensors().len(), 12 * 12 + 4);
}

#[test]
fn layout_offsets_are_aligned_and_disjoint() {
    let config = Config::default();
    let layout = ParamLayout::gpt(&config.model, 65, 64).unwrap();
    let mut end = 0;
    for t in layout.tensors() {
        assert_eq!(t.offset % 64, 0, "{}", t.name);
        assert!(t.offset >= end, "{} overlaps its predecessor", t.name);
        end = t.offset + t.len();
    }
    assert_eq!(end, layout.buffer_len());
    assert!(layout.buffer_len() >= layout.num_params());
    // Matrices decay; norms and (by default) the position table do not.
    assert!(layout.get("wte.weight").unwrap().decayed);
    assert!(!layout.get("wpe.weight").unwrap().decayed);
    assert!(layout.get("h.0.mlp.c_fc.weight").unwrap().decayed);
    assert!(!layout.get("h.3.ln_2.weight").unwrap().decayed);
}

#[test]
fn shipped_configs_parse() {
    for name in ["shakespeare-char-baby", "shakespeare-char", "gpt2-small"] {
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join(format!("configs/{name}.toml"));
        Config::load(&path, &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn overrides_apply_and_are_validated() {
    let c = Config::from_toml(
        "[sample]\ntop_p = 0.9\nstop = [\"\\n\\n\"]\n",
        &[
            "sample.max_tokens=42".into(),
            "train.lr=3e-4".into(),
            "model.n_layer=6".into(),
            "data.tokenizer=bpe".into(),
        ],
    )
    .unwrap();
    assert_eq!(c.train.lr, 3e-4);
    assert_eq!(c.model.n_layer, 6);
    assert_eq!(
        (c.sample.top_p, c.sample.max_tokens, c.sample.stop.clone()),
        (0.9, 42, vec!["\n\n".to_string()])
    );
    assert_eq!(c.data.tokenizer, kiln::model::TokenizerKind::Bpe);
    let e = err("", &["train.lr=-1"]);
    assert!(
        e.contains("train.lr") && e.contains("-1") && e.contains("≥ 0"),
        "{e}"
    );
    let e = err("", &["lr=1"]);
    assert!(e.contains("section.key=value"), "{e}");
}

#[test]
fn malformed_toml_names_the_position() {
    let e = err("[model\nn_layer = 4\n", &[]);
    assert!(e.starts_with("config:"), "{e}");
    assert!(e.contains("line 1"), "{e}");
}

#[test]
fn unknown_keys_are_rejected_by_name() {
    let e = err("[model]\nn_layers = 4\n", &[]);
    assert!(e.contains("n_layers"), "{e}");
    let e = err("[trian]\nlr = 1.0\n", &[]);
    assert!(e.contains("trian"), "{e}");
}

#[test]
fn invalid_values_name_key_value_and_rule() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "[model]\nn_embd = 130\nn_head = 4\n",
            "model.n_embd",
            "divisible by model.n_head = 4",
        ),
        ("[model]\nn_layer = 0\n", "model.n_layer", "at least 1"),
        (
            "[train]\nbatch_size = 0\n",
            "train.batch_size",
            "at least 1",
        ),
        (
            "[train]\nlr = 1e-4\nmin_lr = 1e-3\n",
            "train.min_lr",
            "must not exceed",
        ),
        ("[train]\nbeta2 = 1.0\n", "train.beta2", "[0, 1)"),
        ("[model]\ndropout = 1.5\n", "model.dropout", "[0, 1)"),
        (
            "[data]\nval_fraction = 0.0\n",
            "data.val_fraction",
            "(0, 1)",
        ),
        (
            "[sample]\ntemperature = -1.0\n",
            "sample.temperature",
            "≥ 0",
        ),
        ("[sample]\ntop_k = 0\n", "sample.top_k", "at least 1"),
        (
            "[train]\ninit_loss_scale = 0.0\n",
            "train.init_loss_scale",
            "[2^-24, 2^24]",
        ),
    ];
    for (text, key, rule) in cases {
        let e = err(text, &[]);
        assert!(e.contains(key) && e.contains(rule), "{text:?} gave: {e}");
    }
    // A negative size is a type error from the parser, which names the key.
    let e = err("[model]\nn_layer = -2\n", &[]);
    assert!(e.contains("n_layer"), "{e}");
}

#[test]
fn a_missing_file_is_an_io_error() {
    let e = Config::load(std::path::Path::new("/nonexistent/kiln.toml"), &[]).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    assert!(e.to_string().contains("/nonexistent/kiln.toml"), "{e}");
}
