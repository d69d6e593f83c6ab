//! Training: the [`Trainer`] (a model, its optimizer state and its data on one device), its
//! schedule loop [`Trainer::fit`] and the [`Observer`]s it reports to, and around them what
//! `kiln train` adds: run folders ([`run_dir`], [`run`]), checkpoints, metrics and plots.
//!
//! - [`trainer`]: [`Trainer`]: `step`, `evaluate`, `save`, resume, `into_generator`.
//! - `fit`: [`Trainer::fit`] and [`FitOptions`].
//! - [`observer`]: the [`Observer`] trait and [`Control`]; [`observers`]: the metrics log, the
//!   loss plot and the progress display.
//! - [`stats`]: [`StepStats`], [`EvalStats`], [`SavedCheckpoint`], [`TrainSummary`],
//!   [`EarlyStop`].
//! - [`run`]: a run into a run folder (`kiln train`, each `kiln sweep` trial).

pub mod checkpoint;
pub mod eval;
mod fit;
pub mod observer;
pub mod observers;
pub mod plot;
mod readback;
pub mod run;
pub mod run_dir;
pub mod schedule;
pub mod stats;
pub mod trainer;

pub use fit::FitOptions;
pub use observer::{Control, Observer};
pub use observers::{LossPlot, MetricsLog, Progress};
pub use run::{TrainOptions, train, train_in};
pub use stats::{EarlyStop, EvalSet, EvalStats, SavedCheckpoint, StepStats, TrainSummary};
pub use trainer::Trainer;
