//! Training-run support: checkpoints.

pub mod checkpoint;
