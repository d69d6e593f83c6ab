//! kiln trains and samples small language models on any GPU that wgpu reaches,
//! through hand-written WGSL compute shaders.
//!
//! Layers, bottom up: [`gpu`] (device, tensors, pipeline cache), [`shaders`] (the WGSL sources),
//! [`kernels`] (one wrapper per kernel family), [`cpu`] (the f32 reference every kernel is tested
//! against), [`ops`] and [`training`] (shape and settings descriptions both share); beside
//! them, [`model`] (configuration, parameter layout, the GPU step) and [`data`] (corpus,
//! tokenizers, cached token ids, batches). See
//! docs/ARCHITECTURE.md.
#![warn(missing_docs)]

pub mod cpu;
pub mod data;
mod error;
pub mod generate;
pub mod gpu;
pub mod kernels;
pub mod model;
pub mod ops;
mod precision;
pub mod quant;
pub mod shaders;
pub mod sweep;
pub mod train;
pub mod training;

pub use error::{Error, Result};
pub use gpu::{Gpu, GpuOptions, GpuTensor};
pub use precision::{Precision, PrecisionChoice};
