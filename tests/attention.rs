//! Causal self-attention: the CPU reference against finite differences, the GPU against the CPU.

mod common;

use common::gradcheck::{GradCheck, check_gradient, weighted_sum};
use common::{Tolerance, assert_close, gpu, random, round_to};
use kiln::Precision;
use kiln::cpu::attention::{attention_backward, attention_forward};
use kiln::gpu::DType;
use kiln::kernels::RowKernel;
use kiln::kernels::attention::{AttentionBackward, AttentionForward};
use kiln::ops::AttentionShape;

fn shape(batch: usize, seq: usize, channels: usize, heads: usize) -> AttentionShape {
    AttentionShape {
        batch,
        seq,
        channels,
        heads,
    }
}

/// (B, T, C, n_head): T = 1, T and C not multiples of any tile or workgroup size, one head, six
/// heads, a T larger than the 128-wide softmax workgroup.
const SHAPES: &[(usize, usize, usize, usize)] = &[
    (1, 1, 4, 1),
    (2, 17, 12, 1),
    (3, 13, 30, 6),
    (1, 67, 24, 6),
    (2, 150, 12, 2),
    // T a multiple of 4: the one-invocation-per-row softmax reads and writes vec4s.
    (2, 20, 12, 1),
    (1, 64, 24, 6),
];

fn cpu_forward(qkv: &[f32], s: &AttentionShape) -> (Vec<f32>, Vec<f32>) {
    let mut out = vec![0.0; s.batch * s.seq * s.channels];
    let mut probs = vec![0.0; s.probs_len()];
    attention_forward(&mut out, &mut probs, qkv, s).unwrap();
    (out, probs)
}

/// Central differences of L = Σ w·attention(qkv), h = 1e-2. The forward runs in f32 (L is summed
/// in f64): each output carries ~6e-8 relative rounding, and L sums up to ~4000 of them, so the
/// noise in L is a few 1e-6 and in (L+ − L−)/2h up to ~2e-4: that is the absolute tolerance. The
/// truncation error of central differences is O(h²) ≈ 1e-4 relative; 2e-3 relative leaves margin
/// and still fails a gradient that is 1% off (checked by mutating the reference while writing it).
const FD: GradCheck = GradCheck {
    h: 1e-2,
    abs: 2e-4,
    rel: 2e-3,
};

#[test]
fn cpu_backward_matches_finite_differences() {
    for &(b, t, c, h) in &SHAPES[..4] {
        let s = shape(b, t, c, h);
        let qkv = random(b * t * 3 * c, 1);
        let w = random(b * t * c, 2);
        let (_, probs) = cpu_forward(&qkv, &s);
        let mut dqkv = vec![0.0; qkv.len()];
        attention_backward(&mut dqkv, &w, &qkv, &probs, &s).unwrap();
        let loss = |x: &[f32]| weighted_sum(&w, &cpu_forward(x, &s).0);
        check_gradient(&format!("attention {s:?}"), &qkv, &dqkv, loss, FD).unwrap();
    }
}

#[test]
fn gradient_checker_rejects_a_wrong_gradient() {
    let s = shape(1, 5, 8, 2);
    let qkv = random(5 * 3 * 8, 3);
    let w = random(5 * 8, 4);
    let (_, probs) = cpu_forward(&qkv, &s);
    let mut dqkv = vec![0.0; qkv.len()];
    attention_backward(&mut dqkv, &w, &qkv, &probs, &s).unwrap();
    let loss = |x: &[f32]| weighted_sum(&w, &cpu_forward(x, &s).0);
    // Off by 10% everywhere, and separately one element off by 0.05.
    let scaled: Vec<f32> = dqkv.iter().map(|g| g * 1.1).collect();
    assert!(check_gradient("scaled", &qkv, &scaled, loss, FD).is_err());
    let mut one = dqkv.clone();
    one[0] += 0.05;
    assert!(check_gradient("one element", &qkv, &one, loss, FD).is_err());
    assert!(check_gradient("right", &qkv, &dqkv, loss, FD).is_ok());
}

/// GPU vs CPU tolerances. f32: the matmuls and softmax sum at most max(T, hs) = 150 terms of size
/// ~1 in f32 in a different order than the CPU, ~1e-6 relative; 1e-4 leaves margin. f16: scores,
/// probabilities and outputs are stored in f16 (relative rounding 2^-11 ≈ 4.9e-4 each step, three
/// to four roundings deep in the backward), so 1e-2 absolute + 1e-2 relative on O(1) values.
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
        for &(b, t, c, h) in SHAPES {
            let s = shape(b, t, c, h);
            let qkv = round_to(p, &random(b * t * 3 * c, 5));
            let dout = round_to(p, &random(b * t * c, 6));
            let (out, probs) = cpu_forward(&qkv, &s);
            // The GPU backward starts from its own stored probabilities: use those on the CPU too.
            for kernel in RowKernel::ALL {
                let g_qkv = gpu.upload("qkv", &[qkv.len()], dt, &qkv).unwrap();
                let g_out = gpu.zeros("out", &[out.len()], dt).unwrap();
                let g_probs = gpu.zeros("probs", &[probs.len()], dt).unwrap();
                AttentionForward::with_row_kernel(gpu, &g_out, &g_probs, &g_qkv, &s, None, kernel)
                    .unwrap()
                    .run(gpu)
                    .unwrap();
                let what = format!("{p} {kernel:?} {s:?}");
                assert_close(
                    &format!("probs {what}"),
                    &probs,
                    &gpu.read(&g_probs).unwrap(),
                    tolerance(p),
                );
                assert_close(
                    &format!("out {what}"),
                    &out,
                    &gpu.read(&g_out).unwrap(),
                    tolerance(p),
                );

                let gpu_probs = gpu.read(&g_probs).unwrap();
                let mut dqkv = vec![0.0; qkv.len()];
                attention_backward(&mut dqkv, &dout, &qkv, &gpu_probs, &s).unwrap();
                let g_dout = gpu.upload("dout", &[dout.len()], dt, &dout).unwrap();
                let g_dqkv = gpu.zeros("dqkv", &[qkv.len()], dt).unwrap();
                let g_dprobs = gpu.zeros("dprobs", &[probs.len()], dt).unwrap();
                let bwd = AttentionBackward::with_row_kernel(
                    gpu, &g_dqkv, &g_dprobs, &g_dout, &g_qkv, &g_probs, &s, None, kernel,
                )
                .unwrap();
                bwd.run(gpu).unwrap();
                let first = gpu.read(&g_dqkv).unwrap();
                assert_close(&format!("dqkv {what}"), &dqkv, &first, tolerance(p));
                // Determinism: the same inputs give bit-identical gradients.
                bwd.run(gpu).unwrap();
                let second = gpu.read(&g_dqkv).unwrap();
                assert!(
                    first
                        .iter()
                        .zip(&second)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "attention backward is not deterministic ({what})"
                );
            }
        }
    }
}

#[test]
fn bad_shapes_are_errors() {
    let gpu = gpu(Precision::F32).unwrap();
    let s = shape(1, 4, 10, 3); // 10 channels do not split into 3 heads
    let t = |n: usize| gpu.zeros("t", &[n], DType::F32).unwrap();
    let e = AttentionForward::new(gpu, &t(40), &t(48), &t(120), &s)
        .err()
        .expect("must fail");
    assert!(e.to_string().contains("not divisible by n_head"), "{e}");
    let s = shape(1, 4, 8, 2);
    let e = AttentionForward::new(gpu, &t(32), &t(31), &t(96), &s)
        .err()
        .expect("must fail");
    assert!(e.to_string().contains("probs has 31 elements"), "{e}");
}

/// With copies allowed (as the model's step records it, through `record_ops`), the products
/// fill the packed q, k, v, dO, probabilities and dS by buffer-to-texture copies between the
/// op's own dispatches (P·v and dq, dk read what the softmax kernels write in the middle of the
/// op), and every output is bit for bit what the packing dispatches give. The shapes have rows
/// that copies can read (head blocks of 32 and 64 floats in 256-byte aligned rows, T a multiple
/// of 64); the dispatch counts show the packing gone.
#[test]
fn copied_operands_change_no_bit() {
    use kiln::kernels::Record;
    use kiln::kernels::census;
    let Some(gpu) = gpu(Precision::F32) else {
        return;
    };
    let llvmpipe = gpu.capabilities().adapter.name.contains("llvmpipe");
    for &(b, t, c, h) in &[(2, 64, 128, 4), (1, 128, 256, 4)] {
        let s = shape(b, t, c, h);
        let qkv = random(b * t * 3 * c, 7);
        let dout = random(b * t * c, 8);
        for kernel in RowKernel::ALL {
            let what = format!("{kernel:?} {s:?}");
            let run = |copies: bool| {
                let g_qkv = gpu.upload("qkv", &[qkv.len()], DType::F32, &qkv).unwrap();
                let g_out = gpu.zeros("out", &[b * t * c], DType::F32).unwrap();
                let g_probs = gpu.zeros("probs", &[s.probs_len()], DType::F32).unwrap();
                let mut fwd = AttentionForward::with_row_kernel(
                    gpu, &g_out, &g_probs, &g_qkv, &s, None, kernel,
                )
                .unwrap();
                let g_dout = gpu
                    .upload("dout", &[dout.len()], DType::F32, &dout)
                    .unwrap();
                let g_dqkv = gpu.zeros("dqkv", &[qkv.len()], DType::F32).unwrap();
                let g_dprobs = gpu.zeros("dprobs", &[s.probs_len()], DType::F32).unwrap();
                let mut bwd = AttentionBackward::with_row_kernel(
                    gpu, &g_dqkv, &g_dprobs, &g_dout, &g_qkv, &g_probs, &s, None, kernel,
                )
                .unwrap();
                if copies {
                    fwd.allow_copies();
                    bwd.allow_copies();
                }
                let dispatches = [
                    census::recorded(gpu, |p| fwd.record_into(p)).dispatches,
                    census::recorded(gpu, |p| bwd.record_into(p)).dispatches,
                ];
                fwd.run(gpu).unwrap();
                bwd.run(gpu).unwrap();
                let read = |x| gpu.read(x).unwrap();
                (dispatches, [read(&g_out), read(&g_probs), read(&g_dqkv)])
            };
            let (packed_counts, packed) = run(false);
            let (copied_counts, copied) = run(true);
            // With copies every product is one dispatch, whichever variant the tuner chose:
            // forward two products and the softmax, backward four products and the softmax.
            assert_eq!(copied_counts, [3, 5], "{what}: dispatches with copies");
            // Without copies a texture-variant product packs both operands first (two more
            // dispatches); lavapipe's tuner picks that variant for some of these products.
            for i in 0..2 {
                let extra = packed_counts[i] - copied_counts[i];
                assert!(
                    extra % 2 == 0,
                    "{what}: {packed_counts:?} vs {copied_counts:?}"
                );
            }
            if llvmpipe {
                assert_ne!(
                    packed_counts, copied_counts,
                    "{what}: no operand was copied"
                );
            }
            for (name, (x, y)) in ["out", "probs", "dqkv"]
                .iter()
                .zip(packed.iter().zip(&copied))
            {
                let same = x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
                assert!(same, "{what}: {name} differs with copies");
            }
        }
    }
}
