//! Choosing a kernel variant per adapter, precision and shape bucket by measuring the candidates.
//!
//! The fastest matmul variant differs between adapters (workgroup-memory tiles win on GPUs, the
//! texture-operand kernel on CPU-backed lavapipe) and between shapes. Every variant computes
//! bit-identical results, so the choice only changes speed. The first product of each
//! (precision, layout, power-of-two M/N/K/batch bucket, vec4 alignment) times every variant that
//! can run it on scratch buffers of that exact shape and keeps the fastest for the process.
//! `KILN_AUTOTUNE=0` turns measuring off and uses a fixed rule by adapter type instead.

use super::matmul::{Matmul, MatmulVariant, vec4_ok};
use crate::gpu::{DType, Gpu, median};
use crate::ops::{Layout, MatmulSpec};
use crate::{Precision, Result};
use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct MatmulKey {
    precision: Precision,
    layout: Layout,
    bucket: [u32; 4],
    vec4: bool,
}

/// Chosen variants for one device.
#[derive(Default)]
pub struct TuneCache {
    matmul: Mutex<HashMap<MatmulKey, MatmulVariant>>,
    disabled: Mutex<Option<bool>>,
}

impl TuneCache {
    /// Turns measurement on or off for this device (overrides `KILN_AUTOTUNE`).
    pub fn set_enabled(&self, on: bool) {
        *self.disabled.lock().unwrap_or_else(|e| e.into_inner()) = Some(!on);
    }

    fn enabled(&self) -> bool {
        let forced = *self.disabled.lock().unwrap_or_else(|e| e.into_inner());
        match forced {
            Some(disabled) => !disabled,
            None => std::env::var("KILN_AUTOTUNE")
                .map(|v| v != "0")
                .unwrap_or(true),
        }
    }

    /// Every (key, variant) chosen so far, for logs and `kiln bench`.
    pub fn matmul_choices(&self) -> Vec<String> {
        let map = self.matmul.lock().unwrap_or_else(|e| e.into_inner());
        map.iter()
            .map(|(k, v)| {
                format!(
                    "{} {} bucket {:?} vec4 {}: {}",
                    k.precision,
                    k.layout.name(),
                    k.bucket,
                    k.vec4,
                    v.name()
                )
            })
            .collect()
    }
}

fn bucket(x: usize) -> u32 {
    x.next_power_of_two().trailing_zeros()
}

/// Multiply-adds from which the texture kernel's two packing dispatches pay for themselves on
/// lavapipe: 768×512×128 (2^25.6) ran at 14–15 GFLOP/s against rows_subgroup's 11, while
/// 64×512×128 (2^22) ran at 10.7 against 15.4.
const TEXTURE_MIN_MACS: usize = 1 << 24;

/// The rule used without measurement: on software adapters the texture kernel for products big
/// enough to amortise its packing, else the barrier-free ones; tiles elsewhere.
pub fn default_matmul_variant(gpu: &Gpu, spec: &MatmulSpec) -> MatmulVariant {
    if gpu.capabilities().adapter.software {
        let macs = spec.m * spec.n * spec.k * spec.batch;
        if macs >= TEXTURE_MIN_MACS && MatmulVariant::Texture.supports(gpu, spec) {
            MatmulVariant::Texture
        } else if gpu.capabilities().subgroup {
            MatmulVariant::RowsSubgroup
        } else {
            MatmulVariant::Rows
        }
    } else if vec4_ok(spec) {
        MatmulVariant::TiledVec4
    } else {
        MatmulVariant::Tiled
    }
}

/// The variant to use for `spec` on `gpu` (measured once per bucket).
pub fn matmul_variant(gpu: &Gpu, precision: Precision, spec: &MatmulSpec) -> Result<MatmulVariant> {
    let cache = &gpu.tuning;
    if !cache.enabled() {
        return Ok(default_matmul_variant(gpu, spec));
    }
    let key = MatmulKey {
        precision,
        layout: spec.layout,
        bucket: [
            bucket(spec.m),
            bucket(spec.n),
            bucket(spec.k),
            bucket(spec.batch),
        ],
        vec4: vec4_ok(spec),
    };
    if let Some(&v) = cache
        .matmul
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
    {
        return Ok(v);
    }
    let chosen = match measure(gpu, precision, spec) {
        Ok(v) => v,
        Err(e) => {
            log::warn!("matmul tuning failed ({e}); using the default variant");
            default_matmul_variant(gpu, spec)
        }
    };
    log::debug!("matmul {key:?}: {}", chosen.name());
    cache
        .matmul
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, chosen);
    Ok(chosen)
}

/// FLOPs above which candidates are timed on a smaller product of the same kind.
///
/// Tuning times every variant that can run a product, the slowest included, and on lavapipe the
/// slowest run at 1–3 GFLOP/s: at the 6×384 shakespeare-char config's shapes (up to 14.5 GFLOP
/// per product, a dozen buckets) measuring at full size took longer than many training steps.
/// 2^29 FLOPs keeps each trial under about a third of a second there, and leaves every operand's
/// packing small beside the multiply. GPUs time even their biggest products in milliseconds.
const SOFTWARE_TUNE_FLOPS: f64 = (1u64 << 29) as f64;
const HARDWARE_TUNE_FLOPS: f64 = (1u64 << 34) as f64;

/// A product no bigger than `max_flops` that the variants run the way they run `spec`.
///
/// The largest of the outer batch, M, N and K is halved until the FLOPs fit, each keeping its
/// residue modulo 32 (the texture kernel's row block and K round, and every variant's tile edge
/// divide 32, so each variant takes the same edge paths and `vec4_ok` the same answer), never
/// below 32 plus that residue. Strides, offsets, the layout and the inner batch stay as they
/// are: the proxy reads a prefix of the same memory pattern.
pub(crate) fn tuning_proxy(spec: &MatmulSpec, max_flops: f64) -> MatmulSpec {
    let mut p = *spec;
    let shrink = |d: usize| -> Option<usize> {
        let r = d % 32;
        let smaller = r + 32 * ((d / 2) / 32).max(1);
        (smaller < d).then_some(smaller)
    };
    while p.flops() > max_flops {
        let outer = p.batch / p.batch_inner;
        // (size, which): the biggest shrinkable dimension first.
        let mut dims = [(outer, 0), (p.m, 1), (p.n, 2), (p.k, 3)];
        dims.sort_by_key(|&(d, _)| std::cmp::Reverse(d));
        let step = dims.iter().find_map(|&(d, which)| {
            if which == 0 {
                // Outer batch entries are independent: any count keeps the pattern.
                (d > 1).then_some((d / 2, which))
            } else {
                shrink(d).map(|s| (s, which))
            }
        });
        match step {
            Some((s, 0)) => p.batch = s * p.batch_inner,
            Some((s, 1)) => p.m = s,
            Some((s, 2)) => p.n = s,
            Some((s, _)) => p.k = s,
            None => break,
        }
    }
    p
}

fn measure(gpu: &Gpu, precision: Precision, spec: &MatmulSpec) -> Result<MatmulVariant> {
    let max_flops = if gpu.capabilities().adapter.software {
        SOFTWARE_TUNE_FLOPS
    } else {
        HARDWARE_TUNE_FLOPS
    };
    let full = spec;
    let spec = &tuning_proxy(full, max_flops);
    let dtype = DType::from(precision);
    let a = gpu.zeros("tune a", &[spec.a_len()], dtype)?;
    let b = gpu.zeros("tune b", &[spec.b_len()], dtype)?;
    let c = gpu.zeros("tune c", &[spec.c_len()], dtype)?;
    // Big products need fewer repetitions for a stable median.
    let runs = if spec.flops() > 1e9 { 2 } else { 5 };
    // A variant must run the real product, not only the proxy (texture size limits).
    let mut candidates = Vec::new();
    for variant in MatmulVariant::ALL
        .into_iter()
        .filter(|v| v.supports(gpu, full) && v.supports(gpu, spec))
    {
        let mm = Matmul::with_variant(gpu, variant, &c, &a, &b, None, spec)?;
        // One untimed warm-up, then a screening run: a variant three times slower than the
        // fastest screening run is not worth its timed runs. The first run of a variant also
        // pays for its pipeline's first use and, for the texture kernel, for creating and first
        // touching its scratch textures; screening on it rejected the texture kernel on lavapipe
        // at the baby GPT's QKV product and attention products, which it runs about twice as
        // fast as the variants chosen instead.
        let first = gpu.time_runs("matmul tune", 1, 1, |p| mm.record(p))?[0];
        candidates.push((variant, mm, first, Vec::with_capacity(runs)));
    }
    let fastest_first = candidates.iter().map(|c| c.2).fold(f64::INFINITY, f64::min);
    candidates.retain(|c| c.2 <= 3.0 * fastest_first);
    // The timed runs go round the candidates, one run each per round, so that a machine whose
    // speed drifts while tuning (a shared CPU under a software adapter swings by a third within
    // minutes) slows every candidate alike instead of whichever happened to be timed then.
    for _ in 0..runs {
        for (_, mm, _, times) in &mut candidates {
            times.push(gpu.time_runs("matmul tune", 0, 1, |p| mm.record(p))?[0]);
        }
    }
    Ok(candidates
        .iter()
        .map(|(v, _, _, t)| (median(t), *v))
        .min_by(|x, y| x.0.total_cmp(&y.0))
        .map_or_else(|| default_matmul_variant(gpu, full), |best| best.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_fits_the_budget_and_keeps_each_dimension_s_residue() {
        let cap = SOFTWARE_TUNE_FLOPS;
        // The 6×384 config's QKV product and weight gradient, and its per-head attention scores.
        let qkv = MatmulSpec::new(Layout::NT, 16384, 1152, 384);
        let dw = MatmulSpec::new(Layout::TN, 384, 1152, 16383);
        let scores = MatmulSpec::new(Layout::NT, 257, 257, 64).batched(384);
        for spec in [qkv, dw, scores] {
            let p = tuning_proxy(&spec, cap);
            assert!(p.flops() <= cap, "{spec:?} -> {p:?}");
            assert!(p.flops() > cap / 16.0, "shrunk too far: {p:?}");
            assert_eq!(p.layout, spec.layout);
            assert_eq!(
                (p.m % 32, p.n % 32, p.k % 32),
                (spec.m % 32, spec.n % 32, spec.k % 32)
            );
            assert_eq!(vec4_ok(&p), vec4_ok(&spec));
            assert!(p.a_len() <= spec.a_len() && p.b_len() <= spec.b_len());
            assert!(p.c_len() <= spec.c_len());
        }
        // Small products are timed as they are.
        let small = MatmulSpec::new(Layout::NN, 768, 512, 128);
        assert_eq!(tuning_proxy(&small, cap), small);
    }

    #[test]
    fn proxy_keeps_the_inner_batch_whole() {
        let mut spec = MatmulSpec::new(Layout::NN, 256, 64, 256).batched(64 * 6);
        spec.batch_inner = 6;
        let p = tuning_proxy(&spec, 1e8);
        assert_eq!(p.batch_inner, 6);
        assert_eq!(p.batch % 6, 0);
        assert!(p.flops() <= 1e8);
    }
}
