//! `kiln lora merge`: a base checkpoint and a LoRA adapter written as one ordinary checkpoint.

use super::peft;
use crate::model::ParamLayout;
use crate::train::checkpoint::{self, Checkpoint};
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// Writes the checkpoint `base` with the adapter in `adapter` merged into its weights
/// (`W + (alpha/rank)·B·A`, see [`super::lora::merge`]) as the run folder `out`: the base's
/// config and tokenizer, its step, zero optimizer moments. `out` must not exist or be empty;
/// every input is read and checked before anything is written. Returns the checkpoint folder.
pub fn merge_adapter(base: &Path, adapter: &Path, out: &Path) -> Result<PathBuf> {
    if out.exists()
        && std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(Error::invalid(
            "--out",
            out.display(),
            "exists and is not empty; give a new folder for the merged checkpoint",
        ));
    }
    let dir = checkpoint::resolve(base)?;
    let ck = checkpoint::load(&dir)?;
    if ck.config.lora.is_some() {
        return Err(Error::invalid(
            "--checkpoint",
            dir.display(),
            "holds adapters over a frozen base (a LoRA run); give the checkpoint it started from \
             as --checkpoint and this run as --lora",
        ));
    }
    let vocab = ck
        .layout
        .token_table()
        .map(|t| t.shape[0])
        .ok_or_else(|| Error::shape("lora merge", "the checkpoint has no token table"))?;
    let a = peft::load_adapter(adapter, &ck.config.model, vocab)?;
    let weights = crate::quant::weights::ModelWeights {
        folder: dir.clone(),
        config: ck.config.clone(),
        tokenizer_json: ck.tokenizer_json.clone(),
        vocab,
        layout: ck.layout.clone(),
        values: ck.master.clone(),
        quantized: Default::default(),
        settings: None,
    };
    let adapted = peft::attach(&weights, &a)?;
    let plain = ParamLayout::for_config(&ck.config, vocab, 1)?;
    let master = super::lora::merge(&adapted.layout, &adapted.values, &plain)?;
    if let Some(i) = master.iter().position(|x| !x.is_finite()) {
        return Err(Error::NonFinite {
            what: "merged weights".into(),
            message: format!("element {i} of the merged weights is {}", master[i]),
        });
    }
    let n = plain.buffer_len();
    let merged = Checkpoint {
        config: ck.config,
        tokenizer_json: ck.tokenizer_json,
        state: ck.state,
        layout: plain,
        master,
        m: vec![0.0; n],
        v: vec![0.0; n],
    };
    checkpoint::save(out, &merged, 1)
}
