//! One-token decode steps with a key/value cache, for inference.
//!
//! A [`GptGpu`] built for one sequence of `block_size` tokens does the prefill: its ordinary
//! forward over the prompt leaves every layer's q|k|v rows in its activation buffers (with RoPE,
//! q and k already rotated at their positions 0..len), and those buffers are the cache. A
//! [`KvDecoder`] then runs the network on one new token at position `pos`: embedding of
//! (token, pos), and per layer the norm, the q|k|v projection of the one row, with RoPE the
//! rotation of its q and k heads at `pos` (the training kernel, reading pos from the step
//! buffer), attention of its query heads over cache rows 0..=pos (multi-head or grouped-query,
//! appending its k and v at row pos), output projection, residual, MLP (GELU or SwiGLU),
//! residual; then the final norm and the logits. Every matmul has one row, so a step costs about
//! 2·params FLOPs instead of the whole window's forward pass.
//!
//! Positions are those of the cache: row pos of the cache is position pos, as in the prefill's
//! forward, which always starts its window at position 0. So when generation restarts from the
//! last half of the context, the kept tokens are prefilled again at positions 0.. and decoding
//! goes on from there, exactly what a forward pass over that window computes.

use super::gpu::GptGpu;
use super::units::DecodeCtx;
use crate::gpu::{DType, Gpu, GpuTensor};
use crate::kernels::Record;
use crate::kernels::decode::{AttendOne, MAX_POSITIONS};
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
    /// one-row forward of each unit of its architecture, in order. Fails where
    /// [`KvDecoder::supports`] is false.
    pub fn new(gpu: &Gpu, model: &GptGpu) -> Result<KvDecoder> {
        Self::check(gpu, model)?;
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
            positions: model.batch().seq,
            _buffers: buffers,
        })
    }

    /// Whether the decoder can serve `model` on `gpu`: every architecture kiln builds (learned
    /// positions or RoPE, multi-head or grouped-query attention), given a prefill model of one
    /// sequence of at most [`MAX_POSITIONS`] positions whose attention fits the adapter (see
    /// [`AttendOne::supports`]). Where it cannot, generation recomputes the window for each
    /// token.
    pub fn supports(gpu: &Gpu, model: &GptGpu) -> bool {
        Self::check(gpu, model).is_ok()
    }

    fn check(gpu: &Gpu, model: &GptGpu) -> Result<()> {
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
        for shape in model.arch().decode_attention_shapes(batch.seq) {
            if !AttendOne::supports(gpu, &shape) {
                return Err(Error::shape(
                    "kv decoder",
                    format!("{shape:?} runs past this adapter's loop budget"),
                ));
            }
        }
        Ok(())
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
