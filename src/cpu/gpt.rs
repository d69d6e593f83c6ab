//! The whole GPT on the CPU: forward, loss and backward of one micro-batch, composed from the
//! reference ops of this module's siblings. It is the oracle the GPU step is tested against, so
//! it follows the same sequence of ops with the same argument conventions (llm.c style: each layer
//! sets up its tensor slices, then makes one call per op; the backward is the exact reverse).

use super::attention::{attention_backward, attention_forward};
use super::embedding::{embedding_backward, embedding_forward};
use super::layernorm::{layernorm_backward, layernorm_forward};
use super::matmul::matmul;
use crate::model::{ModelConfig, ParamLayout};
use crate::ops::{AttentionShape, EmbeddingShape, LayerNormSpec, Layout, MatmulSpec};
use crate::training::CrossEntropySpec;
use crate::{Error, Result};

/// Batch geometry of one micro-batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GptBatch {
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence (at most the block size).
    pub seq: usize,
}

/// Activations one layer keeps for its backward pass.
struct LayerActs {
    input: Vec<f32>,
    ln1: Vec<f32>,
    ln1_mean: Vec<f32>,
    ln1_rstd: Vec<f32>,
    qkv: Vec<f32>,
    probs: Vec<f32>,
    att: Vec<f32>,
    resid: Vec<f32>,
    ln2: Vec<f32>,
    ln2_mean: Vec<f32>,
    ln2_rstd: Vec<f32>,
    fc: Vec<f32>,
    gelu: Vec<f32>,
}

/// Slices of the flat parameter (or gradient) buffer by tensor name.
struct Params<'a> {
    layout: &'a ParamLayout,
    data: &'a [f32],
}

impl<'a> Params<'a> {
    fn get(&self, name: &str) -> &'a [f32] {
        let t = self
            .layout
            .get(name)
            .unwrap_or_else(|| panic!("layout has no tensor {name}"));
        &self.data[t.offset..t.offset + t.len()]
    }
    fn opt(&self, name: &str) -> Option<&'a [f32]> {
        self.layout
            .get(name)
            .map(|t| &self.data[t.offset..t.offset + t.len()])
    }
}

fn grad_of<'a>(layout: &ParamLayout, grads: &'a mut [f32], name: &str) -> &'a mut [f32] {
    let t = layout
        .get(name)
        .unwrap_or_else(|| panic!("layout has no tensor {name}"));
    &mut grads[t.offset..t.offset + t.len()]
}

/// `Y = X·Wᵀ (+ b)` for `rows` rows.
fn linear(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    rows: usize,
    fan_in: usize,
    fan_out: usize,
) -> Result<()> {
    matmul(
        y,
        x,
        w,
        b,
        &MatmulSpec::new(Layout::NT, rows, fan_out, fan_in),
    )
}

/// Backward of [`linear`]: dX (overwritten), dW and db (accumulated).
#[allow(clippy::too_many_arguments)]
fn linear_backward(
    dx: &mut [f32],
    dw: &mut [f32],
    db: Option<&mut [f32]>,
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    rows: usize,
    fan_in: usize,
    fan_out: usize,
) -> Result<()> {
    matmul(
        dx,
        dy,
        w,
        None,
        &MatmulSpec::new(Layout::NN, rows, fan_in, fan_out),
    )?;
    matmul(
        dw,
        dy,
        x,
        None,
        &MatmulSpec::new(Layout::TN, fan_out, fan_in, rows).accumulate(true),
    )?;
    if let Some(db) = db {
        for r in 0..rows {
            for (g, d) in db.iter_mut().zip(&dy[r * fan_out..(r + 1) * fan_out]) {
                *g += d;
            }
        }
    }
    Ok(())
}

fn gelu_forward(out: &mut [f32], inp: &[f32]) -> Result<()> {
    super::activation::gelu_forward(out, inp)
}

/// Forward to the logits, keeping what the backward needs.
struct Forward {
    layers: Vec<LayerActs>,
    final_in: Vec<f32>,
    lnf: Vec<f32>,
    lnf_mean: Vec<f32>,
    lnf_rstd: Vec<f32>,
    logits: Vec<f32>,
}

fn check(
    model: &ModelConfig,
    layout: &ParamLayout,
    params: usize,
    vocab: usize,
    inputs: &[u32],
    b: &GptBatch,
) -> Result<()> {
    if params != layout.buffer_len() {
        return Err(Error::shape(
            "gpt",
            format!(
                "parameter buffer has {params} elements, layout needs {}",
                layout.buffer_len()
            ),
        ));
    }
    if b.seq == 0 || b.batch == 0 || b.seq > model.block_size {
        return Err(Error::shape(
            "gpt",
            format!(
                "batch {b:?} must be non-empty with T ≤ block_size = {}",
                model.block_size
            ),
        ));
    }
    if inputs.len() != b.batch * b.seq {
        return Err(Error::shape(
            "gpt",
            format!(
                "{} input tokens for B×T = {}",
                inputs.len(),
                b.batch * b.seq
            ),
        ));
    }
    if let Some(t) = inputs.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::shape(
            "gpt",
            format!("token {t} is outside the vocabulary of {vocab}"),
        ));
    }
    Ok(())
}

fn forward(
    params: &Params<'_>,
    model: &ModelConfig,
    vocab: usize,
    inputs: &[u32],
    b: &GptBatch,
) -> Result<Forward> {
    let (bt, c) = (b.batch * b.seq, model.n_embd);
    let zeros = vec![0.0f32; 4 * c];
    let ln_spec = LayerNormSpec::new(bt, c);
    let mut x = vec![0.0f32; bt * c];
    let emb = EmbeddingShape {
        batch: b.batch,
        seq: b.seq,
        channels: c,
        vocab,
        positions: model.block_size,
    };
    embedding_forward(
        &mut x,
        inputs,
        params.get("wte.weight"),
        params.get("wpe.weight"),
        &emb,
    )?;
    let att_shape = AttentionShape {
        batch: b.batch,
        seq: b.seq,
        channels: c,
        heads: model.n_head,
    };
    let mut layers = Vec::with_capacity(model.n_layer);
    for l in 0..model.n_layer {
        let p = |s: &str| format!("h.{l}.{s}");
        let bias = |s: &str| params.opt(&p(s));
        let mut a = LayerActs {
            input: x.clone(),
            ln1: vec![0.0; bt * c],
            ln1_mean: vec![0.0; bt],
            ln1_rstd: vec![0.0; bt],
            qkv: vec![0.0; bt * 3 * c],
            probs: vec![0.0; att_shape.probs_len()],
            att: vec![0.0; bt * c],
            resid: vec![0.0; bt * c],
            ln2: vec![0.0; bt * c],
            ln2_mean: vec![0.0; bt],
            ln2_rstd: vec![0.0; bt],
            fc: vec![0.0; bt * 4 * c],
            gelu: vec![0.0; bt * 4 * c],
        };
        let ln1_b = bias("ln_1.bias").unwrap_or(&zeros[..c]);
        layernorm_forward(
            &mut a.ln1,
            &mut a.ln1_mean,
            &mut a.ln1_rstd,
            &x,
            params.get(&p("ln_1.weight")),
            ln1_b,
            &ln_spec,
        )?;
        linear(
            &mut a.qkv,
            &a.ln1,
            params.get(&p("attn.c_attn.weight")),
            bias("attn.c_attn.bias"),
            bt,
            c,
            3 * c,
        )?;
        attention_forward(&mut a.att, &mut a.probs, &a.qkv, &att_shape)?;
        let mut proj = vec![0.0; bt * c];
        linear(
            &mut proj,
            &a.att,
            params.get(&p("attn.c_proj.weight")),
            bias("attn.c_proj.bias"),
            bt,
            c,
            c,
        )?;
        super::residual::residual_forward(&mut a.resid, &x, &proj)?;
        let ln2_b = bias("ln_2.bias").unwrap_or(&zeros[..c]);
        layernorm_forward(
            &mut a.ln2,
            &mut a.ln2_mean,
            &mut a.ln2_rstd,
            &a.resid,
            params.get(&p("ln_2.weight")),
            ln2_b,
            &ln_spec,
        )?;
        linear(
            &mut a.fc,
            &a.ln2,
            params.get(&p("mlp.c_fc.weight")),
            bias("mlp.c_fc.bias"),
            bt,
            c,
            4 * c,
        )?;
        gelu_forward(&mut a.gelu, &a.fc)?;
        let mut mlp = vec![0.0; bt * c];
        linear(
            &mut mlp,
            &a.gelu,
            params.get(&p("mlp.c_proj.weight")),
            bias("mlp.c_proj.bias"),
            bt,
            4 * c,
            c,
        )?;
        super::residual::residual_forward(&mut x, &a.resid, &mlp)?;
        layers.push(a);
    }
    let mut lnf = vec![0.0; bt * c];
    let (mut lnf_mean, mut lnf_rstd) = (vec![0.0; bt], vec![0.0; bt]);
    let lnf_b = params.opt("ln_f.bias").unwrap_or(&zeros[..c]);
    layernorm_forward(
        &mut lnf,
        &mut lnf_mean,
        &mut lnf_rstd,
        &x,
        params.get("ln_f.weight"),
        lnf_b,
        &ln_spec,
    )?;
    // The head is tied to the token embedding: logits = lnf · wteᵀ.
    let mut logits = vec![0.0; bt * vocab];
    linear(
        &mut logits,
        &lnf,
        params.get("wte.weight"),
        None,
        bt,
        c,
        vocab,
    )?;
    Ok(Forward {
        layers,
        final_in: x,
        lnf,
        lnf_mean,
        lnf_rstd,
        logits,
    })
}

/// Logits (B·T, vocab) of a batch of token ids.
pub fn gpt_logits(
    logits: &mut [f32],
    params: &[f32],
    layout: &ParamLayout,
    model: &ModelConfig,
    vocab: usize,
    inputs: &[u32],
    batch: &GptBatch,
) -> Result<()> {
    check(model, layout, params.len(), vocab, inputs, batch)?;
    let f = forward(
        &Params {
            layout,
            data: params,
        },
        model,
        vocab,
        inputs,
        batch,
    )?;
    if logits.len() != f.logits.len() {
        return Err(Error::shape(
            "gpt",
            format!(
                "logits has {} elements, expected {}",
                logits.len(),
                f.logits.len()
            ),
        ));
    }
    logits.copy_from_slice(&f.logits);
    Ok(())
}

/// One micro-batch: returns the mean cross-entropy over non-ignored targets and writes
/// `dloss_scale ×` its gradient with respect to every parameter into `grads` (laid out like
/// `params`), adding to what is there when `accumulate`.
#[allow(clippy::too_many_arguments)]
pub fn gpt_loss_and_grads(
    grads: &mut [f32],
    params: &[f32],
    layout: &ParamLayout,
    model: &ModelConfig,
    vocab: usize,
    inputs: &[u32],
    targets: &[u32],
    batch: &GptBatch,
    dloss_scale: f32,
    accumulate: bool,
) -> Result<f32> {
    check(model, layout, params.len(), vocab, inputs, batch)?;
    if grads.len() != params.len() || targets.len() != inputs.len() {
        return Err(Error::shape(
            "gpt",
            "grads must match params and targets must match inputs",
        ));
    }
    let pr = Params {
        layout,
        data: params,
    };
    let f = forward(&pr, model, vocab, inputs, batch)?;
    let (bt, c) = (batch.batch * batch.seq, model.n_embd);

    // Loss and dlogits in one call, as the fused GPU kernel does.
    let spec = CrossEntropySpec::new(bt, vocab);
    let mut losses = vec![0.0f32; bt];
    let mut dlogits = vec![0.0f32; bt * vocab];
    let count = super::crossentropy::crossentropy(
        &mut losses,
        &mut dlogits,
        &f.logits,
        targets,
        dloss_scale,
        &spec,
    )?;
    let loss = (losses.iter().map(|&l| f64::from(l)).sum::<f64>() / count.max(1) as f64) as f32;

    // Gradients of this micro-batch go to a fresh buffer, then into `grads`.
    let mut g = vec![0.0f32; grads.len()];
    let ln_spec = LayerNormSpec {
        accumulate_params: true,
        ..LayerNormSpec::new(bt, c)
    };
    let mut scratch_db = vec![0.0f32; c];

    // Head (tied): dlnf = dlogits·wte, dwte += dlogitsᵀ·lnf.
    let mut dx = vec![0.0f32; bt * c];
    linear_backward(
        &mut dx,
        grad_of(layout, &mut g, "wte.weight"),
        None,
        &dlogits,
        &f.lnf,
        pr.get("wte.weight"),
        bt,
        c,
        vocab,
    )?;
    let mut dresid = vec![0.0f32; bt * c];
    {
        let (dw, db) = split_norm_grads(layout, &mut g, "ln_f", &mut scratch_db);
        layernorm_backward(
            &mut dresid,
            dw,
            db,
            &dx,
            &f.final_in,
            pr.get("ln_f.weight"),
            &f.lnf_mean,
            &f.lnf_rstd,
            &ln_spec,
        )?;
    }
    let att_shape = AttentionShape {
        batch: batch.batch,
        seq: batch.seq,
        channels: c,
        heads: model.n_head,
    };
    for l in (0..model.n_layer).rev() {
        let a = &f.layers[l];
        let p = |s: &str| format!("h.{l}.{s}");
        // MLP: x_out = resid + proj(gelu(fc(ln2(resid)))).
        let mut dgelu = vec![0.0f32; bt * 4 * c];
        {
            let (dw, db) = linear_grads(layout, &mut g, &p("mlp.c_proj"));
            linear_backward(
                &mut dgelu,
                dw,
                db,
                &dresid,
                &a.gelu,
                pr.get(&p("mlp.c_proj.weight")),
                bt,
                4 * c,
                c,
            )?;
        }
        let mut dfc = vec![0.0f32; bt * 4 * c];
        super::activation::gelu_backward(&mut dfc, &dgelu, &a.fc, false)?;
        let mut dln2 = vec![0.0f32; bt * c];
        {
            let (dw, db) = linear_grads(layout, &mut g, &p("mlp.c_fc"));
            linear_backward(
                &mut dln2,
                dw,
                db,
                &dfc,
                &a.ln2,
                pr.get(&p("mlp.c_fc.weight")),
                bt,
                c,
                4 * c,
            )?;
        }
        // The residual's gradient is already in dresid; the norm's input gradient adds to it.
        {
            let (dw, db) = split_norm_grads(layout, &mut g, &p("ln_2"), &mut scratch_db);
            let spec = LayerNormSpec {
                accumulate_input: true,
                ..ln_spec
            };
            layernorm_backward(
                &mut dresid,
                dw,
                db,
                &dln2,
                &a.resid,
                pr.get(&p("ln_2.weight")),
                &a.ln2_mean,
                &a.ln2_rstd,
                &spec,
            )?;
        }
        // Attention: resid = input + proj(attention(qkv(ln1(input)))).
        let mut datt = vec![0.0f32; bt * c];
        {
            let (dw, db) = linear_grads(layout, &mut g, &p("attn.c_proj"));
            linear_backward(
                &mut datt,
                dw,
                db,
                &dresid,
                &a.att,
                pr.get(&p("attn.c_proj.weight")),
                bt,
                c,
                c,
            )?;
        }
        let mut dqkv = vec![0.0f32; bt * 3 * c];
        attention_backward(&mut dqkv, &datt, &a.qkv, &a.probs, &att_shape)?;
        let mut dln1 = vec![0.0f32; bt * c];
        {
            let (dw, db) = linear_grads(layout, &mut g, &p("attn.c_attn"));
            linear_backward(
                &mut dln1,
                dw,
                db,
                &dqkv,
                &a.ln1,
                pr.get(&p("attn.c_attn.weight")),
                bt,
                c,
                3 * c,
            )?;
        }
        {
            let (dw, db) = split_norm_grads(layout, &mut g, &p("ln_1"), &mut scratch_db);
            let spec = LayerNormSpec {
                accumulate_input: true,
                ..ln_spec
            };
            layernorm_backward(
                &mut dresid,
                dw,
                db,
                &dln1,
                &a.input,
                pr.get(&p("ln_1.weight")),
                &a.ln1_mean,
                &a.ln1_rstd,
                &spec,
            )?;
        }
    }
    // Embedding: dresid is now the gradient of the embedding output.
    let emb = EmbeddingShape {
        batch: batch.batch,
        seq: batch.seq,
        channels: c,
        vocab,
        positions: model.block_size,
    };
    {
        let wte = layout.get("wte.weight").expect("wte");
        let wpe = layout.get("wpe.weight").expect("wpe");
        let (lo, hi) = g.split_at_mut(wpe.offset.max(wte.offset));
        let (dwte, dwpe) = if wte.offset < wpe.offset {
            (
                &mut lo[wte.offset..wte.offset + wte.len()],
                &mut hi[..wpe.len()],
            )
        } else {
            return Err(Error::shape("gpt", "layout must place wte before wpe"));
        };
        embedding_backward(dwte, dwpe, &dresid, inputs, &emb, true)?;
    }
    if accumulate {
        for (a, b) in grads.iter_mut().zip(&g) {
            *a += b;
        }
    } else {
        grads.copy_from_slice(&g);
    }
    Ok(loss)
}

/// Mutable gradient slices of a linear layer's weight and (if the model has biases) bias.
fn linear_grads<'a>(
    layout: &ParamLayout,
    g: &'a mut [f32],
    prefix: &str,
) -> (&'a mut [f32], Option<&'a mut [f32]>) {
    let w = layout
        .get(&format!("{prefix}.weight"))
        .expect("weight")
        .clone();
    match layout.get(&format!("{prefix}.bias")) {
        None => (&mut g[w.offset..w.offset + w.len()], None),
        Some(b) => {
            let b = b.clone();
            let (lo, hi) = g.split_at_mut(b.offset);
            (
                &mut lo[w.offset..w.offset + w.len()],
                Some(&mut hi[..b.len()]),
            )
        }
    }
}

/// Gradient slices of a layer norm's gain and shift; without biases the shift's gradient goes to
/// `scratch` and is dropped.
fn split_norm_grads<'a>(
    layout: &ParamLayout,
    g: &'a mut [f32],
    prefix: &str,
    scratch: &'a mut [f32],
) -> (&'a mut [f32], &'a mut [f32]) {
    let w = layout
        .get(&format!("{prefix}.weight"))
        .expect("weight")
        .clone();
    match layout.get(&format!("{prefix}.bias")) {
        None => {
            scratch.fill(0.0);
            (&mut g[w.offset..w.offset + w.len()], scratch)
        }
        Some(b) => {
            let b = b.clone();
            let (lo, hi) = g.split_at_mut(b.offset);
            (&mut lo[w.offset..w.offset + w.len()], &mut hi[..b.len()])
        }
    }
}
