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
///
/// A and B may share one matrix between consecutive inner indices: with `a_inner_div = g`, A's
/// matrix for inner index i is the one at inner index `i / g` (grouped-query attention: query
/// head h reads key/value head h / group). Both are 1 by default; C has no divisor, since two
/// batches writing one matrix would race.
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
    /// Consecutive inner batch indices sharing one A matrix (see above); 1 for none.
    pub a_inner_div: usize,
    /// Consecutive inner batch indices sharing one B matrix; 1 for none.
    pub b_inner_div: usize,
    /// Causal structure a kernel may exploit to skip work ([`Triangle::None`] by default).
    pub triangle: Triangle,
}

/// A causal structure of a product that kernels may use to skip work: that of attention's
/// products over a (T, T) block, whose row i is query position i. Row and column indices are
/// within each batch entry's matrix. A kernel that ignores it computes the same result (the
/// skipped terms are exact zeros, or the skipped outputs are never read), so it is a hint, not
/// part of the product's meaning. Every matmul variant honours it at its own block size: the
/// texture and row kernels per 32 rows, the tiled ones per 64 × 64 tile.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Triangle {
    /// Nothing known: every term and every output counts.
    #[default]
    None,
    /// Only C[i][j] with j ≤ i is wanted; entries above the diagonal may be left holding
    /// whatever they held. Attention's scores and dP, which the causal softmax kernels read only
    /// up to the diagonal and then overwrite.
    OutputLower,
    /// op(A)[i][k] is zero for k > i, so row i needs only k ≤ i: P·v and dS·k.
    ALower,
    /// op(A)[i][k] is zero for k < i, so row i needs only k ≥ i: Pᵀ·dO and dSᵀ·q.
    AUpper,
}

impl Triangle {
    /// The value the matmul shaders read (`Dims.triangle`).
    pub fn code(self) -> u32 {
        match self {
            Triangle::None => 0,
            Triangle::OutputLower => 1,
            Triangle::ALower => 2,
            Triangle::AUpper => 3,
        }
    }
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
            a_inner_div: 1,
            b_inner_div: 1,
            triangle: Triangle::None,
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

    fn max_base(&self, op: &Operand, inner_div: usize) -> usize {
        let last = self.batch - 1;
        let outer = last / self.batch_inner;
        let inner = (self.batch_inner - 1).min(last) / inner_div.max(1);
        op.offset + outer * op.outer + inner * op.inner
    }

    /// Elements A's buffer must hold.
    pub fn a_len(&self) -> usize {
        let (rows, cols) = if self.layout.trans_a() {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        };
        self.max_base(&self.a, self.a_inner_div) + (rows - 1) * self.a.ld + cols
    }

    /// Elements B's buffer must hold.
    pub fn b_len(&self) -> usize {
        let (rows, cols) = if self.layout.trans_b() {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        };
        self.max_base(&self.b, self.b_inner_div) + (rows - 1) * self.b.ld + cols
    }

    /// Elements C's buffer must hold.
    pub fn c_len(&self) -> usize {
        self.max_base(&self.c, 1) + (self.m - 1) * self.c.ld + self.n
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
        if self.a_inner_div == 0 || self.b_inner_div == 0 {
            return Err(Error::shape(
                op,
                format!(
                    "a_inner_div and b_inner_div must be positive (1 for no sharing); got {} and {}",
                    self.a_inner_div, self.b_inner_div
                ),
            ));
        }
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
        buffer_lengths(op, self, &want)?;
        Ok(())
    }
}

/// Causal self-attention with grouped-query heads (GQA), as in Llama: `heads` query heads share
/// `kv_heads` key/value heads, query head h reading key/value head h / (heads / kv_heads).
/// `kv_heads = heads` is ordinary multi-head attention, `kv_heads = 1` multi-query attention.
///
/// Layout: `qkv` is (B, T, (heads + 2·kv_heads)·head_dim), each row the query heads, then the key
/// heads, then the value heads, each head `head_dim` wide (with kv_heads = heads this is GPT-2's
/// (B, T, 3C) layout); `out` is (B, T, heads·head_dim); `probs` is (B, heads, T, T).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupedAttentionShape {
    /// B.
    pub batch: usize,
    /// T, the sequence length.
    pub seq: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; must divide `heads`.
    pub kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
}

impl GroupedAttentionShape {
    /// Query heads per key/value head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads.max(1)
    }

    /// Elements of one (b, t) row of the qkv buffer: (heads + 2·kv_heads)·head_dim.
    pub fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }

    /// Elements of the (B, T, heads·head_dim) output.
    pub fn out_len(&self) -> usize {
        self.batch * self.seq * self.heads * self.head_dim
    }

    /// Elements of the qkv buffer.
    pub fn qkv_len(&self) -> usize {
        self.batch * self.seq * self.qkv_width()
    }

    /// Elements of the (B, heads, T, T) probability buffer.
    pub fn probs_len(&self) -> usize {
        self.batch * self.heads * self.seq * self.seq
    }

    /// Elements of a per-row statistic over (B, heads, T): the fused attention's log-sum-exp.
    pub fn lse_len(&self) -> usize {
        self.batch * self.heads * self.seq
    }

    /// Checks sizes: positive, kv_heads dividing heads, buffers of the right length, indexable in
    /// u32.
    pub fn validate(&self, qkv_len: usize, out_len: usize, probs_len: usize) -> Result<()> {
        self.validate_parts(&[
            ("qkv", self.qkv_len(), qkv_len),
            ("out", self.out_len(), out_len),
            ("probs", self.probs_len(), probs_len),
        ])
    }

    /// [`GroupedAttentionShape::validate`] for the fused attention, which keeps no probabilities
    /// but a (B, heads, T) f32 log-sum-exp of `lse_len` elements.
    pub fn validate_fused(&self, qkv_len: usize, out_len: usize, lse_len: usize) -> Result<()> {
        self.validate_parts(&[
            ("qkv", self.qkv_len(), qkv_len),
            ("out", self.out_len(), out_len),
            ("lse", self.lse_len(), lse_len),
        ])
    }

    /// The checks of both validations; `want` is (name, elements needed, elements given).
    fn validate_parts(&self, want: &[(&str, usize, usize)]) -> Result<()> {
        let op = "attention";
        let GroupedAttentionShape {
            batch,
            seq,
            heads,
            kv_heads,
            head_dim,
        } = *self;
        if batch == 0 || seq == 0 || heads == 0 || kv_heads == 0 || head_dim == 0 {
            return Err(Error::shape(
                op,
                format!("B, T, n_head, n_kv_head and head_dim must be positive; got {self:?}"),
            ));
        }
        kv_groups(op, heads, kv_heads)?;
        if want.iter().any(|&(_, n, _)| n > u32::MAX as usize) {
            return Err(Error::shape(
                op,
                format!("{self:?} needs buffers past the 2^32 elements that kernels index"),
            ));
        }
        buffer_lengths(op, self, want)?;
        Ok(())
    }
}

impl From<AttentionShape> for GroupedAttentionShape {
    /// Multi-head attention as the grouped case with one query head per key/value head.
    fn from(s: AttentionShape) -> Self {
        GroupedAttentionShape {
            batch: s.batch,
            seq: s.seq,
            heads: s.heads,
            kv_heads: s.heads,
            head_dim: s.channels / s.heads.max(1),
        }
    }
}

/// One decode step's attention: the newest token's query heads over a key/value cache of
/// `positions` rows.
///
/// The cache is one sequence's q|k|v buffer in [`GroupedAttentionShape`]'s layout, (positions,
/// (heads + 2·kv_heads)·head_dim): the prefill forward's activation, used in place. The new
/// token's row `qkv_new` has the same width; the output is heads·head_dim. Query head h reads
/// key/value head h / (heads / kv_heads).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttendOneShape {
    /// Rows of the cache (the prefill model's block size).
    pub positions: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; must divide `heads`.
    pub kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
}

impl AttendOneShape {
    /// Multi-head attention: as many key/value heads as query heads, `channels / heads` wide.
    pub fn multi_head(positions: usize, heads: usize, channels: usize) -> Self {
        AttendOneShape {
            positions,
            heads,
            kv_heads: heads,
            head_dim: channels / heads.max(1),
        }
    }

    /// Query heads per key/value head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads.max(1)
    }

    /// Elements of a q|k|v row: (heads + 2·kv_heads)·head_dim.
    pub fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }

    /// Elements of the cache.
    pub fn cache_len(&self) -> usize {
        self.positions * self.qkv_width()
    }

    /// Elements of the output: heads·head_dim.
    pub fn out_len(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Checks sizes (positive, kv_heads dividing heads, indexable in u32) and the lengths of the
    /// cache, the new row and the output.
    pub fn validate(
        &self,
        op: &'static str,
        cache_len: usize,
        qkv_new_len: usize,
        out_len: usize,
    ) -> Result<()> {
        let AttendOneShape {
            positions,
            heads,
            kv_heads,
            head_dim,
        } = *self;
        if positions == 0 || heads == 0 || kv_heads == 0 || head_dim == 0 {
            return Err(Error::shape(
                op,
                format!("positions, n_head, n_kv_head and head_dim must be positive; got {self:?}"),
            ));
        }
        kv_groups(op, heads, kv_heads)?;
        let need = positions
            .checked_mul(heads + 2 * kv_heads)
            .and_then(|n| n.checked_mul(head_dim));
        if need.is_none_or(|n| n > u32::MAX as usize) {
            return Err(Error::shape(
                op,
                format!("{self:?} needs a cache past the 2^32 elements that kernels index"),
            ));
        }
        let want = [
            ("cache", self.cache_len(), cache_len),
            ("qkv_new", self.qkv_width(), qkv_new_len),
            ("out", self.out_len(), out_len),
        ];
        buffer_lengths(op, self, &want)?;
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
        buffer_lengths(op, self, &want)?;
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

/// Rotary position embedding (RoPE) in the rotate-half convention of Hugging Face's
/// `LlamaForCausalLM`, applied in place to `heads` consecutive heads of `head_dim` elements in
/// every (batch, position) row of a buffer.
///
/// For head dim d, element i < d/2 of a head is paired with element i + d/2, and the pair at
/// position `pos` is rotated by the angle `pos · inv_freq_i`, `inv_freq_i = 1 / theta^(2i/d)`:
///
/// ```text
/// out[i]       = x[i]·cos - x[i + d/2]·sin
/// out[i + d/2] = x[i + d/2]·cos + x[i]·sin
/// ```
///
/// Row r = b·seq + t (b < batch, t < seq) sits at element `r·row_stride`, its first rotated head
/// at `r·row_stride + offset`, and is at position `first_position + t`. So
/// [`RopeSpec::qkv`] covers the q and k heads of a fused (B, T, (n_head + 2·n_kv_head)·head_dim)
/// projection in one dispatch (q's heads and k's heads are adjacent in each row, v is left
/// alone), and a one-token decode step is `seq = 1` with `first_position = p`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeSpec {
    /// B.
    pub batch: usize,
    /// T, the positions per batch entry.
    pub seq: usize,
    /// Heads rotated in each row (consecutive, `head_dim` apart).
    pub heads: usize,
    /// d, the elements per head; must be even.
    pub head_dim: usize,
    /// Element offset of the first rotated head within each row.
    pub offset: usize,
    /// Elements between consecutive rows.
    pub row_stride: usize,
    /// Position of t = 0 (the KV-cache decoder's current position).
    pub first_position: usize,
    /// Base of the frequencies (10000 in Llama 2; Llama 3's 500000 without its frequency
    /// scaling).
    pub theta: f32,
}

impl RopeSpec {
    /// Positions RoPE can address: f32 represents every integer up to 2^24 exactly.
    pub const MAX_POSITION: usize = 1 << 24;

    /// A dense (batch, seq, heads, head_dim) tensor, every head rotated, positions from 0,
    /// theta = 10000.
    pub fn dense(batch: usize, seq: usize, heads: usize, head_dim: usize) -> Self {
        RopeSpec {
            batch,
            seq,
            heads,
            head_dim,
            offset: 0,
            row_stride: heads * head_dim,
            first_position: 0,
            theta: 10_000.0,
        }
    }

    /// The q and k heads (n_head + n_kv_head of them, adjacent at the start of each row) of a
    /// fused (batch, seq, (n_head + 2·n_kv_head)·head_dim) qkv projection; v is not touched.
    pub fn qkv(batch: usize, seq: usize, n_head: usize, n_kv_head: usize, head_dim: usize) -> Self {
        RopeSpec {
            heads: n_head + n_kv_head,
            row_stride: (n_head + 2 * n_kv_head) * head_dim,
            ..RopeSpec::dense(batch, seq, n_head, head_dim)
        }
    }

    /// Sets the position of t = 0.
    pub fn positions_from(mut self, first_position: usize) -> Self {
        self.first_position = first_position;
        self
    }

    /// Sets the frequency base.
    pub fn theta(mut self, theta: f32) -> Self {
        self.theta = theta;
        self
    }

    /// `inv_freq_i = 1 / theta^(2i/d)` for i < d/2, computed in f32 as Hugging Face's
    /// `LlamaRotaryEmbedding` does (`1.0 / base ** (arange(0, d, 2).float() / d)`).
    pub fn inv_freq(&self) -> Vec<f32> {
        (0..self.head_dim / 2)
            .map(|i| 1.0 / self.theta.powf((2 * i) as f32 / self.head_dim as f32))
            .collect()
    }

    /// Elements the buffer must hold at least.
    pub fn min_len(&self) -> usize {
        (self.batch * self.seq - 1) * self.row_stride + self.offset + self.heads * self.head_dim
    }

    /// Checks that the sizes are positive, the head dim even, the heads inside each row, the
    /// positions exact in f32, theta positive and finite, and that a buffer of `len` elements
    /// holds every row (and is indexable in u32).
    pub fn validate(&self, op: &'static str, len: usize) -> Result<()> {
        let RopeSpec {
            batch,
            seq,
            heads,
            head_dim,
            offset,
            row_stride,
            first_position,
            theta,
        } = *self;
        if batch == 0 || seq == 0 || heads == 0 || head_dim == 0 {
            return Err(Error::shape(
                op,
                format!("batch, seq, heads and head_dim must be positive; got {self:?}"),
            ));
        }
        if !head_dim.is_multiple_of(2) {
            return Err(Error::shape(
                op,
                format!(
                    "head_dim = {head_dim} is odd; rotary embedding pairs element i with i + \
                     head_dim/2 and needs an even head dimension"
                ),
            ));
        }
        if !(theta > 0.0 && theta.is_finite()) {
            return Err(Error::shape(
                op,
                format!("theta must be positive and finite; got {theta}"),
            ));
        }
        let row_end = heads
            .checked_mul(head_dim)
            .and_then(|n| n.checked_add(offset));
        if row_end.is_none_or(|end| end > row_stride) {
            return Err(Error::shape(
                op,
                format!(
                    "offset {offset} + {heads} heads × {head_dim} runs past the row stride \
                     {row_stride}"
                ),
            ));
        }
        if first_position.saturating_add(seq) > Self::MAX_POSITION {
            return Err(Error::shape(
                op,
                format!(
                    "positions {first_position}..{} exceed 2^24, past which f32 positions are \
                     not exact",
                    first_position.saturating_add(seq)
                ),
            ));
        }
        let need = batch
            .checked_mul(seq)
            .and_then(|rows| (rows - 1).checked_mul(row_stride))
            .and_then(|n| n.checked_add(offset + heads * head_dim));
        match need {
            Some(n) if n <= u32::MAX as usize => {
                if len < n {
                    return Err(Error::shape(
                        op,
                        format!("the buffer has {len} elements but {self:?} reaches element {n}"),
                    ));
                }
            }
            _ => {
                return Err(Error::shape(
                    op,
                    format!("{self:?} reaches past the 2^32 elements that kernels index"),
                ));
            }
        }
        Ok(())
    }
}

/// SwiGLU over a (rows, 2·hidden) buffer holding, in each row, the gate half then the up half
/// (the output of one matmul by the concatenated [W_gate; W_up] weight, gate first):
/// `out[r, j] = silu(inp[r, j]) · inp[r, hidden + j]`, out of shape (rows, hidden).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SwiGluSpec {
    /// Rows (batch × sequence positions).
    pub rows: usize,
    /// Width of each half, and of the output.
    pub hidden: usize,
}

impl SwiGluSpec {
    /// `rows` rows of `hidden` outputs (2·hidden inputs).
    pub fn new(rows: usize, hidden: usize) -> Self {
        SwiGluSpec { rows, hidden }
    }

    /// Checks that the sizes are positive and indexable in u32 and that each named buffer has
    /// exactly its length: `(name, true, len)` for a (rows, 2·hidden) buffer (the input and its
    /// gradient), `(name, false, len)` for a (rows, hidden) one (the output and its gradient).
    pub fn validate(&self, op: &'static str, buffers: &[(&str, bool, usize)]) -> Result<()> {
        let SwiGluSpec { rows, hidden } = *self;
        if rows == 0 || hidden == 0 {
            return Err(Error::shape(
                op,
                format!("rows and hidden must be positive; got rows={rows} hidden={hidden}"),
            ));
        }
        let out = rows.checked_mul(hidden);
        let inp = out.and_then(|n| n.checked_mul(2));
        let (Some(out), Some(inp)) = (out, inp) else {
            return Err(Error::shape(
                op,
                format!("rows={rows} × hidden={hidden} overflows"),
            ));
        };
        if inp > u32::MAX as usize {
            return Err(Error::shape(
                op,
                format!(
                    "rows={rows} × 2·hidden={} is over the 2^32 elements that kernels index",
                    2 * hidden
                ),
            ));
        }
        for &(name, both_halves, have) in buffers {
            let need = if both_halves { inp } else { out };
            if have != need {
                return Err(Error::shape(
                    op,
                    format!(
                        "{name} has {have} elements but rows={rows} hidden={hidden} needs {need}{}",
                        if both_halves {
                            " (rows × 2·hidden: gate then up)"
                        } else {
                            " (rows × hidden)"
                        }
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Checks each buffer's length, given as (name, elements needed, elements passed), against the
/// shape `what`, naming the first that differs.
fn buffer_lengths(
    op: &'static str,
    what: &impl std::fmt::Debug,
    want: &[(&str, usize, usize)],
) -> Result<()> {
    match want.iter().find(|(_, need, have)| need != have) {
        Some((name, need, have)) => Err(Error::shape(
            op,
            format!("{name} has {have} elements, expected {need} for {what:?}"),
        )),
        None => Ok(()),
    }
}

/// Grouped-query attention needs whole groups: n_kv_head must divide n_head.
fn kv_groups(op: &'static str, heads: usize, kv_heads: usize) -> Result<()> {
    if heads.is_multiple_of(kv_heads) {
        Ok(())
    } else {
        Err(Error::shape(
            op,
            format!("n_kv_head = {kv_heads} does not divide n_head = {heads}"),
        ))
    }
}

/// The routing of a mixture-of-experts layer over one micro-batch (see [`crate::cpu::moe`] for
/// the buffers and their layout).
///
/// `tokens` rows of `channels` each choose `top_k` of `experts` experts; each expert has
/// `capacity` rows in the grouped buffers, which are (experts, capacity, width): expert e's
/// tokens at rows e·capacity + 0, 1, ... in the order of their assignments (token, then slot).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoeSpec {
    /// N, the tokens (rows) of the micro-batch.
    pub tokens: usize,
    /// E.
    pub experts: usize,
    /// K, experts per token.
    pub top_k: usize,
    /// Rows per expert in the grouped buffers (1..=tokens).
    pub capacity: usize,
    /// C, the width of the rows gathered and combined.
    pub channels: usize,
}

/// The u32 that marks a dropped assignment in `dest` (and an empty grouped row in `src`).
pub const MOE_NONE: u32 = u32::MAX;

impl MoeSpec {
    /// N·K assignments (token, slot).
    pub fn assignments(&self) -> usize {
        self.tokens * self.top_k
    }

    /// E·capacity rows of the grouped buffers.
    pub fn grouped_rows(&self) -> usize {
        self.experts * self.capacity
    }

    /// Checks the sizes (positive, top_k ≤ experts, capacity ≤ tokens, indexable in u32).
    pub fn validate(&self, op: &'static str) -> Result<()> {
        let MoeSpec {
            tokens,
            experts,
            top_k,
            capacity,
            channels,
        } = *self;
        if tokens == 0 || experts == 0 || top_k == 0 || capacity == 0 || channels == 0 {
            return Err(Error::shape(
                op,
                format!("every size must be positive; got {self:?}"),
            ));
        }
        if top_k > experts || capacity > tokens {
            return Err(Error::shape(
                op,
                format!("top_k must not exceed experts nor capacity tokens; got {self:?}"),
            ));
        }
        let big = [
            tokens.checked_mul(experts.max(top_k)),
            experts.checked_mul(capacity),
            experts
                .checked_mul(capacity)
                .and_then(|r| r.checked_mul(channels)),
            tokens.checked_mul(channels),
        ];
        if big.iter().any(|n| n.is_none_or(|n| n >= u32::MAX as usize)) {
            return Err(Error::shape(
                op,
                format!("{self:?} needs buffers past the 2^32 elements that kernels index"),
            ));
        }
        Ok(())
    }

    /// [`MoeSpec::validate`] and each named buffer's exact length.
    pub fn check(&self, op: &'static str, want: &[(&str, usize, usize)]) -> Result<()> {
        self.validate(op)?;
        buffer_lengths(op, self, want)
    }
}

/// Weights of the two auxiliary losses of a mixture-of-experts layer in the training loss.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MoeLossCoefs {
    /// Switch Transformer load balancing, `E · Σ_e f_e · P_e`.
    pub aux: f32,
    /// Router z-loss, `mean_n logsumexp(logits_n)²`.
    pub z: f32,
}

impl MoeLossCoefs {
    /// The per-element gradient factors of the two losses before the loss scale:
    /// `aux · E / (N²·K)` per assignment counted for an expert (d(E·Σ f_e·P_e)/dp[n, e] =
    /// E·f_e/N with f_e = count_e/(N·K)) and `z · 2 / N` per unit of lse (d mean(lse²)/d lse_n).
    /// Computed in f64 and rounded once, so the GPU and the CPU reference use the same f32s.
    pub fn gradient_factors(&self, spec: &MoeSpec) -> (f32, f32) {
        let (n, e, k) = (spec.tokens as f64, spec.experts as f64, spec.top_k as f64);
        (
            (f64::from(self.aux) * e / (n * n * k)) as f32,
            (f64::from(self.z) * 2.0 / n) as f32,
        )
    }
}
