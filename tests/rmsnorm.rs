//! The rmsnorm family against the CPU reference on awkward shapes in both precisions and both row
//! layouts, the CPU backward against finite differences (and the checker failing on wrong
//! gradients), determinism of the weight-gradient reduction, and errors.

mod common;

use common::gradcheck::{GradCheck, check_gradient, weighted_sum};
use common::{Tolerance, assert_close, assert_overflow_rows, gpu, overflow_rows, random, round_to};
use kiln::cpu::rmsnorm as cpu;
use kiln::gpu::DType;
use kiln::kernels::RowKernel;
use kiln::kernels::rmsnorm::{RmsNormBackward, RmsNormForward, rmsnorm_backward, rmsnorm_forward};
use kiln::ops::RmsNormSpec;
use kiln::{Gpu, GpuTensor, Precision};

/// Rows: one (a single position, T = 1), a few, and more than the 32-row blocks of the weight
/// reduction (130 = 4 full blocks + 2). Channels: one, a few, prime, just over a 128-wide tile,
/// and just over 3 × 256 (the workgroup layout's stride).
const ROWS: &[usize] = &[1, 7, 130];
const CHANNELS: &[usize] = &[1, 3, 67, 129, 769];

/// Forward tolerances. Inputs are uniform in [-1, 1) plus a per-row offset up to ±2 (so rows
/// differ in scale), weights in [0.5, 1.5); |n| = |x·rstd| ≤ √C and typically ~1.
/// - f32: the CPU sums x² in f64, the GPU in f32 (strided, then a tree, or in channel order),
///   a relative error of a few ulp in mean(x²), halved by the square root, plus inverseSqrt's
///   own ≤ 2 ulp: rstd differs by a few 1e-7 relative, and so does every output. 1e-5
///   relative plus 1e-6 absolute (for outputs near 0) covers it with margin; a wrong formula
///   (layer norm's mean subtraction, a missing eps, a 1/C slip) is off by 1e-2 or more.
/// - f16: the CPU sees the same f16 inputs; the output's rounding to f16 is at most one f16 ulp
///   (2^-10 ≈ 9.8e-4 relative, even for a driver that truncates) on top of the f32 effects:
///   1e-3 relative + 1e-6 absolute. rstd is f32 in both precisions and keeps an f32 tolerance.
fn forward_tolerance(precision: Precision) -> Tolerance {
    match precision {
        Precision::F32 => Tolerance {
            abs: 1e-6,
            rel: 1e-5,
        },
        Precision::F16 => Tolerance {
            abs: 1e-6,
            rel: 1e-3,
        },
    }
}

const RSTD_TOLERANCE: Tolerance = Tolerance {
    abs: 0.0,
    rel: 1e-5,
};

/// Backward tolerances, given identical rstd on both sides.
/// - f32: dinp = rstd·(g - n·mean(g·n)); the CPU forms the row sum in f64, the GPU in f32 (a few
///   ulp of a sum of size ~√C, i.e. an absolute error ~1e-7·√C·rstd·|n| in dinp with rstd up to
///   ~1.7 here); dweight sums up to 130 rows, in f64 on the CPU and in f32 in 32-row blocks on
///   the GPU (~√130·6e-8 relative of terms of size ~1). 1e-5 absolute + 1e-5 relative covers
///   both with margin.
/// - f16: one f16 ulp of each result (9.8e-4 relative: formed in f32 and rounded once; with
///   accumulation the f16 addend is exact in f32), plus the f32 effects above.
fn backward_tolerance(precision: Precision) -> Tolerance {
    match precision {
        Precision::F32 => Tolerance {
            abs: 1e-5,
            rel: 1e-5,
        },
        Precision::F16 => Tolerance {
            abs: 1e-5,
            rel: 1e-3,
        },
    }
}

struct Case {
    spec: RmsNormSpec,
    inp: Vec<f32>,
    weight: Vec<f32>,
    dout: Vec<f32>,
}

impl Case {
    fn new(precision: Precision, spec: RmsNormSpec, seed: u64) -> Self {
        let (rows, c) = (spec.rows, spec.channels);
        // A per-row offset: rows of different scale (rstd from ~0.4 to ~1.7).
        let inp: Vec<f32> = random(rows * c, seed)
            .iter()
            .enumerate()
            .map(|(i, v)| v + ((i / c) % 5) as f32 - 2.0)
            .collect();
        let weight: Vec<f32> = random(c, seed + 1).iter().map(|v| 1.0 + 0.5 * v).collect();
        Case {
            spec,
            inp: round_to(precision, &inp),
            weight: round_to(precision, &weight),
            dout: round_to(precision, &random(rows * c, seed + 3)),
        }
    }

    /// The CPU forward: (out, rstd).
    fn cpu_forward(&self) -> (Vec<f32>, Vec<f32>) {
        let (rows, c) = (self.spec.rows, self.spec.channels);
        let (mut out, mut rstd) = (vec![0.0; rows * c], vec![0.0; rows]);
        cpu::rmsnorm_forward(&mut out, &mut rstd, &self.inp, &self.weight, &self.spec).unwrap();
        (out, rstd)
    }
}

fn upload(gpu: &Gpu, label: &str, v: &[f32]) -> GpuTensor {
    gpu.upload(label, &[v.len()], DType::from(gpu.precision()), v)
        .unwrap()
}

fn upload_f32(gpu: &Gpu, label: &str, v: &[f32]) -> GpuTensor {
    gpu.upload(label, &[v.len()], DType::F32, v).unwrap()
}

fn forward_matches_cpu(precision: Precision) {
    let Some(gpu) = gpu(precision) else { return };
    for (i, &rows) in ROWS.iter().enumerate() {
        for (j, &c) in CHANNELS.iter().enumerate() {
            let case = Case::new(precision, RmsNormSpec::new(rows, c), (10 * i + j) as u64);
            let (want, want_rstd) = case.cpu_forward();
            let out = gpu
                .zeros("out", &[rows, c], DType::from(precision))
                .unwrap();
            let rstd = gpu.zeros("rstd", &[rows], DType::F32).unwrap();
            let (inp, w) = (
                upload(gpu, "inp", &case.inp),
                upload(gpu, "weight", &case.weight),
            );
            for kernel in RowKernel::ALL {
                RmsNormForward::with_kernel(gpu, kernel, &out, &rstd, &inp, &w, &case.spec)
                    .unwrap()
                    .run(gpu)
                    .unwrap();
                let what = format!("rmsnorm forward {kernel:?} {precision} rows={rows} C={c}");
                assert_close(
                    &what,
                    &want,
                    &gpu.read(&out).unwrap(),
                    forward_tolerance(precision),
                );
                let r = gpu.read(&rstd).unwrap();
                assert_close(&format!("{what} rstd"), &want_rstd, &r, RSTD_TOLERANCE);
            }
        }
    }
}

/// Runs the GPU backward on `case` with the CPU forward's rstd, starting the gradients from
/// `init` (dinp, dweight), and returns them.
fn gpu_backward(gpu: &Gpu, kernel: RowKernel, case: &Case, init: &[Vec<f32>; 2]) -> [Vec<f32>; 2] {
    let (_, rstd) = case.cpu_forward();
    let dinp = upload(gpu, "dinp", &init[0]);
    let dweight = upload(gpu, "dweight", &init[1]);
    RmsNormBackward::with_kernel(
        gpu,
        kernel,
        &dinp,
        &dweight,
        &upload(gpu, "dout", &case.dout),
        &upload(gpu, "inp", &case.inp),
        &upload(gpu, "weight", &case.weight),
        &upload_f32(gpu, "rstd", &rstd),
        &case.spec,
    )
    .unwrap()
    .run(gpu)
    .unwrap();
    [dinp, dweight].map(|t| gpu.read(&t).unwrap())
}

fn cpu_backward(case: &Case, init: &[Vec<f32>; 2]) -> [Vec<f32>; 2] {
    let (_, rstd) = case.cpu_forward();
    let [mut dinp, mut dweight] = init.clone();
    cpu::rmsnorm_backward(
        &mut dinp,
        &mut dweight,
        &case.dout,
        &case.inp,
        &case.weight,
        &rstd,
        &case.spec,
    )
    .unwrap();
    [dinp, dweight]
}

fn backward_matches_cpu(precision: Precision) {
    let Some(gpu) = gpu(precision) else { return };
    for (i, &rows) in ROWS.iter().enumerate() {
        for (j, &c) in CHANNELS.iter().enumerate() {
            for (k, (acc_in, acc_params)) in [(false, false), (true, true), (false, true)]
                .into_iter()
                .enumerate()
            {
                let spec = RmsNormSpec::new(rows, c)
                    .accumulate_input(acc_in)
                    .accumulate_params(acc_params);
                let seed = (100 * i + 10 * j + k) as u64;
                let case = Case::new(precision, spec, seed);
                // Non-zero starting gradients: overwriting must ignore them, accumulating add.
                let init = [
                    round_to(precision, &random(rows * c, seed + 7)),
                    round_to(precision, &random(c, seed + 8)),
                ];
                let want = cpu_backward(&case, &init);
                for kernel in RowKernel::ALL {
                    let got = gpu_backward(gpu, kernel, &case, &init);
                    for (name, (w, g)) in NAMES.iter().zip(want.iter().zip(&got)) {
                        assert_close(
                            &format!(
                                "rmsnorm backward {name} {kernel:?} {precision} rows={rows} \
                                 C={c} accumulate_input={acc_in} accumulate_params={acc_params}"
                            ),
                            w,
                            g,
                            backward_tolerance(precision),
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn forward_matches_cpu_f32() {
    forward_matches_cpu(Precision::F32);
}

#[test]
fn forward_matches_cpu_f16() {
    forward_matches_cpu(Precision::F16);
}

#[test]
fn backward_matches_cpu_f32() {
    backward_matches_cpu(Precision::F32);
}

#[test]
fn backward_matches_cpu_f16() {
    backward_matches_cpu(Precision::F16);
}

/// dweight reduces over every row in a fixed order, so two runs (of one prepared op, and of a
/// second one) agree to the bit, in both precisions.
#[test]
fn backward_is_deterministic() {
    for p in Precision::ALL {
        let Some(gpu) = gpu(p) else { continue };
        let case = Case::new(p, RmsNormSpec::new(130, 769), 77);
        let (_, rstd) = case.cpu_forward();
        let dt = DType::from(p);
        let dinp = gpu.zeros("dinp", &[130 * 769], dt).unwrap();
        let dweight = gpu.zeros("dweight", &[769], dt).unwrap();
        let (dout, inp, weight) = (
            upload(gpu, "dout", &case.dout),
            upload(gpu, "inp", &case.inp),
            upload(gpu, "weight", &case.weight),
        );
        let rstd = upload_f32(gpu, "rstd", &rstd);
        let prepare = || {
            RmsNormBackward::new(
                gpu, &dinp, &dweight, &dout, &inp, &weight, &rstd, &case.spec,
            )
            .unwrap()
        };
        let bits = |op: &RmsNormBackward| {
            op.run(gpu).unwrap();
            [&dinp, &dweight].map(|t| {
                let v = gpu.read(t).unwrap();
                v.iter().map(|f| f.to_bits()).collect::<Vec<_>>()
            })
        };
        let op = prepare();
        let first = bits(&op);
        assert!(first == bits(&op), "rmsnorm backward {p}: two runs differ");
        assert!(
            first == bits(&prepare()),
            "rmsnorm backward {p}: a second op differs"
        );
    }
}

/// Central differences of `Σ dout·rmsnorm(x)` against the CPU backward, for the input and the
/// weight, on 3 rows. Noise floor: moving one input changes its whole row of C outputs, each
/// rounded to ~6e-8·|out| (|out| ≲ 3), so the loss moves by ~√C·1e-7 of noise, which over
/// 2h = 2e-2 is ~4e-5 for C = 67. Truncation, h²/6·L''', is ~2e-5·rstd³ with rstd ≲ 2 here.
/// 1e-3 absolute + 1e-3 relative passes a right gradient and fails a gradient 10% off wherever
/// |g| > 1e-2, or one element moved by 1e-2.
const RMS_CHECK: GradCheck = GradCheck {
    h: 1e-2,
    abs: 1e-3,
    rel: 1e-3,
};

fn gradcheck_case(channels: usize) -> (Case, [Vec<f32>; 2]) {
    let spec = RmsNormSpec::new(3, channels);
    let case = Case::new(Precision::F32, spec, 500 + channels as u64);
    let zeros = [vec![0.0; 3 * channels], vec![0.0; channels]];
    let grads = cpu_backward(&case, &zeros);
    (case, grads)
}

/// `Σ dout·rmsnorm(inp, weight)` with one of the two replaced by `x`.
fn loss(case: &Case, which: usize) -> impl FnMut(&[f32]) -> f64 + '_ {
    move |x: &[f32]| {
        let mut args = [case.inp.clone(), case.weight.clone()];
        args[which] = x.to_vec();
        let (mut out, mut rstd) = (vec![0.0; args[0].len()], vec![0.0; case.spec.rows]);
        cpu::rmsnorm_forward(&mut out, &mut rstd, &args[0], &args[1], &case.spec).unwrap();
        weighted_sum(&case.dout, &out)
    }
}

const NAMES: [&str; 2] = ["dinp", "dweight"];

#[test]
fn cpu_backward_matches_finite_differences() {
    for channels in [1, 2, 5, 67] {
        let (case, grads) = gradcheck_case(channels);
        let xs = [&case.inp, &case.weight];
        for which in 0..2 {
            let what = format!("rmsnorm {} C={channels}", NAMES[which]);
            let worst = check_gradient(
                &what,
                xs[which],
                &grads[which],
                loss(&case, which),
                RMS_CHECK,
            )
            .unwrap_or_else(|e| panic!("{e}"));
            eprintln!("{what}: worst error {worst:.3} of the allowed");
        }
    }
}

#[test]
fn gradcheck_rejects_wrong_gradients() {
    let (case, grads) = gradcheck_case(67);
    let xs = [&case.inp, &case.weight];
    for which in 0..2 {
        let scaled: Vec<f32> = grads[which].iter().map(|g| 1.1 * g).collect();
        let what = format!("scaled {}", NAMES[which]);
        assert!(
            check_gradient(&what, xs[which], &scaled, loss(&case, which), RMS_CHECK).is_err(),
            "{what} passed"
        );
        let mut one_off = grads[which].clone();
        one_off[5] += 1e-2;
        let e = check_gradient(
            "one element",
            xs[which],
            &one_off,
            loss(&case, which),
            RMS_CHECK,
        )
        .expect_err("a gradient with one wrong element must fail");
        assert!(e.contains("1 of") && e.contains("index 5"), "{e}");
    }
    // The classic slip: forgetting that rstd depends on the input, i.e. dinp = rstd·dout·weight.
    let (_, rstd) = case.cpu_forward();
    let c = case.spec.channels;
    let naive: Vec<f32> = (0..case.inp.len())
        .map(|i| rstd[i / c] * case.dout[i] * case.weight[i % c])
        .collect();
    assert!(check_gradient("naive dinp", &case.inp, &naive, loss(&case, 0), RMS_CHECK).is_err());
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let gpu = gpu(Precision::F32).unwrap();
    let t = |label: &str, n: usize| gpu.zeros(label, &[n], DType::F32).unwrap();
    let spec = RmsNormSpec::new(4, 6);
    let (out, inp, rstd, w) = (t("out", 24), t("inp", 24), t("rstd", 4), t("w", 6));
    assert!(RmsNormForward::new(gpu, &out, &rstd, &inp, &w, &spec).is_ok());
    let short = t("short", 23);
    let e = RmsNormForward::new(gpu, &out, &rstd, &short, &w, &spec)
        .err()
        .expect("short input");
    assert!(e.to_string().contains("inp has 23 elements"), "{e}");
    let e = RmsNormForward::new(gpu, &out, &rstd, &inp, &rstd, &spec)
        .err()
        .expect("weight of rows elements");
    assert!(e.to_string().contains("weight has 4 elements"), "{e}");
    let e = RmsNormForward::new(gpu, &inp, &rstd, &inp, &w, &spec)
        .err()
        .expect("out aliasing inp");
    assert!(e.to_string().contains("written and also passed"), "{e}");
    let half_stats = gpu.zeros("rstd16", &[4], DType::F16).unwrap();
    let e = RmsNormForward::new(gpu, &out, &half_stats, &inp, &w, &spec)
        .err()
        .expect("f16 rstd");
    assert!(e.to_string().contains("must be F32"), "{e}");
    let half = gpu.zeros("w16", &[6], DType::F16).unwrap();
    let e = RmsNormForward::new(gpu, &out, &rstd, &inp, &half, &spec)
        .err()
        .expect("mixed precision");
    assert!(e.to_string().contains("one precision"), "{e}");
    assert!(RmsNormForward::new(gpu, &out, &rstd, &inp, &w, &RmsNormSpec::new(0, 6)).is_err());
    let e = RmsNormForward::new(gpu, &out, &rstd, &inp, &w, &spec.eps(0.0))
        .err()
        .expect("eps = 0");
    assert!(e.to_string().contains("eps"), "{e}");

    let (dinp, dw, dout) = (t("dinp", 24), t("dw", 6), t("dout", 24));
    assert!(RmsNormBackward::new(gpu, &dinp, &dw, &dout, &inp, &w, &rstd, &spec).is_ok());
    let e = RmsNormBackward::new(gpu, &dinp, &dw, &dout, &inp, &w, &w, &spec)
        .err()
        .expect("rstd of channels elements");
    assert!(e.to_string().contains("rstd has 6 elements"), "{e}");
    let e = RmsNormBackward::new(gpu, &dinp, &w, &dout, &inp, &w, &rstd, &spec)
        .err()
        .expect("dweight aliasing weight");
    assert!(e.to_string().contains("written and also passed"), "{e}");

    let mut v = vec![0.0; 24];
    let mut r = vec![0.0; 3];
    assert!(cpu::rmsnorm_forward(&mut v, &mut r, &[0.0; 24], &[1.0; 6], &spec).is_err());
    let mut dwv = vec![0.0; 5];
    assert!(
        cpu::rmsnorm_backward(
            &mut v, &mut dwv, &[0.0; 24], &[0.0; 24], &[1.0; 6], &[1.0; 4], &spec
        )
        .is_err()
    );
}

/// Exactly known results: a row of zeros gives rstd = 1/sqrt(eps) and an output and input
/// gradient of exactly 0; a row of a constant a over C channels gives n = a·rstd with
/// rstd = 1/sqrt(a² + eps). With eps = 2^-10 and a = 2^k both are exact powers-of-two sums, so
/// the results are exact in both precisions.
#[test]
fn zero_rows_and_constant_rows_are_exact() {
    for p in Precision::ALL {
        let Some(gpu) = gpu(p) else { continue };
        let c = 5;
        let spec = RmsNormSpec::new(2, c).eps(1.0 / 1024.0);
        let mut x = vec![0.0; c];
        x.extend(std::iter::repeat_n(0.5, c));
        let dt = DType::from(p);
        let (out, rstd) = (
            gpu.zeros("out", &[2 * c], dt).unwrap(),
            gpu.zeros("rstd", &[2], DType::F32).unwrap(),
        );
        let (inp, w) = (upload(gpu, "inp", &x), upload(gpu, "w", &[2.0; 5]));
        rmsnorm_forward(gpu, &out, &rstd, &inp, &w, &spec).unwrap();
        let r0 = 32.0; // 1/sqrt(2^-10)
        let r1 = 1.0 / (0.25f32 + 1.0 / 1024.0).sqrt();
        let got_r = gpu.read(&rstd).unwrap();
        assert_eq!(got_r[0], r0, "{p}");
        assert_close("rstd", &[r1], &got_r[1..], RSTD_TOLERANCE);
        let got = gpu.read(&out).unwrap();
        assert_eq!(&got[..c], &[0.0; 5], "{p}");
        let dinp = gpu.zeros("dinp", &[2 * c], dt).unwrap();
        let dw = gpu.zeros("dw", &[c], dt).unwrap();
        let dout = upload(gpu, "dout", &[1.0; 10]);
        rmsnorm_backward(gpu, &dinp, &dw, &dout, &inp, &w, &rstd, &spec).unwrap();
        let g = gpu.read(&dinp).unwrap();
        // Zero row: dinp = rstd·g = 32·2 (n = 0 kills the second term).
        assert_eq!(&g[..c], &[64.0; 5], "{p}");
        // Constant row with dout = 1: Σ g·n = C·2·n, mean = 2n, dinp = rstd·2·(1 - n²).
        let n = 0.5 * r1;
        let want = r1 * 2.0 * (1.0 - n * n);
        assert_close(
            "constant row dinp",
            &[want; 5],
            &g[c..],
            backward_tolerance(p),
        );
    }
}

/// More rows than the 65535 workgroups allowed per dimension in the workgroup-per-row layout
/// (a 2-D grid), with two channels to keep it quick on lavapipe.
#[test]
fn rows_past_workgroup_limit_f32() {
    let gpu = gpu(Precision::F32).unwrap();
    let (rows, c) = (65_600, 2);
    let case = Case::new(Precision::F32, RmsNormSpec::new(rows, c), 900);
    let (want, want_rstd) = case.cpu_forward();
    let out = gpu.zeros("out", &[rows, c], DType::F32).unwrap();
    let rstd = gpu.zeros("rstd", &[rows], DType::F32).unwrap();
    let (inp, w) = (
        upload(gpu, "inp", &case.inp),
        upload(gpu, "weight", &case.weight),
    );
    RmsNormForward::with_kernel(gpu, RowKernel::Workgroup, &out, &rstd, &inp, &w, &case.spec)
        .unwrap()
        .run(gpu)
        .unwrap();
    let tol = forward_tolerance(Precision::F32);
    assert_close("forward 65600 rows", &want, &gpu.read(&out).unwrap(), tol);
    assert_close(
        "rstd",
        &want_rstd,
        &gpu.read(&rstd).unwrap(),
        RSTD_TOLERANCE,
    );
    let zeros = [vec![0.0; rows * c], vec![0.0; c]];
    let got = gpu_backward(gpu, RowKernel::Workgroup, &case, &zeros);
    let want = cpu_backward(&case, &zeros);
    for (name, (w, g)) in NAMES.iter().zip(want.iter().zip(&got)) {
        assert_close(name, w, g, backward_tolerance(Precision::F32));
    }
}

/// A row whose mean(x²) overflows f32 (an element of 1e30) has no f32 normalisation: its rstd
/// is NaN, so the row comes out NaN for the loss checks to report, not a row of zeros. Rows
/// beside it, and a row with an element of 1e18 (whose square still fits), are unaffected.
/// f32 only: f16 storage cannot hold 1e30.
#[test]
fn overflowing_mean_square_is_nan_not_zero() {
    let Some(gpu) = gpu(Precision::F32) else {
        return;
    };
    let c = 37;
    let spec = RmsNormSpec::new(3, c);
    let x = overflow_rows(c, |i| (i % 7) as f32 * 0.1 - 0.2);
    let w = vec![1.5; c];
    let (mut want, mut want_rstd) = (vec![0.0; 3 * c], vec![0.0; 3]);
    cpu::rmsnorm_forward(&mut want, &mut want_rstd, &x, &w, &spec).unwrap();
    assert_overflow_rows(&want, c, "CPU reference");
    let (inp, wt) = (upload(gpu, "inp", &x), upload(gpu, "w", &w));
    for kernel in RowKernel::ALL {
        let out = gpu.zeros("out", &[3, c], DType::F32).unwrap();
        let rstd = gpu.zeros("rstd", &[3], DType::F32).unwrap();
        RmsNormForward::with_kernel(gpu, kernel, &out, &rstd, &inp, &wt, &spec)
            .unwrap()
            .run(gpu)
            .unwrap();
        let got = gpu.read(&out).unwrap();
        assert_overflow_rows(&got, c, &format!("{kernel:?}"));
        let r = gpu.read(&rstd).unwrap();
        assert!(r[0].is_nan() && r[1].is_nan(), "{kernel:?} rstd {r:?}");
        assert_close(
            &format!("{kernel:?} finite row"),
            &want[2 * c..],
            &got[2 * c..],
            forward_tolerance(Precision::F32),
        );
    }
}
