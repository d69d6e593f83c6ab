//! Storage precision of activations and parameters on the GPU.
//!
//! Every kernel family is one WGSL source written against an element type `T`. The type is chosen
//! by a one-line alias prepended at pipeline creation, so the same file serves both precisions and
//! stays valid WGSL on its own (see [`Precision::wgsl_prelude`]). Arithmetic that accumulates
//! (matmul, reductions) is done in f32 whatever `T` is.

use std::fmt;
use std::str::FromStr;

/// Element type used for GPU storage of activations and the working copy of the parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// IEEE half precision storage (needs `SHADER_F16`), f32 accumulation.
    F16,
    /// Single precision everywhere.
    F32,
}

impl Precision {
    /// The WGSL line(s) prepended to every kernel source to define `T`.
    pub fn wgsl_prelude(self) -> &'static str {
        match self {
            Precision::F16 => "enable f16;\nalias T = f16;\n",
            Precision::F32 => "alias T = f32;\n",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Precision::F16 => 2,
            Precision::F32 => 4,
        }
    }

    /// The lowercase name used in configs, JSON and logs.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F16 => "f16",
            Precision::F32 => "f32",
        }
    }

    /// Both precisions, f32 first.
    pub const ALL: [Precision; 2] = [Precision::F32, Precision::F16];
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f16" | "fp16" | "half" => Ok(Precision::F16),
            "f32" | "fp32" | "float" => Ok(Precision::F32),
            _ => Err(crate::Error::invalid("precision", s, "expected f16 or f32")),
        }
    }
}

/// What precision the user asked for: `Auto` picks f16 on GPUs that grant `SHADER_F16`, f32 on
/// CPU-backed adapters and wherever `SHADER_F16` is missing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrecisionChoice {
    /// f16 storage on a GPU that granted `SHADER_F16`; f32 elsewhere. CPU-backed adapters
    /// (lavapipe) get f32 even when they grant `SHADER_F16`: there memory is the host's, so half
    /// the bytes saves no bandwidth worth the conversions, and whole training steps of the baby
    /// GPT measured 20–30% faster in f32 (docs/ARCHITECTURE.md, "Precision").
    #[default]
    Auto,
    /// Force f16 (an error where the adapter lacks `SHADER_F16`).
    F16,
    /// Force f32 (works everywhere; used by tests to cover both paths on one machine).
    F32,
}

impl PrecisionChoice {
    /// The one rule every `kiln` subcommand follows: the `--precision` flag when it was given,
    /// else the config's `train.precision` (the run's config for `train`, the checkpoint's for
    /// `eval` and `sample`; `auto` where there is none). An explicit f16 on an adapter without
    /// `SHADER_F16` is then an error when the device is opened, whichever of the two asked.
    pub fn resolve(flag: Option<PrecisionChoice>, config: PrecisionChoice) -> PrecisionChoice {
        flag.unwrap_or(config)
    }
}

impl FromStr for PrecisionChoice {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(PrecisionChoice::Auto),
            other => match other.parse::<Precision>() {
                Ok(Precision::F16) => Ok(PrecisionChoice::F16),
                Ok(Precision::F32) => Ok(PrecisionChoice::F32),
                Err(_) => Err(crate::Error::invalid(
                    "precision",
                    s,
                    "expected auto, f16 or f32",
                )),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::PrecisionChoice::{self, *};

    /// Every combination of the global flag and the config's setting: the flag wins when given.
    #[test]
    fn the_flag_wins_over_the_config() {
        for config in [Auto, F16, F32] {
            assert_eq!(PrecisionChoice::resolve(None, config), config);
            for flag in [Auto, F16, F32] {
                assert_eq!(PrecisionChoice::resolve(Some(flag), config), flag);
            }
        }
    }
}
