// RMS normalisation over the channels of each row of a (rows, channels) tensor, Llama style:
//
//     out = x * rstd * weight,   rstd = 1 / sqrt(mean(x^2) + eps)
//
// No mean is subtracted and there is no bias. Forward saves rstd (always f32, whatever T is) for
// the backward. Every sum is f32.
//
// Entry points (the same layouts as layernorm.wgsl):
//   rmsnorm_forward                 one workgroup per row; one tree reduction (sum of squares).
//   rmsnorm_backward_input          one workgroup per row: dinp needs one row sum, sum(g * n)
//                                   with g = dout * weight, n = x * rstd.
//   rmsnorm_backward_params_partial one invocation per (channel, block of rows): sums dout * n
//                                   over its block, in increasing row order.
//   rmsnorm_backward_params_final   one invocation per channel: sums the blocks in increasing
//                                   order into dweight.
// The two-stage parameter reduction fixes the order of every addition (no float atomics), so
// dweight is bit-identical from run to run.
//
//   rmsnorm_forward_rows,           one invocation per row, ROWS_WG rows per workgroup: no
//   rmsnorm_backward_input_rows     workgroup memory and no barriers, for CPU-backed adapters
//                                   (lavapipe). Sums run in increasing channel order.
//
// Rows are indexed by a 2-D grid of workgroups, row = wg.y * groups_x + wg.x (times ROWS_WG plus
// the invocation for the _rows entries).

struct Dims {
    rows: u32,
    channels: u32,
    // Workgroups along x of the row grid.
    groups_x: u32,
    // Rows summed by one invocation of the partial stage, and the number of such blocks.
    rows_per_block: u32,
    blocks: u32,
    eps: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> inp: array<T>;
@group(0) @binding(2) var<storage, read> weight: array<T>;
@group(0) @binding(3) var<storage, read_write> out: array<T>;
@group(0) @binding(4) var<storage, read_write> rstd_out: array<f32>;
@group(0) @binding(5) var<storage, read> dout: array<T>;
@group(0) @binding(6) var<storage, read> rstd_in: array<f32>;
@group(0) @binding(7) var<storage, read_write> dinp: array<T>;
// Scratch of the parameter reduction: blocks x channels partial sums of dweight.
@group(0) @binding(8) var<storage, read_write> partial_out: array<f32>;
@group(0) @binding(9) var<storage, read> partial_in: array<f32>;
@group(0) @binding(10) var<storage, read_write> dweight: array<T>;

// Invocations per row. Must be a power of two: the tree reduction halves it at each step.
override WG: u32 = 256u;
// Invocations per workgroup (along channels) of the two parameter stages.
override PARAM_WG: u32 = 64u;
// Rows per workgroup of the _rows entries.
override ROWS_WG: u32 = 64u;
override ACCUMULATE_INPUT: bool = false;
override ACCUMULATE_PARAMS: bool = false;

var<workgroup> red: array<f32, WG>;

// Sum of `v` over the workgroup, returned to every invocation, with a fixed pairing (i with
// i + s). Must be called in uniform control flow.
fn workgroup_sum(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if lid < s {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    let total = red[0];
    // Nobody may overwrite red[0] (next call) before everybody has read it.
    workgroupBarrier();
    return total;
}

// 1 / sqrt(v) for v = mean(x^2) + eps > 0, which is 0 only when mean(x^2) overflowed f32
// (|x| past ~1e19). Such a row has no f32 normalisation, and a rstd of 0 would turn it
// into a row of zeros that looks like data; NaN instead makes the loss and gradient checks
// report it. (A NaN literal is not a WGSL constant expression; its bit pattern is.)
fn rstd_of(v: f32) -> f32 {
    let r = inverseSqrt(v);
    return select(r, bitcast<f32>(0x7fc00000u), r == 0.0);
}

// The passes over one row, shared by both layouts. An invocation covers channels first,
// first + stride, ...: (lid, WG) when a workgroup shares the row, (0, 1) when it owns it.

fn row_sum_squares(base: u32, first: u32, stride: u32) -> f32 {
    var q = 0.0;
    for (var i = first; i < dims.channels; i += stride) {
        let x = f32(inp[base + i]);
        q += x * x;
    }
    return q;
}

fn row_normalise(base: u32, r: f32, first: u32, stride: u32) {
    for (var i = first; i < dims.channels; i += stride) {
        out[base + i] = T(f32(inp[base + i]) * r * f32(weight[i]));
    }
}

// sum(g * n), g = dout * weight, n = x * rstd.
fn row_gradient_sum(base: u32, r: f32, first: u32, stride: u32) -> f32 {
    var acc = 0.0;
    for (var i = first; i < dims.channels; i += stride) {
        let g = f32(dout[base + i]) * f32(weight[i]);
        acc += g * (f32(inp[base + i]) * r);
    }
    return acc;
}

// dinp = rstd * (g - n * mean(g * n)).
fn row_input_gradient(base: u32, r: f32, gn_mean: f32, first: u32, stride: u32) {
    for (var i = first; i < dims.channels; i += stride) {
        let g = f32(dout[base + i]) * f32(weight[i]);
        let n = f32(inp[base + i]) * r;
        var v = r * (g - n * gn_mean);
        if ACCUMULATE_INPUT {
            v += f32(dinp[base + i]);
        }
        dinp[base + i] = T(v);
    }
}

@compute @workgroup_size(WG)
fn rmsnorm_forward(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    // Uniform per workgroup, so returning here keeps the barriers below in uniform control flow.
    let row = wg.y * dims.groups_x + wg.x;
    if row >= dims.rows {
        return;
    }
    let base = row * dims.channels;
    let q = workgroup_sum(lid, row_sum_squares(base, lid, WG));
    let r = rstd_of(q / f32(dims.channels) + dims.eps);
    row_normalise(base, r, lid, WG);
    if lid == 0u {
        rstd_out[row] = r;
    }
}

@compute @workgroup_size(ROWS_WG)
fn rmsnorm_forward_rows(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = (wg.y * dims.groups_x + wg.x) * ROWS_WG + lid;
    if row >= dims.rows {
        return;
    }
    let base = row * dims.channels;
    let r = rstd_of(row_sum_squares(base, 0u, 1u) / f32(dims.channels) + dims.eps);
    row_normalise(base, r, 0u, 1u);
    rstd_out[row] = r;
}

@compute @workgroup_size(WG)
fn rmsnorm_backward_input(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wg.y * dims.groups_x + wg.x;
    if row >= dims.rows {
        return;
    }
    let base = row * dims.channels;
    let r = rstd_in[row];
    let s = workgroup_sum(lid, row_gradient_sum(base, r, lid, WG));
    row_input_gradient(base, r, s / f32(dims.channels), lid, WG);
}

@compute @workgroup_size(ROWS_WG)
fn rmsnorm_backward_input_rows(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = (wg.y * dims.groups_x + wg.x) * ROWS_WG + lid;
    if row >= dims.rows {
        return;
    }
    let base = row * dims.channels;
    let r = rstd_in[row];
    let s = row_gradient_sum(base, r, 0u, 1u);
    row_input_gradient(base, r, s / f32(dims.channels), 0u, 1u);
}

// Consecutive invocations own consecutive channels, so each row's loads coalesce.
@compute @workgroup_size(PARAM_WG)
fn rmsnorm_backward_params_partial(
    @builtin(global_invocation_id) gid: vec3<u32>,
) {
    let ch = gid.x;
    let block = gid.y;
    if ch >= dims.channels {
        return;
    }
    let c = dims.channels;
    let r0 = block * dims.rows_per_block;
    let r1 = min(r0 + dims.rows_per_block, dims.rows);
    var dw = 0.0;
    for (var r = r0; r < r1; r++) {
        let i = r * c + ch;
        dw += f32(dout[i]) * (f32(inp[i]) * rstd_in[r]);
    }
    partial_out[block * c + ch] = dw;
}

@compute @workgroup_size(PARAM_WG)
fn rmsnorm_backward_params_final(
    @builtin(global_invocation_id) gid: vec3<u32>,
) {
    let ch = gid.x;
    if ch >= dims.channels {
        return;
    }
    let c = dims.channels;
    var dw = 0.0;
    for (var b = 0u; b < dims.blocks; b++) {
        dw += partial_in[b * c + ch];
    }
    if ACCUMULATE_PARAMS {
        dw += f32(dweight[ch]);
    }
    dweight[ch] = T(dw);
}
