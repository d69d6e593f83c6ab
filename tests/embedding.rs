//! Token + position embedding: CPU reference against finite differences, GPU against CPU,
//! deterministic backward.

mod common;

use common::gradcheck::{GradCheck, check_gradient, weighted_sum};
use common::{Tolerance, assert_close, gpu, random, round_to};
use kiln::Precision;
use kiln::cpu::embedding::{embedding_backward, embedding_forward, token_index};
use kiln::gpu::DType;
use kiln::kernels::embedding::{EmbeddingBackward, EmbeddingForward};
use kiln::ops::EmbeddingShape;
use rand::{RngExt, SeedableRng};

fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Skewed towards small ids so that tokens repeat, as in text.
    (0..n)
        .map(|_| (rng.random_range(0.0f32..1.0).powi(3) * vocab as f32) as u32 % vocab as u32)
        .collect()
}

/// (B, T, C, vocab, positions): single token, awkward sizes, T below the table size, vocab 65 and
/// 50257 with a tiny C to keep the test fast.
const SHAPES: &[(usize, usize, usize, usize, usize)] = &[
    (1, 1, 1, 1, 1),
    (3, 7, 13, 65, 9),
    (2, 64, 20, 65, 64),
    (2, 5, 3, 50257, 8),
];

fn sh(
    &(batch, seq, channels, vocab, positions): &(usize, usize, usize, usize, usize),
) -> EmbeddingShape {
    EmbeddingShape {
        batch,
        seq,
        channels,
        vocab,
        positions,
    }
}

#[test]
fn cpu_backward_matches_finite_differences() {
    // The embedding is linear in the tables, so central differences are exact up to rounding:
    // L is a sum of ~100 products summed in f64 from f32 outputs (rounding ~6e-8 relative), over
    // 2h = 2e-2 gives < 1e-5; 1e-4 absolute + 1e-4 relative.
    let fd = GradCheck {
        h: 1e-2,
        abs: 1e-4,
        rel: 1e-4,
    };
    let s = sh(&SHAPES[1]);
    let tok = tokens(s.batch * s.seq, s.vocab, 1);
    let wte = random(s.vocab * s.channels, 2);
    let wpe = random(s.positions * s.channels, 3);
    let w = random(s.batch * s.seq * s.channels, 4);
    let mut dwte = vec![0.0; wte.len()];
    let mut dwpe = vec![0.0; wpe.len()];
    embedding_backward(&mut dwte, &mut dwpe, &w, &tok, &s, false).unwrap();
    let fwd = |te: &[f32], pe: &[f32]| {
        let mut out = vec![0.0; w.len()];
        embedding_forward(&mut out, &tok, te, pe, &s).unwrap();
        weighted_sum(&w, &out)
    };
    check_gradient("dwte", &wte, &dwte, |x| fwd(x, &wpe), fd).unwrap();
    check_gradient("dwpe", &wpe, &dwpe, |x| fwd(&wte, x), fd).unwrap();
    // And the checker notices a gradient that forgot repeated tokens are summed.
    let mut wrong = dwte.clone();
    let repeated = tok
        .iter()
        .find(|t| tok.iter().filter(|u| u == t).count() > 1)
        .unwrap();
    wrong[*repeated as usize * s.channels] *= 0.5;
    assert!(check_gradient("wrong dwte", &wte, &wrong, |x| fwd(x, &wpe), fd).is_err());
}

#[test]
fn token_index_groups_positions_stably() {
    let (order, starts) = token_index(&[2, 0, 2, 1, 0], 4).unwrap();
    assert_eq!(starts, vec![0, 2, 3, 5, 5]);
    assert_eq!(order, vec![1, 4, 3, 0, 2]);
    let e = token_index(&[0, 7], 4).unwrap_err().to_string();
    assert!(e.contains("token 7 at position 1"), "{e}");
}

/// GPU vs CPU. The forward is one addition of two stored values: f32 exact up to that rounding
/// (1e-6), f16 rounds the sum once (2^-11 relative, so 1e-3 relative + 1e-3 absolute). The
/// backward sums at most B·T = 128 values of size ≤ 1 in f32 in the same order as the CPU: f32
/// agrees to 1e-6 (tolerance 1e-5); in f16 the sum (and the accumulated start value, which the
/// CPU sees rounded) is stored as f16: one rounding, 2^-11 relative, so 1e-3.
#[test]
fn gpu_matches_cpu() {
    for p in Precision::ALL {
        let Some(gpu) = gpu(p) else { continue };
        let dt = DType::from(p);
        let fwd_tol = match p {
            Precision::F32 => Tolerance {
                abs: 1e-6,
                rel: 1e-6,
            },
            Precision::F16 => Tolerance {
                abs: 1e-3,
                rel: 1e-3,
            },
        };
        let bwd_tol = match p {
            Precision::F32 => Tolerance {
                abs: 1e-5,
                rel: 1e-5,
            },
            Precision::F16 => Tolerance {
                abs: 1e-3,
                rel: 1e-3,
            },
        };
        for (i, shape) in SHAPES.iter().enumerate() {
            let s = sh(shape);
            let seed = 10 * i as u64;
            let tok = tokens(s.batch * s.seq, s.vocab, seed);
            let wte = round_to(p, &random(s.vocab * s.channels, seed + 1));
            let wpe = round_to(p, &random(s.positions * s.channels, seed + 2));
            let dout = round_to(p, &random(s.batch * s.seq * s.channels, seed + 3));
            let what = format!("{p} {s:?}");

            let mut out = vec![0.0; dout.len()];
            embedding_forward(&mut out, &tok, &wte, &wpe, &s).unwrap();
            let g_tok = gpu.upload_u32("tokens", &[tok.len()], &tok).unwrap();
            let g_wte = gpu.upload("wte", &[wte.len()], dt, &wte).unwrap();
            let g_wpe = gpu.upload("wpe", &[wpe.len()], dt, &wpe).unwrap();
            let g_out = gpu.zeros("out", &[out.len()], dt).unwrap();
            EmbeddingForward::new(gpu, &g_out, &g_tok, &g_wte, &g_wpe, &s)
                .unwrap()
                .run(gpu)
                .unwrap();
            assert_close(
                &format!("forward {what}"),
                &out,
                &gpu.read(&g_out).unwrap(),
                fwd_tol,
            );

            for accumulate in [false, true] {
                let start_te = round_to(p, &random(wte.len(), seed + 4));
                let start_pe = round_to(p, &random(wpe.len(), seed + 5));
                let (mut dwte, mut dwpe) = (start_te.clone(), start_pe.clone());
                embedding_backward(&mut dwte, &mut dwpe, &dout, &tok, &s, accumulate).unwrap();
                let (order, starts) = token_index(&tok, s.vocab).unwrap();
                let g_order = gpu.upload_u32("order", &[order.len()], &order).unwrap();
                let g_starts = gpu.upload_u32("starts", &[starts.len()], &starts).unwrap();
                let g_dout = gpu.upload("dout", &[dout.len()], dt, &dout).unwrap();
                let g_dwte = gpu.upload("dwte", &[wte.len()], dt, &start_te).unwrap();
                let g_dwpe = gpu.upload("dwpe", &[wpe.len()], dt, &start_pe).unwrap();
                let bwd = EmbeddingBackward::new(
                    gpu, &g_dwte, &g_dwpe, &g_dout, &g_order, &g_starts, &s, accumulate,
                )
                .unwrap();
                bwd.run(gpu).unwrap();
                let got_te = gpu.read(&g_dwte).unwrap();
                assert_close(
                    &format!("dwte acc={accumulate} {what}"),
                    &dwte,
                    &got_te,
                    bwd_tol,
                );
                assert_close(
                    &format!("dwpe acc={accumulate} {what}"),
                    &dwpe,
                    &gpu.read(&g_dwpe).unwrap(),
                    bwd_tol,
                );
                if !accumulate {
                    // Determinism: a second run gives the same bits.
                    bwd.run(gpu).unwrap();
                    let again = gpu.read(&g_dwte).unwrap();
                    assert!(
                        got_te
                            .iter()
                            .zip(&again)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{what}"
                    );
                }
            }
        }
    }
}

#[test]
fn bad_inputs_are_errors() {
    let s = sh(&SHAPES[1]);
    let mut out = vec![0.0; s.batch * s.seq * s.channels];
    let mut tok = vec![0u32; s.batch * s.seq];
    tok[5] = 65;
    let e =
        embedding_forward(&mut out, &tok, &vec![0.0; 65 * 13], &vec![0.0; 9 * 13], &s).unwrap_err();
    assert!(e.to_string().contains("token 65 at position 5"), "{e}");
    let long = EmbeddingShape { seq: 10, ..s };
    let e = embedding_forward(
        &mut vec![0.0; 3 * 10 * 13],
        &[0; 30],
        &vec![0.0; 65 * 13],
        &vec![0.0; 9 * 13],
        &long,
    )
    .unwrap_err();
    assert!(e.to_string().contains("exceeds the 9 positions"), "{e}");
}
