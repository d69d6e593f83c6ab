// Rotary position embedding (RoPE), rotate-half convention (Hugging Face's Llama), in place:
//
//     out[i]       = x[i] * cos(a) - x[i + d/2] * sin(a)
//     out[i + d/2] = x[i + d/2] * cos(a) + x[i] * sin(a),   a = pos * inv_freq[i],  i < d/2
//
// The backward (INVERSE) rotates by -a: the transpose of a rotation is its inverse.
//
// One invocation per (row, head, pair). Row r = b * seq + t starts at r * row_stride; its
// rotated heads start at offset within the row and are head_dim apart; it is at position
// first_position + t. So the q and k heads of a fused qkv projection are rotated in place by one
// dispatch, and v is never touched.
//
// inv_freq (d/2 f32 values) comes from the host, computed exactly as the CPU reference and
// Hugging Face do, so a = f32(pos) * inv_freq[i] is the same f32 product on both sides. cos and
// sin are computed here in f32: no table of positions to size or fill, any position works (the
// decoder's too). GPU sin/cos are only specified on [-pi, pi], and angles reach thousands of
// radians for long contexts, so the angle is first reduced by 2 pi with a three-part Cody-Waite
// split: k * C1 and k * C2 are exact for k < 2^16 (C1 and C2 have 8 significant bits), so the
// reduced angle is accurate to a few 1e-7 for |a| up to ~4e5 radians.
//
// Element index: (wg.y * groups_x + wg.x) * WG + lid over a 2-D grid of workgroups.

struct Dims {
    // Pairs in all: rows * heads * half.
    n: u32,
    groups_x: u32,
    half: u32,
    heads: u32,
    seq: u32,
    offset: u32,
    row_stride: u32,
    first_position: u32,
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read_write> x: array<T>;
@group(0) @binding(2) var<storage, read> inv_freq: array<f32>;
// rope_at_step only: the decoder's (token, pos).
@group(0) @binding(3) var<storage, read> at_step: array<u32>;

override WG: u32 = 256u;
override INVERSE: bool = false;

const INV_TWO_PI: f32 = 0.15915494;
// 2 pi = C1 + C2 + C3; C1 = 201/32 and C2 = 253/2^17 have 8 significant bits each.
const TWO_PI_1: f32 = 6.28125;
const TWO_PI_2: f32 = 0.00193023681640625;
const TWO_PI_3: f32 = 5.0703634e-6;

// a - 2 pi k with k = round(a / 2 pi), in [-pi, pi] up to rounding.
fn reduce(a: f32) -> f32 {
    let k = round(a * INV_TWO_PI);
    return ((a - k * TWO_PI_1) - k * TWO_PI_2) - k * TWO_PI_3;
}

// Rotates pair e (of dims.n) with t = 0 at position `first_position`.
fn rotate(e: u32, first_position: u32) {
    if e >= dims.n {
        return;
    }
    let i = e % dims.half;
    let rest = e / dims.half;
    let h = rest % dims.heads;
    let row = rest / dims.heads;
    let t = row % dims.seq;
    let lo = row * dims.row_stride + dims.offset + h * 2u * dims.half + i;
    let hi = lo + dims.half;
    let r = reduce(f32(first_position + t) * inv_freq[i]);
    let c = cos(r);
    var s = sin(r);
    if INVERSE {
        s = -s;
    }
    let a = f32(x[lo]);
    let b = f32(x[hi]);
    x[lo] = T(a * c - b * s);
    x[hi] = T(b * c + a * s);
}

@compute @workgroup_size(WG)
fn rope(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    rotate((wg.y * dims.groups_x + wg.x) * WG + lid, dims.first_position);
}

// The KV-cache decoder's rotation: the position of t = 0 is first_position plus word 1 of the
// decoder's step buffer (token, pos), which the host rewrites before each token, so one prepared
// dispatch serves every position. Same function as `rope`, so a row rotated here at position p
// is bit-identical to row p of the training forward's rotation.
@compute @workgroup_size(WG)
fn rope_at_step(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    rotate((wg.y * dims.groups_x + wg.x) * WG + lid, dims.first_position + at_step[1]);
}
