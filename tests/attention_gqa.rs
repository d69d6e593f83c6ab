//! Grouped-query attention (n_kv_head dividing n_head; multi-query n_kv_head = 1 and multi-head
//! n_kv_head = n_head): the CPU reference against finite differences and against multi-head
//! attention on repeated key/value heads, the GPU against the CPU in both precisions and both
//! softmax row layouts, determinism of the group sums, and errors.

mod common;

use common::gradcheck::{GradCheck, check_gradient, weighted_sum};
use common::{Tolerance, assert_close, gpu, random, round_to};
use kiln::Precision;
use kiln::cpu::attention::{
    attention_backward, attention_forward, grouped_attention_backward, grouped_attention_forward,
};
use kiln::gpu::DType;
use kiln::kernels::RowKernel;
use kiln::kernels::attention::{AttentionBackward, AttentionForward};
use kiln::ops::{AttentionShape, GroupedAttentionShape};

fn shape(
    batch: usize,
    seq: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> GroupedAttentionShape {
    GroupedAttentionShape {
        batch,
        seq,
        heads,
        kv_heads,
        head_dim,
    }
}

/// (B, T, n_head, n_kv_head, head_dim): T = 1; multi-query (one kv head) with head dims 6, 10;
/// groups of 2 and 3; n_kv_head = n_head; T = 67 (prime, past a 64 tile) and head_dim 64; T = 150
/// (past the 128-wide softmax workgroup).
const SHAPES: &[(usize, usize, usize, usize, usize)] = &[
    (1, 1, 2, 1, 6),
    (2, 5, 4, 1, 6),
    (1, 13, 6, 2, 10),
    (2, 9, 6, 3, 10),
    (2, 7, 3, 3, 6),
    (1, 67, 4, 2, 64),
    (1, 150, 2, 1, 6),
];

fn cpu_forward(qkv: &[f32], s: &GroupedAttentionShape) -> (Vec<f32>, Vec<f32>) {
    let mut out = vec![0.0; s.out_len()];
    let mut probs = vec![0.0; s.probs_len()];
    grouped_attention_forward(&mut out, &mut probs, qkv, s).unwrap();
    (out, probs)
}

/// The (B, T, 3·n_head·hd) multi-head qkv with every key/value head repeated for each query head
/// of its group.
fn repeat_kv(qkv: &[f32], s: &GroupedAttentionShape) -> Vec<f32> {
    let (hd, g, w) = (s.head_dim, s.group(), s.qkv_width());
    let c = s.heads * hd;
    let mut wide = vec![0.0; s.batch * s.seq * 3 * c];
    for r in 0..s.batch * s.seq {
        let (src, dst) = (
            &qkv[r * w..(r + 1) * w],
            &mut wide[r * 3 * c..(r + 1) * 3 * c],
        );
        dst[..c].copy_from_slice(&src[..c]);
        for h in 0..s.heads {
            for part in 0..2 {
                let from = c + part * s.kv_heads * hd + (h / g) * hd;
                let to = (1 + part) * c + h * hd;
                dst[to..to + hd].copy_from_slice(&src[from..from + hd]);
            }
        }
    }
    wide
}

/// The grouped reference is multi-head attention on repeated key/value heads: the forward bit
/// for bit (same sums in the same order), and the key/value gradients are the repeated heads'
/// gradients summed over each group (to rounding: the sum's association differs).
#[test]
fn cpu_grouped_equals_multi_head_on_repeated_heads() {
    for &(b, t, nh, nkv, hd) in SHAPES {
        let s = shape(b, t, nh, nkv, hd);
        let mha = AttentionShape {
            batch: b,
            seq: t,
            channels: nh * hd,
            heads: nh,
        };
        let qkv = random(s.qkv_len(), 1);
        let wide = repeat_kv(&qkv, &s);
        let (out, probs) = cpu_forward(&qkv, &s);
        let (mut out_m, mut probs_m) = (vec![0.0; out.len()], vec![0.0; probs.len()]);
        attention_forward(&mut out_m, &mut probs_m, &wide, &mha).unwrap();
        assert_eq!(out, out_m, "{s:?} out");
        assert_eq!(probs, probs_m, "{s:?} probs");
        let dout = random(s.out_len(), 2);
        let mut dqkv = vec![0.0; qkv.len()];
        grouped_attention_backward(&mut dqkv, &dout, &qkv, &probs, &s).unwrap();
        let mut dwide = vec![0.0; wide.len()];
        attention_backward(&mut dwide, &dout, &wide, &probs, &mha).unwrap();
        // Fold the repeated heads' gradients back onto their key/value head.
        let (c, w, g) = (nh * hd, s.qkv_width(), s.group());
        let mut folded = vec![0.0f32; qkv.len()];
        for r in 0..b * t {
            folded[r * w..r * w + c].copy_from_slice(&dwide[r * 3 * c..r * 3 * c + c]);
            for h in 0..nh {
                for part in 0..2 {
                    let to = r * w + c + part * nkv * hd + (h / g) * hd;
                    let from = r * 3 * c + (1 + part) * c + h * hd;
                    for i in 0..hd {
                        folded[to + i] += dwide[from + i];
                    }
                }
            }
        }
        let tol = Tolerance {
            abs: 1e-6,
            rel: 1e-5,
        };
        assert_close(&format!("{s:?} dqkv"), &folded, &dqkv, tol);
    }
}

/// As in tests/attention.rs: h = 1e-2, noise ~2e-4 absolute in the central difference (a few
/// thousand f32 outputs summed), truncation ~1e-4 relative; 2e-3 relative still fails a gradient
/// that is 1% off.
const FD: GradCheck = GradCheck {
    h: 1e-2,
    abs: 2e-4,
    rel: 2e-3,
};

#[test]
fn cpu_backward_matches_finite_differences() {
    for &(b, t, nh, nkv, hd) in &SHAPES[..5] {
        let s = shape(b, t, nh, nkv, hd);
        let qkv = random(s.qkv_len(), 3);
        let w = random(s.out_len(), 4);
        let (_, probs) = cpu_forward(&qkv, &s);
        let mut dqkv = vec![0.0; qkv.len()];
        grouped_attention_backward(&mut dqkv, &w, &qkv, &probs, &s).unwrap();
        let loss = |x: &[f32]| weighted_sum(&w, &cpu_forward(x, &s).0);
        let worst = check_gradient(&format!("gqa {s:?}"), &qkv, &dqkv, loss, FD)
            .unwrap_or_else(|e| panic!("{e}"));
        eprintln!("gqa {s:?}: worst error {worst:.3} of the allowed");
    }
}

/// The check fails on wrong gradients: one element off, and the classic GQA slip of giving a
/// shared key/value head the gradient of only the first query head of its group (not the sum).
#[test]
fn gradient_checker_rejects_wrong_gradients() {
    let s = shape(1, 5, 4, 2, 6);
    let qkv = random(s.qkv_len(), 5);
    let w = random(s.out_len(), 6);
    let (_, probs) = cpu_forward(&qkv, &s);
    let mut dqkv = vec![0.0; qkv.len()];
    grouped_attention_backward(&mut dqkv, &w, &qkv, &probs, &s).unwrap();
    let loss = |x: &[f32]| weighted_sum(&w, &cpu_forward(x, &s).0);
    let mut one = dqkv.clone();
    one[30] += 0.05;
    assert!(check_gradient("one element", &qkv, &one, loss, FD).is_err());
    // First head of each group only: mask out the other heads' dO and recompute.
    let mut w_first = w.clone();
    for r in 0..s.batch * s.seq {
        for h in 0..s.heads {
            if h % s.group() != 0 {
                w_first[r * 24 + h * 6..r * 24 + (h + 1) * 6].fill(0.0);
            }
        }
    }
    let mut partial = vec![0.0; qkv.len()];
    grouped_attention_backward(&mut partial, &w_first, &qkv, &probs, &s).unwrap();
    let mut first_only = dqkv.clone();
    let (c, width) = (24, s.qkv_width());
    for r in 0..s.seq {
        first_only[r * width + c..(r + 1) * width]
            .copy_from_slice(&partial[r * width + c..(r + 1) * width]);
    }
    let e = check_gradient("first head only", &qkv, &first_only, loss, FD)
        .expect_err("a group's kv gradient must be the sum over its heads");
    eprintln!("{e}");
    assert!(check_gradient("right", &qkv, &dqkv, loss, FD).is_ok());
}

/// GPU vs CPU tolerances, as in tests/attention.rs. f32: sums of at most max(T, hd) = 150 terms
/// in a different order, ~1e-6 relative; the group sum of dk/dv adds at most group − 1 = 3 more
/// f32 additions: 1e-4 abs + 1e-4 rel. f16: scores, probabilities and outputs are stored in f16
/// (2^-11 relative per rounding, three to four roundings deep in the backward), and each partial
/// group sum of dk/dv is stored in f16 between the accumulating products (group − 1 more
/// roundings, at most 3 here): 1e-2 abs + 1e-2 rel on O(1) values.
fn tolerance(p: Precision) -> Tolerance {
    match p {
        Precision::F32 => Tolerance {
            abs: 1e-4,
            rel: 1e-4,
        },
        Precision::F16 => Tolerance {
            abs: 1e-2,
            rel: 1e-2,
        },
    }
}

#[test]
fn gpu_matches_cpu_forward_and_backward() {
    for p in Precision::ALL {
        let Some(gpu) = gpu(p) else { continue };
        let dt = DType::from(p);
        for &(b, t, nh, nkv, hd) in SHAPES {
            let s = shape(b, t, nh, nkv, hd);
            let qkv = round_to(p, &random(s.qkv_len(), 7));
            let dout = round_to(p, &random(s.out_len(), 8));
            let (out, probs) = cpu_forward(&qkv, &s);
            for kernel in RowKernel::ALL {
                let g_qkv = gpu.upload("qkv", &[qkv.len()], dt, &qkv).unwrap();
                let g_out = gpu.zeros("out", &[out.len()], dt).unwrap();
                let g_probs = gpu.zeros("probs", &[probs.len()], dt).unwrap();
                AttentionForward::grouped_with_row_kernel(
                    gpu, &g_out, &g_probs, &g_qkv, &s, None, kernel,
                )
                .unwrap()
                .run(gpu)
                .unwrap();
                let what = format!("{p} {kernel:?} {s:?}");
                let tol = tolerance(p);
                assert_close(
                    &format!("probs {what}"),
                    &probs,
                    &gpu.read(&g_probs).unwrap(),
                    tol,
                );
                assert_close(
                    &format!("out {what}"),
                    &out,
                    &gpu.read(&g_out).unwrap(),
                    tol,
                );
                // The backward from the GPU's own probabilities, on both sides.
                let gpu_probs = gpu.read(&g_probs).unwrap();
                let mut dqkv = vec![0.0; qkv.len()];
                grouped_attention_backward(&mut dqkv, &dout, &qkv, &gpu_probs, &s).unwrap();
                let g_dout = gpu.upload("dout", &[dout.len()], dt, &dout).unwrap();
                // Garbage in dqkv first: every element must be overwritten.
                let g_dqkv = gpu
                    .upload("dqkv", &[qkv.len()], dt, &vec![7.0; qkv.len()])
                    .unwrap();
                let g_dprobs = gpu.zeros("dprobs", &[probs.len()], dt).unwrap();
                let bwd = AttentionBackward::grouped_with_row_kernel(
                    gpu, &g_dqkv, &g_dprobs, &g_dout, &g_qkv, &g_probs, &s, None, kernel,
                )
                .unwrap();
                bwd.run(gpu).unwrap();
                let first = gpu.read(&g_dqkv).unwrap();
                assert_close(&format!("dqkv {what}"), &dqkv, &first, tol);
                bwd.run(gpu).unwrap();
                let second = gpu.read(&g_dqkv).unwrap();
                assert!(
                    first
                        .iter()
                        .zip(&second)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "grouped attention backward is not deterministic ({what})"
                );
            }
        }
    }
}

/// With n_kv_head = n_head the grouped entry points are the multi-head ones: same products, so
/// bit-identical outputs and gradients.
#[test]
fn grouped_with_one_head_per_group_is_multi_head_bit_for_bit() {
    for p in Precision::ALL {
        let Some(gpu) = gpu(p) else { continue };
        let dt = DType::from(p);
        let mha = AttentionShape {
            batch: 2,
            seq: 19,
            channels: 30,
            heads: 3,
        };
        let s: GroupedAttentionShape = mha.into();
        let qkv = round_to(p, &random(s.qkv_len(), 9));
        let dout = round_to(p, &random(s.out_len(), 10));
        let g_qkv = gpu.upload("qkv", &[qkv.len()], dt, &qkv).unwrap();
        let g_dout = gpu.upload("dout", &[dout.len()], dt, &dout).unwrap();
        let run = |grouped: bool| {
            let out = gpu.zeros("out", &[s.out_len()], dt).unwrap();
            let probs = gpu.zeros("probs", &[s.probs_len()], dt).unwrap();
            let dqkv = gpu.zeros("dqkv", &[s.qkv_len()], dt).unwrap();
            let dprobs = gpu.zeros("dprobs", &[s.probs_len()], dt).unwrap();
            if grouped {
                AttentionForward::grouped(gpu, &out, &probs, &g_qkv, &s)
                    .unwrap()
                    .run(gpu)
                    .unwrap();
                AttentionBackward::grouped(gpu, &dqkv, &dprobs, &g_dout, &g_qkv, &probs, &s)
                    .unwrap()
                    .run(gpu)
                    .unwrap();
            } else {
                AttentionForward::new(gpu, &out, &probs, &g_qkv, &mha)
                    .unwrap()
                    .run(gpu)
                    .unwrap();
                AttentionBackward::new(gpu, &dqkv, &dprobs, &g_dout, &g_qkv, &probs, &mha)
                    .unwrap()
                    .run(gpu)
                    .unwrap();
            }
            [out, probs, dqkv].map(|t| {
                let v = gpu.read(&t).unwrap();
                v.iter().map(|f| f.to_bits()).collect::<Vec<_>>()
            })
        };
        assert!(
            run(true) == run(false),
            "{p}: grouped differs from multi-head"
        );
    }
}

#[test]
fn bad_shapes_are_errors() {
    let gpu = gpu(Precision::F32).unwrap();
    let t = |n: usize| gpu.zeros("t", &[n], DType::F32).unwrap();
    // 3 kv heads do not divide 4 query heads.
    let s = shape(1, 4, 4, 3, 2);
    let e = AttentionForward::grouped(gpu, &t(32), &t(64), &t(80), &s)
        .err()
        .expect("must fail");
    assert!(e.to_string().contains("does not divide n_head"), "{e}");
    let s = shape(1, 4, 4, 2, 2);
    // qkv of (4 + 2·2)·2 = 16 per row: 64 elements.
    assert!(AttentionForward::grouped(gpu, &t(32), &t(64), &t(64), &s).is_ok());
    let e = AttentionForward::grouped(gpu, &t(32), &t(64), &t(96), &s)
        .err()
        .expect("must fail");
    assert!(e.to_string().contains("qkv has 96 elements"), "{e}");
    let e = AttentionBackward::grouped(gpu, &t(64), &t(64), &t(32), &t(64), &t(63), &s)
        .err()
        .expect("must fail");
    assert!(e.to_string().contains("probs has 63 elements"), "{e}");
    assert!(AttentionForward::grouped(gpu, &t(32), &t(64), &t(64), &shape(1, 4, 4, 0, 2)).is_err());
    let mut v = vec![0.0; 32];
    assert!(grouped_attention_forward(&mut v, &mut [0.0; 64], &[0.0; 63], &s).is_err());
}
