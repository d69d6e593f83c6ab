// GELU, GPT-2's tanh approximation, element-wise, forward and backward. The formulas are in
// gelu.wgsl, shared with the matmul epilogue that applies them to a product's output (EPILOGUE in
// matmul.wgsl). Arithmetic is f32 whatever the storage type T is.
//
// One invocation per element. The element index is linear over a 2-D grid of workgroups,
// (wg.y * groups_x + wg.x) * WG + lid, because a large activation (64 x 256 x 1536 = 25M
// elements is 98304 workgroups of 256) exceeds the 65535 workgroups allowed per dimension.

struct Dims {
    n: u32,
    groups_x: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> inp: array<T>;
@group(0) @binding(2) var<storage, read_write> out: array<T>;
@group(0) @binding(3) var<storage, read> dout: array<T>;
@group(0) @binding(4) var<storage, read_write> dinp: array<T>;

override WG: u32 = 256u;
override ACCUMULATE: bool = false;

fn element(wg: vec3<u32>, lid: u32) -> u32 {
    return (wg.y * dims.groups_x + wg.x) * WG + lid;
}

@compute @workgroup_size(WG)
fn gelu_forward(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = element(wg, lid);
    if i >= dims.n {
        return;
    }
    out[i] = T(gelu(f32(inp[i])));
}

@compute @workgroup_size(WG)
fn gelu_backward(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = element(wg, lid);
    if i >= dims.n {
        return;
    }
    var v = f32(dout[i]) * gelu_grad(f32(inp[i]));
    if ACCUMULATE {
        v += f32(dinp[i]);
    }
    dinp[i] = T(v);
}
