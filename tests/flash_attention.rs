//! The fused (FlashAttention-style) causal attention: its CPU reference against finite
//! differences and against the reference attention, the GPU kernels against the CPU reference
//! and against the matmul-based GPU path, in both precisions, on awkward shapes (T = 1, 7, 65,
//! 257; head sizes 1, 6, 10, 32, 64, 100, 128; n_kv_head = 1, a divisor, n_head), with and
//! without dropout, every lane split, bit-identical reruns, and the errors.

mod common;

use common::gradcheck::{GradCheck, check_gradient, weighted_sum};
use common::{Tolerance, assert_close, gpu, random, round_to};
use kiln::cpu::attention::{grouped_attention_backward, grouped_attention_forward};
use kiln::cpu::dropout::DropoutState;
use kiln::cpu::flash_attention::{ProbsDropout, flash_attention_backward, flash_attention_forward};
use kiln::gpu::DType;
use kiln::kernels::RowKernel;
use kiln::kernels::attention::{AttentionBackward, AttentionDropout, AttentionForward};
use kiln::kernels::flash_attention::{
    FlashAttentionBackward, FlashAttentionForward, FlashDropout, MAX_HEAD_DIM, prefer_fused,
    supports,
};
use kiln::ops::GroupedAttentionShape;
use kiln::{Gpu, GpuTensor, Precision};

fn shape(batch: usize, seq: usize, heads: usize, kv: usize, d: usize) -> GroupedAttentionShape {
    GroupedAttentionShape {
        batch,
        seq,
        heads,
        kv_heads: kv,
        head_dim: d,
    }
}

/// (B, T, n_head, n_kv_head, head_dim). T = 1; head sizes that are not multiples of 4 (scalar
/// loads, partial last chunk), of each head-size class (16, 32, 64, 128) and inside one (100);
/// multi-query, groups of 2 and 3, and multi-head; T = 65 (past a 64-row tile and the 16 query
/// rows of a workgroup), T = 257.
const SHAPES: &[(usize, usize, usize, usize, usize)] = &[
    (1, 1, 1, 1, 4),
    (2, 7, 4, 2, 6),
    (2, 5, 3, 3, 1),
    (1, 65, 6, 1, 10),
    (3, 33, 3, 3, 32),
    (1, 20, 6, 2, 100),
    (1, 9, 2, 1, 128),
    (1, 257, 2, 2, 64),
];

/// Dropout of 0.25 under a fixed key, at site 5.
const DROP_P: f32 = 0.25;
fn drop_state() -> DropoutState {
    DropoutState::new(DROP_P, 0x1234_5678)
}
const SITE: u32 = 5;

fn cpu_drop(state: &DropoutState) -> ProbsDropout<'_> {
    ProbsDropout { state, site: SITE }
}

fn cpu_forward(
    qkv: &[f32],
    s: &GroupedAttentionShape,
    drop: Option<ProbsDropout<'_>>,
) -> (Vec<f32>, Vec<f32>) {
    let mut out = vec![0.0; s.out_len()];
    let mut lse = vec![0.0; s.lse_len()];
    flash_attention_forward(&mut out, &mut lse, qkv, s, drop).unwrap();
    (out, lse)
}

/// Without dropout the fused contract is the reference attention: the same output (the same
/// products; only the normalisation is applied after the weighted sum rather than before), lse
/// equal to the log of the reference's softmax denominators (checked through the probabilities:
/// exp(score − lse) is each probability), and the same gradients to rounding.
#[test]
fn cpu_reference_equals_the_reference_attention() {
    for &(b, t, nh, nkv, d) in SHAPES {
        let s = shape(b, t, nh, nkv, d);
        let qkv = random(s.qkv_len(), 1);
        let (out, lse) = cpu_forward(&qkv, &s, None);
        let (mut out_r, mut probs) = (vec![0.0; s.out_len()], vec![0.0; s.probs_len()]);
        grouped_attention_forward(&mut out_r, &mut probs, &qkv, &s).unwrap();
        // f32 sums of at most T = 257 terms of size ≤ 1 in another association: ~1e-7 relative
        // per term; 1e-5 is ample and still far below any real error.
        let tight = Tolerance {
            abs: 1e-5,
            rel: 1e-5,
        };
        assert_close(&format!("{s:?} out"), &out_r, &out, tight);
        // The probability of key 0 for every row, rebuilt from lse.
        let scale = 1.0 / (d as f32).sqrt();
        for bh in 0..b * nh {
            let (bi, h) = (bh / nh, bh % nh);
            for row in 0..t {
                let q = &qkv[(bi * t + row) * s.qkv_width() + h * d..][..d];
                let k0 = &qkv[bi * t * s.qkv_width() + nh * d + (h / s.group()) * d..][..d];
                let score: f32 = q.iter().zip(k0).map(|(x, y)| x * y).sum::<f32>() * scale;
                let p = (score - lse[bh * t + row]).exp();
                let want = probs[(bh * t + row) * t];
                assert!(
                    (p - want).abs() <= 1e-6 + 1e-5 * want,
                    "{s:?} p {p} vs {want}"
                );
            }
        }
        let dout = random(s.out_len(), 2);
        let mut dqkv = vec![0.0; qkv.len()];
        flash_attention_backward(&mut dqkv, &dout, &qkv, &out, &lse, &s, None).unwrap();
        let mut dqkv_r = vec![0.0; qkv.len()];
        grouped_attention_backward(&mut dqkv_r, &dout, &qkv, &probs, &s).unwrap();
        assert_close(&format!("{s:?} dqkv"), &dqkv_r, &dqkv, tight);
    }
}

/// As in tests/attention.rs: h = 1e-2; the f32 forward's rounding puts ~2e-4 of noise in the
/// central difference (a few thousand outputs summed); truncation is O(h²) ≈ 1e-4 relative.
/// With dropout the kept weights are 4/3 larger, which the same margins cover.
const FD: GradCheck = GradCheck {
    h: 1e-2,
    abs: 2e-4,
    rel: 2e-3,
};

/// Small shapes for the finite differences (two forwards per input element): T = 1, a group of
/// 2 with head size 6, head size 1, multi-query with T = 13.
const FD_SHAPES: &[(usize, usize, usize, usize, usize)] = &[
    (1, 1, 1, 1, 4),
    (2, 7, 4, 2, 6),
    (2, 5, 3, 3, 1),
    (1, 13, 3, 1, 5),
];

#[test]
fn cpu_backward_matches_finite_differences_with_and_without_dropout() {
    let state = drop_state();
    for &(b, t, nh, nkv, d) in FD_SHAPES {
        let s = shape(b, t, nh, nkv, d);
        for drop in [None, Some(cpu_drop(&state))] {
            let qkv = random(s.qkv_len(), 3);
            let w = random(s.out_len(), 4);
            let (out, lse) = cpu_forward(&qkv, &s, drop);
            let mut dqkv = vec![0.0; qkv.len()];
            flash_attention_backward(&mut dqkv, &w, &qkv, &out, &lse, &s, drop).unwrap();
            let loss = |x: &[f32]| weighted_sum(&w, &cpu_forward(x, &s, drop).0);
            let what = format!("{s:?} dropout {}", drop.is_some());
            let worst =
                check_gradient(&what, &qkv, &dqkv, loss, FD).unwrap_or_else(|e| panic!("{e}"));
            eprintln!("{what}: worst error {worst:.3} of the allowed");
        }
    }
}

/// The check catches the dropout mistakes a fused backward can make: the mask left out of dP
/// (the backward run without dropout after a forward with it), and one element off.
#[test]
fn gradient_checker_rejects_wrong_dropout_gradients() {
    let state = drop_state();
    let drop = Some(cpu_drop(&state));
    let s = shape(1, 6, 2, 1, 4);
    let qkv = random(s.qkv_len(), 5);
    let w = random(s.out_len(), 6);
    let (out, lse) = cpu_forward(&qkv, &s, drop);
    let loss = |x: &[f32]| weighted_sum(&w, &cpu_forward(x, &s, drop).0);
    let mut no_mask = vec![0.0; qkv.len()];
    flash_attention_backward(&mut no_mask, &w, &qkv, &out, &lse, &s, None).unwrap();
    assert!(check_gradient("mask left out", &qkv, &no_mask, loss, FD).is_err());
    let mut right = vec![0.0; qkv.len()];
    flash_attention_backward(&mut right, &w, &qkv, &out, &lse, &s, drop).unwrap();
    let mut one = right.clone();
    one[7] += 0.05;
    assert!(check_gradient("one element", &qkv, &one, loss, FD).is_err());
    assert!(check_gradient("right", &qkv, &right, loss, FD).is_ok());
}

fn upload(gpu: &Gpu, name: &str, data: &[f32]) -> GpuTensor {
    gpu.upload(name, &[data.len()], DType::from(gpu.precision()), data)
        .unwrap()
}

fn upload_state(gpu: &Gpu, state: &DropoutState) -> GpuTensor {
    gpu.upload_u32("dropout state", &[4], bytemuck::cast_slice(&[*state]))
        .unwrap()
}

/// One fused forward and backward on the GPU.
struct Fused {
    out: GpuTensor,
    lse: GpuTensor,
    dqkv: GpuTensor,
    fwd: FlashAttentionForward,
    bwd: FlashAttentionBackward,
}

fn fused(
    gpu: &Gpu,
    qkv: &GpuTensor,
    dout: &GpuTensor,
    s: &GroupedAttentionShape,
    state: Option<&GpuTensor>,
    split: Option<usize>,
) -> Fused {
    let dt = DType::from(gpu.precision());
    let out = gpu.zeros("out", &[s.out_len()], dt).unwrap();
    let lse = gpu.zeros("lse", &[s.lse_len()], DType::F32).unwrap();
    let dqkv = gpu.zeros("dqkv", &[s.qkv_len()], dt).unwrap();
    let drop = state.map(|state| FlashDropout { state, site: SITE });
    let fwd = match split {
        None => FlashAttentionForward::new(gpu, &out, &lse, qkv, s, drop),
        Some(n) => FlashAttentionForward::with_split(gpu, &out, &lse, qkv, s, drop, n),
    }
    .unwrap();
    fwd.run(gpu).unwrap();
    let bwd = match split {
        None => FlashAttentionBackward::new(gpu, &dqkv, dout, qkv, &out, &lse, s, drop),
        Some(n) => {
            FlashAttentionBackward::with_split(gpu, &dqkv, dout, qkv, &out, &lse, s, drop, n)
        }
    }
    .unwrap();
    bwd.run(gpu).unwrap();
    Fused {
        out,
        lse,
        dqkv,
        fwd,
        bwd,
    }
}

/// GPU fused vs the CPU reference of the same contract, on the same (storage-rounded) inputs.
/// The CPU backward starts from the GPU's own out and lse, as the GPU backward does.
///
/// f32: both sides sum at most max(T, d) = 257 products of O(1) values in f32, in different
/// orders (the GPU in vec4 chunks, in lane partials merged at the end, with exp2 of base-2
/// scores and a rescale per staged tile): a few 1e-7 relative per value; 2e-5 absolute + 1e-4
/// relative leaves a margin for other drivers' exp2 and still fails any real error, which is
/// O(1e-2) or more. lse likewise (values of size ~1..6). Measured on lavapipe: at most 0.026 of
/// the allowed error for out, lse and dqkv (the test prints each case's share).
/// f16: the GPU's f32 results are rounded to f16 once on store (half an ulp, 2^-12 ≈ 2.4e-4
/// relative) and the CPU sees the GPU's rounded out: 1e-3 relative + 1e-3 absolute (values of
/// O(1); an f16 ulp at 1 is 9.8e-4) covers one rounding plus the f32 differences (measured: at
/// most 0.31 of it). lse is f32 in both precisions: 2e-5 + 1e-4 relative.
fn tolerance(p: Precision) -> Tolerance {
    match p {
        Precision::F32 => Tolerance {
            abs: 2e-5,
            rel: 1e-4,
        },
        Precision::F16 => Tolerance {
            abs: 1e-3,
            rel: 1e-3,
        },
    }
}
const LSE_TOL: Tolerance = Tolerance {
    abs: 2e-5,
    rel: 1e-4,
};

fn check_against_cpu(gpu: &Gpu, s: &GroupedAttentionShape, dropout: bool, split: Option<usize>) {
    let p = gpu.precision();
    let state = drop_state();
    let drop = dropout.then(|| cpu_drop(&state));
    let qkv = round_to(p, &random(s.qkv_len(), 7));
    let dout = round_to(p, &random(s.out_len(), 8));
    let (g_qkv, g_dout) = (upload(gpu, "qkv", &qkv), upload(gpu, "dout", &dout));
    let g_state = upload_state(gpu, &state);
    let f = fused(gpu, &g_qkv, &g_dout, s, dropout.then_some(&g_state), split);
    let what = format!("{p} {s:?} dropout {dropout} split {split:?}");
    let (out, lse) = cpu_forward(&qkv, s, drop);
    let g_out = gpu.read(&f.out).unwrap();
    let g_lse = gpu.read(&f.lse).unwrap();
    assert_close(&format!("out {what}"), &out, &g_out, tolerance(p));
    assert_close(&format!("lse {what}"), &lse, &g_lse, LSE_TOL);
    let mut dqkv = vec![0.0; qkv.len()];
    flash_attention_backward(&mut dqkv, &dout, &qkv, &g_out, &g_lse, s, drop).unwrap();
    let first = gpu.read(&f.dqkv).unwrap();
    assert_close(&format!("dqkv {what}"), &dqkv, &first, tolerance(p));
    eprintln!(
        "{what}: worst error / allowed: out {:.3}, lse {:.3}, dqkv {:.3}",
        worst_ratio(&out, &g_out, tolerance(p)),
        worst_ratio(&lse, &g_lse, LSE_TOL),
        worst_ratio(&dqkv, &first, tolerance(p))
    );
    // Fixed reduction orders: running both again gives the same bits.
    f.fwd.run(gpu).unwrap();
    f.bwd.run(gpu).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&g_out),
        bits(&gpu.read(&f.out).unwrap()),
        "out rerun {what}"
    );
    assert_eq!(
        bits(&g_lse),
        bits(&gpu.read(&f.lse).unwrap()),
        "lse rerun {what}"
    );
    assert_eq!(
        bits(&first),
        bits(&gpu.read(&f.dqkv).unwrap()),
        "dqkv rerun {what}"
    );
}

/// The largest |expected − actual| / (abs + rel·|expected|): how much of the tolerance is used.
fn worst_ratio(expected: &[f32], actual: &[f32], tol: Tolerance) -> f32 {
    expected
        .iter()
        .zip(actual)
        .map(|(&e, &a)| (e - a).abs() / (tol.abs + tol.rel * e.abs()))
        .fold(0.0, f32::max)
}

#[test]
fn gpu_matches_cpu_forward_and_backward() {
    for p in Precision::ALL {
        let Some(gpu) = gpu(p) else { continue };
        for &(b, t, nh, nkv, d) in SHAPES {
            for dropout in [false, true] {
                check_against_cpu(gpu, &shape(b, t, nh, nkv, d), dropout, None);
            }
        }
    }
}

/// Every lane split the planner may pick (2 by default, 4, 8 and 16 where llvmpipe's loop
/// budget asks for them) computes the same attention; a split that does not divide the
/// workgroup is refused.
#[test]
fn every_lane_split_matches_cpu() {
    let gpu = gpu(Precision::F32).unwrap();
    for split in [2, 4, 8, 16] {
        for &(b, t, nh, nkv, d) in &[(1, 65, 3, 1, 10), (1, 40, 2, 2, 64)] {
            check_against_cpu(gpu, &shape(b, t, nh, nkv, d), true, Some(split));
        }
    }
    let s = shape(1, 8, 1, 1, 8);
    let t = |n: usize, dt| gpu.zeros("t", &[n], dt).unwrap();
    let e = FlashAttentionForward::with_split(
        gpu,
        &t(s.out_len(), DType::F32),
        &t(s.lse_len(), DType::F32),
        &t(s.qkv_len(), DType::F32),
        &s,
        None,
        3,
    )
    .err()
    .expect("3 lanes must be refused");
    assert!(e.to_string().contains("do not divide the workgroup"), "{e}");
}

/// The fused kernels against the matmul-based GPU path, with the same dropout mask: both paths
/// drop the same elements, so they agree to rounding. Tolerances as tests/attention.rs's GPU vs
/// CPU: the reference path stores scores, probabilities and dP in the storage precision, three
/// to four f16 roundings deep in the backward (1e-2 abs + rel in f16), ~1e-6 relative in f32
/// (1e-4 abs + rel).
#[test]
fn gpu_matches_the_reference_path_with_dropout() {
    for p in Precision::ALL {
        let Some(gpu) = gpu(p) else { continue };
        let tol = match p {
            Precision::F32 => Tolerance {
                abs: 1e-4,
                rel: 1e-4,
            },
            Precision::F16 => Tolerance {
                abs: 1e-2,
                rel: 1e-2,
            },
        };
        for &(b, t, nh, nkv, d) in &[(2, 7, 4, 2, 6), (1, 65, 6, 1, 10), (1, 257, 2, 2, 64)] {
            let s = shape(b, t, nh, nkv, d);
            for dropout in [false, true] {
                let what = format!("{p} {s:?} dropout {dropout}");
                let qkv = upload(gpu, "qkv", &random(s.qkv_len(), 9));
                let dout = upload(gpu, "dout", &random(s.out_len(), 10));
                let state = upload_state(gpu, &drop_state());
                let f = fused(gpu, &qkv, &dout, &s, dropout.then_some(&state), None);
                let (out, dqkv) = reference_path(gpu, &qkv, &dout, &s, dropout.then_some(&state));
                let read = |t: &GpuTensor| gpu.read(t).unwrap();
                assert_close(&format!("out {what}"), &read(&out), &read(&f.out), tol);
                assert_close(&format!("dqkv {what}"), &read(&dqkv), &read(&f.dqkv), tol);
            }
        }
    }
}

/// The matmul-based path on the same inputs: (out, dqkv).
fn reference_path(
    gpu: &Gpu,
    qkv: &GpuTensor,
    dout: &GpuTensor,
    s: &GroupedAttentionShape,
    state: Option<&GpuTensor>,
) -> (GpuTensor, GpuTensor) {
    let dt = DType::from(gpu.precision());
    let z = |n: usize| gpu.zeros("t", &[n], dt).unwrap();
    let (out, probs, dropped) = (z(s.out_len()), z(s.probs_len()), z(s.probs_len()));
    let (dqkv, dprobs) = (z(s.qkv_len()), z(s.probs_len()));
    let drop = state.map(|state| AttentionDropout {
        dropped: &dropped,
        state,
        site: SITE,
    });
    let fwd_kernel = RowKernel::for_rows(gpu, s.seq, 3);
    AttentionForward::grouped_with_row_kernel(gpu, &out, &probs, qkv, s, drop, fwd_kernel)
        .unwrap()
        .run(gpu)
        .unwrap();
    let bwd_kernel = RowKernel::for_rows(gpu, s.seq, 2);
    AttentionBackward::grouped_with_row_kernel(
        gpu, &dqkv, &dprobs, dout, qkv, &probs, s, drop, bwd_kernel,
    )
    .unwrap()
    .run(gpu)
    .unwrap();
    (out, dqkv)
}

/// The long sequences: batch 1, 6 heads, 384 wide (head size 64), T = 1024 and 2048,
/// fused against the matmul-based path in both precisions, forward and backward, with the
/// attention's activation memory of each path (what it keeps or needs beyond qkv, out, dout and
/// dqkv): the fused path's lse and delta grow linearly in T, the reference's probs and dprobs
/// quadratically. Tolerances as `gpu_matches_the_reference_path_with_dropout` (sums of up to
/// 2048 terms: f32 rounding ~√2048·6e-8 ≈ 3e-6 relative, far inside 1e-4). Measured on
/// lavapipe: largest difference 3.8e-6 (f32) and 9.8e-4 (f16, one f16 ulp at 1) in dqkv; the
/// fused path keeps 49152 B at T = 1024 and 98304 B at T = 2048 in f32, the reference 50331648 B
/// and 201326592 B. The four cases took 30 s there (2026-12-03; they took minutes before the
/// fused kernels split long rows over lanes), so the test is no longer ignored. See the bytes
/// with `cargo test --release --test flash_attention long_sequences -- --nocapture`.
#[test]
fn long_sequences_match_the_reference_path() {
    let mut bytes = Vec::new();
    for p in Precision::ALL {
        let Some(gpu) = gpu(p) else { continue };
        let tol = match p {
            Precision::F32 => Tolerance {
                abs: 1e-4,
                rel: 1e-4,
            },
            Precision::F16 => Tolerance {
                abs: 1e-2,
                rel: 1e-2,
            },
        };
        for t in [1024, 2048] {
            let s = shape(1, t, 6, 6, 64);
            let what = format!("{p} T = {t}");
            let qkv = upload(gpu, "qkv", &random(s.qkv_len(), 11));
            let dout = upload(gpu, "dout", &random(s.out_len(), 12));
            let f = fused(gpu, &qkv, &dout, &s, None, None);
            let (out, dqkv) = reference_path(gpu, &qkv, &dout, &s, None);
            let read = |t: &GpuTensor| gpu.read(t).unwrap();
            let (f_out, r_out) = (read(&f.out), read(&out));
            let (f_dqkv, r_dqkv) = (read(&f.dqkv), read(&dqkv));
            assert_close(&format!("out {what}"), &r_out, &f_out, tol);
            assert_close(&format!("dqkv {what}"), &r_dqkv, &f_dqkv, tol);
            eprintln!(
                "{what}: worst |fused − reference| out {:e}, dqkv {:e}",
                worst_difference(&r_out, &f_out),
                worst_difference(&r_dqkv, &f_dqkv)
            );
            let fused_bytes = f.lse.bytes() + f.bwd.scratch_bytes();
            let element = p.size() as u64;
            // probs and dprobs, (B, n_head, T, T) each.
            let reference_bytes = 2 * s.probs_len() as u64 * element;
            let io = (2 * s.qkv_len() + 2 * s.out_len()) as u64 * element;
            eprintln!(
                "{what}: attention activations fused {fused_bytes} B, reference \
                 {reference_bytes} B (both beside qkv, out, dout, dqkv: {io} B)"
            );
            bytes.push((p, t, fused_bytes, reference_bytes));
        }
    }
    for pair in bytes.chunks(2) {
        let [(p, _, f1, r1), (_, _, f2, r2)] = pair else {
            unreachable!()
        };
        assert_eq!(*f2, 2 * f1, "{p}: fused memory must double with T");
        assert_eq!(*r2, 4 * r1, "{p}: the reference's memory quadruples with T");
    }
}

fn worst_difference(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// `auto`'s rule: fused on hardware adapters; on CPU-backed ones the reference, unless its
/// (B, n_head, T, T) probabilities exceed the largest buffer binding; never a shape the fused
/// kernels refuse.
#[test]
fn auto_rule_follows_the_adapter_and_the_reference_memory() {
    let gpu = gpu(Precision::F32).unwrap();
    let caps = gpu.capabilities();
    let small = shape(2, 64, 4, 4, 32);
    assert_eq!(prefer_fused(gpu, &small), !caps.adapter.software);
    // 8·6·2048² f32 probabilities: 805 MB, past lavapipe's 128 MiB binding and most GPUs' too.
    let long = shape(8, 2048, 6, 6, 64);
    let probs_bytes = long.probs_len() as u64 * 4;
    if probs_bytes > caps.max_tensor_bytes() {
        assert!(prefer_fused(gpu, &long));
    }
    assert!(!prefer_fused(gpu, &shape(1, 8, 1, 1, MAX_HEAD_DIM + 1)));
}

#[test]
fn bad_inputs_are_errors() {
    let gpu = gpu(Precision::F32).unwrap();
    let t = |n: usize, dt| gpu.zeros("t", &[n], dt).unwrap();
    let f32s = |n: usize| t(n, DType::F32);
    // A head wider than the widest class.
    let wide = shape(1, 4, 1, 1, MAX_HEAD_DIM + 1);
    let e = FlashAttentionForward::new(
        gpu,
        &f32s(wide.out_len()),
        &f32s(wide.lse_len()),
        &f32s(wide.qkv_len()),
        &wide,
        None,
    )
    .err()
    .expect("head_dim 129 must be refused");
    assert!(e.to_string().contains("head_dim 129 exceeds"), "{e}");
    assert!(supports(gpu, &wide).is_err());
    let s = shape(1, 4, 2, 1, 8);
    assert!(supports(gpu, &s).is_ok());
    let (out, qkv) = (f32s(s.out_len()), f32s(s.qkv_len()));
    // lse of the wrong length, and in the storage precision of an f16 run.
    let e = FlashAttentionForward::new(gpu, &out, &f32s(5), &qkv, &s, None)
        .err()
        .expect("must fail");
    assert!(e.to_string().contains("lse has 5 elements"), "{e}");
    let e = FlashAttentionForward::new(gpu, &out, &t(s.lse_len(), DType::U32), &qkv, &s, None)
        .err()
        .expect("must fail");
    assert!(e.to_string().contains("must be F32"), "{e}");
    // A dropout state that is not 4 u32 words.
    let bad_state = f32s(4);
    let drop = Some(FlashDropout {
        state: &bad_state,
        site: 0,
    });
    let lse = f32s(s.lse_len());
    let e = FlashAttentionForward::new(gpu, &out, &lse, &qkv, &s, drop)
        .err()
        .expect("must fail");
    assert!(e.to_string().contains("dropout state"), "{e}");
    // The backward must not write into its own input.
    let dout = f32s(s.out_len());
    let e = FlashAttentionBackward::new(gpu, &qkv, &dout, &qkv, &out, &lse, &s, None)
        .err()
        .expect("must fail");
    assert!(e.to_string().contains("written and also passed"), "{e}");
    // n_kv_head not dividing n_head.
    let odd = shape(1, 4, 3, 2, 8);
    assert!(supports(gpu, &odd).is_err());
}
