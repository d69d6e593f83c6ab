//! The residual family: `out = a + b` and `dst += src` (the residual backward) against the CPU
//! reference in both precisions, the backward against finite differences, a grid past the
//! 65535-workgroup limit, determinism, and errors.

mod common;

use common::gradcheck::{GradCheck, check_gradient, weighted_sum};
use common::{Tolerance, assert_close, gpu, random, round_to};
use kiln::cpu::residual as cpu;
use kiln::gpu::DType;
use kiln::kernels::residual::{AddInplace, ResidualForward, add_inplace, residual_forward};
use kiln::{Gpu, GpuTensor, Precision};

/// Tolerances. Both sides form the sum of two T values in f32 and round it once to T.
/// - f32: IEEE addition is correctly rounded (Vulkan requires it), so the results are identical:
///   zero tolerance.
/// - f16: the f32 sum is identical too; only the final conversion to f16 may round differently
///   (Vulkan leaves that conversion's rounding mode to the driver), by at most one f16 ulp,
///   2^-10 ≈ 9.8e-4 relative; 6e-8 absolute is f16's smallest subnormal, for sums near zero.
fn tolerance(precision: Precision) -> Tolerance {
    match precision {
        Precision::F32 => Tolerance { abs: 0.0, rel: 0.0 },
        Precision::F16 => Tolerance {
            abs: 6e-8,
            rel: 1e-3,
        },
    }
}

/// One element, a few, around one workgroup of 256, and many workgroups with a remainder.
const SIZES: &[usize] = &[1, 3, 255, 256, 257, 70_001];

fn upload(gpu: &Gpu, label: &str, v: &[f32]) -> GpuTensor {
    gpu.upload(label, &[v.len()], DType::from(gpu.precision()), v)
        .unwrap()
}

fn forward_matches_cpu(precision: Precision) {
    let Some(gpu) = gpu(precision) else { return };
    for (i, &n) in SIZES.iter().enumerate() {
        let a = round_to(precision, &random(n, 10 + i as u64));
        let b = round_to(precision, &random(n, 20 + i as u64));
        let out = gpu.zeros("out", &[n], DType::from(precision)).unwrap();
        residual_forward(gpu, &out, &upload(gpu, "a", &a), &upload(gpu, "b", &b)).unwrap();
        let mut want = vec![0.0; n];
        cpu::residual_forward(&mut want, &a, &b).unwrap();
        assert_close(
            &format!("residual forward {precision} n={n}"),
            &want,
            &gpu.read(&out).unwrap(),
            tolerance(precision),
        );
    }
}

fn add_inplace_matches_cpu(precision: Precision) {
    let Some(gpu) = gpu(precision) else { return };
    for (i, &n) in SIZES.iter().enumerate() {
        let dst = round_to(precision, &random(n, 30 + i as u64));
        let src = round_to(precision, &random(n, 40 + i as u64));
        let gdst = upload(gpu, "dst", &dst);
        add_inplace(gpu, &gdst, &upload(gpu, "src", &src)).unwrap();
        let mut want = dst;
        cpu::add_inplace(&mut want, &src).unwrap();
        assert_close(
            &format!("add_inplace {precision} n={n}"),
            &want,
            &gpu.read(&gdst).unwrap(),
            tolerance(precision),
        );
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
fn add_inplace_matches_cpu_f32() {
    add_inplace_matches_cpu(Precision::F32);
}

#[test]
fn add_inplace_matches_cpu_f16() {
    add_inplace_matches_cpu(Precision::F16);
}

/// One element past 65535 full workgroups of 256: the 2-D grid must reach the last element and
/// add every element exactly once (a second addition would double it).
#[test]
fn grid_past_workgroup_limit_f32() {
    let gpu = gpu(Precision::F32).unwrap();
    let n = 65_535 * 256 + 1;
    let dst: Vec<f32> = (0..n).map(|i| (i % 1000) as f32).collect();
    let src: Vec<f32> = (0..n).map(|i| (i % 7) as f32 * 0.5).collect();
    let gdst = upload(gpu, "dst", &dst);
    AddInplace::new(gpu, &gdst, &upload(gpu, "src", &src))
        .unwrap()
        .run(gpu)
        .unwrap();
    let mut want = dst;
    cpu::add_inplace(&mut want, &src).unwrap();
    assert_close(
        "add_inplace 65535·256 + 1",
        &want,
        &gpu.read(&gdst).unwrap(),
        tolerance(Precision::F32),
    );
}

#[test]
fn add_inplace_is_deterministic() {
    for p in Precision::ALL {
        let Some(gpu) = gpu(p) else { continue };
        let n = 70_001;
        let dst = round_to(p, &random(n, 50));
        let src = upload(gpu, "src", &round_to(p, &random(n, 51)));
        let gdst = upload(gpu, "dst", &dst);
        let op = AddInplace::new(gpu, &gdst, &src).unwrap();
        let bits = || {
            gpu.write(&gdst, &dst).unwrap();
            op.run(gpu).unwrap();
            let v = gpu.read(&gdst).unwrap();
            v.iter().map(|f| f.to_bits()).collect::<Vec<_>>()
        };
        let first = bits();
        assert!(first == bits(), "add_inplace {p}: two runs differ");
    }
}

/// The residual backward is `da += dout`, `db += dout` (add_inplace from zero), checked against
/// central differences of `Σ dout·(a + b)`. The loss is linear, so truncation is zero; moving one
/// input changes one f32 output, whose rounding (≤ 6e-8·2) over 2h = 2e-2 gives under 1e-5.
/// 1e-4 absolute + 1e-4 relative passes a right gradient and fails a 10% error (|dout| is up to
/// 1) or one element moved by 1e-2.
const RESIDUAL_CHECK: GradCheck = GradCheck {
    h: 1e-2,
    abs: 1e-4,
    rel: 1e-4,
};

fn residual_case() -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = 100;
    let (a, b, dout) = (random(n, 60), random(n, 61), random(n, 62));
    let mut grad = vec![0.0; n];
    cpu::add_inplace(&mut grad, &dout).unwrap();
    (a, b, dout, grad)
}

fn loss<'a>(other: &'a [f32], dout: &'a [f32]) -> impl FnMut(&[f32]) -> f64 + 'a {
    move |x: &[f32]| {
        let mut out = vec![0.0; x.len()];
        cpu::residual_forward(&mut out, x, other).unwrap();
        weighted_sum(dout, &out)
    }
}

#[test]
fn backward_matches_finite_differences() {
    let (a, b, dout, grad) = residual_case();
    // out = a + b is symmetric, so the same loss serves for either branch.
    check_gradient("residual da", &a, &grad, loss(&b, &dout), RESIDUAL_CHECK)
        .unwrap_or_else(|e| panic!("{e}"));
    check_gradient("residual db", &b, &grad, loss(&a, &dout), RESIDUAL_CHECK)
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn gradcheck_rejects_wrong_gradients() {
    let (a, b, dout, grad) = residual_case();
    let scaled: Vec<f32> = grad.iter().map(|g| 1.1 * g).collect();
    assert!(check_gradient("scaled", &a, &scaled, loss(&b, &dout), RESIDUAL_CHECK).is_err());
    let mut one_off = grad.clone();
    one_off[42] += 1e-2;
    let e = check_gradient("one element", &a, &one_off, loss(&b, &dout), RESIDUAL_CHECK)
        .expect_err("a gradient with one wrong element must fail");
    assert!(e.contains("1 of 100") && e.contains("index 42"), "{e}");
    // Splitting the gradient between the branches (half each) is the classic slip.
    let halved: Vec<f32> = grad.iter().map(|g| 0.5 * g).collect();
    assert!(check_gradient("halved", &a, &halved, loss(&b, &dout), RESIDUAL_CHECK).is_err());
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let gpu = gpu(Precision::F32).unwrap();
    let t = |label: &str, n: usize| gpu.zeros(label, &[n], DType::F32).unwrap();
    let (out, a, b, short) = (t("out", 8), t("a", 8), t("b", 8), t("short", 7));
    assert!(ResidualForward::new(gpu, &out, &a, &b).is_ok());
    let e = ResidualForward::new(gpu, &out, &a, &short)
        .err()
        .expect("lengths differ");
    assert!(e.to_string().contains("b has 7 elements"), "{e}");
    let e = ResidualForward::new(gpu, &a, &a, &b)
        .err()
        .expect("out aliasing a");
    assert!(e.to_string().contains("written and also passed"), "{e}");
    let h = gpu.zeros("h", &[8], DType::F16).unwrap();
    let e = ResidualForward::new(gpu, &out, &a, &h)
        .err()
        .expect("mixed precision");
    assert!(e.to_string().contains("one precision"), "{e}");
    let e = AddInplace::new(gpu, &a, &short)
        .err()
        .expect("lengths differ");
    assert!(e.to_string().contains("src has 7 elements"), "{e}");
    assert!(AddInplace::new(gpu, &a, &a).is_err());
    assert!(cpu::residual_forward(&mut [0.0; 2], &[0.0; 2], &[0.0; 3]).is_err());
    assert!(cpu::add_inplace(&mut [0.0; 2], &[0.0; 1]).is_err());
    assert!(cpu::add_inplace(&mut [], &[]).is_err());
}
