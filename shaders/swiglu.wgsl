// SwiGLU, Llama's MLP activation, over a (rows, 2 * hidden) input whose rows hold the gate half
// then the up half (one matmul by the concatenated [W_gate; W_up] weight):
//
//     out[r, j]   = silu(g) * u,       g = inp[r, j], u = inp[r, hidden + j], silu(x) = x * sigmoid(x)
//     dgate[r, j] = dout[r, j] * u * silu'(g),   silu'(x) = s * (1 + x * (1 - s)),  s = sigmoid(x)
//     dup[r, j]   = dout[r, j] * silu(g)
//
// dgate and dup are written to the two halves of dinp, the same (rows, 2 * hidden) layout.
// Arithmetic is f32 whatever the storage type T is.
//
// sigmoid never forms exp of a positive number: with e = exp(-|x|) in (0, 1], s = 1 / (1 + e)
// for x >= 0 and e / (1 + e) for x < 0, and 1 - s is the other one of the two, so there is no
// overflow, no inf / inf, and 1 - s keeps its relative precision for large x. At the limits
// (s = 0 for x below ~-88 in f32, 1 - s = 0 above ~17) the products x * s and x * (1 - s) are
// replaced by their limit 0, so x = -inf gives silu 0 and silu' 0 and x = +inf gives silu' 1,
// not 0 * inf = NaN. NaN stays NaN.
//
// One invocation per output element (r, j), on a 2-D grid of workgroups:
// e = (wg.y * groups_x + wg.x) * WG + lid.

struct Dims {
    // rows * hidden.
    n: u32,
    hidden: u32,
    groups_x: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> inp: array<T>;
@group(0) @binding(2) var<storage, read_write> out: array<T>;
@group(0) @binding(3) var<storage, read> dout: array<T>;
@group(0) @binding(4) var<storage, read_write> dinp: array<T>;

override WG: u32 = 256u;
override ACCUMULATE: bool = false;

// (sigmoid(x), 1 - sigmoid(x)), both to full relative precision.
fn sigmoid_pair(x: f32) -> vec2<f32> {
    let e = exp(-abs(x));
    let q = 1.0 / (1.0 + e);
    let p = e * q;
    return select(vec2<f32>(p, q), vec2<f32>(q, p), x >= 0.0);
}

fn silu(x: f32, s: vec2<f32>) -> f32 {
    return select(x * s.x, 0.0, s.x == 0.0);
}

fn silu_grad(x: f32, s: vec2<f32>) -> f32 {
    let t = select(x * s.y, 0.0, s.y == 0.0);
    return select(s.x * (1.0 + t), 0.0, s.x == 0.0);
}

// Index of the gate element of output element e: row r = e / hidden starts at r * 2 * hidden.
fn gate_index(e: u32) -> u32 {
    return e + (e / dims.hidden) * dims.hidden;
}

@compute @workgroup_size(WG)
fn swiglu_forward(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = (wg.y * dims.groups_x + wg.x) * WG + lid;
    if e >= dims.n {
        return;
    }
    let gi = gate_index(e);
    let g = f32(inp[gi]);
    let u = f32(inp[gi + dims.hidden]);
    out[e] = T(silu(g, sigmoid_pair(g)) * u);
}

@compute @workgroup_size(WG)
fn swiglu_backward(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = (wg.y * dims.groups_x + wg.x) * WG + lid;
    if e >= dims.n {
        return;
    }
    let gi = gate_index(e);
    let ui = gi + dims.hidden;
    let g = f32(inp[gi]);
    let u = f32(inp[ui]);
    let dy = f32(dout[e]);
    let s = sigmoid_pair(g);
    var dg = dy * u * silu_grad(g, s);
    var du = dy * silu(g, s);
    if ACCUMULATE {
        dg += f32(dinp[gi]);
        du += f32(dinp[ui]);
    }
    dinp[gi] = T(dg);
    dinp[ui] = T(du);
}
