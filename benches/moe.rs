//! The moe family at the baby MoE's size (configs/shakespeare-char-moe.toml: B·T = 768 tokens,
//! C = 128, 4 experts of 256 hidden units, top-2, capacity 1.25 → 480 rows per expert) and at
//! 4× the tokens with 8 experts: the routing (softmax, top-k, counting sort), gather, combine
//! and the backward kernels on the GPU (f32 and f16) against the CPU reference, and the
//! experts' input projection as kiln runs it (one product batched over E groups padded to the
//! capacity) beside one unpadded product over the N·K routed rows: what the padding costs.

use criterion::{
    BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main, measurement::WallTime,
};
use kiln::gpu::DType;
use kiln::kernels::matmul::Matmul;
use kiln::kernels::moe::{
    MoeCombine, MoeCombineBackward, MoeGather, MoeGatherBackward, MoeRouteBackward, MoeRouting,
};
use kiln::ops::{Layout, MatmulSpec, MoeLossCoefs, MoeSpec};
use kiln::{Gpu, GpuOptions, GpuTensor, PrecisionChoice};
use std::time::Duration;

/// (name, tokens, experts, top_k, capacity, channels, hidden).
const SIZES: [(&str, usize, usize, usize, usize, usize, usize); 2] = [
    ("baby", 768, 4, 2, 480, 128, 256),
    ("4x-tokens-8-experts", 3072, 8, 2, 960, 128, 256),
];

fn fill(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2000) as f32 / 1000.0 - 1.0
        })
        .collect()
}

fn devices() -> Vec<Gpu> {
    [PrecisionChoice::F32, PrecisionChoice::F16]
        .into_iter()
        .filter_map(|precision| {
            Gpu::with_options(&GpuOptions {
                adapter: None,
                precision,
            })
            .map_err(|e| eprintln!("skipping {precision:?}: {e}"))
            .ok()
        })
        .collect()
}

fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
}

fn gpu_case(
    group: &mut BenchmarkGroup<'_, WallTime>,
    id: String,
    gpu: &Gpu,
    record: impl Fn(&mut wgpu::ComputePass<'_>),
) {
    group.bench_function(id, |bench| {
        bench.iter(|| {
            gpu.run_pass("bench", &record).unwrap();
            gpu.wait().unwrap();
        })
    });
}

struct Buffers {
    logits: GpuTensor,
    probs: GpuTensor,
    sel: GpuTensor,
    gate: GpuTensor,
    lse: GpuTensor,
    counts: GpuTensor,
    dest: GpuTensor,
    src: GpuTensor,
}

fn buffers(gpu: &Gpu, spec: &MoeSpec) -> Buffers {
    let (n, e, a) = (spec.tokens, spec.experts, spec.assignments());
    let z = |len, dt| gpu.zeros("bench", &[len], dt).unwrap();
    let dt = DType::from(gpu.precision());
    Buffers {
        logits: gpu.upload("logits", &[n * e], dt, &fill(n * e, 1)).unwrap(),
        probs: z(n * e, DType::F32),
        sel: z(a, DType::U32),
        gate: z(a, DType::F32),
        lse: z(n, DType::F32),
        counts: z(e, DType::U32),
        dest: z(a, DType::U32),
        src: z(spec.grouped_rows(), DType::U32),
    }
}

fn routing(c: &mut Criterion) {
    let gpus = devices();
    let mut group = c.benchmark_group("moe");
    configure(&mut group);
    for (name, n, e, k, cap, ch, _) in SIZES {
        let spec = MoeSpec {
            tokens: n,
            experts: e,
            top_k: k,
            capacity: cap,
            channels: ch,
        };
        group.throughput(Throughput::Elements((n * e) as u64));
        for gpu in &gpus {
            let p = gpu.precision();
            let dt = DType::from(p);
            let b = buffers(gpu, &spec);
            let route = MoeRouting::new(
                gpu, &b.probs, &b.sel, &b.gate, &b.lse, &b.counts, &b.dest, &b.src, &b.logits,
                &spec,
            )
            .unwrap();
            route.run(gpu).unwrap();
            gpu_case(&mut group, format!("routing/{name}/gpu-{p}"), gpu, |pass| {
                route.record(pass)
            });
            let g = spec.grouped_rows();
            let t = |len, seed| gpu.upload("t", &[len], dt, &fill(len, seed)).unwrap();
            let (x, xg, yg, y) = (t(n * ch, 2), t(g * ch, 3), t(g * ch, 4), t(n * ch, 5));
            let gather = MoeGather::new(gpu, &xg, &x, &b.src, &b.counts, &spec).unwrap();
            let combine = MoeCombine::new(gpu, &y, &yg, &b.dest, &b.gate, &spec).unwrap();
            gpu_case(
                &mut group,
                format!("gather+combine/{name}/gpu-{p}"),
                gpu,
                |pass| {
                    gather.record(pass);
                    combine.record(pass);
                },
            );
            let (dyg, dxg, dx, dl) = (t(g * ch, 6), t(g * ch, 7), t(n * ch, 8), t(n * e, 9));
            let dgate = gpu
                .zeros("dgate", &[spec.assignments()], DType::F32)
                .unwrap();
            let scale = gpu.upload("scale", &[1], DType::F32, &[1.0]).unwrap();
            let cb = MoeCombineBackward::new(
                gpu, &dyg, &dgate, &y, &yg, &b.gate, &b.dest, &b.src, &b.counts, &spec,
            )
            .unwrap();
            let gb = MoeGatherBackward::new(gpu, &dx, &dxg, &b.dest, &spec).unwrap();
            let rb = MoeRouteBackward::new(
                gpu,
                &dl,
                &dgate,
                &b.probs,
                &b.sel,
                &b.gate,
                &b.lse,
                &b.counts,
                &scale,
                &spec,
                MoeLossCoefs { aux: 0.01, z: 1e-3 },
            )
            .unwrap();
            gpu_case(
                &mut group,
                format!("backward/{name}/gpu-{p}"),
                gpu,
                |pass| {
                    cb.record(pass);
                    gb.record(pass);
                    rb.record(pass);
                },
            );
        }
        let logits = fill(n * e, 1);
        group.bench_function(format!("routing/{name}/cpu"), |bench| {
            let (mut probs, mut sel, mut gate, mut lse) = (
                vec![0.0; n * e],
                vec![0; n * k],
                vec![0.0; n * k],
                vec![0.0; n],
            );
            let (mut dest, mut src, mut counts) = (vec![0; n * k], vec![0; e * cap], vec![0; e]);
            bench.iter(|| {
                kiln::cpu::moe::moe_route(
                    &mut probs, &mut sel, &mut gate, &mut lse, &logits, &spec,
                )
                .unwrap();
                kiln::cpu::moe::moe_dispatch(&mut dest, &mut src, &mut counts, &sel, &spec)
                    .unwrap();
            })
        });
    }
    group.finish();
}

/// The experts' input projection: E products of capacity × C by C × hidden in one batched
/// dispatch (kiln's way), beside one product of the N·K routed rows (the least any grouping
/// could compute, without the padding).
fn expert_products(c: &mut Criterion) {
    let gpus = devices();
    let mut group = c.benchmark_group("moe experts");
    configure(&mut group);
    for (name, n, e, k, cap, ch, h) in SIZES {
        for gpu in &gpus {
            let p = gpu.precision();
            let dt = DType::from(p);
            let t = |len, seed| gpu.upload("t", &[len], dt, &fill(len, seed)).unwrap();
            let padded = MatmulSpec::new(Layout::NT, cap, h, ch).batched(e);
            let (xg, w, hg) = (t(e * cap * ch, 1), t(e * h * ch, 2), t(e * cap * h, 3));
            let batched = Matmul::new(gpu, &hg, &xg, &w, None, &padded).unwrap();
            group.throughput(Throughput::Elements(padded.flops() as u64));
            gpu_case(
                &mut group,
                format!("batched-padded/{name}/gpu-{p}"),
                gpu,
                |pass| batched.record(pass),
            );
            let routed = MatmulSpec::new(Layout::NT, n * k, h, ch);
            let (xr, wr, hr) = (t(n * k * ch, 4), t(h * ch, 5), t(n * k * h, 6));
            let single = Matmul::new(gpu, &hr, &xr, &wr, None, &routed).unwrap();
            group.throughput(Throughput::Elements(routed.flops() as u64));
            gpu_case(
                &mut group,
                format!("routed-rows-only/{name}/gpu-{p}"),
                gpu,
                |pass| single.record(pass),
            );
        }
    }
    group.finish();
}

criterion_group!(benches, routing, expert_products);
criterion_main!(benches);
