//! The weights of a model for inference, from a float or a quantised checkpoint folder: what
//! `kiln sample` and `kiln eval` load, and [`crate::model::gpu::GptGpu::inference`] uploads.

use super::checkpoint as qck;
use super::{QuantMatrix, QuantSettings};
use crate::Result;
use crate::model::{Config, ParamLayout};
use crate::train::checkpoint;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A model's weights for inference.
#[derive(Clone, Debug)]
pub struct ModelWeights {
    /// The checkpoint folder they came from.
    pub folder: PathBuf,
    /// The checkpoint's config.
    pub config: Config,
    /// The tokenizer JSON, verbatim.
    pub tokenizer_json: String,
    /// Rows of the token table.
    pub vocab: usize,
    /// The float tensors: a dense layout (alignment 1) of the model's tensors minus the
    /// quantised ones.
    pub layout: ParamLayout,
    /// Their values, laid out by `layout`.
    pub values: Vec<f32>,
    /// The quantised matrices by tensor name (none for a float checkpoint).
    pub quantized: BTreeMap<String, QuantMatrix>,
    /// The quantisation settings (`None` for a float checkpoint).
    pub settings: Option<QuantSettings>,
}

impl ModelWeights {
    /// Loads the checkpoint folder a user means by `path` (a run folder's latest checkpoint, a
    /// checkpoint folder, or a folder written by `kiln quantize`).
    pub fn load(path: &Path) -> Result<ModelWeights> {
        let w = Self::load_unchecked(path)?;
        let tokens = crate::data::Tokenizer::from_json(&w.tokenizer_json)?.vocab_size();
        if tokens != w.vocab {
            return Err(crate::Error::Checkpoint {
                path: w.folder.display().to_string(),
                message: format!(
                    "its tokenizer has {tokens} tokens but its token table {} rows; the files \
                     come from different runs",
                    w.vocab
                ),
            });
        }
        Ok(w)
    }

    /// [`ModelWeights::load`] with the PEFT LoRA adapter in `adapter` attached (see
    /// [`crate::finetune::peft`]): base + adapter, checked against each other.
    pub fn load_with_adapter(path: &Path, adapter: Option<&Path>) -> Result<ModelWeights> {
        let w = Self::load(path)?;
        match adapter {
            None => Ok(w),
            Some(dir) => {
                let a = crate::finetune::peft::load_adapter(dir, &w.config.model, w.vocab)?;
                crate::finetune::peft::attach(&w, &a)
            }
        }
    }

    fn load_unchecked(path: &Path) -> Result<ModelWeights> {
        let folder = checkpoint::resolve(path)?;
        if qck::header(&folder).is_some() {
            let q = qck::load(&folder)?;
            return Ok(ModelWeights {
                folder,
                config: q.config,
                tokenizer_json: q.tokenizer_json,
                vocab: q.header.vocab,
                layout: q.float_layout,
                values: q.float_values,
                quantized: q.quantized,
                settings: Some(q.header.settings),
            });
        }
        let ck = checkpoint::load(&folder)?;
        let vocab = ck
            .layout
            .token_table()
            .and_then(|t| t.shape.first().copied())
            .unwrap_or(ck.config.model.vocab_size);
        Ok(ModelWeights {
            folder,
            config: ck.config,
            tokenizer_json: ck.tokenizer_json,
            vocab,
            layout: ck.layout,
            values: ck.master,
            quantized: BTreeMap::new(),
            settings: None,
        })
    }

    /// A short description: `f32` or `q8 (groups of 32, embeddings quantised)`.
    pub fn describe(&self) -> String {
        let base = self.describe_base();
        match &self.config.lora {
            Some(l) => format!("{base} + LoRA adapter (rank {}, alpha {})", l.rank, l.alpha),
            None => base,
        }
    }

    fn describe_base(&self) -> String {
        match self.settings {
            None => "float".to_string(),
            Some(s) => format!(
                "{} (groups of {}, embeddings {})",
                s.kind,
                s.group_size,
                if s.embeddings {
                    "quantised"
                } else {
                    "in float"
                }
            ),
        }
    }
}
