//! The model: its configuration and the parameter layout.

pub mod config;
pub mod decode;
pub mod gpu;
pub mod init;
pub mod layout;

pub use config::{Config, DataConfig, Decay, ModelConfig, TokenizerKind, TrainConfig};
pub use layout::{Component, ParamKind, ParamLayout, TensorInfo};
