//! The moe family: GPU routing kernels against the CPU reference on awkward shapes in both
//! precisions, deterministic tie-breaks, capacity overflow, finite-difference checks of the
//! CPU routed MLP (experts, router, both auxiliary losses) and the checker failing on wrong
//! gradients, and shape errors.

mod common;

use common::gradcheck::{GradCheck, check_gradient, weighted_sum};
use common::{Tolerance, assert_close, gpu, random, round_to};
use kiln::Precision;
use kiln::cpu::moe as cpu;
use kiln::cpu::moe_layer::{
    MoeLayerSpec, MoeWeights, moe_aux_total, moe_layer_backward, moe_layer_forward,
};
use kiln::gpu::{DType, Gpu, GpuTensor};
use kiln::kernels::moe::{
    MoeCombine, MoeCombineBackward, MoeGather, MoeGatherBackward, MoeLosses, MoeRouteBackward,
    MoeRouting, parse_stats, stats_len,
};
use kiln::model::MlpKind;
use kiln::ops::{MOE_NONE, MoeLossCoefs, MoeSpec};

/// (tokens, experts, top_k, capacity, channels): one token; K = 1 (Switch gates); channels and
/// counts that are multiples of nothing; capacity below the even share (drops); more than one
/// 256-assignment block of the counting sort (300·3 = 900 assignments, 4 blocks; 700·2 = 1400,
/// 6 blocks, with drops); K = E (every expert chosen).
const SHAPES: [(usize, usize, usize, usize, usize); 7] = [
    (1, 2, 1, 1, 1),
    (7, 3, 2, 7, 5),
    (37, 4, 2, 10, 67),
    (19, 5, 1, 19, 3),
    (300, 8, 3, 300, 13),
    (700, 6, 2, 150, 9),
    (9, 4, 4, 9, 6),
];

struct Routed {
    probs: Vec<f32>,
    sel: Vec<u32>,
    gate: Vec<f32>,
    lse: Vec<f32>,
    counts: Vec<u32>,
    dest: Vec<u32>,
    src: Vec<u32>,
}

fn cpu_route(logits: &[f32], spec: &MoeSpec) -> Routed {
    let (n, e, a) = (spec.tokens, spec.experts, spec.assignments());
    let mut r = Routed {
        probs: vec![0.0; n * e],
        sel: vec![0; a],
        gate: vec![0.0; a],
        lse: vec![0.0; n],
        counts: vec![0; e],
        dest: vec![0; a],
        src: vec![0; spec.grouped_rows()],
    };
    cpu::moe_route(
        &mut r.probs,
        &mut r.sel,
        &mut r.gate,
        &mut r.lse,
        logits,
        spec,
    )
    .unwrap();
    cpu::moe_dispatch(&mut r.dest, &mut r.src, &mut r.counts, &r.sel, spec).unwrap();
    r
}

struct GpuRouted {
    probs: GpuTensor,
    sel: GpuTensor,
    gate: GpuTensor,
    lse: GpuTensor,
    counts: GpuTensor,
    dest: GpuTensor,
    src: GpuTensor,
}

fn gpu_route(gpu: &Gpu, logits: &GpuTensor, spec: &MoeSpec) -> GpuRouted {
    let (n, e, a) = (spec.tokens, spec.experts, spec.assignments());
    let z = |name, len, dt| gpu.zeros(name, &[len], dt).unwrap();
    let r = GpuRouted {
        probs: z("probs", n * e, DType::F32),
        sel: z("sel", a, DType::U32),
        gate: z("gate", a, DType::F32),
        lse: z("lse", n, DType::F32),
        counts: z("counts", e, DType::U32),
        dest: z("dest", a, DType::U32),
        src: z("src", spec.grouped_rows(), DType::U32),
    };
    MoeRouting::new(
        gpu, &r.probs, &r.sel, &r.gate, &r.lse, &r.counts, &r.dest, &r.src, logits, spec,
    )
    .unwrap()
    .run(gpu)
    .unwrap();
    r
}

/// Kept rows of `src` (the rest are unused and not compared).
fn kept_src(src: &[u32], counts: &[u32], spec: &MoeSpec) -> Vec<u32> {
    (0..spec.experts)
        .flat_map(|e| {
            let k = (counts[e] as usize).min(spec.capacity);
            src[e * spec.capacity..e * spec.capacity + k].to_vec()
        })
        .collect()
}

/// Tolerances, GPU against CPU on the same (storage-rounded) inputs. Routing: the discrete
/// results (choices, counts, ranks) exactly; probabilities, lse and gates 1e-6 abs + 1e-5 rel
/// (driver exp/log against Rust's on E ≤ 8 terms; measured worst well under it). Gather and
/// the gather's backward over ≤ K terms and the combination (≤ K products): 1e-6 + 1e-5 in f32;
/// in f16 the results are rounded to f16 on the GPU, so half an f16 ulp (1e-3 rel) more. The
/// gate gradient sums C products in the same order; fused multiply-adds on the GPU: 1e-5 + 1e-5.
/// The router's backward: 1e-6 + 1e-4 (a difference dp − Σp·dp of like terms loses a few
/// digits), plus f16's 1e-3 rel in f16.
fn tol(p: Precision, base: Tolerance) -> Tolerance {
    match p {
        Precision::F32 => base,
        Precision::F16 => Tolerance {
            abs: base.abs.max(1e-6),
            rel: base.rel + 1e-3,
        },
    }
}

const ROUTE_TOL: Tolerance = Tolerance {
    abs: 1e-6,
    rel: 1e-5,
};

#[test]
fn gpu_routing_and_every_kernel_match_the_cpu_reference() {
    for precision in [Precision::F32, Precision::F16] {
        let Some(gpu) = gpu(precision) else {
            continue;
        };
        let dt = DType::from(precision);
        for (i, &(n, e, k, cap, c)) in SHAPES.iter().enumerate() {
            let spec = MoeSpec {
                tokens: n,
                experts: e,
                top_k: k,
                capacity: cap,
                channels: c,
            };
            let what = format!("{precision:?} {spec:?}");
            let seed = 10 * i as u64;
            let logits = round_to(
                precision,
                &random(n * e, seed)
                    .iter()
                    .map(|x| 3.0 * x)
                    .collect::<Vec<_>>(),
            );
            let x = round_to(precision, &random(n * c, seed + 1));
            let yg = round_to(precision, &random(spec.grouped_rows() * c, seed + 2));
            let dy = round_to(precision, &random(n * c, seed + 3));
            let dxg = round_to(precision, &random(spec.grouped_rows() * c, seed + 4));
            let up = |name, data: &[f32]| gpu.upload(name, &[data.len()], dt, data).unwrap();
            let read = |t: &GpuTensor| gpu.read(t).unwrap();
            let read_u = |t: &GpuTensor| gpu.read_u32(t).unwrap();

            let want = cpu_route(&logits, &spec);
            let got = gpu_route(gpu, &up("logits", &logits), &spec);
            assert_eq!(want.sel, read_u(&got.sel), "{what}: sel");
            assert_eq!(want.counts, read_u(&got.counts), "{what}: counts");
            assert_eq!(want.dest, read_u(&got.dest), "{what}: dest");
            assert_eq!(
                kept_src(&want.src, &want.counts, &spec),
                kept_src(&read_u(&got.src), &want.counts, &spec),
                "{what}: src"
            );
            assert_close(
                &format!("{what} probs"),
                &want.probs,
                &read(&got.probs),
                ROUTE_TOL,
            );
            assert_close(
                &format!("{what} lse"),
                &want.lse,
                &read(&got.lse),
                ROUTE_TOL,
            );
            assert_close(
                &format!("{what} gate"),
                &want.gate,
                &read(&got.gate),
                ROUTE_TOL,
            );

            // The later kernels on the GPU's own routing, against the CPU's on the GPU's
            // probabilities and gates (the discrete parts are equal, checked above).
            let (gprobs, ggate, glse) = (read(&got.probs), read(&got.gate), read(&got.lse));
            let g = spec.grouped_rows();

            let mut xg = vec![0.0; g * c];
            cpu::moe_gather(&mut xg, &x, &want.src, &want.counts, &spec).unwrap();
            let xg_gpu = gpu.zeros("xg", &[g * c], dt).unwrap();
            let xt = up("x", &x);
            MoeGather::new(gpu, &xg_gpu, &xt, &got.src, &got.counts, &spec)
                .unwrap()
                .run(gpu)
                .unwrap();
            assert_eq!(xg, read(&xg_gpu), "{what}: gather (a copy, exact)");

            let mut y = vec![0.0; n * c];
            cpu::moe_combine(&mut y, &yg, &want.dest, &ggate, &spec).unwrap();
            let y_gpu = gpu.zeros("y", &[n * c], dt).unwrap();
            let ygt = up("yg", &yg);
            MoeCombine::new(gpu, &y_gpu, &ygt, &got.dest, &got.gate, &spec)
                .unwrap()
                .run(gpu)
                .unwrap();
            assert_close(
                &format!("{what} combine"),
                &y,
                &read(&y_gpu),
                tol(precision, ROUTE_TOL),
            );

            let (mut dyg, mut dgate) = (vec![0.0; g * c], vec![0.0; spec.assignments()]);
            cpu::moe_combine_backward(
                &mut dyg,
                &mut dgate,
                &dy,
                &yg,
                &ggate,
                &want.dest,
                &want.src,
                &want.counts,
                &spec,
            )
            .unwrap();
            let dyg_gpu = gpu.zeros("dyg", &[g * c], dt).unwrap();
            let dgate_gpu = gpu
                .zeros("dgate", &[spec.assignments()], DType::F32)
                .unwrap();
            let dyt = up("dy", &dy);
            MoeCombineBackward::new(
                gpu,
                &dyg_gpu,
                &dgate_gpu,
                &dyt,
                &ygt,
                &got.gate,
                &got.dest,
                &got.src,
                &got.counts,
                &spec,
            )
            .unwrap()
            .run(gpu)
            .unwrap();
            assert_close(
                &format!("{what} dyg"),
                &dyg,
                &read(&dyg_gpu),
                tol(precision, ROUTE_TOL),
            );
            let gate_tol = Tolerance {
                abs: 1e-5,
                rel: 1e-5,
            };
            assert_close(
                &format!("{what} dgate"),
                &dgate,
                &read(&dgate_gpu),
                gate_tol,
            );

            let mut dx = vec![0.0; n * c];
            cpu::moe_gather_backward(&mut dx, &dxg, &want.dest, &spec).unwrap();
            let dx_gpu = gpu.zeros("dx", &[n * c], dt).unwrap();
            MoeGatherBackward::new(gpu, &dx_gpu, &up("dxg", &dxg), &got.dest, &spec)
                .unwrap()
                .run(gpu)
                .unwrap();
            assert_close(
                &format!("{what} dx"),
                &dx,
                &read(&dx_gpu),
                tol(precision, ROUTE_TOL),
            );

            let coefs = MoeLossCoefs { aux: 0.3, z: 0.2 };
            let scale = 4.0;
            let gdgate = read(&dgate_gpu);
            let mut dlogits = vec![0.0; n * e];
            cpu::moe_route_backward(
                &mut dlogits,
                &gdgate,
                &gprobs,
                &want.sel,
                &ggate,
                &glse,
                &want.counts,
                &spec,
                coefs,
                scale,
            )
            .unwrap();
            let dl_gpu = gpu.zeros("dlogits", &[n * e], dt).unwrap();
            let scale_t = gpu.upload("scale", &[1], DType::F32, &[scale]).unwrap();
            MoeRouteBackward::new(
                gpu,
                &dl_gpu,
                &dgate_gpu,
                &got.probs,
                &got.sel,
                &got.gate,
                &got.lse,
                &got.counts,
                &scale_t,
                &spec,
                coefs,
            )
            .unwrap()
            .run(gpu)
            .unwrap();
            let rb_tol = Tolerance {
                abs: 1e-6,
                rel: 1e-4,
            };
            assert_close(
                &format!("{what} dlogits"),
                &dlogits,
                &read(&dl_gpu),
                tol(precision, rb_tol),
            );

            let want_stats = cpu::moe_losses(&gprobs, &glse, &want.counts, &spec).unwrap();
            let stats = gpu.zeros("stats", &[stats_len(e)], DType::F32).unwrap();
            MoeLosses::new(gpu, &stats, &got.probs, &got.lse, &got.counts, &spec)
                .unwrap()
                .run(gpu)
                .unwrap();
            let got_stats = parse_stats(&read(&stats), e).unwrap();
            assert_eq!(
                want_stats.fractions, got_stats.fractions,
                "{what}: fractions"
            );
            assert_eq!(want_stats.dropped, got_stats.dropped, "{what}: dropped");
            assert_close(
                &format!("{what} aux, z, P"),
                &[
                    &[want_stats.aux_loss, want_stats.z_loss][..],
                    &want_stats.mean_probs,
                ]
                .concat(),
                &[
                    &[got_stats.aux_loss, got_stats.z_loss][..],
                    &got_stats.mean_probs,
                ]
                .concat(),
                ROUTE_TOL,
            );
        }
    }
}

/// Equal probabilities go to the lowest expert index, on both sides: a row of equal logits picks
/// experts 0, 1, ...; a row whose two best are tied picks the lower of the two first.
#[test]
fn ties_go_to_the_lowest_expert_index() {
    let spec = MoeSpec {
        tokens: 3,
        experts: 5,
        top_k: 3,
        capacity: 3,
        channels: 1,
    };
    let logits = [
        0.5, 0.5, 0.5, 0.5, 0.5, //
        0.0, 2.0, 1.0, 2.0, 1.0, //
        -1.0, -1.0, 3.0, -1.0, -1.0,
    ];
    let want_sel = vec![0, 1, 2, 1, 3, 2, 2, 0, 1];
    let r = cpu_route(&logits, &spec);
    assert_eq!(r.sel, want_sel, "CPU");
    for precision in [Precision::F32, Precision::F16] {
        let Some(gpu) = gpu(precision) else {
            continue;
        };
        let t = gpu
            .upload("logits", &[15], DType::from(precision), &logits)
            .unwrap();
        let got = gpu_route(gpu, &t, &spec);
        assert_eq!(gpu.read_u32(&got.sel).unwrap(), want_sel, "{precision:?}");
    }
}

/// Capacity overflow: every token prefers expert 0, which has room for `capacity` of them. The
/// first `capacity` tokens in position order keep it, the later ones are dropped from it (their
/// output is their second expert's share alone), and the statistics count the drops.
#[test]
fn capacity_overflow_drops_later_tokens_in_position_order() {
    let (n, e, cap, c) = (10, 4, 3, 2);
    let spec = MoeSpec {
        tokens: n,
        experts: e,
        top_k: 2,
        capacity: cap,
        channels: c,
    };
    // Expert 0 first for everyone; the second choice cycles over 1, 2, 3 (each ≤ 4 tokens: 3
    // and 4 of them, so experts 1, 2 overflow too when they get 4).
    let logits: Vec<f32> = (0..n)
        .flat_map(|t| {
            let second = 1 + t % 3;
            (0..e).map(move |i| match i {
                0 => 4.0,
                i if i == second => 2.0,
                _ => 0.0,
            })
        })
        .collect();
    let r = cpu_route(&logits, &spec);
    for t in 0..n {
        let d = r.dest[t * 2];
        if t < cap {
            assert_eq!(d, t as u32, "token {t} keeps expert 0 at rank {t}");
        } else {
            assert_eq!(d, MOE_NONE, "token {t} is dropped from expert 0");
        }
    }
    // Second slots: expert 1 gets tokens 0, 3, 6, 9 (4 > 3: token 9 dropped), expert 2 gets
    // 1, 4, 7 (kept), expert 3 gets 2, 5, 8 (kept).
    assert_eq!(
        r.dest[9 * 2 + 1],
        MOE_NONE,
        "token 9 is the 4th for expert 1"
    );
    assert_eq!(r.counts, vec![10, 4, 3, 3]);
    let stats = cpu::moe_losses(&r.probs, &r.lse, &r.counts, &spec).unwrap();
    assert_eq!(stats.dropped, 7 + 1);
    // A dropped slot adds nothing: token 5's output is its gate for expert 3 times that row.
    let yg: Vec<f32> = (0..spec.grouped_rows() * c).map(|i| i as f32).collect();
    let mut y = vec![0.0; n * c];
    cpu::moe_combine(&mut y, &yg, &r.dest, &r.gate, &spec).unwrap();
    let row = r.dest[5 * 2 + 1] as usize;
    assert_eq!(y[5 * c], r.gate[5 * 2 + 1] * yg[row * c]);
    assert!(
        y[9 * c..10 * c].iter().all(|&v| v == 0.0),
        "token 9 lost both slots"
    );

    for precision in [Precision::F32, Precision::F16] {
        let Some(gpu) = gpu(precision) else {
            continue;
        };
        let t = gpu
            .upload("logits", &[n * e], DType::from(precision), &logits)
            .unwrap();
        let got = gpu_route(gpu, &t, &spec);
        assert_eq!(
            gpu.read_u32(&got.dest).unwrap(),
            r.dest,
            "{precision:?} dest"
        );
        assert_eq!(
            gpu.read_u32(&got.counts).unwrap(),
            r.counts,
            "{precision:?}"
        );
        let s = gpu.zeros("stats", &[stats_len(e)], DType::F32).unwrap();
        MoeLosses::new(gpu, &s, &got.probs, &got.lse, &got.counts, &spec)
            .unwrap()
            .run(gpu)
            .unwrap();
        let got_stats = parse_stats(&gpu.read(&s).unwrap(), e).unwrap();
        assert_eq!(
            got_stats.dropped, 8,
            "{precision:?} dropped in the statistics"
        );
    }
}

/// The routed MLP's loss for the finite-difference checks: `Σ dy·y + coefs.aux·aux +
/// coefs.z·z` (f32 forward, f64 sum).
fn layer_loss(x: &[f32], w: &MoeWeights<'_>, spec: &MoeLayerSpec, dy: &[f32]) -> f64 {
    let mut y = vec![0.0; x.len()];
    let cache = moe_layer_forward(&mut y, x, w, spec).unwrap();
    weighted_sum(dy, &y) + moe_aux_total(&cache, spec)
}

struct Layer {
    spec: MoeLayerSpec,
    x: Vec<f32>,
    router: Vec<f32>,
    fc: Vec<f32>,
    proj: Vec<f32>,
    dy: Vec<f32>,
}

fn layer(kind: MlpKind, capacity: usize, coefs: MoeLossCoefs, dy_scale: f32) -> Layer {
    let (n, e, c, h) = (9, 4, 5, 6);
    let spec = MoeLayerSpec {
        routing: MoeSpec {
            tokens: n,
            experts: e,
            top_k: 2,
            capacity,
            channels: c,
        },
        hidden: h,
        kind,
        coefs,
    };
    let fcw = spec.fc_width();
    Layer {
        spec,
        x: random(n * c, 1),
        // A router 3× larger than the rest keeps the top-k choices of a step-sized
        // perturbation unchanged (no selection flips inside ±h).
        router: random(e * c, 2).iter().map(|v| 3.0 * v).collect(),
        fc: random(e * fcw * c, 3),
        proj: random(e * c * h, 4),
        dy: random(n * c, 5).iter().map(|v| dy_scale * v).collect(),
    }
}

/// Central differences of the routed MLP's loss with respect to each input, against the
/// backward. h = 1e-2; the forward is smooth between selection changes, which no input moves
/// by ±h here (checked: every element passes). Error bounds: truncation h²/6·L''' ≈ 2e-5·L''',
/// with L''' of order 1 for these O(1) weights through GELU/SiLU; f32 rounding of the forward
/// ≈ ε·Σ|dy·y| / 2h ≈ 6e-8·50/2e-2 ≈ 1.5e-4. So 5e-4 absolute plus 1e-3 relative.
const MOE_CHECK: GradCheck = GradCheck {
    h: 1e-2,
    abs: 5e-4,
    rel: 1e-3,
};

/// Checks every input's gradient; returns the worst ratio or the first failure. `tamper` edits
/// the analytic gradients first (to show that the checker fails).
fn check_layer(l: &Layer, tamper: impl Fn(&mut [Vec<f32>; 4])) -> Result<f64, String> {
    let w = MoeWeights {
        router: &l.router,
        fc: &l.fc,
        proj: &l.proj,
    };
    let mut y = vec![0.0; l.x.len()];
    let cache = moe_layer_forward(&mut y, &l.x, &w, &l.spec).unwrap();
    let mut dx = vec![0.0; l.x.len()];
    let g = moe_layer_backward(&mut dx, &l.dy, &cache, &w, &l.spec, 1.0).unwrap();
    let mut grads = [dx, g.router, g.fc, g.proj];
    tamper(&mut grads);
    let mut worst: f64 = 0.0;
    let what = format!("{:?}", l.spec);
    worst = worst.max(check_gradient(
        &format!("{what} dx"),
        &l.x,
        &grads[0],
        |x| layer_loss(x, &w, &l.spec, &l.dy),
        MOE_CHECK,
    )?);
    worst = worst.max(check_gradient(
        &format!("{what} router"),
        &l.router,
        &grads[1],
        |r| {
            let w = MoeWeights { router: r, ..w };
            layer_loss(&l.x, &w, &l.spec, &l.dy)
        },
        MOE_CHECK,
    )?);
    worst = worst.max(check_gradient(
        &format!("{what} fc"),
        &l.fc,
        &grads[2],
        |f| {
            let w = MoeWeights { fc: f, ..w };
            layer_loss(&l.x, &w, &l.spec, &l.dy)
        },
        MOE_CHECK,
    )?);
    worst = worst.max(check_gradient(
        &format!("{what} proj"),
        &l.proj,
        &grads[3],
        |p| {
            let w = MoeWeights { proj: p, ..w };
            layer_loss(&l.x, &w, &l.spec, &l.dy)
        },
        MOE_CHECK,
    )?);
    Ok(worst)
}

/// Each part on its own and all together: the experts and router through the gates (no
/// auxiliary losses), the load-balancing loss alone (dy = 0: only the router moves it), the
/// z-loss alone, and everything at once; GELU and SwiGLU experts; dropless and with capacity
/// drops (capacity 3 of 9 tokens × 2 slots over 4 experts drops some).
#[test]
fn cpu_routed_mlp_gradients_match_finite_differences() {
    let none = MoeLossCoefs::default();
    let aux = MoeLossCoefs { aux: 1.0, z: 0.0 };
    let z = MoeLossCoefs { aux: 0.0, z: 1.0 };
    let both = MoeLossCoefs { aux: 0.7, z: 0.3 };
    for kind in [MlpKind::Gelu, MlpKind::SwiGlu] {
        for capacity in [9, 3] {
            for (coefs, dy_scale) in [(none, 1.0), (aux, 0.0), (z, 0.0), (both, 1.0)] {
                let l = layer(kind, capacity, coefs, dy_scale);
                let worst = check_layer(&l, |_| {}).unwrap_or_else(|e| panic!("{e}"));
                eprintln!("{kind:?} capacity {capacity} {coefs:?}: worst {worst:.3} of allowed");
            }
        }
    }
    // The capacity case really drops.
    let l = layer(MlpKind::Gelu, 3, none, 1.0);
    let w = MoeWeights {
        router: &l.router,
        fc: &l.fc,
        proj: &l.proj,
    };
    let mut y = vec![0.0; l.x.len()];
    let cache = moe_layer_forward(&mut y, &l.x, &w, &l.spec).unwrap();
    assert!(cache.stats.dropped > 0, "capacity 3 must drop");
}

/// The checker rejects wrong gradients: an expert gradient 10% too large, one router element off
/// by 1e-2, the z-loss gradient without its factor 2 (z coefficient halved in the backward),
/// and the load-balancing gradient with f_e counted per token rather than per assignment (×K).
#[test]
fn the_checker_fails_on_wrong_moe_gradients() {
    let both = MoeLossCoefs { aux: 0.7, z: 0.3 };
    let l = layer(MlpKind::SwiGlu, 9, both, 1.0);
    assert!(
        check_layer(&l, |g| g[2].iter_mut().for_each(|v| *v *= 1.1)).is_err(),
        "a scaled expert gradient must fail"
    );
    assert!(
        check_layer(&l, |g| g[1][3] += 1e-2).is_err(),
        "a router element off by 1e-2 must fail"
    );
    let w = MoeWeights {
        router: &l.router,
        fc: &l.fc,
        proj: &l.proj,
    };
    let wrong = |coefs: MoeLossCoefs| {
        let mut y = vec![0.0; l.x.len()];
        let cache = moe_layer_forward(&mut y, &l.x, &w, &l.spec).unwrap();
        let spec = MoeLayerSpec { coefs, ..l.spec };
        let mut dx = vec![0.0; l.x.len()];
        let g = moe_layer_backward(&mut dx, &l.dy, &cache, &w, &spec, 1.0).unwrap();
        check_gradient(
            "router",
            &l.router,
            &g.router,
            |r| layer_loss(&l.x, &MoeWeights { router: r, ..w }, &l.spec, &l.dy),
            MOE_CHECK,
        )
    };
    assert!(
        wrong(MoeLossCoefs {
            z: both.z / 2.0,
            ..both
        })
        .is_err(),
        "a z-loss gradient without its factor 2 must fail"
    );
    assert!(
        wrong(MoeLossCoefs {
            aux: both.aux * 2.0,
            ..both
        })
        .is_err(),
        "a load-balancing gradient with per-token fractions must fail"
    );
}

/// Bad shapes and buffers are errors naming the problem, not panics.
#[test]
fn bad_shapes_are_refused() {
    let spec = MoeSpec {
        tokens: 4,
        experts: 3,
        top_k: 2,
        capacity: 4,
        channels: 2,
    };
    let mut r = cpu_route(&[0.0; 12], &spec);
    for bad in [
        MoeSpec { top_k: 4, ..spec },
        MoeSpec {
            capacity: 5,
            ..spec
        },
        MoeSpec { experts: 0, ..spec },
    ] {
        let err = cpu::moe_dispatch(&mut r.dest, &mut r.src, &mut r.counts, &r.sel, &bad);
        assert!(err.is_err(), "{bad:?} must be refused");
    }
    let mut short = vec![0.0; 11];
    let e = cpu::moe_route(
        &mut short,
        &mut r.sel,
        &mut r.gate,
        &mut r.lse,
        &[0.0; 12],
        &spec,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("probs has 11 elements, expected 12"), "{e}");
    let Some(gpu) = gpu(Precision::F32) else {
        return;
    };
    let logits = gpu.zeros("logits", &[12], DType::F32).unwrap();
    let z = |len, dt| gpu.zeros("t", &[len], dt).unwrap();
    let (p, s, g, l) = (
        z(12, DType::F32),
        z(8, DType::F32), // sel as f32: wrong dtype
        z(8, DType::F32),
        z(4, DType::F32),
    );
    let (c, d, src) = (z(3, DType::U32), z(8, DType::U32), z(12, DType::U32));
    let e = MoeRouting::new(gpu, &p, &s, &g, &l, &c, &d, &src, &logits, &spec)
        .err()
        .expect("a float sel must be refused")
        .to_string();
    assert!(e.contains("expected U32"), "{e}");
}
