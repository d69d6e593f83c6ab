//! The training loop: batches, steps, asynchronous loss read-back, evaluation, metrics,
//! checkpoints, resume and Ctrl-C.

use super::checkpoint::{self, Checkpoint, TrainingState};
use super::run_dir::{RunDir, RunMode};
use super::schedule::learning_rate;
use crate::cpu::gpt::GptBatch;
use crate::data::Dataset;
use crate::gpu::{Gpu, GpuOptions};
use crate::model::gpu::GptGpu;
use crate::model::init::gpt2_init;
use crate::model::{Config, ParamLayout};
use crate::training::AdamWStep;
use crate::{Error, Precision, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What to train and where.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// The run's configuration (validated).
    pub config: Config,
    /// The corpus.
    pub data: PathBuf,
    /// Folder for checkpoints, metrics and the copy of the config.
    pub out_dir: PathBuf,
    /// Continue from the latest checkpoint in `out_dir`.
    pub resume: bool,
    /// With `resume`: continue from the checkpoint of this step instead of the latest.
    pub resume_from: Option<u64>,
    /// Without `resume`: replace a run already in `out_dir` (otherwise that is an error).
    pub overwrite: bool,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// Adapter choice.
    pub adapter: Option<String>,
    /// Stop (with a checkpoint) after this many steps of this invocation, whatever max_steps says.
    pub stop_after: Option<u64>,
    /// Told the validation loss after each evaluation; it may end the run early (with a
    /// checkpoint, as Ctrl-C does). `None` for a plain run.
    pub on_eval: Option<EvalObserver>,
}

/// What an [`EvalObserver`] wants after an evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvalAction {
    /// Keep training.
    Continue,
    /// Stop after this step, with a checkpoint (as Ctrl-C does).
    Stop,
}

/// A callback the training loop calls after each evaluation with the number of steps done and
/// the validation loss measured. A hyperparameter sweep uses it to record intermediate values and
/// prune trials that are clearly worse than the others; it runs on the training thread, so it
/// should be quick.
#[derive(Clone)]
pub struct EvalObserver(pub Arc<dyn Fn(u64, f64) -> EvalAction + Send + Sync>);

impl EvalObserver {
    /// Wraps a closure.
    pub fn new(f: impl Fn(u64, f64) -> EvalAction + Send + Sync + 'static) -> Self {
        EvalObserver(Arc::new(f))
    }
}

impl std::fmt::Debug for EvalObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EvalObserver(..)")
    }
}

/// What a run measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TrainSummary {
    /// Optimizer steps completed in total.
    pub steps: u64,
    /// Last validation loss measured.
    pub val_loss: Option<f64>,
    /// Validation loss over every token of the validation split, measured when the run reached
    /// max_steps (with `train.final_eval_full_split`).
    pub full_val_loss: Option<f64>,
    /// Tokens that measurement scored.
    pub full_val_tokens: u64,
    /// Mean wall-clock milliseconds per step over this invocation (evaluation excluded).
    pub ms_per_step: f64,
    /// Training tokens per second over this invocation.
    pub tokens_per_s: f64,
    /// Model FLOP/s: 6·params·tokens plus attention, over the step time.
    pub model_gflops: f64,
    /// Dispatches recorded per optimizer step.
    pub dispatches_per_step: usize,
    /// Mean host microseconds to build one step's command buffer (upload included).
    pub encode_us: f64,
    /// Mean host microseconds from the start of encoding to the return of the submit. On an
    /// adapter whose queue takes one submission at a time (lavapipe) the submit returns only when
    /// the previous step has finished, so this includes waiting for the GPU.
    pub submit_us: f64,
    /// Steps skipped for non-finite gradients.
    pub skipped_steps: u64,
    /// The last checkpoint written.
    pub checkpoint: Option<PathBuf>,
    /// Storage precision used.
    pub precision: Precision,
}

/// One metrics line (JSON) per logged step and per evaluation, appended to `metrics.jsonl`.
fn log_metric(out: &Path, value: &serde_json::Value) -> Result<()> {
    let path = out.join("metrics.jsonl");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
    writeln!(f, "{value}").map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })
}

/// A ring of staging buffers the per-row losses of each step are copied into and mapped
/// asynchronously, so the loop learns the loss of step k a few steps later without ever waiting
/// for the step in flight.
struct LossRing {
    slots: Vec<Slot>,
    rows: usize,
}

struct Slot {
    buffer: wgpu::Buffer,
    step: Option<u64>,
    ready: Arc<Mutex<Option<std::result::Result<(), wgpu::BufferAsyncError>>>>,
}

impl LossRing {
    fn new(gpu: &Gpu, rows: usize, n: usize) -> Self {
        let slots = (0..n)
            .map(|i| Slot {
                buffer: gpu.device().create_buffer(&wgpu::BufferDescriptor {
                    label: Some(&format!("loss ring {i}")),
                    size: ((rows + 1) * 4) as u64,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                }),
                step: None,
                ready: Arc::new(Mutex::new(None)),
            })
            .collect();
        LossRing { slots, rows }
    }

    fn slot_for(step: u64, n: usize) -> usize {
        (step % n as u64) as usize
    }

    /// Records the copy of this step's losses (and target count) into its slot.
    fn record_copy(&self, enc: &mut wgpu::CommandEncoder, model: &GptGpu, step: u64) {
        let slot = &self.slots[Self::slot_for(step, self.slots.len())];
        let losses = model.losses();
        enc.copy_buffer_to_buffer(
            losses.buffer(),
            losses.offset_bytes(),
            &slot.buffer,
            0,
            (self.rows * 4) as u64,
        );
        let count = model.target_count();
        enc.copy_buffer_to_buffer(
            count.buffer(),
            count.offset_bytes(),
            &slot.buffer,
            (self.rows * 4) as u64,
            4,
        );
    }

    /// After the step's submission: asks for the slot to be mapped when the GPU is done.
    fn request(&mut self, step: u64) {
        let n = self.slots.len();
        let slot = &mut self.slots[Self::slot_for(step, n)];
        slot.step = Some(step);
        let ready = slot.ready.clone();
        *ready.lock().unwrap_or_else(|e| e.into_inner()) = None;
        slot.buffer.map_async(wgpu::MapMode::Read, .., move |r| {
            *ready.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        });
    }

    /// Before reusing the slot of `step`: waits for the step that used it last (the oldest in
    /// flight) and returns its loss.
    fn drain_slot(&mut self, gpu: &Gpu, step: u64) -> Result<Option<(u64, f32)>> {
        let n = self.slots.len();
        let i = Self::slot_for(step, n);
        if self.slots[i].step.is_none() {
            return Ok(None);
        }
        // Poll rather than wait for the device: a full wait would also wait for the newer steps
        // in flight, and the ring exists to keep those overlapping with the host.
        while self.slots[i]
            .ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
        {
            let _ = gpu.device().poll(wgpu::PollType::Poll);
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
        self.take(i)
    }

    /// Losses of finished steps, without waiting.
    fn harvest(&mut self, gpu: &Gpu) -> Result<Vec<(u64, f32)>> {
        let _ = gpu.device().poll(wgpu::PollType::Poll);
        let mut out = Vec::new();
        let mut order: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].step.is_some())
            .collect();
        order.sort_by_key(|&i| self.slots[i].step);
        for i in order {
            if self.slots[i]
                .ready
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_none()
            {
                break;
            }
            if let Some(x) = self.take(i)? {
                out.push(x);
            }
        }
        Ok(out)
    }

    /// Every loss still in flight (waits).
    fn flush(&mut self, gpu: &Gpu) -> Result<Vec<(u64, f32)>> {
        gpu.wait()?;
        self.harvest(gpu)
    }

    fn take(&mut self, i: usize) -> Result<Option<(u64, f32)>> {
        let slot = &mut self.slots[i];
        let Some(step) = slot.step.take() else {
            return Ok(None);
        };
        let result = slot.ready.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(Err(e)) = result {
            return Err(Error::Readback {
                what: "loss ring".into(),
                message: e.to_string(),
            });
        }
        let loss = {
            let view = slot
                .buffer
                .get_mapped_range(..)
                .map_err(|e| Error::Readback {
                    what: "loss ring".into(),
                    message: e.to_string(),
                })?;
            let words: &[f32] = bytemuck::cast_slice(&view);
            let count = bytemuck::cast::<f32, u32>(words[self.rows]).max(1);
            (words[..self.rows]
                .iter()
                .map(|&l| f64::from(l))
                .sum::<f64>()
                / f64::from(count)) as f32
        };
        slot.buffer.unmap();
        Ok(Some((step, loss)))
    }
}

/// Mean loss per scored token over `batches` (waits for each); targets equal to `u32::MAX` are
/// not scored.
pub fn evaluate(gpu: &Gpu, model: &GptGpu, batches: &[crate::data::Batch]) -> Result<f64> {
    let (mut total, mut count) = (0.0f64, 0u64);
    for b in batches {
        model.set_batch(gpu, &b.inputs, &b.targets)?;
        gpu.run_pass("eval", |pass| model.record_eval(pass))?;
        total += gpu
            .read(model.losses())?
            .iter()
            .map(|&l| f64::from(l))
            .sum::<f64>();
        count += u64::from(gpu.read_u32(model.target_count())?[0]);
    }
    Ok(total / count.max(1) as f64)
}

/// The error for a run whose loss came out non-finite: it stops before any checkpoint is written
/// from that state, so `latest` keeps naming the last good one.
fn diverged(out: &Path, what: &str, detail: String) -> Error {
    let last_good = checkpoint::latest_dir(out)
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()));
    let resume = match &last_good {
        Some(name) => format!(
            "`latest` still names {name}, the last good checkpoint: resume from it or an \
             earlier one (kiln train --out {} --resume-from N) with a lower train.lr",
            out.display()
        ),
        None => "there is no earlier checkpoint: start again with a lower train.lr".to_string(),
    };
    Error::NonFinite {
        what: what.to_string(),
        message: format!(
            "{detail}: the run has diverged, or its weights were damaged. No checkpoint was \
             written from this state; {resume}"
        ),
    }
}

/// Model FLOPs of one token's forward and backward: 6 per parameter (the matmuls) plus the
/// attention products, 12·n_layer·C·T (the PaLM appendix count).
fn flops_per_token(config: &Config, params: usize, seq: usize) -> f64 {
    let m = &config.model;
    6.0 * params as f64 + 12.0 * (m.n_layer * m.n_embd * seq) as f64
}

/// Trains as `opts` says; `stop` (set by Ctrl-C) ends the run after the step in flight, with a
/// checkpoint.
pub fn train(opts: &TrainOptions, stop: &AtomicBool) -> Result<TrainSummary> {
    // The corpus is recorded in the saved config, so `kiln eval` can find the validation split.
    let mut config = opts.config.clone();
    if config.data.path.is_empty() {
        config.data.path = std::fs::canonicalize(&opts.data)
            .unwrap_or_else(|_| opts.data.clone())
            .display()
            .to_string();
    }
    let config = &config;
    config.validate()?;
    if opts.resume_from.is_some() && !opts.resume {
        return Err(Error::invalid(
            "--resume-from",
            opts.resume_from.unwrap_or_default(),
            "continues a run: give it with --resume (or use --resume-from alone on the command line)",
        ));
    }
    if opts.resume && opts.overwrite {
        return Err(Error::invalid(
            "--overwrite",
            "with --resume",
            "--overwrite replaces a run and --resume continues it; choose one",
        ));
    }
    // Everything that can be checked cheaply is checked before the corpus and the GPU.
    let mode = if opts.resume {
        RunMode::Resume {
            from: opts.resume_from,
        }
    } else {
        RunMode::Fresh {
            overwrite: opts.overwrite,
        }
    };
    let run = RunDir::open(&opts.out_dir, mode)?;
    let resume = if opts.resume {
        let dir = match opts.resume_from {
            Some(step) => checkpoint::step_dir(&opts.out_dir, step)?,
            None => checkpoint::latest_dir(&opts.out_dir)?,
        };
        Some(checkpoint::load(&dir)?)
    } else {
        run.write_config(config)?;
        let _ = std::fs::remove_file(opts.out_dir.join(super::run_dir::METRICS_FILE));
        None
    };
    let data_config = match &resume {
        Some(ck) => ck.config.data.clone(),
        None => config.data.clone(),
    };
    let dataset = Dataset::load(&opts.data, &data_config, config.model.block_size)?;
    let tokenizer_json = dataset.tokenizer().to_json()?;
    if let Some(ck) = &resume
        && ck.tokenizer_json != tokenizer_json
    {
        let theirs = crate::data::Tokenizer::from_json(&ck.tokenizer_json)?.vocab_size();
        return Err(Error::invalid(
            "--resume",
            opts.out_dir.display(),
            format!(
                "the checkpoint's tokenizer ({theirs} tokens) differs from the one built from {} \
                 ({} tokens); resume with the corpus the run was trained on",
                opts.data.display(),
                dataset.tokenizer().vocab_size()
            ),
        ));
    }
    let vocab = dataset.tokenizer().vocab_size();
    let precision = config.train.precision;
    let gpu = Gpu::with_options(&GpuOptions {
        adapter: opts.adapter.clone(),
        precision,
    })?;
    let t = &config.train;
    let batch = GptBatch {
        batch: t.batch_size,
        seq: config.model.block_size,
    };
    let mut model = GptGpu::new(&gpu, &config.model, vocab, batch, t.grad_accum_steps)?;
    let layout: ParamLayout = model.layout().clone();
    // f16 gradients need loss scaling; f32 ones neither need nor get it (the scale stays 1).
    let scaling = model.precision() == Precision::F16;
    if scaling {
        model.enable_loss_scaling(&gpu, &config.loss_scaling())?;
    }
    model.set_dropout_seed(t.seed);

    let mut state = TrainingState {
        rng_seed: t.seed,
        ..TrainingState::default()
    };
    match resume {
        Some(ck) => {
            checkpoint::check_compatible(&ck, config, &layout)?;
            let ck = ck.with_layout(&layout)?;
            model.set_state(&gpu, &ck.master, Some((&ck.m, &ck.v)))?;
            state = ck.state;
            if scaling {
                model.set_loss_scale_state(&gpu, state.loss_scale, state.loss_scale_run)?;
            }
            run.truncate_metrics(state.step)?;
            log::info!("resumed from step {}", state.step);
        }
        None => {
            model.set_weights(&gpu, &gpt2_init(&layout, &config.model, t.seed))?;
            if scaling {
                state.loss_scale = config.loss_scaling().init_scale;
            }
        }
    }
    let val = dataset.val_batches(
        t.eval_batches,
        t.batch_size,
        config.model.block_size,
        t.seed,
    )?;
    let plot_title = format!(
        "{} layers x {} wide, {} heads, context {} ({})",
        config.model.n_layer,
        config.model.n_embd,
        config.model.n_head,
        config.model.block_size,
        model.precision()
    );
    let accum = t.grad_accum_steps;
    let tokens_per_step = (t.batch_size * config.model.block_size * accum) as u64;
    let mut last_step = t.max_steps as u64;
    if let Some(n) = opts.stop_after {
        last_step = last_step.min(state.step + n);
    }
    let bar = if opts.progress {
        let bar = indicatif::ProgressBar::new(t.max_steps as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} {msg} [{elapsed} < {eta}]",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_position(state.step);
        Some(bar)
    } else {
        None
    };

    let mut ring = LossRing::new(&gpu, t.batch_size * config.model.block_size, 4);
    let mut val_loss = None;
    let mut last_ckpt = None;
    let start = Instant::now();
    let mut eval_time = 0.0;
    let mut encode_time = 0.0;
    let mut submit_time = 0.0;
    let first_step = state.step;
    let mut last_loss = f32::NAN;
    // Set when the evaluation observer ends the run: like a Ctrl-C stop, it skips the final
    // full-split evaluation.
    let mut stopped_early = false;
    // Logs the losses that came back (steps in order) and shows the last on the bar.
    let report = |losses: Vec<(u64, f32)>, eval_time: f64, last_loss: &mut f32| -> Result<()> {
        let elapsed = (start.elapsed().as_secs_f64() - eval_time).max(1e-9);
        for (step, loss) in losses {
            *last_loss = loss;
            if !loss.is_finite() {
                return Err(diverged(
                    &opts.out_dir,
                    "training loss",
                    format!("step {step} gave a training loss of {loss}"),
                ));
            }
            let lr = learning_rate(t, step);
            let tok_s = ((step + 1 - first_step) * tokens_per_step) as f64 / elapsed;
            log_metric(
                &opts.out_dir,
                &serde_json::json!({"step": step, "train_loss": loss, "lr": lr, "tokens_per_s": tok_s}),
            )?;
            if let Some(bar) = &bar {
                bar.set_message(format!("loss {loss:.4} lr {lr:.2e} {tok_s:.0} tok/s"));
            }
        }
        Ok(())
    };

    // The GPU counts skipped steps from 0 in this process; the state holds the whole run's.
    let skipped_before = state.skipped_steps;
    let read_gpu_state = |state: &mut TrainingState| -> Result<()> {
        let (skipped, _, _) = model.read_update_stats(&gpu)?;
        state.skipped_steps = skipped_before + u64::from(skipped);
        if scaling {
            (state.loss_scale, state.loss_scale_run) = model.loss_scale_state(&gpu)?;
        }
        Ok(())
    };
    let save = |state: &TrainingState| -> Result<PathBuf> {
        let master = model.read_master(&gpu)?;
        let (m, v) = model.read_moments(&gpu)?;
        let ck = Checkpoint {
            config: config.clone(),
            tokenizer_json: tokenizer_json.clone(),
            state: state.clone(),
            layout: layout.clone(),
            master,
            m,
            v,
        };
        checkpoint::save(&opts.out_dir, &ck, 3)
    };

    while state.step < last_step {
        let step = state.step;
        let lr = learning_rate(t, step);
        let micro: Vec<(Vec<u32>, Vec<u32>)> = (0..accum as u32)
            .map(|m| {
                dataset
                    .train_batch(step, m, t.batch_size, config.model.block_size, t.seed)
                    .map(|b| (b.inputs, b.targets))
            })
            .collect::<Result<_>>()?;
        // Make room in the loss ring: this waits for the step `ring.len()` steps back, not this one.
        report(
            ring.drain_slot(&gpu, step)?.into_iter().collect(),
            eval_time,
            &mut last_loss,
        )?;
        let submit_start = Instant::now();
        let adam = AdamWStep {
            t: (step + 1).min(u32::MAX as u64) as u32,
            lr,
            beta1: t.beta1,
            beta2: t.beta2,
            eps: t.eps,
            weight_decay: t.weight_decay,
            grad_clip: t.grad_clip,
            // The dynamic scale lives on the GPU; there is no static one.
            loss_scale: 1.0,
        };
        encode_time += model.step(&gpu, &micro, &adam, |enc| {
            ring.record_copy(enc, &model, step)
        })?;
        submit_time += submit_start.elapsed().as_secs_f64();
        ring.request(step);
        state.step += 1;
        state.tokens_seen += tokens_per_step;
        report(ring.harvest(&gpu)?, eval_time, &mut last_loss)?;
        if let Some(bar) = &bar {
            bar.set_position(state.step);
        }
        let mut stopping = stop.load(Ordering::Relaxed);
        let eval_now = state.step.is_multiple_of(t.eval_interval as u64)
            || state.step == last_step
            || stopping;
        if eval_now {
            // Waiting for the steps in flight is training time, not evaluation time.
            report(ring.flush(&gpu)?, eval_time, &mut last_loss)?;
            let e0 = Instant::now();
            let v = evaluate(&gpu, &model, &val)?;
            if !v.is_finite() {
                return Err(diverged(
                    &opts.out_dir,
                    "validation loss",
                    format!("the evaluation after step {} gave {v}", state.step),
                ));
            }
            val_loss = Some(v);
            if state.best_val_loss.is_none_or(|b| v < b) {
                state.best_val_loss = Some(v);
            }
            read_gpu_state(&mut state)?;
            log_metric(
                &opts.out_dir,
                &serde_json::json!({"step": state.step, "val_loss": v, "val_ppl": v.exp(), "train_loss": last_loss, "skipped_steps": state.skipped_steps, "loss_scale": state.loss_scale}),
            )?;
            // A picture that cannot be drawn is not worth stopping a run for.
            if let Err(e) = super::plot::plot_run(&opts.out_dir, &plot_title) {
                log::warn!("could not draw the loss curve: {e}");
            }
            let line = format!(
                "step {}: train loss {last_loss:.4}, val loss {v:.4}, val ppl {:.2}",
                state.step,
                v.exp()
            );
            match &bar {
                Some(bar) => bar.println(line),
                None => eprintln!("{line}"),
            }
            eval_time += e0.elapsed().as_secs_f64();
            // Asked after the evaluation is logged, so the value that ended the run is on record.
            if let Some(observer) = &opts.on_eval
                && (observer.0)(state.step, v) == EvalAction::Stop
            {
                stopping = true;
                stopped_early = true;
            }
        }
        let ckpt_now = (t.checkpoint_interval > 0
            && state.step.is_multiple_of(t.checkpoint_interval as u64))
            || state.step == last_step
            || stopping;
        if ckpt_now {
            report(ring.flush(&gpu)?, eval_time, &mut last_loss)?;
            let e0 = Instant::now();
            read_gpu_state(&mut state)?;
            last_ckpt = Some(save(&state)?);
            eval_time += e0.elapsed().as_secs_f64();
        }
        if stopping {
            break;
        }
    }
    report(ring.flush(&gpu)?, eval_time, &mut last_loss)?;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let (mut full_val_loss, mut full_val_tokens) = (None, 0);
    if t.final_eval_full_split
        && state.step == t.max_steps as u64
        && !stop.load(Ordering::Relaxed)
        && !stopped_early
    {
        // Not training time: kept out of ms/step and tokens/s like the periodic evaluations.
        let e0 = Instant::now();
        let batches = super::eval::windows(
            dataset.val_tokens(),
            t.batch_size,
            config.model.block_size,
            "the validation split",
        )?;
        full_val_tokens = batches
            .iter()
            .map(|b| b.targets.iter().filter(|&&x| x != u32::MAX).count() as u64)
            .sum();
        let v = evaluate(&gpu, &model, &batches)?;
        full_val_loss = Some(v);
        log_metric(
            &opts.out_dir,
            &serde_json::json!({"step": state.step, "full_val_loss": v, "full_val_ppl": v.exp(), "full_val_tokens": full_val_tokens}),
        )?;
        eval_time += e0.elapsed().as_secs_f64();
    }
    let done = state.step - first_step;
    let train_s = (start.elapsed().as_secs_f64() - eval_time).max(1e-9);
    let tokens_per_s = (done * tokens_per_step) as f64 / train_s;
    Ok(TrainSummary {
        steps: state.step,
        val_loss,
        full_val_loss,
        full_val_tokens,
        ms_per_step: 1e3 * train_s / done.max(1) as f64,
        tokens_per_s,
        model_gflops: flops_per_token(config, layout.num_params(), config.model.block_size)
            * tokens_per_s
            / 1e9,
        dispatches_per_step: model.dispatches_per_step(accum),
        encode_us: 1e6 * encode_time / done.max(1) as f64,
        submit_us: 1e6 * submit_time / done.max(1) as f64,
        skipped_steps: state.skipped_steps,
        checkpoint: last_ckpt,
        precision: model.precision(),
    })
}
