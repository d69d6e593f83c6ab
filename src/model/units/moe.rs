//! The routed MLP (mixture of experts, [`crate::model::moe`]): a router (E, C), then per expert
//! the architecture's MLP (GELU: `c_fc`, `c_proj`; SwiGLU: `gate_up_proj`, `down_proj`), stored
//! as one (E, out, in) tensor per projection so that one batched product runs every expert.
//!
//! GPU forward: router product, routing (softmax, top-k, counting sort), gather into the
//! (E, R, C) grouped buffer, the experts' two products (batched over E) around the activation,
//! combine, and the layer's statistics. Groups are padded to the capacity R (the whole
//! micro-batch when dropless) so that the experts' products are the ordinary batched matmul,
//! the fastest kernel kiln has on every adapter (the texture variant on lavapipe runs ~10× the
//! rate of a storage-buffer kernel; see the matmul family), at the price of computing padded
//! rows: E·R rows instead of the N·K routed ones.

use super::{CpuCtx, DecodeCtx, GpuCtx, Ops, alias, grad_mut};
use crate::Result;
use crate::cpu::moe_layer::{MoeCache, MoeLayerSpec, MoeWeights, moe_layer_backward};
use crate::gpu::{DType, Gpu, GpuTensor};
use crate::kernels::Record;
use crate::kernels::activation::{GeluBackward, GeluForward};
use crate::kernels::matmul::Matmul;
use crate::kernels::moe::{
    MoeCombine, MoeCombineBackward, MoeGather, MoeGatherBackward, MoeLosses, MoeRouteBackward,
    MoeRouting, stats_len,
};
use crate::kernels::swiglu::{SwiGluBackward, SwiGluForward};
use crate::model::MlpKind;
use crate::model::layout::{Component, LayoutBuilder, ParamKind};
use crate::model::moe::MoeConfig;
use crate::ops::{Layout, MatmulSpec, MoeLossCoefs, MoeSpec, SwiGluSpec};

/// Makes a named buffer of a length, in the storage precision (`None`) or the given type.
type Alloc<'a> = dyn FnMut(&str, usize, Option<DType>) -> Result<GpuTensor> + 'a;

/// Layer `layer`'s routed MLP.
#[derive(Clone, Debug)]
pub(crate) struct Moe {
    pub layer: usize,
    pub kind: MlpKind,
    /// Prefixes of the router, the experts' input projections and output projections.
    pub router_prefix: String,
    pub fc_prefix: String,
    pub proj_prefix: String,
    pub channels: usize,
    /// Hidden width of each expert.
    pub hidden: usize,
    pub config: MoeConfig,
}

impl Moe {
    fn names(&self) -> [String; 3] {
        [
            format!("{}.weight", self.router_prefix),
            format!("{}.weight", self.fc_prefix),
            format!("{}.weight", self.proj_prefix),
        ]
    }

    /// The layer's sizes over `tokens` rows with `capacity` rows per expert.
    fn spec(&self, tokens: usize, capacity: usize) -> MoeLayerSpec {
        MoeLayerSpec {
            routing: MoeSpec {
                tokens,
                experts: self.config.n_experts,
                top_k: self.config.top_k,
                capacity,
                channels: self.channels,
            },
            hidden: self.hidden,
            kind: self.kind,
            coefs: MoeLossCoefs {
                aux: self.config.aux_loss_coef as f32,
                z: self.config.router_z_loss_coef as f32,
            },
        }
    }

    pub fn declare(&self, l: &mut LayoutBuilder) {
        let (e, c, h) = (self.config.n_experts, self.channels, self.hidden);
        let spec = self.spec(1, 1);
        let [router, fc, proj] = self.names();
        l.add(router, vec![e, c], ParamKind::Weight, Component::Mlp, true);
        l.add(
            fc,
            vec![e, spec.fc_width(), c],
            ParamKind::Weight,
            Component::Experts,
            true,
        );
        l.add(
            proj,
            vec![e, c, h],
            ParamKind::Weight,
            Component::Experts,
            true,
        );
    }

    /// Records the routed MLP over `rows` rows of `x` into `ops`; `alloc` makes each buffer.
    fn record(
        &self,
        gpu: &Gpu,
        weights: [GpuTensor; 3],
        spec: &MoeLayerSpec,
        ops: &mut Ops,
        x: &GpuTensor,
        alloc: &mut Alloc<'_>,
    ) -> Result<MoeGpu> {
        let r = spec.routing;
        let (n, e, a, g) = (r.tokens, r.experts, r.assignments(), r.grouped_rows());
        let (f, u) = (Some(DType::F32), Some(DType::U32));
        let [wr, w1, w2] = weights;
        let s = MoeGpu {
            spec: *spec,
            input: alias(x)?,
            logits: alloc("router logits", n * e, None)?,
            probs: alloc("router probs", n * e, f)?,
            sel: alloc("router sel", a, u)?,
            gate: alloc("router gate", a, f)?,
            lse: alloc("router lse", n, f)?,
            counts: alloc("expert counts", e, u)?,
            dest: alloc("moe dest", a, u)?,
            src: alloc("moe src", g, u)?,
            xg: alloc("moe xg", g * r.channels, None)?,
            hg: alloc("moe hg", g * spec.fc_width(), None)?,
            ag: alloc("moe ag", g * spec.hidden, None)?,
            yg: alloc("moe yg", g * r.channels, None)?,
            y: alloc("moe out", n * r.channels, None)?,
            stats: alloc("moe stats", stats_len(e), f)?,
            dgate: alloc("moe dgate", a, f)?,
            weights: [wr, w1, w2],
            names: self.names(),
        };
        let [wr, w1, w2] = &s.weights;
        ops.push(Box::new(Matmul::new(
            gpu,
            &s.logits,
            x,
            wr,
            None,
            &spec.router_product(),
        )?));
        ops.push(Box::new(MoeRouting::new(
            gpu, &s.probs, &s.sel, &s.gate, &s.lse, &s.counts, &s.dest, &s.src, &s.logits, &r,
        )?));
        ops.push(Box::new(MoeGather::new(
            gpu, &s.xg, x, &s.src, &s.counts, &r,
        )?));
        ops.push(Box::new(Matmul::new(
            gpu,
            &s.hg,
            &s.xg,
            w1,
            None,
            &spec.fc_product(),
        )?));
        ops.push(match self.kind {
            MlpKind::Gelu => Box::new(GeluForward::new(gpu, &s.ag, &s.hg)?) as Box<dyn Record>,
            MlpKind::SwiGlu => Box::new(SwiGluForward::new(
                gpu,
                &s.ag,
                &s.hg,
                &SwiGluSpec::new(g, spec.hidden),
            )?),
        });
        ops.push(Box::new(Matmul::new(
            gpu,
            &s.yg,
            &s.ag,
            w2,
            None,
            &spec.proj_product(),
        )?));
        ops.push(Box::new(MoeCombine::new(
            gpu, &s.y, &s.yg, &s.dest, &s.gate, &r,
        )?));
        Ok(s)
    }

    /// Records the routed MLP over the ctx's rows; the statistics buffer joins
    /// [`GpuCtx::moe_stats`].
    pub fn forward(
        &self,
        ctx: &mut GpuCtx<'_>,
        ops: &mut Ops,
        x: &GpuTensor,
    ) -> Result<(MoeGpu, GpuTensor)> {
        let rows = ctx.rows();
        // Capacity binds training (and its evaluation, on the same plan); a model built for
        // inference routes dropless, so the prefill agrees with one-token decoding.
        let capacity = if ctx.inference {
            rows
        } else {
            self.config.capacity(rows)
        };
        let spec = self.spec(rows, capacity);
        let weights = self.names().map(|n| ctx.p.get(&n));
        let [a, b, c] = weights;
        let (gpu, dt) = (ctx.gpu, ctx.dt);
        let l = self.layer;
        let mut alloc = |name: &str, len: usize, dtype: Option<DType>| {
            gpu.zeros(&format!("h.{l}.{name}"), &[len], dtype.unwrap_or(dt))
        };
        let s = self.record(gpu, [a?, b?, c?], &spec, ops, x, &mut alloc)?;
        ops.push(Box::new(MoeLosses::new(
            gpu,
            &s.stats,
            &s.probs,
            &s.lse,
            &s.counts,
            &spec.routing,
        )?));
        ctx.moe_stats.push(alias(&s.stats)?);
        let y = alias(&s.y)?;
        Ok((s, y))
    }

    /// The one-row forward of the decoder: one token never overflows an expert (capacity 1).
    pub fn decode(&self, d: &mut DecodeCtx<'_>, ops: &mut Ops, x: &GpuTensor) -> Result<GpuTensor> {
        let spec = self.spec(1, 1);
        let weights = self.names().map(|n| d.param(&n));
        let [a, b, c] = weights;
        let gpu = d.gpu;
        let dt = DType::from(d.model.precision());
        let mut made = Vec::new();
        let mut alloc = |name: &str, len: usize, dtype: Option<DType>| {
            let t = gpu.zeros(&format!("decode {name}"), &[len], dtype.unwrap_or(dt))?;
            made.push(alias(&t)?);
            Ok(t)
        };
        let s = self.record(gpu, [a?, b?, c?], &spec, ops, x, &mut alloc)?;
        d.keep.extend(made);
        alias(&s.y)
    }

    pub fn cpu_forward(&self, c: &CpuCtx<'_>, x: Vec<f32>) -> Result<(MoeCpu, Vec<f32>)> {
        let rows = c.rows();
        let spec = self.spec(rows, self.config.capacity(rows));
        let [router, fc, proj] = self.names();
        let w = MoeWeights {
            router: c.get(&router)?,
            fc: c.get(&fc)?,
            proj: c.get(&proj)?,
        };
        let mut y = vec![0.0; rows * self.channels];
        let cache = crate::cpu::moe_layer::moe_layer_forward(&mut y, &x, &w, &spec)?;
        c.moe_stats.borrow_mut().push(cache.stats.clone());
        Ok((
            MoeCpu {
                unit: self.clone(),
                spec,
                cache,
            },
            y,
        ))
    }
}

/// The GPU state of a routed MLP: its buffers (what the backward reads) and weights.
pub(crate) struct MoeGpu {
    spec: MoeLayerSpec,
    input: GpuTensor,
    logits: GpuTensor,
    probs: GpuTensor,
    sel: GpuTensor,
    gate: GpuTensor,
    lse: GpuTensor,
    counts: GpuTensor,
    dest: GpuTensor,
    src: GpuTensor,
    xg: GpuTensor,
    hg: GpuTensor,
    ag: GpuTensor,
    yg: GpuTensor,
    y: GpuTensor,
    stats: GpuTensor,
    /// The gradient of the gates (written by the backward).
    dgate: GpuTensor,
    /// Router, input and output projections (views of the parameters), and their names.
    weights: [GpuTensor; 3],
    names: [String; 3],
}

impl MoeGpu {
    /// Records the backward given dy; returns dx (the buffer the MLP's backward uses too).
    pub fn backward(
        &self,
        ctx: &mut GpuCtx<'_>,
        ops: &mut Ops,
        dy: &GpuTensor,
    ) -> Result<GpuTensor> {
        let (spec, r) = (&self.spec, self.spec.routing);
        let (n, e, g, c) = (r.tokens, r.experts, r.grouped_rows(), r.channels);
        let (fcw, h, cap) = (spec.fc_width(), spec.hidden, r.capacity);
        let gpu = ctx.gpu;
        let dyg = ctx.shared(&format!("moe dyg {g}x{c}"), g * c)?;
        let dxg = ctx.shared(&format!("moe dxg {g}x{c}"), g * c)?;
        let dag = ctx.shared(&format!("moe dag {g}x{h}"), g * h)?;
        let dhg = ctx.shared(&format!("moe dhg {g}x{fcw}"), g * fcw)?;
        let dlogits = ctx.shared(&format!("moe dlogits {n}x{e}"), n * e)?;
        let dgate = &self.dgate;
        let dx = ctx.shared("dln", n * c)?;
        let loss_scale = ctx.loss_scale()?;
        let [wr, w1, w2] = &self.weights;
        let [gr, g1, g2] = self.names.clone().map(|name| ctx.g.get(&name));
        let (gr, g1, g2) = (gr?, g1?, g2?);
        let mm = |c: &GpuTensor, a: &GpuTensor, b: &GpuTensor, s: MatmulSpec| {
            Matmul::new(gpu, c, a, b, None, &s).map(|m| Box::new(m) as Box<dyn Record>)
        };
        ops.push(Box::new(MoeCombineBackward::new(
            gpu,
            &dyg,
            dgate,
            dy,
            &self.yg,
            &self.gate,
            &self.dest,
            &self.src,
            &self.counts,
            &r,
        )?));
        ops.push(mm(
            &dag,
            &dyg,
            w2,
            MatmulSpec::new(Layout::NN, cap, h, c).batched(e),
        )?);
        ops.push(mm(
            &g2,
            &dyg,
            &self.ag,
            MatmulSpec::new(Layout::TN, c, h, cap)
                .batched(e)
                .accumulate(true),
        )?);
        ops.push(match spec.kind {
            MlpKind::Gelu => {
                Box::new(GeluBackward::new(gpu, &dhg, &dag, &self.hg, false)?) as Box<dyn Record>
            }
            MlpKind::SwiGlu => Box::new(SwiGluBackward::new(
                gpu,
                &dhg,
                &dag,
                &self.hg,
                &SwiGluSpec::new(g, h),
                false,
            )?),
        });
        ops.push(mm(
            &dxg,
            &dhg,
            w1,
            MatmulSpec::new(Layout::NN, cap, c, fcw).batched(e),
        )?);
        ops.push(mm(
            &g1,
            &dhg,
            &self.xg,
            MatmulSpec::new(Layout::TN, fcw, c, cap)
                .batched(e)
                .accumulate(true),
        )?);
        ops.push(Box::new(MoeGatherBackward::new(
            gpu, &dx, &dxg, &self.dest, &r,
        )?));
        ops.push(Box::new(MoeRouteBackward::new(
            gpu,
            &dlogits,
            dgate,
            &self.probs,
            &self.sel,
            &self.gate,
            &self.lse,
            &self.counts,
            &loss_scale,
            &r,
            spec.coefs,
        )?));
        ops.push(mm(
            &dx,
            &dlogits,
            wr,
            MatmulSpec::new(Layout::NN, n, c, e).accumulate(true),
        )?);
        ops.push(mm(
            &gr,
            &dlogits,
            &self.input,
            MatmulSpec::new(Layout::TN, e, c, n).accumulate(true),
        )?);
        Ok(dx)
    }
}

/// The CPU state of a routed MLP's backward.
pub(crate) struct MoeCpu {
    unit: Moe,
    spec: MoeLayerSpec,
    cache: MoeCache,
}

impl MoeCpu {
    pub fn backward(&self, c: &CpuCtx<'_>, g: &mut [f32], dy: &[f32]) -> Result<Vec<f32>> {
        let names = self.unit.names();
        let w = MoeWeights {
            router: c.get(&names[0])?,
            fc: c.get(&names[1])?,
            proj: c.get(&names[2])?,
        };
        let mut dx = vec![0.0; dy.len()];
        let grads = moe_layer_backward(&mut dx, dy, &self.cache, &w, &self.spec, c.dloss_scale)?;
        for (name, grad) in names.iter().zip([grads.router, grads.fc, grads.proj]) {
            for (a, b) in grad_mut(c.layout, g, name)?.iter_mut().zip(grad) {
                *a += b;
            }
        }
        Ok(dx)
    }
}
