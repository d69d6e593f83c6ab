//! The correspondence between kiln's tensors and a Hugging Face checkpoint's, one table that
//! both export and import walk, so the two directions cannot disagree.
//!
//! GPT-2 (`GPT2LMHeadModel`): names gain the `transformer.` prefix (the head keeps
//! `lm_head.weight`); the four linear layers are `Conv1D`s storing `(in, out)`, the transpose of
//! kiln's `(out, in)`; every linear layer and layer norm has a bias, which a kiln model without
//! biases exports as zeros (the same function). Llama (`LlamaForCausalLM`): kiln already uses
//! its names, except that kiln fuses `q_proj`, `k_proj`, `v_proj` by rows into `qkv_proj` and
//! `gate_proj`, `up_proj` into `gate_up_proj`; both sides store `(out, in)`.

use crate::model::{ArchKind, ModelConfig, ParamKind, ParamLayout};
use crate::{Error, Result};

/// How a Hugging Face tensor is made from a kiln tensor.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Transform {
    /// The same values in the same shape.
    Same,
    /// The transpose of a kiln matrix: `(in, out)` from `(out, in)`.
    Transpose,
    /// `len` consecutive rows of a kiln matrix, from row `start`.
    Rows { start: usize, len: usize },
    /// No kiln tensor: zeros (a bias of a model without biases).
    Zeros,
}

/// One Hugging Face tensor.
#[derive(Clone, Debug)]
pub(crate) struct HfTensor {
    /// Its name in `model.safetensors`.
    pub hf: String,
    /// Its shape there.
    pub shape: Vec<usize>,
    /// The kiln tensor it comes from (`None` for [`Transform::Zeros`]).
    pub kiln: Option<String>,
    /// How.
    pub transform: Transform,
}

/// Every tensor of the Hugging Face checkpoint of `model` (vocabulary `vocab`), in kiln's
/// order. The model must be representable ([`super::hf_config::check_exportable`]).
pub(crate) fn hf_tensors(model: &ModelConfig, vocab: usize) -> Result<Vec<HfTensor>> {
    let layout = ParamLayout::gpt(model, vocab, 1)?;
    match model.arch {
        ArchKind::Gpt2 => gpt2_tensors(model, vocab, &layout),
        ArchKind::Llama => Ok(llama_tensors(model, &layout)),
    }
}

fn gpt2_tensors(model: &ModelConfig, vocab: usize, layout: &ParamLayout) -> Result<Vec<HfTensor>> {
    // The model with biases lists every tensor GPT2LMHeadModel has; those the real model lacks
    // are its missing biases.
    let full = ParamLayout::gpt(
        &ModelConfig {
            bias: true,
            ..model.clone()
        },
        vocab,
        1,
    )?;
    let mut out = Vec::with_capacity(full.tensors().len());
    for t in full.tensors() {
        let hf = if t.name.starts_with("lm_head.") {
            t.name.clone()
        } else {
            format!("transformer.{}", t.name)
        };
        let conv1d = t.kind == ParamKind::Weight
            && [
                ".attn.c_attn.",
                ".attn.c_proj.",
                ".mlp.c_fc.",
                ".mlp.c_proj.",
            ]
            .iter()
            .any(|s| t.name.contains(s));
        let (shape, transform) = if conv1d {
            (vec![t.shape[1], t.shape[0]], Transform::Transpose)
        } else {
            (t.shape.clone(), Transform::Same)
        };
        let present = layout.get(&t.name).is_some();
        if !present && t.kind != ParamKind::Bias {
            return Err(Error::shape(
                "export",
                format!("kiln's GPT-2 layout lacks the weight {}", t.name),
            ));
        }
        out.push(HfTensor {
            hf,
            shape,
            kiln: present.then(|| t.name.clone()),
            transform: if present { transform } else { Transform::Zeros },
        });
    }
    Ok(out)
}

fn llama_tensors(model: &ModelConfig, layout: &ParamLayout) -> Vec<HfTensor> {
    let parts = model.parts();
    let d = model.n_embd / model.n_head;
    let (q, kv) = (model.n_head * d, parts.n_kv_head * d);
    let h = parts.mlp_hidden;
    let mut out = Vec::new();
    for t in layout.tensors() {
        let cols = t.shape.get(1).copied().unwrap_or(0);
        let split = |pieces: &[(&str, usize)]| {
            let mut start = 0;
            pieces
                .iter()
                .map(|&(name, len)| {
                    let piece = HfTensor {
                        hf: name.to_string(),
                        shape: vec![len, cols],
                        kiln: Some(t.name.clone()),
                        transform: Transform::Rows { start, len },
                    };
                    start += len;
                    piece
                })
                .collect::<Vec<_>>()
        };
        if let Some(prefix) = t.name.strip_suffix(".self_attn.qkv_proj.weight") {
            let names =
                ["q_proj", "k_proj", "v_proj"].map(|p| format!("{prefix}.self_attn.{p}.weight"));
            out.extend(split(&[(&names[0], q), (&names[1], kv), (&names[2], kv)]));
        } else if let Some(prefix) = t.name.strip_suffix(".mlp.gate_up_proj.weight") {
            let names = ["gate_proj", "up_proj"].map(|p| format!("{prefix}.mlp.{p}.weight"));
            out.extend(split(&[(&names[0], h), (&names[1], h)]));
        } else {
            out.push(HfTensor {
                hf: t.name.clone(),
                shape: t.shape.clone(),
                kiln: Some(t.name.clone()),
                transform: Transform::Same,
            });
        }
    }
    out
}

/// The values of Hugging Face tensor `t`, from kiln's dense buffer `values` laid out by
/// `layout`.
pub(crate) fn export_values(
    t: &HfTensor,
    layout: &ParamLayout,
    values: &[f32],
) -> Result<Vec<f32>> {
    let n: usize = t.shape.iter().product();
    let Some(name) = &t.kiln else {
        return Ok(vec![0.0; n]);
    };
    let k = layout
        .get(name)
        .ok_or_else(|| Error::shape("export", format!("the checkpoint has no tensor {name}")))?;
    let src = &values[k.offset..k.offset + k.len()];
    Ok(match t.transform {
        Transform::Same | Transform::Zeros => src.to_vec(),
        Transform::Transpose => transpose(src, k.shape[0], k.shape[1]),
        Transform::Rows { start, len } => {
            let cols = k.shape[1];
            src[start * cols..(start + len) * cols].to_vec()
        }
    })
}

/// Writes Hugging Face tensor `t` (`data`, already checked to have `t.shape`) into kiln's dense
/// buffer `values` laid out by `layout`. A [`Transform::Zeros`] tensor writes nothing.
pub(crate) fn import_values(
    t: &HfTensor,
    layout: &ParamLayout,
    values: &mut [f32],
    data: &[f32],
) -> Result<()> {
    let Some(name) = &t.kiln else {
        return Ok(());
    };
    let k = layout
        .get(name)
        .ok_or_else(|| Error::shape("import", format!("kiln's layout has no tensor {name}")))?;
    let dst = &mut values[k.offset..k.offset + k.len()];
    match t.transform {
        Transform::Same | Transform::Zeros => dst.copy_from_slice(data),
        // data is (in, out) = (k.shape[1], k.shape[0]); its transpose is kiln's (out, in).
        Transform::Transpose => dst.copy_from_slice(&transpose(data, k.shape[1], k.shape[0])),
        Transform::Rows { start, len } => {
            let cols = k.shape[1];
            dst[start * cols..(start + len) * cols].copy_from_slice(data);
        }
    }
    Ok(())
}

/// The transpose of a row-major `rows × cols` matrix.
pub(crate) fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; m.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = m[r * cols + c];
        }
    }
    t
}
