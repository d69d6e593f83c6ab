//! `kiln import`: a Hugging Face GPT-2 or Llama folder as an ordinary kiln run folder
//! (`config.toml`, `step-0`, `latest`), which `kiln sample`, `kiln eval` and `kiln train
//! --resume` take like any other.

use super::hf_config::{bad, from_generation_config, from_hf_config};
use super::hf_tensors::{HfTensor, Transform, hf_tensors, import_values};
use super::hf_tokenizer::from_hf_tokenizer_json;
use crate::data::Tokenizer;
use crate::model::{ArchKind, Config, ModelConfig, ParamLayout, TokenizerKind};
use crate::train::checkpoint::{self, Checkpoint, TrainingState, read_bytes, read_text};
use crate::{Error, Result};
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Tensors a Hugging Face checkpoint may hold that are buffers, not parameters: GPT-2's causal
/// masks and Llama's RoPE frequencies (old `transformers` saved them).
const BUFFERS: [&str; 3] = [".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq"];

/// Imports the Hugging Face folder `from` (config.json, model.safetensors or sharded
/// safetensors with `model.safetensors.index.json`, tokenizer.json, optionally
/// generation_config.json) into the new run folder `out`. Returns the checkpoint folder.
pub fn import_hf(from: &Path, out: &Path) -> Result<PathBuf> {
    super::check_empty_out(out)?;
    let (config, tokenizer) = read_config_and_tokenizer(from)?;
    let files = TensorFiles::open(from)?;
    let vocab = tokenizer.vocab_size();
    let (config, master) = read_weights(&files, config, vocab)?;
    let layout = ParamLayout::gpt(&config.model, vocab, 1)?;
    let zeros = vec![0.0; master.len()];
    let ckpt = Checkpoint {
        config: config.clone(),
        tokenizer_json: tokenizer.to_json()?,
        state: TrainingState::default(),
        layout,
        master,
        m: zeros.clone(),
        v: zeros,
    };
    let text = toml::to_string_pretty(&config).map_err(|e| Error::Config {
        message: format!("cannot write the config as TOML: {e}"),
    })?;
    std::fs::create_dir_all(out).map_err(|e| checkpoint::io_err(out, e))?;
    crate::data::write_atomic(&out.join(checkpoint::CONFIG_FILE), text.as_bytes())?;
    checkpoint::save(out, &ckpt, 1)
}

/// The kiln config (model from config.json, `[sample]` from generation_config.json) and the
/// tokenizer, whose size must be the model's vocabulary.
fn read_config_and_tokenizer(from: &Path) -> Result<(Config, Tokenizer)> {
    if !from.is_dir() {
        return Err(Error::Interop {
            path: from.display().to_string(),
            message: "is not a folder; pass a Hugging Face model folder (config.json, \
                      model.safetensors, tokenizer.json)"
                .into(),
        });
    }
    let config_path = from.join("config.json");
    let file = config_path.display().to_string();
    let value: serde_json::Value = serde_json::from_str(&read_text(&config_path)?)
        .map_err(|e| bad(&file, "(file)", format!("is not valid JSON: {e}")))?;
    let mut model = from_hf_config(&value, &file)?;
    let tokenizer_path = from.join("tokenizer.json");
    let tokenizer =
        from_hf_tokenizer_json(&read_text(&tokenizer_path)?).map_err(|e| Error::Interop {
            path: tokenizer_path.display().to_string(),
            message: format!("is not a tokenizer kiln can use: {e}"),
        })?;
    if tokenizer.vocab_size() != model.vocab_size {
        return Err(bad(
            &file,
            "vocab_size",
            format!(
                "is {} but tokenizer.json has {} tokens; kiln needs one row of the token table \
                 per token",
                model.vocab_size,
                tokenizer.vocab_size()
            ),
        ));
    }
    // kiln's convention: the tokenizer sets the vocabulary.
    model.vocab_size = 0;
    let generation = from.join("generation_config.json");
    let sample = if generation.is_file() {
        let g = serde_json::from_str(&read_text(&generation)?).map_err(|e| Error::Interop {
            path: generation.display().to_string(),
            message: format!("is not valid JSON: {e}"),
        })?;
        from_generation_config(&g)
    } else {
        Default::default()
    };
    let mut config = Config {
        model,
        sample,
        ..Config::default()
    };
    config.data.tokenizer = tokenizer.kind();
    if tokenizer.kind() == TokenizerKind::Bpe {
        config.data.bpe_vocab_size = tokenizer.vocab_size();
    }
    config.validate()?;
    Ok((config, tokenizer))
}

/// The f32 weights in kiln's dense layout. A GPT-2 whose biases are all exactly zero becomes a
/// kiln model without biases (the same function), which is what an export of such a model
/// writes, so the round trip gives back the model it started from.
fn read_weights(
    files: &TensorFiles,
    mut config: Config,
    vocab: usize,
) -> Result<(Config, Vec<f32>)> {
    let map = hf_tensors(&config.model, vocab)?;
    let mut tensors = BTreeMap::new();
    for t in &map {
        tensors.insert(t.hf.clone(), files.read(t)?);
    }
    files.check_no_extra(&map, &config.model)?;
    if config.model.arch == ArchKind::Gpt2 {
        let biases_zero = map
            .iter()
            .filter(|t| t.hf.ends_with(".bias"))
            .all(|t| tensors[&t.hf].iter().all(|&x| x == 0.0));
        if biases_zero {
            config.model.bias = false;
        }
    }
    let map: Vec<HfTensor> = hf_tensors(&config.model, vocab)?;
    let layout = ParamLayout::gpt(&config.model, vocab, 1)?;
    let mut master = vec![0.0f32; layout.buffer_len()];
    for t in &map {
        if t.transform != Transform::Zeros {
            import_values(t, &layout, &mut master, &tensors[&t.hf])?;
        }
    }
    Ok((config, master))
}

/// The safetensors file or shards of a folder, with the file each tensor is in.
struct TensorFiles {
    folder: PathBuf,
    /// Each file's bytes.
    files: Vec<(PathBuf, Vec<u8>)>,
    /// Tensor name → index into `files`.
    index: BTreeMap<String, usize>,
}

impl TensorFiles {
    fn open(from: &Path) -> Result<TensorFiles> {
        let single = from.join("model.safetensors");
        let index_path = from.join("model.safetensors.index.json");
        let names: Vec<PathBuf> = if single.is_file() {
            vec![single]
        } else if index_path.is_file() {
            let v: serde_json::Value = serde_json::from_str(&read_text(&index_path)?)
                .map_err(|e| interop(&index_path, format!("is not valid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    interop(
                        &index_path,
                        "has no \"weight_map\" object naming each tensor's file",
                    )
                })?;
            let shards: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
            if shards.is_empty() {
                return Err(interop(&index_path, "its weight_map names no files"));
            }
            shards.into_iter().map(|f| from.join(f)).collect()
        } else {
            return Err(interop(
                from,
                "holds neither model.safetensors nor model.safetensors.index.json (kiln reads \
                 safetensors weights only; convert .bin files with transformers' save_pretrained)",
            ));
        };
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        for path in names {
            let bytes = read_bytes(&path)?;
            let st = SafeTensors::deserialize(&bytes)
                .map_err(|e| interop(&path, format!("is not a valid safetensors file: {e}")))?;
            for name in st.names() {
                if index.insert(name.to_string(), files.len()).is_some() {
                    return Err(interop(&path, format!("tensor {name} is in two shards")));
                }
            }
            files.push((path, bytes));
        }
        Ok(TensorFiles {
            folder: from.to_path_buf(),
            files,
            index,
        })
    }

    /// The stored name of `hf` (GPT-2 checkpoints may omit the `transformer.` prefix).
    fn find(&self, hf: &str) -> Option<(&str, usize)> {
        let short = hf.strip_prefix("transformer.");
        [Some(hf), short]
            .into_iter()
            .flatten()
            .find_map(|n| self.index.get_key_value(n).map(|(k, &i)| (k.as_str(), i)))
    }

    fn missing(&self, name: &str) -> Error {
        interop(
            &self.folder,
            format!("tensor {name} is missing; the weights do not match config.json"),
        )
    }

    /// The tensor `t.hf` as f32, checked against `t.shape` and for finite values.
    fn read(&self, t: &HfTensor) -> Result<Vec<f32>> {
        let (stored, i) = self.find(&t.hf).ok_or_else(|| self.missing(&t.hf))?;
        let path = &self.files[i].0;
        let st =
            SafeTensors::deserialize(&self.files[i].1).map_err(|e| interop(path, e.to_string()))?;
        let view = st
            .tensor(stored)
            .map_err(|e| interop(path, e.to_string()))?;
        if view.shape() != t.shape.as_slice() {
            return Err(interop(
                path,
                format!(
                    "tensor {stored} has shape {:?} but config.json implies {:?}",
                    view.shape(),
                    t.shape
                ),
            ));
        }
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(interop(
                    path,
                    format!("tensor {stored} is {other:?}; kiln reads F32, F16 and BF16"),
                ));
            }
        };
        if let Some(j) = values.iter().position(|x| !x.is_finite()) {
            return Err(interop(
                path,
                format!("tensor {stored} holds {} at element {j}", values[j]),
            ));
        }
        Ok(values)
    }

    /// Refuses tensors the model does not use (they mean another architecture, such as biases
    /// kiln's Llama lacks), apart from known buffers and a tied head's copy of the table.
    fn check_no_extra(&self, map: &[HfTensor], model: &ModelConfig) -> Result<()> {
        let used: BTreeSet<&str> = map
            .iter()
            .filter_map(|t| self.find(&t.hf))
            .map(|(n, _)| n)
            .collect();
        let tied = model.parts().tie_embeddings;
        for name in self.index.keys() {
            let ignorable =
                BUFFERS.iter().any(|b| name.ends_with(b)) || (tied && name == "lm_head.weight");
            if !used.contains(name.as_str()) && !ignorable {
                return Err(interop(
                    &self.folder,
                    format!(
                        "tensor {name} has no place in the model config.json describes; kiln \
                         cannot represent it"
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn interop(path: &Path, message: impl Into<String>) -> Error {
    Error::Interop {
        path: path.display().to_string(),
        message: message.into(),
    }
}
