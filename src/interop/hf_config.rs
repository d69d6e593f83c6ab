//! `config.json` and `generation_config.json` of a Hugging Face model: written from a kiln
//! config on export, read into one on import, with every key the two `transformers` classes
//! (`GPT2LMHeadModel`, `LlamaForCausalLM`) read for the function the model computes.

use crate::generate::SamplingParams;
use crate::model::{ArchKind, Config, MlpKind, ModelConfig, NormKind, PositionKind};
use crate::{Error, Result};
use serde_json::{Map, Value, json};

/// GPT-2's tanh-approximated GELU under the names `transformers` gives it (kiln's GELU).
const TANH_GELU: [&str; 2] = ["gelu_new", "gelu_pytorch_tanh"];

/// Refuses a kiln model that neither `GPT2LMHeadModel` nor `LlamaForCausalLM` computes, naming
/// the key that puts it out of reach.
pub fn check_exportable(model: &ModelConfig) -> Result<()> {
    model.validate_parts()?;
    if model.moe.is_some() {
        // GPT2LMHeadModel has no routed MLP, and the exporter does not write Mixtral's
        // per-expert tensors yet: refuse rather than export the dense parts alone.
        return Err(Error::invalid(
            "model.moe",
            "(set)",
            "a mixture-of-experts model cannot be exported yet: GPT2LMHeadModel and \
             LlamaForCausalLM have no routed MLP, and the Mixtral layout is not written",
        ));
    }
    let p = model.parts();
    let (class, want) = match model.arch {
        ArchKind::Gpt2 => (
            "GPT2LMHeadModel",
            [
                ("model.norm", p.norm == NormKind::LayerNorm, "layernorm"),
                (
                    "model.positions",
                    p.positions == PositionKind::Learned,
                    "learned",
                ),
                ("model.mlp", p.mlp == MlpKind::Gelu, "gelu"),
                (
                    "model.n_kv_head",
                    p.n_kv_head == model.n_head,
                    "model.n_head (no grouped-query attention)",
                ),
            ],
        ),
        ArchKind::Llama => (
            "LlamaForCausalLM",
            [
                ("model.norm", p.norm == NormKind::RmsNorm, "rmsnorm"),
                ("model.positions", p.positions == PositionKind::Rope, "rope"),
                ("model.mlp", p.mlp == MlpKind::SwiGlu, "swiglu"),
                (
                    "model.bias",
                    !model.bias,
                    "false (kiln's Llama biases include RMSNorm shifts, which it has no place for)",
                ),
            ],
        ),
    };
    for (key, ok, need) in want {
        if !ok {
            return Err(Error::invalid(
                key,
                current(model, key),
                format!("{class} needs {need}; this model cannot be exported to it"),
            ));
        }
    }
    Ok(())
}

fn current(model: &ModelConfig, key: &str) -> String {
    let p = model.parts();
    match key {
        "model.norm" => format!("{:?}", p.norm).to_lowercase(),
        "model.positions" => format!("{:?}", p.positions).to_lowercase(),
        "model.mlp" => format!("{:?}", p.mlp).to_lowercase(),
        "model.n_kv_head" => p.n_kv_head.to_string(),
        _ => model.bias.to_string(),
    }
}

/// The `config.json` of `config`'s model with `vocab` tokens, its tensors stored as `dtype`
/// (`float32` or `float16`); `eos` is the id of the tokenizer's end-of-text token, if any.
pub fn to_hf_config(config: &Config, vocab: usize, dtype: &str, eos: Option<u32>) -> Result<Value> {
    let m = &config.model;
    check_exportable(m)?;
    let p = m.parts();
    let mut v = match m.arch {
        ArchKind::Gpt2 => json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": vocab,
            "n_positions": m.block_size,
            "n_ctx": m.block_size,
            "n_embd": m.n_embd,
            "n_layer": m.n_layer,
            "n_head": m.n_head,
            "n_inner": p.mlp_hidden,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": f32_json(p.norm_eps),
            // kiln drops attention probabilities and residual branches, never the embedding.
            "attn_pdrop": f32_json(m.dropout),
            "resid_pdrop": f32_json(m.dropout),
            "embd_pdrop": 0.0,
            "summary_first_dropout": 0.0,
            "scale_attn_weights": true,
            "scale_attn_by_inverse_layer_idx": false,
            "reorder_and_upcast_attn": false,
            "add_cross_attention": false,
            "tie_word_embeddings": p.tie_embeddings,
            "initializer_range": 0.02,
            "use_cache": true,
        }),
        ArchKind::Llama => json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": m.n_embd,
            "intermediate_size": p.mlp_hidden,
            "num_hidden_layers": m.n_layer,
            "num_attention_heads": m.n_head,
            "num_key_value_heads": p.n_kv_head,
            "head_dim": m.n_embd / m.n_head,
            "hidden_act": "silu",
            "max_position_embeddings": m.block_size,
            "rms_norm_eps": f32_json(p.norm_eps),
            "rope_theta": f32_json(p.rope_theta),
            "rope_scaling": null,
            // transformers 5 reads the rope settings from here, 4 from the two keys above.
            "rope_parameters": {"rope_type": "default", "rope_theta": f32_json(p.rope_theta)},
            "attention_bias": false,
            "mlp_bias": false,
            "attention_dropout": f32_json(m.dropout),
            "tie_word_embeddings": p.tie_embeddings,
            "pretraining_tp": 1,
            "initializer_range": 0.02,
            "use_cache": true,
        }),
    };
    let o = v.as_object_mut().expect("a JSON object");
    o.insert("torch_dtype".into(), dtype.into());
    o.insert("dtype".into(), dtype.into());
    // Null rather than absent: GPT2Config's defaults name GPT-2's own 50256.
    o.insert("bos_token_id".into(), eos.into());
    o.insert("eos_token_id".into(), eos.into());
    Ok(v)
}

/// `generation_config.json` from the `[sample]` table: greedy when its temperature is 0.
pub fn to_generation_config(s: &SamplingParams, eos: Option<u32>) -> Value {
    let mut v = json!({
        "do_sample": s.temperature > 0.0,
        "max_new_tokens": s.max_tokens,
        "repetition_penalty": f32_json(s.repetition_penalty),
        "top_p": f32_json(s.top_p),
        "top_k": s.top_k.unwrap_or(0),
    });
    let o = v.as_object_mut().expect("a JSON object");
    if s.temperature > 0.0 {
        o.insert("temperature".into(), f32_json(s.temperature));
    }
    o.insert("bos_token_id".into(), eos.into());
    o.insert("eos_token_id".into(), eos.into());
    v
}

/// The `[sample]` settings a `generation_config.json` gives (kiln's defaults for what it leaves
/// out or what kiln lacks).
pub fn from_generation_config(v: &Value) -> SamplingParams {
    let mut s = SamplingParams::default();
    let f = |k: &str| v.get(k).and_then(Value::as_f64);
    if v.get("do_sample").and_then(Value::as_bool) == Some(false) {
        s.temperature = 0.0;
    } else if let Some(t) = f("temperature") {
        s.temperature = t as f32;
    }
    if let Some(k) = v.get("top_k").and_then(Value::as_u64) {
        s.top_k = (k > 0).then_some(k as usize);
    }
    if let Some(p) = f("top_p") {
        s.top_p = p as f32;
    }
    if let Some(r) = f("repetition_penalty") {
        s.repetition_penalty = r as f32;
    }
    if let Some(n) = v.get("max_new_tokens").and_then(Value::as_u64) {
        s.max_tokens = n as usize;
    }
    s
}

/// Reads a `config.json` into kiln's model settings. `file` names it in errors. Refuses another
/// `model_type`, a missing or contradictory key, and settings kiln cannot compute (another
/// activation, RoPE scaling, biases in a Llama), each naming the key.
pub fn from_hf_config(v: &Value, file: &str) -> Result<ModelConfig> {
    let o = v
        .as_object()
        .ok_or_else(|| bad(file, "(root)", "must be a JSON object"))?;
    let r = Reader { o, file };
    match r.str("model_type")? {
        "gpt2" => gpt2_model(&r),
        "llama" => llama_model(&r),
        other => Err(bad(
            file,
            "model_type",
            format!("is {other:?}; kiln imports \"gpt2\" and \"llama\""),
        )),
    }
}

fn gpt2_model(r: &Reader<'_>) -> Result<ModelConfig> {
    let c = r.usize("n_embd")?;
    let n_positions = r.usize("n_positions")?;
    if let Some(n_ctx) = r.opt_usize("n_ctx")?
        && n_ctx != n_positions
    {
        return Err(bad(
            r.file,
            "n_ctx",
            format!("is {n_ctx} but n_positions is {n_positions}; they must agree"),
        ));
    }
    let act = r.opt_str("activation_function")?.unwrap_or("gelu_new");
    if !TANH_GELU.contains(&act) {
        return Err(bad(
            r.file,
            "activation_function",
            format!("is {act:?}; kiln's GELU is the tanh approximation (\"gelu_new\")"),
        ));
    }
    for (key, refused) in [
        ("scale_attn_by_inverse_layer_idx", true),
        ("add_cross_attention", true),
        ("scale_attn_weights", false),
    ] {
        if r.opt_bool(key)? == Some(refused) {
            return Err(bad(
                r.file,
                key,
                format!("is {refused}; kiln cannot compute that"),
            ));
        }
    }
    let dropout = r.opt_f64("resid_pdrop")?.unwrap_or(0.0) as f32;
    let m = ModelConfig {
        arch: ArchKind::Gpt2,
        n_layer: r.usize("n_layer")?,
        n_head: r.usize("n_head")?,
        n_embd: c,
        block_size: n_positions,
        bias: true,
        dropout,
        vocab_size: r.usize("vocab_size")?,
        norm_eps: Some(r.opt_f64("layer_norm_epsilon")?.unwrap_or(1e-5) as f32),
        mlp_hidden: Some(r.opt_usize("n_inner")?.unwrap_or(4 * c)),
        tie_embeddings: Some(r.opt_bool("tie_word_embeddings")?.unwrap_or(true)),
        ..ModelConfig::default()
    };
    checked(m, r.file)
}

fn llama_model(r: &Reader<'_>) -> Result<ModelConfig> {
    let c = r.usize("hidden_size")?;
    let heads = r.usize("num_attention_heads")?;
    if let Some(hd) = r.opt_usize("head_dim")?
        && hd * heads != c
    {
        return Err(bad(
            r.file,
            "head_dim",
            format!(
                "is {hd} but hidden_size / num_attention_heads is {c} / {heads}; kiln needs head_dim · heads = hidden_size"
            ),
        ));
    }
    let act = r.opt_str("hidden_act")?.unwrap_or("silu");
    if act != "silu" {
        return Err(bad(
            r.file,
            "hidden_act",
            format!("is {act:?}; kiln's SwiGLU uses \"silu\""),
        ));
    }
    for key in ["attention_bias", "mlp_bias"] {
        if r.opt_bool(key)? == Some(true) {
            return Err(bad(r.file, key, "is true; kiln's Llama has no biases"));
        }
    }
    let theta = rope_theta(r)?;
    let m = ModelConfig {
        arch: ArchKind::Llama,
        n_layer: r.usize("num_hidden_layers")?,
        n_head: heads,
        n_embd: c,
        block_size: r.usize("max_position_embeddings")?,
        bias: false,
        dropout: r.opt_f64("attention_dropout")?.unwrap_or(0.0) as f32,
        vocab_size: r.usize("vocab_size")?,
        norm: Some(NormKind::RmsNorm),
        // transformers' LlamaConfig default.
        norm_eps: Some(r.opt_f64("rms_norm_eps")?.unwrap_or(1e-6) as f32),
        positions: Some(PositionKind::Rope),
        rope_theta: Some(theta),
        mlp: Some(MlpKind::SwiGlu),
        mlp_hidden: Some(r.usize("intermediate_size")?),
        n_kv_head: Some(r.opt_usize("num_key_value_heads")?.unwrap_or(heads)),
        tie_embeddings: Some(r.opt_bool("tie_word_embeddings")?.unwrap_or(false)),
        ..ModelConfig::default()
    };
    checked(m, r.file)
}

/// RoPE's base from `rope_theta` / `rope_scaling` (transformers 4) or `rope_parameters` (5);
/// any scaling but the default is refused, and the two forms must agree.
fn rope_theta(r: &Reader<'_>) -> Result<f32> {
    let legacy = r.opt_f64("rope_theta")?;
    let mut theta = legacy;
    for key in ["rope_scaling", "rope_parameters"] {
        let Some(v) = r.o.get(key).filter(|v| !v.is_null()) else {
            continue;
        };
        let kind = v
            .get("rope_type")
            .or_else(|| v.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        if kind != "default" {
            return Err(bad(
                r.file,
                key,
                format!("asks for {kind:?} RoPE scaling; kiln has plain RoPE only"),
            ));
        }
        if let Some(t) = v.get("rope_theta").and_then(Value::as_f64) {
            if legacy.is_some_and(|l| l != t) {
                return Err(bad(
                    r.file,
                    "rope_theta",
                    format!(
                        "is {} but {key}.rope_theta is {t}; they must agree",
                        legacy.unwrap_or(t)
                    ),
                ));
            }
            theta = Some(t);
        }
    }
    Ok(theta.unwrap_or(10000.0) as f32)
}

/// Runs kiln's own checks on the settings read, as errors about the file.
fn checked(m: ModelConfig, file: &str) -> Result<ModelConfig> {
    m.validate_parts().map_err(|e| match e {
        Error::Invalid { key, value, rule } => bad(
            file,
            hf_key(m.arch, &key),
            format!("= {value} does not fit kiln: {key} {rule}"),
        ),
        other => other,
    })?;
    if m.vocab_size == 0 {
        return Err(bad(file, "vocab_size", "is 0"));
    }
    Ok(m)
}

/// The config.json key behind a kiln setting, for messages.
fn hf_key(arch: ArchKind, kiln: &str) -> String {
    let gpt2 = arch == ArchKind::Gpt2;
    match kiln {
        "model.n_layer" if gpt2 => "n_layer",
        "model.n_layer" => "num_hidden_layers",
        "model.n_head" if gpt2 => "n_head",
        "model.n_head" => "num_attention_heads",
        "model.n_embd" if gpt2 => "n_embd",
        "model.n_embd" => "hidden_size",
        "model.block_size" if gpt2 => "n_positions",
        "model.block_size" => "max_position_embeddings",
        "model.n_kv_head" => "num_key_value_heads",
        "model.norm_eps" if gpt2 => "layer_norm_epsilon",
        "model.norm_eps" => "rms_norm_eps",
        "model.mlp_hidden" if gpt2 => "n_inner",
        "model.mlp_hidden" => "intermediate_size",
        "model.rope_theta" => "rope_theta",
        other => other,
    }
    .to_string()
}

/// An f32 setting as the shortest decimal that reads back as the same f32 (`1e-5`, not
/// `9.999999747378752e-6`), so the file is what a person would write and imports exactly.
pub(crate) fn f32_json(x: f32) -> Value {
    x.to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

/// An error about key `key` of the config file `file`.
pub(crate) fn bad(file: &str, key: impl Into<String>, why: impl Into<String>) -> Error {
    Error::Interop {
        path: file.to_string(),
        message: format!("key {}: {}", key.into(), why.into()),
    }
}

/// Typed access to a config object, with errors naming the key.
struct Reader<'a> {
    o: &'a Map<String, Value>,
    file: &'a str,
}

impl Reader<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.o.get(key).filter(|v| !v.is_null())
    }
    fn missing(&self, key: &str) -> Error {
        bad(
            self.file,
            key,
            "is missing; kiln needs it to build the model",
        )
    }
    fn wrong(&self, key: &str, what: &str) -> Error {
        bad(
            self.file,
            key,
            format!(
                "must be {what}, found {}",
                self.o.get(key).map_or("nothing".into(), |v| v.to_string())
            ),
        )
    }
    fn str(&self, key: &str) -> Result<&str> {
        self.opt_str(key)?.ok_or_else(|| self.missing(key))
    }
    fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key)
            .map(|v| v.as_str().ok_or_else(|| self.wrong(key, "a string")))
            .transpose()
    }
    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.missing(key))
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| self.wrong(key, "a whole number ≥ 0"))
            })
            .transpose()
    }
    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| v.as_f64().ok_or_else(|| self.wrong(key, "a number")))
            .transpose()
    }
    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| v.as_bool().ok_or_else(|| self.wrong(key, "true or false")))
            .transpose()
    }
}
