//! The observers `kiln train` attaches to a [`super::Trainer`]: the metrics log, the loss plot
//! and the progress display. Each is usable on its own from the library.

use super::observer::{Control, Observer};
use super::run_dir::METRICS_FILE;
use super::stats::{EvalSet, EvalStats, StepStats, TrainSummary};
use crate::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Appends one JSON line per step and per evaluation to `metrics.jsonl` in a folder:
///
/// - a step: `step` (its index), `train_loss`, `lr`, `tokens_per_s`;
/// - a periodic evaluation: `step` (steps done), `val_loss`, `val_ppl`, `train_loss` (the last
///   step's), `skipped_steps`, `loss_scale`;
/// - the full-split evaluation: `step`, `full_val_loss`, `full_val_ppl`, `full_val_tokens`.
///
/// The file is opened for each line, so a run killed at any moment loses at most the line being
/// written (a resume drops a torn one, see [`super::run_dir::RunDir::truncate_metrics`]).
#[derive(Clone, Debug)]
pub struct MetricsLog {
    path: PathBuf,
}

impl MetricsLog {
    /// Logs to `dir/metrics.jsonl`, appending to what is there.
    pub fn new(dir: &Path) -> Self {
        MetricsLog {
            path: dir.join(METRICS_FILE),
        }
    }

    fn append(&self, value: &serde_json::Value) -> Result<Control> {
        let io = |source| Error::Io {
            path: self.path.display().to_string(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(io)?;
        writeln!(f, "{value}").map_err(io)?;
        Ok(Control::Continue)
    }
}

impl Observer for MetricsLog {
    fn on_step(&mut self, s: &StepStats) -> Result<Control> {
        let mut line = serde_json::json!({
            "step": s.step,
            "train_loss": s.loss,
            "lr": s.lr,
            "tokens_per_s": s.tokens_per_s,
        });
        if let Some(m) = s.moe_summary() {
            line["moe_aux_loss"] = m.aux_loss.into();
            line["moe_z_loss"] = m.z_loss.into();
            line["moe_dropped"] = m.dropped.into();
            line["expert_fractions"] = serde_json::json!(
                s.moe
                    .iter()
                    .map(|l| l.fractions.clone())
                    .collect::<Vec<_>>()
            );
        }
        self.append(&line)
    }

    fn on_eval(&mut self, e: &EvalStats) -> Result<Control> {
        self.append(&match e.set {
            EvalSet::FullSplit => serde_json::json!({
                "step": e.step,
                "full_val_loss": e.loss,
                "full_val_ppl": e.loss.exp(),
                "full_val_tokens": e.tokens,
            }),
            EvalSet::Periodic | EvalSet::Batches(_) => serde_json::json!({
                "step": e.step,
                "val_loss": e.loss,
                "val_ppl": e.loss.exp(),
                "train_loss": e.train_loss,
                "skipped_steps": e.skipped_steps,
                "loss_scale": e.loss_scale,
            }),
        })
    }
}

/// Redraws `loss.png` from `metrics.jsonl` in a folder after each periodic evaluation. Attach it
/// after the [`MetricsLog`] of the same folder, so the picture includes that evaluation. A
/// picture that cannot be drawn is logged as a warning, not worth stopping a run for.
#[derive(Clone, Debug)]
pub struct LossPlot {
    dir: PathBuf,
    title: String,
}

impl LossPlot {
    /// Plots `dir/metrics.jsonl` into `dir/loss.png` under `title`.
    pub fn new(dir: &Path, title: impl Into<String>) -> Self {
        LossPlot {
            dir: dir.to_path_buf(),
            title: title.into(),
        }
    }
}

impl Observer for LossPlot {
    fn on_eval(&mut self, e: &EvalStats) -> Result<Control> {
        if e.set != EvalSet::FullSplit
            && let Err(err) = super::plot::plot_run(&self.dir, &self.title)
        {
            log::warn!("could not draw the loss curve: {err}");
        }
        Ok(Control::Continue)
    }
}

/// A progress bar on stderr (steps, loss, learning rate, tokens/s, time left) and one line per
/// periodic evaluation (printed above the bar, or alone on stderr without one).
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    /// The routed MLPs' summary of the last step, for the evaluation lines.
    last_moe: String,
}

impl Progress {
    /// With `bar`, draws a bar of `max_steps` starting at `start_step`; without, prints only the
    /// evaluation lines (for logs and terminals that are not one).
    pub fn new(bar: bool, max_steps: u64, start_step: u64) -> Self {
        let bar = bar.then(|| {
            let bar = indicatif::ProgressBar::new(max_steps);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} {msg} [{elapsed} < {eta}]",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_position(start_step);
            bar
        });
        Progress {
            bar,
            last_moe: String::new(),
        }
    }
}

impl Observer for Progress {
    fn on_step(&mut self, s: &StepStats) -> Result<Control> {
        if let Some(bar) = &self.bar {
            bar.set_position(s.step + 1);
            bar.set_message(format!(
                "loss {:.4} lr {:.2e} {:.0} tok/s{}",
                s.loss,
                s.lr,
                s.tokens_per_s,
                moe_text(s)
            ));
        }
        self.last_moe = moe_text(s);
        Ok(Control::Continue)
    }

    fn on_eval(&mut self, e: &EvalStats) -> Result<Control> {
        if e.set == EvalSet::FullSplit {
            return Ok(Control::Continue);
        }
        let line = format!(
            "step {}: train loss {:.4}, val loss {:.4}, val ppl {:.2}{}",
            e.step,
            e.train_loss,
            e.loss,
            e.loss.exp(),
            self.last_moe
        );
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
        Ok(Control::Continue)
    }

    fn on_end(&mut self, _summary: &TrainSummary) -> Result<()> {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        Ok(())
    }
}

/// The routed MLPs' part of a progress line: expert load range and the unweighted auxiliary
/// losses summed over layers (empty for a dense model).
fn moe_text(s: &StepStats) -> String {
    match s.moe_summary() {
        None => String::new(),
        Some(m) => format!(
            ", experts {:.0}–{:.0}% aux {:.3} z {:.3}{}",
            100.0 * m.min_fraction,
            100.0 * m.max_fraction,
            m.aux_loss,
            m.z_loss,
            if m.dropped > 0 {
                format!(" dropped {}", m.dropped)
            } else {
                String::new()
            }
        ),
    }
}

impl Drop for Progress {
    // A run that ends with an error must not leave a half-drawn bar under the message.
    fn drop(&mut self) {
        if let Some(bar) = &self.bar
            && !bar.is_finished()
        {
            bar.finish_and_clear();
        }
    }
}
