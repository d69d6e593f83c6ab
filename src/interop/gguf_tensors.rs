//! llama.cpp's tensor names for kiln's tensors, and the Meta row order it expects for RoPE.
//!
//! Shapes here are PyTorch-order `(rows, cols)` = `(out, in)`, kiln's own; the writer reverses
//! them into GGUF's `ne` order. GPT-2 keeps its fused `attn_qkv` (llama.cpp's gpt2 graph
//! splits it) and needs every bias and layer-norm shift, so a model without biases writes
//! zeros. Llama's q, k, v and gate, up are separate tensors, and q and k go in Meta's order.

use crate::model::{ArchKind, ModelConfig, ParamLayout};
use crate::{Error, Result};

/// Where a GGUF tensor's values come from.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Source {
    /// A whole kiln tensor.
    Whole(String),
    /// Rows `start..start + len` of a kiln matrix.
    Rows(String, usize, usize),
    /// Rows `start..start + len` of a kiln matrix, each head's rows put in Meta's order.
    Permuted {
        name: String,
        start: usize,
        len: usize,
        heads: usize,
    },
    /// Zeros (a bias or shift the kiln model does not have).
    Zeros,
}

/// One tensor of the GGUF file.
#[derive(Clone, Debug)]
pub(crate) struct GgufTensor {
    pub name: String,
    /// PyTorch order: `(rows, cols)` or `(n,)`.
    pub shape: Vec<usize>,
    pub source: Source,
}

/// Every tensor llama.cpp's loader for `model`'s architecture reads.
pub(crate) fn gguf_tensors(model: &ModelConfig, vocab: usize) -> Result<Vec<GgufTensor>> {
    let p = model.parts();
    let c = model.n_embd;
    let d = c / model.n_head;
    let (q, kv, h) = (model.n_head * d, p.n_kv_head * d, p.mlp_hidden);
    let mut out = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, source: Source| {
        out.push(GgufTensor {
            name,
            shape,
            source,
        })
    };
    let bias = |kiln: String| {
        if model.bias {
            Source::Whole(kiln)
        } else {
            Source::Zeros
        }
    };
    let whole = |s: &str| Source::Whole(s.to_string());
    match model.arch {
        ArchKind::Gpt2 => {
            add(
                "token_embd.weight".into(),
                vec![vocab, c],
                whole("wte.weight"),
            );
            add(
                "position_embd.weight".into(),
                vec![model.block_size, c],
                whole("wpe.weight"),
            );
            for l in 0..model.n_layer {
                let k = |s: &str| format!("h.{l}.{s}");
                let g = |s: &str| format!("blk.{l}.{s}");
                for (gg, kk, rows, cols) in [
                    ("attn_norm", "ln_1", c, 0),
                    ("attn_qkv", "attn.c_attn", 3 * c, c),
                    ("attn_output", "attn.c_proj", c, c),
                    ("ffn_norm", "ln_2", c, 0),
                    ("ffn_up", "mlp.c_fc", h, c),
                    ("ffn_down", "mlp.c_proj", c, h),
                ] {
                    let shape = if cols == 0 {
                        vec![rows]
                    } else {
                        vec![rows, cols]
                    };
                    add(
                        g(&format!("{gg}.weight")),
                        shape,
                        Source::Whole(k(&format!("{kk}.weight"))),
                    );
                    add(
                        g(&format!("{gg}.bias")),
                        vec![rows],
                        bias(k(&format!("{kk}.bias"))),
                    );
                }
            }
            add("output_norm.weight".into(), vec![c], whole("ln_f.weight"));
            add("output_norm.bias".into(), vec![c], bias("ln_f.bias".into()));
        }
        ArchKind::Llama => {
            add(
                "token_embd.weight".into(),
                vec![vocab, c],
                whole("model.embed_tokens.weight"),
            );
            for l in 0..model.n_layer {
                let k = |s: &str| format!("model.layers.{l}.{s}");
                let g = |s: &str| format!("blk.{l}.{s}.weight");
                let qkv = k("self_attn.qkv_proj.weight");
                let gate_up = k("mlp.gate_up_proj.weight");
                let permuted = |start, len, heads| Source::Permuted {
                    name: qkv.clone(),
                    start,
                    len,
                    heads,
                };
                add(
                    g("attn_norm"),
                    vec![c],
                    Source::Whole(k("input_layernorm.weight")),
                );
                add(g("attn_q"), vec![q, c], permuted(0, q, model.n_head));
                add(g("attn_k"), vec![kv, c], permuted(q, kv, p.n_kv_head));
                add(
                    g("attn_v"),
                    vec![kv, c],
                    Source::Rows(qkv.clone(), q + kv, kv),
                );
                add(
                    g("attn_output"),
                    vec![c, q],
                    Source::Whole(k("self_attn.o_proj.weight")),
                );
                add(
                    g("ffn_norm"),
                    vec![c],
                    Source::Whole(k("post_attention_layernorm.weight")),
                );
                add(
                    g("ffn_gate"),
                    vec![h, c],
                    Source::Rows(gate_up.clone(), 0, h),
                );
                add(g("ffn_up"), vec![h, c], Source::Rows(gate_up, h, h));
                add(
                    g("ffn_down"),
                    vec![c, h],
                    Source::Whole(k("mlp.down_proj.weight")),
                );
            }
            add(
                "output_norm.weight".into(),
                vec![c],
                whole("model.norm.weight"),
            );
        }
    }
    if !p.tie_embeddings {
        add(
            "output.weight".into(),
            vec![vocab, c],
            whole("lm_head.weight"),
        );
    }
    Ok(out)
}

/// The values of GGUF tensor `t` from kiln's dense buffer.
pub(crate) fn gguf_values(
    t: &GgufTensor,
    layout: &ParamLayout,
    values: &[f32],
) -> Result<Vec<f32>> {
    let tensor = |name: &str| {
        layout
            .get(name)
            .map(|k| {
                (
                    &values[k.offset..k.offset + k.len()],
                    k.shape.get(1).copied().unwrap_or(1),
                )
            })
            .ok_or_else(|| {
                Error::shape(
                    "gguf export",
                    format!("the checkpoint has no tensor {name}"),
                )
            })
    };
    let n: usize = t.shape.iter().product();
    Ok(match &t.source {
        Source::Zeros => vec![0.0; n],
        Source::Whole(name) => tensor(name)?.0.to_vec(),
        Source::Rows(name, start, len) => {
            let (v, cols) = tensor(name)?;
            v[start * cols..(start + len) * cols].to_vec()
        }
        Source::Permuted {
            name,
            start,
            len,
            heads,
        } => {
            let (v, cols) = tensor(name)?;
            meta_order(&v[start * cols..(start + len) * cols], *heads, cols)
        }
    })
}

/// Rows of a q or k projection (`heads` heads of `d` rows each, `cols` wide) moved from the
/// rotate-half order (element i pairs with i + d/2, Hugging Face's and kiln's) to the
/// interleaved order (pairs 2j, 2j + 1) that llama.cpp's RoPE rotates: the inverse of the
/// permutation Hugging Face's conversion script undoes. Row `h·d + 2j + s` of the result is row
/// `h·d + s·d/2 + j` of the input.
pub(crate) fn meta_order(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let rows = w.len() / cols.max(1);
    let d = rows / heads.max(1);
    let mut out = vec![0.0; w.len()];
    for hd in 0..heads {
        for j in 0..d / 2 {
            for s in 0..2 {
                let from = hd * d + s * (d / 2) + j;
                let to = hd * d + 2 * j + s;
                out[to * cols..(to + 1) * cols].copy_from_slice(&w[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::hf_tensors::transpose;
    use super::*;

    #[test]
    fn meta_order_interleaves_each_heads_halves() {
        // 2 heads of d = 4, one column: rows 0..8 hold their own index.
        let w: Vec<f32> = (0..8).map(|x| x as f32).collect();
        assert_eq!(meta_order(&w, 2, 1), vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        // Columns travel with their row.
        let w2 = transpose(&[0., 1., 2., 3., 10., 11., 12., 13.], 2, 4);
        assert_eq!(
            meta_order(&w2, 1, 2),
            vec![0., 10., 2., 12., 1., 11., 3., 13.]
        );
    }
}
