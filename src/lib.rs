//! kiln trains, fine-tunes and samples small language models on any GPU that wgpu reaches,
//! through hand-written WGSL compute shaders.
//!
//! Layers, bottom up: [`gpu`] (device, tensors, pipeline cache), [`shaders`] (the WGSL sources),
//! [`kernels`] (one wrapper per kernel family), [`cpu`] (the f32 reference every kernel is tested
//! against), [`ops`] (shape descriptions both share). See docs/ARCHITECTURE.md.
#![warn(missing_docs)]

pub mod cpu;
mod error;
pub mod gpu;
pub mod kernels;
pub mod model;
pub mod ops;
mod precision;
pub mod shaders;
pub mod train;

pub use error::{Error, Result};
pub use gpu::{Gpu, GpuOptions, GpuTensor};
pub use precision::{Precision, PrecisionChoice};
