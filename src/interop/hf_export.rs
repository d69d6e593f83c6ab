//! `kiln export --format hf`: a checkpoint as a folder that `transformers` loads with
//! `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`, no custom code.

use super::hf_config::{to_generation_config, to_hf_config};
use super::hf_tensors::{export_values, hf_tensors};
use super::hf_tokenizer::{end_of_text, to_hf_tokenizer_json, tokenizer_config};
use super::{json_bytes, write_folder};
use crate::data::Tokenizer;
use crate::quant::checkpoint::Raw;
use crate::quant::weights::ModelWeights;
use crate::{Error, Result};
use half::f16;
use safetensors::Dtype;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The precision of the exported tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HfDtype {
    /// The checkpoint's f32 master weights, exactly.
    F32,
    /// Rounded to f16 (to nearest even); a weight beyond f16's range is refused.
    F16,
}

impl std::str::FromStr for HfDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(HfDtype::F32),
            "f16" => Ok(HfDtype::F16),
            other => Err(Error::invalid("--dtype", other, "must be f32 or f16")),
        }
    }
}

impl HfDtype {
    fn torch_name(self) -> &'static str {
        match self {
            HfDtype::F32 => "float32",
            HfDtype::F16 => "float16",
        }
    }
}

/// Exports the float checkpoint `checkpoint` (a run folder, pointer or step folder) to the new
/// folder `out`: `config.json`, `generation_config.json` (from the `[sample]` table),
/// `model.safetensors`, `tokenizer.json` and `tokenizer_config.json`. Returns `out`.
pub fn export_hf(checkpoint: &Path, out: &Path, dtype: HfDtype) -> Result<PathBuf> {
    super::check_empty_out(out)?;
    let w = ModelWeights::load(checkpoint)?;
    if let Some(s) = &w.settings {
        return Err(Error::Interop {
            path: w.folder.display().to_string(),
            message: format!(
                "is quantised ({} in groups of {}); export the float checkpoint it was made \
                 from (GGUF can quantise on export: --format gguf --type q8_0)",
                s.kind, s.group_size
            ),
        });
    }
    let tokenizer = Tokenizer::from_json(&w.tokenizer_json)?;
    let eos = end_of_text(&tokenizer).map(|(id, _)| id);
    let config = to_hf_config(&w.config, w.vocab, dtype.torch_name(), eos)?;
    let generation = to_generation_config(&w.config.sample, eos);
    let model = encode_model(&w, dtype)?;
    let files = [
        ("config.json", json_bytes(&config)),
        ("generation_config.json", json_bytes(&generation)),
        ("model.safetensors", model),
        (
            "tokenizer.json",
            to_hf_tokenizer_json(&tokenizer)?.into_bytes(),
        ),
        (
            "tokenizer_config.json",
            json_bytes(&tokenizer_config(&tokenizer, w.config.model.block_size)),
        ),
    ];
    write_folder(out, &files)
}

/// `model.safetensors` bytes: every Hugging Face tensor of the model, in `dtype`.
fn encode_model(w: &ModelWeights, dtype: HfDtype) -> Result<Vec<u8>> {
    let mut tensors = Vec::new();
    for t in hf_tensors(&w.config.model, w.vocab)? {
        let values = export_values(&t, &w.layout, &w.values)?;
        let (dt, bytes) = match dtype {
            HfDtype::F32 => (
                Dtype::F32,
                values.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            HfDtype::F16 => (Dtype::F16, f16_bytes(&t.hf, &values)?),
        };
        tensors.push((
            t.hf,
            Raw {
                dtype: dt,
                shape: t.shape,
                bytes,
            },
        ));
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let views = tensors.iter().map(|(n, r)| (n.clone(), r));
    safetensors::serialize(views, Some(meta)).map_err(|e| {
        Error::invalid(
            "model.safetensors",
            format!("{} tensors", tensors.len()),
            format!("safetensors refused them: {e}"),
        )
    })
}

/// Little-endian f16 bytes of `values`, refusing a value that would overflow to infinity.
pub(crate) fn f16_bytes(name: &str, values: &[f32]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(values.len() * 2);
    for (i, &x) in values.iter().enumerate() {
        let h = f16::from_f32(x);
        if h.is_infinite() {
            return Err(Error::invalid(
                format!("{name}[{i}]"),
                x,
                "is beyond f16's range (±65504); export in f32",
            ));
        }
        out.extend_from_slice(&h.to_le_bytes());
    }
    Ok(out)
}
