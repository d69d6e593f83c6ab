//! The activation family (GELU, tanh approximation) against the CPU reference, the CPU backward
//! against finite differences, determinism, a grid past the 65535-workgroup limit, and errors.

mod common;

use common::gradcheck::{GradCheck, check_gradient, weighted_sum};
use common::{Tolerance, assert_close, gpu, random, round_to};
use kiln::cpu::activation as cpu;
use kiln::gpu::DType;
use kiln::kernels::activation::{GeluBackward, GeluForward, gelu_backward, gelu_forward};
use kiln::{Gpu, Precision};

/// GPU against CPU, inputs in [-6, 6) plus saturating extremes.
/// - f32: both evaluate the same f32 formula; they differ only in the driver's `tanh` (WGSL and
///   Vulkan leave its precision to the implementation, typically a few 1e-7 absolute) and in
///   whether multiply-adds are fused. gelu and gelu' multiply tanh's error by at most
///   0.5·|x| ≤ 3 (and by x·du/dx ≤ ~28 in the sech² term for |x| ≤ 6), so 2e-5 absolute +
///   1e-5 relative holds with margin (the measured worst on lavapipe is a tenth of it); a wrong
///   formula is off by 1e-2 or more.
/// - f16: the CPU sees the same f16 inputs, so the difference is the output's rounding to f16,
///   at most one f16 ulp (2^-10 ≈ 9.8e-4 relative, even if the driver truncates rather than
///   rounds) on top of the f32 errors above: 1e-3 relative + 2e-5 absolute.
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

/// Where tanh saturates, overflows or would produce NaN through exp: x³ overflows f32 past
/// ~7e12, and f16 tops out at 65504.
const EXTREMES: &[f32] = &[
    0.0, -0.0, 5.0, -5.0, 10.0, -10.0, 50.0, -50.0, 1e3, -1e3, 6e4, -6e4,
];
const EXTREMES_F32_ONLY: &[f32] = &[1e13, -1e13, 3e38, -3e38];

/// Sizes: one element, a few, around one workgroup of 256, and many workgroups with a remainder.
const SIZES: &[usize] = &[1, 3, 255, 256, 257, 1000, 70_001];

fn inputs(precision: Precision, n: usize, seed: u64) -> Vec<f32> {
    let mut x: Vec<f32> = random(n, seed).iter().map(|v| 6.0 * v).collect();
    let mut extremes = EXTREMES.to_vec();
    if precision == Precision::F32 {
        extremes.extend_from_slice(EXTREMES_F32_ONLY);
    }
    for (slot, &e) in x.iter_mut().zip(&extremes) {
        *slot = e;
    }
    round_to(precision, &x)
}

fn upload(gpu: &Gpu, label: &str, v: &[f32]) -> kiln::GpuTensor {
    gpu.upload(label, &[v.len()], DType::from(gpu.precision()), v)
        .unwrap()
}

fn forward_matches_cpu(precision: Precision) {
    let Some(gpu) = gpu(precision) else { return };
    for (i, &n) in SIZES.iter().enumerate() {
        let x = inputs(precision, n, 10 + i as u64);
        let gx = upload(gpu, "inp", &x);
        let gout = gpu.zeros("out", &[n], DType::from(precision)).unwrap();
        gelu_forward(gpu, &gout, &gx).unwrap();
        let mut want = vec![0.0; n];
        cpu::gelu_forward(&mut want, &x).unwrap();
        assert_close(
            &format!("gelu forward {precision} n={n}"),
            &want,
            &gpu.read(&gout).unwrap(),
            tolerance(precision),
        );
    }
}

fn backward_matches_cpu(precision: Precision) {
    let Some(gpu) = gpu(precision) else { return };
    for (i, &n) in SIZES.iter().enumerate() {
        let x = inputs(precision, n, 20 + i as u64);
        let dout = round_to(precision, &random(n, 30 + i as u64));
        let dinp0 = round_to(precision, &random(n, 40 + i as u64));
        let (gx, gdout) = (upload(gpu, "inp", &x), upload(gpu, "dout", &dout));
        for accumulate in [false, true] {
            let gdinp = upload(gpu, "dinp", &dinp0);
            gelu_backward(gpu, &gdinp, &gdout, &gx, accumulate).unwrap();
            let mut want = dinp0.clone();
            cpu::gelu_backward(&mut want, &dout, &x, accumulate).unwrap();
            assert_close(
                &format!("gelu backward {precision} n={n} accumulate={accumulate}"),
                &want,
                &gpu.read(&gdinp).unwrap(),
                tolerance(precision),
            );
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

#[test]
fn saturated_inputs_give_exact_limits_not_nan() {
    // Past the tanh clamp the exact f32 answers are known: gelu(x) = x for large positive x and
    // (-)0 for large negative x; gelu'(x) = 1 or 0. In f32 this includes x whose cube (1e13) or
    // square (3e38) overflows, where a careless 0·inf would give NaN.
    for p in Precision::ALL {
        let Some(gpu) = gpu(p) else { continue };
        let mut x = vec![1e3, -1e3, 6e4, -6e4];
        if p == Precision::F32 {
            x.extend_from_slice(EXTREMES_F32_ONLY);
        }
        let x = round_to(p, &x);
        let n = x.len();
        let want_out: Vec<f32> = x.iter().map(|&v| if v > 0.0 { v } else { 0.0 }).collect();
        let want_grad: Vec<f32> = x.iter().map(|&v| if v > 0.0 { 1.0 } else { 0.0 }).collect();
        let gx = upload(gpu, "inp", &x);
        let out = gpu.zeros("out", &[n], DType::from(p)).unwrap();
        gelu_forward(gpu, &out, &gx).unwrap();
        assert_eq!(gpu.read(&out).unwrap(), want_out, "gpu forward {p}");
        let ones = upload(gpu, "dout", &vec![1.0; n]);
        let dinp = gpu.zeros("dinp", &[n], DType::from(p)).unwrap();
        gelu_backward(gpu, &dinp, &ones, &gx, false).unwrap();
        assert_eq!(gpu.read(&dinp).unwrap(), want_grad, "gpu backward {p}");
        let mut cpu_out = vec![0.0; n];
        cpu::gelu_forward(&mut cpu_out, &x).unwrap();
        assert_eq!(cpu_out, want_out, "cpu forward");
        let mut cpu_grad = vec![0.0; n];
        cpu::gelu_backward(&mut cpu_grad, &vec![1.0; n], &x, false).unwrap();
        assert_eq!(cpu_grad, want_grad, "cpu backward");
    }
}

/// 64·256·1536 elements (GPT-2 small's MLP activation at batch 64) need 98304 workgroups of 256,
/// over the 65535 per dimension: the 2-D grid must cover every element exactly once.
#[test]
fn grid_past_workgroup_limit_f32() {
    let gpu = gpu(Precision::F32).unwrap();
    let n: usize = 64 * 256 * 1536;
    let limit = gpu
        .capabilities()
        .limits
        .max_compute_workgroups_per_dimension as usize;
    if n.div_ceil(256) <= limit {
        eprintln!("note: adapter allows {limit} workgroups per dimension; the 1-D grid suffices");
    }
    let x: Vec<f32> = (0..n).map(|i| (i % 4099) as f32 / 512.0 - 4.0).collect();
    let gx = upload(gpu, "inp", &x);
    let gout = gpu.zeros("out", &[n], DType::F32).unwrap();
    gelu_forward(gpu, &gout, &gx).unwrap();
    let mut want = vec![0.0; n];
    cpu::gelu_forward(&mut want, &x).unwrap();
    assert_close(
        "gelu forward 25M",
        &want,
        &gpu.read(&gout).unwrap(),
        tolerance(Precision::F32),
    );
}

#[test]
fn backward_is_deterministic() {
    for p in Precision::ALL {
        let Some(gpu) = gpu(p) else { continue };
        let n = 70_001;
        let x = inputs(p, n, 50);
        let dout = round_to(p, &random(n, 51));
        let (gx, gdout) = (upload(gpu, "inp", &x), upload(gpu, "dout", &dout));
        let gdinp = gpu.zeros("dinp", &[n], DType::from(p)).unwrap();
        let op = GeluBackward::new(gpu, &gdinp, &gdout, &gx, false).unwrap();
        let bits = || {
            op.run(gpu).unwrap();
            let v = gpu.read(&gdinp).unwrap();
            v.iter().map(|f| f.to_bits()).collect::<Vec<_>>()
        };
        let first = bits();
        assert!(first == bits(), "gelu backward {p}: two runs differ");
    }
}

/// The CPU backward against central differences of `Σ dout·gelu(x)`. With h = 1e-2 the
/// truncation error h²/6·|gelu'''| is under 2e-5 (|gelu'''| ≤ 0.78 on [-4, 4)), and each loss
/// evaluation changes one f32 output, whose rounding (≤ 6e-8·|gelu|·|dout| ≤ 3e-7) divided by
/// 2h adds under 2e-5. So 1e-4 absolute + 1e-4 relative is ample for a right gradient, while a
/// gradient 10% off (error 0.1·|g|, and |g| reaches 1) or one wrong element fails it.
const GELU_CHECK: GradCheck = GradCheck {
    h: 1e-2,
    abs: 1e-4,
    rel: 1e-4,
};

fn gelu_case() -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = 200;
    let x: Vec<f32> = random(n, 60).iter().map(|v| 4.0 * v).collect();
    let dout = random(n, 61);
    let mut grad = vec![0.0; n];
    cpu::gelu_backward(&mut grad, &dout, &x, false).unwrap();
    (x, dout, grad)
}

fn gelu_loss(dout: &[f32]) -> impl FnMut(&[f32]) -> f64 + '_ {
    |x: &[f32]| {
        let mut out = vec![0.0; x.len()];
        cpu::gelu_forward(&mut out, x).unwrap();
        weighted_sum(dout, &out)
    }
}

#[test]
fn cpu_backward_matches_finite_differences() {
    let (x, dout, grad) = gelu_case();
    let worst = check_gradient("gelu dinp", &x, &grad, gelu_loss(&dout), GELU_CHECK)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("gelu gradcheck: worst error {worst:.3} of the allowed");
}

#[test]
fn gradcheck_rejects_wrong_gradients() {
    let (x, dout, grad) = gelu_case();
    let scaled: Vec<f32> = grad.iter().map(|g| 1.1 * g).collect();
    assert!(check_gradient("scaled", &x, &scaled, gelu_loss(&dout), GELU_CHECK).is_err());
    let mut one_off = grad.clone();
    one_off[17] += 1e-2;
    let e = check_gradient("one element", &x, &one_off, gelu_loss(&dout), GELU_CHECK)
        .expect_err("a gradient with one wrong element must fail");
    assert!(e.contains("1 of 200") && e.contains("index 17"), "{e}");
    // The derivative of the exact GELU (x·Φ(x)) is close to the tanh form's but not the same.
    let erf_form: Vec<f32> = x
        .iter()
        .zip(&dout)
        .map(|(&x, &d)| {
            let x = f64::from(x);
            let pdf = (-x * x / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let cdf = 0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2));
            (f64::from(d) * (cdf + x * pdf)) as f32
        })
        .collect();
    assert!(check_gradient("erf form", &x, &erf_form, gelu_loss(&dout), GELU_CHECK).is_err());
}

/// erf by Abramowitz–Stegun 7.1.26 (|error| < 1.5e-7), enough to tell the two GELU forms apart
/// (they differ by up to ~1e-3 in the derivative).
fn erf(x: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let y = 1.0 - poly * (-x * x).exp();
    if x >= 0.0 { y } else { -y }
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let gpu = gpu(Precision::F32).unwrap();
    let a = gpu.zeros("a", &[10], DType::F32).unwrap();
    let b = gpu.zeros("b", &[11], DType::F32).unwrap();
    let e = GeluForward::new(gpu, &a, &b).err().expect("lengths differ");
    assert!(e.to_string().contains("inp has 11 elements"), "{e}");
    let h = gpu.zeros("h", &[10], DType::F16).unwrap();
    let e = GeluForward::new(gpu, &a, &h)
        .err()
        .expect("mixed precision");
    assert!(e.to_string().contains("one precision"), "{e}");
    let e = GeluForward::new(gpu, &a, &a).err().expect("aliased");
    assert!(e.to_string().contains("written and also passed"), "{e}");
    let u = gpu.upload_u32("u", &[10], &[0; 10]).unwrap();
    assert!(GeluForward::new(gpu, &a, &u).is_err());
    let empty = gpu.zeros("empty", &[0], DType::F32).unwrap();
    assert!(GeluForward::new(gpu, &empty, &empty).is_err());
    let c = gpu.zeros("c", &[10], DType::F32).unwrap();
    assert!(GeluBackward::new(gpu, &a, &b, &c, false).is_err());
    assert!(GeluBackward::new(gpu, &a, &c, &a, true).is_err());
    assert!(cpu::gelu_forward(&mut [0.0; 3], &[0.0; 4]).is_err());
    assert!(cpu::gelu_backward(&mut [0.0; 3], &[0.0; 3], &[0.0; 2], false).is_err());
}
