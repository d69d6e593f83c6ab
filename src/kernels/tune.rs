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

fn measure(gpu: &Gpu, precision: Precision, spec: &MatmulSpec) -> Result<MatmulVariant> {
    let dtype = DType::from(precision);
    let a = gpu.zeros("tune a", &[spec.a_len()], dtype)?;
    let b = gpu.zeros("tune b", &[spec.b_len()], dtype)?;
    let c = gpu.zeros("tune c", &[spec.c_len()], dtype)?;
    // Big products need fewer repetitions for a stable median.
    let runs = if spec.flops() > 1e9 { 2 } else { 5 };
    let mut best = (f64::INFINITY, default_matmul_variant(gpu, spec));
    for variant in MatmulVariant::ALL
        .into_iter()
        .filter(|v| v.supports(gpu, spec))
    {
        let mm = Matmul::with_variant(gpu, variant, &c, &a, &b, None, spec)?;
        let t = median(&gpu.time_runs("matmul tune", 1, runs, |p| mm.record(p))?);
        if t < best.0 {
            best = (t, variant);
        }
    }
    Ok(best.1)
}
