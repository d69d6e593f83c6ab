//! The matmul family against the CPU reference: every layout, every variant, both precisions,
//! on shapes that are not multiples of any tile.

mod common;

use common::{Tolerance, assert_close, gpu, random, round_to};
use kiln::gpu::DType;
use kiln::kernels::matmul::{Matmul, MatmulVariant};
use kiln::ops::{Layout, MatmulSpec, Operand, Triangle};
use kiln::{Gpu, Precision};

/// Tolerances. Inputs are uniform in [-1, 1); K is at most 1024.
/// - f32: CPU and GPU both accumulate in f32 in increasing k, but the GPU may or may not fuse the
///   multiply-add, so each step may round differently: a random walk of ~sqrt(K) roundings of
///   partial sums of size ~sqrt(K/3), about 32 · 6e-8 · 18 ≈ 4e-5 at K = 1024. 1e-4 abs + 1e-4 rel
///   covers that with margin while still catching any wrong element (those are off by O(0.1)).
/// - f16: the CPU reference runs on the same f16-rounded inputs, so the differences are the
///   rounding of the f32 result to f16 (half an ulp, 2^-11 relative) and the f32 effects above;
///   1e-3 rel (two f16 ulps) + 1e-3 abs (outputs near zero) covers both.
fn tolerance(precision: Precision) -> Tolerance {
    match precision {
        Precision::F32 => Tolerance {
            abs: 1e-4,
            rel: 1e-4,
        },
        Precision::F16 => Tolerance {
            abs: 1e-3,
            rel: 1e-3,
        },
    }
}

/// Runs `spec` on the GPU with `variant` and on the CPU, and compares all of C.
fn check(gpu: &Gpu, variant: MatmulVariant, spec: &MatmulSpec, with_bias: bool, seed: u64) {
    let p = gpu.precision();
    let dt = DType::from(p);
    let a = round_to(p, &random(spec.a_len(), seed));
    let b = round_to(p, &random(spec.b_len(), seed + 1));
    let bias = round_to(p, &random(spec.n, seed + 2));
    let c0 = round_to(p, &random(spec.c_len(), seed + 3));
    let ga = gpu.upload("a", &[a.len()], dt, &a).unwrap();
    let gb = gpu.upload("b", &[b.len()], dt, &b).unwrap();
    let gbias = gpu.upload("bias", &[bias.len()], dt, &bias).unwrap();
    let gc = gpu.upload("c", &[c0.len()], dt, &c0).unwrap();
    let bias_gpu = with_bias.then_some(&gbias);
    Matmul::with_variant(gpu, variant, &gc, &ga, &gb, bias_gpu, spec)
        .unwrap()
        .run(gpu)
        .unwrap();
    let got = gpu.read(&gc).unwrap();
    let mut want = c0;
    kiln::cpu::matmul::matmul(&mut want, &a, &b, with_bias.then_some(&bias[..]), spec).unwrap();
    assert_close(
        &format!(
            "{} {p} {:?} M={} N={} K={} batch={} bias={with_bias} accumulate={}",
            variant.name(),
            spec.layout,
            spec.m,
            spec.n,
            spec.k,
            spec.batch,
            spec.accumulate
        ),
        &want,
        &got,
        tolerance(p),
    );
}

fn every_variant(gpu: &Gpu, spec: &MatmulSpec, with_bias: bool, seed: u64) {
    for variant in MatmulVariant::ALL {
        if variant.supports(gpu, spec) {
            check(gpu, variant, spec, with_bias, seed);
        }
    }
}

/// (M, N, K, batch): degenerate, awkward (no multiple of 4, 16, 32 or 64), long and thin, K not a
/// multiple of the tile depth, and a batch of 3.
const SHAPES: &[(usize, usize, usize, usize)] = &[
    (1, 1, 1, 1),
    (67, 129, 31, 1),
    (1, 1024, 7, 1),
    (300, 5, 513, 1),
    (70, 65, 17, 1),
    (33, 47, 29, 3),
];

fn all_layouts_and_shapes(precision: Precision) {
    let Some(gpu) = gpu(precision) else { return };
    for (i, &(m, n, k, batch)) in SHAPES.iter().enumerate() {
        for layout in Layout::ALL {
            let spec = MatmulSpec::new(layout, m, n, k).batched(batch);
            every_variant(gpu, &spec, false, 100 + i as u64);
        }
    }
}

#[test]
fn shapes_and_layouts_f32() {
    all_layouts_and_shapes(Precision::F32);
}

#[test]
fn shapes_and_layouts_f16() {
    all_layouts_and_shapes(Precision::F16);
}

/// Shapes whose contiguous extents are multiples of 4, so the vec4 kernel runs too, with
/// remainders against the 64 x 64 x 16 tile.
#[test]
fn vec4_aligned_shapes() {
    for p in Precision::ALL {
        let Some(gpu) = gpu(p) else { continue };
        for (m, n, k) in [(4, 4, 4), (68, 132, 36), (128, 64, 20)] {
            for layout in Layout::ALL {
                let spec = MatmulSpec::new(layout, m, n, k);
                assert!(MatmulVariant::TiledVec4.supports(gpu, &spec));
                every_variant(gpu, &spec, false, 7);
            }
        }
    }
}

/// Bias add, accumulation into C (gradient accumulation) and alpha, in the linear layer's three
/// layouts.
#[test]
fn bias_accumulate_alpha() {
    for p in Precision::ALL {
        let Some(gpu) = gpu(p) else { continue };
        // Awkward widths, then widths that are multiples of 4 (the texture kernel's vec4 store).
        for (tokens, fan_in, fan_out) in [(37, 23, 41), (37, 24, 40)] {
            let forward = MatmulSpec::new(Layout::NT, tokens, fan_out, fan_in);
            every_variant(gpu, &forward, true, 1);
            every_variant(gpu, &forward.alpha(0.125), true, 2);
            let input_grad = MatmulSpec::new(Layout::NN, tokens, fan_in, fan_out);
            every_variant(gpu, &input_grad.accumulate(true), false, 3);
            let weight_grad = MatmulSpec::new(Layout::TN, fan_out, fan_in, tokens);
            every_variant(gpu, &weight_grad.accumulate(true), false, 4);
            every_variant(gpu, &weight_grad.accumulate(true).alpha(-0.5), true, 5);
        }
    }
}

/// Attention-style addressing: q·kᵀ per (batch, head) inside a (B, T, 3C) buffer, using both
/// batch levels and row strides larger than the matrix.
#[test]
fn two_level_batch_with_strides() {
    let (b, t, heads, hs) = (2, 13, 3, 5);
    let c = heads * hs;
    let mut spec = MatmulSpec::new(Layout::NT, t, t, hs);
    spec.batch = b * heads;
    spec.batch_inner = heads;
    // q at column h·hs, k at column C + h·hs of the (B·T, 3C) qkv buffer.
    spec.a = Operand {
        offset: 0,
        ld: 3 * c,
        outer: t * 3 * c,
        inner: hs,
    };
    spec.b = Operand {
        offset: c,
        ld: 3 * c,
        outer: t * 3 * c,
        inner: hs,
    };
    spec.c = Operand {
        offset: 0,
        ld: t,
        outer: heads * t * t,
        inner: t * t,
    };
    spec.alpha = 1.0 / (hs as f32).sqrt();
    for p in Precision::ALL {
        let Some(gpu) = gpu(p) else { continue };
        every_variant(gpu, &spec, false, 9);
    }
}

#[test]
fn cpu_reference_matches_hand_computed_product() {
    // [1 2; 3 4] · [5 6; 7 8] = [19 22; 43 50]
    let spec = MatmulSpec::new(Layout::NN, 2, 2, 2);
    let mut c = vec![0.0; 4];
    kiln::cpu::matmul::matmul(&mut c, &[1., 2., 3., 4.], &[5., 6., 7., 8.], None, &spec).unwrap();
    assert_eq!(c, vec![19., 22., 43., 50.]);
    // Aᵀ·Bᵀ with the same stored data: [1 3; 2 4] · [5 7; 6 8] = [23 31; 34 46]
    let spec = MatmulSpec::new(Layout::TT, 2, 2, 2);
    kiln::cpu::matmul::matmul(
        &mut c,
        &[1., 2., 3., 4.],
        &[5., 6., 7., 8.],
        Some(&[1., -1.]),
        &spec,
    )
    .unwrap();
    assert_eq!(c, vec![24., 30., 35., 45.]);
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let gpu = gpu(Precision::F32).unwrap();
    let a = gpu.zeros("a", &[10], DType::F32).unwrap();
    let b = gpu.zeros("b", &[10], DType::F32).unwrap();
    let c = gpu.zeros("c", &[10], DType::F32).unwrap();
    let too_big = MatmulSpec::new(Layout::NN, 4, 4, 4);
    let e = Matmul::new(gpu, &c, &a, &b, None, &too_big)
        .err()
        .expect("A too small must fail");
    assert!(e.to_string().contains("A holds 10 elements"), "{e}");
    let zero = MatmulSpec::new(Layout::NN, 0, 4, 4);
    assert!(Matmul::new(gpu, &c, &a, &b, None, &zero).is_err());
    let h = gpu.zeros("h", &[10], DType::F16).unwrap();
    let ok = MatmulSpec::new(Layout::NN, 1, 1, 1);
    let e = Matmul::new(gpu, &c, &h, &b, None, &ok)
        .err()
        .expect("mixed precision must fail");
    assert!(e.to_string().contains("one precision"), "{e}");
    let mut cpu_c = vec![0.0; 3];
    assert!(kiln::cpu::matmul::matmul(&mut cpu_c, &[0.0; 16], &[0.0; 16], None, &too_big).is_err());
}

#[test]
fn autotuned_choice_is_cached_and_correct() {
    let gpu = gpu(Precision::F32).unwrap();
    gpu.tuning().set_enabled(true);
    let spec = MatmulSpec::new(Layout::NT, 50, 60, 70);
    let p = Precision::F32;
    let a = random(spec.a_len(), 1);
    let b = random(spec.b_len(), 2);
    let (ga, gb) = (
        gpu.upload("a", &[a.len()], p.into(), &a).unwrap(),
        gpu.upload("b", &[b.len()], p.into(), &b).unwrap(),
    );
    let gc = gpu.zeros("c", &[spec.c_len()], p.into()).unwrap();
    let first = Matmul::new(gpu, &gc, &ga, &gb, None, &spec).unwrap();
    let again = Matmul::new(gpu, &gc, &ga, &gb, None, &spec).unwrap();
    assert_eq!(first.variant(), again.variant());
    first.run(gpu).unwrap();
    let mut want = vec![0.0; spec.c_len()];
    kiln::cpu::matmul::matmul(&mut want, &a, &b, None, &spec).unwrap();
    assert_close("autotuned", &want, &gpu.read(&gc).unwrap(), tolerance(p));
}

/// The texture variant must really run here whenever subgroups of 8 or more are granted (every
/// test above skips variants that cannot run), including K with several 32-wide rounds and a
/// remainder.
#[test]
fn texture_variant_runs_where_subgroups_allow() {
    for p in Precision::ALL {
        let Some(gpu) = gpu(p) else { continue };
        let caps = gpu.capabilities();
        if !(caps.subgroup && caps.subgroup_size.0 >= 8) {
            continue;
        }
        for layout in Layout::ALL {
            let spec = MatmulSpec::new(layout, 70, 37, 1000);
            assert!(MatmulVariant::Texture.supports(gpu, &spec));
            check(gpu, MatmulVariant::Texture, &spec, true, 11);
        }
        // C written element by element where N is not a multiple of 4, as vec4s where it and
        // C's strides are (the same kernel with its other store).
        let dt = DType::from(p);
        for (n, ld, vec4) in [(37, 37, false), (36, 36, true), (36, 38, false)] {
            let mut spec = MatmulSpec::new(Layout::NN, 5, n, 3);
            spec.c.ld = ld;
            spec.c.outer = 5 * ld;
            let t = |len: usize| gpu.zeros("t", &[len], dt).unwrap();
            let mm = Matmul::with_variant(
                gpu,
                MatmulVariant::Texture,
                &t(spec.c_len()),
                &t(spec.a_len()),
                &t(spec.b_len()),
                None,
                &spec,
            )
            .unwrap();
            assert_eq!(mm.writes_vec4(), vec4, "N = {n}, ldc = {ld}");
        }
    }
}

/// Operands that do not fit a texture are refused with an error, not a device failure.
#[test]
fn texture_variant_refuses_operands_over_the_texture_limit() {
    let gpu = gpu(Precision::F32).unwrap();
    let side = gpu.capabilities().limits.max_texture_dimension_2d as usize;
    let spec = MatmulSpec::new(Layout::NN, side + 1, 1, 1);
    assert!(!MatmulVariant::Texture.supports(gpu, &spec));
    let a = gpu.zeros("a", &[spec.a_len()], DType::F32).unwrap();
    let b = gpu.zeros("b", &[spec.b_len()], DType::F32).unwrap();
    let c = gpu.zeros("c", &[spec.c_len()], DType::F32).unwrap();
    let e = Matmul::with_variant(gpu, MatmulVariant::Texture, &c, &a, &b, None, &spec)
        .err()
        .expect("a packed A taller than the texture limit must be refused");
    assert!(e.to_string().contains("cannot run here"), "{e}");
}

/// Products of one shape share their scratch textures. Recorded back to back in one pass, each
/// must still see its own operands: the second product's packing may only overwrite the textures
/// after the first product has read them.
#[test]
fn products_sharing_scratch_textures_stay_apart() {
    let gpu = gpu(Precision::F32).unwrap();
    let spec = MatmulSpec::new(Layout::NT, 45, 38, 70);
    if !MatmulVariant::Texture.supports(gpu, &spec) {
        return;
    }
    let p = Precision::F32;
    let mut products = Vec::new();
    for seed in [21, 31, 41] {
        let a = random(spec.a_len(), seed);
        let b = random(spec.b_len(), seed + 1);
        let ga = gpu.upload("a", &[a.len()], p.into(), &a).unwrap();
        let gb = gpu.upload("b", &[b.len()], p.into(), &b).unwrap();
        let gc = gpu.zeros("c", &[spec.c_len()], p.into()).unwrap();
        let mm =
            Matmul::with_variant(gpu, MatmulVariant::Texture, &gc, &ga, &gb, None, &spec).unwrap();
        let mut want = vec![0.0; spec.c_len()];
        kiln::cpu::matmul::matmul(&mut want, &a, &b, None, &spec).unwrap();
        products.push((mm, gc, want));
    }
    gpu.run_pass("three products", |pass| {
        for (mm, _, _) in &products {
            mm.record(pass);
        }
    })
    .unwrap();
    for (i, (_, gc, want)) in products.iter().enumerate() {
        assert_close(
            &format!("product {i} of three sharing textures"),
            want,
            &gpu.read(gc).unwrap(),
            tolerance(p),
        );
    }
}

/// Every variant performs the same fused multiply-adds in the same order (increasing k, f32
/// accumulator per element of C), so they agree bit for bit. The tuner may then pick any of them,
/// in any process, without changing a result: a resumed training run replays the same losses.
#[test]
fn every_variant_gives_bit_identical_results() {
    for p in Precision::ALL {
        let Some(gpu) = gpu(p) else { continue };
        let dt = DType::from(p);
        for (i, &(m, n, k, batch)) in [
            (67, 129, 31, 1),
            (70, 37, 1000, 1),
            (33, 47, 29, 3),
            (68, 132, 36, 2),
        ]
        .iter()
        .enumerate()
        {
            for layout in Layout::ALL {
                let spec = MatmulSpec::new(layout, m, n, k).batched(batch);
                let a = round_to(p, &random(spec.a_len(), 50 + i as u64));
                let b = round_to(p, &random(spec.b_len(), 60 + i as u64));
                let bias = round_to(p, &random(spec.n, 70 + i as u64));
                let ga = gpu.upload("a", &[a.len()], dt, &a).unwrap();
                let gb = gpu.upload("b", &[b.len()], dt, &b).unwrap();
                let gbias = gpu.upload("bias", &[bias.len()], dt, &bias).unwrap();
                let mut first: Option<(MatmulVariant, Vec<f32>)> = None;
                for variant in MatmulVariant::ALL {
                    if !variant.supports(gpu, &spec) {
                        continue;
                    }
                    let gc = gpu.zeros("c", &[spec.c_len()], dt).unwrap();
                    Matmul::with_variant(gpu, variant, &gc, &ga, &gb, Some(&gbias), &spec)
                        .unwrap()
                        .run(gpu)
                        .unwrap();
                    let got = gpu.read(&gc).unwrap();
                    match &first {
                        None => first = Some((variant, got)),
                        Some((v0, want)) => {
                            let differ = want
                                .iter()
                                .zip(&got)
                                .position(|(x, y)| x.to_bits() != y.to_bits());
                            if let Some(j) = differ {
                                panic!(
                                    "{p} {layout:?} {m}x{n}x{k} batch {batch}: {} and {} differ \
                                     at {j}: {} vs {}",
                                    v0.name(),
                                    variant.name(),
                                    want[j],
                                    got[j]
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A long K (a weight gradient over 70000 tokens): every variant that says it can run the product
/// sums all K terms, the others refuse it, and the tuned choice is right. On llvmpipe loops stop
/// silently after 65535 iterations per invocation, which some variants would pass.
#[test]
fn long_k_is_summed_completely_or_refused() {
    let gpu = gpu(Precision::F32).unwrap();
    let k = 70_000;
    for layout in [Layout::NN, Layout::TN] {
        let spec = MatmulSpec::new(layout, 3, 5, k);
        // Ones: every element of C is exactly K in f32.
        let a = gpu
            .upload("a", &[spec.a_len()], DType::F32, &vec![1.0; spec.a_len()])
            .unwrap();
        let b = gpu
            .upload("b", &[spec.b_len()], DType::F32, &vec![1.0; spec.b_len()])
            .unwrap();
        let want = vec![k as f32; spec.c_len()];
        for variant in MatmulVariant::ALL {
            let c = gpu.zeros("c", &[spec.c_len()], DType::F32).unwrap();
            match Matmul::with_variant(gpu, variant, &c, &a, &b, None, &spec) {
                Ok(mm) => {
                    mm.run(gpu).unwrap();
                    assert_eq!(gpu.read(&c).unwrap(), want, "{} K={k}", variant.name());
                }
                Err(e) => {
                    assert!(!variant.supports(gpu, &spec), "{}: {e}", variant.name());
                    assert!(e.to_string().contains("cannot run here"), "{e}");
                }
            }
        }
        let c = gpu.zeros("c", &[spec.c_len()], DType::F32).unwrap();
        Matmul::new(gpu, &c, &a, &b, None, &spec)
            .unwrap()
            .run(gpu)
            .unwrap();
        assert_eq!(gpu.read(&c).unwrap(), want, "tuned choice, K={k}");
    }
}

/// Grouped-query addressing: with `b_inner_div = g` (and `a_inner_div`), consecutive inner batch
/// indices share one B (A) matrix. Checked three ways, on every variant and layout-relevant
/// shape, in both precisions: against the CPU reference, bit for bit between variants, and bit
/// for bit against the same product on a buffer where the shared matrices are physically
/// repeated (divisor 1).
#[test]
fn grouped_inner_batch_shares_operands() {
    let (b, t, hs) = (2, 13, 6);
    for (heads, kv_heads) in [(4, 1), (4, 2), (6, 3), (3, 3)] {
        let g = heads / kv_heads;
        // q (heads) and k (kv_heads) side by side in a (B, T, (heads + kv_heads)·hs) buffer.
        let width = (heads + kv_heads) * hs;
        let mut spec = MatmulSpec::new(Layout::NT, t, t, hs);
        spec.batch = b * heads;
        spec.batch_inner = heads;
        spec.a = Operand {
            offset: 0,
            ld: width,
            outer: t * width,
            inner: hs,
        };
        spec.b = Operand {
            offset: heads * hs,
            ld: width,
            outer: t * width,
            inner: hs,
        };
        spec.b_inner_div = g;
        spec.c = Operand {
            offset: 0,
            ld: t,
            outer: heads * t * t,
            inner: t * t,
        };
        // The same with every k head repeated g times: a (B, T, 2·heads·hs) buffer, divisor 1.
        let wide = 2 * heads * hs;
        let mut repeated = spec;
        repeated.b_inner_div = 1;
        repeated.a.ld = wide;
        repeated.a.outer = t * wide;
        repeated.b = Operand {
            offset: heads * hs,
            ld: wide,
            outer: t * wide,
            inner: hs,
        };
        // And A shared instead (the (T, T) matrix of a kv head against per-head B), NN layout.
        let mut shared_a = MatmulSpec::new(Layout::NN, t, hs, t);
        shared_a.batch = b * heads;
        shared_a.batch_inner = heads;
        shared_a.a = Operand {
            offset: 0,
            ld: t,
            outer: kv_heads * t * t,
            inner: t * t,
        };
        shared_a.a_inner_div = g;
        shared_a.b = spec.a;
        shared_a.c = Operand {
            offset: 0,
            ld: heads * hs,
            outer: t * heads * hs,
            inner: hs,
        };
        for p in Precision::ALL {
            let Some(gpu) = gpu(p) else { continue };
            let dt = DType::from(p);
            every_variant(gpu, &spec, false, 90 + g as u64);
            every_variant(gpu, &shared_a, true, 95 + g as u64);
            let x = round_to(p, &random(b * t * width, 100));
            let mut x_wide = vec![0.0; b * t * wide];
            for r in 0..b * t {
                let (src, dst) = (&x[r * width..(r + 1) * width], &mut x_wide[r * wide..]);
                dst[..heads * hs].copy_from_slice(&src[..heads * hs]);
                for h in 0..heads {
                    let kv = heads * hs + (h / g) * hs;
                    dst[(heads + h) * hs..(heads + h + 1) * hs].copy_from_slice(&src[kv..kv + hs]);
                }
            }
            let gx = gpu.upload("x", &[x.len()], dt, &x).unwrap();
            let gw = gpu.upload("x wide", &[x_wide.len()], dt, &x_wide).unwrap();
            let mut first: Option<Vec<u32>> = None;
            for variant in MatmulVariant::ALL {
                if !variant.supports(gpu, &spec) {
                    continue;
                }
                let run = |s: &MatmulSpec, input: &kiln::GpuTensor| {
                    let gc = gpu.zeros("c", &[s.c_len()], dt).unwrap();
                    Matmul::with_variant(gpu, variant, &gc, input, input, None, s)
                        .unwrap()
                        .run(gpu)
                        .unwrap();
                    let v = gpu.read(&gc).unwrap();
                    v.iter().map(|f| f.to_bits()).collect::<Vec<_>>()
                };
                let got = run(&spec, &gx);
                assert!(
                    got == run(&repeated, &gw),
                    "{p} {} heads={heads} kv={kv_heads}: grouped differs from repeated",
                    variant.name()
                );
                match &first {
                    None => first = Some(got),
                    Some(want) => assert!(
                        *want == got,
                        "{p} {} heads={heads} kv={kv_heads}: variants differ",
                        variant.name()
                    ),
                }
            }
        }
    }
    // A divisor of 0 is an error, and the buffer-length checks account for the sharing: with
    // b_inner_div = 4 the k part of a single kv head suffices.
    let mut bad = MatmulSpec::new(Layout::NT, 2, 2, 2).batched(4);
    bad.batch_inner = 4;
    bad.b.inner = 4;
    bad.b_inner_div = 0;
    assert!(bad.validate(100, 100, None, 100).is_err());
    bad.b_inner_div = 4;
    assert_eq!(bad.b_len(), 4);
}

/// The residual epilogue (`Matmul::with_residual`): for every variant, two layouts, on awkward
/// shapes, with and without bias, `c = x + op(a)·op(b) (+ bias)` against the same product
/// followed by the residual kernel. In f32 the two are bit-identical: the epilogue adds x to the
/// finished f32 product exactly as the residual kernel adds it to C. In f16 the unfused path
/// rounds the product to f16 before the sum and the fused one does not, so they differ by at most
/// one f16 rounding of the product: the two sums before their final rounding differ by at most
/// half an f16 ulp of |product|, and rounding two such values can move them apart by one more ulp
/// of the sum, so the bound is 4.9e-4·|product| + 9.8e-4·|c| (2^-11 and 2^-10 relative), plus
/// 6e-8 below f16's normal range. Bias alternates with the layout, to keep the test short.
#[test]
fn residual_epilogue_matches_product_then_residual_kernel() {
    use kiln::kernels::residual::ResidualForward;
    for p in Precision::ALL {
        let Some(gpu) = gpu(p) else { continue };
        let dt = DType::from(p);
        // The last shape's C is 4-aligned, so the texture kernel writes it as vec4s.
        for (i, &(m, n, k, batch)) in [(67, 129, 31, 1), (33, 47, 29, 3), (36, 68, 29, 2)]
            .iter()
            .enumerate()
        {
            // NT is the projections' layout; the epilogue's C index is the same code in every
            // layout, and each (variant, layout) pair compiles two more pipelines.
            for (l, layout) in [Layout::NT, Layout::TN].into_iter().enumerate() {
                let spec = MatmulSpec::new(layout, m, n, k).batched(batch);
                let a = round_to(p, &random(spec.a_len(), 80 + i as u64));
                let b = round_to(p, &random(spec.b_len(), 90 + i as u64));
                let x = round_to(p, &random(spec.c_len(), 100 + i as u64));
                let bias = round_to(p, &random(spec.n, 110 + i as u64));
                let ga = gpu.upload("a", &[a.len()], dt, &a).unwrap();
                let gb = gpu.upload("b", &[b.len()], dt, &b).unwrap();
                let gx = gpu.upload("x", &[x.len()], dt, &x).unwrap();
                let gbias = gpu.upload("bias", &[bias.len()], dt, &bias).unwrap();
                for variant in MatmulVariant::ALL {
                    if !variant.supports(gpu, &spec) {
                        continue;
                    }
                    {
                        let with_bias = (i + l) % 2 == 1;
                        let bias = with_bias.then_some(&gbias);
                        let what = format!(
                            "{p} {layout:?} {m}x{n}x{k} batch {batch} {} bias {with_bias}",
                            variant.name()
                        );
                        let y = gpu.zeros("y", &[spec.c_len()], dt).unwrap();
                        let unfused = gpu.zeros("unfused", &[spec.c_len()], dt).unwrap();
                        Matmul::with_variant(gpu, variant, &y, &ga, &gb, bias, &spec)
                            .unwrap()
                            .run(gpu)
                            .unwrap();
                        ResidualForward::new(gpu, &unfused, &gx, &y)
                            .unwrap()
                            .run(gpu)
                            .unwrap();
                        let fused = gpu.zeros("fused", &[spec.c_len()], dt).unwrap();
                        Matmul::with_residual(
                            gpu,
                            Some(variant),
                            &fused,
                            &ga,
                            &gb,
                            bias,
                            &gx,
                            &spec,
                        )
                        .unwrap()
                        .run(gpu)
                        .unwrap();
                        let (want, got, prod) = (
                            gpu.read(&unfused).unwrap(),
                            gpu.read(&fused).unwrap(),
                            gpu.read(&y).unwrap(),
                        );
                        for j in 0..want.len() {
                            match p {
                                Precision::F32 => assert_eq!(
                                    want[j].to_bits(),
                                    got[j].to_bits(),
                                    "{what}: element {j}: {} vs {}",
                                    want[j],
                                    got[j]
                                ),
                                Precision::F16 => {
                                    let bound =
                                        4.9e-4 * prod[j].abs() + 9.8e-4 * want[j].abs() + 6e-8;
                                    assert!(
                                        (want[j] - got[j]).abs() <= bound,
                                        "{what}: element {j}: {} vs {} (bound {bound})",
                                        want[j],
                                        got[j]
                                    );
                                }
                            }
                        }
                        // The epilogue really added x: without it the result is the product.
                        assert!(
                            got.iter().zip(&prod).any(|(g, y)| g != y),
                            "{what}: the residual was not added"
                        );
                    }
                }
            }
        }
    }
}

/// A residual operand must have C's length, must not be C, and does not combine with
/// ACCUMULATE: each is refused with an error naming the matmul.
#[test]
fn residual_epilogue_refuses_bad_operands() {
    let gpu = gpu(Precision::F32).unwrap();
    let spec = MatmulSpec::new(Layout::NN, 5, 6, 7);
    let t = |name: &str, len: usize| gpu.zeros(name, &[len], DType::F32).unwrap();
    let (a, b, c) = (t("a", 35), t("b", 42), t("c", 30));
    let short = t("short", 29);
    let err = |r: kiln::Result<Matmul>| match r {
        Err(e) => e.to_string(),
        Ok(_) => panic!("accepted"),
    };
    let e = err(Matmul::with_residual(
        gpu, None, &c, &a, &b, None, &short, &spec,
    ));
    assert!(e.contains("residual") && e.contains("29"), "{e}");
    let e = err(Matmul::with_residual(
        gpu, None, &c, &a, &b, None, &c, &spec,
    ));
    assert!(e.contains("matmul"), "{e}");
    let mut acc = spec;
    acc.accumulate = true;
    let x = t("x", 30);
    let e = err(Matmul::with_residual(gpu, None, &c, &a, &b, None, &x, &acc));
    assert!(e.contains("ACCUMULATE"), "{e}");
}

/// The texture kernel's packing grids run linearly over each layer's texels, 64 per workgroup,
/// and spill into a second grid dimension past the adapter's 65535 workgroups per dimension. Here
/// op(A) packs to 1032 texels (K = 4100, rounded up to 4128) by 4096 rows, 4.23M texels: 66,048
/// workgroups, so the grid is 2-D. Every element of the (thin) product is checked against the
/// CPU, so a texel the grid missed or packed twice in the wrong place would show.
#[test]
fn texture_packing_past_the_workgroup_limit() {
    let Some(gpu) = gpu(Precision::F32) else {
        return;
    };
    let spec = MatmulSpec::new(Layout::NN, 4096, 4, 4100);
    if !MatmulVariant::Texture.supports(gpu, &spec) {
        return;
    }
    let max = gpu
        .capabilities()
        .limits
        .max_compute_workgroups_per_dimension as usize;
    assert!(
        1032 * 4096 / 64 > max,
        "the test no longer crosses the limit"
    );
    check(gpu, MatmulVariant::Texture, &spec, false, 11);
}

/// The causal hints of attention's products ([`Triangle`]): with each, every variant gives bit
/// for bit what it gives without it, over the part the hint promises. `ALower` / `AUpper` get an
/// op(A) that is zero past / before the diagonal (as P and dS are), and all of C must match;
/// `OutputLower` promises only C on and below the diagonal, and C above it is filled with a
/// sentinel first, to check that the kernels skip (leave) only whole 32 x 32 blocks there
/// and never write past them. Square blocks of 64 (whole blocks), 67 and 100 (partial ones),
/// batched, in the layouts attention uses (NT for the scores and dP, NN for P·v and dS·k, TN for
/// Pᵀ·dO and dSᵀ·q).
#[test]
fn triangle_hints_change_nothing_they_promise() {
    for p in Precision::ALL {
        let Some(gpu) = gpu(p) else { continue };
        let dt = DType::from(p);
        for (i, &(t, hd, batch)) in [(64, 32, 2), (67, 8, 3), (100, 20, 1)].iter().enumerate() {
            let cases = [
                (Triangle::OutputLower, MatmulSpec::new(Layout::NT, t, t, hd)),
                (Triangle::ALower, MatmulSpec::new(Layout::NN, t, hd, t)),
                (Triangle::AUpper, MatmulSpec::new(Layout::TN, t, hd, t)),
            ];
            for (triangle, plain) in cases {
                let plain = plain.batched(batch);
                let hinted = MatmulSpec { triangle, ..plain };
                let mut a = round_to(p, &random(plain.a_len(), 80 + i as u64));
                if triangle != Triangle::OutputLower {
                    // Zero op(A)[r][k] where the hint says it is zero; A is t x t per batch entry
                    // (op(A) = Aᵀ in TN, so entry (r, k) of op(A) is A[k][r]).
                    for z in 0..batch {
                        for r in 0..t {
                            for k in 0..t {
                                let zero = match triangle {
                                    Triangle::ALower => k > r,
                                    _ => k < r,
                                };
                                let at = if plain.layout.trans_a() {
                                    k * t + r
                                } else {
                                    r * t + k
                                };
                                if zero {
                                    a[z * t * t + at] = 0.0;
                                }
                            }
                        }
                    }
                }
                let b = round_to(p, &random(plain.b_len(), 90 + i as u64));
                let ga = gpu.upload("a", &[a.len()], dt, &a).unwrap();
                let gb = gpu.upload("b", &[b.len()], dt, &b).unwrap();
                // Exactly representable in f16 too, so a left cell reads back as it.
                const SENTINEL: f32 = 12344.0;
                for variant in MatmulVariant::ALL {
                    if !variant.supports(gpu, &plain) {
                        continue;
                    }
                    let run = |spec: &MatmulSpec| {
                        let init = vec![SENTINEL; spec.c_len()];
                        let gc = gpu.upload("c", &[init.len()], dt, &init).unwrap();
                        Matmul::with_variant(gpu, variant, &gc, &ga, &gb, None, spec)
                            .unwrap()
                            .run(gpu)
                            .unwrap();
                        gpu.read(&gc).unwrap()
                    };
                    let (want, got) = (run(&plain), run(&hinted));
                    let n = plain.n;
                    for (j, (x, y)) in want.iter().zip(&got).enumerate() {
                        let (row, col) = ((j / n) % plain.m, j % n);
                        let what = format!(
                            "{p} {} {triangle:?} t={t} batch {batch}: C[{j}] (row {row}, col {col})",
                            variant.name()
                        );
                        if triangle == Triangle::OutputLower && col > row {
                            // Above the diagonal: either computed or left as it was, and left
                            // only in whole 32 x 32 blocks strictly above it.
                            if *y == SENTINEL {
                                assert!(
                                    col / 32 > row / 32,
                                    "{what}: left unwritten next to the diagonal"
                                );
                            } else {
                                assert_eq!(x.to_bits(), y.to_bits(), "{what}");
                            }
                        } else {
                            assert_eq!(x.to_bits(), y.to_bits(), "{what}: {x} vs {y}");
                        }
                    }
                }
            }
        }
    }
}

/// The GELU epilogue against the product followed by the activation kernels, bit for bit, on
/// every variant and in both precisions: forward (C and gelu(C), with a bias) in the NT layout of
/// the MLP's fc product, backward (C ⊙ gelu'(pre)) in the NN layout of its projection's input
/// gradient, on shapes that are not multiples of any tile. Pre-activations span the saturated
/// range too (|x| up to 12).
#[test]
fn gelu_epilogue_is_the_product_then_the_activation() {
    use kiln::kernels::activation::{GeluBackward, GeluForward};
    use kiln::kernels::matmul::GeluEpilogue;
    for p in Precision::ALL {
        let Some(gpu) = gpu(p) else { continue };
        let dt = DType::from(p);
        // The last shape's C is 4-aligned, so the texture kernel writes it as vec4s.
        for (i, &(m, n, k)) in [(37, 41, 23), (5, 3, 70), (36, 44, 23)].iter().enumerate() {
            let seed = 200 + 10 * i as u64;
            let up = |label: &str, v: &[f32]| gpu.upload(label, &[v.len()], dt, v).unwrap();
            let bits = |t: &kiln::GpuTensor| -> Vec<u32> {
                gpu.read(t).unwrap().iter().map(|v| v.to_bits()).collect()
            };
            let zeros = |n: usize| gpu.zeros("t", &[n], dt).unwrap();
            let operands = |spec: &MatmulSpec| {
                let a = round_to(p, &random(spec.a_len(), seed));
                let b = round_to(p, &random(spec.b_len(), seed + 1));
                (up("a", &a), up("b", &b))
            };
            let fwd = MatmulSpec::new(Layout::NT, m, n, k);
            let bwd = MatmulSpec::new(Layout::NN, m, n, k);
            let (fa, fb) = operands(&fwd);
            let (ba, bb) = operands(&bwd);
            let bias = up("bias", &round_to(p, &random(n, seed + 2)));
            let pre: Vec<f32> = random(bwd.c_len(), seed + 3)
                .iter()
                .map(|v| 12.0 * v)
                .collect();
            let pre = up("pre", &round_to(p, &pre));
            for variant in MatmulVariant::ALL {
                let what = format!("{p} {} {m}x{n}x{k}", variant.name());
                if variant.supports(gpu, &fwd) {
                    let (c1, act1, c2, act2) =
                        (zeros(m * n), zeros(m * n), zeros(m * n), zeros(m * n));
                    let epilogue = GeluEpilogue::Forward { activation: &act1 };
                    Matmul::with_gelu(
                        gpu,
                        Some(variant),
                        &c1,
                        &fa,
                        &fb,
                        Some(&bias),
                        epilogue,
                        &fwd,
                    )
                    .unwrap()
                    .run(gpu)
                    .unwrap();
                    Matmul::with_variant(gpu, variant, &c2, &fa, &fb, Some(&bias), &fwd)
                        .unwrap()
                        .run(gpu)
                        .unwrap();
                    GeluForward::new(gpu, &act2, &c2).unwrap().run(gpu).unwrap();
                    assert!(
                        bits(&c1) == bits(&c2),
                        "{what}: forward pre-activation differs"
                    );
                    assert!(
                        bits(&act1) == bits(&act2),
                        "{what}: forward activation differs"
                    );
                }
                if variant.supports(gpu, &bwd) {
                    let (d1, d2, dfc) = (zeros(m * n), zeros(m * n), zeros(m * n));
                    let epilogue = GeluEpilogue::Backward {
                        pre_activation: &pre,
                    };
                    Matmul::with_gelu(gpu, Some(variant), &d1, &ba, &bb, None, epilogue, &bwd)
                        .unwrap()
                        .run(gpu)
                        .unwrap();
                    Matmul::with_variant(gpu, variant, &d2, &ba, &bb, None, &bwd)
                        .unwrap()
                        .run(gpu)
                        .unwrap();
                    GeluBackward::new(gpu, &dfc, &d2, &pre, false)
                        .unwrap()
                        .run(gpu)
                        .unwrap();
                    assert!(bits(&d1) == bits(&dfc), "{what}: backward differs");
                }
            }
        }
    }
}

/// A GELU epilogue refuses what it cannot do, with an error rather than a panic.
#[test]
fn gelu_epilogue_refuses_bad_operands() {
    use kiln::kernels::matmul::GeluEpilogue;
    let gpu = gpu(Precision::F32).unwrap();
    let spec = MatmulSpec::new(Layout::NT, 4, 8, 4);
    let t = |n: usize| gpu.zeros("t", &[n], DType::F32).unwrap();
    let (a, b, c, short, act) = (t(16), t(32), t(32), t(31), t(32));
    let refused = |epilogue: GeluEpilogue<'_>, spec: &MatmulSpec, why: &str| {
        Matmul::with_gelu(gpu, None, &c, &a, &b, None, epilogue, spec)
            .err()
            .unwrap_or_else(|| panic!("not refused: {why}"))
            .to_string()
    };
    let e = refused(
        GeluEpilogue::Forward { activation: &short },
        &spec,
        "activation shorter than C",
    );
    assert!(e.contains("elements"), "{e}");
    let forward = GeluEpilogue::Forward { activation: &act };
    let e = refused(forward, &spec.accumulate(true), "accumulate");
    assert!(e.contains("ACCUMULATE"), "{e}");
    let backward = GeluEpilogue::Backward { pre_activation: &c };
    let e = refused(backward, &spec, "pre-activation is C");
    assert!(e.contains("separate"), "{e}");
}

/// Packed operands filled by buffer-to-texture copies (`Matmul::allow_copies`) give bit for bit
/// what the packing dispatches give, in all four layouts (each operand packed along its memory's
/// rows) and batched with strides (attention's P·v, B inside a wider buffer); and an operand
/// whose memory does not have the packed layout (K not whole rounds of 32, rows not 256-byte
/// aligned, f16) is still packed by a dispatch, in the same layout.
#[test]
fn copied_operands_match_packed_ones() {
    for p in Precision::ALL {
        let Some(gpu) = gpu(p) else { continue };
        if !MatmulVariant::Texture.supports(gpu, &MatmulSpec::new(Layout::NN, 64, 64, 64)) {
            continue;
        }
        let dt = DType::from(p);
        let mut strided = MatmulSpec::new(Layout::NN, 64, 32, 64);
        strided.batch = 6;
        strided.batch_inner = 3;
        strided.a = Operand {
            offset: 0,
            ld: 64,
            outer: 3 * 4096,
            inner: 4096,
        };
        strided.b = Operand {
            offset: 64,
            ld: 192,
            outer: 64 * 192,
            inner: 32,
        };
        strided.c = Operand {
            offset: 0,
            ld: 96,
            outer: 64 * 96,
            inner: 32,
        };
        // Attention's scores q·kᵀ with grouped keys: 2 sequences × 4 query heads of 32 in rows
        // of q, k, v (384 floats), two query heads per key head. Both operands are copied into
        // textures holding a sequence's heads side by side (one copy each).
        let mut scores = MatmulSpec::new(Layout::NT, 64, 64, 32);
        scores.batch = 8;
        scores.batch_inner = 4;
        scores.b_inner_div = 2;
        scores.a = Operand {
            offset: 0,
            ld: 384,
            outer: 64 * 384,
            inner: 32,
        };
        scores.b = Operand {
            offset: 128,
            ..scores.a
        };
        scores.c = Operand {
            offset: 0,
            ld: 64,
            outer: 4 * 4096,
            inner: 4096,
        };
        // (spec, operands copied in f32). Each operand is packed along its memory's rows (A
        // along K or, stored transposed, along M; B along N or, stored transposed, along K) and
        // copied when those rows fill the texture's rows exactly at a 256-byte pitch.
        let cases = [
            (MatmulSpec::new(Layout::NT, 70, 96, 128), 2),
            (MatmulSpec::new(Layout::NN, 70, 128, 64), 2),
            // A's rows are 96 floats, 384 bytes: packed along M.
            (MatmulSpec::new(Layout::TN, 96, 64, 128).accumulate(true), 1),
            (MatmulSpec::new(Layout::TN, 128, 64, 96), 2),
            (strided, 2),
            (scores, 2),
            // A's rows are 70 floats: packed along M, with a padded last texel.
            (MatmulSpec::new(Layout::TT, 70, 64, 64), 1),
            (MatmulSpec::new(Layout::TT, 64, 70, 64), 2),
            // K = 48 and 80 leave padding rows or texels.
            (MatmulSpec::new(Layout::NN, 70, 64, 48), 0),
            (MatmulSpec::new(Layout::TN, 64, 64, 80), 0),
            (MatmulSpec::new(Layout::NT, 64, 36, 80), 0),
            // Rows of 32 and 36 floats.
            (MatmulSpec::new(Layout::NN, 70, 36, 32), 0),
        ];
        let scores_case = cases.iter().position(|(s, _)| *s == scores).unwrap();
        for (i, (spec, copies)) in cases.into_iter().enumerate() {
            let what = format!(
                "{p} case {i} {:?} {}x{}x{}",
                spec.layout, spec.m, spec.n, spec.k
            );
            let a = round_to(p, &random(spec.a_len(), 300 + i as u64));
            let b = round_to(p, &random(spec.b_len(), 310 + i as u64));
            let c0 = round_to(p, &random(spec.c_len(), 320 + i as u64));
            let ga = gpu.upload("a", &[a.len()], dt, &a).unwrap();
            let gb = gpu.upload("b", &[b.len()], dt, &b).unwrap();
            let run = |allow: bool| {
                let gc = gpu.upload("c", &[c0.len()], dt, &c0).unwrap();
                let mut mm =
                    Matmul::with_variant(gpu, MatmulVariant::Texture, &gc, &ga, &gb, None, &spec)
                        .unwrap();
                if allow {
                    mm.allow_copies();
                }
                let expected = if p == Precision::F32 { copies } else { 0 };
                assert_eq!(mm.copyable_operands(), expected, "{what}: copied operands");
                if i == scores_case && expected > 0 {
                    // One copy per operand: a texture layer per sequence, its heads side by
                    // side (one layer per head would take 8 copies each).
                    assert_eq!(mm.copy_commands(), 2, "{what}: copy commands");
                }
                assert_eq!(mm.has_copies(), allow && expected > 0, "{what}: copies");
                mm.run(gpu).unwrap();
                gpu.read(&gc).unwrap()
            };
            let (packed, copied) = (run(false), run(true));
            for (j, (x, y)) in packed.iter().zip(&copied).enumerate() {
                assert_eq!(x.to_bits(), y.to_bits(), "{what}: C[{j}] {x} vs {y}");
            }
            let mut want = c0.clone();
            kiln::cpu::matmul::matmul(&mut want, &a, &b, None, &spec).unwrap();
            assert_close(&what, &want, &copied, tolerance(p));
        }
    }
}
