//! kiln trains and samples small language models on any GPU that wgpu reaches,
//! through hand-written WGSL compute shaders.
//!
//! Layers, bottom up: [`gpu`] (device, tensors, pipeline cache), [`shaders`] (the WGSL sources),
//! [`kernels`] (one wrapper per kernel family), [`cpu`] (the f32 reference every kernel is tested
//! against), [`ops`] and [`training`] (shape and settings descriptions both share); beside
//! them, [`model`] (configuration, parameter layout, the GPU step) and [`data`] (corpus,
//! tokenizers, cached token ids, batches); on top, [`train`] (the [`Trainer`], checkpoints, run
//! folders), [`generate`] (sampling), [`sweep`] (hyperparameter search) and [`interop`]
//! (Hugging Face and GGUF export, Hugging Face import). See
//! docs/ARCHITECTURE.md.
//!
//! The types a program that trains and samples needs are re-exported here: [`Config`] and its
//! tables, [`Dataset`] and the tokenizers, [`Trainer`] with its [`Observer`] hook and statistics,
//! [`Generator`] and [`SamplingParams`], [`Gpu`], [`Error`] and [`Result`]. The example
//! `examples/train_llama.rs` uses them end to end; [`Trainer`]'s documentation starts small.
#![warn(missing_docs)]

pub mod cpu;
pub mod data;
pub mod dist;
mod error;
pub mod finetune;
pub mod generate;
pub mod gpu;
pub mod interop;
pub mod kernels;
pub mod model;
pub mod ops;
mod precision;
pub mod quant;
pub mod shaders;
pub mod sweep;
pub mod train;
pub mod training;

pub use data::{Batch, BpeTokenizer, CharTokenizer, Dataset, Tokenizer};
pub use error::{Error, Result};
pub use generate::{ContextWindow, Generator, SamplingParams, sampler::Generation};
pub use gpu::{Gpu, GpuOptions, GpuTensor};
pub use model::{
    ArchKind, Config, DataConfig, Decay, MlpKind, ModelConfig, NormKind, PositionKind,
    TokenizerKind, TrainConfig,
};
pub use precision::{Precision, PrecisionChoice};
pub use train::checkpoint::{Checkpoint, TrainingState};
pub use train::{
    Control, EarlyStop, EvalSet, EvalStats, FitOptions, LossPlot, MetricsLog, Observer, Progress,
    SavedCheckpoint, StepStats, TrainSummary, Trainer,
};
