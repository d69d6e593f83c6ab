//! Quantisation: the CPU reference's quantise → dequantise error bound, the packed layouts
//! (llama.cpp's q8_0 / q4_0 block bytes), the refusals, and every GPU kernel of the quant family
//! against the reference on awkward shapes, in both storage precisions.

mod common;

use common::{gpu, random, round_to};
use half::f16;
use kiln::cpu::quant::{dequantize, qmatmul, quantize};
use kiln::gpu::DType;
use kiln::kernels::quant::{QEmbedding, QMatmul, QMatmulKernel, QuantWeight};
use kiln::quant::{QuantKind, QuantMatrix, QuantSettings};
use kiln::{Error, Precision};

const KINDS: [QuantKind; 2] = [QuantKind::Q8, QuantKind::Q4];

/// Weights shaped like a trained layer's: mostly small, with a few outliers per row, some
/// all-zero groups and some groups so small that their scale is an f16 subnormal.
fn weights(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut w: Vec<f32> = random(rows * cols, seed).iter().map(|x| x * 0.05).collect();
    for r in 0..rows {
        w[r * cols + (r * 7) % cols] = 0.9 * if r % 2 == 0 { 1.0 } else { -1.0 };
    }
    if rows > 2 && cols >= 128 {
        w[cols..cols + 128].fill(0.0);
        for (i, x) in w[2 * cols..2 * cols + 32].iter_mut().enumerate() {
            *x = (i as f32 - 16.0) * 1e-7;
        }
    }
    w
}

/// The step of element (r, c): its group's scale.
fn step(q: &QuantMatrix, r: usize, c: usize) -> f64 {
    f64::from(q.scale(r, c / q.group_size()))
}

/// quantise → dequantise is within half a quantisation step of every weight, exactly as the
/// reference's rule guarantees (|w − d·q| ≤ d/2, computed in f64 here: each side is an exact
/// f32 value, so the comparison itself has no rounding).
#[test]
fn dequantised_weights_are_within_half_a_step() {
    for kind in KINDS {
        for group in [32, 64, 128] {
            let (rows, cols) = (5, 256);
            let w = weights(rows, cols, 1);
            let q = quantize(&w, rows, cols, kind, group).unwrap();
            let back = dequantize(&q);
            let mut worst = 0.0f64;
            for r in 0..rows {
                for c in 0..cols {
                    let (x, y) = (f64::from(w[r * cols + c]), f64::from(back[r * cols + c]));
                    let d = step(&q, r, c);
                    let err = (x - y).abs();
                    assert!(
                        err <= d / 2.0,
                        "{kind} group {group} [{r}, {c}]: {x} → {y}, error {err:e} > half of \
                         step {d:e}"
                    );
                    if d > 0.0 {
                        worst = worst.max(err / d);
                    }
                    // Integers stay within ±qmax (nibble 0, −8, is never written).
                    assert!(q.q(r, c).abs() <= kind.qmax());
                }
            }
            // The bound is met, not dodged: rounding lands close to half a step somewhere.
            assert!(
                worst > 0.4,
                "{kind} {group}: worst error only {worst} steps"
            );
            // The all-zero group dequantises to exact zeros with a zero scale.
            assert_eq!(q.scale(1, 0), 0.0, "{kind} {group}");
        }
    }
}

/// Subnormal-range groups keep the bound: the scale is raised by f16 steps until
/// max|w| / d ≤ qmax + ½.
#[test]
fn tiny_groups_keep_the_bound() {
    for kind in KINDS {
        let w: Vec<f32> = (0..32).map(|i| (i as f32 - 15.5) * 3e-9).collect();
        let q = quantize(&w, 1, 32, kind, 32).unwrap();
        let back = dequantize(&q);
        let d = f64::from(q.scale(0, 0));
        assert!(d > 0.0);
        for (x, y) in w.iter().zip(&back) {
            assert!(
                (f64::from(*x) - f64::from(*y)).abs() <= d / 2.0,
                "{kind}: {x} → {y}"
            );
        }
    }
}

/// The scale of a group is the f16 nearest max|w| / qmax (llama.cpp's q8_0 `d`), and q8's
/// integers are the signed bytes of the row in order.
#[test]
fn q8_bytes_are_llama_cpp_q8_0() {
    let mut w = vec![0.0f32; 32];
    w[0] = 1.27;
    w[1] = -0.5;
    w[2] = 0.004;
    w[31] = -1.0;
    let q = quantize(&w, 1, 32, QuantKind::Q8, 32).unwrap();
    assert_eq!(q.scales()[0], f16::from_f32(1.27 / 127.0));
    let d = f64::from(q.scale(0, 0));
    let bytes: Vec<i8> = q
        .packed()
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .map(|b| b as i8)
        .collect();
    let want = |x: f32| (f64::from(x) / d).round() as i8;
    assert_eq!(bytes[0], 127);
    assert_eq!(bytes[1], want(-0.5));
    assert_eq!(bytes[2], want(0.004));
    assert_eq!(bytes[31], want(-1.0));
    assert!(bytes[3..31].iter().all(|&b| b == 0));
}

/// q4: byte j of a block holds element j in its low nibble and element j + 16 in its high
/// nibble, as q + 8 (llama.cpp's q4_0 `qs`), and the scale is max|w| / 7.
#[test]
fn q4_bytes_are_llama_cpp_q4_0() {
    // Element e of block b is (e % 15) − 7 times a step of 0.1, so its integer is known.
    let cols = 64;
    let w: Vec<f32> = (0..cols)
        .map(|c| ((c % 32 % 15) as f32 - 7.0) * 0.1)
        .collect();
    let q = quantize(&w, 1, cols, QuantKind::Q4, 32).unwrap();
    assert_eq!(q.scales()[0], f16::from_f32(0.7 / 7.0));
    let bytes: Vec<u8> = q.packed().iter().flat_map(|w| w.to_le_bytes()).collect();
    assert_eq!(bytes.len(), cols / 2);
    for block in 0..2 {
        for j in 0..16 {
            let byte = bytes[block * 16 + j];
            let lo = ((j % 15) as i32 - 7 + 8) as u8;
            let hi = (((j + 16) % 15) as i32 - 7 + 8) as u8;
            assert_eq!(byte & 0xF, lo, "block {block} byte {j} low nibble");
            assert_eq!(byte >> 4, hi, "block {block} byte {j} high nibble");
        }
    }
}

/// Bad settings and matrices are refused with the value and the rule, never a panic.
#[test]
fn bad_settings_and_matrices_are_refused() {
    let msg = |e: Error| e.to_string();
    for g in [0, 48, 100] {
        let e = msg(QuantSettings::new(QuantKind::Q8, g, None).unwrap_err());
        assert!(
            e.contains("--group-size") && e.contains("multiple of 32"),
            "{e}"
        );
    }
    let s = QuantSettings::new(QuantKind::Q4, 64, None).unwrap();
    assert!(
        !s.embeddings,
        "q4 leaves the embeddings in float by default"
    );
    assert!(
        QuantSettings::new(QuantKind::Q8, 32, None)
            .unwrap()
            .embeddings
    );
    let e = msg(s.check_width("h.0.mlp.c_fc.weight", 96).unwrap_err());
    assert!(e.contains("96") && e.contains("h.0.mlp.c_fc.weight"), "{e}");
    // K not a multiple of the group: refused, not padded.
    let e = msg(quantize(&[0.5; 3 * 100], 3, 100, QuantKind::Q8, 32).unwrap_err());
    assert!(e.contains("100"), "{e}");
    let e = msg(quantize(&[f32::NAN; 32], 1, 32, QuantKind::Q8, 32).unwrap_err());
    assert!(e.contains("finite"), "{e}");
    let e = msg(quantize(&[1e7; 32], 1, 32, QuantKind::Q4, 32).unwrap_err());
    assert!(e.contains("f16"), "{e}");
    // Parts of the wrong length.
    let e = msg(QuantMatrix::new(
        "w",
        QuantKind::Q4,
        32,
        2,
        64,
        vec![0; 15],
        vec![f16::ONE; 4],
    )
    .unwrap_err());
    assert!(e.contains("15 packed words") && e.contains("16"), "{e}");
    let e = msg(QuantMatrix::new(
        "w",
        QuantKind::Q8,
        32,
        2,
        64,
        vec![0; 32],
        vec![f16::ONE; 3],
    )
    .unwrap_err());
    assert!(e.contains("3 scales") && e.contains("4"), "{e}");
    let e = msg(QuantMatrix::new(
        "w",
        QuantKind::Q8,
        32,
        1,
        32,
        vec![0; 8],
        vec![f16::INFINITY],
    )
    .unwrap_err());
    assert!(e.contains("finite"), "{e}");
}

/// Awkward shapes (m, n, k): one row, outputs not a multiple of the 64-wide tile or of the
/// 64-invocation workgroup, k a multiple of 32 but not of 64, k of one block, a vocabulary-sized
/// head.
const SHAPES: [(usize, usize, usize); 7] = [
    (1, 1, 32),
    (1, 65, 128),
    (3, 67, 96),
    (70, 129, 160),
    (130, 5, 256),
    (64, 64, 64),
    (2, 300, 384),
];

/// How far the GPU's sum may be from the reference's: both are f32 sums of the same exact
/// products, in the same order for `Tiled`, `Rows` and `Texture` (the texture matmul's fused
/// multiply-adds in increasing k) and as a tree of 64 lane sums for `Workgroup`, so each is within γ_k·Σ|x·w| of the exact sum (γ_k ≈ k·2⁻²⁴), and they differ by
/// at most twice that; with f16 storage the output is also rounded to f16 (half an ulp,
/// 2⁻¹¹ relative). A zero sum of absolute values allows nothing.
fn allowed(p: Precision, k: usize, sum_abs: f32, reference: f32) -> f32 {
    let sum = 2.0 * k as f32 * f32::EPSILON / 2.0 * sum_abs;
    match p {
        Precision::F32 => sum,
        Precision::F16 => sum + reference.abs() * 2f32.powi(-11) + 1e-7,
    }
}

#[test]
fn qmatmul_matches_the_reference_on_awkward_shapes() {
    for p in [Precision::F32, Precision::F16] {
        let Some(gpu) = gpu(p) else { continue };
        let dt = DType::from(p);
        for (m, n, k) in SHAPES {
            for kind in KINDS {
                for group in [32, 64, 128].into_iter().filter(|g| k % g == 0) {
                    let q = quantize(&weights(n, k, 2), n, k, kind, group).unwrap();
                    let wq = QuantWeight::upload(gpu, "w", &q).unwrap();
                    let deq = dequantize(&q);
                    let x = round_to(p, &random(m * k, 3));
                    let bias = round_to(p, &random(n, 4));
                    let gx = gpu.upload("x", &[m * k], dt, &x).unwrap();
                    let gb = gpu.upload("bias", &[n], dt, &bias).unwrap();
                    for with_bias in [false, true] {
                        let b = with_bias.then_some(&bias[..]);
                        let mut want = vec![0.0; m * n];
                        qmatmul(&mut want, &x, &q, b, m).unwrap();
                        for kernel in QMatmulKernel::ALL {
                            if !kernel.supports(gpu, m, &wq) {
                                eprintln!("note: {kernel:?} cannot run {m}×{n}×{k} here");
                                continue;
                            }
                            let y = gpu.zeros("y", &[m * n], dt).unwrap();
                            let op = QMatmul::with_kernel(
                                gpu,
                                kernel,
                                &y,
                                &gx,
                                &wq,
                                with_bias.then_some(&gb),
                                m,
                            )
                            .unwrap();
                            op.run(gpu).unwrap();
                            let got = gpu.read(&y).unwrap();
                            let what = format!(
                                "{p} {kind} group {group} {kernel:?} m={m} n={n} k={k} \
                                 bias={with_bias}"
                            );
                            check(&what, p, &want, &got, |i| {
                                let (r, j) = (i / n, i % n);
                                let s: f32 =
                                    (0..k).map(|c| (x[r * k + c] * deq[j * k + c]).abs()).sum();
                                (k, s)
                            });
                        }
                    }
                }
            }
        }
    }
}

/// Compares element by element against [`allowed`]; `terms(i)` gives k and Σ|x·w| of output i.
fn check(
    what: &str,
    p: Precision,
    want: &[f32],
    got: &[f32],
    terms: impl Fn(usize) -> (usize, f32),
) {
    assert_eq!(want.len(), got.len(), "{what}: length");
    for (i, (&w, &g)) in want.iter().zip(got).enumerate() {
        let (k, s) = terms(i);
        let tol = allowed(p, k, s, w);
        assert!(
            (w - g).abs() <= tol && g.is_finite(),
            "{what}: element {i}: reference {w}, GPU {g}, difference {:e}, allowed {tol:e}",
            (w - g).abs()
        );
    }
}

/// The default layout is the one-invocation-per-output kernel on a software adapter; every
/// layout refuses inputs of the wrong size.
#[test]
fn qmatmul_picks_a_layout_and_refuses_bad_operands() {
    let gpu = gpu(Precision::F32).unwrap();
    let q = quantize(&weights(8, 64, 5), 8, 64, QuantKind::Q8, 32).unwrap();
    let w = QuantWeight::upload(gpu, "w", &q).unwrap();
    let x = gpu.zeros("x", &[2 * 64], DType::F32).unwrap();
    let y = gpu.zeros("y", &[2 * 8], DType::F32).unwrap();
    let op = QMatmul::new(gpu, &y, &x, &w, None, 2).unwrap();
    let one = gpu.zeros("y", &[8], DType::F32).unwrap();
    let one = QMatmul::new(
        gpu,
        &one,
        &gpu.zeros("x", &[64], DType::F32).unwrap(),
        &w,
        None,
        1,
    );
    if gpu.capabilities().adapter.software {
        // Several rows through the texture multiply where it runs; one row per invocation.
        let several = if QMatmulKernel::Texture.supports(gpu, 2, &w) {
            QMatmulKernel::Texture
        } else {
            QMatmulKernel::Rows
        };
        assert_eq!(op.kernel(), several);
        assert_eq!(one.unwrap().kernel(), QMatmulKernel::Rows);
    }
    let short = gpu.zeros("x", &[64], DType::F32).unwrap();
    let e = QMatmul::new(gpu, &y, &short, &w, None, 2)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("qmatmul") && e.contains("128"), "{e}");
    let bias = gpu.zeros("bias", &[7], DType::F32).unwrap();
    let e = QMatmul::new(gpu, &y, &x, &w, Some(&bias), 2)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("bias"), "{e}");
    let e = QMatmul::new(gpu, &y, &x, &w, None, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("empty"), "{e}");
    if let Some(g16) = common::gpu(Precision::F16) {
        let x16 = g16.zeros("x", &[2 * 64], DType::F16).unwrap();
        let y32 = g16.zeros("y", &[2 * 8], DType::F32).unwrap();
        let w16 = QuantWeight::upload(g16, "w", &q).unwrap();
        let e = QMatmul::new(g16, &y32, &x16, &w16, None, 2)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("precision"), "{e}");
    }
}

/// The embedding lookups equal the dequantised table's rows plus the position rows: one f32
/// addition of the same two values on both sides (exact agreement in f32; f16 storage rounds
/// the sum once, half an ulp).
#[test]
fn qembed_matches_the_dequantised_table() {
    for p in [Precision::F32, Precision::F16] {
        let Some(gpu) = gpu(p) else { continue };
        let dt = DType::from(p);
        for kind in KINDS {
            let (vocab, c, batch, seq) = (67, 96, 3, 5);
            let q = quantize(&weights(vocab, c, 6), vocab, c, kind, 32).unwrap();
            let table = QuantWeight::upload(gpu, "wte", &q).unwrap();
            let deq = dequantize(&q);
            let wpe = round_to(p, &random(seq * c, 7));
            let gwpe = gpu.upload("wpe", &[seq * c], dt, &wpe).unwrap();
            let tokens: Vec<u32> = (0..batch * seq)
                .map(|i| ((i * 29 + 3) % vocab) as u32)
                .collect();
            let gt = gpu.upload_u32("tokens", &[tokens.len()], &tokens).unwrap();
            let out = gpu.zeros("out", &[tokens.len() * c], dt).unwrap();
            QEmbedding::rows(gpu, &out, &gt, &table, &gwpe, seq)
                .unwrap()
                .run(gpu)
                .unwrap();
            let want: Vec<f32> = (0..tokens.len() * c)
                .map(|i| {
                    let (r, ch) = (i / c, i % c);
                    deq[tokens[r] as usize * c + ch] + wpe[(r % seq) * c + ch]
                })
                .collect();
            let got = gpu.read(&out).unwrap();
            check(&format!("{p} {kind} rows"), p, &want, &got, |_| (0, 0.0));
            // The decode step's (token, pos).
            let step = gpu.upload_u32("step", &[2], &[66, 4]).unwrap();
            let one = gpu.zeros("one", &[c], dt).unwrap();
            QEmbedding::one(gpu, &one, &step, &table, &gwpe)
                .unwrap()
                .run(gpu)
                .unwrap();
            let want: Vec<f32> = (0..c)
                .map(|ch| deq[66 * c + ch] + wpe[4 * c + ch])
                .collect();
            check(
                &format!("{p} {kind} one"),
                p,
                &want,
                &gpu.read(&one).unwrap(),
                |_| (0, 0.0),
            );
        }
    }
}

/// Scales travel to the GPU in pairs; an odd number of them (3 groups) must not lose the last.
#[test]
fn an_odd_number_of_scales_reaches_the_gpu() {
    let gpu = gpu(Precision::F32).unwrap();
    let (n, k) = (1, 96);
    // Group g holds 127·(g + 1)/8, so its scale (g + 1)/8 is exact in f16 and q = 127.
    let w: Vec<f32> = (0..k).map(|c| 127.0 * (c / 32 + 1) as f32 / 8.0).collect();
    let q = quantize(&w, n, k, QuantKind::Q8, 32).unwrap();
    let wq = QuantWeight::upload(gpu, "w", &q).unwrap();
    assert_eq!(wq.scale_bytes(), 8, "two words for three f16 scales");
    let x = gpu.upload("x", &[k], DType::F32, &vec![1.0; k]).unwrap();
    let y = gpu.zeros("y", &[1], DType::F32).unwrap();
    QMatmul::with_kernel(gpu, QMatmulKernel::Rows, &y, &x, &wq, None, 1)
        .unwrap()
        .run(gpu)
        .unwrap();
    // 32 · 127 · (1 + 2 + 3) / 8, every term and partial sum exact.
    assert_eq!(gpu.read(&y).unwrap(), vec![3048.0]);
}
