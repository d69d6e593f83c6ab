//! The layernorm family against the CPU reference on awkward shapes in both precisions, the CPU
//! backward against finite differences, determinism of the parameter reduction, and errors.

mod common;

use common::gradcheck::{GradCheck, check_gradient, weighted_sum};
use common::{Tolerance, assert_close, assert_overflow_rows, gpu, overflow_rows, random, round_to};
use kiln::cpu::layernorm as cpu;
use kiln::gpu::DType;
use kiln::kernels::RowKernel;
use kiln::kernels::layernorm::{
    LayerNormBackward, LayerNormForward, layernorm_backward, layernorm_forward,
};
use kiln::ops::LayerNormSpec;
use kiln::{Gpu, GpuTensor, Precision};

/// Rows: one, a few, and more than the 32-row blocks of the parameter reduction (130 = 4 full
/// blocks + 2). Channels: one (variance 0), a few, one group of four, prime, GPT-2-ish, and just
/// over 3 × 256; the multiples of 4 (4, 384) run the four-channels-per-access entries.
const ROWS: &[usize] = &[1, 7, 130];
const CHANNELS: &[usize] = &[1, 3, 4, 67, 384, 769];

/// Forward tolerances. Inputs are uniform in [-1, 1) plus a per-row offset up to ±2, weights in
/// [0.5, 1.5), biases in [-1, 1), so outputs stay within ±(|n|·1.5 + 1) with |n| ≤ √C.
/// - f32: the CPU sums each row in f64, the GPU in f32 (C/256 strided steps, then an 8-level
///   tree), so the GPU's mean is off by a few ulp of the row's sum over C, and its inverseSqrt
///   by up to 2 ulp. That moves n by a few 1e-7 relative plus δmean·rstd absolute, with rstd up
///   to ~50 for the closest 3-channel rows: 1e-5 absolute + 1e-5 relative covers it (the measured
///   worst on lavapipe is an eighth of that); a wrong formula or a missed element is off by 1e-2
///   or more.
/// - f16: the CPU sees the same f16 inputs; the output's rounding to f16 is at most one f16 ulp
///   (2^-10 ≈ 9.8e-4 relative, even for a driver that truncates), with the f32 effects above:
///   1e-3 relative + 1e-5 absolute. mean and rstd are f32 in both precisions and keep an f32
///   tolerance.
fn forward_tolerance(precision: Precision) -> Tolerance {
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

const STATS_TOLERANCE: Tolerance = Tolerance {
    abs: 1e-6,
    rel: 1e-5,
};

/// Backward tolerances, given identical mean and rstd on both sides.
/// - f32: dinp = rstd·(g - mean(g) - n·mean(g·n)); the CPU forms the two row sums in f64, the
///   GPU in f32 (a few ulp of sums of size ~√C), then multiplies by rstd (up to ~50 for the
///   3-channel rows); dweight and dbias sum up to 130 rows, in f64 on the CPU and in f32 in
///   32-row blocks on the GPU (~√130·6e-8 relative). 1e-5 absolute + 1e-5 relative covers both;
///   the measured worst on lavapipe is under a fifth of it.
/// - f16: one f16 ulp of the result (9.8e-4 relative: each output is formed in f32 and rounded
///   once; with accumulation the f16 addend is exact in f32), plus the f32 effects above.
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
    spec: LayerNormSpec,
    inp: Vec<f32>,
    weight: Vec<f32>,
    bias: Vec<f32>,
    dout: Vec<f32>,
}

impl Case {
    fn new(precision: Precision, spec: LayerNormSpec, seed: u64) -> Self {
        let (rows, c) = (spec.rows, spec.channels);
        // A per-row offset so that the mean is not ~0: a one-pass variance would show it.
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
            bias: round_to(precision, &random(c, seed + 2)),
            dout: round_to(precision, &random(rows * c, seed + 3)),
        }
    }

    /// The CPU forward: (out, mean, rstd).
    fn cpu_forward(&self) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (rows, c) = (self.spec.rows, self.spec.channels);
        let (mut out, mut mean, mut rstd) = (vec![0.0; rows * c], vec![0.0; rows], vec![0.0; rows]);
        cpu::layernorm_forward(
            &mut out,
            &mut mean,
            &mut rstd,
            &self.inp,
            &self.weight,
            &self.bias,
            &self.spec,
        )
        .unwrap();
        (out, mean, rstd)
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
            let case = Case::new(precision, LayerNormSpec::new(rows, c), (10 * i + j) as u64);
            let (want, want_mean, want_rstd) = case.cpu_forward();
            let out = gpu
                .zeros("out", &[rows, c], DType::from(precision))
                .unwrap();
            let mean = gpu.zeros("mean", &[rows], DType::F32).unwrap();
            let rstd = gpu.zeros("rstd", &[rows], DType::F32).unwrap();
            let (inp, w, b) = (
                upload(gpu, "inp", &case.inp),
                upload(gpu, "weight", &case.weight),
                upload(gpu, "bias", &case.bias),
            );
            for kernel in RowKernel::ALL {
                LayerNormForward::with_kernel(
                    gpu, kernel, &out, &mean, &rstd, &inp, &w, &b, &case.spec,
                )
                .unwrap()
                .run(gpu)
                .unwrap();
                let what = format!("layernorm forward {kernel:?} {precision} rows={rows} C={c}");
                let tol = forward_tolerance(precision);
                assert_close(&what, &want, &gpu.read(&out).unwrap(), tol);
                let m = gpu.read(&mean).unwrap();
                assert_close(&format!("{what} mean"), &want_mean, &m, STATS_TOLERANCE);
                let r = gpu.read(&rstd).unwrap();
                assert_close(&format!("{what} rstd"), &want_rstd, &r, STATS_TOLERANCE);
            }
        }
    }
}

/// Runs the GPU backward on `case` with the CPU forward's statistics, starting the gradients
/// from `init` (dinp, dweight, dbias), and returns them.
fn gpu_backward(gpu: &Gpu, kernel: RowKernel, case: &Case, init: &[Vec<f32>; 3]) -> [Vec<f32>; 3] {
    let (_, mean, rstd) = case.cpu_forward();
    let dinp = upload(gpu, "dinp", &init[0]);
    let dweight = upload(gpu, "dweight", &init[1]);
    let dbias = upload(gpu, "dbias", &init[2]);
    LayerNormBackward::with_kernel(
        gpu,
        kernel,
        &dinp,
        &dweight,
        &dbias,
        &upload(gpu, "dout", &case.dout),
        &upload(gpu, "inp", &case.inp),
        &upload(gpu, "weight", &case.weight),
        &upload_f32(gpu, "mean", &mean),
        &upload_f32(gpu, "rstd", &rstd),
        &case.spec,
    )
    .unwrap()
    .run(gpu)
    .unwrap();
    [dinp, dweight, dbias].map(|t| gpu.read(&t).unwrap())
}

fn cpu_backward(case: &Case, init: &[Vec<f32>; 3]) -> [Vec<f32>; 3] {
    let (_, mean, rstd) = case.cpu_forward();
    let [mut dinp, mut dweight, mut dbias] = init.clone();
    cpu::layernorm_backward(
        &mut dinp,
        &mut dweight,
        &mut dbias,
        &case.dout,
        &case.inp,
        &case.weight,
        &mean,
        &rstd,
        &case.spec,
    )
    .unwrap();
    [dinp, dweight, dbias]
}

fn backward_matches_cpu(precision: Precision) {
    let Some(gpu) = gpu(precision) else { return };
    for (i, &rows) in ROWS.iter().enumerate() {
        for (j, &c) in CHANNELS.iter().enumerate() {
            for (k, (acc_in, acc_params)) in [(false, false), (true, true), (false, true)]
                .into_iter()
                .enumerate()
            {
                let spec = LayerNormSpec::new(rows, c)
                    .accumulate_input(acc_in)
                    .accumulate_params(acc_params);
                let seed = (100 * i + 10 * j + k) as u64;
                let case = Case::new(precision, spec, seed);
                // Non-zero starting gradients: overwriting must ignore them, accumulating add.
                let init = [
                    round_to(precision, &random(rows * c, seed + 7)),
                    round_to(precision, &random(c, seed + 8)),
                    round_to(precision, &random(c, seed + 9)),
                ];
                let want = cpu_backward(&case, &init);
                for kernel in RowKernel::ALL {
                    let got = gpu_backward(gpu, kernel, &case, &init);
                    for (name, (w, g)) in ["dinp", "dweight", "dbias"]
                        .iter()
                        .zip(want.iter().zip(&got))
                    {
                        assert_close(
                            &format!(
                                "layernorm backward {name} {kernel:?} {precision} rows={rows} \
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

/// The parameter gradients reduce over every row; their order is fixed by construction, so two
/// runs (of one prepared op, and of a second one) must agree to the bit, in both precisions.
#[test]
fn backward_is_deterministic() {
    for p in Precision::ALL {
        let Some(gpu) = gpu(p) else { continue };
        let case = Case::new(p, LayerNormSpec::new(130, 769), 77);
        let (_, mean, rstd) = case.cpu_forward();
        let dt = DType::from(p);
        let dinp = gpu.zeros("dinp", &[130 * 769], dt).unwrap();
        let dweight = gpu.zeros("dweight", &[769], dt).unwrap();
        let dbias = gpu.zeros("dbias", &[769], dt).unwrap();
        let (dout, inp, weight) = (
            upload(gpu, "dout", &case.dout),
            upload(gpu, "inp", &case.inp),
            upload(gpu, "weight", &case.weight),
        );
        let (mean, rstd) = (
            upload_f32(gpu, "mean", &mean),
            upload_f32(gpu, "rstd", &rstd),
        );
        let prepare = || {
            LayerNormBackward::new(
                gpu, &dinp, &dweight, &dbias, &dout, &inp, &weight, &mean, &rstd, &case.spec,
            )
            .unwrap()
        };
        let bits = |op: &LayerNormBackward| {
            op.run(gpu).unwrap();
            [&dinp, &dweight, &dbias].map(|t| {
                let v = gpu.read(t).unwrap();
                v.iter().map(|f| f.to_bits()).collect::<Vec<_>>()
            })
        };
        let op = prepare();
        let first = bits(&op);
        assert!(
            first == bits(&op),
            "layernorm backward {p}: two runs differ"
        );
        assert!(
            first == bits(&prepare()),
            "layernorm backward {p}: a second op differs"
        );
    }
}

/// Central differences of `Σ dout·layernorm(x)` against the CPU backward, for the input, the
/// weight and the bias, on 3 rows. The loss's f32 forward is the noise floor: moving one input
/// changes its whole row of C outputs, each rounded to ~6e-8·|out| (|out| ≲ 3), so the loss moves
/// by ~√C·1e-7 of noise, which over 2h = 2e-2 is ~4e-5 for C = 67. Truncation, h²/6·L''', is
/// ~2e-5·rstd³ with rstd ≲ 3 here. 1e-3 absolute + 1e-3 relative therefore passes a right
/// gradient (the measured worst is a tenth of it) and fails a gradient 10% off wherever
/// |g| > 1e-2, or one element moved by 1e-2.
const LN_CHECK: GradCheck = GradCheck {
    h: 1e-2,
    abs: 1e-3,
    rel: 1e-3,
};

fn gradcheck_case(channels: usize) -> (Case, [Vec<f32>; 3]) {
    let spec = LayerNormSpec::new(3, channels);
    let case = Case::new(Precision::F32, spec, 500 + channels as u64);
    let zeros = [
        vec![0.0; 3 * channels],
        vec![0.0; channels],
        vec![0.0; channels],
    ];
    let grads = cpu_backward(&case, &zeros);
    (case, grads)
}

/// `Σ dout·layernorm(inp, weight, bias)` with one of the three replaced by `x`.
fn loss(case: &Case, which: usize) -> impl FnMut(&[f32]) -> f64 + '_ {
    move |x: &[f32]| {
        let mut args = [case.inp.clone(), case.weight.clone(), case.bias.clone()];
        args[which] = x.to_vec();
        let n = case.spec.rows;
        let (mut out, mut mean, mut rstd) = (vec![0.0; args[0].len()], vec![0.0; n], vec![0.0; n]);
        cpu::layernorm_forward(
            &mut out, &mut mean, &mut rstd, &args[0], &args[1], &args[2], &case.spec,
        )
        .unwrap();
        weighted_sum(&case.dout, &out)
    }
}

const NAMES: [&str; 3] = ["dinp", "dweight", "dbias"];

#[test]
fn cpu_backward_matches_finite_differences() {
    for channels in [1, 2, 5, 67] {
        let (case, grads) = gradcheck_case(channels);
        let xs = [&case.inp, &case.weight, &case.bias];
        for which in 0..3 {
            let what = format!("layernorm {} C={channels}", NAMES[which]);
            let worst = check_gradient(
                &what,
                xs[which],
                &grads[which],
                loss(&case, which),
                LN_CHECK,
            )
            .unwrap_or_else(|e| panic!("{e}"));
            eprintln!("{what}: worst error {worst:.3} of the allowed");
        }
    }
}

#[test]
fn gradcheck_rejects_wrong_gradients() {
    let (case, grads) = gradcheck_case(67);
    let xs = [&case.inp, &case.weight, &case.bias];
    for which in 0..3 {
        let scaled: Vec<f32> = grads[which].iter().map(|g| 1.1 * g).collect();
        let what = format!("scaled {}", NAMES[which]);
        assert!(
            check_gradient(&what, xs[which], &scaled, loss(&case, which), LN_CHECK).is_err(),
            "{what} passed"
        );
        let mut one_off = grads[which].clone();
        one_off[5] += 1e-2;
        let e = check_gradient(
            "one element",
            xs[which],
            &one_off,
            loss(&case, which),
            LN_CHECK,
        )
        .expect_err("a gradient with one wrong element must fail");
        assert!(e.contains("index 5"), "{e}");
    }
    // The classic slip: forgetting that the mean and the variance depend on the input, i.e.
    // dinp = rstd·dout·weight alone.
    let (_, _, rstd) = case.cpu_forward();
    let c = case.spec.channels;
    let naive: Vec<f32> = (0..case.inp.len())
        .map(|i| rstd[i / c] * case.dout[i] * case.weight[i % c])
        .collect();
    assert!(check_gradient("naive dinp", &case.inp, &naive, loss(&case, 0), LN_CHECK).is_err());
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let gpu = gpu(Precision::F32).unwrap();
    let t = |label: &str, n: usize| gpu.zeros(label, &[n], DType::F32).unwrap();
    let spec = LayerNormSpec::new(4, 6);
    let (out, inp, mean, rstd, w, b) = (
        t("out", 24),
        t("inp", 24),
        t("mean", 4),
        t("rstd", 4),
        t("w", 6),
        t("b", 6),
    );
    assert!(LayerNormForward::new(gpu, &out, &mean, &rstd, &inp, &w, &b, &spec).is_ok());
    let short = t("short", 23);
    let e = LayerNormForward::new(gpu, &out, &mean, &rstd, &short, &w, &b, &spec)
        .err()
        .expect("short input");
    assert!(e.to_string().contains("inp has 23 elements"), "{e}");
    let e = LayerNormForward::new(gpu, &out, &mean, &rstd, &inp, &w, &mean, &spec)
        .err()
        .expect("bias of rows elements");
    assert!(e.to_string().contains("bias has 4 elements"), "{e}");
    let e = LayerNormForward::new(gpu, &inp, &mean, &rstd, &inp, &w, &b, &spec)
        .err()
        .expect("out aliasing inp");
    assert!(e.to_string().contains("written and also passed"), "{e}");
    let half_stats = gpu.zeros("mean16", &[4], DType::F16).unwrap();
    let e = LayerNormForward::new(gpu, &out, &half_stats, &rstd, &inp, &w, &b, &spec)
        .err()
        .expect("f16 statistics");
    assert!(e.to_string().contains("must be F32"), "{e}");
    let half = gpu.zeros("w16", &[6], DType::F16).unwrap();
    let e = LayerNormForward::new(gpu, &out, &mean, &rstd, &inp, &half, &b, &spec)
        .err()
        .expect("mixed precision");
    assert!(e.to_string().contains("one precision"), "{e}");
    let empty = LayerNormSpec::new(0, 6);
    assert!(LayerNormForward::new(gpu, &out, &mean, &rstd, &inp, &w, &b, &empty).is_err());

    let (dinp, dw, db, dout) = (t("dinp", 24), t("dw", 6), t("db", 6), t("dout", 24));
    assert!(
        LayerNormBackward::new(gpu, &dinp, &dw, &db, &dout, &inp, &w, &mean, &rstd, &spec).is_ok()
    );
    let e = LayerNormBackward::new(gpu, &dinp, &dw, &db, &dout, &inp, &w, &rstd, &w, &spec)
        .err()
        .expect("rstd of channels elements");
    assert!(e.to_string().contains("rstd has 6 elements"), "{e}");
    let e = LayerNormBackward::new(gpu, &dinp, &dw, &dw, &dout, &inp, &w, &mean, &rstd, &spec)
        .err()
        .expect("dweight aliasing dbias");
    assert!(e.to_string().contains("written and also passed"), "{e}");

    let mut v = vec![0.0; 24];
    let (mut m, mut r) = (vec![0.0; 4], vec![0.0; 3]);
    assert!(
        cpu::layernorm_forward(
            &mut v, &mut m, &mut r, &[0.0; 24], &[1.0; 6], &[0.0; 6], &spec
        )
        .is_err()
    );
    let (mut dwv, mut dbv) = (vec![0.0; 6], vec![0.0; 5]);
    assert!(
        cpu::layernorm_backward(
            &mut v, &mut dwv, &mut dbv, &[0.0; 24], &[0.0; 24], &[1.0; 6], &[0.0; 4], &[1.0; 4],
            &spec
        )
        .is_err()
    );
}

/// Rows of a single channel normalise to exactly the bias (x - mean = 0), and their input
/// gradient is exactly 0: the tree reduction over 256 invocations with 255 idle ones must not
/// pick up stale workgroup memory.
#[test]
fn single_channel_rows_are_exact() {
    for p in Precision::ALL {
        let Some(gpu) = gpu(p) else { continue };
        let spec = LayerNormSpec::new(5, 1);
        let x = round_to(p, &[3.0, -2.0, 0.5, 100.0, -7.0]);
        let (out, mean, rstd) = (
            gpu.zeros("out", &[5], DType::from(p)).unwrap(),
            gpu.zeros("mean", &[5], DType::F32).unwrap(),
            gpu.zeros("rstd", &[5], DType::F32).unwrap(),
        );
        let (inp, w, b) = (
            upload(gpu, "inp", &x),
            upload(gpu, "w", &[2.0]),
            upload(gpu, "b", &[0.25]),
        );
        layernorm_forward(gpu, &out, &mean, &rstd, &inp, &w, &b, &spec).unwrap();
        assert_eq!(gpu.read(&out).unwrap(), vec![0.25; 5], "{p}");
        assert_eq!(gpu.read(&mean).unwrap(), x, "{p}");
        let dinp = gpu.zeros("dinp", &[5], DType::from(p)).unwrap();
        let (dw, db) = (
            gpu.zeros("dw", &[1], DType::from(p)).unwrap(),
            gpu.zeros("db", &[1], DType::from(p)).unwrap(),
        );
        let dout = upload(gpu, "dout", &[1.0, 2.0, 3.0, 4.0, 5.0]);
        layernorm_backward(gpu, &dinp, &dw, &db, &dout, &inp, &w, &mean, &rstd, &spec).unwrap();
        assert_eq!(gpu.read(&dinp).unwrap(), vec![0.0; 5], "{p}");
        assert_eq!(gpu.read(&dw).unwrap(), vec![0.0], "{p}");
        assert_eq!(gpu.read(&db).unwrap(), vec![15.0], "{p}");
    }
}

/// More rows than the 65535 workgroups allowed per dimension: the forward and the input
/// gradient (in the workgroup-per-row layout) run one workgroup per row on a 2-D grid (2 × 32800 here), which must reach every row
/// exactly once. Two channels keep it to about two seconds on lavapipe.
#[test]
fn rows_past_workgroup_limit_f32() {
    let gpu = gpu(Precision::F32).unwrap();
    let (rows, c) = (65_600, 2);
    let case = Case::new(Precision::F32, LayerNormSpec::new(rows, c), 900);
    let (want, want_mean, want_rstd) = case.cpu_forward();
    let out = gpu.zeros("out", &[rows, c], DType::F32).unwrap();
    let mean = gpu.zeros("mean", &[rows], DType::F32).unwrap();
    let rstd = gpu.zeros("rstd", &[rows], DType::F32).unwrap();
    let (inp, w, b) = (
        upload(gpu, "inp", &case.inp),
        upload(gpu, "weight", &case.weight),
        upload(gpu, "bias", &case.bias),
    );
    LayerNormForward::with_kernel(
        gpu,
        RowKernel::Workgroup,
        &out,
        &mean,
        &rstd,
        &inp,
        &w,
        &b,
        &case.spec,
    )
    .unwrap()
    .run(gpu)
    .unwrap();
    let tol = forward_tolerance(Precision::F32);
    assert_close("forward 65600 rows", &want, &gpu.read(&out).unwrap(), tol);
    assert_close(
        "mean",
        &want_mean,
        &gpu.read(&mean).unwrap(),
        STATS_TOLERANCE,
    );
    assert_close(
        "rstd",
        &want_rstd,
        &gpu.read(&rstd).unwrap(),
        STATS_TOLERANCE,
    );
    let zeros = [vec![0.0; rows * c], vec![0.0; c], vec![0.0; c]];
    let got = gpu_backward(gpu, RowKernel::Workgroup, &case, &zeros);
    let want = cpu_backward(&case, &zeros);
    for (name, (w, g)) in NAMES.iter().zip(want.iter().zip(&got)) {
        assert_close(name, w, g, backward_tolerance(Precision::F32));
    }
}

/// A row whose variance overflows f32 (|x − mean| ≈ 1e30 here, squared past f32's 3.4e38) has no
/// f32 normalisation. Its rstd must be NaN, so the row comes out NaN and the loss checks report
/// it; an rstd of 0 would make it a row of `bias` that looks like data. Rows beside it, and a
/// row of plain large values (1e18, whose squares still fit), are unaffected. f32 only: f16
/// storage cannot hold 1e30 at all. 37 channels take the one-channel-per-access entries, 36 the
/// four-per-access ones.
#[test]
fn overflowing_variance_is_nan_not_zero() {
    for c in [37, 36] {
        overflowing_variance_case(c);
    }
}

fn overflowing_variance_case(c: usize) {
    let Some(gpu) = gpu(Precision::F32) else {
        return;
    };
    let spec = LayerNormSpec::new(3, c);
    let x = overflow_rows(c, |i| (i % 7) as f32 * 0.1);
    let w = vec![1.5; c];
    let b = vec![0.25; c];
    let (mut want, mut want_mean, mut want_rstd) = (vec![0.0; 3 * c], vec![0.0; 3], vec![0.0; 3]);
    cpu::layernorm_forward(&mut want, &mut want_mean, &mut want_rstd, &x, &w, &b, &spec).unwrap();
    assert_overflow_rows(&want, c, "CPU reference");
    let (inp, wt, bt) = (
        upload(gpu, "inp", &x),
        upload(gpu, "w", &w),
        upload(gpu, "b", &b),
    );
    for kernel in RowKernel::ALL {
        let out = gpu.zeros("out", &[3, c], DType::F32).unwrap();
        let mean = gpu.zeros("mean", &[3], DType::F32).unwrap();
        let rstd = gpu.zeros("rstd", &[3], DType::F32).unwrap();
        LayerNormForward::with_kernel(gpu, kernel, &out, &mean, &rstd, &inp, &wt, &bt, &spec)
            .unwrap()
            .run(gpu)
            .unwrap();
        let got = gpu.read(&out).unwrap();
        assert_overflow_rows(&got, c, &format!("{kernel:?} C={c}"));
        let r = gpu.read(&rstd).unwrap();
        assert!(
            r[0].is_nan() && r[1].is_nan(),
            "{kernel:?} C={c} rstd {r:?}"
        );
        assert_close(
            &format!("{kernel:?} C={c} finite row"),
            &want[2 * c..],
            &got[2 * c..],
            forward_tolerance(Precision::F32),
        );
    }
}
