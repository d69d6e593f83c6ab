// GELU, GPT-2's tanh approximation, element-wise:
//
//     gelu(x)  = 0.5 * x * (1 + tanh(u)),   u = sqrt(2/pi) * (x + 0.044715 * x^3)
//     gelu'(x) = 0.5 * (1 + tanh(u)) + 0.5 * x * (1 - tanh(u)^2) * du/dx
//
// Arithmetic is f32 whatever the storage type T is.
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

// sqrt(2 / pi) and the cubic coefficient.
const GELU_SCALE: f32 = 0.7978845608;
const GELU_CUBIC: f32 = 0.044715;
// Past this |u|, tanh(u) is +-1 in f32: 1 - tanh(10) ~ 4e-9 is under half an ulp of 1 (3e-8).
const TANH_SATURATED: f32 = 10.0;

fn element(wg: vec3<u32>, lid: u32) -> u32 {
    return (wg.y * dims.groups_x + wg.x) * WG + lid;
}

fn gelu_u(x: f32) -> f32 {
    return GELU_SCALE * (x + GELU_CUBIC * x * x * x);
}

// tanh that never sees a large argument. u grows like x^3, and some drivers evaluate tanh(u) as
// (e^2u - 1) / (e^2u + 1), which is inf / inf = NaN once e^2u overflows (u > ~44 in f32). Past
// TANH_SATURATED the exact f32 answer is +-1, returned as such rather than trusting the driver's
// tanh near the clamp to round to exactly 1 (a 1-ulp error there would make gelu(-1e4) = -3e-4
// instead of 0). NaN stays NaN: abs(NaN) >= 10 is false.
fn safe_tanh(u: f32) -> f32 {
    let t = tanh(clamp(u, -TANH_SATURATED, TANH_SATURATED));
    return select(t, sign(u), abs(u) >= TANH_SATURATED);
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
    let x = f32(inp[i]);
    out[i] = T(0.5 * x * (1.0 + safe_tanh(gelu_u(x))));
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
    let x = f32(inp[i]);
    let u = gelu_u(x);
    let t = safe_tanh(u);
    // The sech^2 term is below f32's resolution once tanh saturates (under 1e-7 at |u| = 10, and
    // falling like e^-2u), so it is dropped there rather than computed: x * du/dx overflows to inf
    // for |x| > ~1e19 and 0 * inf would be NaN.
    let du = GELU_SCALE * (1.0 + 3.0 * GELU_CUBIC * x * x);
    let tail = select(0.5 * x * (1.0 - t * t) * du, 0.0, abs(u) >= TANH_SATURATED);
    var v = f32(dout[i]) * (0.5 * (1.0 + t) + tail);
    if ACCUMULATE {
        v += f32(dinp[i]);
    }
    dinp[i] = T(v);
}
