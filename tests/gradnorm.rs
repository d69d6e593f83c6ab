//! The gradnorm family: norm and inf/NaN flag against the CPU reference on awkward lengths in both
//! precisions, every way a flag can be raised, and bit-identical results across runs.

mod common;

use common::{Tolerance, assert_close, gpu, random, round_to};
use kiln::gpu::DType;
use kiln::kernels::gradnorm::GradNorm;
use kiln::{Gpu, Precision};

/// Lengths: empty, one, around the workgroup size, not a multiple of anything, and a million and
/// three (977 partial sums of 1024 elements, the last one short).
const LENGTHS: &[usize] = &[0, 1, 255, 256, 257, 1000, 65_537, 1_000_003];

/// Norm tolerance. The CPU sums squares in f64; the GPU in f32 along a path of about 4 sequential
/// additions per invocation, an 8-level tree, ~4 more per invocation of the final stage and
/// another 8-level tree: at most ~24 roundings of 2^-24 on the sum, 1.4e-6 relative, half that
/// on its square root, plus the sqrt's own few ulp. rel 4e-6 is a 3x margin; abs 0 because an
/// empty buffer must give exactly 0.
const NORM_TOL: Tolerance = Tolerance {
    abs: 0.0,
    rel: 4e-6,
};

/// Uploads `grads` (already rounded to `dtype`), runs, and returns (norm, flag).
fn run(gpu: &Gpu, grads: &[f32], dtype: DType) -> (f32, u32) {
    let g = gpu.upload("grads", &[grads.len()], dtype, grads).unwrap();
    let norm = gpu.zeros("norm", &[1], DType::F32).unwrap();
    let flag = gpu.zeros("flag", &[1], DType::U32).unwrap();
    GradNorm::new(gpu, &norm, &flag, &g)
        .unwrap()
        .run(gpu)
        .unwrap();
    (gpu.read(&norm).unwrap()[0], gpu.read_u32(&flag).unwrap()[0])
}

fn cpu(grads: &[f32]) -> (f32, u32) {
    let (mut norm, mut flag) = (0.0, 0);
    kiln::cpu::gradnorm::gradnorm(&mut norm, &mut flag, grads);
    (norm, flag)
}

fn matches_cpu(p: Precision) {
    let Some(gpu) = gpu(p) else { return };
    for (i, &n) in LENGTHS.iter().enumerate() {
        let grads = round_to(p, &random(n, 40 + i as u64));
        let (norm, flag) = run(gpu, &grads, DType::from(p));
        let (want, want_flag) = cpu(&grads);
        assert_eq!(flag, want_flag, "{p} n={n}: flag");
        assert_eq!(flag, 0, "{p} n={n}: finite data must not be flagged");
        assert_close(&format!("{p} n={n} norm"), &[want], &[norm], NORM_TOL);
    }
}

#[test]
fn norm_matches_cpu_f32() {
    matches_cpu(Precision::F32);
}

#[test]
fn norm_matches_cpu_f16() {
    matches_cpu(Precision::F16);
}

/// f32 gradients whatever the device's storage precision (the optimizer's usual input).
#[test]
fn f32_gradients_on_an_f16_device() {
    let Some(gpu) = gpu(Precision::F16) else {
        return;
    };
    let grads = random(100_001, 3);
    let (norm, flag) = run(gpu, &grads, DType::F32);
    let (want, _) = cpu(&grads);
    assert_eq!(flag, 0);
    assert_close("f32 grads on the f16 device", &[want], &[norm], NORM_TOL);
}

#[test]
fn any_inf_or_nan_raises_the_flag() {
    let gpu = gpu(Precision::F32).unwrap();
    let n = 1_000_003;
    let base = random(n, 7);
    for (index, value) in [
        (0, f32::INFINITY),
        (n / 2, f32::NEG_INFINITY),
        (n - 1, f32::NAN),
        (777, -f32::NAN),
    ] {
        let mut g = base.clone();
        g[index] = value;
        let (_, flag) = run(gpu, &g, DType::F32);
        assert_eq!(flag, 1, "{value} at {index} not flagged");
        assert_eq!(cpu(&g).1, 1, "cpu reference: {value} at {index}");
    }
    // Every element finite, but the sum of squares overflows f32.
    let huge = vec![1e20f32; 300];
    assert_eq!(
        run(gpu, &huge, DType::F32).1,
        1,
        "overflowing sum not flagged"
    );
    assert_eq!(cpu(&huge).1, 1);
    // The largest finite f16 squared and summed is fine.
    let big = vec![65504.0f32; 300];
    assert_eq!(run(gpu, &big, DType::F32).1, 0);

    if let Some(gpu) = common::gpu(Precision::F16) {
        for value in [f32::INFINITY, f32::NAN, 70000.0] {
            // 70000 overflows f16 to inf on upload, as an overflowing f16 gradient would.
            let mut g = round_to(Precision::F16, &base[..1000]);
            g[999] = value;
            let (_, flag) = run(gpu, &g, DType::F16);
            assert_eq!(flag, 1, "f16: {value} not flagged");
        }
    }
}

#[test]
fn bit_identical_across_runs() {
    for p in Precision::ALL {
        let Some(gpu) = gpu(p) else { continue };
        let grads = round_to(p, &random(1_000_003, 8));
        let a = run(gpu, &grads, DType::from(p));
        let b = run(gpu, &grads, DType::from(p));
        assert_eq!(a.0.to_bits(), b.0.to_bits(), "{p}: {} vs {}", a.0, b.0);
        assert_eq!(a.1, b.1);
    }
}

#[test]
fn bad_shapes_are_errors_naming_the_op() {
    let gpu = gpu(Precision::F32).unwrap();
    let grads = gpu.zeros("grads", &[10], DType::F32).unwrap();
    let norm = gpu.zeros("norm", &[1], DType::F32).unwrap();
    let norm2 = gpu.zeros("norm2", &[2], DType::F32).unwrap();
    let flag = gpu.zeros("flag", &[1], DType::U32).unwrap();
    let float_flag = gpu.zeros("float flag", &[1], DType::F32).unwrap();
    let ids = gpu.zeros("ids", &[10], DType::U32).unwrap();
    for (r, needle) in [
        (GradNorm::new(gpu, &norm2, &flag, &grads), "norm2"),
        (GradNorm::new(gpu, &norm, &float_flag, &grads), "float flag"),
        (GradNorm::new(gpu, &norm, &flag, &ids), "ids"),
        (GradNorm::new(gpu, &norm, &flag, &norm), "passed as both"),
    ] {
        let e = r.err().expect("must be an error").to_string();
        assert!(e.starts_with("gradnorm:"), "{e}");
        assert!(e.contains(needle), "{needle:?} not in: {e}");
    }
}
