//! Causal multi-head self-attention: scores, mask, softmax and the weighted sum of values, and the
//! full backward, as batched matmuls around the causal-softmax kernels of shaders/attention.wgsl.
//!
//! Memory: the probabilities (B, n_head, T, T) are kept for the backward pass, and the backward
//! needs one more buffer of that size for dP/dS. That is 2·B·n_head·T² elements of the storage
//! precision (100 MB in f32 for B = 64, 6 heads, T = 256). Each product carries its causal
//! structure as a [`Triangle`] hint: the texture matmul (the one CPU-backed adapters run) skips
//! the 32×32 blocks of the scores and dP above the diagonal and the zero terms of P and dS, about
//! a quarter of each product's multiply at T = 64 and two fifths at T = 256; other variants
//! compute the full products, with the same results. The fused kernels of
//! [`super::flash_attention`] keep a (B, n_head, T) statistic instead; this path stays as their
//! reference and as the faster one on CPU-backed adapters.
//!
//! Grouped-query attention ([`GroupedAttentionShape`], [`AttentionForward::grouped`],
//! [`AttentionBackward::grouped`]): n_head query heads share n_kv_head key/value heads. The
//! products that read a key or value head address it through the matmul's per-operand divisor of
//! the head index (query head h reads key/value head h / group), so nothing is copied; the key and
//! value gradients of a shared head are summed over its group by one accumulating product per
//! query head of the group, in a fixed order (deterministic, no atomics). With n_kv_head = n_head
//! every product is exactly the multi-head one.

use super::dropout::Dropout;
use super::matmul::Matmul;
use super::{Dispatch, Record, RowKernel, common_precision, grid, record_ops};
use crate::gpu::{Bind, Gpu, GpuTensor, Specialisation};
use crate::ops::{AttentionShape, GroupedAttentionShape, Layout, MatmulSpec, Operand, Triangle};
use crate::{Error, Result};

const WG: u32 = 128;
/// Walks over a row of the softmax forward (max, sum, output) and backward (dot, output).
const FORWARD_PASSES: usize = 3;
const BACKWARD_PASSES: usize = 2;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    seq: u32,
    groups_x: u32,
    _pad: u32,
}

/// Operand placement of head h's (T, hd) block of a buffer of (b, t) rows `width` wide whose
/// heads start at element `offset` of each row (the q, k or v part of a qkv buffer, or a
/// (B, T, n_head·hd) output).
fn head_block(shape: &GroupedAttentionShape, width: usize, offset: usize) -> Operand {
    Operand {
        offset,
        ld: width,
        outer: shape.seq * width,
        inner: shape.head_dim,
    }
}

/// Placement of the (T, T) block of (b, h) in a (B, n_head, T, T) buffer.
fn square_block(shape: &GroupedAttentionShape) -> Operand {
    let t = shape.seq;
    Operand {
        offset: 0,
        ld: t,
        outer: shape.heads * t * t,
        inner: t * t,
    }
}

/// A product over every (b, h) pair of query heads.
fn per_head(
    shape: &GroupedAttentionShape,
    layout: Layout,
    m: usize,
    n: usize,
    k: usize,
) -> MatmulSpec {
    let mut s = MatmulSpec::new(layout, m, n, k);
    s.batch = shape.batch * shape.heads;
    s.batch_inner = shape.heads;
    s
}

/// The products giving the key or value gradient of every key/value head: for each query head
/// j of a group (in increasing order), a product over every (b, key/value head g) pair that reads
/// the (T, T) block of query head g·group + j (`square`) and that head's (T, hd) block of
/// `per_query` (dO for dv, q for dk), and adds into `c` (the first overwrites). The group's sum
/// thus has a fixed order, so the result is deterministic without atomics. With group = 1 this is
/// the single product of multi-head attention.
#[allow(clippy::too_many_arguments)]
fn per_kv_head_sum(
    gpu: &Gpu,
    shape: &GroupedAttentionShape,
    c_tensor: &GpuTensor,
    square: &GpuTensor,
    per_query_tensor: &GpuTensor,
    per_query: Operand,
    c: Operand,
    alpha: f32,
) -> Result<Vec<Matmul>> {
    let (t, hd, g) = (shape.seq, shape.head_dim, shape.group());
    (0..g)
        .map(|j| {
            let mut s = MatmulSpec::new(Layout::TN, t, hd, t);
            s.batch = shape.batch * shape.kv_heads;
            s.batch_inner = shape.kv_heads;
            let sq = square_block(shape);
            s.a = Operand {
                offset: j * sq.inner,
                inner: g * sq.inner,
                ..sq
            };
            s.b = Operand {
                offset: per_query.offset + j * hd,
                inner: g * hd,
                ..per_query
            };
            s.c = c;
            s.alpha = alpha;
            s.accumulate = j > 0;
            // op(A) is Pᵀ or dSᵀ: row (key) i has non-zero terms only from query i on.
            s.triangle = Triangle::AUpper;
            Matmul::new(gpu, c_tensor, square, per_query_tensor, None, &s)
        })
        .collect()
}

/// Which causal softmax kernel to prepare: its entry points in the two row layouts and how many
/// times it walks a row.
struct SoftmaxPass {
    entry: &'static str,
    rows_entry: &'static str,
    /// The one-invocation-per-row entry that reads and writes four positions at a time, for
    /// T a multiple of 4; its buffers are bound 3 slots higher (their vec4 views).
    rows4_entry: &'static str,
    passes: usize,
}

const SOFTMAX_FORWARD: SoftmaxPass = SoftmaxPass {
    entry: "softmax_causal_forward",
    rows_entry: "softmax_causal_forward_rows",
    rows4_entry: "softmax_causal_forward_rows4",
    passes: FORWARD_PASSES,
};
const SOFTMAX_BACKWARD: SoftmaxPass = SoftmaxPass {
    entry: "softmax_causal_backward",
    rows_entry: "softmax_causal_backward_rows",
    rows4_entry: "softmax_causal_backward_rows4",
    passes: BACKWARD_PASSES,
};

/// The causal softmax kernel (forward or backward) over every row of the (B·n_head·T, T) matrix.
fn softmax(
    gpu: &Gpu,
    pass: &SoftmaxPass,
    kernel: RowKernel,
    shape: &GroupedAttentionShape,
    buffers: &[(u32, Bind<'_>)],
    probs: &GpuTensor,
) -> Result<Dispatch> {
    let precision = common_precision("attention", &[probs])?;
    kernel.check(gpu, "attention", shape.seq, pass.passes)?;
    let rows = shape.batch * shape.heads * shape.seq;
    // Whole-row vec4s need rows that start on vec4 boundaries.
    let vec4 = kernel == RowKernel::Invocation && shape.seq.is_multiple_of(4);
    let rows_entry = if vec4 {
        pass.rows4_entry
    } else {
        pass.rows_entry
    };
    let (entry, constants) = kernel.entry(
        (pass.entry, Specialisation::default().with("WG", WG)),
        rows_entry,
    );
    let workgroups = grid(gpu, "attention", kernel.workgroups(rows))?;
    let params = gpu.uniform(
        "attention softmax params",
        &Params {
            rows: rows as u32,
            seq: shape.seq as u32,
            groups_x: workgroups[0],
            _pad: 0,
        },
    );
    let mut entries = vec![(0, Bind::whole(&params))];
    let slot = |b: u32| if vec4 { b + 3 } else { b };
    entries.extend(buffers.iter().map(|(b, bind)| (slot(*b), *bind)));
    Dispatch::new(
        gpu,
        "attention",
        entry,
        precision,
        constants,
        &entries,
        workgroups,
    )
}

/// Dropout on the attention probabilities: where the dropped copy goes, the 4-word dropout state
/// tensor (see [`super::dropout::DropoutState`]) and the site number of this layer's mask.
#[derive(Clone, Copy)]
pub struct AttentionDropout<'a> {
    /// Receives dropout(probs); same shape and precision as probs.
    pub dropped: &'a GpuTensor,
    /// The step's dropout state.
    pub state: &'a GpuTensor,
    /// Distinguishes this mask from the others of the step.
    pub site: u32,
}

impl AttentionDropout<'_> {
    fn check(&self, shape: &GroupedAttentionShape, probs: &GpuTensor) -> Result<()> {
        if self.dropped.len() != shape.probs_len() || self.dropped.dtype() != probs.dtype() {
            return Err(Error::shape(
                "attention",
                format!(
                    "the dropped probabilities {} must be {:?} with {} elements like probs",
                    self.dropped.label(),
                    probs.dtype(),
                    shape.probs_len()
                ),
            ));
        }
        Ok(())
    }
}

/// The forward pass, prepared once: `probs = softmax(mask(q·kᵀ/√hs))`, `out = probs·v`.
pub struct AttentionForward {
    scores: Matmul,
    softmax: Dispatch,
    dropout: Option<Dropout>,
    weighted: Matmul,
}

impl AttentionForward {
    /// Prepares the forward for `shape`; `probs` (B·n_head·T·T) is written and kept for the
    /// backward.
    pub fn new(
        gpu: &Gpu,
        out: &GpuTensor,
        probs: &GpuTensor,
        qkv: &GpuTensor,
        shape: &AttentionShape,
    ) -> Result<Self> {
        Self::with_dropout(gpu, out, probs, qkv, shape, None)
    }

    /// [`AttentionForward::new`] with dropout on the probabilities: `probs` keeps the softmax
    /// (the backward needs it) and `dropout.dropped` receives the dropped, rescaled copy that
    /// weights the values.
    pub fn with_dropout(
        gpu: &Gpu,
        out: &GpuTensor,
        probs: &GpuTensor,
        qkv: &GpuTensor,
        shape: &AttentionShape,
        dropout: Option<AttentionDropout<'_>>,
    ) -> Result<Self> {
        let kernel = RowKernel::for_rows(gpu, shape.seq, FORWARD_PASSES);
        Self::with_row_kernel(gpu, out, probs, qkv, shape, dropout, kernel)
    }

    /// [`AttentionForward::with_dropout`] with an explicit layout for the softmax rows.
    pub fn with_row_kernel(
        gpu: &Gpu,
        out: &GpuTensor,
        probs: &GpuTensor,
        qkv: &GpuTensor,
        shape: &AttentionShape,
        dropout: Option<AttentionDropout<'_>>,
        kernel: RowKernel,
    ) -> Result<Self> {
        shape.validate(qkv.len(), out.len(), probs.len())?;
        Self::grouped_with_row_kernel(gpu, out, probs, qkv, &(*shape).into(), dropout, kernel)
    }

    /// The forward with grouped-query heads ([`GroupedAttentionShape`]: `qkv` is
    /// (B, T, (n_head + 2·n_kv_head)·head_dim), `out` (B, T, n_head·head_dim)), in the adapter's
    /// row layout, without dropout.
    pub fn grouped(
        gpu: &Gpu,
        out: &GpuTensor,
        probs: &GpuTensor,
        qkv: &GpuTensor,
        shape: &GroupedAttentionShape,
    ) -> Result<Self> {
        let kernel = RowKernel::for_rows(gpu, shape.seq, FORWARD_PASSES);
        Self::grouped_with_row_kernel(gpu, out, probs, qkv, shape, None, kernel)
    }

    /// [`AttentionForward::grouped`] with dropout and an explicit softmax row layout. Query head
    /// h reads key/value head h / group through the matmuls' B divisor
    /// ([`MatmulSpec::b_inner_div`]): no copy of the shared heads. With n_kv_head = n_head the
    /// products are exactly those of multi-head attention.
    pub fn grouped_with_row_kernel(
        gpu: &Gpu,
        out: &GpuTensor,
        probs: &GpuTensor,
        qkv: &GpuTensor,
        shape: &GroupedAttentionShape,
        dropout: Option<AttentionDropout<'_>>,
        kernel: RowKernel,
    ) -> Result<Self> {
        shape.validate(qkv.len(), out.len(), probs.len())?;
        common_precision("attention", &[out, probs, qkv])?;
        let (t, hd) = (shape.seq, shape.head_dim);
        let (width, k_part, v_part) = (
            shape.qkv_width(),
            shape.heads * hd,
            (shape.heads + shape.kv_heads) * hd,
        );
        let mut s = per_head(shape, Layout::NT, t, t, hd);
        s.a = head_block(shape, width, 0);
        s.b = head_block(shape, width, k_part);
        s.b_inner_div = shape.group();
        s.c = square_block(shape);
        s.alpha = 1.0 / (hd as f32).sqrt();
        // The softmax reads the scores only up to the diagonal and overwrites the rest.
        s.triangle = Triangle::OutputLower;
        let scores = Matmul::new(gpu, probs, qkv, qkv, None, &s)?;
        let softmax = softmax(
            gpu,
            &SOFTMAX_FORWARD,
            kernel,
            shape,
            &[(1, probs.bind())],
            probs,
        )?;
        let (drop, weights) = match dropout {
            Some(d) => {
                d.check(shape, probs)?;
                (
                    Some(Dropout::new(gpu, d.dropped, Some(probs), d.state, d.site)?),
                    d.dropped,
                )
            }
            None => (None, probs),
        };
        let mut w = per_head(shape, Layout::NN, t, hd, t);
        w.a = square_block(shape);
        w.b = head_block(shape, width, v_part);
        w.b_inner_div = shape.group();
        w.c = head_block(shape, shape.heads * hd, 0);
        w.triangle = Triangle::ALower;
        let weighted = Matmul::new(gpu, out, weights, qkv, None, &w)?;
        Ok(AttentionForward {
            scores,
            softmax,
            dropout: drop,
            weighted,
        })
    }

    /// Adds the dispatches to `pass`: the two products (with their packing, unless copies
    /// are allowed: then only through [`record_ops`], which records the copies between the
    /// parts), the softmax and the dropout.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        for part in self.parts() {
            part.record_into(pass);
        }
    }

    /// The products, softmax and dropout in recording order.
    fn parts(&self) -> Vec<&dyn Record> {
        let mut parts: Vec<&dyn Record> = vec![&self.scores, &self.softmax];
        parts.extend(self.dropout.as_ref().map(|d| d as &dyn Record));
        parts.push(&self.weighted);
        parts
    }

    /// Records and submits on its own, copies included (does not wait).
    pub fn run(&self, gpu: &Gpu) -> Result<()> {
        gpu.submit("attention forward", |encoder| {
            record_ops(encoder, "attention forward", [self as &dyn Record])
        })
    }
}

impl Record for AttentionForward {
    fn record_into(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.record(pass)
    }
    fn op_name(&self) -> &'static str {
        "attention::AttentionForward"
    }
    /// Lets the products fill their packed operands by copies (q, k, the probabilities and v
    /// where their rows are 256-byte aligned): between the softmax and P·v, so the op is
    /// recorded in parts.
    fn allow_copies(&mut self) {
        self.scores.allow_copies();
        self.weighted.allow_copies();
    }
    fn parts(&self) -> Vec<&dyn Record> {
        AttentionForward::parts(self)
    }
}

/// The backward pass, prepared once. `dprobs` is scratch of the size of `probs`.
pub struct AttentionBackward {
    dprobs_from_dout: Matmul,
    /// One product per query head of a group (one for multi-head attention).
    dv: Vec<Matmul>,
    dropout: Option<Dropout>,
    softmax: Dispatch,
    dq: Matmul,
    dk: Vec<Matmul>,
}

impl AttentionBackward {
    /// Prepares `dqkv` (B, T, 3C, overwritten) from `dout` (B, T, C) and the forward's `qkv` and
    /// `probs`.
    pub fn new(
        gpu: &Gpu,
        dqkv: &GpuTensor,
        dprobs: &GpuTensor,
        dout: &GpuTensor,
        qkv: &GpuTensor,
        probs: &GpuTensor,
        shape: &AttentionShape,
    ) -> Result<Self> {
        Self::with_dropout(gpu, dqkv, dprobs, dout, qkv, probs, shape, None)
    }

    /// [`AttentionBackward::new`] for a forward built with dropout: the values' gradient uses
    /// the dropped probabilities, and dP is passed back through the same mask before the softmax
    /// backward (which uses `probs`, the softmax before dropout).
    #[allow(clippy::too_many_arguments)]
    pub fn with_dropout(
        gpu: &Gpu,
        dqkv: &GpuTensor,
        dprobs: &GpuTensor,
        dout: &GpuTensor,
        qkv: &GpuTensor,
        probs: &GpuTensor,
        shape: &AttentionShape,
        dropout: Option<AttentionDropout<'_>>,
    ) -> Result<Self> {
        let kernel = RowKernel::for_rows(gpu, shape.seq, BACKWARD_PASSES);
        Self::with_row_kernel(gpu, dqkv, dprobs, dout, qkv, probs, shape, dropout, kernel)
    }

    /// [`AttentionBackward::with_dropout`] with an explicit layout for the softmax rows.
    #[allow(clippy::too_many_arguments)]
    pub fn with_row_kernel(
        gpu: &Gpu,
        dqkv: &GpuTensor,
        dprobs: &GpuTensor,
        dout: &GpuTensor,
        qkv: &GpuTensor,
        probs: &GpuTensor,
        shape: &AttentionShape,
        dropout: Option<AttentionDropout<'_>>,
        kernel: RowKernel,
    ) -> Result<Self> {
        shape.validate(qkv.len(), dout.len(), probs.len())?;
        shape.validate(dqkv.len(), dout.len(), dprobs.len())?;
        Self::grouped_with_row_kernel(
            gpu,
            dqkv,
            dprobs,
            dout,
            qkv,
            probs,
            &(*shape).into(),
            dropout,
            kernel,
        )
    }

    /// The backward of [`AttentionForward::grouped`], in the adapter's row layout, without
    /// dropout: `dqkv` ((B, T, (n_head + 2·n_kv_head)·head_dim), overwritten) from `dout`
    /// (B, T, n_head·head_dim) and the forward's `qkv` and `probs`.
    pub fn grouped(
        gpu: &Gpu,
        dqkv: &GpuTensor,
        dprobs: &GpuTensor,
        dout: &GpuTensor,
        qkv: &GpuTensor,
        probs: &GpuTensor,
        shape: &GroupedAttentionShape,
    ) -> Result<Self> {
        let kernel = RowKernel::for_rows(gpu, shape.seq, BACKWARD_PASSES);
        Self::grouped_with_row_kernel(gpu, dqkv, dprobs, dout, qkv, probs, shape, None, kernel)
    }

    /// [`AttentionBackward::grouped`] with dropout and an explicit softmax row layout. dq and
    /// dP read the shared key/value head through the matmuls' B divisor; dk and dv of a
    /// key/value head sum over the group's query heads, one accumulating product per query head
    /// of the group in increasing order (2·(group − 1) more dispatches than multi-head
    /// attention), so the sum's order is fixed and the result deterministic.
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_with_row_kernel(
        gpu: &Gpu,
        dqkv: &GpuTensor,
        dprobs: &GpuTensor,
        dout: &GpuTensor,
        qkv: &GpuTensor,
        probs: &GpuTensor,
        shape: &GroupedAttentionShape,
        dropout: Option<AttentionDropout<'_>>,
        kernel: RowKernel,
    ) -> Result<Self> {
        shape.validate(qkv.len(), dout.len(), probs.len())?;
        shape.validate(dqkv.len(), dout.len(), dprobs.len())?;
        common_precision("attention", &[dqkv, dprobs, dout, qkv, probs])?;
        if dprobs.buffer() == probs.buffer() {
            return Err(Error::shape(
                "attention",
                "dprobs must be a buffer of its own, not probs",
            ));
        }
        let (t, hd) = (shape.seq, shape.head_dim);
        let (width, k_part, v_part) = (
            shape.qkv_width(),
            shape.heads * hd,
            (shape.heads + shape.kv_heads) * hd,
        );
        let out_width = shape.heads * hd;
        let scale = 1.0 / (hd as f32).sqrt();
        // dP = dO·vᵀ
        let mut s = per_head(shape, Layout::NT, t, t, hd);
        s.a = head_block(shape, out_width, 0);
        s.b = head_block(shape, width, v_part);
        s.b_inner_div = shape.group();
        s.c = square_block(shape);
        // The softmax backward reads dP only up to the diagonal and overwrites the rest.
        s.triangle = Triangle::OutputLower;
        let dprobs_from_dout = Matmul::new(gpu, dprobs, dout, qkv, None, &s)?;
        // dv = Pᵀ·dO, with the dropped P when there is dropout; then dP through the same mask.
        let (drop, weights) = match dropout {
            Some(d) => {
                d.check(shape, probs)?;
                (
                    Some(Dropout::new(gpu, dprobs, None, d.state, d.site)?),
                    d.dropped,
                )
            }
            None => (None, probs),
        };
        let dv = per_kv_head_sum(
            gpu,
            shape,
            dqkv,
            weights,
            dout,
            head_block(shape, out_width, 0),
            head_block(shape, width, v_part),
            1.0,
        )?;
        // dS = P ⊙ (dP − rowsum(P ⊙ dP)), in place in dprobs.
        let softmax = softmax(
            gpu,
            &SOFTMAX_BACKWARD,
            kernel,
            shape,
            &[(2, probs.bind()), (3, dprobs.bind())],
            probs,
        )?;
        // dq = scale·dS·k
        let mut s = per_head(shape, Layout::NN, t, hd, t);
        s.a = square_block(shape);
        s.b = head_block(shape, width, k_part);
        s.b_inner_div = shape.group();
        s.c = head_block(shape, width, 0);
        s.alpha = scale;
        s.triangle = Triangle::ALower;
        let dq = Matmul::new(gpu, dqkv, dprobs, qkv, None, &s)?;
        // dk = scale·dSᵀ·q, summed over the group.
        let dk = per_kv_head_sum(
            gpu,
            shape,
            dqkv,
            dprobs,
            qkv,
            head_block(shape, width, 0),
            head_block(shape, width, k_part),
            scale,
        )?;
        Ok(AttentionBackward {
            dprobs_from_dout,
            dv,
            dropout: drop,
            softmax,
            dq,
            dk,
        })
    }

    /// Adds the dispatches (five products for multi-head attention, 2·group + 3 in general,
    /// with their packing unless copies are allowed: then only through [`record_ops`]) to
    /// `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        for part in self.parts() {
            part.record_into(pass);
        }
    }

    /// The products, dropout and softmax in recording order.
    fn parts(&self) -> Vec<&dyn Record> {
        let mut parts: Vec<&dyn Record> = vec![&self.dprobs_from_dout];
        parts.extend(self.dv.iter().map(|m| m as &dyn Record));
        parts.extend(self.dropout.as_ref().map(|d| d as &dyn Record));
        parts.push(&self.softmax);
        parts.push(&self.dq);
        parts.extend(self.dk.iter().map(|m| m as &dyn Record));
        parts
    }

    /// Records and submits on its own, copies included (does not wait).
    pub fn run(&self, gpu: &Gpu) -> Result<()> {
        gpu.submit("attention backward", |encoder| {
            record_ops(encoder, "attention backward", [self as &dyn Record])
        })
    }
}

impl Record for AttentionBackward {
    fn record_into(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.record(pass)
    }
    fn op_name(&self) -> &'static str {
        "attention::AttentionBackward"
    }
    /// Lets the products fill their packed operands by copies (dO, v, the probabilities, dS, k
    /// and q where their rows are 256-byte aligned): dq and dk read dS, which the softmax
    /// backward writes in the middle of the op, so it is recorded in parts.
    fn allow_copies(&mut self) {
        self.dprobs_from_dout.allow_copies();
        for m in self.dv.iter_mut().chain(&mut self.dk) {
            m.allow_copies();
        }
        self.dq.allow_copies();
    }
    fn parts(&self) -> Vec<&dyn Record> {
        AttentionBackward::parts(self)
    }
}

/// Forward on the GPU, submitted at once. Same argument order as
/// [`crate::cpu::attention::attention_forward`].
pub fn attention_forward(
    gpu: &Gpu,
    out: &GpuTensor,
    probs: &GpuTensor,
    qkv: &GpuTensor,
    shape: &AttentionShape,
) -> Result<()> {
    AttentionForward::new(gpu, out, probs, qkv, shape)?.run(gpu)
}
