//! The hook through which [`super::Trainer::fit`] reports progress: metrics files, progress bars,
//! pruners and a user's own code all implement [`Observer`].

use super::stats::{EvalStats, SavedCheckpoint, StepStats, TrainSummary};
use crate::Result;

/// What an observer wants after an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// Keep training.
    Continue,
    /// End the run as Ctrl-C does: no further step is submitted, then the steps in flight are
    /// reported, an evaluation runs (unless this answered one) and a checkpoint is written
    /// (where [`super::FitOptions::checkpoint_dir`] is set). The final full-split evaluation is
    /// skipped.
    Stop,
}

/// Told what [`super::Trainer::fit`] measures, in order: every step's statistics (steps in
/// order, a few steps after the GPU ran them), then each evaluation and checkpoint once the steps
/// before it are reported. Every method has a default that does nothing and continues, so an
/// observer implements only what it needs.
///
/// Observers run on the training thread between submissions: keep them quick. An error from
/// one ends the run with that error (nothing further is saved).
///
/// ```
/// use kiln::train::{Control, Observer, StepStats};
///
/// /// Stops a run once the training loss is under a target.
/// struct StopBelow(f32);
///
/// impl Observer for StopBelow {
///     fn on_step(&mut self, s: &StepStats) -> kiln::Result<Control> {
///         Ok(if s.loss < self.0 { Control::Stop } else { Control::Continue })
///     }
/// }
/// ```
pub trait Observer {
    /// After each optimizer step's numbers come back.
    fn on_step(&mut self, _stats: &StepStats) -> Result<Control> {
        Ok(Control::Continue)
    }

    /// After each evaluation (the periodic ones and the final full-split one).
    fn on_eval(&mut self, _stats: &EvalStats) -> Result<Control> {
        Ok(Control::Continue)
    }

    /// After each checkpoint is written.
    fn on_checkpoint(&mut self, _saved: &SavedCheckpoint) -> Result<Control> {
        Ok(Control::Continue)
    }

    /// Once, when the run ends without an error.
    fn on_end(&mut self, _summary: &TrainSummary) -> Result<()> {
        Ok(())
    }
}

/// Any `FnMut(&StepStats) -> Control` closure observes steps.
impl<F: FnMut(&StepStats) -> Control> Observer for F {
    fn on_step(&mut self, stats: &StepStats) -> Result<Control> {
        Ok(self(stats))
    }
}
