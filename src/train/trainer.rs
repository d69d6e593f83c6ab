//! [`Trainer`]: a model, its optimizer state and its data on one device, stepped, evaluated and
//! saved by the caller. The schedule loop is [`Trainer::fit`] (in `fit.rs`); run folders,
//! metrics files and progress bars are built on top (in `run.rs` and `observers.rs`).

use super::checkpoint::{self, Checkpoint, TrainingState};
use super::eval::{mean_loss, windows};
use super::readback::{RawStep, StatsRing};
use super::schedule::learning_rate;
use super::stats::{EvalSet, EvalStats, SavedCheckpoint, StepStats};
use crate::cpu::gpt::GptBatch;
use crate::data::{Batch, Dataset, Tokenizer};
use crate::dist::{self, Communicator, Fingerprint, Single};
use crate::finetune::layout::move_by_name;
use crate::finetune::lora::init_adapters;
use crate::generate::Generator;
use crate::gpu::{Gpu, GpuOptions};
use crate::model::gpu::GptGpu;
use crate::model::init::gpt2_init;
use crate::model::{Config, ParamLayout};
use crate::training::AdamWStep;
use crate::{Error, Precision, PrecisionChoice, Result};
use std::collections::VecDeque;
use std::path::Path;
use std::time::Instant;

/// Steps that may be in flight on the GPU before submitting another waits for the oldest.
const STEPS_IN_FLIGHT: usize = 4;

/// Trains a model on one device: the weights, the AdamW moments, the dynamic loss scale and the
/// data live here between calls, and every call continues exactly where the last one stopped.
///
/// - [`Trainer::step`] runs one optimizer step and returns its [`StepStats`];
///   [`Trainer::evaluate`] scores validation data; [`Trainer::save`] writes an ordinary kiln
///   checkpoint (what `kiln sample`, `kiln eval` and `kiln train --resume` read), and
///   [`Trainer::from_checkpoint`] / [`Trainer::resume`] continue from one, bit for bit as if
///   the run had not stopped.
/// - [`Trainer::fit`] loops over steps, evaluations and checkpoints on the config's schedule,
///   reporting to [`super::Observer`]s, with a stop flag for Ctrl-C.
/// - [`Trainer::into_generator`] turns the trained model into a
///   [`Generator`] for sampling.
///
/// The batches of step k are a pure function of (data, `train.seed`, k), and dropout masks of
/// (`train.seed`, k), so a trainer built from a checkpoint of step k draws exactly what the
/// original run would have.
///
/// ```
/// use kiln::{Config, Dataset, Trainer};
///
/// # fn main() -> kiln::Result<()> {
/// // A tiny model on text held in memory (character tokenizer, 10% for validation).
/// let config = Config::from_toml(
///     "[model]\nn_layer = 1\nn_head = 2\nn_embd = 16\nblock_size = 8\n\
///      [train]\nbatch_size = 2\nmax_steps = 3\neval_batches = 1\nprecision = \"f32\"",
///     &[],
/// )?;
/// let text = "to be or not to be, that is the question. ".repeat(20);
/// let data = Dataset::from_text(&text, &config.data, config.model.block_size)?;
/// let mut trainer = Trainer::with_default_gpu(config, data)?;
/// let first = trainer.step()?;
/// assert_eq!(first.step, 0);
/// assert!(first.loss.is_finite());
/// let val = trainer.evaluate(kiln::EvalSet::Periodic)?;
/// assert!(val.loss > 0.0);
/// # Ok(())
/// # }
/// ```
pub struct Trainer {
    gpu: Gpu,
    config: Config,
    dataset: Dataset,
    tokenizer_json: String,
    model: GptGpu,
    layout: ParamLayout,
    state: TrainingState,
    scaling: bool,
    ring: StatsRing,
    /// Statistics of finished steps not yet handed out.
    ready: VecDeque<StepStats>,
    /// The fixed periodic validation batches.
    val: Vec<Batch>,
    /// Skipped steps before this trainer's model existed (the GPU counts from 0).
    skipped_before: u64,
    /// The loss scale the next step to be read back ran with (the scale after the step before).
    scale_in_effect: f32,
    /// Set once a step's loss comes back non-finite: nothing is saved from that state.
    diverged: Option<(u64, f32)>,
    last_loss: f32,
    keep: usize,
    pub(crate) clock: Clock,
    /// The ranks of a data-parallel run ([`Single`] alone).
    comm: Box<dyn Communicator>,
    /// The rows of each global batch this rank trains on.
    rows: std::ops::Range<usize>,
    /// Multi-rank runs: the step's loss averaged over the ranks, by step, until read back.
    global_losses: VecDeque<(u64, f32)>,
}

/// Where the trainer's wall-clock time went.
#[derive(Default)]
pub(crate) struct Clock {
    start: Option<Instant>,
    /// Seconds of evaluation, saving and observers (not training).
    pub excluded: f64,
    pub encode: f64,
    pub submit: f64,
    /// Multi-rank runs: seconds waiting for the other ranks to reach the exchange, in the
    /// gradient exchange itself, and in reading the gradients back and writing the average
    /// (including the wait for the backward).
    pub wait: f64,
    pub comm: f64,
    pub readback: f64,
    /// Steps submitted through this trainer.
    pub submitted: u64,
    /// Steps read back through this trainer, and the training time when the last one was.
    reported: u64,
    last_reported_at: f64,
}

impl Clock {
    /// Training seconds so far: wall time since the first step, less the excluded time.
    pub fn training_seconds(&self) -> f64 {
        self.start.map_or(0.0, |s| {
            (s.elapsed().as_secs_f64() - self.excluded).max(1e-9)
        })
    }
}

impl Trainer {
    /// A fresh run: weights drawn from `train.seed` (GPT-2's initialisation), zero moments.
    /// `gpu`'s precision must agree with `train.precision` where that is not `auto` (open it
    /// with [`Trainer::with_default_gpu`], or with `GpuOptions { precision:
    /// config.train.precision, .. }`).
    pub fn new(gpu: Gpu, config: Config, dataset: Dataset) -> Result<Trainer> {
        Trainer::new_in(gpu, config, dataset, Box::new(Single))
    }

    /// [`Trainer::new`] as one rank of a data-parallel run over `comm`: every rank draws the
    /// same weights from `train.seed`, trains on rows `rank·B/N..(rank+1)·B/N` of each global
    /// batch of `train.batch_size` rows (which must be divisible by the number of ranks), and
    /// the gradients are averaged across ranks before the update. Checks at start-up that every
    /// rank has the same config, data and weights. Only rank 0 writes in [`Trainer::save`].
    pub fn new_in(
        gpu: Gpu,
        config: Config,
        dataset: Dataset,
        comm: Box<dyn Communicator>,
    ) -> Result<Trainer> {
        let mut trainer = Trainer::build(gpu, config, dataset, comm)?;
        let (model, seed) = (&trainer.config.model, trainer.config.train.seed);
        let weights = if trainer.config.adaptation().is_none() {
            gpt2_init(&trainer.layout, model, seed)
        } else {
            // The base tensors draw what a plain run of the same seed draws.
            let plain = ParamLayout::gpt(model, trainer.dataset.tokenizer().vocab_size(), 1)?;
            let base = gpt2_init(&plain, model, seed);
            let mut w = move_by_name(&base, &plain, &trainer.layout)?;
            init_adapters(&trainer.layout, &mut w, seed);
            w
        };
        trainer.model.set_weights(&trainer.gpu, &weights)?;
        trainer.start_loss_scale();
        trainer.agree()?;
        Ok(trainer)
    }

    /// A new run that starts from the weights of `base` (fine-tuning): fresh moments, step 0,
    /// `config`'s own schedule. `config`'s model must be `base`'s (the error names the keys that
    /// differ); its `[finetune]` freeze list and `[lora]` adapters apply (fresh adapters: A
    /// drawn from `train.seed`, B zero). `dataset` must use `base`'s tokenizer. `base` itself
    /// is not changed; a checkpoint with adapters of its own is refused (merge it first).
    pub fn from_pretrained(
        gpu: Gpu,
        config: Config,
        dataset: Dataset,
        base: &Checkpoint,
    ) -> Result<Trainer> {
        Trainer::from_pretrained_in(gpu, config, dataset, base, Box::new(Single))
    }

    /// [`Trainer::from_pretrained`] as one rank of a data-parallel run (see [`Trainer::new_in`]).
    pub fn from_pretrained_in(
        gpu: Gpu,
        config: Config,
        dataset: Dataset,
        base: &Checkpoint,
        comm: Box<dyn Communicator>,
    ) -> Result<Trainer> {
        check_base(base, &config)?;
        let mut trainer = Trainer::build(gpu, config, dataset, comm)?;
        trainer.check_tokenizer(&base.tokenizer_json)?;
        let mut w = move_by_name(&base.master, &base.layout, &trainer.layout)?;
        init_adapters(&trainer.layout, &mut w, trainer.config.train.seed);
        trainer.model.set_weights(&trainer.gpu, &w)?;
        trainer.start_loss_scale();
        trainer.agree()?;
        log::info!("fine-tuning from a checkpoint of step {}", base.state.step);
        Ok(trainer)
    }

    /// A fresh run's loss scale.
    fn start_loss_scale(&mut self) {
        if self.scaling {
            self.state.loss_scale = self.config.loss_scaling().init_scale;
            self.scale_in_effect = self.state.loss_scale;
        }
    }

    /// The error for a checkpoint whose tokenizer is not the dataset's.
    fn check_tokenizer(&self, theirs_json: &str) -> Result<()> {
        if theirs_json == self.tokenizer_json {
            return Ok(());
        }
        let theirs = Tokenizer::from_json(theirs_json)?.vocab_size();
        Err(Error::invalid(
            "dataset",
            "(tokenizer)",
            format!(
                "the checkpoint's tokenizer ({theirs} tokens) differs from the dataset's ({} \
                 tokens); build the dataset with the checkpoint's tokenizer \
                 (Dataset::with_tokenizer or Dataset::from_tokens)",
                self.dataset.tokenizer().vocab_size()
            ),
        ))
    }

    /// [`Trainer::new`] on the default adapter (or the one `KILN_ADAPTER` names), opened with
    /// the config's `train.precision`.
    pub fn with_default_gpu(config: Config, dataset: Dataset) -> Result<Trainer> {
        let gpu = Gpu::with_options(&GpuOptions {
            adapter: None,
            precision: config.train.precision,
        })?;
        Trainer::new(gpu, config, dataset)
    }

    /// Continues from `checkpoint` with `config`, which may change training settings (steps,
    /// learning rate, intervals) but not the model's shape (see [`checkpoint::check_compatible`]).
    /// `dataset` must use the checkpoint's tokenizer. Restores weights, moments, step count,
    /// loss scale and the rest of the training state, so the next step is the one the saved run
    /// would have taken.
    pub fn from_checkpoint(
        gpu: Gpu,
        config: Config,
        dataset: Dataset,
        checkpoint: Checkpoint,
    ) -> Result<Trainer> {
        Trainer::from_checkpoint_in(gpu, config, dataset, checkpoint, Box::new(Single))
    }

    /// [`Trainer::from_checkpoint`] as one rank of a data-parallel run (see
    /// [`Trainer::new_in`]). The checkpoint need not come from a run with the same number of
    /// ranks: it holds the global state, and the global batch decides the data.
    pub fn from_checkpoint_in(
        gpu: Gpu,
        config: Config,
        dataset: Dataset,
        checkpoint: Checkpoint,
        comm: Box<dyn Communicator>,
    ) -> Result<Trainer> {
        let mut trainer = Trainer::build(gpu, config, dataset, comm)?;
        trainer.check_tokenizer(&checkpoint.tokenizer_json)?;
        checkpoint::check_compatible(&checkpoint, &trainer.config, &trainer.layout)?;
        let ck = checkpoint.with_layout(&trainer.layout)?;
        trainer
            .model
            .set_state(&trainer.gpu, &ck.master, Some((&ck.m, &ck.v)))?;
        trainer.state = ck.state;
        trainer.skipped_before = trainer.state.skipped_steps;
        if trainer.scaling {
            let (scale, run) = (trainer.state.loss_scale, trainer.state.loss_scale_run);
            trainer
                .model
                .set_loss_scale_state(&trainer.gpu, scale, run)?;
            trainer.scale_in_effect = scale;
        }
        trainer.agree()?;
        log::info!("resumed from step {}", trainer.state.step);
        Ok(trainer)
    }

    /// [`Trainer::from_checkpoint`] with the checkpoint in `dir` (a checkpoint folder, or a run
    /// folder's latest) and the config it was saved with.
    pub fn resume(gpu: Gpu, dir: &Path, dataset: Dataset) -> Result<Trainer> {
        let ck = checkpoint::load(&checkpoint::resolve(dir)?)?;
        Trainer::from_checkpoint(gpu, ck.config.clone(), dataset, ck)
    }

    /// Everything but the weights: checks, model, ring, validation batches.
    fn build(
        gpu: Gpu,
        config: Config,
        dataset: Dataset,
        comm: Box<dyn Communicator>,
    ) -> Result<Trainer> {
        config.validate()?;
        let rows = dist::rank_rows(config.train.batch_size, comm.size(), comm.rank())?;
        let wanted = match config.train.precision {
            PrecisionChoice::Auto => None,
            PrecisionChoice::F32 => Some(Precision::F32),
            PrecisionChoice::F16 => Some(Precision::F16),
        };
        if let Some(wanted) = wanted.filter(|&p| p != gpu.precision()) {
            return Err(Error::invalid(
                "train.precision",
                wanted,
                format!(
                    "the device was opened for {} storage; open it with GpuOptions {{ precision: \
                     config.train.precision, .. }} or set train.precision = \"auto\"",
                    gpu.precision()
                ),
            ));
        }
        let t = &config.train;
        let block = config.model.block_size;
        // Both splits long enough for this context (the dataset may have been split for
        // another), with the data layer's message.
        dataset.train_batch(0, 0, 1, block, t.seed)?;
        let val = split_rows(
            dataset.val_batches(t.eval_batches, t.batch_size, block, t.seed)?,
            comm.size(),
        );
        let tokenizer_json = dataset.tokenizer().to_json()?;
        let vocab = dataset.tokenizer().vocab_size();
        // Each rank's model holds its share of the global batch.
        let batch = GptBatch {
            batch: rows.len(),
            seq: block,
        };
        let mut model = GptGpu::adapted(
            &gpu,
            &config.model,
            &config.adaptation(),
            vocab,
            batch,
            t.grad_accum_steps,
        )?;
        // f16 gradients need loss scaling; f32 ones neither need nor get it (the scale stays 1).
        let scaling = model.precision() == Precision::F16;
        if scaling {
            model.enable_loss_scaling(&gpu, &config.loss_scaling())?;
        }
        model.set_dropout_seed(t.seed);
        let moe_words = model.moe_stats_buffers().iter().map(|t| t.len()).sum();
        let ring = StatsRing::new(&gpu, rows.len() * block, moe_words, STEPS_IN_FLIGHT);
        Ok(Trainer {
            layout: model.layout().clone(),
            state: TrainingState {
                rng_seed: t.seed,
                ..TrainingState::default()
            },
            gpu,
            config,
            dataset,
            tokenizer_json,
            model,
            scaling,
            ring,
            ready: VecDeque::new(),
            val,
            skipped_before: 0,
            scale_in_effect: 1.0,
            diverged: None,
            last_loss: f32::NAN,
            keep: checkpoint::DEFAULT_KEEP,
            clock: Clock::default(),
            comm,
            rows,
            global_losses: VecDeque::new(),
        })
    }

    /// Multi-rank runs: checks that every rank has the same config, data, weights and training
    /// state (by digest) before the first step; the error names what differs.
    fn agree(&mut self) -> Result<()> {
        if self.comm.size() <= 1 {
            return Ok(());
        }
        let fingerprint = self.fingerprint()?;
        dist::agree(self.comm.as_mut(), &fingerprint)
    }

    /// Digests of what every rank must share.
    fn fingerprint(&self) -> Result<Fingerprint> {
        // The corpus path may differ between machines: the data is compared by content.
        let mut config = self.config.clone();
        config.data.path.clear();
        let config_json = serde_json::to_string(&config).map_err(|e| Error::Distributed {
            message: format!("could not serialise the config for the agreement check: {e}"),
        })?;
        let mut data = self.tokenizer_json.clone().into_bytes();
        data.extend_from_slice(bytemuck::cast_slice(self.dataset.train_tokens()));
        data.extend_from_slice(bytemuck::cast_slice(self.dataset.val_tokens()));
        let master = self.model.read_master(&self.gpu)?;
        let mut weights: Vec<u8> = bytemuck::cast_slice(&master).to_vec();
        weights.extend_from_slice(format!("{:?}", self.state).as_bytes());
        Ok(Fingerprint {
            items: vec![
                ("config", dist::digest(config_json.as_bytes())),
                ("data", dist::digest(&data)),
                (
                    "weights and training state (checkpoint)",
                    dist::digest(&weights),
                ),
            ],
        })
    }

    /// This rank's index among the ranks of a data-parallel run (0 alone).
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Number of ranks training together (1 alone).
    pub fn ranks(&self) -> usize {
        self.comm.size()
    }

    /// SHA-256 of the f32 master weights, in hex (waits for the steps in flight). Multi-rank
    /// runs compare it across ranks at the end of [`Trainer::fit`].
    pub fn weights_digest(&mut self) -> Result<String> {
        self.settle()?;
        let master = self.model.read_master(&self.gpu)?;
        Ok(dist::digest(bytemuck::cast_slice(&master))
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect())
    }

    /// Multi-rank runs: checks that every rank ends with bit-identical weights (an error names
    /// the rank that differs: a bug, since every rank applies the same averaged gradients).
    pub(crate) fn check_weights_agree(&mut self) -> Result<Option<String>> {
        if self.comm.size() <= 1 {
            return Ok(None);
        }
        let hex = self.weights_digest()?;
        let all = dist::all_gather(
            self.comm.as_mut(),
            "the final weights check",
            hex.as_bytes(),
        )?;
        if let Some(rank) = all.iter().position(|d| d != hex.as_bytes()) {
            return Err(Error::Distributed {
                message: format!(
                    "rank {rank}'s final weights differ from rank {}'s: the ranks diverged                      (please report this as a bug)",
                    self.comm.rank()
                ),
            });
        }
        self.comm.completed();
        Ok(Some(hex))
    }

    /// Runs the next optimizer step and waits for it. Errors with [`Error::NonFinite`] when its
    /// loss is NaN or infinite (the run has diverged; [`Trainer::save`] then refuses). Statistics
    /// of steps submitted earlier with [`Trainer::submit_step`] and not yet taken stay for
    /// [`Trainer::finished_steps`].
    pub fn step(&mut self) -> Result<StepStats> {
        self.submit_step()?;
        self.settle()?;
        let stats = self.ready.pop_back().ok_or_else(|| Error::Readback {
            what: "step statistics".into(),
            message: "the step's numbers did not come back".into(),
        })?;
        check_loss(&stats)?;
        Ok(stats)
    }

    /// Submits the next optimizer step without waiting for it: up to 4 steps run on the GPU
    /// while the host prepares the next (submitting a fifth waits for the oldest). Their
    /// statistics come from [`Trainer::finished_steps`], in step order.
    pub fn submit_step(&mut self) -> Result<()> {
        let t = &self.config.train;
        let step = self.state.step;
        let (bs, block, accum) = (
            t.batch_size,
            self.config.model.block_size,
            t.grad_accum_steps,
        );
        let rows = self.rows.clone();
        let ranks = self.comm.size();
        let micro: Vec<(Vec<u32>, Vec<u32>)> = (0..accum as u32)
            .map(|m| {
                self.dataset
                    .train_batch(step, m, bs, block, t.seed)
                    .map(|b| match ranks {
                        1 => (b.inputs, b.targets),
                        // This rank's rows of the global batch.
                        _ => (
                            b.inputs[rows.start * block..rows.end * block].to_vec(),
                            b.targets[rows.start * block..rows.end * block].to_vec(),
                        ),
                    })
            })
            .collect::<Result<_>>()?;
        let adam = AdamWStep {
            t: (step + 1).min(u64::from(u32::MAX)) as u32,
            lr: learning_rate(t, step),
            beta1: t.beta1,
            beta2: t.beta2,
            eps: t.eps,
            weight_decay: t.weight_decay,
            grad_clip: t.grad_clip,
            // The dynamic scale lives on the GPU; there is no static one.
            loss_scale: 1.0,
        };
        self.clock.start.get_or_insert_with(Instant::now);
        // Make room in the ring: this waits for the step STEPS_IN_FLIGHT back, not this one.
        if let Some(raw) = self.ring.drain_slot(&self.gpu, step)? {
            self.accept(raw);
        }
        let submit_start = Instant::now();
        if ranks > 1 {
            self.distributed_step(&micro, &adam, step)?;
        } else {
            let (ring, model) = (&self.ring, &self.model);
            let scalars = model.update_scalars()?;
            self.clock.encode += model.step(&self.gpu, &micro, &adam, |enc| {
                ring.record_copy(enc, model, &scalars, step)
            })?;
        }
        self.clock.submit += submit_start.elapsed().as_secs_f64();
        self.clock.submitted += 1;
        self.ring.request(step);
        self.state.step += 1;
        self.state.tokens_seen += self.tokens_per_step();
        for raw in self.ring.harvest(&self.gpu)? {
            self.accept(raw);
        }
        Ok(())
    }

    /// A step of a multi-rank run, in two submissions: forward and backward of this rank's rows;
    /// then (on the host) the gradient buffer read back, averaged across the ranks with the
    /// step's mean loss appended, and written back; then the update. The wait for the backward
    /// is what makes this step synchronous: see docs/ARCHITECTURE.md on overlap.
    fn distributed_step(
        &mut self,
        micro: &[(Vec<u32>, Vec<u32>)],
        adam: &AdamWStep,
        step: u64,
    ) -> Result<()> {
        self.clock.encode += self.model.step_backward(&self.gpu, micro, adam)?;
        let read_start = Instant::now();
        let mut flat = self.model.read_grads(&self.gpu)?;
        // The loss of the step's last micro-batch on this rank's rows, as the ring computes it;
        // the ranks' rows all count the same targets, so the mean over ranks is the loss over
        // the global batch.
        flat.push(self.model.read_loss(&self.gpu)?);
        // A one-byte exchange first: it measures how long this rank waits for the slowest
        // (load imbalance, shared cores) apart from the time the gradient bytes take.
        let wait_start = Instant::now();
        let what = format!("the gradient all-reduce of step {step}");
        dist::all_gather(self.comm.as_mut(), &what, &[0])?;
        let exchange_start = Instant::now();
        self.clock.wait += (exchange_start - wait_start).as_secs_f64();
        dist::all_reduce_mean(self.comm.as_mut(), &what, &mut flat)?;
        let exchange_end = Instant::now();
        let loss = flat.pop().unwrap_or(f32::NAN);
        self.global_losses.push_back((step, loss));
        self.gpu.write(self.model.grads()?, &flat)?;
        self.clock.comm += (exchange_end - exchange_start).as_secs_f64();
        self.clock.readback += (wait_start - read_start + exchange_end.elapsed()).as_secs_f64();
        let (ring, model) = (&self.ring, &self.model);
        let scalars = model.update_scalars()?;
        model.step_update(&self.gpu, |enc| {
            ring.record_copy(enc, model, &scalars, step)
        })
    }

    /// Statistics of the steps that have finished since the last call, in step order; with
    /// `wait`, waits for every step in flight first. Losses here may be non-finite: check them
    /// (or use [`Trainer::step`], which does).
    pub fn finished_steps(&mut self, wait: bool) -> Result<Vec<StepStats>> {
        if wait {
            self.settle()?;
        } else {
            for raw in self.ring.harvest(&self.gpu)? {
                self.accept(raw);
            }
        }
        Ok(self.ready.drain(..).collect())
    }

    /// Waits for every step in flight and queues its statistics (training time, not evaluation
    /// time: the clocks of evaluation and saving start after it).
    fn settle(&mut self) -> Result<()> {
        if !self.ring.is_empty() {
            for raw in self.ring.flush(&self.gpu)? {
                self.accept(raw);
            }
        }
        Ok(())
    }

    /// Turns a step's raw numbers into [`StepStats`] and brings the training state up to it.
    fn accept(&mut self, mut raw: RawStep) {
        // A multi-rank step reports the loss over the global batch, not this rank's rows.
        while let Some(&(step, loss)) = self.global_losses.front() {
            if step > raw.step {
                break;
            }
            self.global_losses.pop_front();
            if step == raw.step {
                raw.loss = loss;
            }
        }
        let micro = self.config.train.grad_accum_steps as f32;
        let scale = self.scale_in_effect;
        self.state.skipped_steps = self.skipped_before + u64::from(raw.skipped);
        if self.scaling {
            self.state.loss_scale = raw.loss_scale;
            self.state.loss_scale_run = raw.scale_run;
            self.scale_in_effect = raw.loss_scale;
        }
        if !raw.loss.is_finite() && self.diverged.is_none() {
            self.diverged = Some((raw.step, raw.loss));
        }
        self.last_loss = raw.loss;
        let now = self.clock.training_seconds();
        self.clock.reported += 1;
        let tokens = self.tokens_per_step();
        self.ready.push_back(StepStats {
            step: raw.step,
            loss: raw.loss,
            lr: learning_rate(&self.config.train, raw.step),
            grad_norm: raw.raw_norm / (micro * scale),
            loss_scale: scale,
            skipped: raw.overflow,
            tokens,
            seconds: now - self.clock.last_reported_at,
            tokens_per_s: (self.clock.reported * tokens) as f64 / now,
            moe: self.moe_stats(&raw.moe),
        });
        self.clock.last_reported_at = now;
    }

    /// The routed MLPs' statistics from their concatenated read-back words.
    fn moe_stats(&self, words: &[f32]) -> Vec<crate::cpu::moe::MoeStats> {
        let Some(moe) = &self.config.model.moe else {
            return Vec::new();
        };
        let len = crate::kernels::moe::stats_len(moe.n_experts);
        words
            .chunks_exact(len)
            .filter_map(|w| crate::kernels::moe::parse_stats(w, moe.n_experts).ok())
            .collect()
    }

    /// Mean validation loss over `set` (after waiting for the steps in flight). A non-finite
    /// loss is [`Error::NonFinite`]. [`EvalSet::Periodic`] also updates the best validation
    /// loss of the training state.
    pub fn evaluate(&mut self, set: EvalSet) -> Result<EvalStats> {
        self.settle()?;
        let start = Instant::now();
        let (t, block) = (&self.config.train, self.config.model.block_size);
        let owned;
        let batches: &[Batch] = match set {
            EvalSet::Periodic => &self.val,
            EvalSet::Batches(0) => {
                return Err(Error::invalid("EvalSet::Batches", 0, "must be at least 1"));
            }
            // Multi-rank runs hold each global batch as `ranks` batches of the model's rows, and
            // every rank evaluates all of them (the same loss everywhere, no exchange).
            EvalSet::Batches(n) if n * self.comm.size() <= self.val.len() => {
                &self.val[..n * self.comm.size()]
            }
            EvalSet::Batches(n) => {
                owned = split_rows(
                    self.dataset.val_batches(n, t.batch_size, block, t.seed)?,
                    self.comm.size(),
                );
                &owned
            }
            EvalSet::FullSplit => {
                owned = split_rows(
                    windows(
                        self.dataset.val_tokens(),
                        t.batch_size,
                        block,
                        "the validation split",
                    )?,
                    self.comm.size(),
                );
                &owned
            }
        };
        let (loss, tokens) = mean_loss(&self.gpu, &self.model, batches)?;
        if !loss.is_finite() {
            return Err(diverged(
                "validation loss",
                format!("the evaluation after step {} gave {loss}", self.state.step),
            ));
        }
        if set == EvalSet::Periodic {
            self.record_periodic_loss(loss);
        }
        let seconds = start.elapsed().as_secs_f64();
        self.clock.excluded += seconds;
        Ok(EvalStats {
            step: self.state.step,
            set,
            loss,
            tokens,
            train_loss: self.last_loss,
            skipped_steps: self.state.skipped_steps,
            loss_scale: self.state.loss_scale,
            seconds,
        })
    }

    /// Updates the best validation loss, the step that reached it and early stopping's count.
    /// The best is the lowest loss, whatever `min_delta`, so `best` names the lowest loss seen;
    /// the count restarts only when the loss beats the previous best by more than `min_delta`.
    fn record_periodic_loss(&mut self, loss: f64) {
        let delta = self.config.train.early_stopping_min_delta;
        let state = &mut self.state;
        match state.best_val_loss {
            Some(best) if loss >= best - delta => {
                state.evals_without_improvement = state.evals_without_improvement.saturating_add(1)
            }
            _ => state.evals_without_improvement = 0,
        }
        if state.best_val_loss.is_none_or(|b| loss < b) {
            state.best_val_loss = Some(loss);
            state.best_step = Some(state.step);
        }
    }

    /// The whole training state as a checkpoint in memory (waits for the steps in flight).
    pub fn checkpoint(&mut self) -> Result<Checkpoint> {
        self.settle()?;
        if let Some((step, loss)) = self.diverged {
            return Err(Error::NonFinite {
                what: "training loss".into(),
                message: format!(
                    "step {step} gave a training loss of {loss}: the run has diverged, or its \
                     weights were damaged, and nothing is saved from this state"
                ),
            });
        }
        let master = self.model.read_master(&self.gpu)?;
        let (m, v) = self.model.read_moments(&self.gpu)?;
        Ok(Checkpoint {
            config: self.config.clone(),
            tokenizer_json: self.tokenizer_json.clone(),
            state: self.state.clone(),
            layout: self.layout.clone(),
            master,
            m,
            v,
        })
    }

    /// Saves a checkpoint `step-N` under `root` and points `root/latest` at it, atomically (a
    /// crash leaves the previous checkpoint loadable), keeping the newest 3 (see
    /// [`Trainer::set_keep_checkpoints`]). `kiln sample`, `kiln eval` and `kiln train --resume`
    /// read it. Refused after a non-finite training loss.
    /// In a multi-rank run only rank 0 writes; the others return the path rank 0 writes to.
    pub fn save(&mut self, root: &Path) -> Result<SavedCheckpoint> {
        self.settle()?;
        if self.comm.rank() != 0 {
            if let Some((step, loss)) = self.diverged {
                return Err(diverged(
                    "training loss",
                    format!("step {step} gave a training loss of {loss}"),
                ));
            }
            return Ok(SavedCheckpoint {
                step: self.state.step,
                path: root.join(format!("step-{}", self.state.step)),
            });
        }
        let start = Instant::now();
        let ck = self.checkpoint()?;
        let path = checkpoint::save(root, &ck, self.keep)?;
        self.clock.excluded += start.elapsed().as_secs_f64();
        Ok(SavedCheckpoint {
            step: self.state.step,
            path,
        })
    }

    /// How many checkpoints [`Trainer::save`] keeps under its root (at least 1).
    pub fn set_keep_checkpoints(&mut self, keep: usize) {
        self.keep = keep.max(1);
    }

    /// Ends training and returns the model, on the same device, ready to generate (with the
    /// config's `[sample]` defaults).
    pub fn into_generator(mut self) -> Result<Generator> {
        self.settle()?;
        let master = self.model.read_master(&self.gpu)?;
        let tokenizer = self.dataset.tokenizer().clone();
        drop(self.model);
        Generator::from_weights(self.gpu, &self.config, tokenizer, &master, "the trainer")
    }

    /// Optimizer steps completed (submitted, for steps still in flight).
    pub fn steps_done(&self) -> u64 {
        self.state.step
    }

    /// The training state a checkpoint would record (counters up to the last step read back).
    pub fn state(&self) -> &TrainingState {
        &self.state
    }

    /// The run's configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The data.
    pub fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    /// The tokenizer of the data.
    pub fn tokenizer(&self) -> &Tokenizer {
        self.dataset.tokenizer()
    }

    /// The device.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The model on the device: its buffers, layout and lower-level passes.
    pub fn model(&self) -> &GptGpu {
        &self.model
    }

    /// Storage precision of weights, gradients and activations.
    pub fn precision(&self) -> Precision {
        self.model.precision()
    }

    /// The f32 master weights, laid out by [`GptGpu::layout`] (waits for the device).
    pub fn master_weights(&self) -> Result<Vec<f32>> {
        self.model.read_master(&self.gpu)
    }

    /// Tokens one optimizer step consumes.
    pub fn tokens_per_step(&self) -> u64 {
        let t = &self.config.train;
        (t.batch_size * self.config.model.block_size * t.grad_accum_steps) as u64
    }
}

/// Checks that a run of `config` can start from the weights of `base`: no adapters of its own,
/// and the same model (the error names the keys that differ). Training settings may differ.
pub fn check_base(base: &Checkpoint, config: &Config) -> Result<()> {
    if base.config.lora.is_some() {
        return Err(Error::invalid(
            "--init-from",
            "(a LoRA run)",
            "the checkpoint holds LoRA adapters over a frozen base; merge them into an \
             ordinary checkpoint first (kiln lora merge --checkpoint BASE --lora RUN --out \
             MERGED) and start from that",
        ));
    }
    let vocab = match config.model.vocab_size {
        0 => base.layout.token_table().map_or(0, |t| t.shape[0]),
        v => v,
    };
    // The comparison layout orders the tensors as the checkpoint does (its own freeze list),
    // so that only names and shapes are compared.
    let like_base = Config {
        finetune: base.config.finetune.clone(),
        lora: None,
        ..config.clone()
    };
    let layout = ParamLayout::for_config(&like_base, vocab, 1)
        .or_else(|_| ParamLayout::gpt(&config.model, vocab, 1))?;
    checkpoint::check_compatible(base, config, &layout).map_err(|e| match e {
        Error::IncompatibleCheckpoint { differences, .. } => Error::IncompatibleCheckpoint {
            differences,
            advice: "A fine-tuning run keeps the checkpoint's model: give [model] the \
                     checkpoint's settings (see config.toml in its folder) or leave --config \
                     out to start from the checkpoint's own config"
                .into(),
        },
        other => other,
    })
}

/// Each batch of `batches` as `parts` batches of consecutive rows (the model of a rank of a
/// `parts`-rank run holds `1/parts` of the rows); unchanged for one part.
fn split_rows(batches: Vec<Batch>, parts: usize) -> Vec<Batch> {
    if parts <= 1 {
        return batches;
    }
    let mut out = Vec::with_capacity(batches.len() * parts);
    for b in batches {
        let rows = b.batch_size / parts;
        let n = rows * b.block_size;
        for p in 0..parts {
            out.push(Batch {
                inputs: b.inputs[p * n..(p + 1) * n].to_vec(),
                targets: b.targets[p * n..(p + 1) * n].to_vec(),
                batch_size: rows,
                block_size: b.block_size,
            });
        }
    }
    out
}

/// The error for a non-finite measurement: the trainer writes no checkpoint from that state.
fn diverged(what: &str, detail: String) -> Error {
    Error::NonFinite {
        what: what.to_string(),
        message: format!("{detail}: the run has diverged, or its weights were damaged"),
    }
}

/// [`Error::NonFinite`] for a step whose loss is not finite.
pub(crate) fn check_loss(stats: &StepStats) -> Result<()> {
    if stats.loss.is_finite() {
        Ok(())
    } else {
        Err(diverged(
            "training loss",
            format!("step {} gave a training loss of {}", stats.step, stats.loss),
        ))
    }
}
