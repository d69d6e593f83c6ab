//! Asynchronous read-back of each step's loss and update statistics.
//!
//! A ring of staging buffers: each step's command buffer ends with copies of the per-row losses,
//! the scored-target count and the optimizer's scalars (gradient norm, inf/NaN flag, skipped-step
//! count, dynamic loss scale and its clean run) into the step's slot, and the slot is mapped
//! asynchronously after the submit. The host learns step k's numbers a few steps later without
//! ever waiting for the step in flight, so the GPU never idles while the host encodes.

use crate::gpu::{Gpu, GpuTensor};
use crate::model::gpu::GptGpu;
use crate::{Error, Result};
use std::sync::{Arc, Mutex};

/// The optimizer scalars copied after each step, in slot order after the losses and the count.
const SCALARS: usize = 5;

/// What the GPU reported for one finished step (raw: the trainer turns it into
/// [`super::StepStats`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RawStep {
    /// The step's index (0-based).
    pub step: u64,
    /// Mean loss per scored target of the step's last micro-batch.
    pub loss: f32,
    /// Global norm of the raw (loss-scaled, micro-batch-summed) gradient buffer.
    pub raw_norm: f32,
    /// Whether the gradients held an inf or NaN (the update was skipped).
    pub overflow: bool,
    /// Steps skipped since the model was built (this process).
    pub skipped: u32,
    /// The dynamic loss scale after the step's update of it.
    pub loss_scale: f32,
    /// Clean steps in a row after the step.
    pub scale_run: u32,
}

/// A fixed number of slots; step k uses slot k mod n.
pub(crate) struct StatsRing {
    slots: Vec<Slot>,
    rows: usize,
}

type MapResult = Arc<Mutex<Option<std::result::Result<(), wgpu::BufferAsyncError>>>>;

struct Slot {
    buffer: wgpu::Buffer,
    step: Option<u64>,
    ready: MapResult,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl StatsRing {
    /// `rows` per-row losses per step, `n` slots (steps in flight at most).
    pub fn new(gpu: &Gpu, rows: usize, n: usize) -> Self {
        let slots = (0..n.max(1))
            .map(|i| Slot {
                buffer: gpu.device().create_buffer(&wgpu::BufferDescriptor {
                    label: Some(&format!("step stats ring {i}")),
                    size: ((rows + 1 + SCALARS) * 4) as u64,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                }),
                step: None,
                ready: Arc::new(Mutex::new(None)),
            })
            .collect();
        StatsRing { slots, rows }
    }

    fn slot_for(&self, step: u64) -> usize {
        (step % self.slots.len() as u64) as usize
    }

    /// Whether any step is in flight.
    pub fn is_empty(&self) -> bool {
        self.slots.iter().all(|s| s.step.is_none())
    }

    /// Records the copies of this step's numbers into its slot (after the step's update);
    /// `scalars` are the model's [`GptGpu::update_scalars`].
    pub fn record_copy(
        &self,
        enc: &mut wgpu::CommandEncoder,
        model: &GptGpu,
        scalars: &[&GpuTensor; 5],
        step: u64,
    ) {
        let slot = &self.slots[self.slot_for(step)];
        let mut copy = |t: &GpuTensor, at_word: usize, words: usize| {
            enc.copy_buffer_to_buffer(
                t.buffer(),
                t.offset_bytes(),
                &slot.buffer,
                (at_word * 4) as u64,
                (words * 4) as u64,
            );
        };
        copy(model.losses(), 0, self.rows);
        copy(model.target_count(), self.rows, 1);
        for (i, t) in scalars.iter().enumerate() {
            copy(t, self.rows + 1 + i, 1);
        }
    }

    /// After the step's submission: asks for its slot to be mapped when the GPU is done.
    pub fn request(&mut self, step: u64) {
        let i = self.slot_for(step);
        let slot = &mut self.slots[i];
        slot.step = Some(step);
        let ready = slot.ready.clone();
        *lock(&ready) = None;
        slot.buffer.map_async(wgpu::MapMode::Read, .., move |r| {
            *lock(&ready) = Some(r);
        });
    }

    /// Before reusing the slot of `step`: waits for the step that used it last (the oldest in
    /// flight) and returns its numbers.
    pub fn drain_slot(&mut self, gpu: &Gpu, step: u64) -> Result<Option<RawStep>> {
        let i = self.slot_for(step);
        if self.slots[i].step.is_none() {
            return Ok(None);
        }
        // Poll rather than wait for the device: a full wait would also wait for the newer steps
        // in flight, and the ring exists to keep those overlapping with the host.
        while lock(&self.slots[i].ready).is_none() {
            let _ = gpu.device().poll(wgpu::PollType::Poll);
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
        self.take(i)
    }

    /// The numbers of finished steps, oldest first, without waiting (stops at the first step
    /// not finished, so the order is kept).
    pub fn harvest(&mut self, gpu: &Gpu) -> Result<Vec<RawStep>> {
        let _ = gpu.device().poll(wgpu::PollType::Poll);
        let mut order: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].step.is_some())
            .collect();
        order.sort_by_key(|&i| self.slots[i].step);
        let mut out = Vec::new();
        for i in order {
            if lock(&self.slots[i].ready).is_none() {
                break;
            }
            out.extend(self.take(i)?);
        }
        Ok(out)
    }

    /// Every step still in flight (waits for the device).
    pub fn flush(&mut self, gpu: &Gpu) -> Result<Vec<RawStep>> {
        gpu.wait()?;
        self.harvest(gpu)
    }

    fn take(&mut self, i: usize) -> Result<Option<RawStep>> {
        let rows = self.rows;
        let slot = &mut self.slots[i];
        let Some(step) = slot.step.take() else {
            return Ok(None);
        };
        let failed = |message: String| Error::Readback {
            what: "step statistics ring".into(),
            message,
        };
        if let Some(Err(e)) = lock(&slot.ready).take() {
            return Err(failed(e.to_string()));
        }
        let raw = {
            let view = slot
                .buffer
                .get_mapped_range(..)
                .map_err(|e| failed(e.to_string()))?;
            let words: &[f32] = bytemuck::cast_slice(&view);
            let word = |i: usize| bytemuck::cast::<f32, u32>(words[i]);
            let count = word(rows).max(1);
            let s = rows + 1;
            RawStep {
                step,
                // Summed in f64 in row order, then divided: the loss the log has always shown.
                loss: (words[..rows].iter().map(|&l| f64::from(l)).sum::<f64>() / f64::from(count))
                    as f32,
                raw_norm: words[s],
                overflow: word(s + 1) != 0,
                skipped: word(s + 2),
                loss_scale: words[s + 3],
                scale_run: word(s + 4),
            }
        };
        slot.buffer.unmap();
        Ok(Some(raw))
    }
}
