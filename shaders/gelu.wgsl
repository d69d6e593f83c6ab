// GPT-2's tanh-approximated GELU and its derivative, in f32, shared by the activation kernels
// (activation.wgsl) and the matmul epilogue (matmul.wgsl), so that a fused product gives
// exactly what the product followed by the activation kernel gives.
//
//     gelu(x)  = 0.5 * x * (1 + tanh(u)),   u = sqrt(2/pi) * (x + 0.044715 * x^3)
//     gelu'(x) = 0.5 * (1 + tanh(u)) + 0.5 * x * (1 - tanh(u)^2) * du/dx

// sqrt(2 / pi) and the cubic coefficient.
const GELU_SCALE: f32 = 0.7978845608;
const GELU_CUBIC: f32 = 0.044715;
// Past this |u|, tanh(u) is +-1 in f32: 1 - tanh(10) ~ 4e-9 is under half an ulp of 1 (3e-8).
const TANH_SATURATED: f32 = 10.0;

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

fn gelu(x: f32) -> f32 {
    return 0.5 * x * (1.0 + safe_tanh(gelu_u(x)));
}

// The sech^2 term is below f32's resolution once tanh saturates (under 1e-7 at |u| = 10, and
// falling like e^-2u), so it is dropped there rather than computed: x * du/dx overflows to inf
// for |x| > ~1e19 and 0 * inf would be NaN.
fn gelu_grad(x: f32) -> f32 {
    let u = gelu_u(x);
    let t = safe_tanh(u);
    let du = GELU_SCALE * (1.0 + 3.0 * GELU_CUBIC * x * x);
    let tail = select(0.5 * x * (1.0 - t * t) * du, 0.0, abs(u) >= TANH_SATURATED);
    return 0.5 * (1.0 + t) + tail;
}
