//! Reference of the fused attention's contract ([`crate::kernels::flash_attention`]): the forward
//! returns the output and each row's log-sum-exp instead of the probabilities, the backward
//! rebuilds the probabilities from q, k and that statistic, and dropout on the probabilities
//! uses the counter-based mask of [`super::dropout`] numbered as the (B, n_head, T, T)
//! probability buffer of the matmul path, so both paths drop the same elements.
//!
//! Plain f32 loops in the obvious order, like [`super::attention`]; without dropout it computes
//! what that module does (tested), with dropout it is the oracle both GPU paths are checked
//! against.

use super::dropout::{DropoutState, dropout_bits};
use crate::Result;
use crate::ops::GroupedAttentionShape;

/// Dropout on the attention probabilities: the step's state and this layer's site.
#[derive(Clone, Copy, Debug)]
pub struct ProbsDropout<'a> {
    /// Key, threshold and scale.
    pub state: &'a DropoutState,
    /// The site number of this mask.
    pub site: u32,
}

impl ProbsDropout<'_> {
    /// The factor of element `i` of the (B, n_head, T, T) probabilities: 0 or 1/(1 − p).
    fn factor(&self, i: usize) -> f32 {
        if dropout_bits(self.state, self.site, i as u32) >= self.state.threshold {
            self.state.scale
        } else {
            0.0
        }
    }
}

/// Everything the loops need to address one (b, h) pair.
struct Heads {
    seq: usize,
    heads: usize,
    hd: usize,
    row: usize,
    out_row: usize,
    k_part: usize,
    v_part: usize,
    group: usize,
    scale: f32,
}

impl Heads {
    fn new(shape: &GroupedAttentionShape) -> Heads {
        let (h, kv, hd) = (shape.heads, shape.kv_heads, shape.head_dim);
        Heads {
            seq: shape.seq,
            heads: h,
            hd,
            row: shape.qkv_width(),
            out_row: h * hd,
            k_part: h * hd,
            v_part: (h + kv) * hd,
            group: shape.group(),
            scale: 1.0 / (hd as f32).sqrt(),
        }
    }
    fn q(&self, b: usize, t: usize, h: usize) -> usize {
        (b * self.seq + t) * self.row + h * self.hd
    }
    fn k(&self, b: usize, s: usize, h: usize) -> usize {
        (b * self.seq + s) * self.row + self.k_part + (h / self.group) * self.hd
    }
    fn v(&self, b: usize, s: usize, h: usize) -> usize {
        (b * self.seq + s) * self.row + self.v_part + (h / self.group) * self.hd
    }
    fn o(&self, b: usize, t: usize, h: usize) -> usize {
        (b * self.seq + t) * self.out_row + h * self.hd
    }
    /// Element (b, h, t, s) of the (B, n_head, T, T) probabilities.
    fn prob(&self, b: usize, h: usize, t: usize, s: usize) -> usize {
        ((b * self.heads + h) * self.seq + t) * self.seq + s
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Forward: `out = dropout(softmax(mask(q·kᵀ/√d)))·v` and `lse[b, h, t] = ln Σ_s exp(q_t·k_s/√d)`
/// over the visible keys s ≤ t. `lse` is (B, n_head, T).
pub fn flash_attention_forward(
    out: &mut [f32],
    lse: &mut [f32],
    qkv: &[f32],
    shape: &GroupedAttentionShape,
    dropout: Option<ProbsDropout<'_>>,
) -> Result<()> {
    shape.validate_fused(qkv.len(), out.len(), lse.len())?;
    let x = Heads::new(shape);
    let mut p = vec![0.0f32; x.seq];
    for b in 0..shape.batch {
        for h in 0..x.heads {
            for t in 0..x.seq {
                let q = &qkv[x.q(b, t, h)..][..x.hd];
                let mut max = f32::NEG_INFINITY;
                for (s, ps) in p.iter_mut().enumerate().take(t + 1) {
                    *ps = dot(q, &qkv[x.k(b, s, h)..][..x.hd]) * x.scale;
                    max = max.max(*ps);
                }
                let mut sum = 0.0;
                for ps in p.iter_mut().take(t + 1) {
                    *ps = (*ps - max).exp();
                    sum += *ps;
                }
                lse[(b * x.heads + h) * x.seq + t] = max + sum.ln();
                let o = &mut out[x.o(b, t, h)..][..x.hd];
                o.fill(0.0);
                for (s, &ps) in p.iter().enumerate().take(t + 1) {
                    let f = dropout.map_or(1.0, |d| d.factor(x.prob(b, h, t, s)));
                    let w = ps / sum * f;
                    for (oi, vi) in o.iter_mut().zip(&qkv[x.v(b, s, h)..][..x.hd]) {
                        *oi += w * vi;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Backward: `dqkv` (overwritten) from `dout` and the forward's `qkv`, `out` and `lse`. With
/// P = exp(S − lse) rebuilt from the scores S, the mask factors F and delta = rowsum(dO∘O):
/// dv = (P∘F)ᵀ·dO, dP = F∘(dO·vᵀ), dS = P∘(dP − delta), dq = dS·k/√d, dk = dSᵀ·q/√d, the key
/// and value gradients of a shared head summed over its query heads in increasing order.
#[allow(clippy::too_many_arguments)]
pub fn flash_attention_backward(
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    out: &[f32],
    lse: &[f32],
    shape: &GroupedAttentionShape,
    dropout: Option<ProbsDropout<'_>>,
) -> Result<()> {
    shape.validate_fused(qkv.len(), out.len(), lse.len())?;
    shape.validate_fused(dqkv.len(), dout.len(), lse.len())?;
    let x = Heads::new(shape);
    dqkv.fill(0.0);
    for b in 0..shape.batch {
        for h in 0..x.heads {
            for t in 0..x.seq {
                let (qo, oo) = (x.q(b, t, h), x.o(b, t, h));
                let d_out = &dout[oo..][..x.hd];
                let delta = dot(d_out, &out[oo..][..x.hd]);
                let l = lse[(b * x.heads + h) * x.seq + t];
                for s in 0..=t {
                    let (ko, vo) = (x.k(b, s, h), x.v(b, s, h));
                    let p = (dot(&qkv[qo..][..x.hd], &qkv[ko..][..x.hd]) * x.scale - l).exp();
                    let f = dropout.map_or(1.0, |d| d.factor(x.prob(b, h, t, s)));
                    let dp = f * dot(d_out, &qkv[vo..][..x.hd]);
                    let ds = p * (dp - delta) * x.scale;
                    for i in 0..x.hd {
                        dqkv[vo + i] += p * f * d_out[i];
                        dqkv[qo + i] += ds * qkv[ko + i];
                        dqkv[ko + i] += ds * qkv[qo + i];
                    }
                }
            }
        }
    }
    Ok(())
}
