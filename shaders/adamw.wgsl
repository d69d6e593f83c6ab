// Fused AdamW over the whole flat parameter buffer in one dispatch, in PyTorch's order
// (torch.optim.AdamW, single-tensor path):
//
//     g     = grads[i] / loss_scale, times grad_clip / (norm / loss_scale) when that norm exceeds
//             grad_clip > 0, where loss_scale = step.loss_scale * scale[0]: the host's factor
//             (the micro-batch count, since each micro-batch adds the gradient of its own mean
//             loss) times the dynamic loss scale, which lives on the GPU (shaders/lossscale.wgsl)
//     w     = w * (1 - lr*wd)                       only for elements of decayed tensors
//     m     = lerp(m, g, 1 - beta1)                 PyTorch's lerp, both branches
//     v     = v * beta2 + ((1 - beta2) * g) * g     addcmul
//     w     = w + (-lr / bc1 * m) / (sqrt(v) / sqrt(bc2) + eps)    addcdiv
//     working[i] = T(w)
//
// Every scalar that PyTorch computes in Python floats (1 - beta, lr / bc1, sqrt(bc2), 1 - lr*wd,
// with bc = 1 - beta^t) arrives precomputed in f64 and rounded once to f32 in the per-step
// storage buffer `step`, which the host writes with queue.write_buffer: nothing here waits on the
// host, and no GPU pow or sqrt of a scalar can differ from the CPU reference.
//
// When the gradient-norm pass raised its inf/NaN flag the whole update is skipped: no weight or
// moment is written, and invocation 0 alone increments skipped[0].
//
// Decay: `ranges` lists the decayed tensors as sorted, disjoint [start, end) element ranges
// (adjacent ones merged); an element is decayed when the first range ending after it has also
// started at or before it.

struct Params {
    n: u32,
    n_ranges: u32,
    // Workgroups of the 1-D dispatch; invocations stride over the buffer by groups * WG.
    groups: u32,
    _pad: u32,
}

struct Step {
    beta2: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    eps: f32,
    grad_clip: f32,
    loss_scale: f32,
    // lr / (1 - beta1^t)
    step_size: f32,
    // sqrt(1 - beta2^t)
    bc2_sqrt: f32,
    // 1 - lr * weight_decay
    decay_factor: f32,
    _pad0: f32,
    _pad1: f32,
    _pad2: f32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> step: Step;
@group(0) @binding(2) var<storage, read_write> weights: array<f32>;
@group(0) @binding(3) var<storage, read_write> exp_avg: array<f32>;
@group(0) @binding(4) var<storage, read_write> exp_avg_sq: array<f32>;
@group(0) @binding(5) var<storage, read_write> working: array<T>;
@group(0) @binding(6) var<storage, read> grads: array<T>;
@group(0) @binding(7) var<storage, read> grads_f32: array<f32>;
@group(0) @binding(8) var<storage, read> norm: array<f32>;
@group(0) @binding(9) var<storage, read> flag: array<u32>;
@group(0) @binding(10) var<storage, read_write> skipped: array<u32>;
@group(0) @binding(11) var<storage, read> ranges: array<vec2<u32>>;
@group(0) @binding(12) var<storage, read> scale: array<f32>;

// The same buffers seen four elements at a time, for the `_vec4` entries, which the host picks
// when the length is a multiple of 4 (every binding offset is 256-byte aligned already). One
// vec4 load or store is one memory instruction for four elements: on lavapipe each storage
// access is a loop over the SIMD lanes, so this divides the kernel's dominant cost by four.
@group(0) @binding(13) var<storage, read_write> weights4: array<vec4<f32>>;
@group(0) @binding(14) var<storage, read_write> exp_avg4: array<vec4<f32>>;
@group(0) @binding(15) var<storage, read_write> exp_avg_sq4: array<vec4<f32>>;
@group(0) @binding(16) var<storage, read_write> working4: array<vec4<T>>;
@group(0) @binding(17) var<storage, read> grads4: array<vec4<T>>;
@group(0) @binding(18) var<storage, read> grads_f32_4: array<vec4<f32>>;

const WG: u32 = 256u;

// The index of the first range that ends after i (n_ranges when none does): the range an element
// i is decayed by, if it has started. Each invocation asks once, for its first element, and then
// walks the table forward as its elements grow (`next_range`), so the table costs a handful of
// loads per invocation rather than a binary search per element.
fn first_range(i: u32) -> u32 {
    var lo = 0u;
    var hi = params.n_ranges;
    while (lo < hi) {
        let mid = (lo + hi) / 2u;
        if (ranges[mid].y <= i) {
            lo = mid + 1u;
        } else {
            hi = mid;
        }
    }
    return lo;
}

// Range r of the table, or an empty one past its end.
fn range_at(r: u32) -> vec2<u32> {
    if (r < params.n_ranges) {
        return ranges[r];
    }
    return vec2<u32>(0xffffffffu, 0xffffffffu);
}

// Whether element e is decayed, moving the cursor (r, cur = range_at(r)) forward past the ranges
// that end at or before e. Every entry point walks its elements in increasing order.
fn decayed_at(e: u32, r: ptr<function, u32>, cur: ptr<function, vec2<u32>>) -> bool {
    while (*r < params.n_ranges && (*cur).y <= e) {
        *r += 1u;
        *cur = range_at(*r);
    }
    return *r < params.n_ranges && (*cur).x <= e;
}

// Both factors are powers of two or small integers in practice, so the product is exact and
// equals the single loss_scale of the CPU reference.
fn loss_scale() -> f32 {
    return step.loss_scale * scale[0];
}

// The factor that turns a raw (loss-scaled) gradient into the clipped, unscaled one is applied as
// a division by loss_scale and then a multiplication by the clip factor, the CPU reference's order.
fn clip_factor() -> f32 {
    let unscaled = norm[0] / loss_scale();
    if (step.grad_clip > 0.0 && unscaled > step.grad_clip) {
        return step.grad_clip / unscaled;
    }
    return 1.0;
}

// Returns true when the step is skipped; counts the skip once.
fn skip(gid: u32) -> bool {
    if (flag[0] != 0u) {
        if (gid == 0u) {
            skipped[0] += 1u;
        }
        return true;
    }
    return false;
}

// The per-step scalars, read from the buffers once per invocation: every element of a step uses
// the same values, and on CPU-backed adapters each storage load costs a loop over the lanes.
struct Hoisted {
    beta2: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    eps: f32,
    step_size: f32,
    bc2_sqrt: f32,
    decay_factor: f32,
    ls: f32,
    clip: f32,
}

fn hoist() -> Hoisted {
    let st = step;
    return Hoisted(st.beta2, st.one_minus_beta1, st.one_minus_beta2, st.eps, st.step_size,
                   st.bc2_sqrt, st.decay_factor, loss_scale(), clip_factor());
}

fn update(i: u32, raw: f32, decay: bool, h: Hoisted) {
    let g = raw / h.ls * h.clip;
    var w = weights[i];
    if (decay) {
        w = w * h.decay_factor;
    }
    let wt = h.one_minus_beta1;
    var m = exp_avg[i];
    if (abs(wt) < 0.5) {
        m = m + wt * (g - m);
    } else {
        m = g - (g - m) * (1.0 - wt);
    }
    let v = exp_avg_sq[i] * h.beta2 + h.one_minus_beta2 * g * g;
    let denom = sqrt(v) / h.bc2_sqrt + h.eps;
    w = w + (-h.step_size * m) / denom;
    weights[i] = w;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    working[i] = T(w);
}

// Each invocation strides over the buffer by groups * WG (consecutive invocations touch
// consecutive elements, so loads stay coalesced) and handles ceil(n / (groups * WG)) elements;
// the host picks `groups` so that this is several elements, which amortises the hoisted loads and
// the range lookup. The decayed-range cursor r only moves forward because i only grows.
// Gradients stored as T (f16 or f32).
@compute @workgroup_size(WG)
fn adamw(@builtin(global_invocation_id) id: vec3<u32>) {
    if (skip(id.x)) {
        return;
    }
    let h = hoist();
    let n = params.n;
    let stride = params.groups * WG;
    var r = first_range(id.x);
    var cur = range_at(r);
    for (var i = id.x; i < n; i += stride) {
        update(i, f32(grads[i]), decayed_at(i, &r, &cur), h);
    }
}

// Gradients kept in f32 while the working copy is T (f16).
@compute @workgroup_size(WG)
fn adamw_f32_grads(@builtin(global_invocation_id) id: vec3<u32>) {
    if (skip(id.x)) {
        return;
    }
    let h = hoist();
    let n = params.n;
    let stride = params.groups * WG;
    var r = first_range(id.x);
    var cur = range_at(r);
    for (var i = id.x; i < n; i += stride) {
        update(i, grads_f32[i], decayed_at(i, &r, &cur), h);
    }
}

// update() on four consecutive elements, component by component in the same order of
// operations, so the results are bit-identical to the scalar entries'.
fn update4(q: u32, raw: vec4<f32>, decay: vec4<bool>, h: Hoisted) {
    let g = raw / h.ls * h.clip;
    let w0 = weights4[q];
    let w = select(w0, w0 * h.decay_factor, decay);
    let wt = h.one_minus_beta1;
    var m = exp_avg4[q];
    if (abs(wt) < 0.5) {
        m = m + wt * (g - m);
    } else {
        m = g - (g - m) * (1.0 - wt);
    }
    let v = exp_avg_sq4[q] * h.beta2 + h.one_minus_beta2 * g * g;
    let denom = sqrt(v) / h.bc2_sqrt + h.eps;
    let w2 = w + (-h.step_size * m) / denom;
    weights4[q] = w2;
    exp_avg4[q] = m;
    exp_avg_sq4[q] = v;
    working4[q] = vec4<T>(w2);
}

// Walks the decayed-range cursor (r, cur) over the four elements of group q and returns which are
// decayed. Ranges may start or end inside a group of four.
fn decay4(q: u32, r: ptr<function, u32>, cur: ptr<function, vec2<u32>>) -> vec4<bool> {
    var d = vec4<bool>(false);
    for (var c = 0u; c < 4u; c++) {
        d[c] = decayed_at(4u * q + c, r, cur);
    }
    return d;
}

@compute @workgroup_size(WG)
fn adamw_vec4(@builtin(global_invocation_id) id: vec3<u32>) {
    if (skip(id.x)) {
        return;
    }
    let h = hoist();
    let n4 = params.n / 4u;
    let stride = params.groups * WG;
    var r = first_range(4u * id.x);
    var cur = range_at(r);
    for (var q = id.x; q < n4; q += stride) {
        update4(q, vec4<f32>(grads4[q]), decay4(q, &r, &cur), h);
    }
}

@compute @workgroup_size(WG)
fn adamw_f32_grads_vec4(@builtin(global_invocation_id) id: vec3<u32>) {
    if (skip(id.x)) {
        return;
    }
    let h = hoist();
    let n4 = params.n / 4u;
    let stride = params.groups * WG;
    var r = first_range(4u * id.x);
    var cur = range_at(r);
    for (var q = id.x; q < n4; q += stride) {
        update4(q, grads_f32_4[q], decay4(q, &r, &cur), h);
    }
}
