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
        self.time_submissions(label, warmup, runs, |encoder| {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(label),
                timestamp_writes: None,
            });
            record(&mut pass);
        })
    }

    /// [`Gpu::time_runs`] for work recorded into the encoder itself (passes and copies).
    pub fn time_submissions(
        &self,
        label: &str,
        warmup: usize,
        runs: usize,
        record: impl Fn(&mut wgpu::CommandEncoder),
    ) -> Result<Vec<f64>> {
        let mut times = Vec::with_capacity(runs);
        for i in 0..warmup + runs {
            let start = Instant::now();
            self.submit(label, &record)?;
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

/// Most passes one query set times (wgpu allows 4096 queries in a set; two per pass).
const PASSES_PER_QUERY_SET: usize = 2048;

impl Gpu {
    /// Records `passes` compute passes into one command buffer, pass `i` through `record(i,
    /// pass)` after `before(i, encoder)` (copies the pass's work needs first), each pass with
    /// GPU timestamps written at its beginning and end; submits it `warmup +
    /// runs` times and returns, per pass, the GPU seconds of each timed run. `None` when the
    /// adapter has no `TIMESTAMP_QUERY`.
    ///
    /// The passes run as they would in one submission (same order, same caches, no host round
    /// trip between them), which is what a step's profile needs; a pass boundary adds only the
    /// barrier that wgpu places between dependent dispatches anyway.
    pub fn time_passes(
        &self,
        label: &str,
        passes: usize,
        warmup: usize,
        runs: usize,
        before: impl Fn(usize, &mut wgpu::CommandEncoder),
        record: impl Fn(usize, &mut wgpu::ComputePass<'_>),
    ) -> Result<Option<Vec<Vec<f64>>>> {
        if !self.capabilities().timestamp_query || passes == 0 {
            return Ok(None);
        }
        let sets: Vec<(usize, wgpu::QuerySet)> = (0..passes)
            .step_by(PASSES_PER_QUERY_SET)
            .map(|first| {
                let n = PASSES_PER_QUERY_SET.min(passes - first);
                let set = self.device().create_query_set(&wgpu::QuerySetDescriptor {
                    label: Some(label),
                    ty: wgpu::QueryType::Timestamp,
                    count: 2 * n as u32,
                });
                (n, set)
            })
            .collect();
        let bytes = (2 * passes * 8) as u64;
        let resolve = self.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("timestamps"),
            size: bytes,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let period_s = f64::from(self.capabilities().timestamp_period_ns) * 1e-9;
        let mut times = vec![Vec::with_capacity(runs); passes];
        for run in 0..warmup + runs {
            let staging = self.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some("timestamps readback"),
                size: bytes,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            self.submit(label, |enc| {
                let mut pass_index = 0;
                for (set_index, (n, set)) in sets.iter().enumerate() {
                    for j in 0..*n {
                        before(pass_index, enc);
                        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                            label: Some(label),
                            timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                                query_set: set,
                                beginning_of_pass_write_index: Some(2 * j as u32),
                                end_of_pass_write_index: Some(2 * j as u32 + 1),
                            }),
                        });
                        record(pass_index, &mut pass);
                        pass_index += 1;
                    }
                    let offset = (set_index * PASSES_PER_QUERY_SET * 16) as u64;
                    enc.resolve_query_set(set, 0..2 * *n as u32, &resolve, offset);
                }
                enc.copy_buffer_to_buffer(&resolve, 0, &staging, 0, bytes);
            })?;
            let ticks = self.map_u64s(&staging, label)?;
            if run >= warmup {
                for (i, t) in times.iter_mut().enumerate() {
                    let (begin, end) = (ticks[2 * i], ticks[2 * i + 1]);
                    t.push(end.saturating_sub(begin) as f64 * period_s);
                }
            }
        }
        Ok(Some(times))
    }

    /// Maps a MAP_READ buffer (after the work that fills it) and returns its u64 words.
    fn map_u64s(&self, staging: &wgpu::Buffer, what: &str) -> Result<Vec<u64>> {
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        let readback = |message: String| crate::Error::Readback {
            what: what.to_string(),
            message,
        };
        rx.recv()
            .map_err(|e| readback(e.to_string()))?
            .map_err(|e| readback(e.to_string()))?;
        let view = staging
            .get_mapped_range(..)
            .map_err(|e| readback(e.to_string()))?;
        let words = bytemuck::cast_slice::<u8, u64>(&view).to_vec();
        drop(view);
        staging.unmap();
        Ok(words)
    }
}
