//! The rope family against the CPU reference in both precisions, on dense tensors and in place on
//! the q and k heads of fused qkv buffers (grouped-query shapes included), Hugging Face's
//! rotate-half convention on a hand-computed case, the decoder's one-token use at an offset, the
//! CPU backward against finite differences (and the checker failing on the wrong rotation
//! direction), and errors.

mod common;

use common::gradcheck::{GradCheck, check_gradient, weighted_sum};
use common::{Tolerance, assert_close, gpu, random, round_to};
use kiln::cpu::rope as cpu;
use kiln::gpu::DType;
use kiln::kernels::rope::{Rope, rope_backward, rope_forward};
use kiln::ops::RopeSpec;
use kiln::{Gpu, GpuTensor, Precision};

/// GPU against CPU, inputs uniform in [-1, 1) so |out| ≤ √2.
/// - f32: both form the same f32 angle `f32(pos)·inv_freq_i` (inv_freq comes from the host). The
///   CPU takes Rust's correctly range-reduced f32 sin_cos of it; the GPU reduces by 2π with a
///   three-part Cody-Waite split (error ≲ 2e-7 for the angles here, up to ~1.1e4 rad) and calls
///   the driver's sin/cos on [-π, π] (lavapipe: ~1 ulp). Each output is a·cos ∓ b·sin, so it
///   moves by at most |a| + |b| ≤ 2 times the cos/sin error, plus one or two f32 roundings
///   (fused or not). 4e-6 absolute + 1e-5 relative covers that with margin (the measured worst
///   on lavapipe, printed by the test, is 0.04 of it, angles of 1.1e4 rad included); the wrong
///   rotation direction or the interleaved-pairs convention is off by ~1e-1.
/// - f16: the CPU sees the same f16 inputs; the result is rounded to f16 once, at most one f16
///   ulp (2^-10 ≈ 9.8e-4 relative, even for a driver that truncates), on top of the f32 effects:
///   4e-6 absolute + 1e-3 relative (the absolute part also covers f16 subnormal outputs,
///   spaced 6e-8). Measured worst: 0.48 of it, i.e. half an f16 ulp (round to nearest).
fn tolerance(precision: Precision) -> Tolerance {
    match precision {
        Precision::F32 => Tolerance {
            abs: 4e-6,
            rel: 1e-5,
        },
        Precision::F16 => Tolerance {
            abs: 4e-6,
            rel: 1e-3,
        },
    }
}

/// Dense (batch, seq, heads, head_dim, first position): a single pair, T = 1, head dims 6, 10
/// and 64, a prime number of positions (67), and first positions far along (angles up to
/// ~1.1e4 rad, where the range reduction matters).
const DENSE: &[(usize, usize, usize, usize, usize)] = &[
    (1, 1, 1, 2, 0),
    (1, 1, 3, 6, 0),
    (2, 3, 3, 6, 5),
    (1, 67, 2, 10, 0),
    (2, 5, 4, 64, 0),
    (1, 3, 2, 64, 11_000),
    (3, 1, 5, 10, 4_097),
];

/// Fused qkv (batch, seq, n_head, n_kv_head, head_dim): multi-head (n_kv = n_head), grouped
/// (n_kv divides n_head) and multi-query (n_kv = 1).
const QKV: &[(usize, usize, usize, usize, usize)] = &[
    (1, 1, 1, 1, 2),
    (2, 3, 4, 4, 6),
    (1, 67, 4, 1, 10),
    (2, 7, 6, 2, 64),
    (1, 5, 3, 3, 10),
];

fn upload(gpu: &Gpu, label: &str, v: &[f32]) -> GpuTensor {
    gpu.upload(label, &[v.len()], DType::from(gpu.precision()), v)
        .unwrap()
}

/// Every spec the GPU/CPU comparisons run, with the buffer length each needs.
fn specs() -> Vec<(RopeSpec, usize)> {
    let mut out = Vec::new();
    for &(b, t, h, d, p) in DENSE {
        let spec = RopeSpec::dense(b, t, h, d).positions_from(p);
        out.push((spec, b * t * h * d));
    }
    for &(b, t, nh, nkv, d) in QKV {
        let spec = RopeSpec::qkv(b, t, nh, nkv, d);
        out.push((spec, b * t * (nh + 2 * nkv) * d));
    }
    // Llama 3's theta, and a strided view with a leading gap: only k heads, at an offset.
    out.push((
        RopeSpec::dense(2, 4, 2, 64).theta(500_000.0),
        2 * 4 * 2 * 64,
    ));
    let k_only = RopeSpec {
        offset: 4 * 10,
        heads: 2,
        ..RopeSpec::qkv(2, 3, 4, 2, 10)
    };
    out.push((k_only, 2 * 3 * 8 * 10));
    out
}

/// Runs GPU and CPU on every spec in one direction and compares the whole buffer (so elements
/// outside the selected heads must be left exactly as they were, up to the tolerance's absolute
/// term; the dedicated test below checks them bit for bit).
fn matches_cpu(precision: Precision, inverse: bool) {
    let Some(gpu) = gpu(precision) else { return };
    let tol = tolerance(precision);
    let mut worst = 0.0f32;
    for (k, (spec, len)) in specs().into_iter().enumerate() {
        let x = round_to(precision, &random(len, 40 + k as u64));
        let mut want = x.clone();
        let t = upload(gpu, "x", &x);
        if inverse {
            cpu::rope_backward(&mut want, &spec).unwrap();
            rope_backward(gpu, &t, &spec).unwrap();
        } else {
            cpu::rope_forward(&mut want, &spec).unwrap();
            rope_forward(gpu, &t, &spec).unwrap();
        }
        let got = gpu.read(&t).unwrap();
        let dir = if inverse { "backward" } else { "forward" };
        assert_close(
            &format!("rope {dir} {precision} {spec:?}"),
            &want,
            &got,
            tol,
        );
        for (w, g) in want.iter().zip(&got) {
            worst = worst.max((w - g).abs() / (tol.abs + tol.rel * w.abs()));
        }
    }
    eprintln!("rope {precision} inverse={inverse}: worst error {worst:.3} of the allowed");
}

#[test]
fn forward_matches_cpu_f32() {
    matches_cpu(Precision::F32, false);
}

#[test]
fn forward_matches_cpu_f16() {
    matches_cpu(Precision::F16, false);
}

#[test]
fn backward_matches_cpu_f32() {
    matches_cpu(Precision::F32, true);
}

#[test]
fn backward_matches_cpu_f16() {
    matches_cpu(Precision::F16, true);
}

/// In place on a fused qkv buffer, q and k heads are rotated and the v heads are left bit for
/// bit; for n_kv_head < n_head the k heads get the same angles as q heads (per position and
/// pair, not per head).
#[test]
fn fused_qkv_rotates_q_and_k_and_leaves_v() {
    for p in Precision::ALL {
        let Some(gpu) = gpu(p) else { continue };
        let (b, t, nh, nkv, d) = (2, 5, 4, 2, 10);
        let width = (nh + 2 * nkv) * d;
        let x = round_to(p, &random(b * t * width, 7));
        // Every q and k head holds the same vector: after rotation all of a row's q and k heads
        // must be identical too.
        let mut same = x.clone();
        for r in 0..b * t {
            for h in 1..nh + nkv {
                for i in 0..d {
                    same[r * width + h * d + i] = same[r * width + i];
                }
            }
        }
        let buf = upload(gpu, "qkv", &same);
        rope_forward(gpu, &buf, &RopeSpec::qkv(b, t, nh, nkv, d)).unwrap();
        let got = gpu.read(&buf).unwrap();
        for r in 0..b * t {
            let row = &got[r * width..(r + 1) * width];
            for h in 1..nh + nkv {
                assert_eq!(&row[h * d..(h + 1) * d], &row[..d], "{p} row {r} head {h}");
            }
            let v = (nh + nkv) * d;
            assert_eq!(
                &row[v..],
                &same[r * width + v..(r + 1) * width],
                "{p} v of row {r}"
            );
        }
    }
}

/// Hugging Face's rotate-half convention on a case worked by hand: head_dim 4 pairs (0, 2) and
/// (1, 3), with inv_freq = (1, theta^-1/2) = (1, 0.01). At position 1, x = (1, 0, 0, 0) becomes
/// (cos 1, 0, sin 1, 0) and x = (0, 1, 0, 0) becomes (0, cos 0.01, 0, sin 0.01). The
/// interleaved convention (pairs (0, 1), (2, 3)) would put sin 1 at index 1.
#[test]
fn rotate_half_convention_by_hand() {
    let spec = RopeSpec::dense(1, 2, 2, 4);
    let x = [
        0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, // position 0 (no rotation)
        1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, // position 1
    ];
    let (c1, s1) = 1.0f32.sin_cos();
    let (s1, c1) = (c1, s1);
    let (s2, c2) = 0.01f32.sin_cos();
    let want = [
        0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, c1, 0.0, s1, 0.0, 0.0, c2, 0.0, s2,
    ];
    let mut got = x.to_vec();
    cpu::rope_forward(&mut got, &spec).unwrap();
    let tol = tolerance(Precision::F32);
    assert_close("cpu by hand", &want, &got, tol);
    for p in Precision::ALL {
        let Some(gpu) = gpu(p) else { continue };
        let t = upload(gpu, "x", &x);
        rope_forward(gpu, &t, &spec).unwrap();
        assert_close(
            &format!("gpu by hand {p}"),
            &round_to(p, &want),
            &gpu.read(&t).unwrap(),
            tolerance(p),
        );
    }
}

/// The decoder's use: one token (T = 1) at position p, moved along with
/// `Rope::set_first_position`, gives exactly (bit for bit) row p of a full-sequence rotation,
/// on the GPU as on the CPU: both form the same f32 angle.
#[test]
fn one_token_at_an_offset_equals_that_row_of_the_sequence() {
    let (t, h, d) = (9, 3, 10);
    let width = h * d;
    let x = random(t * width, 3);
    let full_spec = RopeSpec::dense(1, t, h, d).positions_from(100);
    let mut full = x.clone();
    cpu::rope_forward(&mut full, &full_spec).unwrap();
    for p in Precision::ALL {
        let Some(gpu) = gpu(p) else { continue };
        let x = round_to(p, &x);
        let full_gpu = upload(gpu, "full", &x);
        rope_forward(gpu, &full_gpu, &full_spec).unwrap();
        let full_gpu = gpu.read(&full_gpu).unwrap();
        let one = upload(gpu, "one", &x[..width]);
        let mut op = Rope::forward(gpu, &one, &RopeSpec::dense(1, 1, h, d)).unwrap();
        for pos in 0..t {
            let row = &x[pos * width..(pos + 1) * width];
            gpu.write(&one, row).unwrap();
            op.set_first_position(gpu, 100 + pos).unwrap();
            op.run(gpu).unwrap();
            let got = gpu.read(&one).unwrap();
            assert_eq!(
                got,
                &full_gpu[pos * width..(pos + 1) * width],
                "{p} pos {pos}"
            );
            let mut cpu_one = row.to_vec();
            let spec = RopeSpec::dense(1, 1, h, d).positions_from(100 + pos);
            cpu::rope_forward(&mut cpu_one, &spec).unwrap();
            if p == Precision::F32 {
                assert_eq!(
                    cpu_one,
                    &full[pos * width..(pos + 1) * width],
                    "cpu pos {pos}"
                );
            }
        }
        assert_eq!(op.spec().first_position, 100 + t - 1);
    }
}

/// The KV-cache decoder's op, [`Rope::forward_at_step`]: the q and k heads of one fused qkv row
/// (grouped-query, head dim 6) rotated at the position in word 1 of a (token, pos) step buffer,
/// rewritten between runs of one prepared op, give exactly (bit for bit) row pos of the training
/// forward's rotation of the whole sequence, v untouched, in both precisions. Positions from 0
/// to past the sequence's end (p = 70 000 against a longer sequence's row) and a base of 5e5.
#[test]
fn rotation_at_the_decoders_step_equals_that_row_of_the_sequence() {
    let (heads, kv, d) = (6, 2, 6);
    let spec_of = |seq| RopeSpec::qkv(1, seq, heads, kv, d).theta(5e5);
    let width = (heads + 2 * kv) * d;
    for (t, positions) in [(40, vec![0, 1, 17, 39]), (70_001, vec![70_000])] {
        let x = random(t * width, 5);
        for p in Precision::ALL {
            let Some(gpu) = gpu(p) else { continue };
            let x = round_to(p, &x);
            let full = upload(gpu, "full", &x);
            rope_forward(gpu, &full, &spec_of(t)).unwrap();
            let full = gpu.read(&full).unwrap();
            let one = upload(gpu, "one", &x[..width]);
            let step = gpu.upload_u32("step", &[2], &[0, 0]).unwrap();
            let op = Rope::forward_at_step(gpu, &one, &spec_of(1), &step).unwrap();
            for &pos in &positions {
                let row = pos * width..(pos + 1) * width;
                gpu.write(&one, &x[row.clone()]).unwrap();
                gpu.write_u32(&step, &[7, pos as u32]).unwrap();
                op.run(gpu).unwrap();
                let got = gpu.read(&one).unwrap();
                assert_eq!(got, &full[row.clone()], "{p} pos {pos}");
                assert_eq!(
                    got[(heads + kv) * d..],
                    x[row][(heads + kv) * d..],
                    "{p} pos {pos}: v must be left alone"
                );
            }
        }
    }
    let gpu = gpu(Precision::F32).unwrap();
    let one = gpu.zeros("one", &[width], DType::F32).unwrap();
    for bad in [
        gpu.upload_u32("step", &[3], &[0; 3]).unwrap(),
        gpu.zeros("float step", &[2], DType::F32).unwrap(),
    ] {
        let e = Rope::forward_at_step(gpu, &one, &spec_of(1), &bad)
            .err()
            .expect("a step buffer that is not 2 u32");
        assert!(e.to_string().contains("step"), "{e}");
    }
}

/// Backward after forward gives back the input (a rotation and its inverse), on the GPU, to
/// within two roundings of the f32 arithmetic.
#[test]
fn backward_undoes_forward_f32() {
    let gpu = gpu(Precision::F32).unwrap();
    let spec = RopeSpec::qkv(2, 7, 6, 2, 64).positions_from(300);
    let x = random(2 * 7 * 10 * 64, 5);
    let t = upload(gpu, "x", &x);
    rope_forward(gpu, &t, &spec).unwrap();
    rope_backward(gpu, &t, &spec).unwrap();
    let tol = Tolerance {
        abs: 1e-6,
        rel: 1e-6,
    };
    assert_close("forward then backward", &x, &gpu.read(&t).unwrap(), tol);
}

/// RoPE is linear, so `Σ dout·rope(x)` has gradient rope_backward(dout) with respect to x. With
/// h = 1e-2 truncation is zero up to rounding (the loss is linear in every element); the noise
/// is the f32 rounding of the ~2 outputs an element touches (≤ 2·6e-8·1.4·|dout|), over 2h:
/// ~1e-5. 1e-4 absolute + 1e-4 relative passes a right gradient with margin and fails the
/// forward rotation used as the gradient (off by 2·|sin|·|g| ≳ 1e-2 for most elements) or one
/// element off by 1e-2.
const ROPE_CHECK: GradCheck = GradCheck {
    h: 1e-2,
    abs: 1e-4,
    rel: 1e-4,
};

fn gradcheck_case() -> (RopeSpec, Vec<f32>, Vec<f32>, Vec<f32>) {
    // Fused qkv with GQA, head_dim 6, positions 3..6: v's gradient is dout unchanged.
    let spec = RopeSpec::qkv(1, 3, 2, 1, 6).positions_from(3);
    let len = 3 * 4 * 6;
    let (x, dout) = (random(len, 11), random(len, 12));
    let mut grad = dout.clone();
    cpu::rope_backward(&mut grad, &spec).unwrap();
    (spec, x, dout, grad)
}

fn rope_loss<'a>(spec: &'a RopeSpec, dout: &'a [f32]) -> impl FnMut(&[f32]) -> f64 + 'a {
    move |x: &[f32]| {
        let mut y = x.to_vec();
        cpu::rope_forward(&mut y, spec).unwrap();
        weighted_sum(dout, &y)
    }
}

#[test]
fn cpu_backward_matches_finite_differences() {
    let (spec, x, dout, grad) = gradcheck_case();
    let worst = check_gradient("rope dx", &x, &grad, rope_loss(&spec, &dout), ROPE_CHECK)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("rope gradcheck: worst error {worst:.3} of the allowed");
}

#[test]
fn gradcheck_rejects_wrong_gradients() {
    let (spec, x, dout, grad) = gradcheck_case();
    // The wrong rotation direction: the forward applied to dout.
    let mut wrong = dout.clone();
    cpu::rope_forward(&mut wrong, &spec).unwrap();
    let e = check_gradient(
        "forward as gradient",
        &x,
        &wrong,
        rope_loss(&spec, &dout),
        ROPE_CHECK,
    )
    .expect_err("the forward rotation is not the gradient");
    eprintln!("{e}");
    let mut one_off = grad.clone();
    one_off[7] += 1e-2;
    let e = check_gradient(
        "one element",
        &x,
        &one_off,
        rope_loss(&spec, &dout),
        ROPE_CHECK,
    )
    .expect_err("a gradient with one wrong element must fail");
    assert!(e.contains("1 of") && e.contains("index 7"), "{e}");
    // Forgetting the rotation altogether (dx = dout).
    assert!(check_gradient("identity", &x, &dout, rope_loss(&spec, &dout), ROPE_CHECK).is_err());
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let gpu = gpu(Precision::F32).unwrap();
    let buf = gpu.zeros("x", &[2 * 3 * 8 * 10], DType::F32).unwrap();
    let ok = RopeSpec::qkv(2, 3, 4, 2, 10);
    assert!(Rope::forward(gpu, &buf, &ok).is_ok());
    let odd = RopeSpec::qkv(2, 3, 4, 2, 7);
    let e = Rope::forward(gpu, &buf, &odd).err().expect("odd head_dim");
    assert!(e.to_string().contains("head_dim = 7 is odd"), "{e}");
    assert!(matches!(e, kiln::Error::Shape { .. }));
    let e = Rope::backward(gpu, &buf, &odd).err().expect("odd head_dim");
    assert!(e.to_string().contains("is odd"), "{e}");
    let past = RopeSpec { offset: 50, ..ok };
    let e = Rope::forward(gpu, &buf, &past)
        .err()
        .expect("heads past the row");
    assert!(e.to_string().contains("past the row stride"), "{e}");
    let short = gpu
        .zeros("short", &[2 * 3 * 8 * 10 - 21], DType::F32)
        .unwrap();
    let e = Rope::forward(gpu, &short, &ok).err().expect("short buffer");
    assert!(e.to_string().contains("reaches element"), "{e}");
    // A buffer that ends right after the last k head is enough (v of the last row absent).
    let exact = gpu
        .zeros("exact", &[2 * 3 * 8 * 10 - 20], DType::F32)
        .unwrap();
    assert!(Rope::forward(gpu, &exact, &ok).is_ok());
    for bad in [
        RopeSpec::qkv(0, 3, 4, 2, 10),
        RopeSpec::qkv(2, 3, 4, 2, 0),
        ok.theta(0.0),
        ok.theta(f32::NAN),
        ok.positions_from(RopeSpec::MAX_POSITION),
    ] {
        assert!(Rope::forward(gpu, &buf, &bad).is_err(), "{bad:?}");
    }
    let u = gpu.upload_u32("u", &[480], &[0; 480]).unwrap();
    assert!(Rope::forward(gpu, &u, &ok).is_err());
    let mut op = Rope::forward(gpu, &buf, &ok).unwrap();
    assert!(op.set_first_position(gpu, RopeSpec::MAX_POSITION).is_err());
    assert_eq!(op.spec().first_position, 0);
    assert!(cpu::rope_forward(&mut [0.0; 10], &RopeSpec::dense(1, 1, 1, 5)).is_err());
    assert!(cpu::rope_backward(&mut [0.0; 10], &RopeSpec::dense(1, 2, 1, 10)).is_err());
}

/// More pairs than 65535 workgroups of 256 cover: a 2-D grid must reach every pair once.
#[test]
fn grid_past_workgroup_limit_f32() {
    let gpu = gpu(Precision::F32).unwrap();
    // 8·1024·64 heads of 32 pairs = 2^24 pairs: 65536 workgroups of 256, one past the limit,
    // in a buffer of 2^25 f32 (128 MiB, the largest binding lavapipe allows).
    let spec = RopeSpec::dense(8, 1024, 64, 64);
    let len = 8 * 1024 * 64 * 64;
    let x: Vec<f32> = (0..len).map(|i| (i % 1013) as f32 / 512.0 - 1.0).collect();
    let t = upload(gpu, "x", &x);
    rope_forward(gpu, &t, &spec).unwrap();
    let mut want = x;
    cpu::rope_forward(&mut want, &spec).unwrap();
    assert_close(
        "rope 2^24 pairs",
        &want,
        &gpu.read(&t).unwrap(),
        tolerance(Precision::F32),
    );
}
