//! GPU matmul against the CPU reference. Throughput is counted in FLOPs (2·M·N·K), so criterion's
//! "elem/s" column reads as FLOP/s (Gelem/s = GFLOP/s).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kiln::gpu::DType;
use kiln::kernels::matmul::Matmul;
use kiln::ops::{Layout, MatmulSpec};
use kiln::{Gpu, GpuOptions, Precision, PrecisionChoice};
use std::time::Duration;

/// (name, spec): the square sizes of the issue and a linear layer's forward product
/// (768 tokens × 384 in → 1536 out, as in the 6-layer 384-wide GPT's MLP).
fn shapes() -> Vec<(String, MatmulSpec)> {
    let mut v: Vec<(String, MatmulSpec)> = [256, 512, 1024]
        .into_iter()
        .map(|n| (format!("{n}x{n}x{n}"), MatmulSpec::new(Layout::NN, n, n, n)))
        .collect();
    v.push((
        "768x1536x384_nt".into(),
        MatmulSpec::new(Layout::NT, 768, 1536, 384),
    ));
    v
}

fn random(len: usize, seed: u32) -> Vec<f32> {
    // A cheap deterministic fill; the values only need to be ordinary floats.
    (0..len)
        .map(|i| {
            ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2000) as f32 / 1000.0 - 1.0
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("matmul");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for (name, spec) in shapes() {
        group.throughput(Throughput::Elements(spec.flops() as u64));
        let a = random(spec.a_len(), 1);
        let b = random(spec.b_len(), 2);
        for choice in [PrecisionChoice::F32, PrecisionChoice::F16] {
            let gpu = match Gpu::with_options(&GpuOptions {
                adapter: None,
                precision: choice,
            }) {
                Ok(g) => g,
                Err(e) => {
                    eprintln!("skipping GPU {choice:?}: {e}");
                    continue;
                }
            };
            let p: Precision = gpu.precision();
            let dt = DType::from(p);
            let ga = gpu.upload("a", &[a.len()], dt, &a).unwrap();
            let gb = gpu.upload("b", &[b.len()], dt, &b).unwrap();
            let gc = gpu.zeros("c", &[spec.c_len()], dt).unwrap();
            let mm = Matmul::new(&gpu, &gc, &ga, &gb, None, &spec).unwrap();
            let id = BenchmarkId::new(format!("gpu_{p}_{}", mm.variant().name()), &name);
            group.bench_function(id, |bench| {
                bench.iter(|| {
                    mm.run(&gpu).unwrap();
                    gpu.wait().unwrap();
                })
            });
        }
        let mut out = vec![0.0f32; spec.c_len()];
        group.bench_function(BenchmarkId::new("cpu_ref", &name), |bench| {
            bench.iter(|| kiln::cpu::matmul::matmul(&mut out, &a, &b, None, &spec).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
