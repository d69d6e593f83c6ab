//! Quantised linear-layer products against the float matmul on the same shapes: the decoder's
//! one-row products and the prefill's 768-row products of the baby GPT (4×128) and the 6-layer
//! 384-wide GPT. Throughput is counted in FLOPs (2·M·N·K), so criterion's "elem/s" column reads
//! as FLOP/s. Each quantised case is named `<type>_<layout>` (q8 or q4, groups of 32), each
//! float one `f32_<variant>` / `f16_<variant>`; the CPU reference runs the one-row shapes.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kiln::gpu::DType;
use kiln::kernels::matmul::Matmul;
use kiln::kernels::quant::{QMatmul, QMatmulKernel, QuantWeight};
use kiln::ops::{Layout, MatmulSpec};
use kiln::quant::QuantKind;
use kiln::{Gpu, GpuOptions, PrecisionChoice};
use std::time::Duration;

/// (name, rows of x, outputs, inputs): a linear layer's forward product.
const SHAPES: [(&str, usize, usize, usize); 6] = [
    ("baby_fc_decode", 1, 512, 128),
    ("baby_proj_decode", 1, 128, 512),
    ("gpt6x384_fc_decode", 1, 1536, 384),
    ("gpt6x384_proj_decode", 1, 384, 1536),
    ("baby_qkv_prefill", 768, 384, 128),
    ("baby_proj_prefill", 768, 128, 512),
];

fn fill(len: usize, seed: u32) -> Vec<f32> {
    // A cheap deterministic fill of ordinary weights in [-0.1, 0.1).
    (0..len)
        .map(|i| {
            ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2000) as f32 / 10000.0 - 0.1
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

fn bench(c: &mut Criterion) {
    let gpus = devices();
    let mut group = c.benchmark_group("quant");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    for (name, m, n, k) in SHAPES {
        group.throughput(Throughput::Elements((2 * m * n * k) as u64));
        let (x, w) = (fill(m * k, 1), fill(n * k, 2));
        let quantized = [QuantKind::Q8, QuantKind::Q4]
            .map(|kind| kiln::cpu::quant::quantize(&w, n, k, kind, 32).unwrap());
        for gpu in &gpus {
            let p = gpu.precision();
            let dt = DType::from(p);
            let gx = gpu.upload("x", &[m * k], dt, &x).unwrap();
            let gy = gpu.zeros("y", &[m * n], dt).unwrap();
            let gw = gpu.upload("w", &[n * k], dt, &w).unwrap();
            let spec = MatmulSpec::new(Layout::NT, m, n, k);
            let mm = Matmul::new(gpu, &gy, &gx, &gw, None, &spec).unwrap();
            let id = BenchmarkId::new(format!("{p}_{}", mm.variant().name()), name);
            group.bench_function(id, |b| {
                b.iter(|| {
                    mm.run(gpu).unwrap();
                    gpu.wait().unwrap();
                })
            });
            for q in &quantized {
                let qw = QuantWeight::upload(gpu, "w", q).unwrap();
                for kernel in QMatmulKernel::ALL {
                    // The workgroup-per-output layout is for one row; tiles and textures for
                    // many.
                    let fits = match kernel {
                        QMatmulKernel::Workgroup => m == 1,
                        QMatmulKernel::Tiled | QMatmulKernel::Texture => m > 1,
                        QMatmulKernel::Rows => true,
                    };
                    if !fits || !kernel.supports(gpu, m, &qw) {
                        continue;
                    }
                    let op = QMatmul::with_kernel(gpu, kernel, &gy, &gx, &qw, None, m).unwrap();
                    let id = BenchmarkId::new(format!("{p}_{}_{kernel:?}", q.kind()), name);
                    group.bench_function(id, |b| {
                        b.iter(|| {
                            op.run(gpu).unwrap();
                            gpu.wait().unwrap();
                        })
                    });
                }
            }
        }
        if m == 1 {
            let mut y = vec![0.0f32; m * n];
            group.bench_function(BenchmarkId::new("cpu_ref_q8", name), |b| {
                b.iter(|| kiln::cpu::quant::qmatmul(&mut y, &x, &quantized[0], None, m).unwrap())
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
