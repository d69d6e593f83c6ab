//! How the fused attention kernels (shaders/flash_attention.wgsl) split their work: the head-size
//! class (which module), the lanes per row, the staged tile's rows, and the checks that a choice
//! fits the adapter's workgroup memory and, on llvmpipe, its loop budget.
//!
//! The choice is a fixed rule of the shape and the adapter, never a timing: the lanes of a row
//! add their partial sums in lane order, so another split changes the rounding, and a resumed
//! run must replay the same arithmetic.

use super::loop_budget_ok;
use crate::gpu::Gpu;
use crate::ops::GroupedAttentionShape;
use crate::{Error, Result};

/// Invocations per workgroup of every fused attention kernel (the shader's `WG`).
pub(crate) const WORKGROUP: usize = 64;

/// Keys one lane scores per staged tile (the shader's `MAX_KEYS_PER_LANE`).
const MAX_KEYS_PER_LANE: usize = 16;

/// The largest head the fused kernels take (the widest head-size class).
pub const MAX_HEAD_DIM: usize = 128;

/// Head-size classes: the largest head of each and its module. A head is zero-padded to its
/// class, so a class is a compile-time row length (`HV` vec4s) that GPU compilers unroll.
const HEAD_CLASSES: [(usize, &str); 4] = [
    (16, "flash_attention_16"),
    (32, "flash_attention_32"),
    (64, "flash_attention_64"),
    (128, "flash_attention_128"),
];

/// Lanes per row tried, smallest first. Two lanes (32 rows per workgroup, so each staged key is
/// read by 32 query rows) is the default: on lavapipe it ran 1.6 times faster than four lanes
/// and 2.8 times faster than sixteen at T = 1024 (forward), and it still gives a batch-1
/// sequence of 1024 tokens with 6 heads 192 workgroups. More lanes are used only where one
/// lane's walk would pass llvmpipe's loop budget.
const SPLITS: [usize; 4] = [2, 4, 8, 16];

/// The module of `head_dim`'s class and its `HV`, or an error past [`MAX_HEAD_DIM`].
pub(crate) fn head_class(head_dim: usize) -> Result<(&'static str, usize)> {
    HEAD_CLASSES
        .into_iter()
        .find(|&(max, _)| head_dim <= max)
        .map(|(max, module)| (module, max / 4))
        .ok_or_else(|| {
            Error::shape(
                "flash attention",
                format!(
                    "head_dim {head_dim} exceeds the fused kernels' {MAX_HEAD_DIM}; use the \
                     reference attention (model.attention_kernel = \"reference\")"
                ),
            )
        })
}

/// The three tiled kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FlashPass {
    /// `flash_forward`: query rows; keys and values staged.
    Forward,
    /// `flash_backward_dq`: query rows; keys and values staged.
    Dq,
    /// `flash_backward_dkdv`: key rows; queries and output gradients staged.
    DkDv,
}

/// One kernel's split of the work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FlashTiling {
    /// Shader module (head-size class).
    pub module: &'static str,
    /// vec4s per (padded) head row, the module's `HV`.
    pub hv: usize,
    /// Lanes per row.
    pub split: usize,
    /// Rows of the staged tile.
    pub tile: usize,
    /// vec4s between staged rows: `hv` made odd, so that lanes reading different rows of a tile
    /// start in different memory banks.
    pub stride: usize,
}

impl FlashTiling {
    /// The tiling of `pass` for `shape` on `gpu`: the smallest split (from [`SPLITS`]) whose
    /// largest tile fits the workgroup memory and the loop budget. `split` forces one (tests and
    /// benchmarks).
    pub fn plan(
        gpu: &Gpu,
        shape: &GroupedAttentionShape,
        pass: FlashPass,
        split: Option<usize>,
    ) -> Result<FlashTiling> {
        let (module, hv) = head_class(shape.head_dim)?;
        let memory = gpu.capabilities().limits.max_compute_workgroup_storage_size as usize;
        let splits: Vec<usize> = match split {
            Some(s) => vec![s],
            None => SPLITS.to_vec(),
        };
        for &split in &splits {
            if split == 0 || !WORKGROUP.is_multiple_of(split) {
                return Err(Error::shape(
                    "flash attention",
                    format!("{split} lanes per row do not divide the workgroup of {WORKGROUP}"),
                ));
            }
            let fits = [64, 32, 16, 8, 4]
                .into_iter()
                .map(|tile| FlashTiling {
                    module,
                    hv,
                    split,
                    tile,
                    stride: hv | 1,
                })
                .find(|t| t.valid(pass) && t.workgroup_bytes(pass) <= memory);
            if let Some(t) = fits
                && loop_budget_ok(gpu, t.loop_iterations(shape, pass))
            {
                return Ok(t);
            }
        }
        let lanes = match split {
            Some(s) => format!("{s} lanes per row"),
            None => format!("up to {} lanes per row", SPLITS[SPLITS.len() - 1]),
        };
        Err(Error::shape(
            "flash attention",
            format!(
                "{shape:?} does not fit the fused {pass:?} kernel on this adapter with {lanes} \
                 (workgroup memory, or llvmpipe's loop budget for long sequences); use the \
                 reference attention (model.attention_kernel = \"reference\")"
            ),
        ))
    }

    /// Rows (query rows, or key rows for dK/dV) one workgroup owns.
    pub fn rows_per_workgroup(&self) -> usize {
        WORKGROUP / self.split
    }

    /// The shader's constraints: a lane scores at most [`MAX_KEYS_PER_LANE`] keys of a tile, no
    /// lane is without a row of the tile, and the two staging tiles hold at least one vec4 of
    /// every lane for the merge.
    fn valid(&self, pass: FlashPass) -> bool {
        let keys_ok = pass == FlashPass::DkDv || self.tile / self.split <= MAX_KEYS_PER_LANE;
        keys_ok && self.tile >= self.split && 2 * self.tile * self.stride >= WORKGROUP
    }

    /// Workgroup memory the pass's entry point declares.
    pub fn workgroup_bytes(&self, pass: FlashPass) -> usize {
        let tiles = 2 * self.tile * self.stride * 16;
        match pass {
            // lane_m and lane_l.
            FlashPass::Forward => tiles + 2 * WORKGROUP * 4,
            FlashPass::Dq => tiles,
            // tile_s, own_k and own_v.
            FlashPass::DkDv => {
                tiles + 2 * self.tile * 4 + 2 * self.rows_per_workgroup() * self.stride * 16
            }
        }
    }

    /// An upper bound on the loop iterations one invocation of the pass runs (llvmpipe's budget
    /// counts them all), following the shader's loops: the staging of each tile, the lane's
    /// keys (or queries) in it with their loops over the head row, the merge.
    pub fn loop_iterations(&self, shape: &GroupedAttentionShape, pass: FlashPass) -> usize {
        let (hv, split, tile) = (self.hv, self.split, self.tile);
        let tiles = shape.seq.div_ceil(tile);
        let stage = (tile * hv).div_ceil(WORKGROUP);
        let per_lane = tile.div_ceil(split);
        let merge_chunks = 2 * tile * self.stride / WORKGROUP;
        let merge = hv.div_ceil(merge_chunks)
            * (1 + merge_chunks + merge_chunks.div_ceil(split) * (split + 1));
        // Outer-loop iterations and the fixed work around the loops.
        let slack = 64;
        match pass {
            FlashPass::Forward => {
                hv + tiles * (1 + stage + 2 * per_lane * (hv + 1) + hv) + 2 * split + merge + slack
            }
            FlashPass::Dq => hv + tiles * (1 + stage + per_lane * (2 * hv + 1)) + merge + slack,
            FlashPass::DkDv => {
                let own = (self.rows_per_workgroup() * hv).div_ceil(WORKGROUP);
                let staged = stage + tile.div_ceil(WORKGROUP);
                own + shape.group() * tiles * (1 + staged + per_lane * (2 * hv + 1))
                    + 2 * merge
                    + slack
            }
        }
    }
}
