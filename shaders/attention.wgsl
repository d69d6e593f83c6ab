// Causal softmax for attention: the part of causal self-attention that is not a matmul.
//
// The products (scores = q·kᵀ·scale, out = P·v and the four of the backward) run on the matmul
// family, addressing each (batch, head) block inside the (B, T, 3C) qkv buffer in place. These
// kernels take one row of the (B·n_head·T, T) score matrix per workgroup (the _rows entries: per
// invocation, ROWS_WG rows per workgroup, with no workgroup memory and no barriers, for CPU-backed
// adapters such as lavapipe where barriers dominate). Row r is query position
// t = r mod T, which may attend to keys 0..=t: the causal mask is applied here, by position,
// rather than by adding -inf to the scores.
//
// T (the storage type) comes from the prelude; all arithmetic is f32.

struct Params {
    // Number of rows (B · n_head · T).
    rows: u32,
    // Row length and the sequence length T.
    seq: u32,
    // Workgroups along x in the dispatch; rows beyond 65535 continue along y.
    groups_x: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
// Forward: scores in, probabilities out (in place).
@group(0) @binding(1) var<storage, read_write> scores: array<T>;
// Backward: the forward's probabilities.
@group(0) @binding(2) var<storage, read> probs: array<T>;
// Backward: dL/dP in, dL/dS out (in place), S being the scaled scores.
@group(0) @binding(3) var<storage, read_write> dprobs: array<T>;

override WG: u32 = 128u;
override ROWS_WG: u32 = 64u;

var<workgroup> partial: array<f32, WG>;

// Tree reductions over the workgroup; every invocation gets the result.
fn workgroup_max(lid: u32, v: f32) -> f32 {
    partial[lid] = v;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        if lid < stride {
            partial[lid] = max(partial[lid], partial[lid + stride]);
        }
        workgroupBarrier();
    }
    let r = partial[0];
    workgroupBarrier();
    return r;
}

fn workgroup_sum(lid: u32, v: f32) -> f32 {
    partial[lid] = v;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        if lid < stride {
            partial[lid] += partial[lid + stride];
        }
        workgroupBarrier();
    }
    let r = partial[0];
    workgroupBarrier();
    return r;
}

// The passes over one row, shared by both layouts. Row r attends to the first `live` keys; an
// invocation covers positions first, first + stride, ...: (lid, WG) when a workgroup shares the
// row, (0, 1) when it owns it.

fn row_max(base: u32, live: u32, first: u32, stride: u32) -> f32 {
    var m = -3.402823e38;
    for (var s = first; s < live; s += stride) {
        m = max(m, f32(scores[base + s]));
    }
    return m;
}

fn row_exp_sum(base: u32, live: u32, m: f32, first: u32, stride: u32) -> f32 {
    var sum = 0.0;
    for (var s = first; s < live; s += stride) {
        sum += exp(f32(scores[base + s]) - m);
    }
    return sum;
}

// Probabilities in place, zero past `live`. `inv` is 1 / the row's sum of exponentials.
fn row_probabilities(base: u32, live: u32, m: f32, inv: f32, first: u32, stride: u32) {
    for (var s = first; s < params.seq; s += stride) {
        var p = 0.0;
        if s < live {
            p = exp(f32(scores[base + s]) - m) * inv;
        }
        scores[base + s] = T(p);
    }
}

fn row_dot(base: u32, live: u32, first: u32, stride: u32) -> f32 {
    var dot = 0.0;
    for (var s = first; s < live; s += stride) {
        dot += f32(probs[base + s]) * f32(dprobs[base + s]);
    }
    return dot;
}

// dS = P * (dP - dot), in place in dprobs, zero past `live`.
fn row_score_gradient(base: u32, live: u32, dot: f32, first: u32, stride: u32) {
    for (var s = first; s < params.seq; s += stride) {
        var d = 0.0;
        if s < live {
            d = f32(probs[base + s]) * (f32(dprobs[base + s]) - dot);
        }
        dprobs[base + s] = T(d);
    }
}

@compute @workgroup_size(WG, 1, 1)
fn softmax_causal_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wg.x + wg.y * params.groups_x;
    // Whole workgroups leave together, so the barriers below stay uniform.
    if row >= params.rows {
        return;
    }
    let base = row * params.seq;
    let live = row % params.seq + 1u;
    let m = workgroup_max(lid, row_max(base, live, lid, WG));
    // live >= 1 and the maximum term is exp(0) = 1, so the sum is >= 1.
    let inv = 1.0 / workgroup_sum(lid, row_exp_sum(base, live, m, lid, WG));
    row_probabilities(base, live, m, inv, lid, WG);
}

@compute @workgroup_size(WG, 1, 1)
fn softmax_causal_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wg.x + wg.y * params.groups_x;
    if row >= params.rows {
        return;
    }
    let base = row * params.seq;
    let live = row % params.seq + 1u;
    let dot = workgroup_sum(lid, row_dot(base, live, lid, WG));
    row_score_gradient(base, live, dot, lid, WG);
}

@compute @workgroup_size(ROWS_WG, 1, 1)
fn softmax_causal_forward_rows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = (wg.x + wg.y * params.groups_x) * ROWS_WG + lid;
    if row >= params.rows {
        return;
    }
    let base = row * params.seq;
    let live = row % params.seq + 1u;
    let m = row_max(base, live, 0u, 1u);
    let inv = 1.0 / row_exp_sum(base, live, m, 0u, 1u);
    row_probabilities(base, live, m, inv, 0u, 1u);
}

@compute @workgroup_size(ROWS_WG, 1, 1)
fn softmax_causal_backward_rows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = (wg.x + wg.y * params.groups_x) * ROWS_WG + lid;
    if row >= params.rows {
        return;
    }
    let base = row * params.seq;
    let live = row % params.seq + 1u;
    row_score_gradient(base, live, row_dot(base, live, 0u, 1u), 0u, 1u);
}

// The one-invocation-per-row kernels four positions at a time, for T a multiple of 4 (rows then
// start on vec4 boundaries): on a CPU-backed adapter every storage access is a loop over the
// SIMD lanes, and a vec4 access makes one trip for four elements. The arithmetic is the scalar
// kernels', element by element in the same order (positions past `live` are masked out of the
// maximum and the sums), so the results are bit-identical.
@group(0) @binding(4) var<storage, read_write> scores4: array<vec4<T>>;
@group(0) @binding(5) var<storage, read> probs4: array<vec4<T>>;
@group(0) @binding(6) var<storage, read_write> dprobs4: array<vec4<T>>;

// Which of the four positions from s are before `live`.
fn live4(s: u32, live: u32) -> vec4<bool> {
    return vec4<u32>(s, s + 1u, s + 2u, s + 3u) < vec4<u32>(live);
}

// acc plus v's lanes in lane order, skipping those not in `keep` (the first always is: a row's
// first vec4 holds position 0).
fn add4(acc: f32, v: vec4<f32>, keep: vec4<bool>) -> f32 {
    var a = acc + v.x;
    a = select(a, a + v.y, keep.y);
    a = select(a, a + v.z, keep.z);
    return select(a, a + v.w, keep.w);
}

@compute @workgroup_size(ROWS_WG, 1, 1)
fn softmax_causal_forward_rows4(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = (wg.x + wg.y * params.groups_x) * ROWS_WG + lid;
    if row >= params.rows {
        return;
    }
    let base = row * params.seq / 4u;
    let live = row % params.seq + 1u;
    let live_vec4s = (live + 3u) / 4u;
    var m = -3.402823e38;
    for (var i = 0u; i < live_vec4s; i++) {
        let v = select(vec4<f32>(-3.402823e38), vec4<f32>(scores4[base + i]), live4(4u * i, live));
        m = max(m, max(max(v.x, v.y), max(v.z, v.w)));
    }
    var sum = 0.0;
    for (var i = 0u; i < live_vec4s; i++) {
        sum = add4(sum, exp(vec4<f32>(scores4[base + i]) - m), live4(4u * i, live));
    }
    let inv = 1.0 / sum;
    for (var i = 0u; i < params.seq / 4u; i++) {
        let p = exp(vec4<f32>(scores4[base + i]) - m) * inv;
        scores4[base + i] = vec4<T>(select(vec4<f32>(0.0), p, live4(4u * i, live)));
    }
}

@compute @workgroup_size(ROWS_WG, 1, 1)
fn softmax_causal_backward_rows4(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = (wg.x + wg.y * params.groups_x) * ROWS_WG + lid;
    if row >= params.rows {
        return;
    }
    let base = row * params.seq / 4u;
    let live = row % params.seq + 1u;
    var dot = 0.0;
    for (var i = 0u; i < (live + 3u) / 4u; i++) {
        let pd = vec4<f32>(probs4[base + i]) * vec4<f32>(dprobs4[base + i]);
        dot = add4(dot, pd, live4(4u * i, live));
    }
    for (var i = 0u; i < params.seq / 4u; i++) {
        let d = vec4<f32>(probs4[base + i]) * (vec4<f32>(dprobs4[base + i]) - dot);
        dprobs4[base + i] = vec4<T>(select(vec4<f32>(0.0), d, live4(4u * i, live)));
    }
}
