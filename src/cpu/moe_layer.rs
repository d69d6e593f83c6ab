//! A whole routed MLP on the CPU, composed of the routing ops of [`super::moe`] and the batched
//! reference matmul, in the GPU step's order: router, softmax and top-k, counting sort, gather,
//! the experts' products batched over experts (one product of E matrices, as the GPU runs it),
//! activation, combine. The backward is its exact reverse and also returns the gradients of the
//! weighted auxiliary losses. The model's MoE unit and the finite-difference tests both use it.

use super::moe::{
    MoeStats, moe_combine, moe_combine_backward, moe_dispatch, moe_gather, moe_gather_backward,
    moe_losses, moe_route, moe_route_backward,
};
use crate::model::MlpKind;
use crate::ops::{Layout, MatmulSpec, MoeLossCoefs, MoeSpec, SwiGluSpec};
use crate::{Error, Result};

/// Sizes and settings of one routed MLP over a micro-batch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MoeLayerSpec {
    /// Routing sizes (tokens, experts, top-k, capacity, channels).
    pub routing: MoeSpec,
    /// Hidden width of each expert.
    pub hidden: usize,
    /// The experts' activation.
    pub kind: MlpKind,
    /// Weights of the auxiliary losses.
    pub coefs: MoeLossCoefs,
}

impl MoeLayerSpec {
    /// Width of an expert's input projection (SwiGLU's gate|up is twice the hidden width).
    pub fn fc_width(&self) -> usize {
        match self.kind {
            MlpKind::Gelu => self.hidden,
            MlpKind::SwiGlu => 2 * self.hidden,
        }
    }

    /// The router's `(N, E) = X·Wrᵀ`.
    pub fn router_product(&self) -> MatmulSpec {
        let r = &self.routing;
        MatmulSpec::new(Layout::NT, r.tokens, r.experts, r.channels)
    }

    /// Every expert's input projection at once: `(E, R, fc) = Xg[e]·W1[e]ᵀ`.
    pub fn fc_product(&self) -> MatmulSpec {
        let r = &self.routing;
        MatmulSpec::new(Layout::NT, r.capacity, self.fc_width(), r.channels).batched(r.experts)
    }

    /// Every expert's output projection: `(E, R, C) = A[e]·W2[e]ᵀ`.
    pub fn proj_product(&self) -> MatmulSpec {
        let r = &self.routing;
        MatmulSpec::new(Layout::NT, r.capacity, r.channels, self.hidden).batched(r.experts)
    }
}

/// The weights of a routed MLP: router (E, C), experts' input projections (E, fc, C) and
/// output projections (E, C, hidden), linear layers' (out, in) layout.
#[derive(Clone, Copy, Debug)]
pub struct MoeWeights<'a> {
    /// Router.
    pub router: &'a [f32],
    /// Input projections (fc, or gate|up stacked by rows).
    pub fc: &'a [f32],
    /// Output projections.
    pub proj: &'a [f32],
}

/// Everything the backward reads, and the layer's statistics.
#[derive(Clone, Debug)]
pub struct MoeCache {
    x: Vec<f32>,
    probs: Vec<f32>,
    sel: Vec<u32>,
    gate: Vec<f32>,
    lse: Vec<f32>,
    counts: Vec<u32>,
    dest: Vec<u32>,
    src: Vec<u32>,
    xg: Vec<f32>,
    hg: Vec<f32>,
    ag: Vec<f32>,
    yg: Vec<f32>,
    /// The load and the unweighted auxiliary losses of the micro-batch.
    pub stats: MoeStats,
}

impl MoeCache {
    /// The experts chosen per (token, slot).
    pub fn selected(&self) -> &[u32] {
        &self.sel
    }
    /// The grouped row of each (token, slot), or [`crate::ops::MOE_NONE`] when dropped.
    pub fn destinations(&self) -> &[u32] {
        &self.dest
    }
}

/// Gradients of a routed MLP's weights (same layouts as [`MoeWeights`]).
#[derive(Clone, Debug)]
pub struct MoeGrads {
    /// Router.
    pub router: Vec<f32>,
    /// Input projections.
    pub fc: Vec<f32>,
    /// Output projections.
    pub proj: Vec<f32>,
}

fn check_weights(w: &MoeWeights<'_>, spec: &MoeLayerSpec) -> Result<()> {
    let r = &spec.routing;
    let want = [
        ("router", r.experts * r.channels, w.router.len()),
        ("fc", r.experts * spec.fc_width() * r.channels, w.fc.len()),
        ("proj", r.experts * r.channels * spec.hidden, w.proj.len()),
    ];
    match want.iter().find(|(_, need, have)| need != have) {
        Some((name, need, have)) => Err(Error::shape(
            "moe_layer",
            format!("{name} weights have {have} elements, expected {need} for {spec:?}"),
        )),
        None if spec.hidden == 0 => Err(Error::shape("moe_layer", "hidden must be positive")),
        None => Ok(()),
    }
}

/// `y` (N, C) of the routed MLP on `x` (N, C); returns what the backward needs.
pub fn moe_layer_forward(
    y: &mut [f32],
    x: &[f32],
    w: &MoeWeights<'_>,
    spec: &MoeLayerSpec,
) -> Result<MoeCache> {
    check_weights(w, spec)?;
    let r = spec.routing;
    let (n, e, k, g) = (r.tokens, r.experts, r.top_k, r.grouped_rows());
    let mut logits = vec![0.0; n * e];
    super::matmul::matmul(&mut logits, x, w.router, None, &spec.router_product())?;
    let mut c = MoeCache {
        x: x.to_vec(),
        probs: vec![0.0; n * e],
        sel: vec![0; n * k],
        gate: vec![0.0; n * k],
        lse: vec![0.0; n],
        counts: vec![0; e],
        dest: vec![0; n * k],
        src: vec![0; g],
        xg: vec![0.0; g * r.channels],
        hg: vec![0.0; g * spec.fc_width()],
        ag: vec![0.0; g * spec.hidden],
        yg: vec![0.0; g * r.channels],
        stats: MoeStats::default(),
    };
    moe_route(
        &mut c.probs,
        &mut c.sel,
        &mut c.gate,
        &mut c.lse,
        &logits,
        &r,
    )?;
    moe_dispatch(&mut c.dest, &mut c.src, &mut c.counts, &c.sel, &r)?;
    moe_gather(&mut c.xg, x, &c.src, &c.counts, &r)?;
    super::matmul::matmul(&mut c.hg, &c.xg, w.fc, None, &spec.fc_product())?;
    match spec.kind {
        MlpKind::Gelu => super::activation::gelu_forward(&mut c.ag, &c.hg)?,
        MlpKind::SwiGlu => {
            super::swiglu::swiglu_forward(&mut c.ag, &c.hg, &SwiGluSpec::new(g, spec.hidden))?
        }
    }
    super::matmul::matmul(&mut c.yg, &c.ag, w.proj, None, &spec.proj_product())?;
    moe_combine(y, &c.yg, &c.dest, &c.gate, &r)?;
    c.stats = moe_losses(&c.probs, &c.lse, &c.counts, &r)?;
    Ok(c)
}

/// The weighted auxiliary losses of a forward: `coefs.aux · aux + coefs.z · z`.
pub fn moe_aux_total(cache: &MoeCache, spec: &MoeLayerSpec) -> f64 {
    f64::from(spec.coefs.aux) * f64::from(cache.stats.aux_loss)
        + f64::from(spec.coefs.z) * f64::from(cache.stats.z_loss)
}

/// The backward of [`moe_layer_forward`] given `dy`: writes dx (N, C) and returns the weight
/// gradients. Includes `loss_scale ×` the gradients of the weighted auxiliary losses (the
/// scale that multiplies `dy`), so the gradients are those of
/// `Σ dy·y + loss_scale·(coefs.aux·aux + coefs.z·z)`.
pub fn moe_layer_backward(
    dx: &mut [f32],
    dy: &[f32],
    cache: &MoeCache,
    w: &MoeWeights<'_>,
    spec: &MoeLayerSpec,
    loss_scale: f32,
) -> Result<MoeGrads> {
    check_weights(w, spec)?;
    let r = spec.routing;
    let (n, e, g, ch) = (r.tokens, r.experts, r.grouped_rows(), r.channels);
    let (fcw, h) = (spec.fc_width(), spec.hidden);
    let c = cache;
    let mut dyg = vec![0.0; g * ch];
    let mut dgate = vec![0.0; r.assignments()];
    moe_combine_backward(
        &mut dyg, &mut dgate, dy, &c.yg, &c.gate, &c.dest, &c.src, &c.counts, &r,
    )?;
    let mut grads = MoeGrads {
        router: vec![0.0; e * ch],
        fc: vec![0.0; e * fcw * ch],
        proj: vec![0.0; e * ch * h],
    };
    // Output projections: dA = dYg·W2, dW2 = dYgᵀ·A, per expert.
    let mut dag = vec![0.0; g * h];
    let mm = super::matmul::matmul;
    mm(
        &mut dag,
        &dyg,
        w.proj,
        None,
        &MatmulSpec::new(Layout::NN, r.capacity, h, ch).batched(e),
    )?;
    mm(
        &mut grads.proj,
        &dyg,
        &c.ag,
        None,
        &MatmulSpec::new(Layout::TN, ch, h, r.capacity).batched(e),
    )?;
    let mut dhg = vec![0.0; g * fcw];
    match spec.kind {
        MlpKind::Gelu => super::activation::gelu_backward(&mut dhg, &dag, &c.hg, false)?,
        MlpKind::SwiGlu => {
            super::swiglu::swiglu_backward(&mut dhg, &dag, &c.hg, &SwiGluSpec::new(g, h), false)?
        }
    }
    let mut dxg = vec![0.0; g * ch];
    mm(
        &mut dxg,
        &dhg,
        w.fc,
        None,
        &MatmulSpec::new(Layout::NN, r.capacity, ch, fcw).batched(e),
    )?;
    mm(
        &mut grads.fc,
        &dhg,
        &c.xg,
        None,
        &MatmulSpec::new(Layout::TN, fcw, ch, r.capacity).batched(e),
    )?;
    moe_gather_backward(dx, &dxg, &c.dest, &r)?;
    let mut dlogits = vec![0.0; n * e];
    moe_route_backward(
        &mut dlogits,
        &dgate,
        &c.probs,
        &c.sel,
        &c.gate,
        &c.lse,
        &c.counts,
        &r,
        spec.coefs,
        loss_scale,
    )?;
    // The router: dx += dLogits·Wr, dWr = dLogitsᵀ·X.
    mm(
        dx,
        &dlogits,
        w.router,
        None,
        &MatmulSpec::new(Layout::NN, n, ch, e).accumulate(true),
    )?;
    mm(
        &mut grads.router,
        &dlogits,
        &c.x,
        None,
        &MatmulSpec::new(Layout::TN, e, ch, n),
    )?;
    Ok(grads)
}
