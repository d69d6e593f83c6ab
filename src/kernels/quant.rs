//! The quant family (shaders/quant.wgsl): products and embedding lookups over quantised weights
//! ([`crate::quant`]), dequantising as they read, with f32 accumulation.

use super::checks::expect_tensor;
use super::matmul::{Matmul, MatmulVariant};
use super::{Dispatch, common_precision, grid, loop_budget_ok};
use crate::gpu::{Bind, DType, Gpu, GpuTensor, Specialisation};
use crate::ops::{Layout, MatmulSpec};
use crate::quant::{BLOCK, QuantKind, QuantMatrix};
use crate::{Error, Precision, Result};

/// A quantised matrix on the GPU: its packed words and its f16 scales (two to a `u32` word).
#[derive(Debug)]
pub struct QuantWeight {
    packed: GpuTensor,
    scales: GpuTensor,
    kind: QuantKind,
    group_size: usize,
    rows: usize,
    cols: usize,
}

impl QuantWeight {
    /// Uploads `m`.
    pub fn upload(gpu: &Gpu, label: &str, m: &QuantMatrix) -> Result<Self> {
        let packed = gpu.upload_u32(&format!("{label} packed"), &[m.packed().len()], m.packed())?;
        // Pairs of f16 bits, the first in the low half (unpack2x16float's .x); an odd count is
        // padded with a zero.
        let bits: Vec<u16> = m.scales().iter().map(|s| s.to_bits()).collect();
        let words: Vec<u32> = bits
            .chunks(2)
            .map(|p| u32::from(p[0]) | (u32::from(*p.get(1).unwrap_or(&0)) << 16))
            .collect();
        let scales = gpu.upload_u32(&format!("{label} scales"), &[words.len()], &words)?;
        Ok(QuantWeight {
            packed,
            scales,
            kind: m.kind(),
            group_size: m.group_size(),
            rows: m.rows(),
            cols: m.cols(),
        })
    }

    /// Integer width.
    pub fn kind(&self) -> QuantKind {
        self.kind
    }
    /// Rows (outputs).
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Columns (inputs).
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Bytes of the packed integers on the GPU.
    pub fn packed_bytes(&self) -> u64 {
        self.packed.bytes()
    }
    /// Bytes of the scales on the GPU.
    pub fn scale_bytes(&self) -> u64 {
        self.scales.bytes()
    }

    fn words_per_row(&self) -> usize {
        self.cols / self.kind.per_word()
    }

    fn constants(&self) -> Specialisation {
        Specialisation::default()
            .with("Q4", (self.kind == QuantKind::Q4) as u8)
            .with("GROUP", self.group_size as u32)
    }
}

/// The uniform block `Dims` of the shader.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Dims {
    m: u32,
    n: u32,
    k: u32,
    groups_per_row: u32,
    words_per_row: u32,
    seq: u32,
    groups_x: u32,
    _pad: u32,
}

impl Dims {
    fn new(m: usize, w: &QuantWeight) -> Self {
        Dims {
            m: m as u32,
            n: w.rows as u32,
            k: w.cols as u32,
            groups_per_row: (w.cols / w.group_size) as u32,
            words_per_row: w.words_per_row() as u32,
            seq: 1,
            groups_x: 1,
            _pad: 0,
        }
    }
}

/// How a quantised product is laid out (all compute the same sums; see the shader).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QMatmulKernel {
    /// 64×64 output tiles staged in workgroup memory: GPUs, several rows.
    Tiled,
    /// One invocation per output, no barriers: CPU-backed adapters, one row (or several where
    /// the texture layout cannot run).
    Rows,
    /// One workgroup per output with a tree over its lanes: the one-row product on GPUs.
    Workgroup,
    /// W dequantised into the texture matmul's B operand, then that variant's multiply
    /// ([`crate::kernels::matmul::MatmulVariant::Texture`]): CPU-backed adapters, several rows.
    /// Its B texture is scratch shared with the float products of the same shape.
    Texture,
}

impl QMatmulKernel {
    /// Every layout.
    pub const ALL: [QMatmulKernel; 4] = [
        QMatmulKernel::Tiled,
        QMatmulKernel::Rows,
        QMatmulKernel::Workgroup,
        QMatmulKernel::Texture,
    ];

    /// The layout for `m` rows of `w` on `gpu`. On software adapters, where a barrier costs
    /// more than the arithmetic and a texel fetch less than a storage load: the texture
    /// multiply for several rows (where the adapter can run it), else one invocation per
    /// output. On GPUs: tiles for several rows, a workgroup per output for one.
    pub fn for_shape(gpu: &Gpu, m: usize, w: &QuantWeight) -> QMatmulKernel {
        if gpu.capabilities().adapter.software {
            if m > 1 && QMatmulKernel::Texture.supports(gpu, m, w) {
                return QMatmulKernel::Texture;
            }
            if QMatmulKernel::Rows.supports(gpu, m, w) {
                return QMatmulKernel::Rows;
            }
        }
        if m == 1 {
            QMatmulKernel::Workgroup
        } else {
            QMatmulKernel::Tiled
        }
    }

    /// Whether this layout can run `m` rows of `w` on `gpu`: the loop budget of llvmpipe, and
    /// for `Texture` what the texture matmul needs (SUBGROUP, texture limits).
    pub fn supports(self, gpu: &Gpu, m: usize, w: &QuantWeight) -> bool {
        match self {
            QMatmulKernel::Texture => MatmulVariant::Texture.supports(gpu, &texture_spec(m, w)),
            _ => loop_budget_ok(gpu, self.loop_iterations(w.cols)),
        }
    }

    fn entry(self) -> &'static str {
        match self {
            QMatmulKernel::Tiled => "qmatmul_tiled",
            QMatmulKernel::Rows => "qmatmul_rows",
            QMatmulKernel::Workgroup => "qmatmul_wg",
            QMatmulKernel::Texture => "qmatmul_pack_b",
        }
    }

    /// Loop iterations of one invocation (see [`loop_budget_ok`]), an upper estimate.
    fn loop_iterations(self, k: usize) -> usize {
        match self {
            // Per 32-deep step: 8 + 2 staging iterations and 32 products.
            QMatmulKernel::Tiled => (k / BLOCK) * 42 + 64,
            // One iteration per word (q8) or 8 per block (q4): at most k / 4.
            QMatmulKernel::Rows => k / 4 + 64,
            QMatmulKernel::Workgroup => k / BLOCK / 8 + 64,
            // The packing: no loop over k.
            QMatmulKernel::Texture => 64,
        }
    }

    /// Workgroups for `m` rows and `n` outputs.
    fn workgroups(self, m: usize, n: usize) -> [usize; 3] {
        match self {
            QMatmulKernel::Tiled => [n.div_ceil(64), m.div_ceil(64), 1],
            QMatmulKernel::Rows => [n.div_ceil(ROWS_WG), m, 1],
            QMatmulKernel::Workgroup => [n, m, 1],
            // The packing: one invocation per texel of the B texture, whose k rows the caller
            // adds (see QMatmul::with_kernel).
            QMatmulKernel::Texture => [n.div_ceil(4).div_ceil(64), 1, 1],
        }
    }
}

/// The float product whose B operand the `Texture` layout packs: `Y = X·Wᵀ`.
fn texture_spec(m: usize, w: &QuantWeight) -> MatmulSpec {
    MatmulSpec::new(Layout::NT, m, w.rows, w.cols)
}

/// Invocations per workgroup of `qmatmul_rows` and `qembed` (the shader's `ROWS_WG`).
const ROWS_WG: usize = 64;

/// `y = x·Wᵀ (+ bias)` for `m` rows of `x` and a quantised `W`, prepared once.
pub struct QMatmul {
    dispatch: Dispatch,
    /// The texture layout's multiply, after `dispatch` packed its B operand.
    product: Option<Matmul>,
    kernel: QMatmulKernel,
    /// 2·M·N·K, for the census.
    flops: f64,
}

impl QMatmul {
    /// Prepares the product in the layout [`QMatmulKernel::for_shape`] picks.
    pub fn new(
        gpu: &Gpu,
        y: &GpuTensor,
        x: &GpuTensor,
        w: &QuantWeight,
        bias: Option<&GpuTensor>,
        m: usize,
    ) -> Result<Self> {
        Self::with_kernel(gpu, QMatmulKernel::for_shape(gpu, m, w), y, x, w, bias, m)
    }

    /// Prepares the product in an explicit layout. `x` is `m × W.cols`, `y` is `m × W.rows`
    /// and `bias` (if any) `W.rows`, all in one float precision.
    pub fn with_kernel(
        gpu: &Gpu,
        kernel: QMatmulKernel,
        y: &GpuTensor,
        x: &GpuTensor,
        w: &QuantWeight,
        bias: Option<&GpuTensor>,
        m: usize,
    ) -> Result<Self> {
        const OP: &str = "qmatmul";
        let mut operands = vec![y, x];
        operands.extend(bias);
        let precision = common_precision(OP, &operands)?;
        let (n, k) = (w.rows, w.cols);
        if m == 0 || n == 0 {
            return Err(Error::shape(
                OP,
                format!("empty product: {m} rows, {n} outputs"),
            ));
        }
        expect_tensor(OP, "x", x, x.dtype(), m * k)?;
        expect_tensor(OP, "y", y, y.dtype(), m * n)?;
        if let Some(b) = bias {
            expect_tensor(OP, "bias", b, b.dtype(), n)?;
        }
        if !kernel.supports(gpu, m, w) {
            return Err(Error::shape(
                OP,
                format!(
                    "{kernel:?} cannot run {m}×{n}×{k} here (llvmpipe's loop budget; the texture \
                     layout needs SUBGROUP and sizes within the texture limits); use \
                     QMatmul::new"
                ),
            ));
        }
        let [gx, gy, gz] = kernel.workgroups(m, n);
        let max = gpu
            .capabilities()
            .limits
            .max_compute_workgroups_per_dimension as usize;
        if gx > max || gy > max {
            return Err(Error::shape(
                OP,
                format!("{gx} × {gy} workgroups exceed the adapter's {max} per dimension"),
            ));
        }
        let dims = gpu.uniform("qmatmul dims", &Dims::new(m, w));
        let constants = w
            .constants()
            .with("HAS_BIAS", bias.is_some() as u8)
            .with("ROWS_WG", ROWS_WG as u32);
        let mut buffers = vec![
            (0, Bind::whole(&dims)),
            (1, w.packed.bind()),
            (2, w.scales.bind()),
        ];
        let (product, packed, workgroups) = if kernel == QMatmulKernel::Texture {
            // The packing writes the B texture; the texture matmul then multiplies.
            let (product, packed) = Matmul::with_packed_b(gpu, y, x, bias, &texture_spec(m, w))?;
            let rows = packed.size()[1];
            (Some(product), Some(packed), [gx as u32, rows, 1])
        } else {
            buffers.extend([
                (3, x.bind()),
                // Without a bias, x again (read-only either way); HAS_BIAS keeps it unread.
                (4, bias.unwrap_or(x).bind()),
                (5, y.bind()),
            ]);
            (None, None, [gx as u32, gy as u32, gz as u32])
        };
        if let Some(p) = &packed {
            buffers.push((8, p.bind()));
        }
        let dispatch = Dispatch::new(
            gpu,
            "quant",
            kernel.entry(),
            precision,
            constants,
            &buffers,
            workgroups,
        )?;
        Ok(QMatmul {
            dispatch,
            product,
            kernel,
            flops: 2.0 * m as f64 * n as f64 * k as f64,
        })
    }

    /// The layout in use.
    pub fn kernel(&self) -> QMatmulKernel {
        self.kernel
    }

    /// Adds the dispatches to `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
        match &self.product {
            Some(p) => p.record(pass),
            None => super::census::flops(self.flops),
        }
    }

    /// Records and submits on its own (does not wait).
    pub fn run(&self, gpu: &Gpu) -> Result<()> {
        gpu.run_pass("qmatmul", |pass| self.record(pass))
    }
}

/// Embedding rows from a quantised token table, plus the position table's rows.
pub struct QEmbedding {
    dispatch: Dispatch,
}

impl QEmbedding {
    /// `out[b, t] = table[tokens[b, t]] + wpe[t]` for `rows = B·T` tokens (`tokens`, u32) of a
    /// sequence length `seq`; `wpe` holds at least `seq` rows.
    pub fn rows(
        gpu: &Gpu,
        out: &GpuTensor,
        tokens: &GpuTensor,
        table: &QuantWeight,
        wpe: &GpuTensor,
        seq: usize,
    ) -> Result<Self> {
        expect_tensor("qembed", "tokens", tokens, DType::U32, tokens.len())?;
        if seq == 0 || !tokens.len().is_multiple_of(seq) {
            return Err(Error::shape(
                "qembed",
                format!("{} tokens are not whole sequences of {seq}", tokens.len()),
            ));
        }
        Self::build(gpu, out, tokens, table, wpe, tokens.len(), seq, false)
    }

    /// `out = table[token] + wpe[pos]` for the decode step's `(token, pos)` (a 2-word u32
    /// tensor the host writes before each step).
    pub fn one(
        gpu: &Gpu,
        out: &GpuTensor,
        step: &GpuTensor,
        table: &QuantWeight,
        wpe: &GpuTensor,
    ) -> Result<Self> {
        expect_tensor("qembed", "step", step, DType::U32, 2)?;
        Self::build(gpu, out, step, table, wpe, 1, 1, true)
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        gpu: &Gpu,
        out: &GpuTensor,
        tokens: &GpuTensor,
        table: &QuantWeight,
        wpe: &GpuTensor,
        rows: usize,
        seq: usize,
        one: bool,
    ) -> Result<Self> {
        const OP: &str = "qembed";
        let precision: Precision = common_precision(OP, &[out, wpe])?;
        let c = table.cols;
        expect_tensor(OP, "out", out, out.dtype(), rows * c)?;
        if !wpe.len().is_multiple_of(c) || wpe.len() < seq * c {
            return Err(Error::shape(
                OP,
                format!(
                    "the position table ({} elements) must be whole rows of {c} channels, at \
                     least {seq} of them",
                    wpe.len()
                ),
            ));
        }
        let workgroups = grid(gpu, OP, (rows * c).div_ceil(ROWS_WG))?;
        let mut dims = Dims::new(rows, table);
        dims.seq = seq as u32;
        dims.groups_x = workgroups[0];
        let dims = gpu.uniform("qembed dims", &dims);
        let constants = table
            .constants()
            .with("ONE_TOKEN", one as u8)
            .with("ROWS_WG", ROWS_WG as u32);
        let dispatch = Dispatch::new(
            gpu,
            "quant",
            "qembed",
            precision,
            constants,
            &[
                (0, Bind::whole(&dims)),
                (1, table.packed.bind()),
                (2, table.scales.bind()),
                (5, out.bind()),
                (6, tokens.bind()),
                (7, wpe.bind()),
            ],
            workgroups,
        )?;
        Ok(QEmbedding { dispatch })
    }

    /// Adds the dispatch to `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
    }

    /// Records and submits on its own (does not wait).
    pub fn run(&self, gpu: &Gpu) -> Result<()> {
        gpu.run_pass("qembed", |pass| self.record(pass))
    }
}
