//! The model: its configuration and the parameter layout.

pub(crate) mod arch;
pub mod config;
pub mod decode;
pub mod gpu;
pub mod init;
pub mod layout;
pub(crate) mod units;

pub use config::{
    ArchKind, AttentionKernel, Config, DataConfig, Decay, MlpKind, ModelConfig, ModelParts,
    NormKind, PositionKind, TokenizerKind, TrainConfig,
};
pub use layout::{Component, ParamKind, ParamLayout, TensorInfo};
