//! Weight-only quantisation for inference: linear-layer weights stored as 8-bit or 4-bit
//! integers with one f16 scale per group of inputs, dequantised inside the GPU's products.
//!
//! A weight matrix `W` of `rows × cols` (a linear layer's `(out, in)`; a token table's
//! `(vocab, channels)`) is cut along each row into groups of `group_size` consecutive inputs.
//! Each group gets one scale `d` and each element an integer `q`, and the weight it stands for is
//! `d · q`. The quantisation is symmetric (no zero point): `d = max|w| / qmax` over the group,
//! `q = round(w / d)`, with `qmax` 127 for [`QuantKind::Q8`] and 7 for [`QuantKind::Q4`], so every
//! element is within half a step (`d / 2`) of its weight (see [`crate::cpu::quant`]).
//!
//! # Storage, and llama.cpp's blocks
//!
//! Rows are packed in blocks of 32 inputs ([`BLOCK`]), laid out byte for byte as the quantised
//! values (`qs`) of llama.cpp's `q8_0` and `q4_0` blocks, so that a GGUF export of a model with
//! groups of 32 can copy the bytes and the scales (its `d`) without quantising again:
//!
//! - **q8**: one signed byte per element, in order (`q8_0`'s `int8_t qs[32]`); a GPU word (`u32`,
//!   little-endian) holds elements `4w .. 4w+3` of the row.
//! - **q4**: 16 bytes per block; byte `j` holds element `j` of the block in its low nibble and
//!   element `j + 16` in its high nibble, each stored as `q + 8` (`q4_0`'s `qs[16]`). A GPU word
//!   holds eight values: the low nibbles of its four bytes are elements `4w' .. 4w'+3` of the
//!   block and the high nibbles elements `16 + 4w' .. 16 + 4w'+3` (`w'` = word within the block).
//!   `q4_0` dequantises `(nibble − 8) · d`, which is ours; it chooses `d = −max/8` (the
//!   signed value of largest magnitude maps to −8), while kiln uses `d = max|w| / 7` so that the
//!   half-step bound holds for every element (with `−max/8`, a group holding both `+a` and `−a`
//!   clamps one of them by a whole step). Nibble 0 (−8) is never written, but a file holding it
//!   still dequantises correctly.
//!
//! Groups larger than 32 (64, 128) share one scale across 2 or 4 blocks: the same bytes, fewer
//! scales; llama.cpp has no such block type, so those need re-scaling for GGUF.
//!
//! Scales are f16 (`d` rounded once; the integers are chosen against the rounded scale, so the
//! bound above holds for what is stored). On the GPU they travel as pairs of f16 in `u32` words
//! read with `unpack2x16float`, which every adapter has (no SHADER_F16 needed).
//!
//! The input width of every quantised matrix must be a multiple of the group size (and so of
//! 32): a layer whose width is not is refused when quantising, with its name and width, rather
//! than padded. Every width of the models kiln builds is a multiple of 64 with the shipped
//! configs (a config with `n_embd = 96` takes `--group-size 32`).

pub mod checkpoint;
pub mod convert;
pub mod weights;

use crate::{Error, Result};
use half::f16;

/// Elements of one packed block: llama.cpp's `QK8_0` and `QK4_0`.
pub const BLOCK: usize = 32;

/// The integer width of a quantised matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantKind {
    /// Signed 8-bit integers in [−127, 127].
    Q8,
    /// Signed 4-bit integers in [−7, 7] (stored as nibbles q + 8), eight to a `u32`.
    Q4,
}

impl QuantKind {
    /// The name used on the command line and in files (`q8`, `q4`).
    pub fn name(self) -> &'static str {
        match self {
            QuantKind::Q8 => "q8",
            QuantKind::Q4 => "q4",
        }
    }

    /// The largest magnitude the quantiser writes.
    pub fn qmax(self) -> i32 {
        match self {
            QuantKind::Q8 => 127,
            QuantKind::Q4 => 7,
        }
    }

    /// Elements per packed `u32` word.
    pub fn per_word(self) -> usize {
        match self {
            QuantKind::Q8 => 4,
            QuantKind::Q4 => 8,
        }
    }

    /// Bits per element.
    pub fn bits(self) -> usize {
        32 / self.per_word()
    }
}

impl std::fmt::Display for QuantKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for QuantKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "q8" => Ok(QuantKind::Q8),
            "q4" => Ok(QuantKind::Q4),
            _ => Err(Error::invalid("--type", s, "expected q8 or q4")),
        }
    }
}

/// How a model is quantised: the integer width, the group size, and whether the token
/// embedding and the output head are quantised too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantSettings {
    /// Integer width.
    #[serde(rename = "type")]
    pub kind: QuantKind,
    /// Inputs per scale: a positive multiple of [`BLOCK`].
    pub group_size: usize,
    /// Whether the token table and the head (one tensor when tied) are quantised; the position
    /// table, norms and biases never are.
    pub embeddings: bool,
}

impl QuantSettings {
    /// Checked settings. `embeddings: None` takes the default: on for q8, off for q4 (a 4-bit
    /// token table costs more perplexity than the rest of a small model's 4-bit weights).
    pub fn new(kind: QuantKind, group_size: usize, embeddings: Option<bool>) -> Result<Self> {
        if group_size == 0 || !group_size.is_multiple_of(BLOCK) {
            return Err(Error::invalid(
                "--group-size",
                group_size,
                format!(
                    "must be a positive multiple of {BLOCK} (32, 64 or 128): groups are whole \
                     blocks of {BLOCK} elements"
                ),
            ));
        }
        Ok(QuantSettings {
            kind,
            group_size,
            embeddings: embeddings.unwrap_or(kind == QuantKind::Q8),
        })
    }

    /// Checks that a matrix `name` of `cols` inputs splits into whole groups.
    pub fn check_width(&self, name: &str, cols: usize) -> Result<()> {
        if cols == 0 || !cols.is_multiple_of(self.group_size) {
            let way_out = if cols > 0 && cols.is_multiple_of(BLOCK) {
                format!("use a group size that divides it ({BLOCK} does)")
            } else {
                format!(
                    "only widths that are multiples of {BLOCK} (llama.cpp's block) can be \
                     quantised, so this model cannot be"
                )
            };
            return Err(Error::invalid(
                "--group-size",
                self.group_size,
                format!("does not divide the {cols} inputs of {name}: {way_out}"),
            ));
        }
        Ok(())
    }
}

/// A quantised `rows × cols` matrix: packed integers and one f16 scale per group (see the
/// module docs for the layout).
#[derive(Clone, Debug, PartialEq)]
pub struct QuantMatrix {
    kind: QuantKind,
    group_size: usize,
    rows: usize,
    cols: usize,
    packed: Vec<u32>,
    scales: Vec<f16>,
}

impl QuantMatrix {
    /// A matrix from its parts, checked: `cols` a multiple of `group_size` (itself a positive
    /// multiple of [`BLOCK`]), `rows · cols / per_word` packed words, `rows · cols / group_size`
    /// finite scales. `what` names the tensor in the errors.
    pub fn new(
        what: &str,
        kind: QuantKind,
        group_size: usize,
        rows: usize,
        cols: usize,
        packed: Vec<u32>,
        scales: Vec<f16>,
    ) -> Result<Self> {
        QuantSettings::new(kind, group_size, None)?.check_width(what, cols)?;
        let words = rows * cols / kind.per_word();
        if packed.len() != words {
            return Err(Error::shape(
                "quantised matrix",
                format!(
                    "{what}: {} packed words for a {rows}×{cols} {kind} matrix, which needs \
                     {words} ({} bits per element)",
                    packed.len(),
                    kind.bits()
                ),
            ));
        }
        let groups = rows * cols / group_size;
        if scales.len() != groups {
            return Err(Error::shape(
                "quantised matrix",
                format!(
                    "{what}: {} scales for a {rows}×{cols} matrix in groups of {group_size}, \
                     which needs {groups}",
                    scales.len()
                ),
            ));
        }
        if let Some(i) = scales.iter().position(|s| !s.is_finite()) {
            return Err(Error::shape(
                "quantised matrix",
                format!("{what}: scale {i} is {}; scales must be finite", scales[i]),
            ));
        }
        Ok(QuantMatrix {
            kind,
            group_size,
            rows,
            cols,
            packed,
            scales,
        })
    }

    /// Integer width.
    pub fn kind(&self) -> QuantKind {
        self.kind
    }
    /// Inputs per scale.
    pub fn group_size(&self) -> usize {
        self.group_size
    }
    /// Rows (outputs of a linear layer).
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Columns (inputs).
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Packed words, row after row (`cols / per_word` each).
    pub fn packed(&self) -> &[u32] {
        &self.packed
    }
    /// Scales, row after row (`cols / group_size` each).
    pub fn scales(&self) -> &[f16] {
        &self.scales
    }
    /// Packed words per row.
    pub fn words_per_row(&self) -> usize {
        self.cols / self.kind.per_word()
    }
    /// Groups (scales) per row.
    pub fn groups_per_row(&self) -> usize {
        self.cols / self.group_size
    }

    /// The scale of row `r`, group `g`.
    pub fn scale(&self, r: usize, g: usize) -> f32 {
        self.scales[r * self.groups_per_row() + g].to_f32()
    }

    /// The integer `q` of element (r, c).
    pub fn q(&self, r: usize, c: usize) -> i32 {
        let row = &self.packed[r * self.words_per_row()..(r + 1) * self.words_per_row()];
        let (word, shift) = element_position(self.kind, c);
        let bits = (row[word] >> shift) & ((1 << self.kind.bits()) - 1);
        match self.kind {
            // Sign-extend the byte.
            QuantKind::Q8 => bits as u8 as i8 as i32,
            QuantKind::Q4 => bits as i32 - 8,
        }
    }

    /// Bytes of the packed integers.
    pub fn packed_bytes(&self) -> usize {
        4 * self.packed.len()
    }
    /// Bytes of the f16 scales.
    pub fn scale_bytes(&self) -> usize {
        2 * self.scales.len()
    }
}

/// Where element `c` of a row lives: (word of the row, bit shift in the word). See the module
/// docs for the two layouts.
pub(crate) fn element_position(kind: QuantKind, c: usize) -> (usize, usize) {
    match kind {
        QuantKind::Q8 => (c / 4, 8 * (c % 4)),
        QuantKind::Q4 => {
            let (block, e) = (c / BLOCK, c % BLOCK);
            // Byte j of the block holds elements j (low nibble) and j + 16 (high nibble).
            let (byte, high) = (e % 16, e / 16);
            (block * 4 + byte / 4, 8 * (byte % 4) + 4 * high)
        }
    }
}

/// Packs the integers of one row (each within the kind's range) into words.
pub(crate) fn pack_row(kind: QuantKind, q: &[i32]) -> Vec<u32> {
    let mut words = vec![0u32; q.len() / kind.per_word()];
    for (c, &v) in q.iter().enumerate() {
        let (w, shift) = element_position(kind, c);
        let bits = match kind {
            QuantKind::Q8 => v as i8 as u8 as u32,
            QuantKind::Q4 => (v + 8) as u32,
        };
        words[w] |= bits << shift;
    }
    words
}
