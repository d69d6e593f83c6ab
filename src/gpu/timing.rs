//! Timing GPU work from the host: each run is submitted alone and waited for.

use super::Gpu;
use crate::Result;
use std::time::Instant;

impl Gpu {
    /// Runs `record` in its own pass `warmup + runs` times, waiting for the device after each,
    /// and returns the wall-clock seconds of the timed runs (submit to completion).
    pub fn time_runs(
        &self,
        label: &str,
        warmup: usize,
        runs: usize,
        record: impl Fn(&mut wgpu::ComputePass<'_>),
    ) -> Result<Vec<f64>> {
        let mut times = Vec::with_capacity(runs);
        for i in 0..warmup + runs {
            let start = Instant::now();
            self.run_pass(label, &record)?;
            self.wait()?;
            if i >= warmup {
                times.push(start.elapsed().as_secs_f64());
            }
        }
        Ok(times)
    }
}

/// Median of a non-empty sample (NaN for an empty one).
pub fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if !v.len().is_multiple_of(2) {
        v[mid]
    } else {
        0.5 * (v[mid - 1] + v[mid])
    }
}
