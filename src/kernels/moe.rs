//! The moe family (shaders/moe.wgsl): routing of a mixture-of-experts layer (softmax, top-k,
//! the counting sort into per-expert groups), the gather and the weighted combination, their
//! backwards, the router's backward with the auxiliary losses' gradients, and the losses.
//! The buffers are those of [`crate::cpu::moe`], which each op matches argument for argument.
//! The experts' own products are ordinary batched matmuls over the (E, R, ·) grouped buffers.

use super::{Dispatch, expect_f32, float_precision, grid, loop_budget_ok};
use crate::gpu::{Bind, DType, Gpu, GpuTensor, Specialisation};
use crate::ops::{MoeLossCoefs, MoeSpec};
use crate::{Error, Precision, Result};

/// Invocations per workgroup (the shader's `WG`).
const WG: usize = 64;
/// Assignments per block of the counting sort (the shader's `BLOCK`).
const BLOCK: usize = 256;

/// The uniform block `Dims` of the shader.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Dims {
    tokens: u32,
    experts: u32,
    top_k: u32,
    capacity: u32,
    channels: u32,
    blocks: u32,
    groups_x: u32,
    n: u32,
    aux_factor: f32,
    z_factor: f32,
    _pad0: u32,
    _pad1: u32,
}

fn blocks(spec: &MoeSpec) -> usize {
    spec.assignments().div_ceil(BLOCK)
}

/// One dispatch of `entry` over `items` invocations.
#[allow(clippy::too_many_arguments)]
fn dispatch(
    gpu: &Gpu,
    op: &'static str,
    entry: &'static str,
    precision: Precision,
    spec: &MoeSpec,
    items: usize,
    factors: (f32, f32),
    buffers: &[(u32, Bind<'_>)],
) -> Result<Dispatch> {
    let workgroups = grid(gpu, op, items.div_ceil(WG))?;
    let d = Dims {
        tokens: spec.tokens as u32,
        experts: spec.experts as u32,
        top_k: spec.top_k as u32,
        capacity: spec.capacity as u32,
        channels: spec.channels as u32,
        blocks: blocks(spec) as u32,
        groups_x: workgroups[0],
        n: items as u32,
        aux_factor: factors.0,
        z_factor: factors.1,
        _pad0: 0,
        _pad1: 0,
    };
    let dims = gpu.uniform(entry, &d);
    let mut entries = vec![(0, Bind::whole(&dims))];
    entries.extend_from_slice(buffers);
    let single = entry == "moe_losses";
    Dispatch::new(
        gpu,
        "moe",
        entry,
        precision,
        Specialisation::default()
            .with("WG", WG as u32)
            .with("BLOCK", BLOCK as u32),
        &entries,
        if single { [1, 1, 1] } else { workgroups },
    )
}

/// Checks dtypes and exact lengths: `(tensor, dtype, elements)`; `None` dtype is the storage
/// precision (f16 or f32, the same for all such tensors). Returns that precision.
fn check(
    gpu: &Gpu,
    op: &'static str,
    spec: &MoeSpec,
    tensors: &[(&GpuTensor, Option<DType>, usize)],
) -> Result<Precision> {
    spec.validate(op)?;
    let mut precision = None;
    for (t, dtype, len) in tensors {
        match dtype {
            Some(DType::F32) => expect_f32(op, t)?,
            Some(d) if t.dtype() != *d => {
                return Err(Error::shape(
                    op,
                    format!("tensor {} is {:?}, expected {d:?}", t.label(), t.dtype()),
                ));
            }
            Some(_) => {}
            None => {
                let p = float_precision(op, t)?;
                if precision.is_some_and(|q| q != p) {
                    return Err(Error::shape(
                        op,
                        format!(
                            "tensor {} is {:?}; the others are {precision:?}",
                            t.label(),
                            p
                        ),
                    ));
                }
                precision = Some(p);
            }
        }
        if t.len() != *len {
            return Err(Error::shape(
                op,
                format!(
                    "tensor {} has {} elements, expected {len} for {spec:?}",
                    t.label(),
                    t.len()
                ),
            ));
        }
    }
    for (i, (a, ..)) in tensors.iter().enumerate() {
        if tensors[i + 1..]
            .iter()
            .any(|(b, ..)| a.buffer() == b.buffer() && a.offset_bytes() == b.offset_bytes())
        {
            return Err(Error::shape(
                op,
                format!("tensor {} is passed twice; use separate tensors", a.label()),
            ));
        }
    }
    // The longest loops per invocation: the route's top-k, the sort's prefix and block walk,
    // the gate gradient's channels, the load's tokens.
    let (e, k) = (spec.experts, spec.top_k);
    let longest = [
        3 * e + k * e * k,
        blocks(spec) + BLOCK,
        spec.channels,
        spec.tokens + e,
    ]
    .into_iter()
    .max()
    .unwrap_or(0);
    if !loop_budget_ok(gpu, longest) {
        return Err(Error::shape(
            op,
            format!(
                "{spec:?} needs {longest} loop iterations per invocation, past this adapter's \
                 loop budget (use fewer tokens per micro-batch or fewer experts)"
            ),
        ));
    }
    Ok(precision.unwrap_or(gpu.precision()))
}

macro_rules! record_all {
    ($t:ty) => {
        impl $t {
            /// Adds the dispatches to `pass`.
            pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
                for d in &self.dispatches {
                    d.record(pass);
                }
            }

            /// Records and submits on its own (does not wait).
            pub fn run(&self, gpu: &Gpu) -> Result<()> {
                gpu.run_pass(stringify!($t), |pass| self.record(pass))
            }
        }
    };
}

/// Softmax, top-k and gates per token, then the counting sort (three dispatches; owns the
/// per-(expert, block) counts, 4·E·⌈N·K/256⌉ bytes).
pub struct MoeRouting {
    dispatches: Vec<Dispatch>,
    _block_counts: GpuTensor,
}

impl MoeRouting {
    /// Prepares [`crate::cpu::moe::moe_route`] then [`crate::cpu::moe::moe_dispatch`]:
    /// `probs`, `lse` (f32), `sel` (u32), `gate` (f32), `counts`, `dest`, `src` (u32) from
    /// `logits` (storage precision).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        gpu: &Gpu,
        probs: &GpuTensor,
        sel: &GpuTensor,
        gate: &GpuTensor,
        lse: &GpuTensor,
        counts: &GpuTensor,
        dest: &GpuTensor,
        src: &GpuTensor,
        logits: &GpuTensor,
        spec: &MoeSpec,
    ) -> Result<Self> {
        let op = "moe_routing";
        let (n, e, a) = (spec.tokens, spec.experts, spec.assignments());
        let (f, u) = (Some(DType::F32), Some(DType::U32));
        let precision = check(
            gpu,
            op,
            spec,
            &[
                (probs, f, n * e),
                (sel, u, a),
                (gate, f, a),
                (lse, f, n),
                (counts, u, e),
                (dest, u, a),
                (src, u, spec.grouped_rows()),
                (logits, None, n * e),
            ],
        )?;
        let block_counts = gpu.zeros("moe block counts", &[e * blocks(spec)], DType::U32)?;
        let d = |entry, items, bufs: &[(u32, Bind<'_>)]| {
            dispatch(gpu, op, entry, precision, spec, items, (0.0, 0.0), bufs)
        };
        let dispatches = vec![
            d(
                "moe_route",
                n,
                &[
                    (1, logits.bind()),
                    (2, probs.bind()),
                    (3, sel.bind()),
                    (4, gate.bind()),
                    (5, lse.bind()),
                ],
            )?,
            d(
                "moe_count_blocks",
                e * blocks(spec),
                &[(3, sel.bind()), (6, block_counts.bind())],
            )?,
            d(
                "moe_scatter",
                e * blocks(spec),
                &[
                    (3, sel.bind()),
                    (6, block_counts.bind()),
                    (7, counts.bind()),
                    (8, dest.bind()),
                    (9, src.bind()),
                ],
            )?,
        ];
        Ok(MoeRouting {
            dispatches,
            _block_counts: block_counts,
        })
    }
}
record_all!(MoeRouting);

/// `xg = x` gathered per expert ([`crate::cpu::moe::moe_gather`]).
pub struct MoeGather {
    dispatches: Vec<Dispatch>,
}

impl MoeGather {
    /// Prepares the gather of `x` (N, C) into `xg` (E, R, C).
    pub fn new(
        gpu: &Gpu,
        xg: &GpuTensor,
        x: &GpuTensor,
        src: &GpuTensor,
        counts: &GpuTensor,
        spec: &MoeSpec,
    ) -> Result<Self> {
        let op = "moe_gather";
        let g = spec.grouped_rows();
        let u = Some(DType::U32);
        let precision = check(
            gpu,
            op,
            spec,
            &[
                (xg, None, g * spec.channels),
                (x, None, spec.tokens * spec.channels),
                (src, u, g),
                (counts, u, spec.experts),
            ],
        )?;
        let dispatches = vec![dispatch(
            gpu,
            op,
            "moe_gather",
            precision,
            spec,
            g * spec.channels,
            (0.0, 0.0),
            &[
                (7, counts.bind()),
                (9, src.bind()),
                (10, x.bind()),
                (11, xg.bind()),
            ],
        )?];
        Ok(MoeGather { dispatches })
    }
}
record_all!(MoeGather);

/// `y = Σ gate · yg` ([`crate::cpu::moe::moe_combine`]).
pub struct MoeCombine {
    dispatches: Vec<Dispatch>,
}

impl MoeCombine {
    /// Prepares the weighted combination of the experts' outputs `yg` (E, R, C) into `y` (N, C).
    pub fn new(
        gpu: &Gpu,
        y: &GpuTensor,
        yg: &GpuTensor,
        dest: &GpuTensor,
        gate: &GpuTensor,
        spec: &MoeSpec,
    ) -> Result<Self> {
        let op = "moe_combine";
        let (c, a) = (spec.channels, spec.assignments());
        let precision = check(
            gpu,
            op,
            spec,
            &[
                (y, None, spec.tokens * c),
                (yg, None, spec.grouped_rows() * c),
                (dest, Some(DType::U32), a),
                (gate, Some(DType::F32), a),
            ],
        )?;
        let dispatches = vec![dispatch(
            gpu,
            op,
            "moe_combine",
            precision,
            spec,
            spec.tokens * c,
            (0.0, 0.0),
            &[
                (4, gate.bind()),
                (8, dest.bind()),
                (12, yg.bind()),
                (13, y.bind()),
            ],
        )?];
        Ok(MoeCombine { dispatches })
    }
}
record_all!(MoeCombine);

/// The combination's backward: `dyg` and `dgate`
/// ([`crate::cpu::moe::moe_combine_backward`]), two dispatches.
pub struct MoeCombineBackward {
    dispatches: Vec<Dispatch>,
}

impl MoeCombineBackward {
    /// Prepares `dyg` (E, R, C) and `dgate` (N, K, f32) from `dy` (N, C).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        gpu: &Gpu,
        dyg: &GpuTensor,
        dgate: &GpuTensor,
        dy: &GpuTensor,
        yg: &GpuTensor,
        gate: &GpuTensor,
        dest: &GpuTensor,
        src: &GpuTensor,
        counts: &GpuTensor,
        spec: &MoeSpec,
    ) -> Result<Self> {
        let op = "moe_combine_backward";
        let (c, a, g) = (spec.channels, spec.assignments(), spec.grouped_rows());
        let (f, u) = (Some(DType::F32), Some(DType::U32));
        let precision = check(
            gpu,
            op,
            spec,
            &[
                (dyg, None, g * c),
                (dgate, f, a),
                (dy, None, spec.tokens * c),
                (yg, None, g * c),
                (gate, f, a),
                (dest, u, a),
                (src, u, g),
                (counts, u, spec.experts),
            ],
        )?;
        let dispatches = vec![
            dispatch(
                gpu,
                op,
                "moe_combine_backward",
                precision,
                spec,
                g * c,
                (0.0, 0.0),
                &[
                    (4, gate.bind()),
                    (7, counts.bind()),
                    (9, src.bind()),
                    (14, dy.bind()),
                    (15, dyg.bind()),
                ],
            )?,
            dispatch(
                gpu,
                op,
                "moe_gate_grad",
                precision,
                spec,
                a,
                (0.0, 0.0),
                &[
                    (8, dest.bind()),
                    (12, yg.bind()),
                    (14, dy.bind()),
                    (16, dgate.bind()),
                ],
            )?,
        ];
        Ok(MoeCombineBackward { dispatches })
    }
}
record_all!(MoeCombineBackward);

/// The gather's backward, `dx = Σ dxg` ([`crate::cpu::moe::moe_gather_backward`]).
pub struct MoeGatherBackward {
    dispatches: Vec<Dispatch>,
}

impl MoeGatherBackward {
    /// Prepares `dx` (N, C, overwritten) from `dxg` (E, R, C).
    pub fn new(
        gpu: &Gpu,
        dx: &GpuTensor,
        dxg: &GpuTensor,
        dest: &GpuTensor,
        spec: &MoeSpec,
    ) -> Result<Self> {
        let op = "moe_gather_backward";
        let c = spec.channels;
        let precision = check(
            gpu,
            op,
            spec,
            &[
                (dx, None, spec.tokens * c),
                (dxg, None, spec.grouped_rows() * c),
                (dest, Some(DType::U32), spec.assignments()),
            ],
        )?;
        let dispatches = vec![dispatch(
            gpu,
            op,
            "moe_gather_backward",
            precision,
            spec,
            spec.tokens * c,
            (0.0, 0.0),
            &[(8, dest.bind()), (17, dxg.bind()), (18, dx.bind())],
        )?];
        Ok(MoeGatherBackward { dispatches })
    }
}
record_all!(MoeGatherBackward);

/// The router's backward with the auxiliary losses' gradients
/// ([`crate::cpu::moe::moe_route_backward`]).
pub struct MoeRouteBackward {
    dispatches: Vec<Dispatch>,
}

impl MoeRouteBackward {
    /// Prepares `dlogits` (N, E, overwritten); `loss_scale` is a one-element f32 buffer read
    /// when the dispatch runs (the dynamic loss scale).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        gpu: &Gpu,
        dlogits: &GpuTensor,
        dgate: &GpuTensor,
        probs: &GpuTensor,
        sel: &GpuTensor,
        gate: &GpuTensor,
        lse: &GpuTensor,
        counts: &GpuTensor,
        loss_scale: &GpuTensor,
        spec: &MoeSpec,
        coefs: MoeLossCoefs,
    ) -> Result<Self> {
        let op = "moe_route_backward";
        let (n, e, a) = (spec.tokens, spec.experts, spec.assignments());
        let (f, u) = (Some(DType::F32), Some(DType::U32));
        let precision = check(
            gpu,
            op,
            spec,
            &[
                (dlogits, None, n * e),
                (dgate, f, a),
                (probs, f, n * e),
                (sel, u, a),
                (gate, f, a),
                (lse, f, n),
                (counts, u, e),
                (loss_scale, f, 1),
            ],
        )?;
        let dispatches = vec![dispatch(
            gpu,
            op,
            "moe_route_backward",
            precision,
            spec,
            n,
            coefs.gradient_factors(spec),
            &[
                (2, probs.bind()),
                (3, sel.bind()),
                (4, gate.bind()),
                (5, lse.bind()),
                (7, counts.bind()),
                (16, dgate.bind()),
                (19, dlogits.bind()),
                (20, loss_scale.bind()),
            ],
        )?];
        Ok(MoeRouteBackward { dispatches })
    }
}
record_all!(MoeRouteBackward);

/// Elements of a layer's statistics buffer: aux loss, z-loss, dropped assignments, then f_e and
/// P_e per expert (the layout [`crate::cpu::moe::MoeStats`] is read from).
pub fn stats_len(experts: usize) -> usize {
    3 + 2 * experts
}

/// The load and the auxiliary losses into a statistics buffer ([`crate::cpu::moe::moe_losses`]),
/// two dispatches.
pub struct MoeLosses {
    dispatches: Vec<Dispatch>,
}

impl MoeLosses {
    /// Prepares `stats` (f32, [`stats_len`]) from `probs`, `lse` and `counts`.
    pub fn new(
        gpu: &Gpu,
        stats: &GpuTensor,
        probs: &GpuTensor,
        lse: &GpuTensor,
        counts: &GpuTensor,
        spec: &MoeSpec,
    ) -> Result<Self> {
        let op = "moe_losses";
        let (n, e) = (spec.tokens, spec.experts);
        let f = Some(DType::F32);
        let precision = check(
            gpu,
            op,
            spec,
            &[
                (stats, f, stats_len(e)),
                (probs, f, n * e),
                (lse, f, n),
                (counts, Some(DType::U32), e),
            ],
        )?;
        let d = |entry, items, bufs: &[(u32, Bind<'_>)]| {
            dispatch(gpu, op, entry, precision, spec, items, (0.0, 0.0), bufs)
        };
        let dispatches = vec![
            d(
                "moe_expert_load",
                e,
                &[(2, probs.bind()), (7, counts.bind()), (21, stats.bind())],
            )?,
            d(
                "moe_losses",
                1,
                &[(5, lse.bind()), (7, counts.bind()), (21, stats.bind())],
            )?,
        ];
        Ok(MoeLosses { dispatches })
    }
}
record_all!(MoeLosses);

/// The statistics of a layer read back from its buffer's values.
pub fn parse_stats(values: &[f32], experts: usize) -> Result<crate::cpu::moe::MoeStats> {
    if values.len() != stats_len(experts) {
        return Err(Error::shape(
            "moe_losses",
            format!(
                "{} statistics for {experts} experts, expected {}",
                values.len(),
                stats_len(experts)
            ),
        ));
    }
    Ok(crate::cpu::moe::MoeStats {
        aux_loss: values[0],
        z_loss: values[1],
        dropped: values[2] as u32,
        fractions: values[3..3 + experts].to_vec(),
        mean_probs: values[3 + experts..].to_vec(),
    })
}
