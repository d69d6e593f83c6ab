//! The adamw family: ten GPU steps (gradient norm + AdamW recorded in one pass per step, settings
//! written with write_buffer, no waits in between) against ten steps of the CPU reference; skipped
//! steps on inf/NaN; decay only where the segment table says; the f16 working copy; bad arguments.

mod common;

use common::{Tolerance, assert_close, gpu, random, round_to};
use kiln::gpu::DType;
use kiln::kernels::adamw::AdamW;
use kiln::kernels::gradnorm::GradNorm;
use kiln::training::{AdamWStep, ParamSegment};
use kiln::{Gpu, GpuTensor, Precision};

/// An awkward layout (1037 elements, not a multiple of the workgroup size): a decayed matrix, a
/// one-element bias, another decayed matrix right after it, and a final norm gain.
fn segments() -> Vec<ParamSegment> {
    let seg = |offset, len, decayed| ParamSegment {
        offset,
        len,
        decayed,
    };
    vec![
        seg(0, 300, true),
        seg(300, 1, false),
        seg(301, 699, true),
        seg(1000, 37, false),
    ]
}
const N: usize = 1037;

/// A layout of `n` elements large enough that every invocation updates many of them (the kernel
/// strides by its grid: on lavapipe 64 units per invocation, on GPUs 4) and walks its cursor
/// across many ranges: segments of 1 to 5000 elements, decayed and not, several adjacent decayed
/// ones (merged into one range) and segments shorter than the grid's stride, so one invocation's
/// consecutive elements fall in different segments. With n a multiple of 4 the kernel takes its
/// vec4 entry, and single-element segments put range ends inside a group of four.
fn large_segments(n: usize) -> Vec<ParamSegment> {
    let mut segs = Vec::new();
    let mut offset = 0;
    for (k, len) in [1usize, 3001, 7, 700, 1, 1, 5000, 33, 64, 2500, 999, 12, 1]
        .iter()
        .cycle()
        .enumerate()
    {
        let len = (*len).min(n - offset);
        segs.push(ParamSegment {
            offset,
            len,
            decayed: k % 3 != 1,
        });
        offset += len;
        if offset == n {
            break;
        }
    }
    segs
}

/// The scalar entry's length (40,037) and the vec4 entry's (40,036).
const LARGE: [usize; 2] = [40_037, 40_036];

/// Master weights after ten steps. CPU and GPU use the same f32 scalars (computed in f64 on the
/// host, so no GPU pow or sqrt of a scalar enters) and the same per-element operation order; they
/// can differ only where the GPU's sqrt or division is not correctly rounded (Vulkan allows a few
/// ulp) or a multiply-add is fused, a few ulp of one step's update (~1e-2 here), ~1e-9 per step.
/// rel 1e-6 as asked, plus abs 1e-7 for weights that pass close to zero.
const WEIGHT_TOL: Tolerance = Tolerance {
    abs: 1e-7,
    rel: 1e-6,
};

/// The part of the loss scale the GPU kernel reads from its scale tensor (a power of two).
const DYNAMIC_SCALE: f64 = 8.0;

/// The GPU's settings for a CPU step: the loss scale split between the step and the tensor.
fn gpu_step(step: &AdamWStep) -> AdamWStep {
    AdamWStep {
        loss_scale: step.loss_scale / DYNAMIC_SCALE,
        ..*step
    }
}

/// The optimizer state on the GPU and its CPU mirror.
struct State {
    params: GpuTensor,
    working: GpuTensor,
    m: GpuTensor,
    v: GpuTensor,
    skipped: GpuTensor,
    grads: GpuTensor,
    norm: GpuTensor,
    flag: GpuTensor,
    /// The dynamic loss scale, DYNAMIC_SCALE: the GPU step's own loss_scale is the CPU's divided
    /// by it, so the product the kernel forms is tested.
    scale: GpuTensor,
    cpu_params: Vec<f32>,
    cpu_working: Vec<f32>,
    cpu_m: Vec<f32>,
    cpu_v: Vec<f32>,
    cpu_skipped: u32,
}

impl State {
    fn new(gpu: &Gpu, n: usize, grad_dtype: DType, seed: u64) -> State {
        let w = random(n, seed);
        let working_dtype = DType::from(gpu.precision());
        State {
            params: gpu.upload("params", &[n], DType::F32, &w).unwrap(),
            working: gpu.zeros("working", &[n], working_dtype).unwrap(),
            m: gpu.zeros("exp_avg", &[n], DType::F32).unwrap(),
            v: gpu.zeros("exp_avg_sq", &[n], DType::F32).unwrap(),
            skipped: gpu.zeros("skipped", &[1], DType::U32).unwrap(),
            grads: gpu.zeros("grads", &[n], grad_dtype).unwrap(),
            norm: gpu.zeros("norm", &[1], DType::F32).unwrap(),
            flag: gpu.zeros("flag", &[1], DType::U32).unwrap(),
            scale: gpu
                .upload("scale", &[1], DType::F32, &[DYNAMIC_SCALE as f32])
                .unwrap(),
            cpu_params: w,
            cpu_working: vec![0.0; n],
            cpu_m: vec![0.0; n],
            cpu_v: vec![0.0; n],
            cpu_skipped: 0,
        }
    }

    fn prepare(&self, gpu: &Gpu, segments: &[ParamSegment], step: &AdamWStep) -> (GradNorm, AdamW) {
        let gn = GradNorm::new(gpu, &self.norm, &self.flag, &self.grads).unwrap();
        let opt = AdamW::new(
            gpu,
            &self.params,
            &self.working,
            &self.m,
            &self.v,
            &self.skipped,
            &self.grads,
            &self.norm,
            &self.flag,
            &self.scale,
            segments,
            &gpu_step(step),
        )
        .unwrap();
        (gn, opt)
    }

    /// One step on both sides; `grads` must be representable in the gradient dtype.
    fn step(
        &mut self,
        gpu: &Gpu,
        ops: &(GradNorm, AdamW),
        grads: &[f32],
        segments: &[ParamSegment],
        step: &AdamWStep,
    ) {
        gpu.write(&self.grads, grads).unwrap();
        ops.1.set_step(gpu, &gpu_step(step)).unwrap();
        gpu.run_pass("train step", |pass| {
            ops.0.record(pass);
            ops.1.record(pass);
        })
        .unwrap();
        // The CPU step gets the GPU's norm and flag (checked against the CPU's own), so both
        // sides clip by exactly the same factor and only the AdamW arithmetic is compared; the
        // norm's own accuracy is tests/gradnorm.rs's business.
        let (mut cpu_norm, mut cpu_flag) = (0.0, 0);
        kiln::cpu::gradnorm::gradnorm(&mut cpu_norm, &mut cpu_flag, grads);
        let norm = gpu.read(&self.norm).unwrap()[0];
        let flag = gpu.read_u32(&self.flag).unwrap()[0];
        assert_eq!(flag, cpu_flag, "inf/NaN flag");
        if flag == 0 {
            let tol = Tolerance {
                abs: 0.0,
                rel: 4e-6,
            };
            assert_close("gradient norm", &[cpu_norm], &[norm], tol);
        }
        kiln::cpu::adamw::adamw(
            &mut self.cpu_params,
            &mut self.cpu_working,
            &mut self.cpu_m,
            &mut self.cpu_v,
            &mut self.cpu_skipped,
            grads,
            norm,
            flag,
            segments,
            step,
        )
        .unwrap();
    }

    fn read(&self, gpu: &Gpu) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, u32) {
        (
            gpu.read(&self.params).unwrap(),
            gpu.read(&self.working).unwrap(),
            gpu.read(&self.m).unwrap(),
            gpu.read(&self.v).unwrap(),
            gpu.read_u32(&self.skipped).unwrap()[0],
        )
    }
}

/// The settings of step `t`: lr 1e-2 and weight decay 0.1 so decay is visible, loss scale 1024
/// (a power of two, so scaled gradients are exact), and clipping on odd steps at a norm the
/// unscaled gradients (norm ~18 for 1037 values in [-1, 1)) exceed.
fn settings(t: u32) -> AdamWStep {
    AdamWStep {
        lr: 1e-2,
        weight_decay: 0.1,
        loss_scale: 1024.0,
        grad_clip: if t % 2 == 1 { 5.0 } else { 0.0 },
        ..AdamWStep::new(t)
    }
}

fn ten_steps(p: Precision, grad_dtype: DType) {
    ten_steps_on(p, grad_dtype, &segments(), N);
    for n in LARGE {
        ten_steps_on(p, grad_dtype, &large_segments(n), n);
    }
}

fn ten_steps_on(p: Precision, grad_dtype: DType, segs: &[ParamSegment], n: usize) {
    let Some(gpu) = gpu(p) else { return };
    let mut s = State::new(gpu, n, grad_dtype, 1);
    let ops = s.prepare(gpu, segs, &settings(1));
    for t in 1..=10 {
        // Scaled by a power of two after rounding, so f16 and f32 gradients hold exact values.
        let g: Vec<f32> = round_to(Precision::F16, &random(n, 100 + t as u64))
            .iter()
            .map(|x| x * 1024.0)
            .collect();
        s.step(gpu, &ops, &g, segs, &settings(t));
    }
    let (params, working, m, v, skipped) = s.read(gpu);
    let what = format!("{p} working, {grad_dtype:?} grads, {n} elements, 10 steps");
    assert_eq!(skipped, 0, "{what}");
    assert_close(
        &format!("{what}: params"),
        &s.cpu_params,
        &params,
        WEIGHT_TOL,
    );
    assert_close(&format!("{what}: exp_avg"), &s.cpu_m, &m, WEIGHT_TOL);
    assert_close(&format!("{what}: exp_avg_sq"), &s.cpu_v, &v, WEIGHT_TOL);
    // The working copy is the master weights rounded to T: identical in f32, within half an f16
    // ulp (2^-11 relative, or 2^-25 absolute below f16's normal range) in f16.
    let working_tol = match p {
        Precision::F32 => Tolerance { abs: 0.0, rel: 0.0 },
        Precision::F16 => Tolerance {
            abs: 3e-8,
            rel: 4.9e-4,
        },
    };
    assert_close(&format!("{what}: working"), &params, &working, working_tol);
    // The steps did something to every element: each second moment holds squares of non-zero
    // gradients. A weight can still end exactly where it started (over 40,036 elements one did,
    // on the CPU as on the GPU: its ten updates summed to less than half an ulp), so the weights
    // that did not move must be the CPU's and rare.
    assert!(
        v.iter().all(|&x| x > 0.0),
        "{what}: an element was not updated"
    );
    let start = random(n, 1);
    let still: Vec<usize> = (0..n).filter(|&i| params[i] == start[i]).collect();
    let cpu_still: Vec<usize> = (0..n).filter(|&i| s.cpu_params[i] == start[i]).collect();
    assert_eq!(still, cpu_still, "{what}: unmoved weights");
    assert!(
        still.len() * 1000 < n,
        "{what}: {} weights did not move",
        still.len()
    );
}

/// The vec4 entry does each element's arithmetic in the scalar entry's order, so on the same
/// elements it must give the same bits. Ten steps on 40,037 elements (scalar entry) and on their
/// first 40,036 (vec4 entry), same data and segments (the last one element shorter), without
/// clipping (the norm, and so the clip factor, would see the extra element).
#[test]
fn vec4_entry_is_bit_identical_to_the_scalar_entry() {
    for (p, grad_dtype) in [
        (Precision::F32, DType::F32),
        (Precision::F16, DType::F16),
        (Precision::F16, DType::F32),
    ] {
        let Some(gpu) = gpu(p) else { continue };
        let [scalar, vec4] = LARGE.map(|n| {
            let segs = large_segments(n);
            let mut s = State::new(gpu, n, grad_dtype, 7);
            let no_clip = |t| AdamWStep {
                grad_clip: 0.0,
                ..settings(t)
            };
            let ops = s.prepare(gpu, &segs, &no_clip(1));
            for t in 1..=10 {
                let g = round_to(Precision::F16, &random(n, 200 + t as u64));
                s.step(gpu, &ops, &g, &segs, &no_clip(t));
            }
            let (params, working, m, v, _) = s.read(gpu);
            [params, working, m, v]
        });
        for (k, name) in ["params", "working", "exp_avg", "exp_avg_sq"]
            .iter()
            .enumerate()
        {
            let (a, b) = (&scalar[k][..LARGE[1]], &vec4[k]);
            let first = (0..LARGE[1]).find(|&i| a[i].to_bits() != b[i].to_bits());
            assert_eq!(
                first, None,
                "{p} {grad_dtype:?} grads: {name} of the vec4 entry differs from the scalar \
                 entry's (first at element {first:?})"
            );
        }
    }
}

#[test]
fn ten_steps_match_cpu_f32() {
    ten_steps(Precision::F32, DType::F32);
}

#[test]
fn ten_steps_match_cpu_f16_working_f32_grads() {
    ten_steps(Precision::F16, DType::F32);
}

#[test]
fn ten_steps_match_cpu_f16_working_f16_grads() {
    ten_steps(Precision::F16, DType::F16);
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// A NaN or inf gradient leaves every weight and moment bit-identical and counts the skip; the
/// next finite step proceeds.
#[test]
fn non_finite_gradient_skips_the_step() {
    for (p, grad_dtype) in [
        (Precision::F32, DType::F32),
        (Precision::F16, DType::F16),
        (Precision::F16, DType::F32),
    ] {
        let Some(gpu) = gpu(p) else { continue };
        let segs = segments();
        let mut s = State::new(gpu, N, grad_dtype, 2);
        let ops = s.prepare(gpu, &segs, &settings(1));
        let finite = |seed| round_to(Precision::F16, &random(N, seed));
        s.step(gpu, &ops, &finite(11), &segs, &settings(1));
        s.step(gpu, &ops, &finite(12), &segs, &settings(2));
        let before = s.read(gpu);
        assert_eq!(before.4, 0);
        for (k, bad) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY]
            .into_iter()
            .enumerate()
        {
            let mut g = finite(13);
            g[5 + 100 * k] = bad;
            s.step(gpu, &ops, &g, &segs, &settings(3));
            let after = s.read(gpu);
            let what = format!("{p} {grad_dtype:?} grads, {bad} gradient");
            assert_eq!(bits(&after.0), bits(&before.0), "{what}: params changed");
            assert_eq!(bits(&after.1), bits(&before.1), "{what}: working changed");
            assert_eq!(bits(&after.2), bits(&before.2), "{what}: exp_avg changed");
            assert_eq!(
                bits(&after.3),
                bits(&before.3),
                "{what}: exp_avg_sq changed"
            );
            assert_eq!(after.4, k as u32 + 1, "{what}: skipped counter");
            assert_eq!(s.cpu_skipped, k as u32 + 1, "{what}: cpu skipped counter");
        }
        s.step(gpu, &ops, &finite(14), &segs, &settings(3));
        let (params, _, _, _, skipped) = s.read(gpu);
        assert_eq!(skipped, 3, "{p}: a finite step must not count as skipped");
        assert_ne!(
            bits(&params),
            bits(&before.0),
            "{p}: the finite step must update"
        );
        assert_close(
            &format!("{p}: after skips"),
            &s.cpu_params,
            &params,
            WEIGHT_TOL,
        );
    }
}

/// With a zero gradient (and zero moments) the Adam part of the update is exactly zero, so a
/// non-decayed tensor must stay bit-identical while a decayed one is multiplied by 1 - lr·wd.
#[test]
fn decay_applies_only_to_decayed_tensors() {
    decay_applies_only_to(&segments(), N);
    for n in LARGE {
        decay_applies_only_to(&large_segments(n), n);
    }
}

fn decay_applies_only_to(segs: &[ParamSegment], n: usize) {
    let gpu = gpu(Precision::F32).unwrap();
    let mut s = State::new(gpu, n, DType::F32, 3);
    let step = AdamWStep {
        lr: 0.1,
        weight_decay: 0.5,
        ..AdamWStep::new(1)
    };
    let ops = s.prepare(gpu, segs, &step);
    let start = s.cpu_params.clone();
    s.step(gpu, &ops, &vec![0.0; n], segs, &step);
    let (params, ..) = s.read(gpu);
    let factor = (1.0 - 0.1 * 0.5) as f32;
    for seg in segs {
        for i in seg.offset..seg.offset + seg.len {
            if seg.decayed {
                assert_eq!(params[i], start[i] * factor, "decayed element {i}");
                assert!(
                    params[i].abs() < start[i].abs(),
                    "decayed element {i} must shrink"
                );
            } else {
                assert_eq!(
                    params[i].to_bits(),
                    start[i].to_bits(),
                    "element {i} changed"
                );
            }
        }
    }
    assert_eq!(bits(&params), bits(&s.cpu_params));
}

#[test]
fn one_element_buffer() {
    let gpu = gpu(Precision::F32).unwrap();
    let segs = [ParamSegment {
        offset: 0,
        len: 1,
        decayed: true,
    }];
    let mut s = State::new(gpu, 1, DType::F32, 4);
    let ops = s.prepare(gpu, &segs, &settings(1));
    for t in 1..=3 {
        s.step(gpu, &ops, &[0.25 * t as f32], &segs, &settings(t));
    }
    let (params, ..) = s.read(gpu);
    assert_close("n = 1", &s.cpu_params, &params, WEIGHT_TOL);
}

#[test]
fn bad_arguments_are_errors_naming_the_op() {
    let gpu = gpu(Precision::F32).unwrap();
    let s = State::new(gpu, N, DType::F32, 5);
    let short = gpu.zeros("short grads", &[N - 1], DType::F32).unwrap();
    let step = AdamWStep::new(1);
    let new = |grads: &GpuTensor, working: &GpuTensor, segs: &[ParamSegment], step: &AdamWStep| {
        AdamW::new(
            gpu, &s.params, working, &s.m, &s.v, &s.skipped, grads, &s.norm, &s.flag, &s.scale,
            segs, step,
        )
        .err()
        .expect("must be an error")
        .to_string()
    };
    let segs = segments();
    let e = new(&short, &s.working, &segs, &step);
    assert!(e.starts_with("adamw:") && e.contains("short grads"), "{e}");
    let e = new(&s.grads, &s.params, &segs, &step);
    assert!(
        e.starts_with("adamw:") && e.contains("passed as both"),
        "{e}"
    );
    let mut gap = segs.clone();
    gap[2].offset += 1;
    gap[2].len -= 1;
    let e = new(&s.grads, &s.working, &gap, &step);
    assert!(e.starts_with("adamw:") && e.contains("segment 2"), "{e}");
    let e = new(&s.grads, &s.working, &segs[..3], &step);
    assert!(e.starts_with("adamw:") && e.contains("cover 1000"), "{e}");
    let mut past = segs.clone();
    past[3].len += 1;
    let e = new(&s.grads, &s.working, &past, &step);
    assert!(e.starts_with("adamw:") && e.contains("ends past"), "{e}");
    let bad_step = AdamWStep {
        loss_scale: 0.0,
        ..step
    };
    let e = new(&s.grads, &s.working, &segs, &bad_step);
    assert!(e.contains("loss_scale"), "{e}");
    let ops = s.prepare(gpu, &segs, &step);
    let e = ops.1.set_step(gpu, &AdamWStep { t: 0, ..step });
    assert!(e.expect_err("t = 0").to_string().contains("adamw t"));
    if let Some(g16) = common::gpu(Precision::F16) {
        // An f16 gradient with an f32 working copy has no kernel.
        let s16 = State::new(g16, N, DType::F16, 6);
        let w32 = g16.zeros("working32", &[N], DType::F32).unwrap();
        let e = AdamW::new(
            g16,
            &s16.params,
            &w32,
            &s16.m,
            &s16.v,
            &s16.skipped,
            &s16.grads,
            &s16.norm,
            &s16.flag,
            &s16.scale,
            &segs,
            &step,
        )
        .err()
        .expect("must be an error")
        .to_string();
        assert!(e.starts_with("adamw:") && e.contains("f32 or"), "{e}");
    }
}
