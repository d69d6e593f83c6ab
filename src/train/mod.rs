//! Training runs: the learning-rate schedule, checkpoints and the training loop.

pub mod checkpoint;
pub mod eval;
pub mod plot;
pub mod run_dir;
pub mod schedule;
pub mod trainer;
