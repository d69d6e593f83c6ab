// Global L2 norm of a gradient buffer, and whether any element is inf or NaN.
//
// Deterministic by construction (no atomics, no order that depends on timing):
//   gradnorm_partial   workgroup g sums the squares of its contiguous chunk [g*chunk, (g+1)*chunk)
//                      (each invocation a fixed strided slice, then a fixed-shape tree) into
//                      partials[g], and ORs a non-finite test of its elements into flags[g];
//   gradnorm_final     one workgroup reduces partials[0..groups) the same way, in the same order
//                      every time, and writes norm[0] = sqrt(sum) and flag[0].
// The flag is also raised when the sum of squares overflows f32 although every element is finite,
// since the norm is then infinite and no clipping or update could be trusted.
// Squares are summed in f32 whatever T is.

struct Params {
    n: u32,
    chunk: u32,
    groups: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> grads: array<T>;
@group(0) @binding(2) var<storage, read_write> partials: array<f32>;
@group(0) @binding(3) var<storage, read_write> partial_flags: array<u32>;
@group(0) @binding(4) var<storage, read_write> norm: array<f32>;
@group(0) @binding(5) var<storage, read_write> flag: array<u32>;

const WG: u32 = 256u;

var<workgroup> red_sum: array<f32, WG>;
var<workgroup> red_flag: array<u32, WG>;

// inf and NaN are exactly the values with an all-ones exponent. A bit test, because compilers
// that assume finite maths may fold `x != x` to false.
fn non_finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) == 0x7f800000u;
}

// Tree over the workgroup; leaves the totals in red_sum[0] and red_flag[0].
fn reduce(lid: u32) {
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
        if (lid < k) {
            red_sum[lid] += red_sum[lid + k];
            red_flag[lid] |= red_flag[lid + k];
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(WG)
fn gradnorm_partial(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let start = wg.x * params.chunk;
    let end = min(start + params.chunk, params.n);
    var s = 0.0;
    var f = 0u;
    for (var i = start + lid; i < end; i += WG) {
        let x = f32(grads[i]);
        s += x * x;
        f |= u32(non_finite(x));
    }
    red_sum[lid] = s;
    red_flag[lid] = f;
    reduce(lid);
    if (lid == 0u) {
        partials[wg.x] = red_sum[0];
        partial_flags[wg.x] = red_flag[0];
    }
}

@compute @workgroup_size(WG)
fn gradnorm_final(@builtin(local_invocation_index) lid: u32) {
    var s = 0.0;
    var f = 0u;
    for (var i = lid; i < params.groups; i += WG) {
        s += partials[i];
        f |= partial_flags[i];
    }
    red_sum[lid] = s;
    red_flag[lid] = f;
    reduce(lid);
    if (lid == 0u) {
        let total = red_sum[0];
        norm[0] = sqrt(total);
        flag[0] = red_flag[0] | u32(non_finite(total));
    }
}
