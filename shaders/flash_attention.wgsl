// Fused causal attention in the FlashAttention-2 style: scores, causal mask, online softmax and the
// weighted sum of values in one kernel, with no T x T matrix in memory.
//
// Layout (as the matmul-based path in attention.wgsl): qkv is (B, T, (H + 2 KV) d), each row the
// H query heads, then the KV key heads, then the KV value heads; out and dout are (B, T, H d);
// query head h reads key/value head h / group (group = H / KV). lse and delta are (B, H, T) f32.
//
// Entry points:
//   flash_forward       out = softmax(mask(q k^T / sqrt(d))) v, and lse, the natural log of each
//                       row's sum of exponentials: all the backward keeps of the softmax.
//   flash_delta         delta = rowsum(dout * out), FlashAttention-2's pre-pass.
//   flash_backward_dq   dq, recomputing the probabilities of a row from q, k and lse.
//   flash_backward_dkdv dk and dv of a key/value head, summed over its query heads in head order.
//
// Work split. A workgroup of WG invocations owns WG / SPLIT rows (query rows for the forward and
// dq, key rows for dkdv); the SPLIT adjacent invocations of a row, its lanes, take the keys (or
// queries) of each staged tile in turn (lane p takes p, p + SPLIT, ...) and keep partial
// accumulators; at the end the lanes' partials are added in lane order through workgroup memory.
// The split bounds the loop iterations of one invocation (llvmpipe stops every loop of an
// invocation after 65535 iterations in total) and gives short sequences more parallelism. Tiles
// of TILE rows of the other operand (keys and values, or queries and output gradients) are staged
// in workgroup memory as f32 vec4 rows STRIDE apart (STRIDE odd, so that the SPLIT lanes reading
// different rows hit different banks).
//
// Every sum has a fixed order (chunks of a dot product, keys within a lane, lanes in order, heads
// of a group in order), no atomics: the results are bit-identical from run to run. The backward
// recomputes each score with the same function and the same operands as the forward, so the
// probability it rebuilds from lse is the forward's up to lse's own rounding.
//
// Scores are kept in base 2: s2 = (q . k) * scale * log2(e), so exp2 replaces exp. lse is stored
// in natural-log units, lse = ln(sum_j exp(scale q . k_j)).
//
// Dropout on the probabilities uses the counter-based mask of dropout.wgsl, element (b, h, t, s)
// numbered ((b H + h) T + t) T + s as in the (B, H, T, T) buffer of the matmul path, so both paths
// drop the same elements. The normaliser sums the probabilities before dropout.
//
// HV, the vec4s of one head row, comes from a one-line prelude after the precision's (head sizes
// up to 16, 32, 64 or 128, see src/shaders.rs): loops over a head row have a constant trip count,
// so GPU compilers unroll them and keep the per-invocation rows in registers. A head of d < 4 HV
// is zero-padded; zeros add nothing to dot products and padded outputs are never stored.
//
// T (the storage type) comes from the precision prelude; all arithmetic is f32.

struct Params {
    // T.
    seq: u32,
    // H, query heads.
    heads: u32,
    // KV, key/value heads.
    kv_heads: u32,
    // H / KV.
    group: u32,
    // d, elements per head.
    head_dim: u32,
    // Elements of a qkv row, (H + 2 KV) d.
    qkv_width: u32,
    // Elements of an out row, H d.
    out_width: u32,
    // Element of a qkv row where the key heads start (H d), and the value heads ((H + KV) d).
    k_offset: u32,
    v_offset: u32,
    // Workgroups along x: query tiles (forward, dq) or key tiles (dkdv).
    tiles: u32,
    // Dropout site of these probabilities.
    site: u32,
    // flash_delta: workgroups along x, and the number of rows (B H T).
    groups_x: u32,
    rows: u32,
    // 1 / sqrt(d), and the same times log2(e).
    scale: f32,
    scale_log2: f32,
    _pad: u32,
}

// The layout of dropout.wgsl's State (see src/cpu/dropout.rs).
struct DropoutState {
    key: u32,
    threshold: u32,
    scale: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> qkv: array<T>;
// The same buffer four elements at a time (VEC4 only).
@group(0) @binding(2) var<storage, read> qkv4: array<vec4<T>>;
@group(0) @binding(3) var<storage, read> dropout_state: DropoutState;
@group(0) @binding(4) var<storage, read_write> out: array<T>;
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;
@group(0) @binding(6) var<storage, read> dout: array<T>;
@group(0) @binding(7) var<storage, read> dout4: array<vec4<T>>;
@group(0) @binding(8) var<storage, read_write> delta: array<f32>;
@group(0) @binding(9) var<storage, read_write> dqkv: array<T>;

const LOG2E: f32 = 1.442695040888963;
const LN2: f32 = 0.6931471805599453;
// A finite stand-in for -infinity: WGSL lets implementations assume there are no infinities.
// exp2(NEG_BIG - s) is exactly 0 for any score s of a real row.
const NEG_BIG: f32 = -1.0e30;
// Keys one lane scores per staged tile (the host keeps TILE / SPLIT within it).
const MAX_KEYS_PER_LANE: u32 = 16u;

override WG: u32 = 64u;
override SPLIT: u32 = 4u;
override TILE: u32 = 32u;
override STRIDE: u32 = 17u;
override VEC4: bool = false;
override DROPOUT: bool = false;

// Staged rows: keys and values (forward, dq), or queries and output gradients (dkdv). At the end
// of a kernel the two together hold the lanes' partial accumulators.
var<workgroup> tile_a: array<vec4<f32>, TILE * STRIDE>;
var<workgroup> tile_b: array<vec4<f32>, TILE * STRIDE>;
// dkdv: log2-domain lse (first TILE) and delta (next TILE) of the staged queries.
var<workgroup> tile_s: array<f32, 2u * TILE>;
// dkdv: the workgroup's own key and value rows.
var<workgroup> own_k: array<vec4<f32>, (WG / SPLIT) * STRIDE>;
var<workgroup> own_v: array<vec4<f32>, (WG / SPLIT) * STRIDE>;
// Forward: each lane's running maximum and sum, for the final merge.
var<workgroup> lane_m: array<f32, WG>;
var<workgroup> lane_l: array<f32, WG>;

// ---------------------------------------------------------------------------------------------
// Loads and stores of one vec4 chunk c of a head row starting at element e. Chunks past the head
// read as zero; partial last chunks (d not a multiple of 4) are read and written element by
// element. VEC4 is set only when d, the row widths and the buffers' offsets are multiples of 4.

fn qkv_chunk(e: u32, c: u32) -> vec4<f32> {
    let first = 4u * c;
    let d = params.head_dim;
    if first >= d {
        return vec4<f32>(0.0);
    }
    if VEC4 {
        return vec4<f32>(qkv4[(e + first) / 4u]);
    }
    var v = vec4<f32>(f32(qkv[e + first]), 0.0, 0.0, 0.0);
    if first + 1u < d {
        v.y = f32(qkv[e + first + 1u]);
    }
    if first + 2u < d {
        v.z = f32(qkv[e + first + 2u]);
    }
    if first + 3u < d {
        v.w = f32(qkv[e + first + 3u]);
    }
    return v;
}

fn dout_chunk(e: u32, c: u32) -> vec4<f32> {
    let first = 4u * c;
    let d = params.head_dim;
    if first >= d {
        return vec4<f32>(0.0);
    }
    if VEC4 {
        return vec4<f32>(dout4[(e + first) / 4u]);
    }
    var v = vec4<f32>(f32(dout[e + first]), 0.0, 0.0, 0.0);
    if first + 1u < d {
        v.y = f32(dout[e + first + 1u]);
    }
    if first + 2u < d {
        v.z = f32(dout[e + first + 2u]);
    }
    if first + 3u < d {
        v.w = f32(dout[e + first + 3u]);
    }
    return v;
}

fn out_chunk(e: u32, c: u32) -> vec4<f32> {
    let first = 4u * c;
    let d = params.head_dim;
    if first >= d {
        return vec4<f32>(0.0);
    }
    var v = vec4<f32>(f32(out[e + first]), 0.0, 0.0, 0.0);
    if first + 1u < d {
        v.y = f32(out[e + first + 1u]);
    }
    if first + 2u < d {
        v.z = f32(out[e + first + 2u]);
    }
    if first + 3u < d {
        v.w = f32(out[e + first + 3u]);
    }
    return v;
}

fn store_out(e: u32, c: u32, v: vec4<f32>) {
    let first = 4u * c;
    let d = params.head_dim;
    if first >= d {
        return;
    }
    out[e + first] = T(v.x);
    if first + 1u < d {
        out[e + first + 1u] = T(v.y);
    }
    if first + 2u < d {
        out[e + first + 2u] = T(v.z);
    }
    if first + 3u < d {
        out[e + first + 3u] = T(v.w);
    }
}

fn store_dqkv(e: u32, c: u32, v: vec4<f32>) {
    let first = 4u * c;
    let d = params.head_dim;
    if first >= d {
        return;
    }
    dqkv[e + first] = T(v.x);
    if first + 1u < d {
        dqkv[e + first + 1u] = T(v.y);
    }
    if first + 2u < d {
        dqkv[e + first + 2u] = T(v.z);
    }
    if first + 3u < d {
        dqkv[e + first + 3u] = T(v.w);
    }
}

// Sum of the four lanes of a vec4 accumulator, in a fixed order.
fn hsum(v: vec4<f32>) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

// ---------------------------------------------------------------------------------------------
// Dropout: the same bits as dropout.wgsl's bits(i, stream()).

fn lowbias32(v: u32) -> u32 {
    var x = v;
    x ^= x >> 16u;
    x *= 0x7feb352du;
    x ^= x >> 15u;
    x *= 0x846ca68bu;
    x ^= x >> 16u;
    return x;
}

fn dropout_stream() -> u32 {
    return lowbias32(dropout_state.key ^ lowbias32(params.site + 0x9e3779b9u));
}

// The factor element i of the probabilities is multiplied by: 0 (dropped) or 1 / (1 - p).
fn dropout_factor(i: u32, stream: u32) -> f32 {
    if lowbias32(lowbias32(i ^ stream) + stream) >= dropout_state.threshold {
        return dropout_state.scale;
    }
    return 0.0;
}

// ---------------------------------------------------------------------------------------------
// Staging and merging.

// Keys and values k0 .. k0 + TILE of sequence `seq_row0` (its first row index, b T) and
// key/value head columns k_col and v_col, into tile_a and tile_b; rows past T are zero.
// Consecutive invocations read consecutive chunks of a row, so the loads coalesce.
fn stage_keys_values(lid: u32, seq_row0: u32, k0: u32, k_col: u32, v_col: u32) {
    for (var s = lid; s < TILE * HV; s += WG) {
        let j = s / HV;
        let c = s % HV;
        var kv = vec4<f32>(0.0);
        var vv = vec4<f32>(0.0);
        if k0 + j < params.seq {
            let row = (seq_row0 + k0 + j) * params.qkv_width;
            kv = qkv_chunk(row + k_col, c);
            vv = qkv_chunk(row + v_col, c);
        }
        tile_a[j * STRIDE + c] = kv;
        tile_b[j * STRIDE + c] = vv;
    }
}

// Partial accumulators are merged through tile_a and tile_b seen as one area of 2 TILE STRIDE
// vec4 slots, `merge_chunks()` chunks of every lane at a time.
fn merge_chunks() -> u32 {
    return (2u * TILE * STRIDE) / WG;
}

fn merge_put(s: u32, v: vec4<f32>) {
    if s < TILE * STRIDE {
        tile_a[s] = v;
    } else {
        tile_b[s - TILE * STRIDE] = v;
    }
}

fn merge_get(s: u32) -> vec4<f32> {
    if s < TILE * STRIDE {
        return tile_a[s];
    }
    return tile_b[s - TILE * STRIDE];
}

// Puts chunks c0 .. c0 + merge_chunks() of this lane's accumulator, times w, in its slots.
fn merge_stage(lid: u32, c0: u32, acc: ptr<function, array<vec4<f32>, HV>>, w: f32) {
    let n = merge_chunks();
    for (var k = 0u; k < n; k++) {
        if c0 + k < HV {
            merge_put(lid * n + k, (*acc)[c0 + k] * w);
        }
    }
}

// The sum over the lanes of `row`, in lane order, of chunk c0 + k as staged by merge_stage.
fn merge_row(row: u32, k: u32) -> vec4<f32> {
    let n = merge_chunks();
    var sum = vec4<f32>(0.0);
    for (var p = 0u; p < SPLIT; p++) {
        sum += merge_get((row * SPLIT + p) * n + k);
    }
    return sum;
}

// ---------------------------------------------------------------------------------------------
// Forward. Workgroup (x, y): query tile params.tiles - 1 - x (the longest rows first, so the
// heaviest workgroups start first), y = b H + h.

@compute @workgroup_size(WG)
fn flash_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let rows_per_wg = WG / SPLIT;
    let tile_q = params.tiles - 1u - wg.x;
    let bh = wg.y;
    let b = bh / params.heads;
    let h = bh % params.heads;
    let kvh = h / params.group;
    let row = lid / SPLIT;
    let lane = lid % SPLIT;
    let t = tile_q * rows_per_wg + row;
    let live = t < params.seq;
    // Rows past T load row T - 1 and see no key, so they take no branch of their own.
    let tq = min(t, params.seq - 1u);
    let visible = select(0u, t + 1u, live);
    let seq_row0 = b * params.seq;

    var q: array<vec4<f32>, HV>;
    let q_at = (seq_row0 + tq) * params.qkv_width + h * params.head_dim;
    for (var c = 0u; c < HV; c++) {
        q[c] = qkv_chunk(q_at, c);
    }
    var o: array<vec4<f32>, HV>;
    var m = NEG_BIG;
    var l = 0.0;
    var stream = 0u;
    if DROPOUT {
        stream = dropout_stream();
    }
    let drop_row = (bh * params.seq + tq) * params.seq;
    let k_col = params.k_offset + kvh * params.head_dim;
    let v_col = params.v_offset + kvh * params.head_dim;

    let last = min((tile_q + 1u) * rows_per_wg, params.seq) - 1u;
    let key_tiles = last / TILE + 1u;
    var sc: array<f32, MAX_KEYS_PER_LANE>;
    for (var kt = 0u; kt < key_tiles; kt++) {
        let k0 = kt * TILE;
        workgroupBarrier();
        stage_keys_values(lid, seq_row0, k0, k_col, v_col);
        workgroupBarrier();
        // Every row of the workgroup walks the keys the workgroup's last row sees; keys after a
        // row's own position are masked, not skipped. The loops then have the same trip count
        // in every lane, so the lanes of a SIMD group read the same staged row at once (GPUs
        // broadcast it; lavapipe loads it once rather than once per lane).
        let end = min(k0 + TILE, last + 1u);
        // Scores of this lane's keys and their maximum.
        var tile_max = m;
        var n = 0u;
        for (var j = lane; k0 + j < end; j += SPLIT) {
            var acc = vec4<f32>(0.0);
            for (var c = 0u; c < HV; c++) {
                acc = fma(q[c], tile_a[j * STRIDE + c], acc);
            }
            let s = select(hsum(acc) * params.scale_log2, NEG_BIG, k0 + j >= visible);
            sc[n] = s;
            n++;
            tile_max = max(tile_max, s);
        }
        // Rescale what was summed under the old maximum, then add this tile's keys. (No
        // `continue` for lanes without keys: the loop holds barriers and must stay uniform.)
        if n > 0u {
            let alpha = exp2(m - tile_max);
            m = tile_max;
            l *= alpha;
            for (var c = 0u; c < HV; c++) {
                o[c] *= alpha;
            }
        }
        var i = 0u;
        for (var j = lane; k0 + j < end; j += SPLIT) {
            let p = select(exp2(sc[i] - m), 0.0, k0 + j >= visible);
            i++;
            l += p;
            var w = p;
            if DROPOUT {
                w = p * dropout_factor(drop_row + k0 + j, stream);
            }
            for (var c = 0u; c < HV; c++) {
                o[c] = fma(vec4<f32>(w), tile_b[j * STRIDE + c], o[c]);
            }
        }
    }

    // Merge the lanes of each row: common maximum, then sums in lane order.
    lane_m[lid] = m;
    lane_l[lid] = l;
    workgroupBarrier();
    var row_max = NEG_BIG;
    for (var p = 0u; p < SPLIT; p++) {
        row_max = max(row_max, lane_m[row * SPLIT + p]);
    }
    var total = 0.0;
    for (var p = 0u; p < SPLIT; p++) {
        total += exp2(lane_m[row * SPLIT + p] - row_max) * lane_l[row * SPLIT + p];
    }
    // A live row sees key 0, and the lane holding the row's maximum adds exp2(0) = 1: total >= 1.
    let inv = select(0.0, 1.0 / max(total, 1.0), live);
    let out_at = (seq_row0 + tq) * params.out_width + h * params.head_dim;
    let n = merge_chunks();
    for (var c0 = 0u; c0 < HV; c0 += n) {
        workgroupBarrier();
        merge_stage(lid, c0, &o, exp2(m - row_max));
        workgroupBarrier();
        for (var k = lane; k < n; k += SPLIT) {
            if live && c0 + k < HV {
                store_out(out_at, c0 + k, merge_row(row, k) * inv);
            }
        }
    }
    if live && lane == 0u {
        lse[bh * params.seq + t] = (row_max + log2(total)) * LN2;
    }
}

// ---------------------------------------------------------------------------------------------
// Backward pre-pass: delta = rowsum(dout * out) per (b, h, t), one invocation each. With dropout
// this still equals rowsum(P * dP) of the softmax backward: sum_s P[s] keep[s] (dout . v[s]) / (1-p)
// = dout . out.

@compute @workgroup_size(WG)
fn flash_delta(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = (wg.y * params.groups_x + wg.x) * WG + lid;
    if r >= params.rows {
        return;
    }
    let t = r % params.seq;
    let bh = r / params.seq;
    let b = bh / params.heads;
    let h = bh % params.heads;
    let at = (b * params.seq + t) * params.out_width + h * params.head_dim;
    var acc = vec4<f32>(0.0);
    for (var c = 0u; c < HV; c++) {
        acc = fma(dout_chunk(at, c), out_chunk(at, c), acc);
    }
    delta[r] = hsum(acc);
}

// ---------------------------------------------------------------------------------------------
// dq = scale sum_s dS[t, s] k[s], dS = P (dP - delta), dP = dout . v (through the dropout mask).
// Laid out as the forward: workgroup (x, y) is query tile params.tiles - 1 - x of y = b H + h.

@compute @workgroup_size(WG)
fn flash_backward_dq(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let rows_per_wg = WG / SPLIT;
    let tile_q = params.tiles - 1u - wg.x;
    let bh = wg.y;
    let b = bh / params.heads;
    let h = bh % params.heads;
    let kvh = h / params.group;
    let row = lid / SPLIT;
    let lane = lid % SPLIT;
    let t = tile_q * rows_per_wg + row;
    let live = t < params.seq;
    let tq = min(t, params.seq - 1u);
    let visible = select(0u, t + 1u, live);
    let seq_row0 = b * params.seq;

    var q: array<vec4<f32>, HV>;
    var g: array<vec4<f32>, HV>;
    let q_at = (seq_row0 + tq) * params.qkv_width + h * params.head_dim;
    let o_at = (seq_row0 + tq) * params.out_width + h * params.head_dim;
    for (var c = 0u; c < HV; c++) {
        q[c] = qkv_chunk(q_at, c);
        g[c] = dout_chunk(o_at, c);
    }
    let lse2 = lse[bh * params.seq + tq] * LOG2E;
    let dot_o = delta[bh * params.seq + tq];
    var stream = 0u;
    if DROPOUT {
        stream = dropout_stream();
    }
    let drop_row = (bh * params.seq + tq) * params.seq;
    let k_col = params.k_offset + kvh * params.head_dim;
    let v_col = params.v_offset + kvh * params.head_dim;

    var dq: array<vec4<f32>, HV>;
    let last = min((tile_q + 1u) * rows_per_wg, params.seq) - 1u;
    let key_tiles = last / TILE + 1u;
    for (var kt = 0u; kt < key_tiles; kt++) {
        let k0 = kt * TILE;
        workgroupBarrier();
        stage_keys_values(lid, seq_row0, k0, k_col, v_col);
        workgroupBarrier();
        // As in the forward: the workgroup's keys, masked per row, in every lane.
        let end = min(k0 + TILE, last + 1u);
        for (var j = lane; k0 + j < end; j += SPLIT) {
            var acc_s = vec4<f32>(0.0);
            var acc_p = vec4<f32>(0.0);
            for (var c = 0u; c < HV; c++) {
                acc_s = fma(q[c], tile_a[j * STRIDE + c], acc_s);
                acc_p = fma(g[c], tile_b[j * STRIDE + c], acc_p);
            }
            let p = select(exp2(hsum(acc_s) * params.scale_log2 - lse2), 0.0, k0 + j >= visible);
            var dp = hsum(acc_p);
            if DROPOUT {
                dp *= dropout_factor(drop_row + k0 + j, stream);
            }
            let ds = p * (dp - dot_o);
            for (var c = 0u; c < HV; c++) {
                dq[c] = fma(vec4<f32>(ds), tile_a[j * STRIDE + c], dq[c]);
            }
        }
    }

    let dq_at = (seq_row0 + tq) * params.qkv_width + h * params.head_dim;
    let n = merge_chunks();
    for (var c0 = 0u; c0 < HV; c0 += n) {
        workgroupBarrier();
        merge_stage(lid, c0, &dq, 1.0);
        workgroupBarrier();
        for (var k = lane; k < n; k += SPLIT) {
            if live && c0 + k < HV {
                store_dqkv(dq_at, c0 + k, merge_row(row, k) * params.scale);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// dk = scale sum_(h in group) sum_t dS[t, s] q[t] and dv = sum_(h in group) sum_t P~[t, s] dout[t]
// (P~ the dropped probabilities). Workgroup (x, y): key tile x (the first tiles see the most
// queries) of y = b KV + kv head. Lanes of a key row take the queries of each staged query tile in
// turn; queries before the key are masked.

// Queries qt0 .. qt0 + TILE of query head h: q rows into tile_a, dout rows into tile_b, their
// log2-domain lse and delta into tile_s. Rows past T are zero (and never visible).
fn stage_queries(lid: u32, seq_row0: u32, bh: u32, h: u32, qt0: u32) {
    for (var s = lid; s < TILE * HV; s += WG) {
        let i = s / HV;
        let c = s % HV;
        var qv = vec4<f32>(0.0);
        var gv = vec4<f32>(0.0);
        if qt0 + i < params.seq {
            let r = seq_row0 + qt0 + i;
            qv = qkv_chunk(r * params.qkv_width + h * params.head_dim, c);
            gv = dout_chunk(r * params.out_width + h * params.head_dim, c);
        }
        tile_a[i * STRIDE + c] = qv;
        tile_b[i * STRIDE + c] = gv;
    }
    for (var i = lid; i < TILE; i += WG) {
        var l2 = 0.0;
        var dd = 0.0;
        if qt0 + i < params.seq {
            l2 = lse[bh * params.seq + qt0 + i] * LOG2E;
            dd = delta[bh * params.seq + qt0 + i];
        }
        tile_s[i] = l2;
        tile_s[TILE + i] = dd;
    }
}

@compute @workgroup_size(WG)
fn flash_backward_dkdv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let keys_per_wg = WG / SPLIT;
    let key_tile = wg.x;
    let bkv = wg.y;
    let b = bkv / params.kv_heads;
    let kvh = bkv % params.kv_heads;
    let row = lid / SPLIT;
    let lane = lid % SPLIT;
    let first_key = key_tile * keys_per_wg;
    let s_key = first_key + row;
    let live = s_key < params.seq;
    let seq_row0 = b * params.seq;

    // This workgroup's keys and values, read by every query.
    for (var s = lid; s < keys_per_wg * HV; s += WG) {
        let j = s / HV;
        let c = s % HV;
        var kv = vec4<f32>(0.0);
        var vv = vec4<f32>(0.0);
        if first_key + j < params.seq {
            let r = (seq_row0 + first_key + j) * params.qkv_width;
            kv = qkv_chunk(r + params.k_offset + kvh * params.head_dim, c);
            vv = qkv_chunk(r + params.v_offset + kvh * params.head_dim, c);
        }
        own_k[j * STRIDE + c] = kv;
        own_v[j * STRIDE + c] = vv;
    }
    var stream = 0u;
    if DROPOUT {
        stream = dropout_stream();
    }

    var dk: array<vec4<f32>, HV>;
    var dv: array<vec4<f32>, HV>;
    let query_tiles = (params.seq + TILE - 1u) / TILE;
    let first_tile = first_key / TILE;
    let kb = row * STRIDE;
    for (var hg = 0u; hg < params.group; hg++) {
        let h = kvh * params.group + hg;
        let bh = b * params.heads + h;
        for (var qt = first_tile; qt < query_tiles; qt++) {
            let qt0 = qt * TILE;
            workgroupBarrier();
            stage_queries(lid, seq_row0, bh, h, qt0);
            workgroupBarrier();
            // Every query of the tile in every lane (uniform loops, as in the forward); the
            // queries before the key, and rows past T, are masked.
            for (var i = lane; i < TILE; i += SPLIT) {
                let t = qt0 + i;
                let masked = !live || t < s_key || t >= params.seq;
                var acc_s = vec4<f32>(0.0);
                var acc_p = vec4<f32>(0.0);
                for (var c = 0u; c < HV; c++) {
                    acc_s = fma(tile_a[i * STRIDE + c], own_k[kb + c], acc_s);
                    acc_p = fma(tile_b[i * STRIDE + c], own_v[kb + c], acc_p);
                }
                let p = select(exp2(hsum(acc_s) * params.scale_log2 - tile_s[i]), 0.0, masked);
                var dp = hsum(acc_p);
                var pd = p;
                if DROPOUT {
                    let f = dropout_factor((bh * params.seq + t) * params.seq + s_key, stream);
                    dp *= f;
                    pd = p * f;
                }
                let ds = p * (dp - tile_s[TILE + i]);
                for (var c = 0u; c < HV; c++) {
                    dv[c] = fma(vec4<f32>(pd), tile_b[i * STRIDE + c], dv[c]);
                    dk[c] = fma(vec4<f32>(ds), tile_a[i * STRIDE + c], dk[c]);
                }
            }
        }
    }

    let ks = min(s_key, params.seq - 1u);
    let k_at = (seq_row0 + ks) * params.qkv_width + params.k_offset + kvh * params.head_dim;
    let v_at = (seq_row0 + ks) * params.qkv_width + params.v_offset + kvh * params.head_dim;
    let n = merge_chunks();
    for (var c0 = 0u; c0 < HV; c0 += n) {
        workgroupBarrier();
        merge_stage(lid, c0, &dk, 1.0);
        workgroupBarrier();
        for (var k = lane; k < n; k += SPLIT) {
            if live && c0 + k < HV {
                store_dqkv(k_at, c0 + k, merge_row(row, k) * params.scale);
            }
        }
    }
    for (var c0 = 0u; c0 < HV; c0 += n) {
        workgroupBarrier();
        merge_stage(lid, c0, &dv, 1.0);
        workgroupBarrier();
        for (var k = lane; k < n; k += SPLIT) {
            if live && c0 + k < HV {
                store_dqkv(v_at, c0 + k, merge_row(row, k));
            }
        }
    }
}
