//! GPU kernels: one module per WGSL family, each with the shader's specialisation, bind-group
//! wiring, dispatch-size maths and a `record` call that adds its dispatches to a compute pass.

pub mod activation;
pub mod adamw;
pub mod attention;
pub mod census;
mod checks;
pub mod crossentropy;
pub mod decode;
pub mod dropout;
pub mod embedding;
pub mod flash_attention;
mod flash_tiling;
pub mod gradnorm;
pub mod layernorm;
pub mod lossscale;
pub mod matmul;
pub mod moe;
pub mod quant;
pub mod residual;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;
pub mod tune;

use crate::gpu::{Bind, DType, Gpu, GpuTensor, PipelineKey, Specialisation};

/// How a row-wise kernel (a reduction over each row, then an elementwise pass) is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowKernel {
    /// One workgroup per row, reduced in workgroup memory: coalesced loads, what GPUs want.
    Workgroup,
    /// One invocation per row, no workgroup memory and no barriers: what CPU-backed adapters
    /// (lavapipe) want, where a barrier costs more than a row's arithmetic.
    Invocation,
}

impl RowKernel {
    /// Both layouts.
    pub const ALL: [RowKernel; 2] = [RowKernel::Workgroup, RowKernel::Invocation];

    /// The layout for `gpu`'s kind of adapter and a kernel that walks each row `passes` times
    /// over `row_len` elements: per invocation on software adapters (while the walk fits the
    /// loop budget, see [`loop_budget_ok`]), per workgroup elsewhere.
    pub fn for_rows(gpu: &Gpu, row_len: usize, passes: usize) -> RowKernel {
        if gpu.capabilities().adapter.software
            && RowKernel::Invocation.supports(gpu, row_len, passes)
        {
            RowKernel::Invocation
        } else {
            RowKernel::Workgroup
        }
    }

    /// Whether this layout computes a kernel walking each row `passes` times over `row_len`
    /// elements correctly on `gpu` (one invocation per row is limited by the loop budget).
    pub fn supports(self, gpu: &Gpu, row_len: usize, passes: usize) -> bool {
        match self {
            RowKernel::Workgroup => true,
            RowKernel::Invocation => loop_budget_ok(gpu, row_len.saturating_mul(passes)),
        }
    }

    /// [`RowKernel::supports`] as an error for `op` naming the row length and the way out.
    pub(crate) fn check(
        self,
        gpu: &Gpu,
        op: &'static str,
        row_len: usize,
        passes: usize,
    ) -> Result<()> {
        if self.supports(gpu, row_len, passes) {
            return Ok(());
        }
        Err(Error::shape(
            op,
            format!(
                "{self:?} rows of {row_len} exceed this adapter's loop budget; use \
                 RowKernel::for_rows"
            ),
        ))
    }

    /// Workgroups that cover `rows` rows in this layout.
    pub(crate) fn workgroups(self, rows: usize) -> usize {
        match self {
            RowKernel::Workgroup => rows,
            RowKernel::Invocation => rows.div_ceil(ROWS_PER_WORKGROUP),
        }
    }

    /// The entry point and specialisation in this layout: `workgroup` as given, or the
    /// one-invocation-per-row entry `rows_entry` with its `ROWS_WG`.
    pub(crate) fn entry(
        self,
        workgroup: (&'static str, Specialisation),
        rows_entry: &'static str,
    ) -> (&'static str, Specialisation) {
        match self {
            RowKernel::Workgroup => workgroup,
            RowKernel::Invocation => (
                rows_entry,
                Specialisation::default().with("ROWS_WG", ROWS_PER_WORKGROUP as u32),
            ),
        }
    }
}

/// Rows per workgroup of the one-invocation-per-row layout (`ROWS_WG` in the shaders).
const ROWS_PER_WORKGROUP: usize = 64;

/// Loop iterations one shader invocation may run in total on llvmpipe (lavapipe): gallivm guards
/// against infinite loops with one counter per invocation, shared by all its loops, and leaves
/// every loop once 65535 iterations have run, silently, so a longer kernel computes a wrong
/// result. (Measured: a tiled matmul summed 37445 of K = 40000 terms, a one-invocation-per-row
/// cross-entropy wrote 15277 of 50257 gradients after a first pass of 50257.)
pub const LLVMPIPE_LOOP_BUDGET: usize = 65_535;

/// Whether `iterations` loop iterations per invocation (an upper estimate, with what the kernel
/// spends outside its main loops) run to completion on `gpu`: always, except past
/// [`LLVMPIPE_LOOP_BUDGET`] on llvmpipe.
pub fn loop_budget_ok(gpu: &Gpu, iterations: usize) -> bool {
    let name = gpu.capabilities().adapter.name.to_ascii_lowercase();
    !name.contains("llvmpipe") || iterations.saturating_add(256) <= LLVMPIPE_LOOP_BUDGET
}

/// Anything prepared once that adds its dispatches to a compute pass: what a step plan is a list
/// of.
pub trait Record {
    /// Adds the dispatches to `pass`.
    fn record_into(&self, pass: &mut wgpu::ComputePass<'_>);
    /// The op's type, as `module::Type` (profiles group by it).
    fn op_name(&self) -> &'static str;
    /// Lets the op replace dispatches by copies that must be recorded outside a compute pass
    /// ([`Record::record_copies`]); for recorders that go through [`record_ops`]. Only the
    /// matmul's texture variant has any ([`matmul::Matmul::allow_copies`]).
    fn allow_copies(&mut self) {}
    /// Whether [`Record::record_copies`] records anything.
    fn has_copies(&self) -> bool {
        false
    }
    /// Records the copies that must run right before the op's dispatches, outside any pass.
    fn record_copies(&self, _encoder: &mut wgpu::CommandEncoder) {}
    /// The parts of an op whose copies must sit between its own dispatches (attention's
    /// products read what its softmax wrote), in recording order; empty for an op recorded
    /// whole. [`record_ops`] records an op with parts part by part, each with its copies.
    fn parts(&self) -> Vec<&dyn Record> {
        Vec::new()
    }
}

/// `op`'s parts, recursively, in recording order: the units [`record_ops`] records (the op
/// itself when it has no parts).
pub fn leaf_parts(op: &dyn Record) -> Vec<&dyn Record> {
    let parts = op.parts();
    if parts.is_empty() {
        return vec![op];
    }
    parts.into_iter().flat_map(leaf_parts).collect()
}

/// Records `ops` in order into `encoder`: their dispatches in compute passes labelled `label`,
/// a pass ending wherever an op (or a part of one, [`Record::parts`]) needs copies first (which
/// wgpu only allows between passes).
pub fn record_ops<'a>(
    encoder: &mut wgpu::CommandEncoder,
    label: &str,
    ops: impl IntoIterator<Item = &'a dyn Record>,
) {
    let mut pass: Option<wgpu::ComputePass<'static>> = None;
    for op in ops.into_iter().flat_map(leaf_parts) {
        if op.has_copies() {
            // Ends the open pass, if any.
            pass = None;
            op.record_copies(encoder);
        }
        let pass = pass.get_or_insert_with(|| {
            encoder
                .begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some(label),
                    timestamp_writes: None,
                })
                .forget_lifetime()
        });
        op.record_into(pass);
    }
}

impl Record for Dispatch {
    fn record_into(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.record(pass)
    }
    fn op_name(&self) -> &'static str {
        "kernels::Dispatch"
    }
}

impl Record for matmul::Matmul {
    fn record_into(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.record(pass)
    }
    fn op_name(&self) -> &'static str {
        "matmul::Matmul"
    }
    fn allow_copies(&mut self) {
        matmul::Matmul::allow_copies(self)
    }
    fn has_copies(&self) -> bool {
        matmul::Matmul::has_copies(self)
    }
    fn record_copies(&self, encoder: &mut wgpu::CommandEncoder) {
        matmul::Matmul::record_copies(self, encoder)
    }
}

macro_rules! impl_record {
    ($($t:ty),* $(,)?) => {
        $(impl Record for $t {
            fn record_into(&self, pass: &mut wgpu::ComputePass<'_>) {
                self.record(pass)
            }
            fn op_name(&self) -> &'static str {
                stringify!($t)
            }
        })*
    };
}

impl_record!(
    activation::GeluForward,
    activation::GeluBackward,
    adamw::AdamW,
    lossscale::LossScaler,
    dropout::Dropout,
    decode::EmbedOne,
    decode::AttendOne,
    flash_attention::FlashAttentionForward,
    flash_attention::FlashAttentionBackward,
    crossentropy::CrossEntropy,
    embedding::EmbeddingForward,
    embedding::EmbeddingBackward,
    gradnorm::GradNorm,
    layernorm::LayerNormForward,
    layernorm::LayerNormBackward,
    moe::MoeRouting,
    moe::MoeGather,
    moe::MoeCombine,
    moe::MoeCombineBackward,
    moe::MoeGatherBackward,
    moe::MoeRouteBackward,
    moe::MoeLosses,
    quant::QMatmul,
    quant::QEmbedding,
    residual::ResidualForward,
    residual::AddInplace,
    rmsnorm::RmsNormForward,
    rmsnorm::RmsNormBackward,
    rope::Rope,
    swiglu::SwiGluForward,
    swiglu::SwiGluBackward,
);

use crate::{Error, Precision, Result};
use std::sync::Arc;

/// The precision of a float tensor (u32 tensors are rejected).
pub(crate) fn float_precision(op: &'static str, t: &GpuTensor) -> Result<Precision> {
    match t.dtype() {
        DType::F16 => Ok(Precision::F16),
        DType::F32 => Ok(Precision::F32),
        DType::U32 => Err(Error::shape(
            op,
            format!("tensor {} is u32; a float tensor is needed", t.label()),
        )),
    }
}

/// Checks that every tensor has the same float precision and returns it.
pub(crate) fn common_precision(op: &'static str, tensors: &[&GpuTensor]) -> Result<Precision> {
    let p = float_precision(op, tensors[0])?;
    for t in &tensors[1..] {
        if float_precision(op, t)? != p {
            return Err(Error::shape(
                op,
                format!(
                    "tensors must share one precision: {} is {:?} but {} is {:?}",
                    tensors[0].label(),
                    tensors[0].dtype(),
                    t.label(),
                    t.dtype()
                ),
            ));
        }
    }
    Ok(p)
}

/// Workgroups needed to cover `n` items with groups of `per`.
pub(crate) fn groups(n: usize, per: usize) -> u32 {
    n.div_ceil(per) as u32
}

/// A grid of at least `groups` workgroups within the adapter's per-dimension limit: 1-D while it
/// fits, otherwise 2-D with the x extent balanced so that fewer than `y` workgroups are spare.
/// Kernels recover the linear workgroup index as `wg.y * grid[0] + wg.x` and bounds-check it.
pub(crate) fn grid(gpu: &Gpu, op: &'static str, groups: usize) -> Result<[u32; 3]> {
    let max = gpu
        .capabilities()
        .limits
        .max_compute_workgroups_per_dimension as usize;
    let y = groups.div_ceil(max).max(1);
    let x = groups.div_ceil(y).max(1);
    if y > max {
        return Err(Error::shape(
            op,
            format!("{groups} workgroups exceed the adapter's {max} × {max} grid"),
        ));
    }
    Ok([x as u32, y as u32, 1])
}

/// Checks that a tensor is f32 whatever the storage precision (saved statistics are).
pub(crate) fn expect_f32(op: &'static str, t: &GpuTensor) -> Result<()> {
    if t.dtype() != DType::F32 {
        return Err(Error::shape(
            op,
            format!(
                "tensor {} is {:?}; it must be F32 whatever the storage precision",
                t.label(),
                t.dtype()
            ),
        ));
    }
    Ok(())
}

/// Checks that no tensor the op writes is also passed in another role: wgpu forbids binding one
/// buffer as writable storage twice or as both read and writable in a dispatch.
pub(crate) fn distinct(op: &'static str, written: &[&GpuTensor], all: &[&GpuTensor]) -> Result<()> {
    for w in written {
        if all.iter().filter(|t| std::ptr::eq(**t, *w)).count() > 1 {
            return Err(Error::shape(
                op,
                format!(
                    "tensor {} is written and also passed as another operand; use separate tensors",
                    w.label()
                ),
            ));
        }
    }
    Ok(())
}

/// One compiled dispatch of a family's entry point: pipeline, bound buffers and workgroup counts.
pub(crate) struct Dispatch {
    pipeline: Arc<wgpu::ComputePipeline>,
    bind_group: wgpu::BindGroup,
    workgroups: [u32; 3],
    /// Bytes bound, for the census.
    bytes: u64,
}

impl Dispatch {
    pub(crate) fn new(
        gpu: &Gpu,
        family: &'static str,
        entry: &'static str,
        precision: Precision,
        constants: Specialisation,
        buffers: &[(u32, Bind<'_>)],
        workgroups: [u32; 3],
    ) -> Result<Self> {
        let pipeline = gpu.pipeline(&PipelineKey {
            family,
            entry,
            precision,
            constants,
        })?;
        let bind_group = gpu.bind_group(entry, &pipeline, buffers);
        Ok(Dispatch {
            pipeline,
            bind_group,
            workgroups,
            bytes: census::bound_bytes(buffers),
        })
    }

    pub(crate) fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.bind_group, &[]);
        let [x, y, z] = self.workgroups;
        pass.dispatch_workgroups(x, y, z);
        census::dispatch(self.bytes);
    }
}

/// Invocations per workgroup of the element-wise kernels (the shaders' `WG`, set explicitly so
/// the dispatch maths and the shader cannot drift apart).
pub(crate) const ELEMENTWISE_WG: usize = 256;

/// The uniform block `Dims` of the element-wise shaders.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct ElementwiseDims {
    n: u32,
    groups_x: u32,
    _pad0: u32,
    _pad1: u32,
}

/// A dispatch of one invocation per element over `n` elements, on a 1-D grid or, past the
/// adapter's per-dimension limit, a 2-D one. `buffers` are the entry's storage bindings; the
/// uniform goes to binding 0.
#[allow(clippy::too_many_arguments)]
pub(crate) fn elementwise_dispatch(
    gpu: &Gpu,
    op: &'static str,
    family: &'static str,
    entry: &'static str,
    precision: Precision,
    constants: Specialisation,
    n: usize,
    buffers: &[(u32, Bind<'_>)],
) -> Result<Dispatch> {
    let workgroups = grid(gpu, op, n.div_ceil(ELEMENTWISE_WG))?;
    let dims = gpu.uniform(
        entry,
        &ElementwiseDims {
            n: n as u32,
            groups_x: workgroups[0],
            _pad0: 0,
            _pad1: 0,
        },
    );
    let mut entries = vec![(0, Bind::whole(&dims))];
    entries.extend_from_slice(buffers);
    Dispatch::new(
        gpu,
        family,
        entry,
        precision,
        constants.with("WG", ELEMENTWISE_WG as u32),
        &entries,
        workgroups,
    )
}
