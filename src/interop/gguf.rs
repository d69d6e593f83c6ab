//! `kiln export --format gguf`: a GGUF v3 file for llama.cpp's `gpt2` and `llama` loaders.
//!
//! Layout (GGUF v3, little-endian): the magic `GGUF`, version 3, the tensor and key counts, the
//! metadata keys (a length-prefixed string, a value type, the value), one info record per tensor
//! (name, dimensions in `ne` order — innermost first, so a PyTorch `(rows, cols)` matrix is
//! `[cols, rows]` — type, offset into the data section), padding to `general.alignment`, then
//! the tensors, each starting at a multiple of the alignment.
//!
//! Types: f32 writes everything in f32; f16 writes matrices in f16 and vectors in f32 (as
//! llama.cpp's converter does: norms and biases are tiny and precision-sensitive); q8_0 writes
//! matrices whose rows split into 32-element blocks as llama.cpp's `block_q8_0` (an f16 scale
//! `d`, then 32 signed bytes), quantised by kiln's own q8 quantiser with groups of 32, whose
//! bytes are that block's `qs` (see [`crate::quant`]); the position table and any matrix whose
//! width is not a multiple of 32 stay f16.

use super::gguf_tensors::{GgufTensor, gguf_tensors, gguf_values};
use super::hf_config::check_exportable;
use super::hf_export::f16_bytes;
use super::hf_tokenizer::{end_of_text, gguf_vocabulary};
use crate::data::Tokenizer;
use crate::model::ArchKind;
use crate::quant::weights::ModelWeights;
use crate::quant::{BLOCK, QuantKind};
use crate::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Bytes every tensor's data starts on (GGUF's default, written as `general.alignment`).
const ALIGNMENT: usize = 32;

/// The tensor type of the export (`--type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufType {
    /// Every tensor in f32.
    F32,
    /// Matrices in f16, vectors in f32.
    F16,
    /// Matrices in llama.cpp's q8_0 blocks, vectors in f32.
    Q8_0,
}

impl std::str::FromStr for GgufType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(GgufType::F32),
            "f16" => Ok(GgufType::F16),
            "q8_0" => Ok(GgufType::Q8_0),
            other => Err(Error::invalid("--type", other, "must be f32, f16 or q8_0")),
        }
    }
}

/// ggml's type numbers.
const GGML_F32: u32 = 0;
const GGML_F16: u32 = 1;
const GGML_Q8_0: u32 = 8;

/// Exports the float checkpoint `checkpoint` as the GGUF file `out` (written to a temporary
/// file beside it, synced, then renamed). Refuses an existing `out`.
pub fn export_gguf(checkpoint: &Path, out: &Path, ty: GgufType) -> Result<PathBuf> {
    if out.exists() {
        return Err(Error::invalid(
            "--out",
            out.display(),
            "exists; choose a new file name or delete it",
        ));
    }
    let folder = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !folder.is_dir() || out.file_name().is_none() {
        return Err(Error::invalid(
            "--out",
            out.display(),
            format!(
                "names no file in an existing folder ({} is not a folder); create the folder first",
                folder.display()
            ),
        ));
    }
    let w = ModelWeights::load(checkpoint)?;
    if w.settings.is_some() {
        return Err(Error::Interop {
            path: w.folder.display().to_string(),
            message: "is quantised; export the float checkpoint it was made from (--type q8_0 \
                      quantises on export)"
                .into(),
        });
    }
    check_exportable(&w.config.model)?;
    let tokenizer = Tokenizer::from_json(&w.tokenizer_json)?;
    let mut g = Gguf::default();
    metadata(&mut g, &w, &tokenizer, ty)?;
    for t in gguf_tensors(&w.config.model, w.vocab)? {
        let values = gguf_values(&t, &w.layout, &w.values)?;
        let (ggml, bytes) = encode(&t, &values, ty)?;
        g.tensor(&t.name, &t.shape, ggml, bytes);
    }
    crate::data::write_atomic_with(out, |f| g.write(f))?;
    Ok(out.to_path_buf())
}

/// The hyperparameter and tokenizer keys llama.cpp's loader reads.
fn metadata(g: &mut Gguf, w: &ModelWeights, tokenizer: &Tokenizer, ty: GgufType) -> Result<()> {
    let m = &w.config.model;
    let p = m.parts();
    let arch = match m.arch {
        ArchKind::Gpt2 => "gpt2",
        ArchKind::Llama => "llama",
    };
    let u32_of = |key: &str, v: usize| {
        u32::try_from(v).map_err(|_| Error::invalid(key, v, "does not fit GGUF's u32"))
    };
    g.string("general.architecture", arch);
    let name = w
        .folder
        .file_name()
        .map_or("kiln".into(), |n| n.to_string_lossy());
    g.string("general.name", &format!("kiln {name}"));
    g.u32("general.alignment", ALIGNMENT as u32);
    let (file_type, quantized) = match ty {
        GgufType::F32 => (0, false),
        GgufType::F16 => (1, false),
        GgufType::Q8_0 => (7, true),
    };
    g.u32("general.file_type", file_type);
    if quantized {
        g.u32("general.quantization_version", 2);
    }
    let k = |s: &str| format!("{arch}.{s}");
    g.u32(
        &k("context_length"),
        u32_of("model.block_size", m.block_size)?,
    );
    g.u32(&k("embedding_length"), u32_of("model.n_embd", m.n_embd)?);
    g.u32(&k("block_count"), u32_of("model.n_layer", m.n_layer)?);
    g.u32(
        &k("feed_forward_length"),
        u32_of("model.mlp_hidden", p.mlp_hidden)?,
    );
    g.u32(
        &k("attention.head_count"),
        u32_of("model.n_head", m.n_head)?,
    );
    match m.arch {
        ArchKind::Gpt2 => g.f32(&k("attention.layer_norm_epsilon"), p.norm_eps),
        ArchKind::Llama => {
            g.u32(
                &k("attention.head_count_kv"),
                u32_of("model.n_kv_head", p.n_kv_head)?,
            );
            g.f32(&k("attention.layer_norm_rms_epsilon"), p.norm_eps);
            g.u32(
                &k("rope.dimension_count"),
                u32_of("head size", m.n_embd / m.n_head)?,
            );
            g.f32(&k("rope.freq_base"), p.rope_theta);
            g.u32(&k("vocab_size"), u32_of("vocabulary", w.vocab)?);
        }
    }
    let (tokens, merges, types) = gguf_vocabulary(tokenizer)?;
    g.string("tokenizer.ggml.model", "gpt2");
    g.string("tokenizer.ggml.pre", "gpt-2");
    g.strings("tokenizer.ggml.tokens", &tokens);
    g.i32s("tokenizer.ggml.token_type", &types);
    g.strings("tokenizer.ggml.merges", &merges);
    if let Some((eos, _)) = end_of_text(tokenizer) {
        g.u32("tokenizer.ggml.bos_token_id", eos);
        g.u32("tokenizer.ggml.eos_token_id", eos);
    }
    g.bool("tokenizer.ggml.add_bos_token", false);
    Ok(())
}

/// The ggml type and bytes of tensor `t` under the export type `ty`.
fn encode(t: &GgufTensor, values: &[f32], ty: GgufType) -> Result<(u32, Vec<u8>)> {
    let f32_bytes = || values.iter().flat_map(|x| x.to_le_bytes()).collect();
    let matrix = t.shape.len() == 2;
    let cols = t.shape.last().copied().unwrap_or(0);
    Ok(match ty {
        _ if !matrix => (GGML_F32, f32_bytes()),
        GgufType::F32 => (GGML_F32, f32_bytes()),
        GgufType::Q8_0 if cols.is_multiple_of(BLOCK) && t.name != "position_embd.weight" => {
            (GGML_Q8_0, q8_0_bytes(values, t.shape[0], cols)?)
        }
        GgufType::F16 | GgufType::Q8_0 => (GGML_F16, f16_bytes(&t.name, values)?),
    })
}

/// llama.cpp's `block_q8_0` rows: per 32 elements, the f16 scale then 32 signed bytes.
fn q8_0_bytes(values: &[f32], rows: usize, cols: usize) -> Result<Vec<u8>> {
    let q = crate::cpu::quant::quantize(values, rows, cols, QuantKind::Q8, BLOCK)?;
    let blocks = cols / BLOCK;
    let mut out = Vec::with_capacity(rows * blocks * (2 + BLOCK));
    for r in 0..rows {
        for b in 0..blocks {
            out.extend_from_slice(&q.scales()[r * blocks + b].to_le_bytes());
            out.extend((0..BLOCK).map(|i| q.q(r, b * BLOCK + i) as i8 as u8));
        }
    }
    Ok(out)
}

/// A GGUF file being assembled in memory.
#[derive(Default)]
struct Gguf {
    kv: Vec<u8>,
    n_kv: u64,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

/// GGUF's metadata value types.
const T_I32: u32 = 5;
const T_U32: u32 = 4;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

impl Gguf {
    fn key(&mut self, key: &str, ty: u32) {
        put_str(&mut self.kv, key);
        self.kv.extend_from_slice(&ty.to_le_bytes());
        self.n_kv += 1;
    }
    fn u32(&mut self, key: &str, v: u32) {
        self.key(key, T_U32);
        self.kv.extend_from_slice(&v.to_le_bytes());
    }
    fn f32(&mut self, key: &str, v: f32) {
        self.key(key, T_F32);
        self.kv.extend_from_slice(&v.to_le_bytes());
    }
    fn bool(&mut self, key: &str, v: bool) {
        self.key(key, T_BOOL);
        self.kv.push(u8::from(v));
    }
    fn string(&mut self, key: &str, v: &str) {
        self.key(key, T_STRING);
        put_str(&mut self.kv, v);
    }
    fn strings(&mut self, key: &str, v: &[String]) {
        self.key(key, T_ARRAY);
        self.kv.extend_from_slice(&T_STRING.to_le_bytes());
        self.kv.extend_from_slice(&(v.len() as u64).to_le_bytes());
        for s in v {
            put_str(&mut self.kv, s);
        }
    }
    fn i32s(&mut self, key: &str, v: &[i32]) {
        self.key(key, T_ARRAY);
        self.kv.extend_from_slice(&T_I32.to_le_bytes());
        self.kv.extend_from_slice(&(v.len() as u64).to_le_bytes());
        for x in v {
            self.kv.extend_from_slice(&x.to_le_bytes());
        }
    }
    /// Adds a tensor of PyTorch-order `shape` (stored reversed, as ggml's `ne`).
    fn tensor(&mut self, name: &str, shape: &[usize], ty: u32, bytes: Vec<u8>) {
        let ne = shape.iter().rev().map(|&n| n as u64).collect();
        self.tensors.push((name.to_string(), ne, ty, bytes));
    }

    fn write(&self, w: &mut impl Write) -> std::io::Result<()> {
        let mut head = Vec::new();
        head.extend_from_slice(b"GGUF");
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&self.n_kv.to_le_bytes());
        head.extend_from_slice(&self.kv);
        let mut offset = 0usize;
        for (name, ne, ty, bytes) in &self.tensors {
            put_str(&mut head, name);
            head.extend_from_slice(&(ne.len() as u32).to_le_bytes());
            for n in ne {
                head.extend_from_slice(&n.to_le_bytes());
            }
            head.extend_from_slice(&ty.to_le_bytes());
            head.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += bytes.len().next_multiple_of(ALIGNMENT);
        }
        head.resize(head.len().next_multiple_of(ALIGNMENT), 0);
        w.write_all(&head)?;
        for (_, _, _, bytes) in &self.tensors {
            w.write_all(bytes)?;
            let pad = bytes.len().next_multiple_of(ALIGNMENT) - bytes.len();
            w.write_all(&vec![0u8; pad])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_alignment() {
        let mut g = Gguf::default();
        g.u32("a.b", 7);
        g.tensor("t", &[2, 3], GGML_F32, vec![1; 24]);
        g.tensor("u", &[1], GGML_F32, vec![2; 4]);
        let mut out = Vec::new();
        g.write(&mut out).unwrap();
        assert_eq!(&out[..4], b"GGUF");
        assert_eq!(u32::from_le_bytes(out[4..8].try_into().unwrap()), 3);
        assert_eq!(u64::from_le_bytes(out[8..16].try_into().unwrap()), 2);
        assert_eq!(u64::from_le_bytes(out[16..24].try_into().unwrap()), 1);
        // Data: 24 bytes padded to 32, then 4 bytes padded to 32.
        assert_eq!(out.len() % ALIGNMENT, 0);
        let data = out.len() - 64;
        assert_eq!(&out[data..data + 24], &[1; 24]);
        assert_eq!(&out[data + 32..data + 36], &[2; 4]);
    }
}
