//! What a [`super::Trainer`] reports: per step, per evaluation, per checkpoint and per run.

use crate::Precision;
use std::path::PathBuf;

/// One optimizer step, as measured on the GPU.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct StepStats {
    /// The step's index: 0 for the first step of a run (steps completed before it).
    pub step: u64,
    /// Mean cross-entropy per scored token of the step's last micro-batch (with
    /// `train.grad_accum_steps = 1`, the whole step). May be non-finite only in what
    /// [`super::Trainer::finished_steps`] returns; [`super::Trainer::step`] and
    /// [`super::Trainer::fit`] turn a non-finite loss into [`crate::Error::NonFinite`].
    pub loss: f32,
    /// Learning rate the step used (the schedule's value at `step`).
    pub lr: f64,
    /// Global L2 norm of the step's gradient (loss scale and micro-batch count divided out),
    /// before clipping; inf or NaN when the gradients overflowed.
    pub grad_norm: f32,
    /// Dynamic loss scale the step's backward pass used (1 without loss scaling).
    pub loss_scale: f32,
    /// The gradients held an inf or NaN, so the update was skipped (and, with loss scaling, the
    /// scale backed off).
    pub skipped: bool,
    /// Training tokens the step consumed (batch × context × micro-batches).
    pub tokens: u64,
    /// Training seconds between the previous step's completion and this one's, as the host saw
    /// them (evaluation and saving excluded). With steps in flight ([`super::Trainer::fit`]) a
    /// single value is noisy; [`StepStats::tokens_per_s`] is the steadier figure.
    pub seconds: f64,
    /// Training tokens per second of this trainer so far (evaluation and saving excluded).
    pub tokens_per_s: f64,
    /// Each routed MLP's load and auxiliary losses over the step's last micro-batch, in layer
    /// order (empty for a model without routed MLPs).
    pub moe: Vec<crate::cpu::moe::MoeStats>,
}

impl StepStats {
    /// The routed MLPs' summary: the unweighted load-balancing and z-losses summed over layers,
    /// the assignments dropped, and the lowest and highest expert fraction of any layer. `None`
    /// without routed MLPs.
    pub fn moe_summary(&self) -> Option<MoeSummary> {
        if self.moe.is_empty() {
            return None;
        }
        let fractions = self.moe.iter().flat_map(|m| m.fractions.iter().copied());
        Some(MoeSummary {
            aux_loss: self.moe.iter().map(|m| m.aux_loss).sum(),
            z_loss: self.moe.iter().map(|m| m.z_loss).sum(),
            dropped: self.moe.iter().map(|m| m.dropped).sum(),
            min_fraction: fractions.clone().fold(f32::INFINITY, f32::min),
            max_fraction: fractions.fold(f32::NEG_INFINITY, f32::max),
        })
    }
}

/// See [`StepStats::moe_summary`].
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct MoeSummary {
    /// Σ over routed layers of `E · Σ_e f_e · P_e` (1 per layer when balanced).
    pub aux_loss: f32,
    /// Σ over routed layers of the router z-loss.
    pub z_loss: f32,
    /// Assignments dropped for capacity, all layers.
    pub dropped: u32,
    /// The lowest fraction of assignments any expert of any layer received.
    pub min_fraction: f32,
    /// The highest.
    pub max_fraction: f32,
}

/// Which validation tokens an evaluation scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum EvalSet {
    /// The `train.eval_batches` fixed validation batches that [`super::Trainer::fit`] scores
    /// every `train.eval_interval` steps: the same windows every time (drawn from `train.seed`),
    /// so losses of different steps compare. The lowest is kept in the training state
    /// (`best_val_loss`, saved in checkpoints).
    Periodic,
    /// The first `n` of those same fixed batches; recorded nowhere.
    Batches(usize),
    /// Every token of the validation split exactly once, in consecutive windows.
    FullSplit,
}

/// One evaluation.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct EvalStats {
    /// Steps completed when it ran.
    pub step: u64,
    /// What was scored.
    pub set: EvalSet,
    /// Mean cross-entropy per scored token (nats); always finite (a non-finite loss is an
    /// error).
    pub loss: f64,
    /// Tokens scored.
    pub tokens: u64,
    /// Loss of the last training step reported before it (NaN if none was).
    pub train_loss: f32,
    /// Steps skipped for non-finite gradients over the whole run.
    pub skipped_steps: u64,
    /// The dynamic loss scale at that point (as saved in checkpoints).
    pub loss_scale: f32,
    /// Seconds it took.
    pub seconds: f64,
}

/// A checkpoint the trainer wrote.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SavedCheckpoint {
    /// Steps completed (the folder's `N` in `step-N`).
    pub step: u64,
    /// The checkpoint folder.
    pub path: PathBuf,
}

/// The run ended because `train.early_stopping_patience` periodic evaluations in a row did
/// not improve the best validation loss by more than `train.early_stopping_min_delta`.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct EarlyStop {
    /// The step at which the run stopped (the last evaluation's).
    pub step: u64,
    /// Evaluations without an improvement (the patience, reached).
    pub evals_without_improvement: u32,
    /// The lowest validation loss of the run.
    pub best_val_loss: f64,
    /// The step that reached it; the checkpoint the `best` pointer names.
    pub best_step: u64,
}

impl std::fmt::Display for EarlyStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "early stopping at step {}: {} evaluations without an improvement of the validation \
             loss (train.early_stopping_patience); the best, {:.4}, was at step {}",
            self.step, self.evals_without_improvement, self.best_val_loss, self.best_step
        )
    }
}

/// What [`super::Trainer::fit`] (and `kiln train`) measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TrainSummary {
    /// Optimizer steps completed in total.
    pub steps: u64,
    /// Last validation loss measured (periodic evaluation).
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
    /// Compute dispatches recorded per optimizer step (counted by the census).
    pub dispatches_per_step: u64,
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
    /// Why and where early stopping ended the run, when it did.
    pub early_stop: Option<EarlyStop>,
    /// Storage precision used.
    pub precision: Precision,
    /// Ranks that trained together (1 without data parallelism).
    pub ranks: usize,
    /// Multi-rank runs: mean milliseconds per step exchanging gradients between ranks (the
    /// all-reduce itself, after every rank has arrived); 0 alone.
    pub comm_ms_per_step: f64,
    /// Multi-rank runs: mean milliseconds per step this rank waited for the others to reach the
    /// exchange (load imbalance); 0 alone.
    pub wait_ms_per_step: f64,
    /// Multi-rank runs: mean milliseconds per step reading the gradients back (including the
    /// wait for the backward) and writing the average; 0 alone.
    pub readback_ms_per_step: f64,
    /// Multi-rank runs: SHA-256 of the final f32 master weights, checked equal on every rank.
    pub weights_sha256: Option<String>,
}
