//! The dropout family: the GPU's mask is exactly the CPU reference's (both compute the same hash
//! bits), kept fractions match p, masks differ between sites and keys, "off" is the identity, and
//! the backward (the same call on the gradient) agrees with finite differences.

mod common;

use common::gradcheck::{GradCheck, check_gradient, weighted_sum};
use common::{gpu, random, round_to};
use kiln::Precision;
use kiln::cpu::dropout::{DropoutState, dropout as cpu_dropout, dropout_bits};
use kiln::gpu::DType;
use kiln::kernels::dropout::{Dropout, dropout, write_state};

fn cpu(x: &[f32], state: &DropoutState, site: u32) -> Vec<f32> {
    let mut y = vec![0.0; x.len()];
    cpu_dropout(&mut y, x, state, site);
    y
}

/// Bit-identical to the CPU in f32 (one multiplication by the same f32 scale); in f16 the CPU
/// value rounded to f16 once, as the kernel rounds its f32 product once.
#[test]
fn gpu_matches_cpu_exactly() {
    for p in [Precision::F32, Precision::F16] {
        let Some(gpu) = gpu(p) else { continue };
        let dt = DType::from(p);
        for n in [1, 255, 1000, 65_537] {
            for (drop, site) in [(0.1, 0), (0.5, 7), (0.9, 123)] {
                let x = round_to(p, &random(n, n as u64));
                let state = DropoutState::new(drop, 0xC0FFEE ^ n as u32);
                let want = round_to(p, &cpu(&x, &state, site));
                let src = gpu.upload("x", &[n], dt, &x).unwrap();
                let dst = gpu.zeros("y", &[n], dt).unwrap();
                dropout(gpu, &dst, &src, &state, site).unwrap();
                let got = gpu.read(&dst).unwrap();
                assert_eq!(got, want, "{p} n={n} p={drop} copy");
                // In place gives the same.
                let s = gpu.upload_u32("state", &[4], &[0; 4]).unwrap();
                write_state(gpu, &s, &state).unwrap();
                Dropout::new(gpu, &src, None, &s, site)
                    .unwrap()
                    .run(gpu)
                    .unwrap();
                assert_eq!(gpu.read(&src).unwrap(), want, "{p} n={n} p={drop} in place");
            }
        }
    }
}

#[test]
fn kept_fraction_matches_p_and_masks_are_independent() {
    let n = 1u32 << 20;
    for p in [0.1f32, 0.2, 0.5] {
        let s = DropoutState::new(p, 42);
        let keep = |st: &DropoutState, site| {
            (0..n)
                .map(|i| dropout_bits(st, site, i) >= st.threshold)
                .collect::<Vec<_>>()
        };
        let a = keep(&s, 3);
        let kept = a.iter().filter(|&&k| k).count() as f64 / f64::from(n);
        // Binomial: sd = sqrt(p(1-p)/n) <= 4.9e-4; 5 sd.
        assert!(
            (kept - f64::from(1.0 - p)).abs() < 2.5e-3,
            "p={p}: kept {kept}"
        );
        // Another site and another key: both kept with probability (1-p)^2 if independent.
        for (other, what) in [
            (keep(&s, 4), "site"),
            (keep(&DropoutState::new(p, 43), 3), "key"),
        ] {
            let both =
                a.iter().zip(&other).filter(|(x, y)| **x && **y).count() as f64 / f64::from(n);
            let expect = f64::from((1.0 - p) * (1.0 - p));
            assert!(
                (both - expect).abs() < 2.5e-3,
                "p={p}, another {what}: both kept {both}, independent {expect}"
            );
        }
    }
    // Keys of neighbouring steps and micro-batches differ.
    let keys: std::collections::HashSet<u32> = (0..100u64)
        .flat_map(|step| (0..4).map(move |m| DropoutState::key_for(1337, step, m)))
        .collect();
    assert_eq!(keys.len(), 400);
}

#[test]
fn off_is_the_identity() {
    let Some(gpu) = gpu(Precision::F32) else {
        return;
    };
    let x = random(1000, 9);
    let src = gpu.upload("x", &[1000], DType::F32, &x).unwrap();
    let dst = gpu.zeros("y", &[1000], DType::F32).unwrap();
    dropout(gpu, &dst, &src, &DropoutState::off(), 5).unwrap();
    assert_eq!(gpu.read(&dst).unwrap(), x);
    let zero = DropoutState::new(0.0, 77);
    assert_eq!(
        (zero.threshold, zero.scale),
        (0, 1.0),
        "p = 0 must keep everything"
    );
}

/// The backward is the forward applied to the output gradient: checked against central
/// differences of Σ dout·dropout(x). dropout is linear in x, so the difference quotient is exact
/// up to the rounding of x ± h and of the f64 sum: 1e-5 absolute + 1e-4 relative.
#[test]
fn backward_matches_finite_differences() {
    let x = random(300, 1);
    let dout = random(300, 2);
    let state = DropoutState::new(0.3, 99);
    let grad = cpu(&dout, &state, 11);
    let loss = |x: &[f32]| weighted_sum(&dout, &cpu(x, &state, 11));
    let fd = GradCheck {
        h: 1e-2,
        abs: 1e-5,
        rel: 1e-4,
    };
    check_gradient("dropout", &x, &grad, loss, fd).unwrap();
    // Another site's mask is not the gradient.
    let wrong = cpu(&dout, &state, 12);
    assert!(check_gradient("wrong site", &x, &wrong, loss, fd).is_err());
}

#[test]
fn bad_arguments_are_errors() {
    let Some(gpu) = gpu(Precision::F32) else {
        return;
    };
    let a = gpu.zeros("a", &[10], DType::F32).unwrap();
    let b = gpu.zeros("b", &[11], DType::F32).unwrap();
    let s = gpu.upload_u32("state", &[4], &[0; 4]).unwrap();
    let e = Dropout::new(gpu, &a, Some(&b), &s, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("dropout") && e.contains("elements"), "{e}");
    let short = gpu.upload_u32("short state", &[3], &[0; 3]).unwrap();
    let e = Dropout::new(gpu, &a, None, &short, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("state"), "{e}");
}
