//! Reference mixture-of-experts routing: the router's softmax and top-k, the counting sort of
//! tokens into per-expert groups and back, the weighted combination, their backwards (the
//! router's with the gradients of the two auxiliary losses) and the losses themselves.
//!
//! Buffers (N tokens, E experts, K slots per token, capacity R rows per expert, C channels):
//!
//! | buffer | shape | holds |
//! | --- | --- | --- |
//! | `logits` | (N, E) | the router's scores |
//! | `probs` | (N, E) f32 | their softmax |
//! | `lse` | (N) f32 | logsumexp of each row (the z-loss's argument) |
//! | `sel` | (N, K) u32 | the chosen experts, most probable first, ties to the lowest index |
//! | `gate` | (N, K) f32 | their weights: probabilities renormalised over the K (K = 1: the probability) |
//! | `counts` | (E) u32 | assignments each expert was chosen for (before capacity) |
//! | `dest` | (N, K) u32 | grouped row e·R + rank of each assignment, or [`MOE_NONE`] when dropped |
//! | `src` | (E, R) u32 | the assignment n·K + j of each grouped row (rows past the expert's kept count unused) |
//! | `xg`, `yg` | (E, R, C) | tokens gathered per expert; the experts' outputs |
//!
//! An expert keeps its first R assignments in (token, slot) order, i.e. by position in the
//! micro-batch; later ones are dropped: they add nothing to the token's output and pass no
//! gradient (the residual stream carries the token on).

use crate::ops::{MOE_NONE, MoeLossCoefs, MoeSpec};
use crate::{Error, Result};

/// `probs`, `lse`, `sel` and `gate` from the router's `logits` (see the module docs).
pub fn moe_route(
    probs: &mut [f32],
    sel: &mut [u32],
    gate: &mut [f32],
    lse: &mut [f32],
    logits: &[f32],
    spec: &MoeSpec,
) -> Result<()> {
    let (n, e, k) = (spec.tokens, spec.experts, spec.top_k);
    spec.check(
        "moe_route",
        &[
            ("probs", n * e, probs.len()),
            ("sel", n * k, sel.len()),
            ("gate", n * k, gate.len()),
            ("lse", n, lse.len()),
            ("logits", n * e, logits.len()),
        ],
    )?;
    for t in 0..n {
        let row = &logits[t * e..(t + 1) * e];
        // Softmax relative to the row maximum, sums in increasing index, as the shader does.
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = row.iter().map(|&l| (l - max).exp()).sum();
        lse[t] = max + sum.ln();
        let p = &mut probs[t * e..(t + 1) * e];
        for (p, &l) in p.iter_mut().zip(row) {
            *p = (l - max).exp() / sum;
        }
        // Top-k by repeated arg-max: a strict `>` keeps the lowest index among equals.
        let mut chosen = vec![false; e];
        let mut total = 0.0f32;
        for j in 0..k {
            let mut best = usize::MAX;
            for i in 0..e {
                if !chosen[i] && (best == usize::MAX || p[i] > p[best]) {
                    best = i;
                }
            }
            chosen[best] = true;
            sel[t * k + j] = best as u32;
            total += p[best];
        }
        for j in 0..k {
            let pj = p[sel[t * k + j] as usize];
            gate[t * k + j] = if k == 1 { pj } else { pj / total };
        }
    }
    Ok(())
}

/// The counting sort: `counts` per expert, `dest` per assignment and `src` per kept grouped row
/// (unused rows get [`MOE_NONE`]). Deterministic: assignments are ranked in (token, slot) order.
pub fn moe_dispatch(
    dest: &mut [u32],
    src: &mut [u32],
    counts: &mut [u32],
    sel: &[u32],
    spec: &MoeSpec,
) -> Result<()> {
    let (a, e, r) = (spec.assignments(), spec.experts, spec.capacity);
    spec.check(
        "moe_dispatch",
        &[
            ("dest", a, dest.len()),
            ("src", e * r, src.len()),
            ("counts", e, counts.len()),
            ("sel", a, sel.len()),
        ],
    )?;
    if let Some(bad) = sel.iter().find(|&&s| s as usize >= e) {
        return Err(Error::shape(
            "moe_dispatch",
            format!("expert {bad} is outside 0..{e}"),
        ));
    }
    counts.fill(0);
    src.fill(MOE_NONE);
    for (i, &s) in sel.iter().enumerate() {
        let s = s as usize;
        let rank = counts[s] as usize;
        counts[s] += 1;
        dest[i] = if rank < r {
            src[s * r + rank] = i as u32;
            (s * r + rank) as u32
        } else {
            MOE_NONE
        };
    }
    Ok(())
}

/// Rows an expert keeps: its assignments up to the capacity.
fn kept(counts: &[u32], e: usize, capacity: usize) -> usize {
    (counts[e] as usize).min(capacity)
}

/// `xg[e, r] = x[token of src[e, r]]` for kept rows, 0 for the rest.
pub fn moe_gather(
    xg: &mut [f32],
    x: &[f32],
    src: &[u32],
    counts: &[u32],
    spec: &MoeSpec,
) -> Result<()> {
    let (c, r) = (spec.channels, spec.capacity);
    spec.check(
        "moe_gather",
        &[
            ("xg", spec.grouped_rows() * c, xg.len()),
            ("x", spec.tokens * c, x.len()),
            ("src", spec.grouped_rows(), src.len()),
            ("counts", spec.experts, counts.len()),
        ],
    )?;
    xg.fill(0.0);
    for e in 0..spec.experts {
        for i in 0..kept(counts, e, r) {
            let t = src[e * r + i] as usize / spec.top_k;
            xg[(e * r + i) * c..(e * r + i + 1) * c].copy_from_slice(&x[t * c..(t + 1) * c]);
        }
    }
    Ok(())
}

/// `y[t] = Σ_j gate[t, j] · yg[dest[t, j]]` over the kept slots, in slot order.
pub fn moe_combine(
    y: &mut [f32],
    yg: &[f32],
    dest: &[u32],
    gate: &[f32],
    spec: &MoeSpec,
) -> Result<()> {
    let (c, k) = (spec.channels, spec.top_k);
    spec.check(
        "moe_combine",
        &[
            ("y", spec.tokens * c, y.len()),
            ("yg", spec.grouped_rows() * c, yg.len()),
            ("dest", spec.assignments(), dest.len()),
            ("gate", spec.assignments(), gate.len()),
        ],
    )?;
    y.fill(0.0);
    for t in 0..spec.tokens {
        for j in 0..k {
            let d = dest[t * k + j];
            if d == MOE_NONE {
                continue;
            }
            let d = d as usize;
            for ch in 0..c {
                y[t * c + ch] += gate[t * k + j] * yg[d * c + ch];
            }
        }
    }
    Ok(())
}

/// The combination's backward: `dyg[e, r] = gate · dy[token]` for kept rows (0 elsewhere) and
/// `dgate[t, j] = dy[t] · yg[dest[t, j]]` (0 for dropped slots).
#[allow(clippy::too_many_arguments)]
pub fn moe_combine_backward(
    dyg: &mut [f32],
    dgate: &mut [f32],
    dy: &[f32],
    yg: &[f32],
    gate: &[f32],
    dest: &[u32],
    src: &[u32],
    counts: &[u32],
    spec: &MoeSpec,
) -> Result<()> {
    let (c, k, r) = (spec.channels, spec.top_k, spec.capacity);
    let (a, g) = (spec.assignments(), spec.grouped_rows());
    spec.check(
        "moe_combine_backward",
        &[
            ("dyg", g * c, dyg.len()),
            ("dgate", a, dgate.len()),
            ("dy", spec.tokens * c, dy.len()),
            ("yg", g * c, yg.len()),
            ("gate", a, gate.len()),
            ("dest", a, dest.len()),
            ("src", g, src.len()),
            ("counts", spec.experts, counts.len()),
        ],
    )?;
    dyg.fill(0.0);
    for e in 0..spec.experts {
        for i in 0..kept(counts, e, r) {
            let asg = src[e * r + i] as usize;
            let t = asg / k;
            for ch in 0..c {
                dyg[(e * r + i) * c + ch] = gate[asg] * dy[t * c + ch];
            }
        }
    }
    for (i, dg) in dgate.iter_mut().enumerate() {
        let d = dest[i];
        *dg = if d == MOE_NONE {
            0.0
        } else {
            let (d, t) = (d as usize, i / k);
            (0..c).map(|ch| dy[t * c + ch] * yg[d * c + ch]).sum()
        };
    }
    Ok(())
}

/// The gather's backward: `dx[t] = Σ_j dxg[dest[t, j]]` over the kept slots (overwrites dx).
pub fn moe_gather_backward(
    dx: &mut [f32],
    dxg: &[f32],
    dest: &[u32],
    spec: &MoeSpec,
) -> Result<()> {
    let (c, k) = (spec.channels, spec.top_k);
    spec.check(
        "moe_gather_backward",
        &[
            ("dx", spec.tokens * c, dx.len()),
            ("dxg", spec.grouped_rows() * c, dxg.len()),
            ("dest", spec.assignments(), dest.len()),
        ],
    )?;
    dx.fill(0.0);
    for t in 0..spec.tokens {
        for j in 0..k {
            let d = dest[t * k + j];
            if d != MOE_NONE {
                let d = d as usize;
                for ch in 0..c {
                    dx[t * c + ch] += dxg[d * c + ch];
                }
            }
        }
    }
    Ok(())
}

/// The router's backward: `dlogits` (overwritten) from the gradient of the gates, plus
/// `loss_scale ×` the gradients of `coefs.aux · aux` and `coefs.z · z` (see [`moe_losses`]).
///
/// Per token, with S = Σ_j p[sel_j] and w_j = gate_j: the renormalisation gives
/// dp[sel_j] = (dgate_j − Σ_i dgate_i·w_i) / S (K = 1: dp[sel] = dgate); the load-balancing loss
/// adds coefs.aux · E · f_e / N to dp[n, e] (f_e = counts_e / (N·K) is a count, treated as a
/// constant, as in Switch Transformer); the softmax turns dp into
/// dlogit_i = p_i·(dp_i − Σ_e p_e·dp_e); the z-loss adds coefs.z · 2·lse_n·p_i / N.
#[allow(clippy::too_many_arguments)]
pub fn moe_route_backward(
    dlogits: &mut [f32],
    dgate: &[f32],
    probs: &[f32],
    sel: &[u32],
    gate: &[f32],
    lse: &[f32],
    counts: &[u32],
    spec: &MoeSpec,
    coefs: MoeLossCoefs,
    loss_scale: f32,
) -> Result<()> {
    let (n, e, k) = (spec.tokens, spec.experts, spec.top_k);
    spec.check(
        "moe_route_backward",
        &[
            ("dlogits", n * e, dlogits.len()),
            ("dgate", n * k, dgate.len()),
            ("probs", n * e, probs.len()),
            ("sel", n * k, sel.len()),
            ("gate", n * k, gate.len()),
            ("lse", n, lse.len()),
            ("counts", e, counts.len()),
        ],
    )?;
    let (aux, z) = coefs.gradient_factors(spec);
    let (aux, z) = (aux * loss_scale, z * loss_scale);
    let mut dp = vec![0.0f32; e];
    for t in 0..n {
        let p = &probs[t * e..(t + 1) * e];
        for (i, d) in dp.iter_mut().enumerate() {
            *d = aux * counts[i] as f32;
        }
        let (dg, w, s) = (
            &dgate[t * k..(t + 1) * k],
            &gate[t * k..(t + 1) * k],
            &sel[t * k..(t + 1) * k],
        );
        if k == 1 {
            dp[s[0] as usize] += dg[0];
        } else {
            let total: f32 = s.iter().map(|&i| p[i as usize]).sum();
            let dot: f32 = dg.iter().zip(w).map(|(d, w)| d * w).sum();
            for j in 0..k {
                dp[s[j] as usize] += (dg[j] - dot) / total;
            }
        }
        let pdp: f32 = p.iter().zip(&dp).map(|(p, d)| p * d).sum();
        for i in 0..e {
            dlogits[t * e + i] = p[i] * (dp[i] - pdp) + z * lse[t] * p[i];
        }
    }
    Ok(())
}

/// What a routed layer reports about one micro-batch.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MoeStats {
    /// The load-balancing loss `E · Σ_e f_e · P_e` (1 when perfectly balanced), unweighted.
    pub aux_loss: f32,
    /// The router z-loss `mean_n lse_n²`, unweighted.
    pub z_loss: f32,
    /// Assignments dropped for capacity.
    pub dropped: u32,
    /// f_e: the fraction of the N·K assignments that chose expert e (before capacity).
    pub fractions: Vec<f32>,
    /// P_e: expert e's mean router probability.
    pub mean_probs: Vec<f32>,
}

/// The auxiliary losses and the load of a micro-batch: P_e sums each column of `probs` in token
/// order, the z-loss sums lse² in token order, both in f32 as the shader does.
pub fn moe_losses(probs: &[f32], lse: &[f32], counts: &[u32], spec: &MoeSpec) -> Result<MoeStats> {
    let (n, e) = (spec.tokens, spec.experts);
    spec.check(
        "moe_losses",
        &[
            ("probs", n * e, probs.len()),
            ("lse", n, lse.len()),
            ("counts", e, counts.len()),
        ],
    )?;
    let a = spec.assignments() as f32;
    let fractions: Vec<f32> = counts.iter().map(|&c| c as f32 / a).collect();
    let mean_probs: Vec<f32> = (0..e)
        .map(|i| (0..n).map(|t| probs[t * e + i]).sum::<f32>() / n as f32)
        .collect();
    let aux = e as f32
        * fractions
            .iter()
            .zip(&mean_probs)
            .map(|(f, p)| f * p)
            .sum::<f32>();
    let z = lse.iter().map(|l| l * l).sum::<f32>() / n as f32;
    let dropped = counts
        .iter()
        .map(|&c| (c as usize).saturating_sub(spec.capacity) as u32)
        .sum();
    Ok(MoeStats {
        aux_loss: aux,
        z_loss: z,
        dropped,
        fractions,
        mean_probs,
    })
}
