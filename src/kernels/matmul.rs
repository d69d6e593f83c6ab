//! The matmul family (shaders/matmul.wgsl): every product of a linear layer and of attention.

use super::{common_precision, groups, loop_budget_ok};
use crate::gpu::{Bind, DType, Gpu, GpuTensor, PipelineKey, ScratchTexture, Specialisation};
use crate::ops::{Layout, MatmulSpec, Operand, Triangle};
use crate::{Error, Precision, Result};
use std::sync::Arc;

/// A kernel variant of the family. All compute the same thing; which is fastest depends on the
/// adapter and the shape, so [`Matmul::new`] picks by measurement (see [`super::tune`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MatmulVariant {
    /// Workgroup-memory tiles (64×64×16) with a 4×4 register block, scalar global loads.
    Tiled,
    /// As `Tiled` with vec4 global loads; needs 4-aligned contiguous extents (see [`vec4_ok`]).
    TiledVec4,
    /// No workgroup memory: 32 rows per invocation read straight from global memory.
    Rows,
    /// 32×4 blocks per invocation with A loaded cooperatively across the subgroup and handed out
    /// by `subgroupBroadcast` (unrolled, subgroup size 8) or `subgroupShuffle` (needs SUBGROUP).
    RowsSubgroup,
    /// `RowsSubgroup` restricted to its generic `subgroupShuffle` loop.
    RowsSubgroupShuffle,
    /// Operands packed into rgba32float textures by two extra dispatches, then 32×4 blocks per
    /// invocation with A shared across the subgroup (needs SUBGROUP with subgroups of at least
    /// 8, and the packed operands within the adapter's texture limits).
    Texture,
}

impl MatmulVariant {
    /// Every variant.
    pub const ALL: [MatmulVariant; 6] = [
        MatmulVariant::Tiled,
        MatmulVariant::TiledVec4,
        MatmulVariant::Rows,
        MatmulVariant::RowsSubgroup,
        MatmulVariant::RowsSubgroupShuffle,
        MatmulVariant::Texture,
    ];

    /// Name used in logs, benchmarks and the tuning cache.
    pub fn name(self) -> &'static str {
        match self {
            MatmulVariant::Tiled => "tiled",
            MatmulVariant::TiledVec4 => "tiled_vec4",
            MatmulVariant::Rows => "rows",
            MatmulVariant::RowsSubgroup => "rows_subgroup",
            MatmulVariant::RowsSubgroupShuffle => "rows_subgroup_shuffle",
            MatmulVariant::Texture => "texture",
        }
    }

    fn module(self) -> &'static str {
        match self {
            MatmulVariant::RowsSubgroup | MatmulVariant::RowsSubgroupShuffle => "matmul_subgroup",
            MatmulVariant::Texture => "matmul_texture",
            _ => "matmul",
        }
    }

    fn entry(self) -> &'static str {
        match self {
            MatmulVariant::Tiled => "matmul_tiled",
            MatmulVariant::TiledVec4 => "matmul_tiled_vec4",
            MatmulVariant::Rows => "matmul_rows",
            MatmulVariant::RowsSubgroup | MatmulVariant::RowsSubgroupShuffle => {
                "matmul_rows_subgroup"
            }
            MatmulVariant::Texture => "matmul_texture",
        }
    }

    /// Whether this variant can run `spec` on `gpu`.
    pub fn supports(self, gpu: &Gpu, spec: &MatmulSpec) -> bool {
        loop_budget_ok(gpu, self.loop_iterations(spec)) && self.can_run(gpu, spec)
    }

    /// An upper estimate of the loop iterations one invocation runs for `spec` (see
    /// [`loop_budget_ok`]): the K loop and what it contains, plus the stores.
    fn loop_iterations(self, spec: &MatmulSpec) -> usize {
        let k = spec.k;
        match self {
            // Per K tile: the two staging loops and the 16-step multiply, 28 iterations as
            // measured on llvmpipe (37445 of K = 40000 terms summed).
            MatmulVariant::Tiled | MatmulVariant::TiledVec4 => (k / TILE_K + 1) * 28 + 64,
            MatmulVariant::Rows | MatmulVariant::RowsSubgroupShuffle => k + 64,
            MatmulVariant::RowsSubgroup => k / 8 + 64,
            MatmulVariant::Texture => k / TEXTURE_K_ROUND + 256,
        }
    }

    fn can_run(self, gpu: &Gpu, spec: &MatmulSpec) -> bool {
        match self {
            MatmulVariant::TiledVec4 => vec4_ok(spec),
            MatmulVariant::RowsSubgroup | MatmulVariant::RowsSubgroupShuffle => {
                gpu.capabilities().subgroup
            }
            MatmulVariant::Texture => {
                let caps = gpu.capabilities();
                // Either layout of either operand (`PackedLayout`).
                let [a, b] = packed_sizes(spec, PackedLayout::ALONG_K_AND_N);
                let [a_m, b_k] = packed_sizes(
                    spec,
                    PackedLayout {
                        a_along_m: true,
                        b_along_k: true,
                    },
                );
                caps.subgroup
                    && caps.subgroup_size.0 >= 8
                    && [a, b, a_m, b_k]
                        .into_iter()
                        .all(|s| gpu.scratch_texture_fits(s))
            }
            _ => true,
        }
    }
}

/// Tile of C per workgroup of the tiled variants (the shader's defaults, set explicitly here so
/// the dispatch maths and the shader cannot drift apart).
const TILE_M: usize = 64;
const TILE_N: usize = 64;
const TILE_K: usize = 16;
/// Rows per invocation of `matmul_rows` (a WGSL `const`: it sizes a register array).
const ROWS: usize = 32;
const ROWS_WG_X: usize = 64;
/// Block of C per `matmul_rows_subgroup` invocation (constants in the shader too).
const SUBGROUP_BLOCK_ROWS: usize = 32;
const SUBGROUP_BLOCK_COLS: usize = 4;

/// Block of C per `matmul_texture` invocation (rows; the columns are one texel, 4).
const TEXTURE_BLOCK_ROWS: usize = 32;
/// K is padded to whole rounds of the texture kernel: 8 lanes by 4 values.
const TEXTURE_K_ROUND: usize = 32;

/// Invocations along x of a `matmul_texture` workgroup for `column_groups` groups of 4 columns:
/// the power of two from 8 to 64 that leaves the fewest invocations past the last group, the
/// widest among equals. Those invocations repeat the last group's work (they cannot return before
/// the subgroup operations), so a width that does not divide the groups is paid for in full: 96
/// groups (N = 384, the baby's qkv product) took 2 workgroups of 64, a quarter of them idle,
/// where 3 of 32 fit exactly. Powers of two bound the number of pipelines compiled.
fn texture_workgroup_width(column_groups: usize) -> usize {
    let padded = |w: usize| column_groups.div_ceil(w) * w;
    [ROWS_WG_X, 32, 16, 8]
        .into_iter()
        .min_by_key(|&w| padded(w))
        .unwrap_or(ROWS_WG_X)
}

/// How the texture variant packs its operands (shaders/matmul_texture.wgsl): op(A) along K
/// (texels of 4 k of one row) or along M (4 rows at one k), op(B) along N or along K. An
/// operand stored transposed is packed along its memory's rows, M for A and K for B, where its
/// memory then has the texture's layout exactly, so that a copy fills the texture
/// ([`TexelCopy`]): the activation gradient dY of a weight gradient dYᵀ·X, the weight W of
/// X·Wᵀ, the keys of q·kᵀ. Otherwise along K and N, where the multiply is a little faster
/// (4 to 12 % at the baby GPT's shapes on lavapipe, where the other layouts gather a lane's
/// four texels from four rows). The multiply reads both with the same values in the same
/// order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PackedLayout {
    a_along_m: bool,
    b_along_k: bool,
}

impl PackedLayout {
    /// Both operands packed along K (A) and N (B), whatever their memory's layout.
    const ALONG_K_AND_N: PackedLayout = PackedLayout {
        a_along_m: false,
        b_along_k: false,
    };

    /// The layouts for `spec`: an operand stored transposed is packed along its memory's rows
    /// where a copy can then fill its texture; `b` is `None` where the caller packs B (along N).
    fn for_operands(spec: &MatmulSpec, a: &GpuTensor, b: Option<&GpuTensor>) -> Self {
        let copyable_along_other = |role_a: bool, t: &GpuTensor| {
            OperandPacking::one_layer_each(spec, role_a, true)
                .copy_plan(t)
                .is_some()
        };
        PackedLayout {
            a_along_m: spec.layout.trans_a() && copyable_along_other(true, a),
            b_along_k: b.is_some_and(|b| spec.layout.trans_b() && copyable_along_other(false, b)),
        }
    }
}

/// Sizes (width, height, layers in texels) of the packed A and B of the texture variant.
fn packed_sizes(spec: &MatmulSpec, layout: PackedLayout) -> [[u32; 3]; 2] {
    let kp = spec.k.div_ceil(TEXTURE_K_ROUND).max(1) * TEXTURE_K_ROUND;
    let u = |x: usize| u32::try_from(x).unwrap_or(u32::MAX);
    let a = if layout.a_along_m {
        [u(spec.m.div_ceil(4)), u(kp)]
    } else {
        [u(kp / 4), u(spec.m)]
    };
    let b = if layout.b_along_k {
        [u(kp / 4), u(spec.n)]
    } else {
        [u(spec.n.div_ceil(4)), u(kp)]
    };
    [[a[0], a[1], u(spec.batch)], [b[0], b[1], u(spec.batch)]]
}

/// The product Cᵀ = op(B)ᵀ·op(A)ᵀ, as far as packing is concerned (C, the epilogue and the
/// causal hint are not carried over): op(A) packed along M is this product's B packed along N,
/// op(B) packed along K its A packed along K, so the packing entry points serve both layouts.
fn transposed(spec: &MatmulSpec) -> MatmulSpec {
    let layout = match (!spec.layout.trans_b(), !spec.layout.trans_a()) {
        (false, false) => Layout::NN,
        (false, true) => Layout::NT,
        (true, false) => Layout::TN,
        (true, true) => Layout::TT,
    };
    MatmulSpec {
        m: spec.n,
        n: spec.m,
        layout,
        a: spec.b,
        b: spec.a,
        a_inner_div: spec.b_inner_div,
        b_inner_div: spec.a_inner_div,
        triangle: Triangle::None,
        ..*spec
    }
}

/// How one operand of the texture variant reaches its texture: packed (or copied) as the A
/// (`as_a`) or B of `product`, which is the spec itself, its transpose for an operand packed
/// along its other dimension ([`transposed`]), and either of those widened where a two-level
/// batch's inner entries sit side by side in each row ([`OperandPacking::widened`]).
struct OperandPacking {
    product: MatmulSpec,
    as_a: bool,
    /// Where the multiply finds batch entry z (`texture_place` in the shader): layer
    /// z / `tex_div`, from texel ((z % tex_div) / inner_div) · `tex_step` on; 1 and 0 for one
    /// layer per batch entry.
    tex_div: usize,
    tex_step: usize,
}

impl OperandPacking {
    /// The packing of op(A) (`role_a`) or op(B) of `spec` in `layout`, stored in `t`: widened
    /// where a copy can then fill the wide texture, one layer per batch entry otherwise.
    fn new(spec: &MatmulSpec, role_a: bool, layout: PackedLayout, t: &GpuTensor) -> Self {
        let other = if role_a {
            layout.a_along_m
        } else {
            layout.b_along_k
        };
        let plain = Self::one_layer_each(spec, role_a, other);
        match plain.widened() {
            Some(wide) if wide.copy_plan(t).is_some() => wide,
            _ => plain,
        }
    }

    /// op(A) (`role_a`) or op(B) of `spec`, one texture layer per batch entry, packed along its
    /// other dimension (`other`: M for A, K for B) or the standard one.
    fn one_layer_each(spec: &MatmulSpec, role_a: bool, other: bool) -> Self {
        let (product, as_a) = if other {
            (transposed(spec), !role_a)
        } else {
            (*spec, role_a)
        };
        OperandPacking {
            product,
            as_a,
            tex_div: 1,
            tex_step: 0,
        }
    }

    /// The texture's size, for the operand in the standard layout of its role in `product`.
    fn texture_size(&self) -> [u32; 3] {
        packed_sizes(&self.product, PackedLayout::ALONG_K_AND_N)[usize::from(!self.as_a)]
    }

    /// How a copy fills the texture from `t`, if it can ([`CopyPlan::new`]).
    fn copy_plan(&self, t: &GpuTensor) -> Option<CopyPlan> {
        let p = &self.product;
        let size = self.texture_size();
        if self.as_a {
            let transposed = p.layout.trans_a();
            CopyPlan::new(t, &p.a, transposed, [p.k, p.m], p, p.a_inner_div, size)
        } else {
            let transposed = p.layout.trans_b();
            CopyPlan::new(t, &p.b, transposed, [p.n, p.k], p, p.b_inner_div, size)
        }
    }

    /// One texture layer per outer batch entry, holding the inner entries side by side, where
    /// they sit side by side in memory: attention's heads, whose (T, head_dim) blocks share each
    /// row of q, k, v and dO. One copy then fills the texture, where a layer per (batch, head)
    /// took one copy each (48 for the baby's q; 1,552 copy commands per step in all). The
    /// operand's packed extent along the texture's rows (K for an A, N for a B) must be whole
    /// texels, and for an A whole rounds of 32 (the multiply reads that far, and a wider
    /// texture has the next entry there, not zeros).
    fn widened(&self) -> Option<Self> {
        let p = &self.product;
        let (operand, inner_div, extent) = if self.as_a {
            (p.a, p.a_inner_div, p.k)
        } else {
            (p.b, p.b_inner_div, p.n)
        };
        let bi = p.batch_inner;
        let aligned = if self.as_a {
            extent.is_multiple_of(TEXTURE_K_ROUND)
        } else {
            extent.is_multiple_of(4)
        };
        if bi < 2
            || inner_div == 0
            || !bi.is_multiple_of(inner_div)
            || !p.batch.is_multiple_of(bi)
            || operand.inner != extent
            || !aligned
        {
            return None;
        }
        let side = bi / inner_div;
        let flat = Operand {
            inner: 0,
            ..operand
        };
        let mut wide = MatmulSpec {
            batch: p.batch / bi,
            batch_inner: 1,
            triangle: Triangle::None,
            ..*p
        };
        if self.as_a {
            wide.a = flat;
            wide.a_inner_div = 1;
            wide.k = extent * side;
        } else {
            wide.b = flat;
            wide.b_inner_div = 1;
            wide.n = extent * side;
        }
        Some(OperandPacking {
            product: wide,
            as_a: self.as_a,
            tex_div: bi,
            tex_step: extent / 4,
        })
    }
}

/// True when every vec4 the vectorised kernel loads lies inside one row of one matrix.
pub fn vec4_ok(spec: &MatmulSpec) -> bool {
    let a_extent = if spec.layout.trans_a() {
        spec.m
    } else {
        spec.k
    };
    let b_extent = if spec.layout.trans_b() {
        spec.k
    } else {
        spec.n
    };
    let aligned = |x: usize| x.is_multiple_of(4);
    [
        a_extent,
        spec.a.ld,
        spec.a.offset,
        spec.a.outer,
        spec.a.inner,
    ]
    .into_iter()
    .all(aligned)
        && [
            b_extent,
            spec.b.ld,
            spec.b.offset,
            spec.b.outer,
            spec.b.inner,
        ]
        .into_iter()
        .all(aligned)
}

/// True when C can be written four columns at a time as vec4s
/// (matmul_texture_store_vec4.wgsl): N, and C's leading dimension, offset and batch strides,
/// and the bias offset where there is a bias, all multiples of 4.
fn c_vec4_ok(spec: &MatmulSpec, bias: bool) -> bool {
    [
        spec.n,
        spec.c.ld,
        spec.c.offset,
        spec.c.outer,
        spec.c.inner,
        if bias { spec.bias_offset } else { 0 },
    ]
    .into_iter()
    .all(|x| x.is_multiple_of(4))
}

/// The uniform block `Dims` of the shader.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Dims {
    m: u32,
    n: u32,
    k: u32,
    batch: u32,
    batch_inner: u32,
    lda: u32,
    ldb: u32,
    ldc: u32,
    a_outer: u32,
    a_inner: u32,
    b_outer: u32,
    b_inner: u32,
    c_outer: u32,
    c_inner: u32,
    a_offset: u32,
    b_offset: u32,
    c_offset: u32,
    bias_offset: u32,
    alpha: f32,
    a_inner_div: u32,
    b_inner_div: u32,
    triangle: u32,
    a_tex_div: u32,
    a_tex_step: u32,
    b_tex_div: u32,
    b_tex_step: u32,
    _pad1: u32,
}

impl Dims {
    fn new(s: &MatmulSpec) -> Self {
        let u = |x: usize| x as u32;
        Dims {
            m: u(s.m),
            n: u(s.n),
            k: u(s.k),
            batch: u(s.batch),
            batch_inner: u(s.batch_inner),
            lda: u(s.a.ld),
            ldb: u(s.b.ld),
            ldc: u(s.c.ld),
            a_outer: u(s.a.outer),
            a_inner: u(s.a.inner),
            b_outer: u(s.b.outer),
            b_inner: u(s.b.inner),
            c_outer: u(s.c.outer),
            c_inner: u(s.c.inner),
            a_offset: u(s.a.offset),
            b_offset: u(s.b.offset),
            c_offset: u(s.c.offset),
            bias_offset: u(s.bias_offset),
            alpha: s.alpha,
            a_inner_div: u(s.a_inner_div),
            b_inner_div: u(s.b_inner_div),
            triangle: s.triangle.code(),
            a_tex_div: 1,
            a_tex_step: 0,
            b_tex_div: 1,
            b_tex_step: 0,
            _pad1: 0,
        }
    }
}

/// The checks shared by the epilogues that read or write a tensor laid out like C (`side`):
/// one precision, no ACCUMULATE, C's length. Returns the precision.
#[allow(clippy::too_many_arguments)]
fn check_epilogue_operand(
    c: &GpuTensor,
    a: &GpuTensor,
    b: &GpuTensor,
    side: &GpuTensor,
    epilogue: &str,
    name: &str,
    why: &str,
    spec: &MatmulSpec,
) -> Result<Precision> {
    let precision = common_precision("matmul", &[c, a, b, side])?;
    if spec.accumulate {
        return Err(Error::shape(
            "matmul",
            format!("{epilogue} and ACCUMULATE together are not supported"),
        ));
    }
    if side.len() != c.len() {
        return Err(Error::shape(
            "matmul",
            format!(
                "{name} (tensor {}) has {} elements but C (tensor {}) has {}; {why}",
                side.label(),
                side.len(),
                c.label(),
                c.len()
            ),
        ));
    }
    Ok(precision)
}

/// `variant`, or the tuner's choice for `spec` when it is `None`.
fn tuned(
    gpu: &Gpu,
    variant: Option<MatmulVariant>,
    precision: Precision,
    spec: &MatmulSpec,
) -> Result<MatmulVariant> {
    match variant {
        Some(v) => Ok(v),
        None => super::tune::matmul_variant(gpu, precision, spec),
    }
}

/// A GELU step fused into a product's epilogue ([`Matmul::with_gelu`]); both tensors are laid
/// out like C and distinct from every operand.
#[derive(Clone, Copy, Debug)]
pub enum GeluEpilogue<'a> {
    /// C is the pre-activation as usual, and `activation` receives gelu(C): the MLP's first
    /// product and its activation in one pass.
    Forward {
        /// Receives gelu(C).
        activation: &'a GpuTensor,
    },
    /// C receives op(A)·op(B) ⊙ gelu'(`pre_activation`): the MLP's hidden gradient from its
    /// output projection's input gradient, in one pass.
    Backward {
        /// The saved pre-activation.
        pre_activation: &'a GpuTensor,
    },
}

/// One dispatch of a product.
struct Dispatch {
    pipeline: Arc<wgpu::ComputePipeline>,
    bind_group: wgpu::BindGroup,
    workgroups: [u32; 3],
    /// Bytes bound, for the census.
    bytes: u64,
}

/// One product, ready to record: pipelines, bound buffers and workgroup counts, built once.
/// Most variants are one dispatch; the texture variant packs both operands first.
pub struct Matmul {
    dispatches: Vec<Dispatch>,
    /// Per dispatch: whether a copy in `copies` replaces it once copies are allowed.
    copied: Vec<bool>,
    /// Packed operands that a buffer-to-texture copy can fill (see [`Matmul::allow_copies`]).
    copies: Vec<TexelCopy>,
    copies_on: bool,
    variant: MatmulVariant,
    spec: MatmulSpec,
    writes_vec4: bool,
}

/// A packed operand whose memory already has the packed layout, so a buffer-to-texture copy
/// (a memcpy on lavapipe: 36 us for 768 x 512 f32, where the packing dispatch took 0.5 to 0.9
/// ms) fills the texture instead of a packing dispatch.
struct TexelCopy {
    buffer: wgpu::Buffer,
    texture: Arc<ScratchTexture>,
    plan: CopyPlan,
}

/// Where a [`TexelCopy`] reads: one copy per run of layers evenly spaced in the buffer (a
/// batch of contiguous matrices is one copy; attention's heads, strided inside each batch
/// entry's rows, one per layer).
struct CopyPlan {
    /// (first layer, layers, byte offset of the first layer's first row, rows per image).
    runs: Vec<(u32, u32, u64, u32)>,
    bytes_per_row: u32,
    /// Texels per row and rows.
    extent: [u32; 2],
}

impl CopyPlan {
    /// The copy that fills a texture of `size` texels with the packed op(X), X being `t` as
    /// stored (`transposed`: X's memory does not run along the texture's rows) and op(X)'s
    /// packed extent `extent` = (values per texture row, texture rows), when X's memory has the
    /// packed layout: f32 storage, not transposed, the texture exactly that size (no padding
    /// texel to zero), and rows and layers starting where a copy may read (256-byte row
    /// pitch, 16-byte aligned starts). `None` otherwise.
    fn new(
        t: &GpuTensor,
        operand: &Operand,
        transposed: bool,
        extent: [usize; 2],
        spec: &MatmulSpec,
        inner_div: usize,
        size: [u32; 3],
    ) -> Option<Self> {
        let bytes_per_row = u32::try_from(operand.ld * 4).ok()?;
        let exact = extent[0] == 4 * size[0] as usize && extent[1] == size[1] as usize;
        if transposed || !exact || t.dtype() != DType::F32 || bytes_per_row % 256 != 0 {
            return None;
        }
        let offsets: Vec<u64> = (0..spec.batch)
            .map(|z| {
                let inner = (z % spec.batch_inner) / inner_div.max(1);
                let base =
                    operand.offset + (z / spec.batch_inner) * operand.outer + inner * operand.inner;
                t.offset_bytes() + 4 * base as u64
            })
            .collect();
        if offsets.iter().any(|o| o % 16 != 0) {
            return None;
        }
        // Consecutive layers one whole number of rows apart, at least a layer's rows, share
        // one copy (`rows_per_image` is that number).
        let pitch = u64::from(bytes_per_row);
        let mut runs: Vec<(u32, u32, u64, u32)> = Vec::new();
        for (z, &o) in offsets.iter().enumerate() {
            if let Some(run) = runs.last_mut() {
                let (_, layers, first, rows) = *run;
                let next = first + u64::from(layers) * u64::from(rows) * pitch;
                let spacing = o
                    .checked_sub(first)
                    .map(|d| (d % pitch == 0).then_some(d / pitch));
                match (layers, spacing) {
                    // The second layer sets the run's spacing.
                    (1, Some(Some(r))) if r >= u64::from(size[1]) && r <= u64::from(u32::MAX) => {
                        run.1 = 2;
                        run.3 = r as u32;
                        continue;
                    }
                    _ if layers > 1 && o == next => {
                        run.1 += 1;
                        continue;
                    }
                    _ => {}
                }
            }
            runs.push((z as u32, 1, o, size[1]));
        }
        Some(CopyPlan {
            runs,
            bytes_per_row,
            extent: [size[0], size[1]],
        })
    }
}

impl TexelCopy {
    fn record(&self, encoder: &mut wgpu::CommandEncoder) {
        let p = &self.plan;
        for &(z, layers, offset, rows) in &p.runs {
            encoder.copy_buffer_to_texture(
                wgpu::TexelCopyBufferInfo {
                    buffer: &self.buffer,
                    layout: wgpu::TexelCopyBufferLayout {
                        offset,
                        bytes_per_row: Some(p.bytes_per_row),
                        rows_per_image: Some(rows),
                    },
                },
                wgpu::TexelCopyTextureInfo {
                    texture: self.texture.texture(),
                    mip_level: 0,
                    origin: wgpu::Origin3d { x: 0, y: 0, z },
                    aspect: wgpu::TextureAspect::All,
                },
                wgpu::Extent3d {
                    width: p.extent[0],
                    height: p.extent[1],
                    depth_or_array_layers: layers,
                },
            );
        }
    }
}

impl Matmul {
    /// Prepares `c = alpha·op(a)·op(b) (+ bias) (+ c)` with the variant the tuner picks for this
    /// adapter and shape bucket.
    pub fn new(
        gpu: &Gpu,
        c: &GpuTensor,
        a: &GpuTensor,
        b: &GpuTensor,
        bias: Option<&GpuTensor>,
        spec: &MatmulSpec,
    ) -> Result<Self> {
        let precision = common_precision("matmul", &[c, a, b])?;
        let variant = super::tune::matmul_variant(gpu, precision, spec)?;
        Self::with_variant(gpu, variant, c, a, b, bias, spec)
    }

    /// Prepares the product with an explicit variant.
    pub fn with_variant(
        gpu: &Gpu,
        variant: MatmulVariant,
        c: &GpuTensor,
        a: &GpuTensor,
        b: &GpuTensor,
        bias: Option<&GpuTensor>,
        spec: &MatmulSpec,
    ) -> Result<Self> {
        Self::build(gpu, variant, c, a, Some(b), bias, None, None, spec)
    }

    /// Prepares `c = resid + alpha·op(a)·op(b) (+ bias)`: the residual add of a transformer
    /// block fused into the output projection's epilogue (one dispatch and one pass over the
    /// activation fewer). `resid` has C's length and layout and must not be `c`; with `variant`
    /// `None` the tuner picks, as in [`Matmul::new`]. In f32 the result is bit-identical to the
    /// product followed by [`super::residual::ResidualForward`] of `resid` and it; in f16 it
    /// rounds once instead of twice. Not with `spec.accumulate`.
    #[allow(clippy::too_many_arguments)]
    pub fn with_residual(
        gpu: &Gpu,
        variant: Option<MatmulVariant>,
        c: &GpuTensor,
        a: &GpuTensor,
        b: &GpuTensor,
        bias: Option<&GpuTensor>,
        resid: &GpuTensor,
        spec: &MatmulSpec,
    ) -> Result<Self> {
        let precision = check_epilogue_operand(
            c,
            a,
            b,
            resid,
            "a residual operand",
            "the residual operand",
            "it is added element by element",
            spec,
        )?;
        super::distinct("matmul", &[c], &[c, a, b, resid])?;
        let variant = tuned(gpu, variant, precision, spec)?;
        Self::build(gpu, variant, c, a, Some(b), bias, Some(resid), None, spec)
    }

    /// Prepares `c = alpha·op(a)·op(b) (+ bias)` with a GELU step in the epilogue
    /// ([`GeluEpilogue`]): `activation = gelu(c)` written beside c, or `c ⊙ gelu'(pre)` written
    /// as c. The product is rounded to the storage precision before the GELU step, exactly as
    /// storing it and running [`super::activation::GeluForward`] / `GeluBackward` on it would,
    /// so the fused result is bit-identical to the two passes in both precisions, with one
    /// dispatch and one pass over the activation fewer. With `variant` `None` the tuner picks.
    /// Not with `spec.accumulate`.
    #[allow(clippy::too_many_arguments)]
    pub fn with_gelu(
        gpu: &Gpu,
        variant: Option<MatmulVariant>,
        c: &GpuTensor,
        a: &GpuTensor,
        b: &GpuTensor,
        bias: Option<&GpuTensor>,
        gelu: GeluEpilogue<'_>,
        spec: &MatmulSpec,
    ) -> Result<Self> {
        let (side, name, written) = match gelu {
            GeluEpilogue::Forward { activation } => (activation, "the activation", true),
            GeluEpilogue::Backward { pre_activation } => {
                (pre_activation, "the pre-activation", false)
            }
        };
        let precision = check_epilogue_operand(
            c,
            a,
            b,
            side,
            "a GELU epilogue",
            name,
            "the GELU epilogue goes element by element",
            spec,
        )?;
        let outputs: &[&GpuTensor] = if written { &[c, side] } else { &[c] };
        super::distinct("matmul", outputs, &[c, a, b, side])?;
        let variant = tuned(gpu, variant, precision, spec)?;
        Self::build(gpu, variant, c, a, Some(b), bias, None, Some(gelu), spec)
    }

    /// Prepares the texture variant's product with op(B) packed by the caller: its own dispatch,
    /// recorded before this product's, fills the returned texture with op(B) (the layout of
    /// `matmul_pack_b`). The quantised products dequantise their weights into it, so that
    /// software adapters run them through this kernel.
    pub(crate) fn with_packed_b(
        gpu: &Gpu,
        c: &GpuTensor,
        a: &GpuTensor,
        bias: Option<&GpuTensor>,
        spec: &MatmulSpec,
    ) -> Result<(Self, Arc<ScratchTexture>)> {
        let product = Self::build(
            gpu,
            MatmulVariant::Texture,
            c,
            a,
            None,
            bias,
            None,
            None,
            spec,
        )?;
        let b_size = packed_sizes(spec, PackedLayout::ALONG_K_AND_N)[1];
        let b = gpu.scratch_texture("matmul b", b_size)?;
        Ok((product, b))
    }

    /// [`Matmul::with_variant`], or with `b: None` the texture variant without its B packing.
    #[allow(clippy::too_many_arguments)]
    fn build(
        gpu: &Gpu,
        variant: MatmulVariant,
        c: &GpuTensor,
        a: &GpuTensor,
        b: Option<&GpuTensor>,
        bias: Option<&GpuTensor>,
        resid: Option<&GpuTensor>,
        gelu: Option<GeluEpilogue<'_>>,
        spec: &MatmulSpec,
    ) -> Result<Self> {
        let mut operands = vec![c, a];
        operands.extend(b);
        operands.extend(bias);
        operands.extend(resid);
        let precision = common_precision("matmul", &operands)?;
        let b_len = b.map_or(spec.b_len(), GpuTensor::len);
        spec.validate(a.len(), b_len, bias.map(GpuTensor::len), c.len())?;
        if !variant.supports(gpu, spec) {
            return Err(Error::shape(
                "matmul",
                format!(
                    "variant {} cannot run here (tiled_vec4 needs 4-aligned extents and strides, \
                     rows_subgroup the SUBGROUP feature, texture subgroups of 8 or more and \
                     operands within the texture size limits; on llvmpipe every variant's K \
                     loop must fit the loop budget); {spec:?}",
                    variant.name()
                ),
            ));
        }
        let constants = Specialisation::default()
            .with("TRANS_A", spec.layout.trans_a() as u8)
            .with("TRANS_B", spec.layout.trans_b() as u8)
            .with("HAS_BIAS", bias.is_some() as u8)
            .with("ACCUMULATE", spec.accumulate as u8)
            .with("HAS_RESIDUAL", resid.is_some() as u8)
            .with(
                "EPILOGUE",
                match gelu {
                    None => 0u32,
                    Some(GeluEpilogue::Forward { .. }) => 1,
                    Some(GeluEpilogue::Backward { .. }) => 2,
                },
            );
        let constants = match variant {
            MatmulVariant::Rows | MatmulVariant::RowsSubgroup => {
                constants.with("ROWS_WG_X", ROWS_WG_X as u32)
            }
            _ => constants
                .with("TILE_M", TILE_M as u32)
                .with("TILE_N", TILE_N as u32)
                .with("TILE_K", TILE_K as u32),
        };
        let key = |entry: &'static str, constants: Specialisation| PipelineKey {
            family: variant.module(),
            entry,
            precision,
            constants,
        };
        // Unused bias slot: bind A again (read-only either way); HAS_BIAS keeps it unread.
        let bias_buf = bias.unwrap_or(a).bind();
        // Likewise the residual slot, kept unread by HAS_RESIDUAL, and the GELU epilogue's
        // (C again for the unwritten output: both slots are read-write).
        let resid_buf = resid.unwrap_or(a).bind();
        let (gelu_out, gelu_in) = match gelu {
            Some(GeluEpilogue::Forward { activation }) => (activation.bind(), a.bind()),
            Some(GeluEpilogue::Backward { pre_activation }) => (c.bind(), pre_activation.bind()),
            None => (c.bind(), a.bind()),
        };
        let max = gpu
            .capabilities()
            .limits
            .max_compute_workgroups_per_dimension;
        let mut dispatches = Vec::new();
        let mut copied = Vec::new();
        let mut copies = Vec::new();
        let mut writes_vec4 = false;
        let mut push = |label: &str,
                        pipeline: Arc<wgpu::ComputePipeline>,
                        entries: &[(u32, Bind<'_>)],
                        workgroups: [u32; 3]|
         -> Result<()> {
            if workgroups.iter().any(|&w| w > max) {
                return Err(Error::shape(
                    "matmul",
                    format!(
                        "{workgroups:?} workgroups exceed the adapter's {max} per dimension for {spec:?}"
                    ),
                ));
            }
            let bind_group = gpu.bind_group(label, &pipeline, entries);
            dispatches.push(Dispatch {
                pipeline,
                bind_group,
                workgroups,
                bytes: super::census::bound_bytes(entries),
            });
            Ok(())
        };
        if variant == MatmulVariant::Texture {
            let layout = PackedLayout::for_operands(spec, a, b);
            let a_pack = OperandPacking::new(spec, true, layout, a);
            let b_pack = b.map(|b| (b, OperandPacking::new(spec, false, layout, b)));
            let a_size = a_pack.texture_size();
            let b_size = b_pack.as_ref().map_or_else(
                || packed_sizes(spec, PackedLayout::ALONG_K_AND_N)[1],
                |(_, p)| p.texture_size(),
            );
            let a_packed = gpu.scratch_texture("matmul a", a_size)?;
            let b_packed = gpu.scratch_texture("matmul b", b_size)?;
            // 8 x 8 texels (or 4-row groups) per workgroup, one layer per z.
            let pack_groups = |s: [u32; 3], rows_per_invocation: u32| {
                [
                    s[0].div_ceil(8),
                    (s[1] / rows_per_invocation).div_ceil(8),
                    s[2],
                ]
            };
            // Records the packing dispatch that fills `texture` with `t` as `packing` says, and
            // the copy that can replace it. The batch decomposition's divisors are constants
            // (see `pack_base` in the shader).
            let mut pack = |label: &str,
                            t: &GpuTensor,
                            packing: &OperandPacking,
                            texture: &Arc<ScratchTexture>|
             -> Result<()> {
                let product = &packing.product;
                let (transposed, inner_div) = if packing.as_a {
                    (product.layout.trans_a(), product.a_inner_div)
                } else {
                    (product.layout.trans_b(), product.b_inner_div)
                };
                // With vec4 loads, an operand whose texels run across its contiguous dimension
                // is packed four texel rows per invocation.
                let vec4 = vec4_ok(product);
                let (entry, slot) = match (packing.as_a, vec4) {
                    (true, true) => ("matmul_pack_a_vec4", 5),
                    (true, false) => ("matmul_pack_a", 1),
                    (false, true) => ("matmul_pack_b_vec4", 6),
                    (false, false) => ("matmul_pack_b", 2),
                };
                let rows = if vec4 && transposed { 4 } else { 1 };
                let constants = Specialisation::default()
                    .with("TRANS_A", product.layout.trans_a() as u8)
                    .with("TRANS_B", product.layout.trans_b() as u8)
                    .with("PACK_BATCH_INNER", product.batch_inner as u32)
                    .with("PACK_INNER_DIV", inner_div as u32);
                let pipeline = gpu.pipeline(&key(entry, constants))?;
                let product_dims = gpu.uniform("matmul packing dims", &Dims::new(product));
                let copy = packing.copy_plan(t).map(|plan| TexelCopy {
                    buffer: t.buffer().clone(),
                    texture: texture.clone(),
                    plan,
                });
                copied.push(copy.is_some());
                copies.extend(copy);
                push(
                    label,
                    pipeline,
                    &[
                        (0, Bind::whole(&product_dims)),
                        (slot, t.bind()),
                        (7, texture.bind()),
                    ],
                    pack_groups(texture.size(), rows),
                )
            };
            pack("matmul pack a", a, &a_pack, &a_packed)?;
            if let Some((b, b_pack)) = &b_pack {
                pack("matmul pack b", b, b_pack, &b_packed)?;
            }
            // The multiply finds each batch entry's operands where the packing put them.
            let mut multiply_dims = Dims::new(spec);
            multiply_dims.a_tex_div = a_pack.tex_div as u32;
            multiply_dims.a_tex_step = a_pack.tex_step as u32;
            if let Some((_, p)) = &b_pack {
                multiply_dims.b_tex_div = p.tex_div as u32;
                multiply_dims.b_tex_step = p.tex_step as u32;
            }
            let dims = gpu.uniform("matmul dims", &multiply_dims);
            // Skipping C's blocks above the diagonal needs workgroups as wide as the 32-row block.
            let wg_x = if spec.triangle == Triangle::OutputLower {
                8
            } else {
                texture_workgroup_width(spec.n.div_ceil(4))
            };
            // An aligned C is written as vec4s by the same kernel compiled with the vec4 store
            // (its own module, whose epilogue bindings are the vec4 views 13..17).
            let c_vec4 = c_vec4_ok(spec, bias.is_some());
            writes_vec4 = c_vec4;
            let multiply = gpu.pipeline(&PipelineKey {
                family: if c_vec4 {
                    "matmul_texture_vec4"
                } else {
                    "matmul_texture"
                },
                entry: "matmul_texture",
                precision,
                constants: constants
                    .with("ROWS_WG_X", wg_x as u32)
                    .with("A_ALONG_M", layout.a_along_m as u8)
                    .with("B_ALONG_K", layout.b_along_k as u8),
            })?;
            let [bias_slot, c_slot, resid_slot, gelu_out_slot, gelu_in_slot] = if c_vec4 {
                [13, 14, 15, 16, 17]
            } else {
                [3, 4, 10, 11, 12]
            };
            push(
                "matmul",
                multiply,
                &[
                    (0, Bind::whole(&dims)),
                    (bias_slot, bias_buf),
                    (c_slot, c.bind()),
                    (resid_slot, resid_buf),
                    (gelu_out_slot, gelu_out),
                    (gelu_in_slot, gelu_in),
                    (8, a_packed.bind()),
                    (9, b_packed.bind()),
                ],
                [
                    groups(spec.n.div_ceil(4), wg_x),
                    groups(spec.m, TEXTURE_BLOCK_ROWS),
                    spec.batch as u32,
                ],
            )?;
        } else {
            let b = b.ok_or_else(|| {
                Error::shape(
                    "matmul",
                    "only the texture variant takes a packed B operand",
                )
            })?;
            let constants = match variant {
                MatmulVariant::Rows | MatmulVariant::RowsSubgroup => {
                    constants.with("ROWS_WG_X", ROWS_WG_X as u32)
                }
                _ => constants
                    .with("TILE_M", TILE_M as u32)
                    .with("TILE_N", TILE_N as u32)
                    .with("TILE_K", TILE_K as u32),
            };
            let pipeline = gpu.pipeline(&key(variant.entry(), constants))?;
            let dims = gpu.uniform("matmul dims", &Dims::new(spec));
            let mut entries = vec![
                (0, Bind::whole(&dims)),
                (3, bias_buf),
                (4, c.bind()),
                (10, resid_buf),
                (11, gelu_out),
                (12, gelu_in),
            ];
            match variant {
                MatmulVariant::TiledVec4 => entries.extend([(5, a.bind()), (6, b.bind())]),
                _ => entries.extend([(1, a.bind()), (2, b.bind())]),
            }
            let workgroups = match variant {
                MatmulVariant::Rows => [
                    groups(spec.n, ROWS_WG_X),
                    groups(spec.m, ROWS),
                    spec.batch as u32,
                ],
                MatmulVariant::RowsSubgroup | MatmulVariant::RowsSubgroupShuffle => [
                    groups(spec.n, SUBGROUP_BLOCK_COLS * ROWS_WG_X),
                    groups(spec.m, SUBGROUP_BLOCK_ROWS),
                    spec.batch as u32,
                ],
                _ => [
                    groups(spec.n, TILE_N),
                    groups(spec.m, TILE_M),
                    spec.batch as u32,
                ],
            };
            push("matmul", pipeline, &entries, workgroups)?;
        }
        copied.resize(dispatches.len(), false);
        Ok(Matmul {
            dispatches,
            copied,
            copies,
            copies_on: false,
            variant,
            spec: *spec,
            writes_vec4,
        })
    }

    /// Lets the texture variant fill its packed operands by buffer-to-texture copies where an
    /// operand's memory already has the packed layout (f32, not transposed, K a multiple of 32,
    /// 256-byte rows: X in X·Wᵀ, dY and W in dY·W, X in dYᵀ·X at the usual widths), instead of
    /// packing dispatches. A copy cannot be recorded inside a compute pass, so whoever records
    /// the product must then call [`Matmul::record_copies`] (outside any pass) right before
    /// [`Matmul::record`]: [`super::record_ops`] does. [`Matmul::run`] does it itself.
    pub fn allow_copies(&mut self) {
        self.copies_on = true;
    }

    /// Whether [`Matmul::record_copies`] records anything (copies allowed and possible).
    pub fn has_copies(&self) -> bool {
        self.copies_on && !self.copies.is_empty()
    }

    /// How many of the packed operands (0 to 2) a copy fills once copies are allowed.
    pub fn copyable_operands(&self) -> usize {
        self.copies.len()
    }

    /// How many buffer-to-texture copy commands [`Matmul::record_copies`] records: one per run
    /// of evenly spaced batch entries of each copied operand (see `CopyPlan`).
    pub fn copy_commands(&self) -> usize {
        self.copies.iter().map(|c| c.plan.runs.len()).sum()
    }

    /// Records the operand copies that replace packing dispatches (see
    /// [`Matmul::allow_copies`]); nothing unless they are allowed.
    pub fn record_copies(&self, encoder: &mut wgpu::CommandEncoder) {
        if self.copies_on {
            for c in &self.copies {
                c.record(encoder);
            }
        }
    }

    /// Adds the product's dispatches to `pass` (less the packing that
    /// [`Matmul::record_copies`] replaces, when copies are allowed).
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        for (d, &copied) in self.dispatches.iter().zip(&self.copied) {
            if copied && self.copies_on {
                continue;
            }
            pass.set_pipeline(&d.pipeline);
            pass.set_bind_group(0, &d.bind_group, &[]);
            let [x, y, z] = d.workgroups;
            pass.dispatch_workgroups(x, y, z);
            super::census::dispatch(d.bytes);
        }
        super::census::flops(self.spec.flops());
    }

    /// Records and submits the product on its own, copies included (does not wait).
    pub fn run(&self, gpu: &Gpu) -> Result<()> {
        gpu.submit("matmul", |encoder| {
            super::record_ops(encoder, "matmul", [self as &dyn super::Record])
        })
    }

    /// The variant in use.
    pub fn variant(&self) -> MatmulVariant {
        self.variant
    }

    /// Whether C (and the epilogue's operands) are written four columns at a time as vec4s: the
    /// texture variant does so when C is 4-aligned (N, C's leading dimension, offset and batch
    /// strides, and the bias offset, multiples of 4).
    pub fn writes_vec4(&self) -> bool {
        self.writes_vec4
    }

    /// The product's description.
    pub fn spec(&self) -> &MatmulSpec {
        &self.spec
    }
}

/// `c = alpha·op(a)·op(b) (+ bias) (+ c)` on the GPU, submitted at once (does not wait).
/// Same argument order as [`crate::cpu::matmul::matmul`].
pub fn matmul(
    gpu: &Gpu,
    c: &GpuTensor,
    a: &GpuTensor,
    b: &GpuTensor,
    bias: Option<&GpuTensor>,
    spec: &MatmulSpec,
) -> Result<()> {
    Matmul::new(gpu, c, a, b, bias, spec)?.run(gpu)
}

#[cfg(test)]
mod tests {
    use super::texture_workgroup_width;

    #[test]
    fn texture_workgroups_fit_the_column_groups() {
        // N = 384 (96 groups): 3 x 32, not 2 x 64; N = 65 (17 groups): 3 x 8, not 1 x 32.
        for (groups, width) in [
            (96, 32),
            (17, 8),
            (16, 16),
            (128, 64),
            (1, 8),
            (8, 8),
            (100, 8),
        ] {
            assert_eq!(
                texture_workgroup_width(groups),
                width,
                "{groups} column groups"
            );
        }
    }
}
