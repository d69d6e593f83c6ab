//! The GPT on the GPU: every buffer and every dispatch of a training step built once, then
//! recorded each step with no allocation and no waiting on the host.
//!
//! Parameters live in one flat buffer (the working copy, in the storage precision) described by
//! [`ParamLayout`]; gradients (same precision) mirror it, as do the f32 master weights and Adam
//! moments. Kernels address single tensors through views of those buffers, which the layout
//! aligns to the adapter's storage-offset alignment. The forward, loss and backward of one
//! micro-batch are one list of prepared ops ([`Record`]), recorded by the units of the model's
//! architecture ([`super::arch`]); the optimizer is another. The CPU reference
//! ([`crate::cpu::gpt`]) walks the same units op for op, which is what the whole-step test
//! compares.

use super::arch::Arch;
use super::units::{GpuBackward, GpuCtx, Views};
use super::{ModelConfig, ParamLayout};
use crate::cpu::gpt::GptBatch;
use crate::finetune::Adaptation;
use crate::gpu::{DType, Gpu, GpuTensor};
use crate::kernels::adamw::AdamW;
use crate::kernels::census::{self, Census};
use crate::kernels::crossentropy::CrossEntropy;
use crate::kernels::dropout::DropoutState;
use crate::kernels::gradnorm::GradNorm;
use crate::kernels::lossscale::LossScaler;
use crate::kernels::quant::QuantWeight;
use crate::kernels::{Record, leaf_parts, record_ops};
use crate::quant::weights::ModelWeights;
use crate::training::{AdamWStep, CrossEntropySpec, LossScaling};
use crate::{Error, Precision, Result};
use std::collections::BTreeMap;

/// u32 words of a staged [`DropoutState`].
const DROPOUT_WORDS: usize = 4;

/// Buffers of the whole run (see the module docs).
pub struct GptGpu {
    model: ModelConfig,
    arch: Arch,
    vocab: usize,
    batch: GptBatch,
    precision: Precision,
    micro_batches: usize,
    dropout_seed: u64,
    /// `lora.dropout` of a training model (0 for inference, or without adapters).
    lora_dropout: f32,
    scaler: Option<LossScaler>,
    layout: ParamLayout,
    /// Quantised matrices by tensor name, outside the flat parameter buffer (inference only).
    quant: BTreeMap<String, QuantWeight>,
    /// The f32 values of the frozen tensors (the layout's tail past the trainable part), as
    /// last set: they have no master copy on the GPU, and a checkpoint saves them unrounded.
    frozen: std::sync::Mutex<Vec<f32>>,
    s: State,
    p: Plan,
}

/// Every buffer of the run that is not an activation: parameters, the micro-batch's tokens, the
/// step's scalars and, when training, gradients and optimizer state.
struct State {
    params: GpuTensor,
    tokens: GpuTensor,
    targets: GpuTensor,
    order: GpuTensor,
    starts: GpuTensor,
    loss_scale: GpuTensor,
    dropout_state: GpuTensor,
    /// The LoRA adapters' dropout state, staged after the model's: only for a training model
    /// whose adapters drop (`lora.dropout` > 0).
    lora_dropout_state: Option<GpuTensor>,
    losses: GpuTensor,
    ones: GpuTensor,
    /// `None` for a model built for inference ([`GptGpu::inference`]).
    optim: Option<Optim>,
}

/// The buffers only training needs: gradients, master weights, Adam moments, the update's
/// scalars and the staged micro-batches.
struct Optim {
    grads: GpuTensor,
    master: GpuTensor,
    exp_avg: GpuTensor,
    exp_avg_sq: GpuTensor,
    skipped: GpuTensor,
    norm: GpuTensor,
    flag: GpuTensor,
    staged: GpuTensor,
    scale_run: GpuTensor,
}

impl State {
    /// The buffers of a model over `layout`; with `micro_batches`, those of training too
    /// (with `lora_dropping`, the adapters' dropout state as well).
    fn new(
        gpu: &Gpu,
        layout: &ParamLayout,
        vocab: usize,
        batch: GptBatch,
        micro_batches: Option<usize>,
        lora_dropping: bool,
    ) -> Result<State> {
        let lora_dropping = lora_dropping && micro_batches.is_some();
        let dt = DType::from(gpu.precision());
        let n = layout.buffer_len();
        // Gradients, master weights and moments cover the trainable tensors, which the layout
        // puts first (all of them unless some are frozen).
        let tn = layout.trainable_len();
        let bt = batch.batch * batch.seq;
        let optim = match micro_batches {
            None => None,
            Some(micro_batches) => Some(Optim {
                grads: gpu.zeros("grads", &[tn], dt)?,
                master: gpu.zeros("master", &[tn], DType::F32)?,
                exp_avg: gpu.zeros("adam m", &[tn], DType::F32)?,
                exp_avg_sq: gpu.zeros("adam v", &[tn], DType::F32)?,
                skipped: gpu.zeros("skipped steps", &[1], DType::U32)?,
                norm: gpu.zeros("grad norm", &[1], DType::F32)?,
                flag: gpu.zeros("nonfinite flag", &[1], DType::U32)?,
                // Every micro-batch of a step is uploaded at once and copied into place inside
                // the step's single submission (see `step`).
                staged: gpu.zeros(
                    "staged batches",
                    &[micro_batches * staged_words(bt, vocab, lora_dropping)],
                    DType::U32,
                )?,
                // The loss scale's run of clean steps.
                scale_run: gpu.zeros("loss scale clean run", &[1], DType::U32)?,
            }),
        };
        Ok(State {
            params: gpu.zeros("params", &[n], dt)?,
            tokens: gpu.zeros("tokens", &[bt], DType::U32)?,
            targets: gpu.zeros("targets", &[bt], DType::U32)?,
            order: gpu.zeros("token order", &[bt], DType::U32)?,
            starts: gpu.zeros("token starts", &[vocab + 1], DType::U32)?,
            // The dynamic loss scale (1 until enable_loss_scaling).
            loss_scale: gpu.upload("loss scale", &[1], DType::F32, &[1.0])?,
            // Staged with each micro-batch (a fresh mask per step and micro-batch); off until
            // then.
            dropout_state: gpu.zeros("dropout state", &[DROPOUT_WORDS], DType::U32)?,
            lora_dropout_state: if lora_dropping {
                Some(gpu.zeros("lora dropout state", &[DROPOUT_WORDS], DType::U32)?)
            } else {
                None
            },
            losses: gpu.zeros("losses", &[bt], DType::F32)?,
            ones: gpu.upload("ones", &[bt], dt, &vec![1.0; bt])?,
            optim,
        })
    }
}

/// u32 words of one staged micro-batch of `bt` tokens over `vocab`: tokens, targets, the token
/// index, the model's dropout state and, when the adapters drop, theirs.
fn staged_words(bt: usize, vocab: usize, lora_dropping: bool) -> usize {
    3 * bt + vocab + 1 + DROPOUT_WORDS * (1 + usize::from(lora_dropping))
}

/// The prepared ops of a step: forward, loss and, when training, backward (the architecture's
/// units) and update.
struct Plan {
    forward: Vec<Box<dyn Record>>,
    loss: CrossEntropy,
    train: Option<TrainPlan>,
    logits: GpuTensor,
    /// Each layer's q|k|v activation (the decoder's cache).
    qkv: Vec<GpuTensor>,
    /// Each routed MLP's statistics of the micro-batch last run forward.
    moe_stats: Vec<GpuTensor>,
    // Kept alive for the bind groups above (wgpu keeps buffers alive through bind groups too;
    // holding them also lets tests read intermediate values).
    _states: Vec<Box<dyn GpuBackward>>,
    _scratch: Vec<GpuTensor>,
}

/// The training half of a plan.
struct TrainPlan {
    backward: Vec<Box<dyn Record>>,
    update: Vec<Box<dyn Record>>,
    adamw: AdamW,
}

impl Plan {
    #[allow(clippy::too_many_arguments)]
    fn new(
        gpu: &Gpu,
        model: &ModelConfig,
        arch: &Arch,
        layout: &ParamLayout,
        s: &State,
        quant: &BTreeMap<String, QuantWeight>,
        vocab: usize,
        batch: GptBatch,
    ) -> Result<Plan> {
        // An inference plan records no backward, which alone reads the gradient views: they
        // view the parameters, never read. Frozen tensors have no gradient view.
        let grads = s.optim.as_ref().map_or(&s.params, |o| &o.grads);
        let grad_layout = layout.trainable_layout();
        let mut ctx = GpuCtx::new(
            gpu,
            model,
            batch,
            Views {
                layout,
                flat: &s.params,
            },
            Views {
                layout: &grad_layout,
                flat: grads,
            },
            &s.tokens,
            &s.order,
            &s.starts,
            &s.dropout_state,
            &s.ones,
        );
        ctx.quant = quant;
        ctx.inference = s.optim.is_none();
        ctx.lora_dropout = s.lora_dropout_state.as_ref();
        ctx.loss_scale = Some(&s.loss_scale);
        let mut forward: Vec<Box<dyn Record>> = Vec::new();
        let (states, logits) = arch.gpu_forward(&mut ctx, &mut forward)?;
        // The loss: per-row loss and dlogits in one kernel.
        let bt = ctx.rows();
        let dlogits = ctx.act("dlogits", bt * vocab)?;
        let loss = CrossEntropy::new(
            gpu,
            &s.losses,
            &dlogits,
            &logits,
            &s.targets,
            Some(&s.loss_scale),
            &CrossEntropySpec::new(bt, vocab),
        )?;
        let train = match &s.optim {
            None => None,
            Some(o) => {
                // The backward: the units in reverse.
                let mut backward: Vec<Box<dyn Record>> = Vec::new();
                Arch::gpu_backward(&states, &mut ctx, &mut backward, &dlogits)?;
                // The update: global norm, then AdamW over the whole buffer.
                let grad_norm = GradNorm::new(gpu, &o.norm, &o.flag, &o.grads)?;
                // AdamW writes the working copy at the master's offsets: the trainable prefix.
                let working = if grad_layout.buffer_len() == layout.buffer_len() {
                    super::units::alias(&s.params)?
                } else {
                    s.params
                        .view("trainable params", 0, &[grad_layout.buffer_len()])?
                };
                let adamw = AdamW::new(
                    gpu,
                    &o.master,
                    &working,
                    &o.exp_avg,
                    &o.exp_avg_sq,
                    &o.skipped,
                    &o.grads,
                    &o.norm,
                    &o.flag,
                    &s.loss_scale,
                    &grad_layout.adamw_segments(),
                    &AdamWStep::new(1),
                )?;
                Some(TrainPlan {
                    backward,
                    update: vec![Box::new(grad_norm)],
                    adamw,
                })
            }
        };
        // Every recorder of these lists goes through `record_ops`, so their products may fill
        // packed operands by copies.
        let mut train = train;
        for op in forward
            .iter_mut()
            .chain(train.iter_mut().flat_map(|t| t.backward.iter_mut()))
        {
            op.allow_copies();
        }
        let moe_stats = std::mem::take(&mut ctx.moe_stats);
        let (mut scratch, qkv) = ctx.into_shared();
        scratch.push(dlogits);
        Ok(Plan {
            forward,
            loss,
            train,
            logits,
            qkv,
            moe_stats,
            _states: states,
            _scratch: scratch,
        })
    }
}

/// One op of a training step, timed ([`GptGpu::profile`], [`GptGpu::profile_in_step`]).
#[derive(Clone, Debug, serde::Serialize)]
pub struct OpTime {
    /// `forward`, `loss`, `backward` or `update`.
    pub phase: &'static str,
    /// The op's type, e.g. `matmul::Matmul`.
    pub name: &'static str,
    /// Median seconds: of the op submitted alone, submit to completion
    /// ([`GptGpu::profile`]), or on the GPU between the timestamps around its pass inside one
    /// submission of the whole step ([`GptGpu::profile_in_step`]).
    pub seconds: f64,
    /// What recording the op issues: dispatches, bytes bound, FLOPs.
    pub census: Census,
}

impl GptGpu {
    /// Allocates every buffer and prepares every dispatch for micro-batches of `batch`.
    /// `micro_batches` is the most micro-batches one optimizer step will use (gradient
    /// accumulation): their token buffers are allocated here too.
    pub fn new(
        gpu: &Gpu,
        model: &ModelConfig,
        vocab: usize,
        batch: GptBatch,
        micro_batches: usize,
    ) -> Result<Self> {
        Self::adapted(
            gpu,
            model,
            &Adaptation::default(),
            vocab,
            batch,
            micro_batches,
        )
    }

    /// [`GptGpu::new`] for a model adapted by `adapt` (`[finetune]` freezing, `[lora]`
    /// adapters): its layout puts the trainable tensors first, and gradients, master weights
    /// and moments exist for those only ([`crate::finetune::layout`]).
    pub fn adapted(
        gpu: &Gpu,
        model: &ModelConfig,
        adapt: &Adaptation,
        vocab: usize,
        batch: GptBatch,
        micro_batches: usize,
    ) -> Result<Self> {
        if micro_batches == 0 {
            return Err(Error::invalid(
                "train.grad_accum_steps",
                0,
                "must be at least 1",
            ));
        }
        check_batch(model, batch)?;
        let arch = Arch::new(model, vocab)?;
        let layout = crate::finetune::layout::adapted(model, vocab, param_alignment(gpu), adapt)?;
        let quant = BTreeMap::new();
        let lora_dropout = adapt.lora.as_ref().map_or(0.0, |l| l.dropout);
        Self::build(
            gpu,
            model,
            arch,
            vocab,
            batch,
            layout,
            quant,
            Some(micro_batches),
            lora_dropout,
        )
    }

    /// The parameter layout a training model of a run of `config` (its `[finetune]` and
    /// `[lora]` tables included) with `vocab` tokens has on `gpu`.
    pub fn config_layout(gpu: &Gpu, config: &crate::Config, vocab: usize) -> Result<ParamLayout> {
        ParamLayout::for_config(config, vocab, param_alignment(gpu))
    }

    /// The parameter layout a training model of `model` with `vocab` tokens has on `gpu`
    /// (what [`GptGpu::read_master`] returns values for).
    pub fn training_layout(gpu: &Gpu, model: &ModelConfig, vocab: usize) -> Result<ParamLayout> {
        Ok(Arch::new(model, vocab)?.layout(param_alignment(gpu)))
    }

    /// A model for inference over `batch` with `weights` (a float or a quantised checkpoint's):
    /// the forward and the loss only. The float tensors live in the flat parameter buffer in
    /// the storage precision and the quantised matrices as packed integers beside it, which the
    /// units' products and embedding lookups read directly; nothing for training is allocated
    /// (no gradients, master weights or Adam moments: a fifth of a training model's weight
    /// memory in f32), and the methods that train refuse with an error.
    pub fn inference(gpu: &Gpu, weights: &ModelWeights, batch: GptBatch) -> Result<Self> {
        let model = &weights.config.model;
        let vocab = weights.vocab;
        check_batch(model, batch)?;
        let arch = Arch::new(model, vocab)?;
        let align = param_alignment(gpu);
        // Inference trains nothing: only the adapters change the layout.
        let adapt = Adaptation {
            freeze: Vec::new(),
            lora: weights.config.lora.clone(),
        };
        let full = crate::finetune::layout::adapted(model, vocab, align, &adapt)?;
        let quant = upload_quantized(gpu, model, &full, weights)?;
        let layout = full.filtered(align, |t| !quant.contains_key(&t.name));
        let values = float_values(&layout, weights)?;
        // Nothing drops at inference, the adapters included.
        let built = Self::build(gpu, model, arch, vocab, batch, layout, quant, None, 0.0)?;
        gpu.write(&built.s.params, &values)?;
        Ok(built)
    }

    /// The model over `layout` (its float tensors) and `quant`, for training with
    /// `micro_batches`, or for inference.
    #[allow(clippy::too_many_arguments)]
    fn build(
        gpu: &Gpu,
        model: &ModelConfig,
        arch: Arch,
        vocab: usize,
        batch: GptBatch,
        layout: ParamLayout,
        quant: BTreeMap<String, QuantWeight>,
        micro_batches: Option<usize>,
        lora_dropout: f32,
    ) -> Result<Self> {
        // Adapter dropout needs adapters to act on; a layout without them records nothing
        // for it, so no state is allocated either.
        let lora_dropout = if layout.lora_scale().is_some() && micro_batches.is_some() {
            lora_dropout
        } else {
            0.0
        };
        let state = State::new(
            gpu,
            &layout,
            vocab,
            batch,
            micro_batches,
            lora_dropout > 0.0,
        )?;
        // Nothing drops at inference: no dropout buffers or dispatches.
        let plan_model = ModelConfig {
            dropout: if micro_batches.is_some() {
                model.dropout
            } else {
                0.0
            },
            ..model.clone()
        };
        let plan = Plan::new(
            gpu,
            &plan_model,
            &arch,
            &layout,
            &state,
            &quant,
            vocab,
            batch,
        )?;
        Ok(GptGpu {
            model: model.clone(),
            arch,
            vocab,
            batch,
            precision: gpu.precision(),
            micro_batches: micro_batches.unwrap_or(0),
            dropout_seed: 0,
            lora_dropout,
            scaler: None,
            frozen: std::sync::Mutex::new(vec![0.0; layout.buffer_len() - layout.trainable_len()]),
            layout,
            quant,
            s: state,
            p: plan,
        })
    }

    /// Bytes of weights resident on the GPU: the flat parameter buffer (alignment padding
    /// included) and the quantised matrices' integers and scales.
    pub fn weight_bytes(&self) -> WeightBytes {
        WeightBytes {
            float: self.s.params.bytes(),
            packed: self.quant.values().map(QuantWeight::packed_bytes).sum(),
            scales: self.quant.values().map(QuantWeight::scale_bytes).sum(),
        }
    }

    /// The quantised matrix called `name`, if the model has one (inference models of quantised
    /// checkpoints).
    pub(crate) fn quantized(&self, name: &str) -> Option<&QuantWeight> {
        self.quant.get(name)
    }

    /// The training buffers, or the error for a model built for inference.
    fn optim(&self) -> Result<&Optim> {
        self.s.optim.as_ref().ok_or_else(inference_only)
    }

    /// The parameter layout (aligned for this adapter).
    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    /// Storage precision of parameters, gradients and activations.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The micro-batch geometry the plan was built for.
    pub fn batch(&self) -> GptBatch {
        self.batch
    }

    /// Number of compute dispatches one optimizer step with `micro_batches` micro-batches
    /// records, counted by recording them (the census) into an encoder that is never
    /// submitted; 0 for a model built for inference.
    pub fn dispatches_per_step(&self, gpu: &Gpu, micro_batches: usize) -> u64 {
        if self.p.train.is_none() {
            return 0;
        }
        let micro = census::encoded(gpu, |encoder| self.record_micro_batch(encoder));
        let update = census::recorded(gpu, |pass| self.record_update(pass));
        micro_batches as u64 * micro.dispatches + update.dispatches
    }

    /// Sets the f32 master weights and the working copy from a flat buffer laid out by
    /// [`GptGpu::layout`], and zeroes the Adam moments.
    pub fn set_weights(&self, gpu: &Gpu, master: &[f32]) -> Result<()> {
        self.set_state(gpu, master, None)
    }

    /// Sets master weights, working copy and (when given) the Adam moments, e.g. from a checkpoint.
    pub fn set_state(
        &self,
        gpu: &Gpu,
        master: &[f32],
        moments: Option<(&[f32], &[f32])>,
    ) -> Result<()> {
        let o = self.optim()?;
        // The trainable prefix has master weights and moments; the frozen tail lives in the
        // working copy (and, unrounded, on the host).
        let tn = self.layout.trainable_len();
        if master.len() != self.layout.buffer_len() {
            return Err(Error::shape(
                "gpt",
                format!(
                    "weights of {} elements for a layout of {}",
                    master.len(),
                    self.layout.buffer_len()
                ),
            ));
        }
        gpu.write(&o.master, &master[..tn])?;
        gpu.write(&self.s.params, master)?;
        *self.frozen.lock().map_err(|_| poisoned())? = master[tn..].to_vec();
        match moments {
            Some((m, v)) => {
                gpu.write(&o.exp_avg, &m[..tn.min(m.len())])?;
                gpu.write(&o.exp_avg_sq, &v[..tn.min(v.len())])?;
            }
            None => {
                let zeros = vec![0.0; tn];
                gpu.write(&o.exp_avg, &zeros)?;
                gpu.write(&o.exp_avg_sq, &zeros)?;
            }
        }
        Ok(())
    }

    /// The u32 words of one micro-batch as the GPU wants them: tokens, targets, then the token
    /// index (positions grouped by token, and each token's start) the embedding backward uses,
    /// then the model's dropout state and, when the adapters drop, theirs (`lora`).
    fn batch_words(
        &self,
        inputs: &[u32],
        targets: &[u32],
        dropout: &DropoutState,
        lora: &DropoutState,
    ) -> Result<Vec<u32>> {
        let n = self.batch.batch * self.batch.seq;
        if inputs.len() != n || targets.len() != n {
            return Err(Error::shape(
                "gpt",
                format!(
                    "a micro-batch needs {n} inputs and targets, got {} and {}",
                    inputs.len(),
                    targets.len()
                ),
            ));
        }
        if let Some(t) = targets
            .iter()
            .find(|&&t| t != u32::MAX && t as usize >= self.vocab)
        {
            return Err(Error::shape(
                "gpt",
                format!("target {t} is outside the vocabulary of {}", self.vocab),
            ));
        }
        let (order, starts) = crate::cpu::embedding::token_index(inputs, self.vocab)?;
        let mut words = Vec::with_capacity(3 * n + starts.len());
        words.extend_from_slice(inputs);
        words.extend_from_slice(targets);
        words.extend_from_slice(&order);
        words.extend_from_slice(&starts);
        words.extend_from_slice(bytemuck::cast_slice(std::slice::from_ref(dropout)));
        if self.s.lora_dropout_state.is_some() {
            words.extend_from_slice(bytemuck::cast_slice(std::slice::from_ref(lora)));
        }
        Ok(words)
    }

    /// Records the copies that put staged micro-batch `i` in place for the next pass.
    fn record_unstage(&self, staged: &GpuTensor, encoder: &mut wgpu::CommandEncoder, i: usize) {
        let bt = self.batch.batch * self.batch.seq;
        let n = bt as u64;
        let lora = self.s.lora_dropout_state.as_ref();
        let words = staged_words(bt, self.vocab, lora.is_some()) as u64;
        let mut from = staged.offset_bytes() + 4 * words * i as u64;
        let src = staged.buffer();
        let copies = [
            (&self.s.tokens, n),
            (&self.s.targets, n),
            (&self.s.order, n),
            (&self.s.starts, self.vocab as u64 + 1),
            (&self.s.dropout_state, DROPOUT_WORDS as u64),
        ];
        let lora = lora.map(|t| (t, DROPOUT_WORDS as u64));
        for (dst, len) in copies.into_iter().chain(lora) {
            encoder.copy_buffer_to_buffer(src, from, dst.buffer(), dst.offset_bytes(), 4 * len);
            from += 4 * len;
        }
    }

    /// Writes one micro-batch directly, with dropout off (evaluation and tests; a training step
    /// stages its micro-batches instead). See [`GptGpu::set_dropout`] to turn it on.
    pub fn set_batch(&self, gpu: &Gpu, inputs: &[u32], targets: &[u32]) -> Result<()> {
        let off = DropoutState::off();
        let words = self.batch_words(inputs, targets, &off, &off)?;
        let n = inputs.len();
        let q = gpu.queue();
        let lora = self.s.lora_dropout_state.as_ref();
        let end = words.len() - DROPOUT_WORDS * (1 + usize::from(lora.is_some()));
        let copies = [
            (&self.s.tokens, 0..n),
            (&self.s.targets, n..2 * n),
            (&self.s.order, 2 * n..3 * n),
            (&self.s.starts, 3 * n..end),
            (&self.s.dropout_state, end..end + DROPOUT_WORDS),
        ];
        let lora = lora.map(|t| (t, end + DROPOUT_WORDS..words.len()));
        for (dst, range) in copies.into_iter().chain(lora) {
            q.write_buffer(
                dst.buffer(),
                dst.offset_bytes(),
                bytemuck::cast_slice(&words[range]),
            );
        }
        Ok(())
    }

    /// Records forward, loss and backward of the micro-batch last set; parameter gradients are
    /// added to the gradient buffer (see [`GptGpu::record_zero_grads`]). A model built for
    /// inference has no backward: this records its forward and loss.
    ///
    /// Compute passes, with copies between them where a product fills a packed operand by copy
    /// ([`crate::kernels::record_ops`]).
    pub fn record_micro_batch(&self, encoder: &mut wgpu::CommandEncoder) {
        let backward = self.p.train.iter().flat_map(|t| &t.backward);
        record_ops(
            encoder,
            "micro-batch",
            self.eval_ops().chain(backward.map(|o| o.as_ref())),
        );
    }

    /// Records forward and loss only (evaluation).
    pub fn record_eval(&self, encoder: &mut wgpu::CommandEncoder) {
        record_ops(encoder, "eval", self.eval_ops());
    }

    /// Records the forward to the logits only (inference).
    pub fn record_logits(&self, encoder: &mut wgpu::CommandEncoder) {
        record_ops(
            encoder,
            "forward",
            self.p.forward.iter().map(|o| o.as_ref()),
        );
    }

    /// The forward's ops and the loss, in recording order.
    fn eval_ops(&self) -> impl Iterator<Item = &dyn Record> {
        let loss = std::iter::once(&self.p.loss as &dyn Record);
        self.p.forward.iter().map(|o| o.as_ref()).chain(loss)
    }

    /// Clears the gradient buffer (before the first micro-batch of a step; nothing for a
    /// model built for inference).
    pub fn record_zero_grads(&self, encoder: &mut wgpu::CommandEncoder) {
        if let Some(o) = &self.s.optim {
            encoder.clear_buffer(o.grads.buffer(), 0, None);
        }
    }

    /// Records gradient norm, AdamW (whose step values [`GptGpu::set_step`] wrote) and, when
    /// enabled, the loss-scale update (nothing for a model built for inference).
    pub fn record_update(&self, pass: &mut wgpu::ComputePass<'_>) {
        let Some(t) = &self.p.train else { return };
        for op in &t.update {
            op.record_into(pass);
        }
        t.adamw.record(pass);
        if let Some(scaler) = &self.scaler {
            scaler.record(pass);
        }
    }

    /// Writes the optimizer's per-step values for a step of `micro_batches`.
    ///
    /// Each micro-batch adds the (loss-scaled) gradient of its own mean loss to the gradient
    /// buffer, so the sum is `micro_batches` times the gradient of the step's mean loss: AdamW
    /// divides by `step.loss_scale × micro_batches × ` the dynamic scale.
    pub fn set_step(&self, gpu: &Gpu, step: &AdamWStep, micro_batches: usize) -> Result<()> {
        let mut step = *step;
        step.loss_scale *= micro_batches as f64;
        let t = self.p.train.as_ref().ok_or_else(inference_only)?;
        t.adamw.set_step(gpu, &step)
    }

    /// Seeds the dropout masks of the training steps: step `t`'s micro-batch `i` uses the stream
    /// [`DropoutState::key_for`]`(seed, t, i)`, so a resumed run draws the same masks.
    pub fn set_dropout_seed(&mut self, seed: u64) {
        self.dropout_seed = seed;
    }

    /// Sets the dropout of the next passes recorded after [`GptGpu::set_batch`] (tests use it to
    /// run a forward and backward with a known mask).
    pub fn set_dropout(&self, gpu: &Gpu, state: &DropoutState) -> Result<()> {
        crate::kernels::dropout::write_state(gpu, &self.s.dropout_state, state)
    }

    /// Turns on dynamic loss scaling (for f16 gradients): from the next step on, the loss
    /// gradient is multiplied by a scale that backs off when gradients overflow and grows after
    /// a run of clean steps, all on the GPU. Sets the scale to `settings.init_scale`.
    pub fn enable_loss_scaling(&mut self, gpu: &Gpu, settings: &LossScaling) -> Result<()> {
        let o = self.optim()?;
        let scaler = LossScaler::new(gpu, &self.s.loss_scale, &o.scale_run, &o.flag, settings)?;
        self.scaler = Some(scaler);
        self.set_loss_scale_state(gpu, settings.init_scale, 0)
    }

    /// The dynamic loss scale and its run of clean steps (waits for the device).
    pub fn loss_scale_state(&self, gpu: &Gpu) -> Result<(f32, u32)> {
        Ok((
            gpu.read(&self.s.loss_scale)?[0],
            gpu.read_u32(&self.optim()?.scale_run)?[0],
        ))
    }

    /// Restores the dynamic loss scale and its run of clean steps (a resumed run).
    pub fn set_loss_scale_state(&self, gpu: &Gpu, scale: f32, run: u32) -> Result<()> {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(Error::invalid(
                "loss scale",
                scale,
                "must be finite and > 0",
            ));
        }
        let o = self.optim()?;
        gpu.write(&self.s.loss_scale, &[scale])?;
        gpu.write_u32(&o.scale_run, &[run])
    }

    /// One optimizer step over `micro` (inputs, targets) pairs as ONE submission: the
    /// micro-batches are uploaded together, then the command buffer clears the gradients, and for
    /// each micro-batch copies its tokens into place and records forward, loss and backward, and
    /// ends with the update. `after` may append more (the training loop's loss copy). Returns
    /// the host seconds spent encoding (before the submit).
    pub fn step(
        &self,
        gpu: &Gpu,
        micro: &[(Vec<u32>, Vec<u32>)],
        step: &AdamWStep,
        after: impl FnOnce(&mut wgpu::CommandEncoder),
    ) -> Result<f64> {
        let start = std::time::Instant::now();
        let mut encoder = self.encode_micro_batches(gpu, micro, step)?;
        self.encode_update(&mut encoder);
        after(&mut encoder);
        let commands = encoder.finish();
        let encode_s = start.elapsed().as_secs_f64();
        gpu.queue().submit([commands]);
        gpu.check("training step")?;
        Ok(encode_s)
    }

    /// The first half of [`GptGpu::step`] as its own submission: the gradients cleared and
    /// every micro-batch's forward, loss and backward, with the update left for
    /// [`GptGpu::step_update`]. Data-parallel training averages the gradient buffer across ranks
    /// between the two. Returns the host seconds spent encoding.
    pub fn step_backward(
        &self,
        gpu: &Gpu,
        micro: &[(Vec<u32>, Vec<u32>)],
        step: &AdamWStep,
    ) -> Result<f64> {
        let start = std::time::Instant::now();
        let encoder = self.encode_micro_batches(gpu, micro, step)?;
        let commands = encoder.finish();
        let encode_s = start.elapsed().as_secs_f64();
        gpu.queue().submit([commands]);
        gpu.check("training step (forward and backward)")?;
        Ok(encode_s)
    }

    /// The second half of [`GptGpu::step`] after [`GptGpu::step_backward`]: gradient norm,
    /// AdamW and the loss-scale update, then `after`, as one submission.
    pub fn step_update(
        &self,
        gpu: &Gpu,
        after: impl FnOnce(&mut wgpu::CommandEncoder),
    ) -> Result<()> {
        let mut encoder = gpu
            .device()
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("training step update"),
            });
        self.encode_update(&mut encoder);
        after(&mut encoder);
        gpu.queue().submit([encoder.finish()]);
        gpu.check("training step (update)")
    }

    /// Writes the step's values and its staged micro-batches, and returns an encoder holding
    /// the gradient clear and every micro-batch's forward, loss and backward.
    fn encode_micro_batches(
        &self,
        gpu: &Gpu,
        micro: &[(Vec<u32>, Vec<u32>)],
        step: &AdamWStep,
    ) -> Result<wgpu::CommandEncoder> {
        let staged = &self.optim()?.staged;
        if micro.is_empty() || micro.len() > self.micro_batches {
            return Err(Error::shape(
                "gpt",
                format!(
                    "a step takes 1 to {} micro-batches (as built), got {}",
                    self.micro_batches,
                    micro.len()
                ),
            ));
        }
        self.set_step(gpu, step, micro.len())?;
        let mut words = Vec::new();
        for (i, (inputs, targets)) in micro.iter().enumerate() {
            let key = DropoutState::key_for(self.dropout_seed, u64::from(step.t), i as u32);
            let dropout = DropoutState::new(self.model.dropout, key);
            // The adapters' masks share the key; their sites set them apart
            // (units::lora_dropout_site).
            let lora = DropoutState::new(self.lora_dropout, key);
            words.extend(self.batch_words(inputs, targets, &dropout, &lora)?);
        }
        gpu.queue().write_buffer(
            staged.buffer(),
            staged.offset_bytes(),
            bytemuck::cast_slice(&words),
        );
        let mut encoder = gpu
            .device()
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("training step"),
            });
        self.record_zero_grads(&mut encoder);
        for i in 0..micro.len() {
            self.record_unstage(staged, &mut encoder, i);
            self.record_micro_batch(&mut encoder);
        }
        Ok(encoder)
    }

    /// The update's compute pass (see [`GptGpu::record_update`]).
    fn encode_update(&self, encoder: &mut wgpu::CommandEncoder) {
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("update"),
            timestamp_writes: None,
        });
        self.record_update(&mut pass);
    }

    /// Times every prepared op of a step on its own: [`GptGpu::profile_rounds`] without a hook,
    /// `runs` rounds in which each op is submitted alone twice, waited for, and the second run
    /// timed; median kept. Runs the update too, so the weights change; use a
    /// model built for profiling, with a batch already set ([`GptGpu::set_batch`]) and the step
    /// values written ([`GptGpu::set_step`]). Each time includes one submission's overhead,
    /// which a real step pays once for all ops.
    pub fn profile(&self, gpu: &Gpu, runs: usize) -> Result<Vec<OpTime>> {
        self.profile_rounds(gpu, runs, |_| Ok(()))
    }

    /// [`GptGpu::profile`] in rounds: `before(0)`, a warm-up of the hook alone, then `runs`
    /// times `before(round)` and every op in recording order, each submitted alone twice in a
    /// row with the second run timed (as a benchmark repeats a kernel: an op timed once after
    /// its neighbours ran slower than inside the step, its data and code cold). Whatever
    /// `before` times (`profile_step` times a whole step there) is then measured in the same
    /// moments as the ops, so a machine whose speed drifts between the two measurements (a shared
    /// CPU under a software adapter swings by a third within minutes) moves both alike rather
    /// than skewing their ratio.
    pub fn profile_rounds(
        &self,
        gpu: &Gpu,
        runs: usize,
        mut before: impl FnMut(usize) -> Result<()>,
    ) -> Result<Vec<OpTime>> {
        let ops = self.step_ops()?;
        let mut times = vec![Vec::with_capacity(runs); ops.len()];
        before(0)?;
        for round in 1..=runs {
            before(round)?;
            for ((_, op), t) in ops.iter().zip(&mut times) {
                let record = |e: &mut wgpu::CommandEncoder| record_ops(e, op.op_name(), [*op]);
                t.push(gpu.time_submissions(op.op_name(), 1, 1, record)?[0]);
            }
        }
        Ok(ops
            .iter()
            .zip(times)
            .map(|(&(phase, op), t)| OpTime {
                phase,
                name: op.op_name(),
                seconds: crate::gpu::median(&t),
                census: census::recorded(gpu, |pass| op.record_into(pass)),
            })
            .collect())
    }

    /// Times every op of a step inside one submission of the whole step (one micro-batch, as
    /// [`GptGpu::step`] records it less the batch upload and the read-back copies), each op in
    /// its own compute pass between GPU timestamps; the median of `runs` submissions after
    /// one warm-up. `None` when the adapter has no timestamp queries (then
    /// [`GptGpu::profile`] is the fallback). Set the batch and the step's values first
    /// ([`GptGpu::set_batch`], [`GptGpu::set_step`]). Like [`GptGpu::profile`], this changes
    /// the weights (the update runs `runs + 1` times, on gradients that accumulate): profile a
    /// model built for the purpose, not one being trained.
    pub fn profile_in_step(&self, gpu: &Gpu, runs: usize) -> Result<Option<Vec<OpTime>>> {
        let ops = self.step_ops()?;
        // An op recorded in parts (copies between its dispatches) is timed part by part, one
        // pass each, and its time is their sum.
        let leaves: Vec<(usize, &dyn Record)> = ops
            .iter()
            .enumerate()
            .flat_map(|(i, &(_, op))| leaf_parts(op).into_iter().map(move |l| (i, l)))
            .collect();
        let Some(leaf_times) = gpu.time_passes(
            "step profile",
            leaves.len(),
            1,
            runs,
            |i, encoder| leaves[i].1.record_copies(encoder),
            |i, pass| leaves[i].1.record_into(pass),
        )?
        else {
            return Ok(None);
        };
        let mut times = vec![vec![0.0; runs]; ops.len()];
        for (&(op, _), t) in leaves.iter().zip(&leaf_times) {
            for (sum, x) in times[op].iter_mut().zip(t) {
                *sum += x;
            }
        }
        Ok(Some(
            ops.iter()
                .zip(times)
                .map(|(&(phase, op), t)| OpTime {
                    phase,
                    name: op.op_name(),
                    seconds: crate::gpu::median(&t),
                    census: census::recorded(gpu, |pass| op.record_into(pass)),
                })
                .collect(),
        ))
    }

    /// The ops of a one-micro-batch step in recording order, with their phase: what
    /// [`GptGpu::record_micro_batch`] and [`GptGpu::record_update`] record.
    fn step_ops(&self) -> Result<Vec<(&'static str, &dyn Record)>> {
        let t = self.p.train.as_ref().ok_or_else(inference_only)?;
        let mut ops: Vec<(&'static str, &dyn Record)> = Vec::new();
        ops.extend(self.p.forward.iter().map(|o| ("forward", o.as_ref())));
        ops.push(("loss", &self.p.loss as &dyn Record));
        ops.extend(t.backward.iter().map(|o| ("backward", o.as_ref())));
        ops.extend(t.update.iter().map(|o| ("update", o.as_ref())));
        ops.push(("update", &t.adamw as &dyn Record));
        if let Some(scaler) = &self.scaler {
            ops.push(("update", scaler as &dyn Record));
        }
        Ok(ops)
    }

    /// Mean loss over the non-ignored targets of the micro-batch last run (waits for the device).
    pub fn read_loss(&self, gpu: &Gpu) -> Result<f32> {
        let losses = gpu.read(&self.s.losses)?;
        let count = gpu.read_u32(self.p.loss.count())?[0].max(1);
        Ok((losses.iter().map(|&l| f64::from(l)).sum::<f64>() / f64::from(count)) as f32)
    }

    /// The one-element u32 tensor holding the number of non-ignored targets of the last loss.
    pub fn target_count(&self) -> &GpuTensor {
        self.p.loss.count()
    }

    /// The whole gradient buffer as f32 (waits), laid out by [`GptGpu::layout`]: the
    /// trainable tensors' part of it (`layout().trainable_len()` elements; all of it unless
    /// some tensors are frozen).
    pub fn read_grads(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        gpu.read(&self.optim()?.grads)
    }

    /// The f32 master weights of every tensor, laid out by [`GptGpu::layout`] (waits): the
    /// trainable ones from the GPU, the frozen ones as they were set.
    pub fn read_master(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        let mut out = gpu.read(&self.optim()?.master)?;
        out.extend_from_slice(&self.frozen.lock().map_err(|_| poisoned())?);
        Ok(out)
    }

    /// The Adam moments, laid out by [`GptGpu::layout`] (waits); zero for frozen tensors.
    pub fn read_moments(&self, gpu: &Gpu) -> Result<(Vec<f32>, Vec<f32>)> {
        let o = self.optim()?;
        let n = self.layout.buffer_len();
        let (mut m, mut v) = (gpu.read(&o.exp_avg)?, gpu.read(&o.exp_avg_sq)?);
        m.resize(n, 0.0);
        v.resize(n, 0.0);
        Ok((m, v))
    }

    /// The working copy of every parameter, in the storage precision read back as f32 (waits).
    pub fn read_params(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        gpu.read(&self.s.params)
    }

    /// Steps skipped for non-finite gradients so far, the last global norm and its flag (waits).
    pub fn read_update_stats(&self, gpu: &Gpu) -> Result<(u32, f32, u32)> {
        let o = self.optim()?;
        Ok((
            gpu.read_u32(&o.skipped)?[0],
            gpu.read(&o.norm)?[0],
            gpu.read_u32(&o.flag)?[0],
        ))
    }

    /// The logits of the micro-batch last run (waits).
    pub fn read_logits(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        gpu.read(&self.p.logits)
    }

    /// One position's logits of the batch last run forward (waits).
    pub fn read_logits_row(&self, gpu: &Gpu, row: usize) -> Result<Vec<f32>> {
        let view = self
            .p
            .logits
            .view("logits row", row * self.vocab, &[self.vocab])?;
        gpu.read(&view)
    }

    /// Each routed MLP's statistics buffer (f32, [`crate::kernels::moe::stats_len`] of its
    /// experts), in layer order, written by every forward: the training loop copies them into
    /// its read-back ring. Empty for a model without routed MLPs.
    pub fn moe_stats_buffers(&self) -> &[GpuTensor] {
        &self.p.moe_stats
    }

    /// Each routed MLP's statistics of the micro-batch last run forward (waits).
    pub fn read_moe_stats(&self, gpu: &Gpu) -> Result<Vec<crate::cpu::moe::MoeStats>> {
        let experts = self.model.moe.as_ref().map_or(0, |m| m.n_experts);
        self.p
            .moe_stats
            .iter()
            .map(|t| crate::kernels::moe::parse_stats(&gpu.read(t)?, experts))
            .collect()
    }

    /// The per-row loss tensor (f32, B·T), for asynchronous read-back by the training loop.
    pub fn losses(&self) -> &GpuTensor {
        &self.s.losses
    }

    /// The optimizer's one-element scalars after an update, in this order: global gradient norm
    /// (f32, of the raw loss-scaled buffer), inf/NaN flag (u32), steps skipped since the model
    /// was built (u32), dynamic loss scale (f32) and its run of clean steps (u32). The training
    /// loop copies them into its read-back ring after every step. An error for a model built
    /// for inference.
    pub fn update_scalars(&self) -> Result<[&GpuTensor; 5]> {
        let o = self.optim()?;
        Ok([
            &o.norm,
            &o.flag,
            &o.skipped,
            &self.s.loss_scale,
            &o.scale_run,
        ])
    }

    /// A view of one parameter tensor of the working (T) copy, by layout name.
    pub(crate) fn param(&self, name: &str) -> Result<GpuTensor> {
        Views {
            layout: &self.layout,
            flat: &self.s.params,
        }
        .get(name)
    }

    /// The architecture's units.
    pub(crate) fn arch(&self) -> &Arch {
        &self.arch
    }

    /// [`GptGpu::param`] for a tensor the layout may lack (biases).
    pub(crate) fn param_opt(&self, name: &str) -> Result<Option<GpuTensor>> {
        Views {
            layout: &self.layout,
            flat: &self.s.params,
        }
        .opt(name)
    }

    /// Layer `l`'s q|k|v activations, (B·T, 3C): what the key/value cache of inference reuses.
    pub(crate) fn layer_qkv(&self, l: usize) -> &GpuTensor {
        &self.p.qkv[l]
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// The model configuration.
    pub fn model(&self) -> &ModelConfig {
        &self.model
    }

    /// The gradient buffer (for tests that inject values); an error for a model built for
    /// inference.
    pub fn grads(&self) -> Result<&GpuTensor> {
        Ok(&self.optim()?.grads)
    }
}

/// Bytes of a model's weights on the GPU ([`GptGpu::weight_bytes`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct WeightBytes {
    /// The flat buffer of float tensors, in the storage precision.
    pub float: u64,
    /// Quantised matrices' packed integers.
    pub packed: u64,
    /// Their f16 scales.
    pub scales: u64,
}

impl WeightBytes {
    /// All of them.
    pub fn total(&self) -> u64 {
        self.float + self.packed + self.scales
    }
}

/// A panic elsewhere while the frozen values were being replaced.
fn poisoned() -> Error {
    Error::shape(
        "gpt",
        "the frozen weights' lock was poisoned by an earlier panic",
    )
}

/// The error of a training method called on a model built with [`GptGpu::inference`].
fn inference_only() -> Error {
    Error::shape(
        "gpt",
        "this model was built for inference (GptGpu::inference): it has no gradients, \
         optimizer state or backward pass; build it with GptGpu::new to train",
    )
}

/// A batch must be non-empty and no longer than the context.
fn check_batch(model: &ModelConfig, batch: GptBatch) -> Result<()> {
    if batch.seq == 0 || batch.batch == 0 || batch.seq > model.block_size {
        return Err(Error::shape(
            "gpt",
            format!(
                "batch {batch:?} must be non-empty with T ≤ block_size = {}",
                model.block_size
            ),
        ));
    }
    Ok(())
}

/// Every tensor starts where any storage binding may (alignment counted in the smallest
/// element, f16), and at a multiple of 4 elements for the vectorised matmul.
fn param_alignment(gpu: &Gpu) -> usize {
    (gpu.capabilities()
        .limits
        .min_storage_buffer_offset_alignment as usize
        / 2)
    .max(4)
}

/// Uploads the quantised matrices of `weights`, each checked to be a matrix the units read
/// quantised (a linear layer's weight, the token table or the head) with the layout's shape.
fn upload_quantized(
    gpu: &Gpu,
    model: &ModelConfig,
    full: &ParamLayout,
    weights: &ModelWeights,
) -> Result<BTreeMap<String, QuantWeight>> {
    let readable = crate::quant::convert::quantized_tensors(model, weights.vocab, true)?;
    let mut out = BTreeMap::new();
    for (name, q) in &weights.quantized {
        let shape = full.get(name).map(|t| t.shape.clone());
        if !readable.contains(name) || shape != Some(vec![q.rows(), q.cols()]) {
            return Err(Error::shape(
                "gpt",
                format!(
                    "quantised tensor {name} ({}×{}) is not a linear layer, token table or head \
                     of this model (its layout has {shape:?})",
                    q.rows(),
                    q.cols()
                ),
            ));
        }
        out.insert(name.clone(), QuantWeight::upload(gpu, name, q)?);
    }
    Ok(out)
}

/// The float tensors of `weights` moved into `layout` (the device layout of the tensors that
/// are not quantised), which must hold the same tensors with the same shapes (in any order:
/// a checkpoint of a run with frozen tensors orders them for training).
fn float_values(layout: &ParamLayout, weights: &ModelWeights) -> Result<Vec<f32>> {
    let names = |l: &ParamLayout| {
        let mut v = l
            .tensors()
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone()))
            .collect::<Vec<_>>();
        v.sort();
        v
    };
    if names(layout) != names(&weights.layout) {
        return Err(Error::IncompatibleCheckpoint {
            differences: format!(
                "float tensors {:?} vs the model's {:?}",
                names(&weights.layout),
                names(layout)
            ),
            advice: "The weights do not fit the model of their own config (were the files \
                     mixed or edited?); load another checkpoint"
                .into(),
        });
    }
    let mut flat = vec![0.0f32; layout.buffer_len()];
    for to in layout.tensors() {
        let from = weights.layout.get(&to.name).ok_or_else(|| {
            Error::shape("gpt", format!("the weights have no tensor {}", to.name))
        })?;
        flat[to.offset..to.offset + to.len()]
            .copy_from_slice(&weights.values[from.offset..from.offset + from.len()]);
    }
    Ok(flat)
}
