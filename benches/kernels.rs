//! Every transformer kernel family on the GPU (f32 and f16 storage) against its CPU reference, at
//! the sizes of the two nanoGPT configs kiln ships: the "baby" GPT (B=12, T=64, C=128, 4 heads,
//! vocab 65) and the 6-layer 384-wide GPT (B=64, T=256, C=384, 6 heads). Throughput is bytes moved
//! (criterion's B/s, counted at 4 bytes per element in both precisions, i.e. f32-equivalent traffic)
//! for the memory-bound families and FLOPs (elem/s) for attention.

use criterion::{
    BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main, measurement::WallTime,
};
use kiln::gpu::DType;
use kiln::kernels::activation::{GeluBackward, GeluForward};
use kiln::kernels::attention::{AttentionBackward, AttentionForward};
use kiln::kernels::dropout::{Dropout, DropoutState};
use kiln::kernels::embedding::{EmbeddingBackward, EmbeddingForward};
use kiln::kernels::flash_attention::{FlashAttentionBackward, FlashAttentionForward};
use kiln::kernels::layernorm::{LayerNormBackward, LayerNormForward};
use kiln::kernels::residual::ResidualForward;
use kiln::kernels::rmsnorm::{RmsNormBackward, RmsNormForward};
use kiln::kernels::rope::Rope;
use kiln::kernels::swiglu::{SwiGluBackward, SwiGluForward};
use kiln::ops::{
    AttentionShape, EmbeddingShape, GroupedAttentionShape, LayerNormSpec, RmsNormSpec, RopeSpec,
    SwiGluSpec,
};
use kiln::{Gpu, GpuOptions, GpuTensor, PrecisionChoice};
use std::time::Duration;

#[derive(Clone, Copy)]
struct Size {
    name: &'static str,
    b: usize,
    t: usize,
    c: usize,
    heads: usize,
    vocab: usize,
}

const SIZES: [Size; 2] = [
    Size {
        name: "baby",
        b: 12,
        t: 64,
        c: 128,
        heads: 4,
        vocab: 65,
    },
    Size {
        name: "gpt6x384",
        b: 64,
        t: 256,
        c: 384,
        heads: 6,
        vocab: 65,
    },
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
            match Gpu::with_options(&GpuOptions {
                adapter: None,
                precision,
            }) {
                Ok(g) => Some(g),
                Err(e) => {
                    eprintln!("skipping {precision:?}: {e}");
                    None
                }
            }
        })
        .collect()
}

fn tensor(gpu: &Gpu, n: usize, seed: u32) -> GpuTensor {
    gpu.upload("bench", &[n], DType::from(gpu.precision()), &fill(n, seed))
        .unwrap()
}

fn f32_tensor(gpu: &Gpu, n: usize) -> GpuTensor {
    gpu.zeros("bench f32", &[n], DType::F32).unwrap()
}

/// Times `record` on the GPU, each run waited for.
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

fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
}

fn embedding(c: &mut Criterion) {
    let gpus = devices();
    let mut group = c.benchmark_group("embedding");
    configure(&mut group);
    for s in SIZES {
        let shape = EmbeddingShape {
            batch: s.b,
            seq: s.t,
            channels: s.c,
            vocab: s.vocab,
            positions: s.t,
        };
        let n = s.b * s.t * s.c;
        let tokens: Vec<u32> = (0..s.b * s.t).map(|i| (i * 7 % s.vocab) as u32).collect();
        let (order, starts) = kiln::cpu::embedding::token_index(&tokens, s.vocab).unwrap();
        // Forward reads a token row and a position row and writes the sum: three values each.
        group.throughput(Throughput::Bytes((3 * n * 4) as u64));
        for gpu in &gpus {
            let p = gpu.precision();
            let (wte, wpe, out) = (
                tensor(gpu, s.vocab * s.c, 1),
                tensor(gpu, s.t * s.c, 2),
                tensor(gpu, n, 3),
            );
            let tok = gpu.upload_u32("tokens", &[tokens.len()], &tokens).unwrap();
            let fwd = EmbeddingForward::new(gpu, &out, &tok, &wte, &wpe, &shape).unwrap();
            gpu_case(
                &mut group,
                format!("forward/gpu_{p}/{}", s.name),
                gpu,
                |pass| fwd.record(pass),
            );
            let (g_order, g_starts) = (
                gpu.upload_u32("order", &[order.len()], &order).unwrap(),
                gpu.upload_u32("starts", &[starts.len()], &starts).unwrap(),
            );
            let (dwte, dwpe) = (tensor(gpu, s.vocab * s.c, 8), tensor(gpu, s.t * s.c, 9));
            let bwd =
                EmbeddingBackward::new(gpu, &dwte, &dwpe, &out, &g_order, &g_starts, &shape, false)
                    .unwrap();
            gpu_case(
                &mut group,
                format!("backward/gpu_{p}/{}", s.name),
                gpu,
                |pass| bwd.record(pass),
            );
        }
        let (wte, wpe) = (fill(s.vocab * s.c, 1), fill(s.t * s.c, 2));
        let mut out = vec![0.0; n];
        group.bench_function(format!("forward/cpu_ref/{}", s.name), |b| {
            b.iter(|| {
                kiln::cpu::embedding::embedding_forward(&mut out, &tokens, &wte, &wpe, &shape)
                    .unwrap()
            })
        });
        let (mut dwte, mut dwpe) = (vec![0.0; wte.len()], vec![0.0; wpe.len()]);
        group.bench_function(format!("backward/cpu_ref/{}", s.name), |b| {
            b.iter(|| {
                kiln::cpu::embedding::embedding_backward(
                    &mut dwte, &mut dwpe, &out, &tokens, &shape, false,
                )
                .unwrap()
            })
        });
    }
    group.finish();
}

fn layernorm(c: &mut Criterion) {
    let gpus = devices();
    let mut group = c.benchmark_group("layernorm");
    configure(&mut group);
    for s in SIZES {
        let spec = LayerNormSpec::new(s.b * s.t, s.c);
        let n = s.b * s.t * s.c;
        // Forward reads the input and writes the output; backward reads dout and the input and
        // writes dinp (parameter reads and statistics are small beside them).
        group.throughput(Throughput::Bytes((2 * n * 4) as u64));
        for gpu in &gpus {
            let p = gpu.precision();
            let (inp, out, w, bias) = (
                tensor(gpu, n, 1),
                tensor(gpu, n, 2),
                tensor(gpu, s.c, 3),
                tensor(gpu, s.c, 4),
            );
            let (mean, rstd) = (f32_tensor(gpu, s.b * s.t), f32_tensor(gpu, s.b * s.t));
            let fwd =
                LayerNormForward::new(gpu, &out, &mean, &rstd, &inp, &w, &bias, &spec).unwrap();
            gpu_case(
                &mut group,
                format!("forward/gpu_{p}/{}", s.name),
                gpu,
                |pass| fwd.record(pass),
            );
            let (dinp, dw, db) = (tensor(gpu, n, 5), tensor(gpu, s.c, 6), tensor(gpu, s.c, 7));
            fwd.run(gpu).unwrap();
            let bwd =
                LayerNormBackward::new(gpu, &dinp, &dw, &db, &out, &inp, &w, &mean, &rstd, &spec)
                    .unwrap();
            gpu_case(
                &mut group,
                format!("backward/gpu_{p}/{}", s.name),
                gpu,
                |pass| bwd.record(pass),
            );
        }
        let (inp, w, bias) = (fill(n, 1), fill(s.c, 3), fill(s.c, 4));
        let (mut out, mut mean, mut rstd) =
            (vec![0.0; n], vec![0.0; s.b * s.t], vec![0.0; s.b * s.t]);
        group.bench_function(format!("forward/cpu_ref/{}", s.name), |b| {
            b.iter(|| {
                kiln::cpu::layernorm::layernorm_forward(
                    &mut out, &mut mean, &mut rstd, &inp, &w, &bias, &spec,
                )
                .unwrap()
            })
        });
        let (mut dinp, mut dw, mut db) = (vec![0.0; n], vec![0.0; s.c], vec![0.0; s.c]);
        group.bench_function(format!("backward/cpu_ref/{}", s.name), |b| {
            b.iter(|| {
                kiln::cpu::layernorm::layernorm_backward(
                    &mut dinp, &mut dw, &mut db, &out, &inp, &w, &mean, &rstd, &spec,
                )
                .unwrap()
            })
        });
    }
    group.finish();
}

fn rmsnorm(c: &mut Criterion) {
    let gpus = devices();
    let mut group = c.benchmark_group("rmsnorm");
    configure(&mut group);
    for s in SIZES {
        let spec = RmsNormSpec::new(s.b * s.t, s.c);
        let n = s.b * s.t * s.c;
        // As for layernorm: forward reads the input and writes the output; backward reads dout
        // and the input and writes dinp (weight reads and rstd are small beside them).
        group.throughput(Throughput::Bytes((2 * n * 4) as u64));
        for gpu in &gpus {
            let p = gpu.precision();
            let (inp, out, w) = (tensor(gpu, n, 1), tensor(gpu, n, 2), tensor(gpu, s.c, 3));
            let rstd = f32_tensor(gpu, s.b * s.t);
            let fwd = RmsNormForward::new(gpu, &out, &rstd, &inp, &w, &spec).unwrap();
            gpu_case(
                &mut group,
                format!("forward/gpu_{p}/{}", s.name),
                gpu,
                |pass| fwd.record(pass),
            );
            let (dinp, dw) = (tensor(gpu, n, 5), tensor(gpu, s.c, 6));
            fwd.run(gpu).unwrap();
            let bwd = RmsNormBackward::new(gpu, &dinp, &dw, &out, &inp, &w, &rstd, &spec).unwrap();
            gpu_case(
                &mut group,
                format!("backward/gpu_{p}/{}", s.name),
                gpu,
                |pass| bwd.record(pass),
            );
        }
        let (inp, w) = (fill(n, 1), fill(s.c, 3));
        let (mut out, mut rstd) = (vec![0.0; n], vec![0.0; s.b * s.t]);
        group.bench_function(format!("forward/cpu_ref/{}", s.name), |b| {
            b.iter(|| {
                kiln::cpu::rmsnorm::rmsnorm_forward(&mut out, &mut rstd, &inp, &w, &spec).unwrap()
            })
        });
        let (mut dinp, mut dw) = (vec![0.0; n], vec![0.0; s.c]);
        group.bench_function(format!("backward/cpu_ref/{}", s.name), |b| {
            b.iter(|| {
                kiln::cpu::rmsnorm::rmsnorm_backward(
                    &mut dinp, &mut dw, &out, &inp, &w, &rstd, &spec,
                )
                .unwrap()
            })
        });
    }
    group.finish();
}

fn rope(c: &mut Criterion) {
    let gpus = devices();
    let mut group = c.benchmark_group("rope");
    configure(&mut group);
    for s in SIZES {
        // In place on the q and k heads of the fused (B, T, 3C) qkv buffer (n_kv_head = n_head):
        // reads and writes 2C values per row.
        let hd = s.c / s.heads;
        let spec = RopeSpec::qkv(s.b, s.t, s.heads, s.heads, hd);
        let n = s.b * s.t * 3 * s.c;
        group.throughput(Throughput::Bytes((2 * 2 * s.b * s.t * s.c * 4) as u64));
        for gpu in &gpus {
            let p = gpu.precision();
            let qkv = tensor(gpu, n, 1);
            let fwd = Rope::forward(gpu, &qkv, &spec).unwrap();
            gpu_case(
                &mut group,
                format!("forward/gpu_{p}/{}", s.name),
                gpu,
                |pass| fwd.record(pass),
            );
            let bwd = Rope::backward(gpu, &qkv, &spec).unwrap();
            gpu_case(
                &mut group,
                format!("backward/gpu_{p}/{}", s.name),
                gpu,
                |pass| bwd.record(pass),
            );
        }
        let mut qkv = fill(n, 1);
        group.bench_function(format!("forward/cpu_ref/{}", s.name), |b| {
            b.iter(|| kiln::cpu::rope::rope_forward(&mut qkv, &spec).unwrap())
        });
        group.bench_function(format!("backward/cpu_ref/{}", s.name), |b| {
            b.iter(|| kiln::cpu::rope::rope_backward(&mut qkv, &spec).unwrap())
        });
    }
    group.finish();
}

fn swiglu(c: &mut Criterion) {
    let gpus = devices();
    let mut group = c.benchmark_group("swiglu");
    configure(&mut group);
    for s in SIZES {
        // Llama's MLP width: hidden ≈ 8C/3 (the parameter count of GPT-2's 4C MLP with three
        // matrices instead of two), rounded up to a multiple of 64: 384 and 1024 here. The input
        // is (B·T, 2·hidden): 128 MiB in f32 at the larger size, lavapipe's binding limit.
        let hidden = (8 * s.c / 3).div_ceil(64) * 64;
        let spec = SwiGluSpec::new(s.b * s.t, hidden);
        let n = s.b * s.t * hidden;
        for gpu in &gpus {
            let p = gpu.precision();
            let (inp, out, dinp) = (
                tensor(gpu, 2 * n, 1),
                tensor(gpu, n, 2),
                tensor(gpu, 2 * n, 3),
            );
            let fwd = SwiGluForward::new(gpu, &out, &inp, &spec).unwrap();
            // Reads gate and up, writes out.
            group.throughput(Throughput::Bytes((3 * n * 4) as u64));
            gpu_case(
                &mut group,
                format!("forward/gpu_{p}/{}", s.name),
                gpu,
                |pass| fwd.record(pass),
            );
            let bwd = SwiGluBackward::new(gpu, &dinp, &out, &inp, &spec, false).unwrap();
            // Reads gate, up and dout, writes dgate and dup.
            group.throughput(Throughput::Bytes((5 * n * 4) as u64));
            gpu_case(
                &mut group,
                format!("backward/gpu_{p}/{}", s.name),
                gpu,
                |pass| bwd.record(pass),
            );
        }
        let inp = fill(2 * n, 1);
        let (mut out, mut dinp) = (vec![0.0; n], vec![0.0; 2 * n]);
        group.throughput(Throughput::Bytes((3 * n * 4) as u64));
        group.bench_function(format!("forward/cpu_ref/{}", s.name), |b| {
            b.iter(|| kiln::cpu::swiglu::swiglu_forward(&mut out, &inp, &spec).unwrap())
        });
        group.throughput(Throughput::Bytes((5 * n * 4) as u64));
        group.bench_function(format!("backward/cpu_ref/{}", s.name), |b| {
            b.iter(|| {
                kiln::cpu::swiglu::swiglu_backward(&mut dinp, &out, &inp, &spec, false).unwrap()
            })
        });
    }
    group.finish();
}

fn attention(c: &mut Criterion) {
    let gpus = devices();
    let mut group = c.benchmark_group("attention");
    configure(&mut group);
    for s in SIZES {
        let shape = AttentionShape {
            batch: s.b,
            seq: s.t,
            channels: s.c,
            heads: s.heads,
        };
        // Forward: q·kᵀ and P·v, 2·B·T²·C multiply-adds each (the full square, as computed).
        let fwd_flops = 4 * s.b * s.t * s.t * s.c;
        let (qkv_n, out_n, probs_n) = (s.b * s.t * 3 * s.c, s.b * s.t * s.c, shape.probs_len());
        for gpu in &gpus {
            let p = gpu.precision();
            let (qkv, out, probs) = (
                tensor(gpu, qkv_n, 1),
                tensor(gpu, out_n, 2),
                tensor(gpu, probs_n, 3),
            );
            let fwd = AttentionForward::new(gpu, &out, &probs, &qkv, &shape).unwrap();
            group.throughput(Throughput::Elements(fwd_flops as u64));
            gpu_case(
                &mut group,
                format!("forward/gpu_{p}/{}", s.name),
                gpu,
                |pass| fwd.record(pass),
            );
            fwd.run(gpu).unwrap();
            let (dqkv, dprobs) = (tensor(gpu, qkv_n, 4), tensor(gpu, probs_n, 5));
            let bwd =
                AttentionBackward::new(gpu, &dqkv, &dprobs, &out, &qkv, &probs, &shape).unwrap();
            group.throughput(Throughput::Elements(2 * fwd_flops as u64));
            gpu_case(
                &mut group,
                format!("backward/gpu_{p}/{}", s.name),
                gpu,
                |pass| bwd.record(pass),
            );
        }
        // The reference skips the masked half, so its count is half the GPU's for the same work.
        let qkv = fill(qkv_n, 1);
        let (mut out, mut probs) = (vec![0.0; out_n], vec![0.0; probs_n]);
        group.throughput(Throughput::Elements(fwd_flops as u64));
        group.bench_function(format!("forward/cpu_ref/{}", s.name), |b| {
            b.iter(|| {
                kiln::cpu::attention::attention_forward(&mut out, &mut probs, &qkv, &shape).unwrap()
            })
        });
        let mut dqkv = vec![0.0; qkv_n];
        group.throughput(Throughput::Elements(2 * fwd_flops as u64));
        group.bench_function(format!("backward/cpu_ref/{}", s.name), |b| {
            b.iter(|| {
                kiln::cpu::attention::attention_backward(&mut dqkv, &out, &qkv, &probs, &shape)
                    .unwrap()
            })
        });
    }
    group.finish();
}

fn grouped_attention(c: &mut Criterion) {
    let gpus = devices();
    let mut group = c.benchmark_group("attention_gqa");
    configure(&mut group);
    for s in SIZES {
        // The same query heads as the multi-head benchmark, sharing 2 key/value heads.
        let shape = GroupedAttentionShape {
            batch: s.b,
            seq: s.t,
            heads: s.heads,
            kv_heads: 2,
            head_dim: s.c / s.heads,
        };
        let fwd_flops = 4 * s.b * s.t * s.t * s.c;
        let (qkv_n, out_n, probs_n) = (shape.qkv_len(), shape.out_len(), shape.probs_len());
        for gpu in &gpus {
            let p = gpu.precision();
            let (qkv, out, probs) = (
                tensor(gpu, qkv_n, 1),
                tensor(gpu, out_n, 2),
                tensor(gpu, probs_n, 3),
            );
            let fwd = AttentionForward::grouped(gpu, &out, &probs, &qkv, &shape).unwrap();
            group.throughput(Throughput::Elements(fwd_flops as u64));
            gpu_case(
                &mut group,
                format!("forward/gpu_{p}/{}", s.name),
                gpu,
                |pass| fwd.record(pass),
            );
            fwd.run(gpu).unwrap();
            let (dqkv, dprobs) = (tensor(gpu, qkv_n, 4), tensor(gpu, probs_n, 5));
            let bwd = AttentionBackward::grouped(gpu, &dqkv, &dprobs, &out, &qkv, &probs, &shape)
                .unwrap();
            group.throughput(Throughput::Elements(2 * fwd_flops as u64));
            gpu_case(
                &mut group,
                format!("backward/gpu_{p}/{}", s.name),
                gpu,
                |pass| bwd.record(pass),
            );
        }
        let qkv = fill(qkv_n, 1);
        let (mut out, mut probs) = (vec![0.0; out_n], vec![0.0; probs_n]);
        group.throughput(Throughput::Elements(fwd_flops as u64));
        group.bench_function(format!("forward/cpu_ref/{}", s.name), |b| {
            b.iter(|| {
                kiln::cpu::attention::grouped_attention_forward(&mut out, &mut probs, &qkv, &shape)
                    .unwrap()
            })
        });
        let mut dqkv = vec![0.0; qkv_n];
        group.throughput(Throughput::Elements(2 * fwd_flops as u64));
        group.bench_function(format!("backward/cpu_ref/{}", s.name), |b| {
            b.iter(|| {
                kiln::cpu::attention::grouped_attention_backward(
                    &mut dqkv, &out, &qkv, &probs, &shape,
                )
                .unwrap()
            })
        });
    }
    group.finish();
}

/// The fused attention against the matmul-based path, forward and backward, at the baby GPT's
/// shape and at the long sequences of issue 11 (batch 1, 6 heads of 64 = 384 wide, T = 1024 and
/// 2048). Both paths are charged the same useful FLOPs, the causal half of the products
/// (forward: q·kᵀ and P·v, 2·B·H·d·T(T+1)/2 multiply-adds each; backward: the four products of
/// the gradient, twice the forward; the fused backward's recomputation of the scores is not
/// counted), so criterion's elem/s column is GFLOP/s and the two paths' rates compare directly.
/// Filter with e.g. `cargo bench --bench kernels -- flash_attention/.*/baby`: the long cases take
/// minutes on lavapipe.
fn flash_attention(c: &mut Criterion) {
    let gpus = devices();
    let mut group = c.benchmark_group("flash_attention");
    configure(&mut group);
    let shapes = [
        (
            "baby",
            GroupedAttentionShape {
                batch: 12,
                seq: 64,
                heads: 4,
                kv_heads: 4,
                head_dim: 32,
            },
        ),
        (
            "t1024",
            GroupedAttentionShape {
                batch: 1,
                seq: 1024,
                heads: 6,
                kv_heads: 6,
                head_dim: 64,
            },
        ),
        (
            "t2048",
            GroupedAttentionShape {
                batch: 1,
                seq: 2048,
                heads: 6,
                kv_heads: 6,
                head_dim: 64,
            },
        ),
    ];
    for (name, s) in shapes {
        let t = s.seq;
        let fwd_flops = (2 * s.batch * s.heads * s.head_dim * t * (t + 1)) as u64;
        for gpu in &gpus {
            let p = gpu.precision();
            let (qkv, out, dout) = (
                tensor(gpu, s.qkv_len(), 1),
                tensor(gpu, s.out_len(), 2),
                tensor(gpu, s.out_len(), 3),
            );
            let (lse, dqkv) = (f32_tensor(gpu, s.lse_len()), tensor(gpu, s.qkv_len(), 4));
            let fwd = FlashAttentionForward::new(gpu, &out, &lse, &qkv, &s, None).unwrap();
            fwd.run(gpu).unwrap();
            let bwd =
                FlashAttentionBackward::new(gpu, &dqkv, &dout, &qkv, &out, &lse, &s, None).unwrap();
            group.throughput(Throughput::Elements(fwd_flops));
            gpu_case(
                &mut group,
                format!("fused_forward/gpu_{p}/{name}"),
                gpu,
                |pass| fwd.record(pass),
            );
            group.throughput(Throughput::Elements(2 * fwd_flops));
            gpu_case(
                &mut group,
                format!("fused_backward/gpu_{p}/{name}"),
                gpu,
                |pass| bwd.record(pass),
            );
            let (probs, dprobs) = (tensor(gpu, s.probs_len(), 5), tensor(gpu, s.probs_len(), 6));
            let fwd = AttentionForward::grouped(gpu, &out, &probs, &qkv, &s).unwrap();
            fwd.run(gpu).unwrap();
            let bwd =
                AttentionBackward::grouped(gpu, &dqkv, &dprobs, &dout, &qkv, &probs, &s).unwrap();
            group.throughput(Throughput::Elements(fwd_flops));
            gpu_case(
                &mut group,
                format!("reference_forward/gpu_{p}/{name}"),
                gpu,
                |pass| fwd.record(pass),
            );
            group.throughput(Throughput::Elements(2 * fwd_flops));
            gpu_case(
                &mut group,
                format!("reference_backward/gpu_{p}/{name}"),
                gpu,
                |pass| bwd.record(pass),
            );
        }
    }
    group.finish();
}

fn elementwise(c: &mut Criterion) {
    let gpus = devices();
    let mut group = c.benchmark_group("elementwise");
    configure(&mut group);
    for s in SIZES {
        // GELU runs on the MLP's hidden activations (4C wide); the residual add on (B, T, C).
        let hidden = 4 * s.b * s.t * s.c;
        let n = s.b * s.t * s.c;
        for gpu in &gpus {
            let p = gpu.precision();
            let (x, y, dx) = (
                tensor(gpu, hidden, 1),
                tensor(gpu, hidden, 2),
                tensor(gpu, hidden, 3),
            );
            let fwd = GeluForward::new(gpu, &y, &x).unwrap();
            group.throughput(Throughput::Bytes((2 * hidden * 4) as u64));
            gpu_case(
                &mut group,
                format!("gelu_forward/gpu_{p}/{}", s.name),
                gpu,
                |pass| fwd.record(pass),
            );
            let bwd = GeluBackward::new(gpu, &dx, &y, &x, false).unwrap();
            group.throughput(Throughput::Bytes((3 * hidden * 4) as u64));
            gpu_case(
                &mut group,
                format!("gelu_backward/gpu_{p}/{}", s.name),
                gpu,
                |pass| bwd.record(pass),
            );
            let (a, b, o) = (tensor(gpu, n, 4), tensor(gpu, n, 5), tensor(gpu, n, 6));
            let res = ResidualForward::new(gpu, &o, &a, &b).unwrap();
            group.throughput(Throughput::Bytes((3 * n * 4) as u64));
            gpu_case(
                &mut group,
                format!("residual/gpu_{p}/{}", s.name),
                gpu,
                |pass| res.record(pass),
            );
            // Dropout on a residual branch (B, T, C), p = 0.2, out of place as in the backward.
            let state = gpu.upload_u32("dropout state", &[4], &[0; 4]).unwrap();
            kiln::kernels::dropout::write_state(gpu, &state, &DropoutState::new(0.2, 7)).unwrap();
            let drop = Dropout::new(gpu, &o, Some(&a), &state, 3).unwrap();
            group.throughput(Throughput::Bytes((2 * n * 4) as u64));
            gpu_case(
                &mut group,
                format!("dropout/gpu_{p}/{}", s.name),
                gpu,
                |pass| drop.record(pass),
            );
        }
        let x = fill(hidden, 1);
        let mut y = vec![0.0; hidden];
        group.throughput(Throughput::Bytes((2 * hidden * 4) as u64));
        group.bench_function(format!("gelu_forward/cpu_ref/{}", s.name), |b| {
            b.iter(|| kiln::cpu::activation::gelu_forward(&mut y, &x).unwrap())
        });
        let mut dx = vec![0.0; hidden];
        group.throughput(Throughput::Bytes((3 * hidden * 4) as u64));
        group.bench_function(format!("gelu_backward/cpu_ref/{}", s.name), |b| {
            b.iter(|| kiln::cpu::activation::gelu_backward(&mut dx, &y, &x, false).unwrap())
        });
        let (a, bb) = (fill(n, 4), fill(n, 5));
        let mut o = vec![0.0; n];
        group.throughput(Throughput::Bytes((3 * n * 4) as u64));
        group.bench_function(format!("residual/cpu_ref/{}", s.name), |b| {
            b.iter(|| kiln::cpu::residual::residual_forward(&mut o, &a, &bb).unwrap())
        });
        group.throughput(Throughput::Bytes((2 * n * 4) as u64));
        let state = DropoutState::new(0.2, 7);
        group.bench_function(format!("dropout/cpu_ref/{}", s.name), |b| {
            b.iter(|| kiln::cpu::dropout::dropout(&mut o, &a, &state, 3))
        });
    }
    group.finish();
}

fn loss_and_optimizer(c: &mut Criterion) {
    use kiln::kernels::adamw::AdamW;
    use kiln::kernels::crossentropy::CrossEntropy;
    use kiln::kernels::gradnorm::GradNorm;
    use kiln::model::{ModelConfig, ParamLayout};
    use kiln::training::{AdamWStep, CrossEntropySpec, ParamSegment};
    let gpus = devices();
    let mut group = c.benchmark_group("loss_optimizer");
    configure(&mut group);
    for s in SIZES {
        let rows = s.b * s.t;
        let spec = CrossEntropySpec::new(rows, s.vocab);
        let targets: Vec<u32> = (0..rows).map(|i| (i * 31 % s.vocab) as u32).collect();
        // The parameter count of the config at this size.
        let n_layer = if s.c == 128 { 4 } else { 6 };
        let model = ModelConfig {
            n_layer,
            n_head: s.heads,
            n_embd: s.c,
            block_size: s.t,
            ..ModelConfig::default()
        };
        let n = ParamLayout::gpt(&model, s.vocab, 1).unwrap().num_params();
        let segments = [ParamSegment {
            offset: 0,
            len: n,
            decayed: true,
        }];
        for gpu in &gpus {
            let p = gpu.precision();
            let (logits, dlogits) = (
                tensor(gpu, rows * s.vocab, 1),
                tensor(gpu, rows * s.vocab, 2),
            );
            let (loss, tg) = (
                f32_tensor(gpu, rows),
                gpu.upload_u32("targets", &[rows], &targets).unwrap(),
            );
            let ce = CrossEntropy::new(gpu, &loss, &dlogits, &logits, &tg, None, &spec).unwrap();
            // Reads the logits, writes the gradient.
            group.throughput(Throughput::Bytes((2 * rows * s.vocab * 4) as u64));
            gpu_case(
                &mut group,
                format!("crossentropy/gpu_{p}/{}", s.name),
                gpu,
                |pass| ce.record(pass),
            );

            let grads = tensor(gpu, n, 3);
            let (norm, flag) = (
                f32_tensor(gpu, 1),
                gpu.zeros("flag", &[1], DType::U32).unwrap(),
            );
            let gn = GradNorm::new(gpu, &norm, &flag, &grads).unwrap();
            group.throughput(Throughput::Bytes((n * 4) as u64));
            gpu_case(
                &mut group,
                format!("gradnorm/gpu_{p}/{}", s.name),
                gpu,
                |pass| gn.record(pass),
            );
            let (master, m, v, working) = (
                f32_tensor(gpu, n),
                f32_tensor(gpu, n),
                f32_tensor(gpu, n),
                tensor(gpu, n, 4),
            );
            let skipped = gpu.zeros("skipped", &[1], DType::U32).unwrap();
            let scale = gpu.upload("loss scale", &[1], DType::F32, &[1.0]).unwrap();
            let opt = AdamW::new(
                gpu,
                &master,
                &working,
                &m,
                &v,
                &skipped,
                &grads,
                &norm,
                &flag,
                &scale,
                &segments,
                &AdamWStep::new(1),
            )
            .unwrap();
            gn.run(gpu).unwrap();
            // Reads grads, master, m, v; writes master, m, v and the working copy.
            group.throughput(Throughput::Bytes((8 * n * 4) as u64));
            gpu_case(
                &mut group,
                format!("adamw/gpu_{p}/{}", s.name),
                gpu,
                |pass| opt.record(pass),
            );
        }
        let logits = fill(rows * s.vocab, 1);
        let (mut loss, mut dlogits) = (vec![0.0; rows], vec![0.0; rows * s.vocab]);
        group.throughput(Throughput::Bytes((2 * rows * s.vocab * 4) as u64));
        group.bench_function(format!("crossentropy/cpu_ref/{}", s.name), |b| {
            b.iter(|| {
                kiln::cpu::crossentropy::crossentropy(
                    &mut loss,
                    &mut dlogits,
                    &logits,
                    &targets,
                    1.0,
                    &spec,
                )
                .unwrap()
            })
        });
        let grads = fill(n, 3);
        group.throughput(Throughput::Bytes((n * 4) as u64));
        group.bench_function(format!("gradnorm/cpu_ref/{}", s.name), |b| {
            b.iter(|| {
                let (mut norm, mut flag) = (0.0, 0);
                kiln::cpu::gradnorm::gradnorm(&mut norm, &mut flag, &grads);
                norm
            })
        });
        let (mut master, mut working, mut m, mut v, mut skipped) =
            (fill(n, 5), vec![0.0; n], vec![0.0; n], vec![0.0; n], 0);
        group.throughput(Throughput::Bytes((8 * n * 4) as u64));
        group.bench_function(format!("adamw/cpu_ref/{}", s.name), |b| {
            b.iter(|| {
                kiln::cpu::adamw::adamw(
                    &mut master,
                    &mut working,
                    &mut m,
                    &mut v,
                    &mut skipped,
                    &grads,
                    1.0,
                    0,
                    &segments,
                    &AdamWStep::new(1),
                )
                .unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    embedding,
    layernorm,
    rmsnorm,
    rope,
    swiglu,
    attention,
    grouped_attention,
    flash_attention,
    elementwise,
    loss_and_optimizer
);
criterion_main!(benches);
