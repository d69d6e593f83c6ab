//! [`Trainer::fit`]: steps, evaluations and checkpoints on the config's schedule, reported to
//! observers, with the steps kept in flight on the GPU.

use super::observer::{Control, Observer};
use super::stats::{EarlyStop, EvalSet, EvalStats, SavedCheckpoint, TrainSummary};
use super::trainer::{Trainer, check_loss};
use crate::Result;
use crate::model::Config;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// How [`Trainer::fit`] runs beyond what the config says.
#[derive(Clone, Copy, Debug, Default)]
pub struct FitOptions<'a> {
    /// Where checkpoints go (`step-N` folders and `latest`): every `train.checkpoint_interval`
    /// steps, at the last step and when stopped. `None` writes none.
    pub checkpoint_dir: Option<&'a std::path::Path>,
    /// Stop after this many steps of this call (with an evaluation and a checkpoint), whatever
    /// `train.max_steps` says.
    pub stop_after: Option<u64>,
    /// Checked after every step; once set, the run ends as [`Control::Stop`] ends it (Ctrl-C
    /// sets it in `kiln train`).
    pub stop: Option<&'a AtomicBool>,
}

/// The trainer's clocks when a `fit` began, so its summary counts that call alone.
struct ClockMark {
    submitted: u64,
    wait: f64,
    comm: f64,
    readback: f64,
    encode: f64,
    submit: f64,
    training: f64,
}

impl Trainer {
    /// Trains to `train.max_steps` (or `options.stop_after` more steps): evaluates the periodic
    /// validation batches every `train.eval_interval` steps and at the end, saves a checkpoint
    /// every `train.checkpoint_interval` steps and at the end (with
    /// `options.checkpoint_dir`), and when the run reaches `max_steps` scores the whole
    /// validation split once more (with `train.final_eval_full_split`). Every step, evaluation
    /// and checkpoint is reported to each of `observers` in order; any of them, or
    /// `options.stop`, can end the run early, which still evaluates and checkpoints the last
    /// step. With `train.early_stopping_patience`, every periodic evaluation that lowers the
    /// best validation loss is also checkpointed (named by the `best` pointer), and the run ends
    /// as an observer's stop would once that many evaluations in a row did not improve it by
    /// more than `train.early_stopping_min_delta` ([`TrainSummary::early_stop`] says so). A non-finite loss ends it with [`crate::Error::NonFinite`] before anything is saved
    /// from that state.
    pub fn fit(
        &mut self,
        options: &FitOptions<'_>,
        observers: &mut [&mut dyn Observer],
    ) -> Result<TrainSummary> {
        let t = self.config().train.clone();
        let first_step = self.steps_done();
        let mut last_step = t.max_steps as u64;
        if let Some(n) = options.stop_after {
            last_step = last_step.min(first_step + n);
        }
        let start = ClockMark {
            submitted: self.clock.submitted,
            wait: self.clock.wait,
            comm: self.clock.comm,
            readback: self.clock.readback,
            encode: self.clock.encode,
            submit: self.clock.submit,
            training: self.clock.training_seconds(),
        };
        let stop_flag = || options.stop.is_some_and(|s| s.load(Ordering::Relaxed));
        let (mut val_loss, mut last_checkpoint) = (None, None);
        // Set when an observer ends the run: like a Ctrl-C stop, it skips the final full-split
        // evaluation.
        let mut stopped_early = false;
        let mut early_stop = None;
        while self.steps_done() < last_step {
            self.submit_step()?;
            let mut stopping = self.report_steps(false, observers)? == Control::Stop;
            stopped_early |= stopping;
            stopping |= stop_flag();
            let step = self.steps_done();
            let (eval_every, save_every) = (t.eval_interval as u64, t.checkpoint_interval as u64);
            // With early stopping, each new best is saved so that `best` can name it.
            let mut new_best = false;
            if step.is_multiple_of(eval_every) || step == last_step || stopping {
                let (loss, control) = self.evaluate_and_report(EvalSet::Periodic, observers)?;
                val_loss = Some(loss);
                if control == Control::Stop {
                    stopping = true;
                    stopped_early = true;
                }
                if t.early_stopping_patience > 0 {
                    new_best = self.state().best_step == Some(step);
                    early_stop = self.early_stop_due();
                    stopping |= early_stop.is_some();
                    stopped_early |= early_stop.is_some();
                }
            }
            // Decided after the evaluation, whose observers may have ended the run.
            let save_due = (save_every > 0 && step.is_multiple_of(save_every))
                || step == last_step
                || stopping
                || new_best;
            if save_due && let Some(dir) = options.checkpoint_dir {
                let (saved, control) = self.save_and_report(dir, observers)?;
                last_checkpoint = Some(saved.path);
                stopped_early |= control == Control::Stop;
                stopping |= control == Control::Stop;
            }
            if stopping {
                break;
            }
        }
        self.report_steps(true, observers)?;
        let mut full = None;
        if t.final_eval_full_split
            && self.steps_done() == t.max_steps as u64
            && !stop_flag()
            && !stopped_early
        {
            let e = self.evaluate(EvalSet::FullSplit)?;
            self.timed(|_| notify(observers, |o| o.on_eval(&e)))?;
            full = Some(e);
        }
        let mut summary = self.summary(first_step, start, val_loss, full, last_checkpoint);
        summary.early_stop = early_stop;
        summary.weights_sha256 = self.check_weights_agree()?;
        for o in observers.iter_mut() {
            o.on_end(&summary)?;
        }
        Ok(summary)
    }

    /// Whether the last periodic evaluation used up `train.early_stopping_patience`.
    fn early_stop_due(&self) -> Option<EarlyStop> {
        let (state, patience) = (self.state(), self.config().train.early_stopping_patience);
        if patience == 0 || (state.evals_without_improvement as usize) < patience {
            return None;
        }
        Some(EarlyStop {
            step: state.step,
            evals_without_improvement: state.evals_without_improvement,
            best_val_loss: state.best_val_loss?,
            best_step: state.best_step?,
        })
    }

    /// Hands the finished steps' statistics to the observers (all of them, with `wait`),
    /// stopping with an error at the first non-finite loss.
    fn report_steps(&mut self, wait: bool, observers: &mut [&mut dyn Observer]) -> Result<Control> {
        let mut control = Control::Continue;
        for stats in self.finished_steps(wait)? {
            check_loss(&stats)?;
            if notify(observers, |o| o.on_step(&stats))? == Control::Stop {
                control = Control::Stop;
            }
        }
        Ok(control)
    }

    /// Reports the steps in flight, evaluates `set` and reports it; the observers' time is not
    /// training time.
    fn evaluate_and_report(
        &mut self,
        set: EvalSet,
        observers: &mut [&mut dyn Observer],
    ) -> Result<(f64, Control)> {
        // The steps before the evaluation are reported first, so a log holds them in order.
        let mut control = self.report_steps(true, observers)?;
        let e: EvalStats = self.evaluate(set)?;
        if self.timed(|_| notify(observers, |o| o.on_eval(&e)))? == Control::Stop {
            control = Control::Stop;
        }
        Ok((e.loss, control))
    }

    /// Reports the steps in flight, saves under `dir` and reports the checkpoint.
    fn save_and_report(
        &mut self,
        dir: &std::path::Path,
        observers: &mut [&mut dyn Observer],
    ) -> Result<(SavedCheckpoint, Control)> {
        let mut control = self.report_steps(true, observers)?;
        let saved = self.save(dir)?;
        if self.timed(|_| notify(observers, |o| o.on_checkpoint(&saved)))? == Control::Stop {
            control = Control::Stop;
        }
        Ok((saved, control))
    }

    /// Runs `f`, counting its time as not training.
    fn timed<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        let start = Instant::now();
        let out = f(self);
        self.clock.excluded += start.elapsed().as_secs_f64();
        out
    }

    fn summary(
        &self,
        first_step: u64,
        start: ClockMark,
        val_loss: Option<f64>,
        full: Option<EvalStats>,
        checkpoint: Option<PathBuf>,
    ) -> TrainSummary {
        let config = self.config();
        let done = self.steps_done() - first_step;
        let per_step = (self.clock.submitted - start.submitted).max(1) as f64;
        let train_s = (self.clock.training_seconds() - start.training).max(1e-9);
        let tokens_per_s = (done * self.tokens_per_step()) as f64 / train_s;
        let params = self.model().layout().num_params();
        TrainSummary {
            steps: self.steps_done(),
            val_loss,
            full_val_loss: full.as_ref().map(|e| e.loss),
            full_val_tokens: full.as_ref().map_or(0, |e| e.tokens),
            ms_per_step: 1e3 * train_s / done.max(1) as f64,
            tokens_per_s,
            model_gflops: flops_per_token(config, params, config.model.block_size) * tokens_per_s
                / 1e9,
            dispatches_per_step: self
                .model()
                .dispatches_per_step(self.gpu(), config.train.grad_accum_steps),
            encode_us: 1e6 * (self.clock.encode - start.encode) / per_step,
            submit_us: 1e6 * (self.clock.submit - start.submit) / per_step,
            skipped_steps: self.state().skipped_steps,
            checkpoint,
            early_stop: None,
            precision: self.precision(),
            ranks: self.ranks(),
            comm_ms_per_step: 1e3 * (self.clock.comm - start.comm) / per_step,
            wait_ms_per_step: 1e3 * (self.clock.wait - start.wait) / per_step,
            readback_ms_per_step: 1e3 * (self.clock.readback - start.readback) / per_step,
            weights_sha256: None,
        }
    }
}

/// Calls `event` on every observer in order (all of them, even after one asks to stop).
fn notify(
    observers: &mut [&mut dyn Observer],
    mut event: impl FnMut(&mut dyn Observer) -> Result<Control>,
) -> Result<Control> {
    let mut control = Control::Continue;
    for o in observers.iter_mut() {
        if event(&mut **o)? == Control::Stop {
            control = Control::Stop;
        }
    }
    Ok(control)
}

/// Model FLOPs of one token's forward and backward: 6 per parameter (the matmuls) plus the
/// attention products, 12·n_layer·C·T (the PaLM appendix count).
fn flops_per_token(config: &Config, params: usize, seq: usize) -> f64 {
    let m = &config.model;
    6.0 * params as f64 + 12.0 * (m.n_layer * m.n_embd * seq) as f64
}
