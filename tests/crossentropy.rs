//! The crossentropy family: the CPU reference's gradient against finite differences (and the check
//! against a wrong gradient), then the GPU against the CPU reference in both precisions, on
//! vocabularies of 65 and 50257, with ignored targets, loss scaling and logits of ±1e4 / ±6e4.

mod common;

use common::{Tolerance, assert_close, gpu, random, round_to};
use kiln::gpu::DType;
use kiln::kernels::RowKernel;
use kiln::kernels::crossentropy::CrossEntropy;
use kiln::training::CrossEntropySpec;
use kiln::{Gpu, GpuTensor, Precision};

const IGNORE: u32 = u32::MAX;

/// Targets uniform over the vocabulary from a fixed seed, with every `ignore_every`-th ignored.
fn targets(n: usize, v: usize, seed: u64, ignore_every: Option<usize>) -> Vec<u32> {
    random(n, seed)
        .iter()
        .enumerate()
        .map(|(i, &x)| match ignore_every {
            Some(k) if i % k == k - 1 => IGNORE,
            _ => (((x + 1.0) * 0.5 * v as f32) as u32).min(v as u32 - 1),
        })
        .collect()
}

/// Logits uniform in [-scale, scale).
fn logits(len: usize, scale: f32, seed: u64) -> Vec<f32> {
    random(len, seed).iter().map(|x| x * scale).collect()
}

// ---------------------------------------------------------------------------------------------
// Finite differences on the CPU reference.

/// The mean loss over non-ignored rows, all in f64.
fn mean_loss_f64(logits: &[f64], targets: &[u32], spec: &CrossEntropySpec) -> f64 {
    let mut total = 0.0;
    let mut count = 0;
    for (r, &t) in targets.iter().enumerate() {
        if t == spec.ignore_index {
            continue;
        }
        let row = &logits[r * spec.v..(r + 1) * spec.v];
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
        total += lse - row[t as usize];
        count += 1;
    }
    total / count.max(1) as f64
}

/// Step and tolerance of the finite-difference check. With h = 1e-4 the truncation error
/// h²/6·|L'''| is below 1e-9 (L''' of a softmax is O(1) and the mean divides it further), and the
/// f64 rounding of L, ε·|L|/h, about 1e-11; the analytic gradient is f32, 6e-8 relative. So a
/// correct gradient agrees to ~1e-9 and abs 1e-7 + rel 1e-5 has a wide margin, while an error of
/// 1e-5 in one element (0.3% of a typical element at v = 65) is still caught.
const FD_H: f64 = 1e-4;
const FD_ABS: f64 = 1e-7;
const FD_REL: f64 = 1e-5;

/// Compares `grad` with central differences of the f64 mean loss around `logits`; the error names
/// the first element out of tolerance.
fn fd_check(
    grad: &[f32],
    logits: &[f32],
    targets: &[u32],
    spec: &CrossEntropySpec,
) -> Result<(), String> {
    let mut x: Vec<f64> = logits.iter().map(|&v| v as f64).collect();
    for i in 0..x.len() {
        let x0 = x[i];
        x[i] = x0 + FD_H;
        let up = mean_loss_f64(&x, targets, spec);
        x[i] = x0 - FD_H;
        let down = mean_loss_f64(&x, targets, spec);
        x[i] = x0;
        let numeric = (up - down) / (2.0 * FD_H);
        let analytic = grad[i] as f64;
        if (numeric - analytic).abs() > FD_ABS + FD_REL * analytic.abs() {
            return Err(format!(
                "element {i} (row {}, class {}): analytic {analytic:e}, numeric {numeric:e}",
                i / spec.v,
                i % spec.v
            ));
        }
    }
    Ok(())
}

fn cpu(
    logits: &[f32],
    targets: &[u32],
    scale: f32,
    spec: &CrossEntropySpec,
) -> (Vec<f32>, Vec<f32>, usize) {
    let mut loss = vec![0.0; spec.n];
    let mut grad = vec![0.0; spec.n * spec.v];
    let count =
        kiln::cpu::crossentropy::crossentropy(&mut loss, &mut grad, logits, targets, scale, spec)
            .unwrap();
    (loss, grad, count)
}

#[test]
fn cpu_gradient_matches_finite_differences() {
    for (n, v, ignore_every, seed) in [(1, 65, None, 1), (5, 65, Some(3), 2), (4, 7, Some(2), 3)] {
        let spec = CrossEntropySpec::new(n, v);
        let x = logits(n * v, 3.0, seed);
        let t = targets(n, v, seed + 10, ignore_every);
        let (_, grad, _) = cpu(&x, &t, 1.0, &spec);
        fd_check(&grad, &x, &t, &spec).unwrap_or_else(|e| panic!("n={n} v={v}: {e}"));
    }
}

#[test]
fn finite_difference_check_fails_on_wrong_gradients() {
    let spec = CrossEntropySpec::new(5, 65);
    let x = logits(5 * 65, 3.0, 4);
    let t = targets(5, 65, 5, Some(3));
    let (_, grad, count) = cpu(&x, &t, 1.0, &spec);
    assert_eq!(count, 4);
    fd_check(&grad, &x, &t, &spec).expect("the correct gradient passes");

    // The sum's gradient instead of the mean's: off by the factor count.
    let summed: Vec<f32> = grad.iter().map(|g| g * count as f32).collect();
    assert!(fd_check(&summed, &x, &t, &spec).is_err());
    // One element off by 1e-5.
    let mut nudged = grad.clone();
    nudged[70] += 1e-5;
    let e = fd_check(&nudged, &x, &t, &spec).expect_err("a nudged element must fail");
    assert!(e.starts_with("element 70 "), "{e}");
    // softmax + onehot: the sign of the target term flipped.
    let mut flipped = grad.clone();
    flipped[t[0] as usize] += 2.0 / count as f32;
    assert!(fd_check(&flipped, &x, &t, &spec).is_err());
    // An ignored row given the gradient it would have had.
    let (_, unignored, _) = cpu(&x, &[t[0], t[1], 0, t[3], t[4]], 1.0, &spec);
    let mut leaked = grad;
    leaked[2 * 65..3 * 65].copy_from_slice(&unignored[2 * 65..3 * 65]);
    assert!(fd_check(&leaked, &x, &t, &spec).is_err());
}

// ---------------------------------------------------------------------------------------------
// GPU against the CPU reference.

/// Tolerances of the GPU against the CPU reference (whose row sums are f64).
/// - loss (f32 in both precisions, computed from the same T inputs): the GPU rounds max - x_t
///   (half an ulp of the loss) and adds log of an f32 sum; the sum's relative error, ~1e-5 at
///   worst for 50257 strided terms, becomes an absolute 1e-5 in the log. abs 2e-5 + rel 1e-6.
/// - gradient f32: p = exp(x - max)/sum; the sum's order (f32, strided then a tree) gives up to
///   ~1.2e-5 relative for v = 50257 (196 sequential terms per invocation) and Vulkan's exp
///   3 + 2|x| ulp, ~1e-6 for |x - max| <= 8. rel 1e-4 leaves a 5x margin; abs 1e-9 covers values
///   the two sides round differently to (near) zero, such as exp(-100).
/// - gradient f16: the f16 rounding of the result adds half an ulp, 2^-12 relative for normal
///   values and 2^-25 absolute for subnormals (values below 6.1e-5, common at v = 50257):
///   rel 1e-3 + abs 6e-8 (one subnormal step).
fn loss_tolerance() -> Tolerance {
    Tolerance {
        abs: 2e-5,
        rel: 1e-6,
    }
}

fn grad_tolerance(p: Precision) -> Tolerance {
    match p {
        Precision::F32 => Tolerance {
            abs: 1e-9,
            rel: 1e-4,
        },
        Precision::F16 => Tolerance {
            abs: 6e-8,
            rel: 1e-3,
        },
    }
}

struct GpuRun {
    loss: Vec<f32>,
    grad: Vec<f32>,
    count: u32,
}

/// Uploads, runs and reads back; `logits` must already be rounded to the device's precision.
fn run_gpu(
    gpu: &Gpu,
    kernel: RowKernel,
    logits: &[f32],
    targets: &[u32],
    scale: Option<f32>,
    spec: &CrossEntropySpec,
) -> GpuRun {
    let dt = DType::from(gpu.precision());
    let nv = spec.n * spec.v;
    let gl = gpu.upload("logits", &[spec.n, spec.v], dt, logits).unwrap();
    let gt = gpu.upload_u32("targets", &[spec.n], targets).unwrap();
    let loss = gpu.zeros("loss", &[spec.n], DType::F32).unwrap();
    let grad = gpu.zeros("dlogits", &[nv], dt).unwrap();
    let gs: Option<GpuTensor> = scale.map(|s| gpu.upload("scale", &[1], DType::F32, &[s]).unwrap());
    let op = CrossEntropy::with_row_kernel(gpu, kernel, &loss, &grad, &gl, &gt, gs.as_ref(), spec)
        .unwrap();
    op.run(gpu).unwrap();
    GpuRun {
        loss: gpu.read(&loss).unwrap(),
        grad: gpu.read(&grad).unwrap(),
        count: gpu.read_u32(op.count()).unwrap()[0],
    }
}

/// Runs one case on the GPU and the CPU and compares loss, gradient and count.
fn check(gpu: &Gpu, x: &[f32], t: &[u32], scale: Option<f32>, spec: &CrossEntropySpec) -> GpuRun {
    let p = gpu.precision();
    let x = round_to(p, x);
    let (loss, grad, count) = cpu(&x, t, scale.unwrap_or(1.0), spec);
    let mut last = None;
    for kernel in RowKernel::ALL {
        if !kernel.supports(gpu, spec.v, 2) {
            continue;
        }
        let got = run_gpu(gpu, kernel, &x, t, scale, spec);
        let what = format!("{p} {kernel:?} n={} v={} scale={scale:?}", spec.n, spec.v);
        assert_eq!(got.count as usize, count, "{what}: count");
        assert_close(&format!("{what} loss"), &loss, &got.loss, loss_tolerance());
        assert_close(
            &format!("{what} dlogits"),
            &grad,
            &got.grad,
            grad_tolerance(p),
        );
        last = Some(got);
    }
    last.expect("RowKernel::ALL is not empty")
}

fn gpu_matches_cpu(p: Precision) {
    let Some(gpu) = gpu(p) else { return };
    // (n, v, ignored every k-th row, loss scale)
    let cases = [
        (1, 65, None, None),
        (37, 65, Some(5), None),
        (37, 65, Some(4), Some(1024.0)),
        (3, 50257, None, None),
        (3, 50257, Some(2), Some(0.5)),
        (2, 300, None, None),
        (130, 65, Some(3), None),
    ];
    for (i, &(n, v, ignore_every, scale)) in cases.iter().enumerate() {
        let spec = CrossEntropySpec::new(n, v);
        let x = logits(n * v, 4.0, 100 + i as u64);
        let t = targets(n, v, 200 + i as u64, ignore_every);
        check(gpu, &x, &t, scale, &spec);
    }
}

#[test]
fn gpu_matches_cpu_f32() {
    gpu_matches_cpu(Precision::F32);
}

#[test]
fn gpu_matches_cpu_f16() {
    gpu_matches_cpu(Precision::F16);
}

/// A different ignore index (here v itself) is honoured, and a row whose target equals
/// u32::MAX is then an invalid class: NaN loss and gradient on the GPU, an error on the CPU.
#[test]
fn custom_ignore_index_and_invalid_target() {
    let gpu = gpu(Precision::F32).unwrap();
    let spec = CrossEntropySpec::new(4, 65).ignore_index(65);
    let x = logits(4 * 65, 2.0, 9);
    let t = [3, 65, 64, 0];
    let got = check(gpu, &x, &t, None, &spec);
    assert_eq!(got.count, 3);
    assert_eq!(got.loss[1], 0.0);
    assert!(got.grad[65..130].iter().all(|&g| g == 0.0));

    let bad = [3, 65, u32::MAX, 0];
    let got = run_gpu(
        gpu,
        RowKernel::for_rows(gpu, spec.v, 2),
        &x,
        &bad,
        None,
        &spec,
    );
    assert!(
        got.loss[2].is_nan(),
        "loss of the invalid row: {}",
        got.loss[2]
    );
    assert!(got.grad[130..195].iter().all(|g| g.is_nan()));
    assert!(got.loss[0].is_finite() && got.loss[3].is_finite());
    let mut loss = vec![0.0; 4];
    let mut grad = vec![0.0; 4 * 65];
    let e = kiln::cpu::crossentropy::crossentropy(&mut loss, &mut grad, &x, &bad, 1.0, &spec)
        .expect_err("invalid target");
    assert!(e.to_string().contains("row 2"), "{e}");
}

/// More rows than one grid dimension allows (65535 on most adapters): the rows fold into a second
/// dimension and every row, including the last, is still computed once.
#[test]
fn rows_past_the_grid_limit() {
    let gpu = gpu(Precision::F32).unwrap();
    let max = gpu
        .capabilities()
        .limits
        .max_compute_workgroups_per_dimension as usize;
    let n = max + 2;
    let spec = CrossEntropySpec::new(n, 3);
    let x = logits(n * 3, 2.0, 41);
    let t = targets(n, 3, 42, Some(7));
    check(gpu, &x, &t, None, &spec);
}

#[test]
fn every_target_ignored_gives_zero_loss_and_gradient() {
    for p in Precision::ALL {
        let Some(gpu) = gpu(p) else { continue };
        let spec = CrossEntropySpec::new(3, 65);
        let x = round_to(p, &logits(3 * 65, 2.0, 11));
        let got = run_gpu(
            gpu,
            RowKernel::for_rows(gpu, spec.v, 2),
            &x,
            &[IGNORE; 3],
            Some(8.0),
            &spec,
        );
        assert_eq!(got.count, 0);
        assert!(got.loss.iter().all(|&l| l == 0.0), "{p}: {:?}", got.loss);
        assert!(got.grad.iter().all(|&g| g == 0.0), "{p}");
    }
}

/// Logits of magnitude `scale`, most rows random and one row with a single dominant logit whose
/// loss is known exactly: 0 when the target is the dominant class (every other exponential
/// underflows), 2·scale when the target sits at -scale.
fn huge_logits_case(gpu: &Gpu, scale: f32, v: usize) {
    let p = gpu.precision();
    let n = 5;
    let spec = CrossEntropySpec::new(n, v);
    let mut x = logits(n * v, scale, 21);
    for j in 0..v {
        x[3 * v + j] = -scale;
        x[4 * v + j] = -scale;
    }
    x[3 * v + 7] = scale;
    x[4 * v + 7] = scale;
    let mut t = targets(n, v, 22, None);
    t[3] = 7;
    t[4] = 8;
    let got = check(gpu, &x, &t, None, &spec);
    let what = format!("{p} logits of ±{scale}");
    assert!(
        got.loss.iter().all(|l| l.is_finite()),
        "{what}: {:?}",
        got.loss
    );
    assert!(
        got.grad.iter().all(|g| g.is_finite()),
        "{what}: non-finite gradient"
    );
    // Exact in exact arithmetic; Vulkan allows exp and log a few ulp (and log 2^-21 absolute near
    // 1), so compare within 1e-6 relative (f32) or half an f16 ulp of the rounded value.
    let near = |a: f32, b: f32| (a - b).abs() <= 1e-6 + 1e-6 * b.abs();
    assert!(
        near(got.loss[3], 0.0),
        "{what}: dominant target: {}",
        got.loss[3]
    );
    let s = round_to(p, &[scale])[0];
    assert!(
        near(got.loss[4], 2.0 * s),
        "{what}: target at -scale: {}",
        got.loss[4]
    );
    // Row 4: softmax is onehot(7), so the gradient is +1/count there, -1/count at the target and
    // exactly 0 elsewhere (every other exponential underflows).
    let c = n as f32;
    let grad4 = &got.grad[4 * v..5 * v];
    let tol = grad_tolerance(p);
    assert!(
        (grad4[7] - 1.0 / c).abs() <= tol.rel / c,
        "{what}: {}",
        grad4[7]
    );
    assert!(
        (grad4[8] + 1.0 / c).abs() <= tol.rel / c,
        "{what}: {}",
        grad4[8]
    );
    let others = grad4.iter().enumerate().filter(|&(j, _)| j != 7 && j != 8);
    assert!(
        others.clone().all(|(_, &g)| g == 0.0),
        "{what}: leaked gradient"
    );
}

#[test]
fn stable_for_logits_of_1e4_f32() {
    let gpu = gpu(Precision::F32).unwrap();
    huge_logits_case(gpu, 1e4, 65);
    huge_logits_case(gpu, 1e4, 50257);
}

#[test]
fn stable_for_logits_of_6e4_f16() {
    let Some(gpu) = gpu(Precision::F16) else {
        return;
    };
    huge_logits_case(gpu, 6e4, 65);
    huge_logits_case(gpu, 6e4, 50257);
}

#[test]
fn gradient_is_bit_identical_across_runs() {
    for p in Precision::ALL {
        let Some(gpu) = gpu(p) else { continue };
        let spec = CrossEntropySpec::new(3, 50257);
        let x = round_to(p, &logits(3 * 50257, 4.0, 31));
        let t = targets(3, 50257, 32, None);
        let kernel = RowKernel::for_rows(gpu, spec.v, 2);
        let a = run_gpu(gpu, kernel, &x, &t, None, &spec);
        let b = run_gpu(gpu, kernel, &x, &t, None, &spec);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&a.grad),
            bits(&b.grad),
            "{p}: gradient differs between runs"
        );
        assert_eq!(
            bits(&a.loss),
            bits(&b.loss),
            "{p}: loss differs between runs"
        );
    }
}

#[test]
fn bad_shapes_are_errors_naming_the_op() {
    let gpu = gpu(Precision::F32).unwrap();
    let spec = CrossEntropySpec::new(4, 65);
    let f32s = |label, len| gpu.zeros(label, &[len], DType::F32).unwrap();
    let logits = f32s("logits", 4 * 65);
    let grad = f32s("dlogits", 4 * 65);
    let loss = f32s("loss", 4);
    let targets = gpu.zeros("targets", &[4], DType::U32).unwrap();
    let short = f32s("short logits", 4 * 64);
    let f32_targets = f32s("float targets", 4);
    let scale2 = f32s("scale", 2);
    let expect_err = |r: kiln::Result<CrossEntropy>, needle: &str| {
        let e = r.err().expect("must be an error").to_string();
        assert!(e.starts_with("crossentropy:"), "{e}");
        assert!(e.contains(needle), "{needle:?} not in: {e}");
    };
    expect_err(
        CrossEntropy::new(gpu, &loss, &grad, &short, &targets, None, &spec),
        "logits has 256 elements",
    );
    expect_err(
        CrossEntropy::new(gpu, &loss, &grad, &logits, &f32_targets, None, &spec),
        "float targets",
    );
    expect_err(
        CrossEntropy::new(gpu, &loss, &logits, &logits, &targets, None, &spec),
        "passed as both",
    );
    expect_err(
        CrossEntropy::new(gpu, &loss, &grad, &logits, &targets, Some(&scale2), &spec),
        "dloss_scale",
    );
    expect_err(
        CrossEntropy::new(
            gpu,
            &loss,
            &grad,
            &logits,
            &targets,
            None,
            &spec.ignore_index(3),
        ),
        "ignore_index 3",
    );
    let huge = CrossEntropySpec::new(100_000, 50_257);
    let e = huge
        .validate(0, 0, 0, 0)
        .expect_err("n × v past u32")
        .to_string();
    assert!(e.starts_with("crossentropy:") && e.contains("u32"), "{e}");
    let mut l = vec![0.0; 4];
    let mut g = vec![0.0; 4 * 65];
    let e = kiln::cpu::crossentropy::crossentropy(&mut l, &mut g, &[0.0; 3], &[0; 4], 1.0, &spec)
        .expect_err("cpu shape error")
        .to_string();
    assert!(e.starts_with("crossentropy:"), "{e}");
}

/// One invocation per row walks GPT-2's 50257 logits twice, past llvmpipe's 65535 loop
/// iterations per invocation (after which its loops stop silently): that layout is refused there
/// with an error, and the default layout falls back to a workgroup per row.
#[test]
fn rows_too_long_for_the_loop_budget_are_refused() {
    let gpu = gpu(Precision::F32).unwrap();
    let spec = CrossEntropySpec::new(2, 50257);
    if !gpu.capabilities().adapter.name.contains("llvmpipe") {
        return;
    }
    assert!(!RowKernel::Invocation.supports(gpu, spec.v, 2));
    assert_eq!(RowKernel::for_rows(gpu, spec.v, 2), RowKernel::Workgroup);
    let logits = gpu.zeros("logits", &[2 * 50257], DType::F32).unwrap();
    let grad = gpu.zeros("grad", &[2 * 50257], DType::F32).unwrap();
    let targets = gpu.upload_u32("targets", &[2], &[0, 1]).unwrap();
    let loss = gpu.zeros("loss", &[2], DType::F32).unwrap();
    let e = CrossEntropy::with_row_kernel(
        gpu,
        RowKernel::Invocation,
        &loss,
        &grad,
        &logits,
        &targets,
        None,
        &spec,
    )
    .err()
    .expect("the per-invocation layout must be refused");
    assert!(e.to_string().contains("loop budget"), "{e}");
}
