//! Reference causal multi-head self-attention, with grouped-query heads.
//!
//! Layout as in GPT-2: `qkv` is (B, T, 3C) with queries in channels [0, C), keys in [C, 2C) and
//! values in [2C, 3C); head h uses channels [h·hs, (h+1)·hs) of each, hs = C / n_head. The output
//! is (B, T, C) with the heads side by side. `probs` (B, n_head, T, T) keeps the softmax
//! probabilities for the backward pass; entries above the diagonal are zero.
//!
//! The grouped-query variants ([`grouped_attention_forward`], [`grouped_attention_backward`])
//! take a [`GroupedAttentionShape`]: rows of (n_head + 2·n_kv_head)·head_dim with query head h
//! reading key/value head h / (n_head / n_kv_head); with n_kv_head = n_head they compute exactly
//! (bit for bit) what the multi-head functions do, which call them.

use crate::Result;
use crate::ops::{AttentionShape, GroupedAttentionShape};

/// Forward: `probs = softmax(q·kᵀ / √hs + causal mask)`, `out = probs·v` for every (b, h).
pub fn attention_forward(
    out: &mut [f32],
    probs: &mut [f32],
    qkv: &[f32],
    shape: &AttentionShape,
) -> Result<()> {
    shape.validate(qkv.len(), out.len(), probs.len())?;
    grouped_attention_forward(out, probs, qkv, &(*shape).into())
}

/// Backward: from `dout` (B, T, C) and the forward's `probs` and `qkv`, writes `dqkv` (B, T, 3C).
///
/// With S = scale·q·kᵀ, P = softmax(S), O = P·v:
/// dv = Pᵀ·dO, dP = dO·vᵀ, dS = P ⊙ (dP − rowsum(P ⊙ dP)), dq = scale·dS·k, dk = scale·dSᵀ·q.
pub fn attention_backward(
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    probs: &[f32],
    shape: &AttentionShape,
) -> Result<()> {
    shape.validate(qkv.len(), dout.len(), probs.len())?;
    shape.validate(dqkv.len(), dout.len(), probs.len())?;
    grouped_attention_backward(dqkv, dout, qkv, probs, &(*shape).into())
}

/// [`attention_forward`] with grouped-query heads: query head h attends with key/value head
/// h / group.
pub fn grouped_attention_forward(
    out: &mut [f32],
    probs: &mut [f32],
    qkv: &[f32],
    shape: &GroupedAttentionShape,
) -> Result<()> {
    shape.validate(qkv.len(), out.len(), probs.len())?;
    let GroupedAttentionShape {
        batch,
        seq,
        heads,
        kv_heads,
        head_dim: hs,
    } = *shape;
    let group = shape.group();
    let scale = 1.0 / (hs as f32).sqrt();
    let row = shape.qkv_width();
    let (k_part, v_part) = (heads * hs, (heads + kv_heads) * hs);
    let out_row = heads * hs;
    for b in 0..batch {
        for h in 0..heads {
            // The key/value head this query head reads.
            let kv = h / group;
            for t in 0..seq {
                let q = &qkv[(b * seq + t) * row + h * hs..][..hs];
                let p = &mut probs[((b * heads + h) * seq + t) * seq..][..seq];
                // Scores against keys 0..=t; later positions are masked out (probability 0).
                let mut max = f32::NEG_INFINITY;
                for (s, ps) in p.iter_mut().enumerate().take(t + 1) {
                    let k = &qkv[(b * seq + s) * row + k_part + kv * hs..][..hs];
                    let dot: f32 = q.iter().zip(k).map(|(x, y)| x * y).sum();
                    *ps = dot * scale;
                    max = max.max(*ps);
                }
                // Softmax with the maximum subtracted, so exp never overflows.
                let mut sum = 0.0;
                for ps in p.iter_mut().take(t + 1) {
                    *ps = (*ps - max).exp();
                    sum += *ps;
                }
                for ps in p.iter_mut().take(t + 1) {
                    *ps /= sum;
                }
                p[t + 1..].fill(0.0);
                // Weighted sum of the values.
                let o = &mut out[(b * seq + t) * out_row + h * hs..][..hs];
                o.fill(0.0);
                for (s, &ps) in p.iter().enumerate().take(t + 1) {
                    let v = &qkv[(b * seq + s) * row + v_part + kv * hs..][..hs];
                    for (oi, vi) in o.iter_mut().zip(v) {
                        *oi += ps * vi;
                    }
                }
            }
        }
    }
    Ok(())
}

/// [`attention_backward`] with grouped-query heads. The key and value gradients of a key/value
/// head are the sums over the query heads of its group, accumulated in increasing head order.
pub fn grouped_attention_backward(
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    probs: &[f32],
    shape: &GroupedAttentionShape,
) -> Result<()> {
    shape.validate(qkv.len(), dout.len(), probs.len())?;
    shape.validate(dqkv.len(), dout.len(), probs.len())?;
    let GroupedAttentionShape {
        batch,
        seq,
        heads,
        kv_heads,
        head_dim: hs,
    } = *shape;
    let group = shape.group();
    let scale = 1.0 / (hs as f32).sqrt();
    let row = shape.qkv_width();
    let (k_part, v_part) = (heads * hs, (heads + kv_heads) * hs);
    let out_row = heads * hs;
    dqkv.fill(0.0);
    let mut dp = vec![0.0f32; seq];
    for b in 0..batch {
        for h in 0..heads {
            let kv = h / group;
            for t in 0..seq {
                let p = &probs[((b * heads + h) * seq + t) * seq..][..seq];
                let dout_t = &dout[(b * seq + t) * out_row + h * hs..][..hs];
                // dP[t, s] = dO[t]·v[s]; dv[s] += P[t, s]·dO[t].
                for s in 0..=t {
                    let vo = (b * seq + s) * row + v_part + kv * hs;
                    dp[s] = dout_t
                        .iter()
                        .zip(&qkv[vo..vo + hs])
                        .map(|(x, y)| x * y)
                        .sum();
                    for (dv, d) in dqkv[vo..vo + hs].iter_mut().zip(dout_t) {
                        *dv += p[s] * d;
                    }
                }
                // Softmax backward on the causal part of the row.
                let dot: f32 = (0..=t).map(|s| p[s] * dp[s]).sum();
                for s in 0..=t {
                    let ds = p[s] * (dp[s] - dot) * scale;
                    let qo = (b * seq + t) * row + h * hs;
                    let ko = (b * seq + s) * row + k_part + kv * hs;
                    for i in 0..hs {
                        dqkv[qo + i] += ds * qkv[ko + i];
                        dqkv[ko + i] += ds * qkv[qo + i];
                    }
                }
            }
        }
    }
    Ok(())
}
