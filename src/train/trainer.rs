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
}

/// Where the trainer's wall-clock time went.
#[derive(Default)]
pub(crate) struct Clock {
    start: Option<Instant>,
    /// Seconds of evaluation, saving and observers (not training).
    pub excluded: f64,
    pub encode: f64,
    pub submit: f64,
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
        let mut trainer = Trainer::build(gpu, config, dataset)?;
        let weights = gpt2_init(
            &trainer.layout,
            &trainer.config.model,
            trainer.config.train.seed,
        );
        trainer.model.set_weights(&trainer.gpu, &weights)?;
        if trainer.scaling {
            trainer.state.loss_scale = trainer.config.loss_scaling().init_scale;
            trainer.scale_in_effect = trainer.state.loss_scale;
        }
        Ok(trainer)
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
        let mut trainer = Trainer::build(gpu, config, dataset)?;
        if checkpoint.tokenizer_json != trainer.tokenizer_json {
            let theirs = Tokenizer::from_json(&checkpoint.tokenizer_json)?.vocab_size();
            return Err(Error::invalid(
                "dataset",
                "(tokenizer)",
                format!(
                    "the checkpoint's tokenizer ({theirs} tokens) differs from the dataset's ({} \
                     tokens); build the dataset with the checkpoint's tokenizer \
                     (Dataset::with_tokenizer or Dataset::from_tokens)",
                    trainer.dataset.tokenizer().vocab_size()
                ),
            ));
        }
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
    fn build(gpu: Gpu, config: Config, dataset: Dataset) -> Result<Trainer> {
        config.validate()?;
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
        let val = dataset.val_batches(t.eval_batches, t.batch_size, block, t.seed)?;
        let tokenizer_json = dataset.tokenizer().to_json()?;
        let vocab = dataset.tokenizer().vocab_size();
        let batch = GptBatch {
            batch: t.batch_size,
            seq: block,
        };
        let mut model = GptGpu::new(&gpu, &config.model, vocab, batch, t.grad_accum_steps)?;
        // f16 gradients need loss scaling; f32 ones neither need nor get it (the scale stays 1).
        let scaling = model.precision() == Precision::F16;
        if scaling {
            model.enable_loss_scaling(&gpu, &config.loss_scaling())?;
        }
        model.set_dropout_seed(t.seed);
        let ring = StatsRing::new(&gpu, t.batch_size * block, STEPS_IN_FLIGHT);
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
        })
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
        let micro: Vec<(Vec<u32>, Vec<u32>)> = (0..accum as u32)
            .map(|m| {
                self.dataset
                    .train_batch(step, m, bs, block, t.seed)
                    .map(|b| (b.inputs, b.targets))
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
        let (ring, model) = (&self.ring, &self.model);
        let scalars = model.update_scalars()?;
        self.clock.encode += model.step(&self.gpu, &micro, &adam, |enc| {
            ring.record_copy(enc, model, &scalars, step)
        })?;
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
    fn accept(&mut self, raw: RawStep) {
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
        });
        self.clock.last_reported_at = now;
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
            EvalSet::Batches(n) if n <= self.val.len() => &self.val[..n],
            EvalSet::Batches(n) => {
                owned = self.dataset.val_batches(n, t.batch_size, block, t.seed)?;
                &owned
            }
            EvalSet::FullSplit => {
                owned = windows(
                    self.dataset.val_tokens(),
                    t.batch_size,
                    block,
                    "the validation split",
                )?;
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
    pub fn save(&mut self, root: &Path) -> Result<SavedCheckpoint> {
        self.settle()?;
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
