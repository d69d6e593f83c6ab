//! Reference token + learned position embedding.

use crate::Result;
use crate::ops::EmbeddingShape;

/// `out[b, t, :] = wte[tokens[b, t], :] + wpe[t, :]`.
pub fn embedding_forward(
    out: &mut [f32],
    tokens: &[u32],
    wte: &[f32],
    wpe: &[f32],
    shape: &EmbeddingShape,
) -> Result<()> {
    shape.validate(tokens, wte.len(), wpe.len(), out.len())?;
    let c = shape.channels;
    for (i, &tok) in tokens.iter().enumerate() {
        let t = i % shape.seq;
        let row = &mut out[i * c..][..c];
        let (te, pe) = (&wte[tok as usize * c..][..c], &wpe[t * c..][..c]);
        for ((o, a), b) in row.iter_mut().zip(te).zip(pe) {
            *o = a + b;
        }
    }
    Ok(())
}

/// Gradients of the embedding tables: `dwte[v, :] = Σ dout[b, t, :]` over positions holding token
/// v (in increasing position order), `dwpe[t, :] = Σ_b dout[b, t, :]` (in increasing b). With
/// `accumulate` the sums are added to what the buffers hold (the token table is also the tied
/// output head, whose gradient arrives first).
pub fn embedding_backward(
    dwte: &mut [f32],
    dwpe: &mut [f32],
    dout: &[f32],
    tokens: &[u32],
    shape: &EmbeddingShape,
    accumulate: bool,
) -> Result<()> {
    shape.validate(tokens, dwte.len(), dwpe.len(), dout.len())?;
    let c = shape.channels;
    if !accumulate {
        dwte.fill(0.0);
        dwpe.fill(0.0);
    }
    // Sum into fresh buffers first, so the order of additions is the GPU's: a per-row sum in
    // position order, then one addition to the existing value.
    let mut te = vec![0.0f32; dwte.len()];
    let mut pe = vec![0.0f32; dwpe.len()];
    for (i, &tok) in tokens.iter().enumerate() {
        let t = i % shape.seq;
        let d = &dout[i * c..][..c];
        for (g, x) in te[tok as usize * c..][..c].iter_mut().zip(d) {
            *g += x;
        }
        for (g, x) in pe[t * c..][..c].iter_mut().zip(d) {
            *g += x;
        }
    }
    for (g, x) in dwte.iter_mut().zip(&te) {
        *g += x;
    }
    for (g, x) in dwpe.iter_mut().zip(&pe) {
        *g += x;
    }
    Ok(())
}

/// The positions of a batch grouped by token (a stable counting sort): positions holding token v
/// are `order[starts[v]..starts[v + 1]]`, in increasing order. The GPU backward sums each token's
/// rows in this order, which makes the token-table gradient deterministic without atomics.
pub fn token_index(tokens: &[u32], vocab: usize) -> Result<(Vec<u32>, Vec<u32>)> {
    let mut starts = vec![0u32; vocab + 1];
    for (i, &tok) in tokens.iter().enumerate() {
        if tok as usize >= vocab {
            return Err(crate::Error::shape(
                "embedding",
                format!("token {tok} at position {i} is outside the vocabulary of {vocab}"),
            ));
        }
        starts[tok as usize + 1] += 1;
    }
    for v in 0..vocab {
        starts[v + 1] += starts[v];
    }
    let mut next = starts.clone();
    let mut order = vec![0u32; tokens.len()];
    for (i, &tok) in tokens.iter().enumerate() {
        order[next[tok as usize] as usize] = i as u32;
        next[tok as usize] += 1;
    }
    Ok((order, starts))
}
