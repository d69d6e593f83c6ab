// Layer normalisation over the channels of each row of a (rows, channels) tensor, GPT-2 style:
//
//     out = (x - mean) * rstd * weight + bias,   rstd = 1 / sqrt(var + eps)   (biased variance)
//
// Forward saves mean and rstd (always f32, whatever T is) for the backward. Every sum is f32.
//
// Entry points:
//   layernorm_forward                 one workgroup per row; two tree reductions in workgroup
//                                     memory (mean, then squared deviations).
//   layernorm_backward_input          one workgroup per row: dinp needs two row sums,
//                                     sum(g) and sum(g * n) with g = dout * weight, n = normalised x.
//   layernorm_backward_params_partial one invocation per (channel, block of rows): sums
//                                     dout * n and dout over its block, in increasing row order.
//   layernorm_backward_params_final   one invocation per channel: sums the blocks in increasing
//                                     order into dweight and dbias.
// dweight and dbias reduce over every row. WGSL has no float atomics, and atomics would make the
// order (so the rounding) depend on scheduling anyway; the two-stage split above fixes the order
// of every addition, so the result is bit-identical from run to run, while the partial stage still
// gives a GPU (channels x blocks) invocations of work instead of only `channels`.
//
//   layernorm_forward_rows,           one invocation per row, ROWS_WG rows per workgroup: no
//   layernorm_backward_input_rows     workgroup memory and no barriers, for CPU-backed adapters
//                                     (lavapipe), where a barrier costs more than the whole
//                                     row's arithmetic. Sums run in increasing channel order.
//   ..._rows_vec4, ..._partial_vec4   the same with four channels per memory access, when the
//                                     channels are a multiple of 4: every element goes through
//                                     the same per-element helpers in the same order, so the
//                                     results are bit-identical to the scalar entries'.
//
// Rows are indexed by a 2-D grid of workgroups, row = wg.y * groups_x + wg.x (times ROWS_WG plus
// the invocation for the _rows entries), so that more rows than the adapter's 65535-per-dimension
// limit can be covered.

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
@group(0) @binding(3) var<storage, read> bias: array<T>;
@group(0) @binding(4) var<storage, read_write> out: array<T>;
@group(0) @binding(5) var<storage, read_write> mean_out: array<f32>;
@group(0) @binding(6) var<storage, read_write> rstd_out: array<f32>;
@group(0) @binding(7) var<storage, read> dout: array<T>;
@group(0) @binding(8) var<storage, read> mean_in: array<f32>;
@group(0) @binding(9) var<storage, read> rstd_in: array<f32>;
@group(0) @binding(10) var<storage, read_write> dinp: array<T>;
// Scratch of the parameter reduction: blocks x channels partial sums of dweight, then the same
// for dbias.
@group(0) @binding(11) var<storage, read_write> partial_out: array<f32>;
@group(0) @binding(12) var<storage, read> partial_in: array<f32>;
@group(0) @binding(13) var<storage, read_write> dweight: array<T>;
@group(0) @binding(14) var<storage, read_write> dbias: array<T>;
// The same tensors four channels at a time, for the _vec4 entries (channels a multiple of 4):
// on CPU-backed adapters every storage access is a loop over the SIMD lanes, so one vec4 access
// for four elements divides these kernels' dominant cost by four.
@group(0) @binding(15) var<storage, read> inp4: array<vec4<T>>;
@group(0) @binding(16) var<storage, read> weight4: array<vec4<T>>;
@group(0) @binding(17) var<storage, read> bias4: array<vec4<T>>;
@group(0) @binding(18) var<storage, read_write> out4: array<vec4<T>>;
@group(0) @binding(19) var<storage, read> dout4: array<vec4<T>>;
@group(0) @binding(20) var<storage, read_write> dinp4: array<vec4<T>>;

// Invocations per row. Must be a power of two: the tree reduction halves it at each step.
override WG: u32 = 256u;
// Invocations per workgroup (along channels) of the two parameter stages.
override PARAM_WG: u32 = 64u;
// Rows per workgroup of the _rows entries.
override ROWS_WG: u32 = 64u;
override ACCUMULATE_INPUT: bool = false;
override ACCUMULATE_PARAMS: bool = false;

var<workgroup> red: array<vec2<f32>, WG>;

// Sum of `v` over the workgroup, returned to every invocation. The pairing is fixed (i with
// i + s), so the result does not depend on scheduling. Must be called in uniform control flow.
fn workgroup_sum(lid: u32, v: vec2<f32>) -> vec2<f32> {
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

// 1 / sqrt(v) for v = variance + eps > 0, which is 0 only when the variance overflowed f32
// (|x - mean| past ~1e19). Such a row has no f32 normalisation, and a rstd of 0 would turn it
// into a row of `bias` that looks like data; NaN instead makes the loss and gradient checks
// report it. (A NaN literal is not a WGSL constant expression; its bit pattern is.)
fn rstd_of(v: f32) -> f32 {
    let r = inverseSqrt(v);
    return select(r, bitcast<f32>(0x7fc00000u), r == 0.0);
}

// The passes over one row, shared by both layouts. An invocation covers channels first,
// first + stride, ...: (lid, WG) when a workgroup shares the row, (0, 1) when it owns it.

fn row_sum(base: u32, first: u32, stride: u32) -> f32 {
    var s = 0.0;
    for (var i = first; i < dims.channels; i += stride) {
        s += f32(inp[base + i]);
    }
    return s;
}

// A second pass over the row rather than E[x^2] - m^2, which cancels catastrophically when |mean|
// is large against the spread.
fn row_squared_deviations(base: u32, m: f32, first: u32, stride: u32) -> f32 {
    var q = 0.0;
    for (var i = first; i < dims.channels; i += stride) {
        let d = f32(inp[base + i]) - m;
        q += d * d;
    }
    return q;
}

fn row_normalise(base: u32, m: f32, r: f32, first: u32, stride: u32) {
    for (var i = first; i < dims.channels; i += stride) {
        let n = (f32(inp[base + i]) - m) * r;
        out[base + i] = T(n * f32(weight[i]) + f32(bias[i]));
    }
}

// sum(g) and sum(g * n), g = dout * weight, n = (x - mean) * rstd.
fn row_gradient_sums(base: u32, m: f32, r: f32, first: u32, stride: u32) -> vec2<f32> {
    var acc = vec2<f32>(0.0);
    for (var i = first; i < dims.channels; i += stride) {
        let g = f32(dout[base + i]) * f32(weight[i]);
        let n = (f32(inp[base + i]) - m) * r;
        acc += vec2<f32>(g, g * n);
    }
    return acc;
}

// dinp = rstd * (g - mean(g) - n * mean(g * n)).
fn row_input_gradient(base: u32, m: f32, r: f32, means: vec2<f32>, first: u32, stride: u32) {
    for (var i = first; i < dims.channels; i += stride) {
        let g = f32(dout[base + i]) * f32(weight[i]);
        let n = (f32(inp[base + i]) - m) * r;
        var v = r * (g - means.x - n * means.y);
        if ACCUMULATE_INPUT {
            v += f32(dinp[base + i]);
        }
        dinp[base + i] = T(v);
    }
}

@compute @workgroup_size(WG)
fn layernorm_forward(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    // Uniform per workgroup, so returning here keeps the barriers below in uniform control flow.
    let row = wg.y * dims.groups_x + wg.x;
    if row >= dims.rows {
        return;
    }
    let c = f32(dims.channels);
    let base = row * dims.channels;
    // Strided by WG so that consecutive invocations read consecutive elements.
    let m = workgroup_sum(lid, vec2<f32>(row_sum(base, lid, WG), 0.0)).x / c;
    let q = workgroup_sum(lid, vec2<f32>(row_squared_deviations(base, m, lid, WG), 0.0)).x;
    let r = rstd_of(q / c + dims.eps);
    row_normalise(base, m, r, lid, WG);
    if lid == 0u {
        mean_out[row] = m;
        rstd_out[row] = r;
    }
}

@compute @workgroup_size(ROWS_WG)
fn layernorm_forward_rows(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = (wg.y * dims.groups_x + wg.x) * ROWS_WG + lid;
    if row >= dims.rows {
        return;
    }
    let c = f32(dims.channels);
    let base = row * dims.channels;
    let m = row_sum(base, 0u, 1u) / c;
    let r = rstd_of(row_squared_deviations(base, m, 0u, 1u) / c + dims.eps);
    row_normalise(base, m, r, 0u, 1u);
    mean_out[row] = m;
    rstd_out[row] = r;
}

@compute @workgroup_size(WG)
fn layernorm_backward_input(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wg.y * dims.groups_x + wg.x;
    if row >= dims.rows {
        return;
    }
    let base = row * dims.channels;
    let m = mean_in[row];
    let r = rstd_in[row];
    let sums = workgroup_sum(lid, row_gradient_sums(base, m, r, lid, WG));
    row_input_gradient(base, m, r, sums / f32(dims.channels), lid, WG);
}

@compute @workgroup_size(ROWS_WG)
fn layernorm_backward_input_rows(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = (wg.y * dims.groups_x + wg.x) * ROWS_WG + lid;
    if row >= dims.rows {
        return;
    }
    let base = row * dims.channels;
    let m = mean_in[row];
    let r = rstd_in[row];
    let sums = row_gradient_sums(base, m, r, 0u, 1u);
    row_input_gradient(base, m, r, sums / f32(dims.channels), 0u, 1u);
}

// Consecutive invocations own consecutive channels, so each row's loads coalesce.
@compute @workgroup_size(PARAM_WG)
fn layernorm_backward_params_partial(
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
    var db = 0.0;
    for (var r = r0; r < r1; r++) {
        let i = r * c + ch;
        let dy = f32(dout[i]);
        dw += dy * ((f32(inp[i]) - mean_in[r]) * rstd_in[r]);
        db += dy;
    }
    partial_out[block * c + ch] = dw;
    partial_out[(dims.blocks + block) * c + ch] = db;
}

@compute @workgroup_size(PARAM_WG)
fn layernorm_backward_params_final(
    @builtin(global_invocation_id) gid: vec3<u32>,
) {
    let ch = gid.x;
    if ch >= dims.channels {
        return;
    }
    let c = dims.channels;
    var dw = 0.0;
    var db = 0.0;
    for (var b = 0u; b < dims.blocks; b++) {
        dw += partial_in[b * c + ch];
        db += partial_in[(dims.blocks + b) * c + ch];
    }
    if ACCUMULATE_PARAMS {
        dw += f32(dweight[ch]);
        db += f32(dbias[ch]);
    }
    dweight[ch] = T(dw);
    dbias[ch] = T(db);
}

// ---------------------------------------------------------------------------------------------
// Four channels per memory access. The per-element steps are the scalar loops' bodies, applied to
// the components in increasing channel order.

fn sum_step(s: f32, x: f32) -> f32 {
    return s + x;
}

fn deviation_step(q: f32, x: f32, m: f32) -> f32 {
    let d = x - m;
    return q + d * d;
}

fn gradient_step(acc: vec2<f32>, dy: f32, w: f32, x: f32, m: f32, r: f32) -> vec2<f32> {
    let g = dy * w;
    let n = (x - m) * r;
    return acc + vec2<f32>(g, g * n);
}

fn input_gradient(dy: f32, w: f32, x: f32, m: f32, r: f32, means: vec2<f32>) -> f32 {
    let g = dy * w;
    let n = (x - m) * r;
    return r * (g - means.x - n * means.y);
}

@compute @workgroup_size(ROWS_WG)
fn layernorm_forward_rows_vec4(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = (wg.y * dims.groups_x + wg.x) * ROWS_WG + lid;
    if row >= dims.rows {
        return;
    }
    let c = f32(dims.channels);
    let quads = dims.channels / 4u;
    let base = row * quads;
    var s = 0.0;
    for (var i = 0u; i < quads; i++) {
        let x = vec4<f32>(inp4[base + i]);
        s = sum_step(sum_step(sum_step(sum_step(s, x.x), x.y), x.z), x.w);
    }
    let m = s / c;
    var q = 0.0;
    for (var i = 0u; i < quads; i++) {
        let x = vec4<f32>(inp4[base + i]);
        q = deviation_step(deviation_step(deviation_step(deviation_step(q, x.x, m), x.y, m), x.z, m), x.w, m);
    }
    let r = rstd_of(q / c + dims.eps);
    for (var i = 0u; i < quads; i++) {
        let n = (vec4<f32>(inp4[base + i]) - m) * r;
        out4[base + i] = vec4<T>(n * vec4<f32>(weight4[i]) + vec4<f32>(bias4[i]));
    }
    mean_out[row] = m;
    rstd_out[row] = r;
}

@compute @workgroup_size(ROWS_WG)
fn layernorm_backward_input_rows_vec4(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = (wg.y * dims.groups_x + wg.x) * ROWS_WG + lid;
    if row >= dims.rows {
        return;
    }
    let quads = dims.channels / 4u;
    let base = row * quads;
    let m = mean_in[row];
    let r = rstd_in[row];
    var acc = vec2<f32>(0.0);
    for (var i = 0u; i < quads; i++) {
        let dy = vec4<f32>(dout4[base + i]);
        let w = vec4<f32>(weight4[i]);
        let x = vec4<f32>(inp4[base + i]);
        acc = gradient_step(acc, dy.x, w.x, x.x, m, r);
        acc = gradient_step(acc, dy.y, w.y, x.y, m, r);
        acc = gradient_step(acc, dy.z, w.z, x.z, m, r);
        acc = gradient_step(acc, dy.w, w.w, x.w, m, r);
    }
    let means = acc / f32(dims.channels);
    for (var i = 0u; i < quads; i++) {
        let dy = vec4<f32>(dout4[base + i]);
        let w = vec4<f32>(weight4[i]);
        let x = vec4<f32>(inp4[base + i]);
        var v = vec4<f32>(
            input_gradient(dy.x, w.x, x.x, m, r, means),
            input_gradient(dy.y, w.y, x.y, m, r, means),
            input_gradient(dy.z, w.z, x.z, m, r, means),
            input_gradient(dy.w, w.w, x.w, m, r, means),
        );
        if ACCUMULATE_INPUT {
            v += vec4<f32>(dinp4[base + i]);
        }
        dinp4[base + i] = vec4<T>(v);
    }
}

// Four consecutive channels per invocation.
@compute @workgroup_size(PARAM_WG)
fn layernorm_backward_params_partial_vec4(
    @builtin(global_invocation_id) gid: vec3<u32>,
) {
    let quads = dims.channels / 4u;
    let q = gid.x;
    let block = gid.y;
    if q >= quads {
        return;
    }
    let r0 = block * dims.rows_per_block;
    let r1 = min(r0 + dims.rows_per_block, dims.rows);
    var dw = vec4<f32>(0.0);
    var db = vec4<f32>(0.0);
    for (var r = r0; r < r1; r++) {
        let i = r * quads + q;
        let dy = vec4<f32>(dout4[i]);
        dw += dy * ((vec4<f32>(inp4[i]) - mean_in[r]) * rstd_in[r]);
        db += dy;
    }
    let c = dims.channels;
    let ch = 4u * q;
    for (var j = 0u; j < 4u; j++) {
        partial_out[block * c + ch + j] = dw[j];
        partial_out[(dims.blocks + block) * c + ch + j] = db[j];
    }
}
