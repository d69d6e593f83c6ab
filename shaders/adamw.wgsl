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
// (adjacent ones merged); an element is decayed when the last range starting at or before it
// also ends after it (a binary search over a table of at most a few hundred entries).

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

const WG: u32 = 256u;

fn decayed(i: u32) -> bool {
    // lo ends as the number of ranges whose start is <= i.
    var lo = 0u;
    var hi = params.n_ranges;
    while (lo < hi) {
        let mid = (lo + hi) / 2u;
        if (ranges[mid].x <= i) {
            lo = mid + 1u;
        } else {
            hi = mid;
        }
    }
    return lo > 0u && i < ranges[lo - 1u].y;
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

fn update(i: u32, raw: f32, ls: f32, clip: f32) {
    let g = raw / ls * clip;
    var w = weights[i];
    if (decayed(i)) {
        w = w * step.decay_factor;
    }
    let wt = step.one_minus_beta1;
    var m = exp_avg[i];
    if (abs(wt) < 0.5) {
        m = m + wt * (g - m);
    } else {
        m = g - (g - m) * (1.0 - wt);
    }
    let v = exp_avg_sq[i] * step.beta2 + step.one_minus_beta2 * g * g;
    let denom = sqrt(v) / step.bc2_sqrt + step.eps;
    w = w + (-step.step_size * m) / denom;
    weights[i] = w;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    working[i] = T(w);
}

// Gradients stored as T (f16 or f32).
@compute @workgroup_size(WG)
fn adamw(@builtin(global_invocation_id) id: vec3<u32>) {
    if (skip(id.x)) {
        return;
    }
    let ls = loss_scale();
    let clip = clip_factor();
    for (var i = id.x; i < params.n; i += params.groups * WG) {
        update(i, f32(grads[i]), ls, clip);
    }
}

// Gradients kept in f32 while the working copy is T (f16).
@compute @workgroup_size(WG)
fn adamw_f32_grads(@builtin(global_invocation_id) id: vec3<u32>) {
    if (skip(id.x)) {
        return;
    }
    let ls = loss_scale();
    let clip = clip_factor();
    for (var i = id.x; i < params.n; i += params.groups * WG) {
        update(i, grads_f32[i], ls, clip);
    }
}
