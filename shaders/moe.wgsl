// Mixture-of-experts routing (src/cpu/moe.rs is the commented reference; same buffers, same
// order of every sum). N tokens, E experts, K slots per token, R = capacity rows per expert,
// C channels; assignment a = t * K + j; grouped row e * R + rank.
//
// No float atomics anywhere: every value is written by exactly one invocation and every sum
// runs in a fixed order, so results are bit-identical from run to run. The counting sort is
// three passes over blocks of BLOCK assignments: count each (expert, block), then each
// (expert, block) adds up the counts of the blocks before it and walks its block again handing
// out ranks in assignment order (the last block also writes the expert's total). Arithmetic is
// f32 whatever the storage type T is; routing state (probs, lse, gate, dgate, stats) is f32.
//
// One invocation per item on a 2-D grid of workgroups: i = (wg.y * groups_x + wg.x) * WG + lid.

struct Dims {
    tokens: u32,
    experts: u32,
    top_k: u32,
    capacity: u32,
    channels: u32,
    // Blocks of BLOCK assignments.
    blocks: u32,
    groups_x: u32,
    // Items of this dispatch.
    n: u32,
    // loss_scale x these are the per-element gradient factors of the auxiliary losses:
    // aux_coef * E / (N * N * K) per count, z_coef * 2 / N per lse.
    aux_factor: f32,
    z_factor: f32,
    _pad0: u32,
    _pad1: u32,
}

const NONE: u32 = 0xffffffffu;

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> logits: array<T>;
@group(0) @binding(2) var<storage, read_write> probs: array<f32>;
@group(0) @binding(3) var<storage, read_write> sel: array<u32>;
@group(0) @binding(4) var<storage, read_write> gate: array<f32>;
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;
@group(0) @binding(6) var<storage, read_write> block_counts: array<u32>;
@group(0) @binding(7) var<storage, read_write> counts: array<u32>;
@group(0) @binding(8) var<storage, read_write> dest: array<u32>;
@group(0) @binding(9) var<storage, read_write> src: array<u32>;
@group(0) @binding(10) var<storage, read> x: array<T>;
@group(0) @binding(11) var<storage, read_write> xg: array<T>;
@group(0) @binding(12) var<storage, read> yg: array<T>;
@group(0) @binding(13) var<storage, read_write> y: array<T>;
@group(0) @binding(14) var<storage, read> dy: array<T>;
@group(0) @binding(15) var<storage, read_write> dyg: array<T>;
@group(0) @binding(16) var<storage, read_write> dgate: array<f32>;
@group(0) @binding(17) var<storage, read> dxg: array<T>;
@group(0) @binding(18) var<storage, read_write> dx: array<T>;
@group(0) @binding(19) var<storage, read_write> dlogits: array<T>;
@group(0) @binding(20) var<storage, read> loss_scale: array<f32>;
@group(0) @binding(21) var<storage, read_write> stats: array<f32>;

override WG: u32 = 64u;
override BLOCK: u32 = 256u;

fn item(wg: vec3<u32>, lid: u32) -> u32 {
    return (wg.y * dims.groups_x + wg.x) * WG + lid;
}

// Whether expert e is among the first j choices of token t.
fn taken(t: u32, j: u32, e: u32) -> bool {
    for (var i = 0u; i < j; i++) {
        if sel[t * dims.top_k + i] == e {
            return true;
        }
    }
    return false;
}

// Softmax (relative to the row maximum), logsumexp, top-k by repeated arg-max (a strict > keeps
// the lowest index among equals) and the gates: one invocation per token.
@compute @workgroup_size(WG)
fn moe_route(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = item(wg, lid);
    if t >= dims.n {
        return;
    }
    let e_n = dims.experts;
    let base = t * e_n;
    var m = f32(logits[base]);
    for (var i = 1u; i < e_n; i++) {
        m = max(m, f32(logits[base + i]));
    }
    var s = 0.0;
    for (var i = 0u; i < e_n; i++) {
        s += exp(f32(logits[base + i]) - m);
    }
    lse[t] = m + log(s);
    for (var i = 0u; i < e_n; i++) {
        probs[base + i] = exp(f32(logits[base + i]) - m) / s;
    }
    var total = 0.0;
    for (var j = 0u; j < dims.top_k; j++) {
        var best = NONE;
        for (var i = 0u; i < e_n; i++) {
            if !taken(t, j, i) && (best == NONE || probs[base + i] > probs[base + best]) {
                best = i;
            }
        }
        sel[t * dims.top_k + j] = best;
        total += probs[base + best];
    }
    for (var j = 0u; j < dims.top_k; j++) {
        let p = probs[base + sel[t * dims.top_k + j]];
        gate[t * dims.top_k + j] = select(p / total, p, dims.top_k == 1u);
    }
}

// Pass 1 of the counting sort: assignments of block b that chose expert e, per (e, b).
@compute @workgroup_size(WG)
fn moe_count_blocks(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = item(wg, lid);
    if i >= dims.n {
        return;
    }
    let e = i / dims.blocks;
    let b = i % dims.blocks;
    let end = min((b + 1u) * BLOCK, dims.tokens * dims.top_k);
    var c = 0u;
    for (var a = b * BLOCK; a < end; a++) {
        c += select(0u, 1u, sel[a] == e);
    }
    block_counts[i] = c;
}

// Pass 2: ranks in assignment order; the first R of an expert are kept.
@compute @workgroup_size(WG)
fn moe_scatter(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = item(wg, lid);
    if i >= dims.n {
        return;
    }
    let e = i / dims.blocks;
    let b = i % dims.blocks;
    var rank = 0u;
    for (var p = 0u; p < b; p++) {
        rank += block_counts[e * dims.blocks + p];
    }
    let end = min((b + 1u) * BLOCK, dims.tokens * dims.top_k);
    for (var a = b * BLOCK; a < end; a++) {
        if sel[a] == e {
            if rank < dims.capacity {
                let row = e * dims.capacity + rank;
                dest[a] = row;
                src[row] = a;
            } else {
                dest[a] = NONE;
            }
            rank += 1u;
        }
    }
    if b + 1u == dims.blocks {
        counts[e] = rank;
    }
}

// Rows expert e keeps.
fn kept(e: u32) -> u32 {
    return min(counts[e], dims.capacity);
}

// xg[e, r, c] = x[token of src[e, r], c] for kept rows, 0 elsewhere.
@compute @workgroup_size(WG)
fn moe_gather(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = item(wg, lid);
    if i >= dims.n {
        return;
    }
    let row = i / dims.channels;
    let c = i % dims.channels;
    let e = row / dims.capacity;
    var v = T(0.0);
    if row % dims.capacity < kept(e) {
        v = x[(src[row] / dims.top_k) * dims.channels + c];
    }
    xg[i] = v;
}

// y[t, c] = sum over kept slots j, in slot order, of gate[t, j] * yg[dest[t, j], c].
@compute @workgroup_size(WG)
fn moe_combine(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = item(wg, lid);
    if i >= dims.n {
        return;
    }
    let t = i / dims.channels;
    let c = i % dims.channels;
    var acc = 0.0;
    for (var j = 0u; j < dims.top_k; j++) {
        let d = dest[t * dims.top_k + j];
        if d != NONE {
            acc += gate[t * dims.top_k + j] * f32(yg[d * dims.channels + c]);
        }
    }
    y[i] = T(acc);
}

// dyg[e, r, c] = gate * dy[token, c] for kept rows, 0 elsewhere.
@compute @workgroup_size(WG)
fn moe_combine_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = item(wg, lid);
    if i >= dims.n {
        return;
    }
    let row = i / dims.channels;
    let c = i % dims.channels;
    let e = row / dims.capacity;
    var v = 0.0;
    if row % dims.capacity < kept(e) {
        let a = src[row];
        v = gate[a] * f32(dy[(a / dims.top_k) * dims.channels + c]);
    }
    dyg[i] = T(v);
}

// dgate[t, j] = dy[t] . yg[dest[t, j]] in channel order (0 for a dropped slot).
@compute @workgroup_size(WG)
fn moe_gate_grad(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let a = item(wg, lid);
    if a >= dims.n {
        return;
    }
    let d = dest[a];
    var acc = 0.0;
    if d != NONE {
        let t = a / dims.top_k;
        for (var c = 0u; c < dims.channels; c++) {
            acc += f32(dy[t * dims.channels + c]) * f32(yg[d * dims.channels + c]);
        }
    }
    dgate[a] = acc;
}

// dx[t, c] = sum over kept slots of dxg[dest[t, j], c] (overwrites dx).
@compute @workgroup_size(WG)
fn moe_gather_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = item(wg, lid);
    if i >= dims.n {
        return;
    }
    let t = i / dims.channels;
    let c = i % dims.channels;
    var acc = 0.0;
    for (var j = 0u; j < dims.top_k; j++) {
        let d = dest[t * dims.top_k + j];
        if d != NONE {
            acc += f32(dxg[d * dims.channels + c]);
        }
    }
    dx[i] = T(acc);
}

// Gradient of the selected probability of expert i of token t through the renormalised gates
// (K = 1: the gate is the probability), plus the load-balancing term.
fn dprob(t: u32, i: u32, dot: f32, total: f32, aux: f32) -> f32 {
    var d = aux * f32(counts[i]);
    for (var j = 0u; j < dims.top_k; j++) {
        let a = t * dims.top_k + j;
        if sel[a] == i {
            d += select((dgate[a] - dot) / total, dgate[a], dims.top_k == 1u);
        }
    }
    return d;
}

// The router's backward, one invocation per token (see moe_route_backward in src/cpu/moe.rs).
@compute @workgroup_size(WG)
fn moe_route_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = item(wg, lid);
    if t >= dims.n {
        return;
    }
    let e_n = dims.experts;
    let base = t * e_n;
    let aux = dims.aux_factor * loss_scale[0];
    let z = dims.z_factor * loss_scale[0];
    var total = 0.0;
    var dot = 0.0;
    for (var j = 0u; j < dims.top_k; j++) {
        let a = t * dims.top_k + j;
        total += probs[base + sel[a]];
        dot += dgate[a] * gate[a];
    }
    var pdp = 0.0;
    for (var i = 0u; i < e_n; i++) {
        pdp += probs[base + i] * dprob(t, i, dot, total, aux);
    }
    for (var i = 0u; i < e_n; i++) {
        let p = probs[base + i];
        dlogits[base + i] = T(p * (dprob(t, i, dot, total, aux) - pdp) + z * lse[t] * p);
    }
}

// Per expert e: f_e = counts[e] / (N * K) at stats[3 + e], P_e = mean router probability
// (summed in token order) at stats[3 + E + e].
@compute @workgroup_size(WG)
fn moe_expert_load(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let e = item(wg, lid);
    if e >= dims.n {
        return;
    }
    var p = 0.0;
    for (var t = 0u; t < dims.tokens; t++) {
        p += probs[t * dims.experts + e];
    }
    stats[3u + e] = f32(counts[e]) / f32(dims.tokens * dims.top_k);
    stats[3u + dims.experts + e] = p / f32(dims.tokens);
}

// One invocation: stats[0] = E * sum_e f_e * P_e, stats[1] = mean lse^2, stats[2] = dropped.
@compute @workgroup_size(1)
fn moe_losses() {
    var aux = 0.0;
    var dropped = 0u;
    for (var e = 0u; e < dims.experts; e++) {
        aux += stats[3u + e] * stats[3u + dims.experts + e];
        dropped += counts[e] - min(counts[e], dims.capacity);
    }
    var z = 0.0;
    for (var t = 0u; t < dims.tokens; t++) {
        z += lse[t] * lse[t];
    }
    stats[0] = f32(dims.experts) * aux;
    stats[1] = z / f32(dims.tokens);
    stats[2] = f32(dropped);
}
