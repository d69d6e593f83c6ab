//! Shared test helpers: one device per precision, seeded random data, tolerance checks.
#![allow(dead_code)]

pub mod gradcheck;

use kiln::{Gpu, GpuOptions, Precision, PrecisionChoice};
use rand::{RngExt, SeedableRng};
use std::sync::OnceLock;

/// The device for `precision`, opened once per test binary. f16 tests are skipped (with a note on
/// stderr) only where the adapter lacks SHADER_F16; no adapter at all is a failure, with the fix.
pub fn gpu(precision: Precision) -> Option<&'static Gpu> {
    static F32: OnceLock<Gpu> = OnceLock::new();
    static F16: OnceLock<Option<Gpu>> = OnceLock::new();
    let open = |choice| {
        Gpu::with_options(&GpuOptions {
            adapter: None,
            precision: choice,
        })
    };
    match precision {
        Precision::F32 => {
            Some(F32.get_or_init(|| open(PrecisionChoice::F32).unwrap_or_else(|e| panic!("{e}"))))
        }
        Precision::F16 => F16
            .get_or_init(|| {
                let probe = F32
                    .get_or_init(|| open(PrecisionChoice::F32).unwrap_or_else(|e| panic!("{e}")));
                if !probe.capabilities().shader_f16 {
                    eprintln!("note: adapter lacks SHADER_F16; f16 cases skipped");
                    return None;
                }
                Some(open(PrecisionChoice::F16).unwrap_or_else(|e| panic!("{e}")))
            })
            .as_ref(),
    }
}

/// Uniform values in [-1, 1) from a fixed seed.
pub fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// Rounds values through the storage precision, so the CPU reference sees exactly what the GPU
/// reads.
pub fn round_to(precision: Precision, v: &[f32]) -> Vec<f32> {
    match precision {
        Precision::F32 => v.to_vec(),
        Precision::F16 => v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect(),
    }
}

/// An absolute plus relative tolerance: |expected - actual| <= abs + rel * |expected|.
#[derive(Clone, Copy, Debug)]
pub struct Tolerance {
    pub abs: f32,
    pub rel: f32,
}

/// Checks every element and fails with the first offending index, both values, the difference
/// and the tolerance, plus how many elements failed.
pub fn assert_close(what: &str, expected: &[f32], actual: &[f32], tol: Tolerance) {
    assert_eq!(expected.len(), actual.len(), "{what}: length differs");
    let mut bad = Vec::new();
    for (i, (&e, &a)) in expected.iter().zip(actual).enumerate() {
        let diff = (e - a).abs();
        let ok = diff <= tol.abs + tol.rel * e.abs() || (e.is_nan() && a.is_nan());
        if !ok || !a.is_finite() && e.is_finite() {
            bad.push((i, e, a, diff));
        }
    }
    if let Some(&(i, e, a, diff)) = bad.first() {
        panic!(
            "{what}: {} of {} elements out of tolerance; first at index {i}: expected {e}, actual {a}, \
             difference {diff:e}, allowed {:e} (abs {:e} + rel {:e})",
            bad.len(),
            expected.len(),
            tol.abs + tol.rel * e.abs(),
            tol.abs,
            tol.rel
        );
    }
}

/// Three rows of `c` values `base(i)` for the norms' overflow tests, with 1e30 in row 0 and
/// -1e30 in row 1 (their variance and mean square overflow f32) and 1e18 in row 2 (whose square
/// still fits).
pub fn overflow_rows(c: usize, base: impl Fn(usize) -> f32) -> Vec<f32> {
    let mut x: Vec<f32> = (0..3 * c).map(base).collect();
    x[3] = 1e30;
    x[c + 5] = -1e30;
    x[2 * c + 1] = 1e18;
    x
}

/// A norm's output for [`overflow_rows`]: rows 0 and 1 all NaN, row 2 all finite.
pub fn assert_overflow_rows(v: &[f32], c: usize, what: &str) {
    assert!(
        v[..2 * c].iter().all(|y| y.is_nan()),
        "{what}: rows 0 and 1 must be NaN"
    );
    assert!(
        v[2 * c..].iter().all(|y| y.is_finite()),
        "{what}: row 2 must be finite"
    );
}
