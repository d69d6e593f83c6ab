// Element-wise sums for the residual stream:
//
//     residual_forward   out = a + b
//     add_inplace        dst += src   (the residual backward: the output gradient is added into
//                                      each branch's gradient)
//
// Sums are formed in f32 and rounded once to T. One invocation per element; the index is linear
// over a 2-D grid of workgroups, (wg.y * groups_x + wg.x) * WG + lid, because large tensors need
// more than the 65535 workgroups allowed per dimension.

struct Dims {
    n: u32,
    groups_x: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> a: array<T>;
@group(0) @binding(2) var<storage, read> b: array<T>;
@group(0) @binding(3) var<storage, read_write> out: array<T>;
@group(0) @binding(4) var<storage, read> src: array<T>;
@group(0) @binding(5) var<storage, read_write> dst: array<T>;

override WG: u32 = 256u;

fn element(wg: vec3<u32>, lid: u32) -> u32 {
    return (wg.y * dims.groups_x + wg.x) * WG + lid;
}

@compute @workgroup_size(WG)
fn residual_forward(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = element(wg, lid);
    if i >= dims.n {
        return;
    }
    out[i] = T(f32(a[i]) + f32(b[i]));
}

@compute @workgroup_size(WG)
fn add_inplace(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = element(wg, lid);
    if i >= dims.n {
        return;
    }
    dst[i] = T(f32(dst[i]) + f32(src[i]));
}
