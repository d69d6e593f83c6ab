//! `kiln quantize`: a float checkpoint to a quantised one ([`super::checkpoint`]).

use super::checkpoint::{self as qck, QuantHeader, QuantizedModel};
use super::{QuantMatrix, QuantSettings};
use crate::cpu::quant::{dequantize, quantize};
use crate::model::ModelConfig;
use crate::model::arch::{Arch, Unit};
use crate::model::units::residual::Body;
use crate::train::checkpoint;
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The tensors a model quantised with `embeddings` stores as integers, in layout order: the
/// weight of every linear layer (attention q|k|v and output projections, the MLP's two), and
/// with `embeddings` the token table and a separate head (a tied head is the token table).
/// Position tables, norms and biases stay in float.
pub(crate) fn quantized_tensors(
    model: &ModelConfig,
    vocab: usize,
    embeddings: bool,
) -> Result<Vec<String>> {
    let weight = |prefix: &str| format!("{prefix}.weight");
    let mut out = Vec::new();
    for unit in Arch::new(model, vocab)?.units {
        match unit {
            Unit::Embedding(e) if embeddings => out.push(e.tokens),
            Unit::Residual(r) => match r.body {
                Body::Attention(a) => {
                    out.extend([weight(&a.qkv_prefix), weight(&a.proj_prefix)]);
                }
                Body::Mlp(m) => out.extend([weight(&m.fc_prefix), weight(&m.proj_prefix)]),
                // Routed MLPs stay in float: their (E, out, in) tensors have no quantised
                // product yet.
                Body::Moe(_) => {}
            },
            Unit::Head(h) if embeddings && !h.tied => out.push(weight(&h.prefix)),
            _ => {}
        }
    }
    Ok(out)
}

/// What quantising one matrix did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TensorReport {
    /// Tensor name.
    pub name: String,
    /// Rows × columns.
    pub shape: [usize; 2],
    /// Largest |w − d·q| over the matrix, in units of its group's step d (at most 0.5).
    pub max_error_steps: f64,
    /// Root-mean-square of w − d·q.
    pub rms_error: f64,
}

/// What `kiln quantize` wrote.
#[derive(Clone, Debug, serde::Serialize)]
pub struct QuantizeReport {
    /// The checkpoint folder quantised.
    pub source: PathBuf,
    /// The new folder.
    pub out: PathBuf,
    /// The settings used.
    pub settings: QuantSettings,
    /// One entry per quantised matrix.
    pub tensors: Vec<TensorReport>,
    /// Bytes of every parameter as f32 in the source.
    pub f32_bytes: usize,
    /// Bytes of the packed integers.
    pub packed_bytes: usize,
    /// Bytes of the f16 scales.
    pub scale_bytes: usize,
    /// Bytes of the tensors kept in f32.
    pub float_bytes: usize,
}

/// Quantises the checkpoint `src` (a run folder's latest, or a checkpoint folder) into the new
/// folder `out`. Refuses a quantised source, a group size that does not divide a matrix's input
/// width (naming it), and an `out` that exists with files in it.
pub fn quantize_checkpoint(
    src: &Path,
    settings: QuantSettings,
    out: &Path,
) -> Result<QuantizeReport> {
    let folder = checkpoint::resolve(src)?;
    if let Some(h) = qck::header(&folder) {
        return Err(qck::not_float(&folder, &h, "quantised again"));
    }
    let ck = checkpoint::load(&folder)?;
    if ck.config.lora.is_some() {
        return Err(Error::invalid(
            "checkpoint",
            folder.display(),
            "holds LoRA adapters over a frozen base; merge them first (kiln lora merge \
             --checkpoint BASE --lora RUN --out MERGED) and quantise the merged checkpoint",
        ));
    }
    let vocab = ck
        .layout
        .token_table()
        .and_then(|t| t.shape.first().copied())
        .ok_or_else(|| Error::shape("quantize", "the checkpoint has no token table"))?;
    let names = quantized_tensors(&ck.config.model, vocab, settings.embeddings)?;
    // Every width first, so that a bad group size fails before any work.
    for name in &names {
        let t = ck
            .layout
            .get(name)
            .expect("quantised tensors are layout tensors");
        settings.check_width(name, t.shape[1])?;
    }
    let mut quantized = BTreeMap::new();
    let mut tensors = Vec::new();
    for name in &names {
        let t = ck
            .layout
            .get(name)
            .expect("quantised tensors are layout tensors");
        let (rows, cols) = (t.shape[0], t.shape[1]);
        let w = &ck.master[t.offset..t.offset + t.len()];
        let q = quantize(w, rows, cols, settings.kind, settings.group_size)
            .map_err(|e| Error::invalid(name, "(its weights)", e.to_string()))?;
        tensors.push(error_report(name, w, &q));
        quantized.insert(name.clone(), q);
    }
    let float_layout = ck.layout.filtered(1, |t| !quantized.contains_key(&t.name));
    let mut float_values = vec![0.0f32; float_layout.buffer_len()];
    for t in float_layout.tensors() {
        let from = ck
            .layout
            .get(&t.name)
            .expect("a tensor of the source layout");
        float_values[t.offset..t.offset + t.len()]
            .copy_from_slice(&ck.master[from.offset..from.offset + from.len()]);
    }
    let model = QuantizedModel {
        config: ck.config.clone(),
        tokenizer_json: ck.tokenizer_json.clone(),
        header: QuantHeader {
            version: qck::FORMAT_VERSION,
            settings,
            vocab,
            source: folder.display().to_string(),
        },
        float_layout,
        float_values,
        quantized,
    };
    let out = qck::save(out, &model)?;
    Ok(QuantizeReport {
        source: folder,
        out,
        settings,
        tensors,
        f32_bytes: 4 * ck.layout.num_params(),
        packed_bytes: model
            .quantized
            .values()
            .map(QuantMatrix::packed_bytes)
            .sum(),
        scale_bytes: model.quantized.values().map(QuantMatrix::scale_bytes).sum(),
        float_bytes: 4 * model.float_layout.num_params(),
    })
}

fn error_report(name: &str, w: &[f32], q: &QuantMatrix) -> TensorReport {
    let back = dequantize(q);
    let (mut max_steps, mut sq) = (0.0f64, 0.0f64);
    for (i, (&a, &b)) in w.iter().zip(&back).enumerate() {
        let err = f64::from(a) - f64::from(b);
        sq += err * err;
        let d = f64::from(q.scale(i / q.cols(), i % q.cols() / q.group_size()));
        if d > 0.0 {
            max_steps = max_steps.max(err.abs() / d);
        }
    }
    TensorReport {
        name: name.to_string(),
        shape: [q.rows(), q.cols()],
        max_error_steps: max_steps,
        rms_error: (sq / w.len().max(1) as f64).sqrt(),
    }
}
