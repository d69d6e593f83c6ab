//! Shape descriptions shared by the GPU kernels and the CPU reference, so that both take exactly
//! the same arguments.

use crate::{Error, Result};

/// Which operands of a matmul are stored transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layout {
    /// C = A·B, A stored M×K, B stored K×N (a linear layer's input gradient dX = dY·W).
    NN,
    /// C = A·Bᵀ, B stored N×K (a linear layer's forward Y = X·Wᵀ).
    NT,
    /// C = Aᵀ·B, A stored K×M (a linear layer's weight gradient dW = dYᵀ·X).
    TN,
    /// C = Aᵀ·Bᵀ.
    TT,
}

impl Layout {
    /// All four layouts.
    pub const ALL: [Layout; 4] = [Layout::NN, Layout::NT, Layout::TN, Layout::TT];
    /// A is stored K×M.
    pub fn trans_a(self) -> bool {
        matches!(self, Layout::TN | Layout::TT)
    }
    /// B is stored N×K.
    pub fn trans_b(self) -> bool {
        matches!(self, Layout::NT | Layout::TT)
    }
    /// Lowercase name (`nn`, `nt`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Layout::NN => "nn",
            Layout::NT => "nt",
            Layout::TN => "tn",
            Layout::TT => "tt",
        }
    }
}

impl std::str::FromStr for Layout {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Layout::ALL
            .into_iter()
            .find(|l| l.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| Error::invalid("layout", s, "expected nn, nt, tn or tt"))
    }
}

/// Where one operand's matrices sit in its buffer: element offset, row stride and the two batch
/// strides (see [`MatmulSpec`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Operand {
    /// Element offset of the first matrix.
    pub offset: usize,
    /// Elements between consecutive stored rows.
    pub ld: usize,
    /// Elements between consecutive outer batch indices.
    pub outer: usize,
    /// Elements between consecutive inner batch indices.
    pub inner: usize,
}

/// A batched product `C[z] = alpha·op(A[z])·op(B[z]) (+ bias) (+ C[z])`, op(A) M×K, op(B) K×N.
///
/// Batch index z in `0..batch` splits as `z = outer·batch_inner + inner`; each operand's matrix z
/// starts at `offset + outer·outer_stride + inner·inner_stride`. With `batch_inner == 1` this is a
/// plain strided batch; attention uses both levels to address (batch, head) blocks in place.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MatmulSpec {
    /// Rows of C.
    pub m: usize,
    /// Columns of C.
    pub n: usize,
    /// Shared dimension.
    pub k: usize,
    /// Which operands are stored transposed.
    pub layout: Layout,
    /// Number of products.
    pub batch: usize,
    /// Inner batch count (see above); 1 for a plain batch.
    pub batch_inner: usize,
    /// A's placement.
    pub a: Operand,
    /// B's placement.
    pub b: Operand,
    /// C's placement.
    pub c: Operand,
    /// Element offset of the bias (length N) when one is given.
    pub bias_offset: usize,
    /// Scale applied to the product (not to the bias or the accumulated C).
    pub alpha: f32,
    /// Add into C instead of overwriting it.
    pub accumulate: bool,
}

impl MatmulSpec {
    /// A single densely packed product.
    pub fn new(layout: Layout, m: usize, n: usize, k: usize) -> Self {
        let lda = if layout.trans_a() { m } else { k };
        let ldb = if layout.trans_b() { k } else { n };
        MatmulSpec {
            m,
            n,
            k,
            layout,
            batch: 1,
            batch_inner: 1,
            a: Operand {
                offset: 0,
                ld: lda,
                outer: m * k,
                inner: 0,
            },
            b: Operand {
                offset: 0,
                ld: ldb,
                outer: k * n,
                inner: 0,
            },
            c: Operand {
                offset: 0,
                ld: n,
                outer: m * n,
                inner: 0,
            },
            bias_offset: 0,
            alpha: 1.0,
            accumulate: false,
        }
    }

    /// `batch` densely packed products, one after another in each buffer.
    pub fn batched(mut self, batch: usize) -> Self {
        self.batch = batch;
        self.batch_inner = 1;
        self
    }

    /// Adds into C rather than overwriting it.
    pub fn accumulate(mut self, yes: bool) -> Self {
        self.accumulate = yes;
        self
    }

    /// Scales the product.
    pub fn alpha(mut self, alpha: f32) -> Self {
        self.alpha = alpha;
        self
    }

    /// Multiply-adds performed (2·M·N·K per product).
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64 * self.batch as f64
    }

    fn max_base(&self, op: &Operand) -> usize {
        let last = self.batch - 1;
        let outer = last / self.batch_inner;
        let inner = (self.batch_inner - 1).min(last);
        op.offset + outer * op.outer + inner * op.inner
    }

    /// Elements A's buffer must hold.
    pub fn a_len(&self) -> usize {
        let (rows, cols) = if self.layout.trans_a() {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        };
        self.max_base(&self.a) + (rows - 1) * self.a.ld + cols
    }

    /// Elements B's buffer must hold.
    pub fn b_len(&self) -> usize {
        let (rows, cols) = if self.layout.trans_b() {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        };
        self.max_base(&self.b) + (rows - 1) * self.b.ld + cols
    }

    /// Elements C's buffer must hold.
    pub fn c_len(&self) -> usize {
        self.max_base(&self.c) + (self.m - 1) * self.c.ld + self.n
    }

    /// Checks that the sizes are non-zero, the strides consistent and the buffers large enough.
    pub fn validate(
        &self,
        a_len: usize,
        b_len: usize,
        bias_len: Option<usize>,
        c_len: usize,
    ) -> Result<()> {
        let op = "matmul";
        if self.m == 0 || self.n == 0 || self.k == 0 || self.batch == 0 || self.batch_inner == 0 {
            return Err(Error::shape(
                op,
                format!(
                    "M, N, K, batch and batch_inner must be positive; got M={} N={} K={} batch={} batch_inner={}",
                    self.m, self.n, self.k, self.batch, self.batch_inner
                ),
            ));
        }
        let (a_cols, b_cols) = (
            if self.layout.trans_a() {
                self.m
            } else {
                self.k
            },
            if self.layout.trans_b() {
                self.k
            } else {
                self.n
            },
        );
        if self.a.ld < a_cols || self.b.ld < b_cols || self.c.ld < self.n {
            return Err(Error::shape(
                op,
                format!(
                    "row strides too small for {:?} M={} N={} K={}: lda={} (needs ≥{a_cols}), ldb={} (needs ≥{b_cols}), ldc={} (needs ≥{})",
                    self.layout, self.m, self.n, self.k, self.a.ld, self.b.ld, self.c.ld, self.n
                ),
            ));
        }
        for (name, need, have) in [
            ("A", self.a_len(), a_len),
            ("B", self.b_len(), b_len),
            ("C", self.c_len(), c_len),
        ] {
            if need > have {
                return Err(Error::shape(
                    op,
                    format!(
                        "{name} holds {have} elements but {:?} M={} N={} K={} batch={} reads up to {need}",
                        self.layout, self.m, self.n, self.k, self.batch
                    ),
                ));
            }
            if need > u32::MAX as usize {
                return Err(Error::shape(
                    op,
                    format!("{name} needs {need} elements, over the 2^32 that kernels index"),
                ));
            }
        }
        if let Some(have) = bias_len
            && self.bias_offset + self.n > have
        {
            return Err(Error::shape(
                op,
                format!(
                    "bias holds {have} elements but offset {} + N={} are needed",
                    self.bias_offset, self.n
                ),
            ));
        }
        Ok(())
    }
}

/// Causal self-attention over (batch, seq, channels) with `heads` heads (see
/// [`crate::cpu::attention`] for the layout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// B.
    pub batch: usize,
    /// T, the sequence length (at most the context window).
    pub seq: usize,
    /// C, the model width.
    pub channels: usize,
    /// Number of heads; must divide C.
    pub heads: usize,
}

impl AttentionShape {
    /// Elements of the (B, n_head, T, T) probability buffer.
    pub fn probs_len(&self) -> usize {
        self.batch * self.heads * self.seq * self.seq
    }

    /// Checks sizes: positive, heads divide channels, buffers of the right length.
    pub fn validate(&self, qkv_len: usize, out_len: usize, probs_len: usize) -> Result<()> {
        let op = "attention";
        let AttentionShape {
            batch,
            seq,
            channels,
            heads,
        } = *self;
        if batch == 0 || seq == 0 || channels == 0 || heads == 0 {
            return Err(Error::shape(
                op,
                format!("B, T, C and n_head must be positive; got {self:?}"),
            ));
        }
        if !channels.is_multiple_of(heads) {
            return Err(Error::shape(
                op,
                format!("C = {channels} is not divisible by n_head = {heads}"),
            ));
        }
        let want = [
            ("qkv", batch * seq * 3 * channels, qkv_len),
            ("out", batch * seq * channels, out_len),
            ("probs", self.probs_len(), probs_len),
        ];
        for (name, need, have) in want {
            if need != have {
                return Err(Error::shape(
                    op,
                    format!("{name} has {have} elements, expected {need} for {self:?}"),
                ));
            }
        }
        Ok(())
    }
}

/// Token and position embedding of a (batch, seq) block of token ids into `channels` wide rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmbeddingShape {
    /// B.
    pub batch: usize,
    /// T (at most the number of position-table rows).
    pub seq: usize,
    /// C.
    pub channels: usize,
    /// Rows of the token table.
    pub vocab: usize,
    /// Rows of the position table (the context window).
    pub positions: usize,
}

impl EmbeddingShape {
    /// Checks sizes and that every token id is inside the vocabulary.
    pub fn validate(
        &self,
        tokens: &[u32],
        wte_len: usize,
        wpe_len: usize,
        out_len: usize,
    ) -> Result<()> {
        let op = "embedding";
        let EmbeddingShape {
            batch,
            seq,
            channels,
            vocab,
            positions,
        } = *self;
        if batch == 0 || seq == 0 || channels == 0 || vocab == 0 {
            return Err(Error::shape(
                op,
                format!("sizes must be positive; got {self:?}"),
            ));
        }
        if seq > positions {
            return Err(Error::shape(
                op,
                format!("T = {seq} exceeds the {positions} positions of the table"),
            ));
        }
        let want = [
            ("tokens", batch * seq, tokens.len()),
            ("wte", vocab * channels, wte_len),
            ("wpe", positions * channels, wpe_len),
            ("out", batch * seq * channels, out_len),
        ];
        for (name, need, have) in want {
            if need != have {
                return Err(Error::shape(
                    op,
                    format!("{name} has {have} elements, expected {need} for {self:?}"),
                ));
            }
        }
        if let Some((i, t)) = tokens
            .iter()
            .enumerate()
            .find(|(_, t)| **t as usize >= vocab)
        {
            return Err(Error::shape(
                op,
                format!("token {t} at position {i} is outside the vocabulary of {vocab}"),
            ));
        }
        Ok(())
    }
}

/// Layer normalisation over the last dimension of a (rows, channels) tensor:
/// `out = (x - mean) / sqrt(var + eps) · weight + bias`, with the biased variance as GPT-2 uses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerNormSpec {
    /// Rows normalised independently (batch × sequence positions).
    pub rows: usize,
    /// Channels per row: the normalised dimension, and the length of weight and bias.
    pub channels: usize,
    /// Added to the variance before the square root.
    pub eps: f32,
    /// Backward only: add into dinp instead of overwriting it (the residual stream's gradient
    /// already sits there in a transformer block).
    pub accumulate_input: bool,
    /// Backward only: add into dweight and dbias instead of overwriting them (gradient
    /// accumulation over micro-batches).
    pub accumulate_params: bool,
}

impl LayerNormSpec {
    /// `rows` rows of `channels` with GPT-2's eps of 1e-5, overwriting every gradient.
    pub fn new(rows: usize, channels: usize) -> Self {
        LayerNormSpec {
            rows,
            channels,
            eps: 1e-5,
            accumulate_input: false,
            accumulate_params: false,
        }
    }

    /// Sets whether the backward adds into dinp.
    pub fn accumulate_input(mut self, yes: bool) -> Self {
        self.accumulate_input = yes;
        self
    }

    /// Sets whether the backward adds into dweight and dbias.
    pub fn accumulate_params(mut self, yes: bool) -> Self {
        self.accumulate_params = yes;
        self
    }

    /// Checks that the sizes are positive, indexable in u32, and that each named buffer holds
    /// exactly what it should: `(name, kind, length)` with kind `Elements` (rows × channels),
    /// `Channels` or `Rows`.
    pub fn validate(&self, op: &'static str, buffers: &[(&str, Extent, usize)]) -> Result<()> {
        if self.rows == 0 || self.channels == 0 {
            return Err(Error::shape(
                op,
                format!(
                    "rows and channels must be positive; got rows={} channels={}",
                    self.rows, self.channels
                ),
            ));
        }
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return Err(Error::shape(
                op,
                format!("eps must be positive and finite; got {}", self.eps),
            ));
        }
        let elements = self.rows.checked_mul(self.channels);
        match elements {
            Some(n) if n <= u32::MAX as usize => {}
            _ => {
                return Err(Error::shape(
                    op,
                    format!(
                        "rows={} × channels={} is over the 2^32 elements that kernels index",
                        self.rows, self.channels
                    ),
                ));
            }
        }
        for &(name, extent, have) in buffers {
            let need = match extent {
                Extent::Elements => self.rows * self.channels,
                Extent::Channels => self.channels,
                Extent::Rows => self.rows,
            };
            if have != need {
                return Err(Error::shape(
                    op,
                    format!(
                        "{name} has {have} elements but rows={} channels={} needs {need}",
                        self.rows, self.channels
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// What a buffer of a row-wise op is indexed by, for [`LayerNormSpec::validate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extent {
    /// One value per element: rows × channels.
    Elements,
    /// One value per channel.
    Channels,
    /// One value per row.
    Rows,
}

/// Checks the operands of an element-wise op: all `(name, length)` pairs equal, non-zero and
/// indexable in u32. Returns the common length.
pub fn elementwise_len(op: &'static str, buffers: &[(&str, usize)]) -> Result<usize> {
    let (first, n) = buffers[0];
    if n == 0 {
        return Err(Error::shape(op, format!("{first} is empty")));
    }
    if n > u32::MAX as usize {
        return Err(Error::shape(
            op,
            format!("{first} has {n} elements, over the 2^32 that kernels index"),
        ));
    }
    for &(name, len) in &buffers[1..] {
        if len != n {
            return Err(Error::shape(
                op,
                format!("{name} has {len} elements but {first} has {n}; they must match"),
            ));
        }
    }
    Ok(n)
}

/// RMS normalisation over the last dimension of a (rows, channels) tensor, as in Llama:
/// `out = x · rstd · weight` with `rstd = 1 / sqrt(mean(x²) + eps)`; no mean is subtracted and
/// there is no bias.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RmsNormSpec {
    /// Rows normalised independently (batch × sequence positions).
    pub rows: usize,
    /// Channels per row: the normalised dimension, and the length of weight.
    pub channels: usize,
    /// Added to the mean square before the square root (Llama uses 1e-5 or 1e-6).
    pub eps: f32,
    /// Backward only: add into dinp instead of overwriting it (the residual stream's gradient
    /// already sits there in a transformer block).
    pub accumulate_input: bool,
    /// Backward only: add into dweight instead of overwriting it (gradient accumulation over
    /// micro-batches).
    pub accumulate_params: bool,
}

impl RmsNormSpec {
    /// `rows` rows of `channels` with eps = 1e-5, overwriting every gradient.
    pub fn new(rows: usize, channels: usize) -> Self {
        RmsNormSpec {
            rows,
            channels,
            eps: 1e-5,
            accumulate_input: false,
            accumulate_params: false,
        }
    }

    /// Sets eps.
    pub fn eps(mut self, eps: f32) -> Self {
        self.eps = eps;
        self
    }

    /// Sets whether the backward adds into dinp.
    pub fn accumulate_input(mut self, yes: bool) -> Self {
        self.accumulate_input = yes;
        self
    }

    /// Sets whether the backward adds into dweight.
    pub fn accumulate_params(mut self, yes: bool) -> Self {
        self.accumulate_params = yes;
        self
    }

    /// The same checks as [`LayerNormSpec::validate`]: positive sizes indexable in u32, a
    /// positive finite eps, and each named buffer of exactly its [`Extent`].
    pub fn validate(&self, op: &'static str, buffers: &[(&str, Extent, usize)]) -> Result<()> {
        LayerNormSpec {
            rows: self.rows,
            channels: self.channels,
            eps: self.eps,
            accumulate_input: self.accumulate_input,
            accumulate_params: self.accumulate_params,
        }
        .validate(op, buffers)
    }
}
