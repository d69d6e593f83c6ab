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
use crate::gpu::{DType, Gpu, GpuTensor};
use crate::kernels::Record;
use crate::kernels::activation::GeluForward;
use crate::kernels::decode::{AttendOne, EmbedOne, MAX_POSITIONS};
use crate::kernels::layernorm::LayerNormForward;
use crate::kernels::matmul::Matmul;
use crate::kernels::residual::ResidualForward;
use crate::ops::{LayerNormSpec, Layout, MatmulSpec};
use crate::{Error, Result};

/// The decode plan over a prefill model's weights and cache (see the module docs).
pub struct KvDecoder {
    step: GpuTensor,
    embed: EmbedOne,
    ops: Vec<Box<dyn Record>>,
    logits: GpuTensor,
    positions: usize,
    // Kept with the plan: the bind groups above refer to them.
    _buffers: Vec<GpuTensor>,
}

/// `y = x·Wᵀ (+ b)` for one row.
fn linear_one(
    gpu: &Gpu,
    y: &GpuTensor,
    x: &GpuTensor,
    w: &GpuTensor,
    b: Option<&GpuTensor>,
    fan_in: usize,
    fan_out: usize,
) -> Result<Box<dyn Record>> {
    Ok(Box::new(Matmul::new(
        gpu,
        y,
        x,
        w,
        b,
        &MatmulSpec::new(Layout::NT, 1, fan_out, fan_in),
    )?))
}

impl KvDecoder {
    /// Builds the plan for `model`, which must have been built for a batch of one sequence.
    pub fn new(gpu: &Gpu, model: &GptGpu) -> Result<KvDecoder> {
        let batch = model.batch();
        let cfg = model.model().clone();
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
        let (c, v) = (cfg.n_embd, model.vocab());
        let dt = DType::from(model.precision());
        let act = |name: &str, len: usize| gpu.zeros(name, &[len], dt);
        let stat = |name: &str| gpu.zeros(name, &[1], DType::F32);
        let step = gpu.zeros("decode step", &[2], DType::U32)?;
        let ln_spec = LayerNormSpec::new(1, c);
        let zero_bias = act("decode zero bias", c)?;
        let (mean, rstd) = (stat("decode mean")?, stat("decode rstd")?);
        let (x, ln, qkv) = (
            act("decode x", c)?,
            act("decode ln", c)?,
            act("decode qkv", 3 * c)?,
        );
        let (att, proj, resid) = (
            act("decode att", c)?,
            act("decode proj", c)?,
            act("decode resid", c)?,
        );
        let (fc, gelu, mlp, out) = (
            act("decode fc", 4 * c)?,
            act("decode gelu", 4 * c)?,
            act("decode mlp", c)?,
            act("decode x'", c)?,
        );
        let logits = act("decode logits", v)?;
        let wte = model.param("wte.weight")?;
        let embed = EmbedOne::new(gpu, &x, &step, &wte, &model.param("wpe.weight")?, c)?;

        let mut ops: Vec<Box<dyn Record>> = Vec::new();
        let norm =
            |ops: &mut Vec<Box<dyn Record>>, out: &GpuTensor, inp: &GpuTensor, name: &str| {
                let bias = model.param_opt(&format!("{name}.bias"))?;
                ops.push(Box::new(LayerNormForward::new(
                    gpu,
                    out,
                    &mean,
                    &rstd,
                    inp,
                    &model.param(&format!("{name}.weight"))?,
                    bias.as_ref().unwrap_or(&zero_bias),
                    &ln_spec,
                )?));
                Result::Ok(())
            };
        // Layers alternate between two residual-stream buffers: layer l reads xs[l % 2] and
        // writes xs[(l + 1) % 2].
        let xs = [&x, &out];
        for l in 0..cfg.n_layer {
            let name = |s: &str| format!("h.{l}.{s}");
            let (x, out) = (xs[l % 2], xs[(l + 1) % 2]);
            norm(&mut ops, &ln, x, &name("ln_1"))?;
            ops.push(linear_one(
                gpu,
                &qkv,
                &ln,
                &model.param(&name("attn.c_attn.weight"))?,
                model.param_opt(&name("attn.c_attn.bias"))?.as_ref(),
                c,
                3 * c,
            )?);
            ops.push(Box::new(AttendOne::new(
                gpu,
                &att,
                model.layer_qkv(l),
                &qkv,
                &step,
                cfg.n_head,
                c,
            )?));
            ops.push(linear_one(
                gpu,
                &proj,
                &att,
                &model.param(&name("attn.c_proj.weight"))?,
                model.param_opt(&name("attn.c_proj.bias"))?.as_ref(),
                c,
                c,
            )?);
            ops.push(Box::new(ResidualForward::new(gpu, &resid, x, &proj)?));
            norm(&mut ops, &ln, &resid, &name("ln_2"))?;
            ops.push(linear_one(
                gpu,
                &fc,
                &ln,
                &model.param(&name("mlp.c_fc.weight"))?,
                model.param_opt(&name("mlp.c_fc.bias"))?.as_ref(),
                c,
                4 * c,
            )?);
            ops.push(Box::new(GeluForward::new(gpu, &gelu, &fc)?));
            ops.push(linear_one(
                gpu,
                &mlp,
                &gelu,
                &model.param(&name("mlp.c_proj.weight"))?,
                model.param_opt(&name("mlp.c_proj.bias"))?.as_ref(),
                4 * c,
                c,
            )?);
            ops.push(Box::new(ResidualForward::new(gpu, out, &resid, &mlp)?));
        }
        norm(&mut ops, &ln, xs[cfg.n_layer % 2], "ln_f")?;
        ops.push(linear_one(gpu, &logits, &ln, &wte, None, c, v)?);
        gpu.check("preparing the decoder")?;
        Ok(KvDecoder {
            step,
            embed,
            ops,
            logits,
            positions: batch.seq,
            _buffers: vec![
                zero_bias, mean, rstd, x, ln, qkv, att, proj, resid, fc, gelu, mlp, out,
            ],
        })
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
            self.embed.record(pass);
            for op in &self.ops {
                op.record_into(pass);
            }
        })?;
        gpu.read(&self.logits)
    }
}
