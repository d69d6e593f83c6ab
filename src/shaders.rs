//! The table of WGSL sources, the precision alias, and naga validation.
//!
//! Each file in `shaders/` is one kernel family. It is valid WGSL once a precision prelude
//! (`alias T = f32;`, or `enable f16; alias T = f16;`) is put in front of it; nothing else is
//! substituted. Tile sizes and flags are `override` constants set at pipeline creation.

use crate::{Error, Precision, Result};

const MATMUL: &str = include_str!("../shaders/matmul.wgsl");
const MATMUL_SUBGROUP: &str = include_str!("../shaders/matmul_subgroup.wgsl");
const MATMUL_TEXTURE: &str = include_str!("../shaders/matmul_texture.wgsl");
const MATMUL_TEXTURE_STORE: &str = include_str!("../shaders/matmul_texture_store.wgsl");
const MATMUL_TEXTURE_STORE_VEC4: &str = include_str!("../shaders/matmul_texture_store_vec4.wgsl");
const ATTENTION: &str = include_str!("../shaders/attention.wgsl");
const EMBEDDING: &str = include_str!("../shaders/embedding.wgsl");
const LAYERNORM: &str = include_str!("../shaders/layernorm.wgsl");
const ACTIVATION: &str = include_str!("../shaders/activation.wgsl");
const GELU: &str = include_str!("../shaders/gelu.wgsl");
const ELEMENTWISE: &str = include_str!("../shaders/elementwise.wgsl");
const CROSSENTROPY: &str = include_str!("../shaders/crossentropy.wgsl");
const GRADNORM: &str = include_str!("../shaders/gradnorm.wgsl");
const ADAMW: &str = include_str!("../shaders/adamw.wgsl");
const DROPOUT: &str = include_str!("../shaders/dropout.wgsl");
const DECODE: &str = include_str!("../shaders/decode.wgsl");
const LOSSSCALE: &str = include_str!("../shaders/lossscale.wgsl");
const RMSNORM: &str = include_str!("../shaders/rmsnorm.wgsl");
const ROPE: &str = include_str!("../shaders/rope.wgsl");
const SWIGLU: &str = include_str!("../shaders/swiglu.wgsl");
const FLASH_ATTENTION: &str = include_str!("../shaders/flash_attention.wgsl");

// The fused attention's head-size classes: HV, the vec4s of a head row, as a constant so that
// loops over a row have a fixed trip count (see flash_attention.wgsl). One line each, kept here
// rather than as four one-line files.
const FLASH_HEAD_16: &str = "const HV: u32 = 4u;\n";
const FLASH_HEAD_32: &str = "const HV: u32 = 8u;\n";
const FLASH_HEAD_64: &str = "const HV: u32 = 16u;\n";
const FLASH_HEAD_128: &str = "const HV: u32 = 32u;\n";
const QUANT: &str = include_str!("../shaders/quant.wgsl");
const MOE: &str = include_str!("../shaders/moe.wgsl");

/// Every shader module: (name, the files it is made of, in order). A module made of several
/// files is an extension compiled after its base (used for kernels that need an optional feature
/// such as SUBGROUP, so the base stays usable on adapters without it).
pub const MODULES: &[(&str, &[&str])] = &[
    ("matmul", &[GELU, MATMUL]),
    ("matmul_subgroup", &[GELU, MATMUL, MATMUL_SUBGROUP]),
    (
        "matmul_texture",
        &[GELU, MATMUL, MATMUL_TEXTURE_STORE, MATMUL_TEXTURE],
    ),
    (
        "matmul_texture_vec4",
        &[GELU, MATMUL, MATMUL_TEXTURE_STORE_VEC4, MATMUL_TEXTURE],
    ),
    ("attention", &[ATTENTION]),
    ("embedding", &[EMBEDDING]),
    ("layernorm", &[LAYERNORM]),
    ("activation", &[GELU, ACTIVATION]),
    ("elementwise", &[ELEMENTWISE]),
    ("crossentropy", &[CROSSENTROPY]),
    ("gradnorm", &[GRADNORM]),
    ("adamw", &[ADAMW]),
    ("lossscale", &[LOSSSCALE]),
    ("dropout", &[DROPOUT]),
    ("decode", &[DECODE]),
    ("rmsnorm", &[RMSNORM]),
    ("rope", &[ROPE]),
    ("swiglu", &[SWIGLU]),
    ("flash_attention_16", &[FLASH_HEAD_16, FLASH_ATTENTION]),
    ("flash_attention_32", &[FLASH_HEAD_32, FLASH_ATTENTION]),
    ("flash_attention_64", &[FLASH_HEAD_64, FLASH_ATTENTION]),
    ("flash_attention_128", &[FLASH_HEAD_128, FLASH_ATTENTION]),
    ("quant", &[QUANT]),
    ("moe", &[MOE]),
];

/// The concatenated source of a module, without the precision prelude.
pub fn source(module: &str) -> Result<String> {
    MODULES
        .iter()
        .find(|(n, _)| *n == module)
        .map(|(_, parts)| parts.concat())
        .ok_or_else(|| Error::Shader {
            name: module.to_string(),
            message: "no such shader module".to_string(),
        })
}

/// The source with the precision prelude in front.
pub fn specialised_source(module: &str, precision: Precision) -> Result<String> {
    Ok(format!("{}{}", precision.wgsl_prelude(), source(module)?))
}

/// Parses and validates WGSL with naga, returning the error with its line and column.
/// `name` is used in the message; lines are those of `source` as given (prelude included).
pub fn validate_source(name: &str, source: &str) -> Result<()> {
    let module = naga::front::wgsl::parse_str(source).map_err(|e| Error::Shader {
        name: name.to_string(),
        message: e.emit_to_string_with_path(source, name),
    })?;
    let mut validator = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    );
    validator.validate(&module).map_err(|e| Error::Shader {
        name: name.to_string(),
        message: e.emit_to_string_with_path(source, name),
    })?;
    Ok(())
}
