// Kernels of the one-token decode step of inference with a key/value cache.
//
// The cache of a layer is that layer's (block_size, (heads + 2 kv_heads) head_size) q|k|v
// activation buffer of the full forward pass (with RoPE, q and k are stored rotated): the
// prompt's prefill (the ordinary forward over the prompt) fills its rows 0..len, and each decode
// step appends one row. Only k and v of a row are read back.
//
//     embed_one    x = wte[token] + wpe[pos]                       (token and pos from `step`)
//     attend_one   one workgroup per query head h, reading key/value head g = h / group:
//                      s_j = scale · q_h·k_{j,g}  for j <= pos,   p = softmax(s),
//                      out_h = Σ_j p_j v_{j,g}
//                  and the first query head of each group writes the new token's k and v head g
//                  (from `qkv_new`) into row pos of the cache. Scores stay in f32 in workgroup
//                  memory (at most MAX_POS positions).
//
// With grouped-query attention several workgroups read key/value head g, and workgroups cannot
// wait for one another within a dispatch; so every workgroup reads the new row's k and v from
// `qkv_new` rather than from the cache row another workgroup is writing, and the cache rows it
// reads (j < pos) are never written in this dispatch.
//
// The host writes `step` (token, pos) with queue.write_buffer before each decode submission.

struct Dims {
    // Elements of an embedded row (embed_one).
    channels: u32,
    heads: u32,
    kv_heads: u32,
    head_size: u32,
    scale: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

struct Step {
    token: u32,
    pos: u32,
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> step: Step;
@group(0) @binding(2) var<storage, read> wte: array<T>;
@group(0) @binding(3) var<storage, read> wpe: array<T>;
@group(0) @binding(4) var<storage, read_write> x: array<T>;
@group(0) @binding(5) var<storage, read> qkv_new: array<T>;
@group(0) @binding(6) var<storage, read_write> cache: array<T>;
@group(0) @binding(7) var<storage, read_write> out: array<T>;

const WG: u32 = 64u;
const MAX_POS: u32 = 2048u;

var<workgroup> scores: array<f32, MAX_POS>;
var<workgroup> red: array<f32, WG>;

@compute @workgroup_size(WG)
fn embed_one(@builtin(local_invocation_index) lid: u32) {
    let c = dims.channels;
    for (var i = lid; i < c; i += WG) {
        x[i] = T(f32(wte[step.token * c + i]) + f32(wpe[step.pos * c + i]));
    }
}

// Tree reduction over the workgroup; `max_not_sum` picks the operation. Leaves the result in red[0].
fn reduce(lid: u32, value: f32, max_not_sum: bool) -> f32 {
    red[lid] = value;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
        if (lid < k) {
            if (max_not_sum) {
                red[lid] = max(red[lid], red[lid + k]);
            } else {
                red[lid] = red[lid] + red[lid + k];
            }
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(WG)
fn attend_one(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let h = wg.x;
    let hs = dims.head_size;
    let group = dims.heads / dims.kv_heads;
    let g = h / group;
    let row = (dims.heads + 2u * dims.kv_heads) * hs;
    let pos = step.pos;
    let q_off = h * hs;
    let k_off = (dims.heads + g) * hs;
    let v_off = (dims.heads + dims.kv_heads + g) * hs;
    if (h % group == 0u) {
        for (var d = lid; d < hs; d += WG) {
            cache[pos * row + k_off + d] = qkv_new[k_off + d];
            cache[pos * row + v_off + d] = qkv_new[v_off + d];
        }
    }

    var local_max = -3.0e38;
    for (var j = lid; j <= pos; j += WG) {
        var s = 0.0;
        if (j == pos) {
            for (var d = 0u; d < hs; d++) {
                s += f32(qkv_new[q_off + d]) * f32(qkv_new[k_off + d]);
            }
        } else {
            for (var d = 0u; d < hs; d++) {
                s += f32(qkv_new[q_off + d]) * f32(cache[j * row + k_off + d]);
            }
        }
        s *= dims.scale;
        scores[j] = s;
        local_max = max(local_max, s);
    }
    let m = reduce(lid, local_max, true);
    var local_sum = 0.0;
    for (var j = lid; j <= pos; j += WG) {
        let e = exp(scores[j] - m);
        scores[j] = e;
        local_sum += e;
    }
    let total = reduce(lid, local_sum, false);
    for (var d = lid; d < hs; d += WG) {
        var acc = 0.0;
        for (var j = 0u; j < pos; j++) {
            acc += scores[j] * f32(cache[j * row + v_off + d]);
        }
        acc += scores[pos] * f32(qkv_new[v_off + d]);
        out[q_off + d] = T(acc / total);
    }
}
