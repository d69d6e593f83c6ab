//! LoRA adapters in Hugging Face PEFT's folder layout: `adapter_model.safetensors` with PEFT's
//! tensor names and `adapter_config.json`.
//!
//! **Names.** GPT-2's modules map one to one: kiln's `h.0.attn.c_attn` is PEFT's
//! `base_model.model.transformer.h.0.attn.c_attn` (HF's GPT-2 fuses q|k|v too). Llama's HF
//! model has separate projections where kiln fuses them (`self_attn.qkv_proj` = q_proj over
//! k_proj over v_proj, `mlp.gate_up_proj` = gate_proj over up_proj), so one kiln adapter of a
//! fused layer is written as one PEFT adapter per HF projection: each gets the same `lora_A`
//! and its own rows of `lora_B`. That is exact: PEFT adds `s·B_q·A·x` to q_proj's output, `s·B_k·A·x`
//! to k_proj's, and so on, which are the rows of kiln's `s·B·A·x`. Reading goes the other way
//! and accepts any subset of a fused group (a missing projection's rows of B are zero), as long
//! as the present projections share one `lora_A`; one that does not cannot be a rank-r update
//! of the fused layer and is refused.
//!
//! **Config.** `peft_type` "LORA", `task_type` "CAUSAL_LM", `r`, `lora_alpha`, `lora_dropout`,
//! `target_modules` (GPT-2: dotted suffixes such as "attn.c_proj", since "c_proj" alone would
//! also match the MLP's; Llama: "q_proj", ...), `fan_in_fan_out` (true for GPT-2, whose HF
//! layers are Conv1D), `base_model_name_or_path` (the checkpoint the run started from), `bias`
//! "none". Reading refuses rsLoRA, DoRA and per-layer rank or alpha patterns, which kiln does
//! not implement, and checks every tensor's shape against `r` and the base model.

use super::layout::lora_name;
use super::{LoraConfig, LoraTarget};
use crate::model::layout::LayoutBuilder;
use crate::model::{ArchKind, Config, ModelConfig, ParamLayout};
use crate::quant::weights::ModelWeights;
use crate::train::checkpoint::{F32View, canonical_metadata, read_bytes, write_synced};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::Path;

/// The adapter's tensors.
pub const ADAPTER_MODEL_FILE: &str = "adapter_model.safetensors";
/// The adapter's settings.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";

/// `adapter_config.json` (the fields kiln writes and reads; others are ignored on reading).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// Always "LORA".
    pub peft_type: String,
    /// "CAUSAL_LM".
    #[serde(default)]
    pub task_type: Option<String>,
    /// Where the base model came from.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Rank.
    pub r: usize,
    /// Scale numerator.
    pub lora_alpha: f64,
    /// Dropout on the adapter's input during training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Module name suffixes adapted.
    pub target_modules: Vec<String>,
    /// True for Conv1D base layers (GPT-2).
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// "none": biases are not trained.
    #[serde(default = "no_bias")]
    pub bias: String,
    /// rsLoRA's alpha/√r scaling (refused).
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA (refused).
    #[serde(default)]
    pub use_dora: bool,
    /// Per-layer ranks (refused when not empty).
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, serde_json::Value>,
    /// Per-layer alphas (refused when not empty).
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, serde_json::Value>,
    /// Whether the adapter is for inference.
    #[serde(default)]
    pub inference_mode: bool,
}

fn no_bias() -> String {
    "none".into()
}

/// One HF module of a kiln adapted layer: its PEFT path and its rows of kiln's B.
struct Module {
    path: String,
    rows: Range<usize>,
}

/// The HF modules of kiln's layer `prefix` (target `t`) in `model`.
fn modules(model: &ModelConfig, prefix: &str, t: LoraTarget) -> Vec<Module> {
    let whole = |path: String, n: usize| vec![Module { path, rows: 0..n }];
    let (_, fan_out) = t.dims(model);
    match model.arch {
        ArchKind::Gpt2 => whole(format!("transformer.{prefix}"), fan_out),
        ArchKind::Llama => {
            let p = model.parts();
            let split = |fused: &str, parts: &[(&str, usize)]| {
                let base = prefix.strip_suffix(fused).unwrap_or(prefix);
                let mut start = 0;
                parts
                    .iter()
                    .map(|(name, n)| {
                        let m = Module {
                            path: format!("{base}{name}"),
                            rows: start..start + n,
                        };
                        start += n;
                        m
                    })
                    .collect()
            };
            let hd = model.n_embd / model.n_head;
            match t {
                LoraTarget::AttnQkv => split(
                    "qkv_proj",
                    &[
                        ("q_proj", model.n_head * hd),
                        ("k_proj", p.n_kv_head * hd),
                        ("v_proj", p.n_kv_head * hd),
                    ],
                ),
                LoraTarget::MlpFc => split(
                    "gate_up_proj",
                    &[("gate_proj", p.mlp_hidden), ("up_proj", p.mlp_hidden)],
                ),
                _ => whole(prefix.to_string(), fan_out),
            }
        }
    }
}

/// PEFT's `target_modules` entries of kiln target `t`.
fn target_modules(arch: ArchKind, t: LoraTarget) -> &'static [&'static str] {
    match (arch, t) {
        (ArchKind::Gpt2, LoraTarget::AttnQkv) => &["attn.c_attn"],
        (ArchKind::Gpt2, LoraTarget::AttnProj) => &["attn.c_proj"],
        (ArchKind::Gpt2, LoraTarget::MlpFc) => &["mlp.c_fc"],
        (ArchKind::Gpt2, LoraTarget::MlpProj) => &["mlp.c_proj"],
        (ArchKind::Llama, LoraTarget::AttnQkv) => &["q_proj", "k_proj", "v_proj"],
        (ArchKind::Llama, LoraTarget::AttnProj) => &["o_proj"],
        (ArchKind::Llama, LoraTarget::MlpFc) => &["gate_proj", "up_proj"],
        (ArchKind::Llama, LoraTarget::MlpProj) => &["down_proj"],
    }
}

/// Whether PEFT's entry `entry` selects the module `path` (PEFT: equal, or a suffix after a
/// dot).
fn selects(entry: &str, path: &str) -> bool {
    path == entry || path.ends_with(&format!(".{entry}"))
}

fn peft_name(path: &str, which: char) -> String {
    format!("base_model.model.{path}.lora_{which}.weight")
}

/// The kiln adapted layers of `layout`: (prefix, target).
fn adapted_layers(
    model: &ModelConfig,
    vocab: usize,
    lora: &LoraConfig,
) -> Result<Vec<(String, LoraTarget)>> {
    let arch = crate::model::arch::Arch::new(model, vocab)?;
    Ok(arch
        .adaptable_linears()
        .into_iter()
        .filter(|l| lora.targets.contains(&l.0))
        .map(|l| (l.1, l.0))
        .collect())
}

/// Writes `adapter_model.safetensors` and `adapter_config.json` into `dir` from the adapters
/// in `values` (laid out by `layout`, a model of `config`).
pub fn write_adapter(
    dir: &Path,
    config: &Config,
    layout: &ParamLayout,
    values: &[f32],
) -> Result<()> {
    let lora = config
        .lora
        .as_ref()
        .ok_or_else(|| Error::invalid("lora", "(none)", "the config has no [lora] table"))?;
    let model = &config.model;
    let vocab = layout
        .token_table()
        .map(|t| t.shape[0])
        .ok_or_else(|| Error::shape("peft", "the layout has no token table"))?;
    let get = |name: &str| {
        layout
            .get(name)
            .map(|t| &values[t.offset..t.offset + t.len()])
            .ok_or_else(|| Error::shape("peft", format!("the layout has no tensor {name}")))
    };
    let r = lora.rank;
    let mut tensors: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
    for (prefix, t) in adapted_layers(model, vocab, lora)? {
        let (fan_in, _) = t.dims(model);
        let (a, b) = (
            get(&lora_name(&prefix, 'A'))?,
            get(&lora_name(&prefix, 'B'))?,
        );
        for m in modules(model, &prefix, t) {
            tensors.push((peft_name(&m.path, 'A'), vec![r, fan_in], a));
            let rows = &b[m.rows.start * r..m.rows.end * r];
            tensors.push((peft_name(&m.path, 'B'), vec![m.rows.len(), r], rows));
        }
    }
    let views: Vec<(String, F32View<'_>)> = tensors
        .iter()
        .map(|(name, shape, data)| (name.clone(), F32View { shape, data }))
        .collect();
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| {
        Error::invalid(
            "adapter tensors",
            tensors.len(),
            format!("safetensors refused them: {e}"),
        )
    })?;
    write_synced(&dir.join(ADAPTER_MODEL_FILE), &canonical_metadata(bytes)?)?;
    let mut modules: Vec<String> = Vec::new();
    for t in &lora.targets {
        modules.extend(target_modules(model.arch, *t).iter().map(|s| s.to_string()));
    }
    let cfg = AdapterConfig {
        peft_type: "LORA".into(),
        task_type: Some("CAUSAL_LM".into()),
        base_model_name_or_path: config.finetune.init_from.clone(),
        r,
        lora_alpha: lora.alpha,
        lora_dropout: decimal_f64(lora.dropout),
        target_modules: modules,
        fan_in_fan_out: model.arch == ArchKind::Gpt2,
        bias: "none".into(),
        use_rslora: false,
        use_dora: false,
        rank_pattern: BTreeMap::new(),
        alpha_pattern: BTreeMap::new(),
        inference_mode: true,
    };
    let json = serde_json::to_string_pretty(&cfg)
        .map_err(|e| Error::invalid("adapter_config.json", "(config)", e.to_string()))?;
    write_synced(&dir.join(ADAPTER_CONFIG_FILE), json.as_bytes())
}

/// `x` as the f64 with the same shortest decimal form (0.1f32 is written 0.1, not
/// 0.10000000149011612, and reads back as the same f32).
fn decimal_f64(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

/// An adapter read from a PEFT folder and checked against a base model.
#[derive(Clone, Debug)]
pub struct Adapter {
    /// The folder.
    pub folder: std::path::PathBuf,
    /// The settings in kiln's terms (`lora_dropout` kept: it only acts when training, and a run
    /// started from these settings uses it).
    pub lora: LoraConfig,
    /// `adapter_config.json`'s `base_model_name_or_path`.
    pub base_model: Option<String>,
    /// Each kiln adapter tensor (`PREFIX.lora_A.weight`, `PREFIX.lora_B.weight`) with its shape
    /// and values.
    pub tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
}

fn adapter_err(dir: &Path, message: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: dir.display().to_string(),
        message: message.into(),
    }
}

/// Reads the PEFT adapter in `dir` for a base model of `model` over `vocab` tokens. Every
/// mismatch is an error naming what differs: another architecture's or model's module names,
/// shapes that do not fit the base or the config's `r`, unknown or unsupported settings.
pub fn load_adapter(dir: &Path, model: &ModelConfig, vocab: usize) -> Result<Adapter> {
    let cfg_path = dir.join(ADAPTER_CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| {
        adapter_err(
            dir,
            format!(
                "no readable {ADAPTER_CONFIG_FILE} ({e}); --lora takes a folder \
            written by kiln train with [lora] (RUN/latest) or a PEFT adapter folder"
            ),
        )
    })?;
    let cfg: AdapterConfig = serde_json::from_str(&text)
        .map_err(|e| adapter_err(&cfg_path, format!("is not a PEFT adapter config: {e}")))?;
    let lora = kiln_settings(&cfg, model).map_err(|m| adapter_err(&cfg_path, m))?;
    let bytes = read_bytes(&dir.join(ADAPTER_MODEL_FILE))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
        adapter_err(
            dir,
            format!("{ADAPTER_MODEL_FILE} is not a valid safetensors file: {e}"),
        )
    })?;
    let read = |name: &str, shape: &[usize]| -> std::result::Result<Option<Vec<f32>>, String> {
        let Ok(t) = st.tensor(name) else {
            return Ok(None);
        };
        if t.dtype() != safetensors::Dtype::F32 {
            return Err(format!(
                "{name} is {:?}; kiln reads F32 adapters",
                t.dtype()
            ));
        }
        if t.shape() != shape {
            return Err(format!(
                "{name} has shape {:?}, but r = {} and the base model's layer need {shape:?}",
                t.shape(),
                cfg.r
            ));
        }
        let v: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(format!("{name} holds {} at element {i}", v[i]));
        }
        Ok(Some(v))
    };
    let r = lora.rank;
    let mut used = std::collections::BTreeSet::new();
    let mut tensors = Vec::new();
    for (prefix, t) in adapted_layers(model, vocab, &lora)? {
        let (fan_in, fan_out) = t.dims(model);
        let mut a: Option<Vec<f32>> = None;
        let mut b = vec![0.0f32; fan_out * r];
        let mut found = Vec::new();
        for m in modules(model, &prefix, t) {
            if !cfg.target_modules.iter().any(|e| selects(e, &m.path)) {
                continue;
            }
            let (an, bn) = (peft_name(&m.path, 'A'), peft_name(&m.path, 'B'));
            let fail = |msg: String| adapter_err(dir, msg);
            let ma = read(&an, &[r, fan_in]).map_err(fail)?;
            let mb = read(&bn, &[m.rows.len(), r]).map_err(fail)?;
            let (Some(ma), Some(mb)) = (ma, mb) else {
                return Err(adapter_err(
                    dir,
                    format!(
                        "{ADAPTER_MODEL_FILE} lacks {an} or {bn}, which its target_modules \
                         select in this base model: the adapter was made for another base"
                    ),
                ));
            };
            match &a {
                Some(prev) if prev != &ma => {
                    return Err(adapter_err(
                        dir,
                        format!(
                            "{an} differs from the lora_A of the other projections kiln fuses \
                             with it ({prefix}); kiln adapts the fused layer with one A, so \
                             these adapters cannot be applied"
                        ),
                    ));
                }
                Some(_) => {}
                None => a = Some(ma),
            }
            b[m.rows.start * r..m.rows.end * r].copy_from_slice(&mb);
            used.insert(an);
            used.insert(bn);
            found.push(m.path);
        }
        let Some(a) = a else { continue };
        tensors.push((lora_name(&prefix, 'A'), vec![r, fan_in], a));
        tensors.push((lora_name(&prefix, 'B'), vec![fan_out, r], b));
    }
    let extra: Vec<String> = st
        .names()
        .into_iter()
        .filter(|n| !used.contains(*n))
        .map(|n| n.to_string())
        .collect();
    if !extra.is_empty() || tensors.is_empty() {
        let mut shown = extra.clone();
        shown.truncate(4);
        return Err(adapter_err(
            dir,
            format!(
                "{ADAPTER_MODEL_FILE} holds tensors that are not adapters of this base model's \
                 selected layers ({} of them, e.g. {shown:?}){}: the adapter was made for \
                 another base (architecture {:?}, {} blocks)",
                extra.len(),
                if tensors.is_empty() {
                    " and none that are"
                } else {
                    ""
                },
                model.arch,
                model.n_layer
            ),
        ));
    }
    Ok(Adapter {
        folder: dir.to_path_buf(),
        lora,
        base_model: cfg.base_model_name_or_path.clone(),
        tensors,
    })
}

/// The config's settings in kiln's terms, or why they cannot be.
fn kiln_settings(
    cfg: &AdapterConfig,
    model: &ModelConfig,
) -> std::result::Result<LoraConfig, String> {
    if cfg.peft_type != "LORA" {
        return Err(format!(
            "peft_type is {:?}; kiln reads LORA adapters",
            cfg.peft_type
        ));
    }
    if cfg.use_rslora || cfg.use_dora {
        return Err("uses rsLoRA or DoRA, which kiln does not implement".into());
    }
    if !cfg.rank_pattern.is_empty() || !cfg.alpha_pattern.is_empty() {
        return Err(
            "has per-layer rank_pattern or alpha_pattern, which kiln does not implement".into(),
        );
    }
    if cfg.bias != "none" {
        return Err(format!(
            "trains biases (bias = {:?}); kiln's adapters have none",
            cfg.bias
        ));
    }
    let mut targets = Vec::new();
    for t in LoraTarget::ALL {
        let selected = target_modules(model.arch, t).iter().any(|m| {
            cfg.target_modules
                .iter()
                .any(|e| selects(e, m) || selects(e, &format!("x.{m}")))
        });
        if selected {
            targets.push(t);
        }
    }
    let unknown: Vec<&String> = cfg
        .target_modules
        .iter()
        .filter(|e| {
            !LoraTarget::ALL.iter().any(|t| {
                target_modules(model.arch, *t)
                    .iter()
                    .any(|m| selects(e, &format!("x.{m}")))
            })
        })
        .collect();
    if !unknown.is_empty() {
        return Err(format!(
            "target_modules {unknown:?} name no layer kiln adapts in a {:?} model (the adapter \
             was made for another base)",
            model.arch
        ));
    }
    let lora = LoraConfig {
        rank: cfg.r,
        alpha: cfg.lora_alpha,
        dropout: cfg.lora_dropout as f32,
        targets,
    };
    lora.validate(model)
        .map_err(|e| format!("its settings do not fit the base model: {e}"))?;
    Ok(lora)
}

/// `weights` with `adapter` attached: the config gains the `[lora]` table and the layout and
/// values the adapter tensors, so that [`crate::model::gpu::GptGpu::inference`] builds base +
/// adapter.
pub fn attach(weights: &ModelWeights, adapter: &Adapter) -> Result<ModelWeights> {
    if weights.config.lora.is_some() {
        return Err(Error::invalid(
            "--lora",
            adapter.folder.display(),
            format!(
                "the base checkpoint {} already has adapters of its own; merge them first \
                 (kiln lora merge) or give its base",
                weights.folder.display()
            ),
        ));
    }
    let mut b = LayoutBuilder::new(1);
    for (name, shape, _) in &adapter.tensors {
        let component = if name.contains("mlp.") {
            crate::model::Component::Mlp
        } else {
            crate::model::Component::Attention
        };
        b.add(
            name.clone(),
            shape.clone(),
            crate::model::ParamKind::Weight,
            component,
            true,
        );
    }
    for t in weights.layout.tensors() {
        b.add(
            t.name.clone(),
            t.shape.clone(),
            t.kind,
            t.component,
            t.decayed,
        );
    }
    let layout = b
        .finish()
        .with_training(adapter.tensors.len(), Some(adapter.lora.scale()));
    let mut values = vec![0.0f32; layout.buffer_len()];
    for (t, (_, _, v)) in layout.tensors().iter().zip(&adapter.tensors) {
        values[t.offset..t.offset + t.len()].copy_from_slice(v);
    }
    for t in &layout.tensors()[adapter.tensors.len()..] {
        let from = weights
            .layout
            .get(&t.name)
            .ok_or_else(|| Error::shape("peft", format!("no base tensor {}", t.name)))?;
        values[t.offset..t.offset + t.len()]
            .copy_from_slice(&weights.values[from.offset..from.offset + from.len()]);
    }
    let mut config = weights.config.clone();
    config.lora = Some(adapter.lora.clone());
    Ok(ModelWeights {
        config,
        layout,
        values,
        ..weights.clone()
    })
}
