//! The CPU reference: every op in plain, commented f32 Rust.
//!
//! These functions are the oracle the GPU kernels are tested against and the baseline the
//! benchmarks compare with. They favour being obviously right over being fast. Names and argument
//! order match the GPU wrappers in [`crate::kernels`]: outputs first, then inputs, then the shape.

pub mod activation;
pub mod adamw;
pub mod attention;
pub mod crossentropy;
pub mod decode;
pub mod dropout;
pub mod embedding;
pub mod flash_attention;
pub mod gpt;
pub mod gradnorm;
pub mod layernorm;
pub mod lossscale;
pub mod matmul;
pub mod quant;
pub mod residual;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;
