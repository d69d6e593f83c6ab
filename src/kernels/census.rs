//! What recording costs: every dispatch adds itself, the bytes it binds and, for products, the
//! floating-point operations it performs to a per-thread tally. `kiln profile` and `kiln bench
//! step` read the tally around each op they record, so the counts come from the dispatches the
//! step really issues rather than from a second description of the model that could drift from
//! it (before this, `dispatches_per_step` counted prepared ops, and an op of several dispatches
//! counted once).
//!
//! The tally is thread-local because recording happens on the thread that builds the command
//! buffer and tests record in parallel; it costs one thread-local add per dispatch.

use crate::gpu::Bind;
use std::cell::Cell;

/// Dispatches, bytes bound and floating-point operations of what was recorded.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Census {
    /// Compute dispatches.
    pub dispatches: u64,
    /// Bytes of the buffer ranges and textures the dispatches bind: the traffic if every bound
    /// byte crossed memory once (a lower bound for a product, which re-reads its operands'
    /// tiles; about right for an element-wise op).
    pub bytes: u64,
    /// Floating-point operations of the products recorded (2·M·N·K each; other ops add none).
    pub flops: f64,
}

impl std::ops::AddAssign for Census {
    fn add_assign(&mut self, o: Census) {
        self.dispatches += o.dispatches;
        self.bytes += o.bytes;
        self.flops += o.flops;
    }
}

thread_local! {
    static TALLY: Cell<Census> = Cell::new(Census::default());
}

/// Notes one dispatch binding `bytes`.
pub(crate) fn dispatch(bytes: u64) {
    TALLY.with(|t| {
        let mut c = t.get();
        c.dispatches += 1;
        c.bytes += bytes;
        t.set(c);
    });
}

/// Notes `flops` floating-point operations of a product.
pub(crate) fn flops(flops: f64) {
    TALLY.with(|t| {
        let mut c = t.get();
        c.flops += flops;
        t.set(c);
    });
}

/// Runs `record` and returns what it recorded on this thread.
pub fn count(record: impl FnOnce()) -> Census {
    let before = TALLY.with(Cell::get);
    record();
    let after = TALLY.with(Cell::get);
    Census {
        dispatches: after.dispatches - before.dispatches,
        bytes: after.bytes - before.bytes,
        flops: after.flops - before.flops,
    }
}

/// What `record` adds to a compute pass of an encoder on `gpu` that is never submitted: the
/// census of recorded work without running it.
pub fn recorded(gpu: &crate::gpu::Gpu, record: impl FnOnce(&mut wgpu::ComputePass<'_>)) -> Census {
    encoded(gpu, |encoder| {
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("census"),
            timestamp_writes: None,
        });
        record(&mut pass)
    })
}

/// [`recorded`] for work recorded into an encoder (passes and copies; copies are not
/// dispatches and count for nothing).
pub fn encoded(gpu: &crate::gpu::Gpu, record: impl FnOnce(&mut wgpu::CommandEncoder)) -> Census {
    let mut encoder = gpu
        .device()
        .create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("census"),
        });
    count(|| record(&mut encoder))
}

/// Bytes bound by `buffers`.
pub(crate) fn bound_bytes(buffers: &[(u32, Bind<'_>)]) -> u64 {
    buffers.iter().map(|(_, b)| b.bytes()).sum()
}
