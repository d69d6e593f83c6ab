//! One-token decode steps with a key/value cache, for inference.
//!
//! A [`GptGpu`] built for one sequence of `block_size` tokens does the prefill: its ordinary
//! forward over the prompt leaves every layer's q|k|v rows in its activation buffers, and those
//! buffers are the cache. A [`KvDecoder`] then runs the network on one new token at position
//! `pos`: embedding of (token, pos), and per layer layer norm, the q|k|v projection of the one
//! row, attention of that row over cache rows 0..=pos (appending its k and v at row pos), output
//! projection, residual, MLP, residual; then the final norm and the logits. Every matmul has one
//! row, so a step costs about 2·params FLOPs instead of the whole window's forward pass.

use super::gpu::GptGpu;
use super::units::DecodeCtx;
use crate::gpu::{DType, Gpu, GpuTensor};
use crate::kernels::Record;
use crate::kernels::decode::MAX_POSITIONS;
use crate::{Error, Result};

/// The decode plan over a prefill model's weights and cache (see the module docs).
pub struct KvDecoder {
    step: GpuTensor,
    ops: Vec<Box<dyn Record>>,
    logits: GpuTensor,
    positions: usize,
    // Kept with the plan: the bind groups above refer to them.
    _buffers: Vec<GpuTensor>,
}

impl KvDecoder {
    /// Builds the plan for `model`, which must have been built for a batch of one sequence: the
    /// one-row forward of each unit of its architecture, in order.
    pub fn new(gpu: &Gpu, model: &GptGpu) -> Result<KvDecoder> {
        let batch = model.batch();
        if batch.batch != 1 {
            return Err(Error::shape(
                "kv decoder",
                format!(
                    "the prefill model must hold one sequence, not {}",
                    batch.batch
                ),
            ));
        }
        if batch.seq > MAX_POSITIONS {
            return Err(Error::invalid(
                "model.block_size",
                batch.seq,
                format!(
                    "the key/value cache decoder attends over at most {MAX_POSITIONS} positions"
                ),
            ));
        }
        let step = gpu.zeros("decode step", &[2], DType::U32)?;
        let mut d = DecodeCtx {
            gpu,
            model,
            step: &step,
            keep: Vec::new(),
        };
        let mut ops: Vec<Box<dyn Record>> = Vec::new();
        let logits = model.arch().decode(&mut d, &mut ops)?;
        let buffers = d.keep;
        gpu.check("preparing the decoder")?;
        Ok(KvDecoder {
            step,
            ops,
            logits,
            positions: batch.seq,
            _buffers: buffers,
        })
    }

    /// Whether the decoder supports `model`'s architecture: learned positions and multi-head
    /// attention (RoPE at the decode position and grouped heads in `attend_one` are not written
    /// yet; such models recompute the window for each token).
    pub fn supports(model: &GptGpu) -> bool {
        let m = model.model();
        let parts = m.parts();
        parts.positions == crate::model::PositionKind::Learned && parts.n_kv_head == m.n_head
    }

    /// Positions the cache holds (the model's block size).
    pub fn positions(&self) -> usize {
        self.positions
    }

    /// Runs `token` at position `pos` (rows 0..pos of the cache must hold the sequence so far)
    /// and returns the logits of the next token (waits for the device).
    pub fn decode(&self, gpu: &Gpu, token: u32, pos: usize) -> Result<Vec<f32>> {
        if pos >= self.positions {
            return Err(Error::shape(
                "kv decoder",
                format!(
                    "position {pos} is past the {} the cache holds",
                    self.positions
                ),
            ));
        }
        gpu.write_u32(&self.step, &[token, pos as u32])?;
        gpu.run_pass("decode", |pass| {
            for op in &self.ops {
                op.record_into(pass);
            }
        })?;
        gpu.read(&self.logits)
    }
}
