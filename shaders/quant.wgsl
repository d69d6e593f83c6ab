// Quantised weights: products and embedding lookups that dequantise as they read.
//
// A quantised matrix W (n rows of k inputs) is `packed`, n rows of k / 4 (q8) or k / 8 (q4) u32
// words, and `scales`, one f16 per group of GROUP inputs, two to a u32 (read with
// unpack2x16float, so no SHADER_F16 is needed), row after row. Element (r, c) stands for
// d · q with d = scale(r, c / GROUP) and q the signed integer (see src/quant/mod.rs for the
// layouts, which are llama.cpp's q8_0 / q4_0 block bytes):
//   q8  byte c % 4 of word c / 4, sign-extended;
//   q4  in the 32-element block c / 32, byte j = (c % 32) % 16 of the block's 4 words holds
//       element j in its low nibble and element j + 16 in its high nibble, each q + 8.
// d · q is exact in f32 (11 + 8 significant bits), so every kernel multiplies by exactly the
// weights the CPU reference dequantises, and accumulates in f32.
//
//     qmatmul_tiled   Y = X·Wᵀ (+ bias) for any M: 64×64 output tiles, 32-deep K steps (one
//                     block) staged in workgroup memory, W dequantised as it is staged; 4×4
//                     outputs per invocation. What GPUs want for the prefill and evaluation.
//     qmatmul_rows    one invocation per output, no workgroup memory and no barriers, summing
//                     in increasing k: what CPU-backed adapters want, and the decoder's one-row
//                     product there.
//     qmatmul_wg      one workgroup of 64 per output: lanes read consecutive words of the weight
//                     row (coalesced) and a fixed tree adds their partial sums: the decoder's
//                     one-row product on GPUs.
//     qmatmul_pack_b  dequantises W into the texture matmul's B operand (matmul_texture.wgsl),
//                     whose multiply then runs as for float weights: what CPU-backed adapters
//                     want for several rows, where texel fetches beat storage loads.
//     qembed          out = dequantised token rows (+ position rows), one invocation per
//                     element; with ONE_TOKEN the (token, pos) pair of the decode step.
//
// k is a multiple of GROUP, itself a multiple of 32 (checked on the host). X, Y, bias and the
// position table are in the storage precision T.

struct Dims {
    m: u32,
    n: u32,
    k: u32,
    groups_per_row: u32,
    words_per_row: u32,
    // qembed: rows of the position table's period (the sequence length) and workgroups along x.
    seq: u32,
    groups_x: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> packed: array<u32>;
@group(0) @binding(2) var<storage, read> scales: array<u32>;
@group(0) @binding(3) var<storage, read> x: array<T>;
@group(0) @binding(4) var<storage, read> bias: array<T>;
@group(0) @binding(5) var<storage, read_write> y: array<T>;
@group(0) @binding(6) var<storage, read> tokens: array<u32>;
@group(0) @binding(7) var<storage, read> wpe: array<T>;

override Q4: bool = false;
override GROUP: u32 = 32u;
override HAS_BIAS: bool = false;
override ONE_TOKEN: bool = false;

// The scale of row r, group g.
fn scale(r: u32, g: u32) -> f32 {
    let i = r * dims.groups_per_row + g;
    let pair = unpack2x16float(scales[i >> 1u]);
    return select(pair.x, pair.y, (i & 1u) == 1u);
}

// The four q8 integers of a word (elements 4w .. 4w+3 of the row).
fn q8_word(word: u32) -> vec4<f32> {
    let s = bitcast<i32>(word);
    return vec4<f32>(
        f32(extractBits(s, 0u, 8u)),
        f32(extractBits(s, 8u, 8u)),
        f32(extractBits(s, 16u, 8u)),
        f32(extractBits(s, 24u, 8u)),
    );
}

// The low nibbles of a q4 word (elements 4w' .. 4w'+3 of its block), as q.
fn q4_low(word: u32) -> vec4<f32> {
    return vec4<f32>(
        f32(extractBits(word, 0u, 4u)),
        f32(extractBits(word, 8u, 4u)),
        f32(extractBits(word, 16u, 4u)),
        f32(extractBits(word, 24u, 4u)),
    ) - 8.0;
}

// The high nibbles (elements 16 + 4w' .. 16 + 4w'+3 of its block), as q.
fn q4_high(word: u32) -> vec4<f32> {
    return q4_low(word >> 4u);
}

// One element's dequantised weight (the embedding lookups; the products unpack whole words).
fn weight(r: u32, c: u32) -> f32 {
    let d = scale(r, c / GROUP);
    if Q4 {
        let e = c % 32u;
        let byte = e % 16u;
        let word = packed[r * dims.words_per_row + (c / 32u) * 4u + byte / 4u];
        return d * (f32(extractBits(word, 8u * (byte % 4u) + 4u * (e / 16u), 4u)) - 8.0);
    }
    let word = bitcast<i32>(packed[r * dims.words_per_row + c / 4u]);
    return d * f32(extractBits(word, 8u * (c % 4u), 8u));
}

// The output of row i, column j: the sum plus the bias, rounded to T.
fn store(i: u32, j: u32, acc: f32) {
    var v = acc;
    if HAS_BIAS {
        v += f32(bias[j]);
    }
    y[i * dims.n + j] = T(v);
}

// ---- qmatmul_tiled -------------------------------------------------------------------------

const TM: u32 = 64u;
const TN: u32 = 64u;
const TK: u32 = 32u;

// k-major tiles: xs[kk * TM + r] = X[m0 + r, k0 + kk], ws[kk * TN + c] = W[n0 + c, k0 + kk].
// 2 × 8 KiB, the whole of WebGPU's guaranteed 16 KiB.
var<workgroup> xs: array<f32, 2048>;
var<workgroup> ws: array<f32, 2048>;

// Stages 4 dequantised weights of row c, inputs kk .. kk+3 of the tile.
fn stage_w(kk: u32, c: u32, v: vec4<f32>) {
    ws[kk * TN + c] = v.x;
    ws[(kk + 1u) * TN + c] = v.y;
    ws[(kk + 2u) * TN + c] = v.z;
    ws[(kk + 3u) * TN + c] = v.w;
}

@compute @workgroup_size(16, 16)
fn qmatmul_tiled(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let m0 = wg.y * TM;
    let n0 = wg.x * TN;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < dims.k; k0 += TK) {
        // X: 64 rows × 32 inputs, 8 per invocation, consecutive invocations along k.
        for (var i = 0u; i < 8u; i++) {
            let idx = i * 256u + t;
            let r = idx / TK;
            let kk = idx % TK;
            var v = 0.0;
            if m0 + r < dims.m {
                v = f32(x[(m0 + r) * dims.k + k0 + kk]);
            }
            xs[kk * TM + r] = v;
        }
        // W: 64 rows × one block. Rows past n stage zeros.
        let g = k0 / GROUP;
        if Q4 {
            // 4 words per row: one per invocation, 8 weights each.
            let c = t / 4u;
            let w = t % 4u;
            var lo = vec4<f32>(0.0);
            var hi = vec4<f32>(0.0);
            if n0 + c < dims.n {
                let word = packed[(n0 + c) * dims.words_per_row + k0 / 8u + w];
                let d = scale(n0 + c, g);
                lo = d * q4_low(word);
                hi = d * q4_high(word);
            }
            stage_w(4u * w, c, lo);
            stage_w(16u + 4u * w, c, hi);
        } else {
            // 8 words per row: two per invocation, 4 weights each.
            for (var i = 0u; i < 2u; i++) {
                let idx = i * 256u + t;
                let c = idx / 8u;
                let w = idx % 8u;
                var v = vec4<f32>(0.0);
                if n0 + c < dims.n {
                    let word = packed[(n0 + c) * dims.words_per_row + k0 / 4u + w];
                    v = scale(n0 + c, g) * q8_word(word);
                }
                stage_w(4u * w, c, v);
            }
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            let xo = kk * TM + lid.y * 4u;
            let wo = kk * TN + lid.x * 4u;
            let b = vec4<f32>(ws[wo], ws[wo + 1u], ws[wo + 2u], ws[wo + 3u]);
            acc0 = fma(vec4<f32>(xs[xo]), b, acc0);
            acc1 = fma(vec4<f32>(xs[xo + 1u]), b, acc1);
            acc2 = fma(vec4<f32>(xs[xo + 2u]), b, acc2);
            acc3 = fma(vec4<f32>(xs[xo + 3u]), b, acc3);
        }
        workgroupBarrier();
    }
    let i0 = m0 + lid.y * 4u;
    let j0 = n0 + lid.x * 4u;
    var accs = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
    for (var a = 0u; a < 4u; a++) {
        for (var b = 0u; b < 4u; b++) {
            if i0 + a < dims.m && j0 + b < dims.n {
                store(i0 + a, j0 + b, accs[a][b]);
            }
        }
    }
}

// ---- qmatmul_rows --------------------------------------------------------------------------

override ROWS_WG: u32 = 64u;

// Adds x[xo + kk .. xo + kk+3] · v to acc, one fma per input in increasing k.
fn dot4(acc: f32, xo: u32, v: vec4<f32>) -> f32 {
    var s = fma(f32(x[xo]), v.x, acc);
    s = fma(f32(x[xo + 1u]), v.y, s);
    s = fma(f32(x[xo + 2u]), v.z, s);
    return fma(f32(x[xo + 3u]), v.w, s);
}

// One invocation per output (row i of X, row j of W), j along x, i along y.
@compute @workgroup_size(ROWS_WG)
fn qmatmul_rows(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let j = wg.x * ROWS_WG + lid;
    let i = wg.y;
    if j >= dims.n {
        return;
    }
    let wrow = j * dims.words_per_row;
    let xrow = i * dims.k;
    var acc = 0.0;
    if Q4 {
        // A block's 8 elements per word are not consecutive (low nibbles, then high ones 16
        // later): walk the block's low halves, then its high halves, to keep increasing k.
        for (var k0 = 0u; k0 < dims.k; k0 += 32u) {
            let d = scale(j, k0 / GROUP);
            let base = wrow + k0 / 8u;
            for (var w = 0u; w < 4u; w++) {
                acc = dot4(acc, xrow + k0 + 4u * w, d * q4_low(packed[base + w]));
            }
            for (var w = 0u; w < 4u; w++) {
                acc = dot4(acc, xrow + k0 + 16u + 4u * w, d * q4_high(packed[base + w]));
            }
        }
    } else {
        for (var w = 0u; w < dims.words_per_row; w++) {
            let d = scale(j, (4u * w) / GROUP);
            acc = dot4(acc, xrow + 4u * w, d * q8_word(packed[wrow + w]));
        }
    }
    store(i, j, acc);
}

// ---- qmatmul_wg ----------------------------------------------------------------------------

const WG: u32 = 64u;
var<workgroup> partial: array<f32, WG>;

// One workgroup per output (row i = wg.y of X, row j = wg.x of W). Lane l takes the weight
// row's blocks l, l + 64, ... (q4: 4 words each; q8: 8), reading consecutive words across
// lanes; the 64 partial sums are added in a fixed tree, so results repeat bit for bit.
@compute @workgroup_size(WG)
fn qmatmul_wg(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let j = wg.x;
    let i = wg.y;
    let wrow = j * dims.words_per_row;
    let xrow = i * dims.k;
    let blocks = dims.k / 32u;
    var acc = 0.0;
    for (var blk = lid; blk < blocks; blk += WG) {
        let k0 = blk * 32u;
        let d = scale(j, k0 / GROUP);
        if Q4 {
            // Low halves, then high halves: increasing k within the lane, as in qmatmul_rows.
            let base = wrow + blk * 4u;
            for (var w = 0u; w < 4u; w++) {
                acc = dot4(acc, xrow + k0 + 4u * w, d * q4_low(packed[base + w]));
            }
            for (var w = 0u; w < 4u; w++) {
                acc = dot4(acc, xrow + k0 + 16u + 4u * w, d * q4_high(packed[base + w]));
            }
        } else {
            let base = wrow + blk * 8u;
            for (var w = 0u; w < 8u; w++) {
                acc = dot4(acc, xrow + k0 + 4u * w, d * q8_word(packed[base + w]));
            }
        }
    }
    partial[lid] = acc;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if lid < s {
            partial[lid] += partial[lid + s];
        }
        workgroupBarrier();
    }
    if lid == 0u {
        store(i, j, partial[0]);
    }
}

// ---- qmatmul_pack_b -------------------------------------------------------------------------

// The texture matmul's B operand for Y = X·Wᵀ: texel (x, k) = (W[4x, k], .., W[4x+3, k]), zeros
// past n; k rows (k is a multiple of 32, the texture's K rounding, so no zero rows follow).
@group(0) @binding(8) var packed_b: texture_storage_2d_array<rgba32float, write>;

@compute @workgroup_size(64)
fn qmatmul_pack_b(@builtin(global_invocation_id) gid: vec3<u32>) {
    let size = textureDimensions(packed_b);
    if gid.x >= size.x || gid.y >= size.y {
        return;
    }
    var v = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j++) {
        let r = 4u * gid.x + j;
        if r < dims.n && gid.y < dims.k {
            v[j] = weight(r, gid.y);
        }
    }
    textureStore(packed_b, gid.xy, 0, v);
}

// ---- qembed --------------------------------------------------------------------------------

// out[r, c] = W[token(r), c] + wpe[pos(r), c] for dims.m rows of dims.k channels: token(r) =
// tokens[r] and pos(r) = r % seq, or with ONE_TOKEN the decode step's (tokens[0], tokens[1]).
// Token ids are checked on the host; an id past the table reads zeros rather than out of bounds.
@compute @workgroup_size(ROWS_WG)
fn qembed(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = (wg.y * dims.groups_x + wg.x) * ROWS_WG + lid;
    let c = dims.k;
    if idx >= dims.m * c {
        return;
    }
    let r = idx / c;
    let ch = idx % c;
    var tok = tokens[r];
    var pos = r % dims.seq;
    if ONE_TOKEN {
        tok = tokens[0];
        pos = tokens[1];
    }
    var e = 0.0;
    if tok < dims.n {
        e = weight(tok, ch);
    }
    y[idx] = T(e + f32(wpe[pos * c + ch]));
}
