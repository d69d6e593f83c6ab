//! The swiglu family against the CPU reference in both precisions on awkward shapes, saturating
//! and infinite gates, the CPU backward against finite differences (and the checker failing on
//! wrong gradients, the swapped-halves layout among them), determinism, a grid past the 65535
//! workgroup limit, and errors.

mod common;

use common::gradcheck::{GradCheck, check_gradient, weighted_sum};
use common::{Tolerance, assert_close, gpu, random, round_to};
use kiln::cpu::swiglu as cpu;
use kiln::gpu::DType;
use kiln::kernels::swiglu::{SwiGluBackward, SwiGluForward, swiglu_backward, swiglu_forward};
use kiln::ops::SwiGluSpec;
use kiln::{Gpu, GpuTensor, Precision};

/// GPU against CPU, gate and up uniform in [-6, 6) (plus saturating gates), so |out| < 36.
/// - f32: both evaluate the same f32 formulas (sigmoid from exp(-|x|), never an overflow); they
///   differ in the driver's exp (WGSL leaves its precision to the implementation, typically a
///   few ulp) and in fused multiply-adds: a few 1e-7 relative on silu and on each product. In
///   dgate, silu'(g) = s·(1 + g·(1 - s)) cancels near g ≈ -1.28, where the absolute error is
///   ~|g|·|u|·|dout|·1e-7 ≲ 4e-6. 2e-5 absolute + 1e-5 relative covers both with margin (the
///   test prints the measured worst: 0.03 of it on lavapipe); a wrong formula (sigmoid for
///   silu', halves swapped) is off by 1e-1 or more.
/// - f16: the CPU sees the same f16 inputs; each output is formed in f32 and rounded once to
///   f16, at most one f16 ulp (2^-10 ≈ 9.8e-4 relative, even for a driver that truncates; with
///   accumulation the f16 addend is exact in f32), on top of the f32 effects: 2e-5 absolute +
///   1e-3 relative (measured worst 0.49 of it: half an f16 ulp).
fn tolerance(precision: Precision) -> Tolerance {
    match precision {
        Precision::F32 => Tolerance {
            abs: 2e-5,
            rel: 1e-5,
        },
        Precision::F16 => Tolerance {
            abs: 2e-5,
            rel: 1e-3,
        },
    }
}

/// Rows: one (T = 1), a few, prime, and over two 64-row tiles. Hidden: one, a few, prime, just
/// over a 128 tile, and a width not a multiple of the 256-wide workgroups.
const ROWS: &[usize] = &[1, 3, 67, 130];
const HIDDEN: &[usize] = &[1, 3, 67, 129, 1000];

/// Gates where sigmoid saturates (exp underflows, 1 - s is 0 or s is 0) within f16's range.
const SATURATING: &[f32] = &[20.0, -20.0, 100.0, -100.0, 1e3, -1e3, 6e4, -6e4];

fn inputs(precision: Precision, spec: &SwiGluSpec, seed: u64) -> Vec<f32> {
    let mut x: Vec<f32> = random(2 * spec.rows * spec.hidden, seed)
        .iter()
        .map(|v| 6.0 * v)
        .collect();
    // Saturating gates in the first row's gate half (and up = 0.5 there, so out stays finite).
    for (j, &g) in SATURATING.iter().enumerate().take(spec.hidden) {
        x[j] = g;
        x[spec.hidden + j] = 0.5;
    }
    round_to(precision, &x)
}

fn upload(gpu: &Gpu, label: &str, v: &[f32]) -> GpuTensor {
    gpu.upload(label, &[v.len()], DType::from(gpu.precision()), v)
        .unwrap()
}

fn worst(want: &[f32], got: &[f32], tol: Tolerance) -> f32 {
    want.iter()
        .zip(got)
        .map(|(w, g)| (w - g).abs() / (tol.abs + tol.rel * w.abs()))
        .fold(0.0, f32::max)
}

fn forward_matches_cpu(precision: Precision) {
    let Some(gpu) = gpu(precision) else { return };
    let tol = tolerance(precision);
    let mut w = 0.0f32;
    for (i, &rows) in ROWS.iter().enumerate() {
        for (j, &h) in HIDDEN.iter().enumerate() {
            let spec = SwiGluSpec::new(rows, h);
            let x = inputs(precision, &spec, (10 * i + j) as u64);
            let out = gpu
                .zeros("out", &[rows, h], DType::from(precision))
                .unwrap();
            swiglu_forward(gpu, &out, &upload(gpu, "inp", &x), &spec).unwrap();
            let mut want = vec![0.0; rows * h];
            cpu::swiglu_forward(&mut want, &x, &spec).unwrap();
            let got = gpu.read(&out).unwrap();
            assert_close(
                &format!("swiglu forward {precision} rows={rows} hidden={h}"),
                &want,
                &got,
                tol,
            );
            w = w.max(worst(&want, &got, tol));
        }
    }
    eprintln!("swiglu forward {precision}: worst error {w:.3} of the allowed");
}

fn backward_matches_cpu(precision: Precision) {
    let Some(gpu) = gpu(precision) else { return };
    let tol = tolerance(precision);
    let mut w = 0.0f32;
    for (i, &rows) in ROWS.iter().enumerate() {
        for (j, &h) in HIDDEN.iter().enumerate() {
            let spec = SwiGluSpec::new(rows, h);
            let seed = (100 * i + 10 * j) as u64;
            let x = inputs(precision, &spec, seed);
            let dout = round_to(precision, &random(rows * h, seed + 1));
            let init = round_to(precision, &random(2 * rows * h, seed + 2));
            let (gx, gdout) = (upload(gpu, "inp", &x), upload(gpu, "dout", &dout));
            for accumulate in [false, true] {
                let dinp = upload(gpu, "dinp", &init);
                swiglu_backward(gpu, &dinp, &gdout, &gx, &spec, accumulate).unwrap();
                let mut want = init.clone();
                cpu::swiglu_backward(&mut want, &dout, &x, &spec, accumulate).unwrap();
                let got = gpu.read(&dinp).unwrap();
                assert_close(
                    &format!(
                        "swiglu backward {precision} rows={rows} hidden={h} \
                         accumulate={accumulate}"
                    ),
                    &want,
                    &got,
                    tol,
                );
                w = w.max(worst(&want, &got, tol));
            }
        }
    }
    eprintln!("swiglu backward {precision}: worst error {w:.3} of the allowed");
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

/// Exactly known limits, with up = 1 and dout = 1: for large positive gates silu(g) = g and
/// silu'(g) = 1 exactly in f32 (1 - s is under half an ulp of 1 past g ≈ 17); for large negative
/// gates both are exactly 0. In f32 also gates of ±1e30 and ±inf: exp(-|g|) is 0, and the
/// 0·inf products are replaced by their limit rather than giving NaN.
#[test]
fn saturated_and_infinite_gates_give_exact_limits() {
    for p in Precision::ALL {
        let Some(gpu) = gpu(p) else { continue };
        let mut gates = vec![20.0, -20.0, 1e3, -1e3, 6e4, -6e4];
        if p == Precision::F32 {
            gates.extend_from_slice(&[1e30, -1e30, f32::INFINITY, f32::NEG_INFINITY]);
        }
        // -20 is not saturated in the forward: silu(-20) = -20·e^-20 ≈ -4e-8; only check it's
        // tiny, so it is left out of the exact lists below.
        let h = gates.len();
        let spec = SwiGluSpec::new(1, h);
        let mut x = gates.clone();
        x.extend(std::iter::repeat_n(1.0, h));
        let x = round_to(p, &x);
        let pos = |g: f32, v: f32| if g > 0.0 { v } else { 0.0 };
        let want_out: Vec<f32> = gates.iter().map(|&g| pos(g, g)).collect();
        let mut want_grad: Vec<f32> = gates.iter().map(|&g| pos(g, 1.0)).collect();
        want_grad.extend(want_out.iter());
        let out = gpu.zeros("out", &[h], DType::from(p)).unwrap();
        let gx = upload(gpu, "inp", &x);
        swiglu_forward(gpu, &out, &gx, &spec).unwrap();
        let dinp = gpu.zeros("dinp", &[2 * h], DType::from(p)).unwrap();
        swiglu_backward(
            gpu,
            &dinp,
            &upload(gpu, "dout", &vec![1.0; h]),
            &gx,
            &spec,
            false,
        )
        .unwrap();
        let (mut cpu_out, mut cpu_grad) = (vec![0.0; h], vec![0.0; 2 * h]);
        cpu::swiglu_forward(&mut cpu_out, &x, &spec).unwrap();
        cpu::swiglu_backward(&mut cpu_grad, &vec![1.0; h], &x, &spec, false).unwrap();
        for (what, want, got) in [
            ("gpu forward", &want_out, gpu.read(&out).unwrap()),
            ("gpu backward", &want_grad, gpu.read(&dinp).unwrap()),
            ("cpu forward", &want_out, cpu_out),
            ("cpu backward", &want_grad, cpu_grad),
        ] {
            for (k, (w, g)) in want.iter().zip(&got).enumerate() {
                let g_in = gates[k % h];
                if g_in == -20.0 {
                    assert!(g.abs() < 1e-6 && !g.is_nan(), "{what} {p} gate -20: {g}");
                } else {
                    assert_eq!(w, g, "{what} {p} element {k} (gate {g_in})");
                }
            }
        }
    }
}

#[test]
fn backward_is_deterministic() {
    for p in Precision::ALL {
        let Some(gpu) = gpu(p) else { continue };
        let spec = SwiGluSpec::new(130, 1000);
        let x = inputs(p, &spec, 50);
        let dout = round_to(p, &random(130 * 1000, 51));
        let (gx, gdout) = (upload(gpu, "inp", &x), upload(gpu, "dout", &dout));
        let dinp = gpu
            .zeros("dinp", &[2 * 130 * 1000], DType::from(p))
            .unwrap();
        let op = SwiGluBackward::new(gpu, &dinp, &gdout, &gx, &spec, false).unwrap();
        let bits = || {
            op.run(gpu).unwrap();
            let v = gpu.read(&dinp).unwrap();
            v.iter().map(|f| f.to_bits()).collect::<Vec<_>>()
        };
        let first = bits();
        assert!(first == bits(), "swiglu backward {p}: two runs differ");
    }
}

/// The CPU backward against central differences of `Σ dout·swiglu(inp)`, gate and up in
/// [-4, 4). With h = 1e-2 the truncation error h²/6·|L'''| is under 2e-5 (L is linear in up,
/// and |dout·up·silu'''| ≤ 4·0.5); each loss evaluation changes one f32 output, whose rounding
/// (≤ 6e-8·|out| ≤ 1e-6, twice) over 2h adds at most 1e-4. So 2e-4 absolute + 1e-4 relative
/// passes a right gradient (measured worst: 0.07 of it), while one element off by 1e-2, the
/// halves swapped or sigmoid used for silu' fail it.
const SWIGLU_CHECK: GradCheck = GradCheck {
    h: 1e-2,
    abs: 2e-4,
    rel: 1e-4,
};

fn gradcheck_case() -> (SwiGluSpec, Vec<f32>, Vec<f32>, Vec<f32>) {
    let spec = SwiGluSpec::new(3, 17);
    let x: Vec<f32> = random(2 * 3 * 17, 60).iter().map(|v| 4.0 * v).collect();
    let dout = random(3 * 17, 61);
    let mut grad = vec![0.0; x.len()];
    cpu::swiglu_backward(&mut grad, &dout, &x, &spec, false).unwrap();
    (spec, x, dout, grad)
}

fn swiglu_loss<'a>(spec: &'a SwiGluSpec, dout: &'a [f32]) -> impl FnMut(&[f32]) -> f64 + 'a {
    move |x: &[f32]| {
        let mut out = vec![0.0; dout.len()];
        cpu::swiglu_forward(&mut out, x, spec).unwrap();
        weighted_sum(dout, &out)
    }
}

#[test]
fn cpu_backward_matches_finite_differences() {
    let (spec, x, dout, grad) = gradcheck_case();
    let worst = check_gradient(
        "swiglu dinp",
        &x,
        &grad,
        swiglu_loss(&spec, &dout),
        SWIGLU_CHECK,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("swiglu gradcheck: worst error {worst:.3} of the allowed");
}

#[test]
fn gradcheck_rejects_wrong_gradients() {
    let (spec, x, dout, grad) = gradcheck_case();
    let h = spec.hidden;
    let check = |what: &str, g: &[f32]| {
        check_gradient(what, &x, g, swiglu_loss(&spec, &dout), SWIGLU_CHECK)
    };
    let mut one_off = grad.clone();
    one_off[20] += 1e-2;
    let e = check("one element", &one_off).expect_err("one wrong element must fail");
    assert!(e.contains("1 of") && e.contains("index 20"), "{e}");
    // The halves swapped: dup written where dgate belongs (the up-first layout).
    let swapped: Vec<f32> = grad
        .chunks_exact(2 * h)
        .flat_map(|row| row[h..].iter().chain(&row[..h]).copied())
        .collect();
    assert!(check("halves swapped", &swapped).is_err());
    // sigmoid(g) instead of silu'(g) in dgate.
    let mut sigmoid_slip = grad.clone();
    for r in 0..spec.rows {
        for j in 0..h {
            let (g, u) = (x[r * 2 * h + j], x[r * 2 * h + h + j]);
            sigmoid_slip[r * 2 * h + j] = dout[r * h + j] * u * cpu::sigmoid_pair(g).0;
        }
    }
    assert!(check("sigmoid for silu'", &sigmoid_slip).is_err());
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let gpu = gpu(Precision::F32).unwrap();
    let t = |label: &str, n: usize| gpu.zeros(label, &[n], DType::F32).unwrap();
    let spec = SwiGluSpec::new(3, 5);
    let (inp, out, dout, dinp) = (t("inp", 30), t("out", 15), t("dout", 15), t("dinp", 30));
    assert!(SwiGluForward::new(gpu, &out, &inp, &spec).is_ok());
    let e = SwiGluForward::new(gpu, &out, &out, &spec)
        .err()
        .expect("input of one half");
    assert!(e.to_string().contains("inp has 15 elements"), "{e}");
    let e = SwiGluForward::new(gpu, &inp, &inp, &spec)
        .err()
        .expect("output of both halves");
    assert!(e.to_string().contains("out has 30 elements"), "{e}");
    let h = gpu.zeros("h", &[30], DType::F16).unwrap();
    let e = SwiGluForward::new(gpu, &out, &h, &spec)
        .err()
        .expect("mixed precision");
    assert!(e.to_string().contains("one precision"), "{e}");
    assert!(SwiGluForward::new(gpu, &out, &inp, &SwiGluSpec::new(0, 5)).is_err());
    assert!(SwiGluBackward::new(gpu, &dinp, &dout, &inp, &spec, false).is_ok());
    let e = SwiGluBackward::new(gpu, &dinp, &dout, &dinp, &spec, true)
        .err()
        .expect("aliased");
    assert!(e.to_string().contains("written and also passed"), "{e}");
    assert!(SwiGluBackward::new(gpu, &dout, &dout, &inp, &spec, false).is_err());
    let u = gpu.upload_u32("u", &[30], &[0; 30]).unwrap();
    assert!(SwiGluForward::new(gpu, &out, &u, &spec).is_err());
    assert!(cpu::swiglu_forward(&mut [0.0; 15], &[0.0; 29], &spec).is_err());
    assert!(cpu::swiglu_backward(&mut [0.0; 30], &[0.0; 14], &[0.0; 30], &spec, false).is_err());
}

/// 4097 · 4096 outputs need 65552 workgroups of 256, over the 65535 per dimension: the 2-D grid
/// must cover each exactly once. f16 storage, so that the 2·16.8M-element input fits one binding
/// (128 MiB on lavapipe).
#[test]
fn grid_past_workgroup_limit_f16() {
    let Some(gpu) = gpu(Precision::F16) else {
        return;
    };
    let spec = SwiGluSpec::new(4097, 4096);
    let n = spec.rows * spec.hidden;
    let x: Vec<f32> = (0..2 * n)
        .map(|i| (i % 4099) as f32 / 512.0 - 4.0)
        .collect();
    let x = round_to(Precision::F16, &x);
    let out = gpu.zeros("out", &[n], DType::F16).unwrap();
    swiglu_forward(gpu, &out, &upload(gpu, "inp", &x), &spec).unwrap();
    let mut want = vec![0.0; n];
    cpu::swiglu_forward(&mut want, &x, &spec).unwrap();
    assert_close(
        "swiglu forward 16.8M",
        &want,
        &gpu.read(&out).unwrap(),
        tolerance(Precision::F16),
    );
}
