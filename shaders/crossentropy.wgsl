// Fused softmax + cross-entropy over the vocabulary, forward and backward in one dispatch:
//
//     loss[r]      = logsumexp(logits[r, :]) - logits[r, targets[r]]          (0 where ignored)
//     dlogits[r,j] = (softmax(logits[r, :])[j] - [j == targets[r]]) * dloss_scale[0] / count
//
// where count is the number of rows whose target is not params.ignore_index, so dlogits is the
// gradient of the MEAN loss (times the loss-scaling factor). Ignored rows get a zero gradient.
// A target >= V that is not ignore_index cannot be reported from here, so its row gets a NaN loss
// and a NaN gradient: the gradient-norm flag then catches it and the optimizer skips the step.
//
// Two entry points, recorded in this order into one pass:
//   count_targets  one workgroup counts the non-ignored targets into count[0] (integer, so the
//                  order of the sum cannot change the result);
//   crossentropy   one workgroup per row, or
//   crossentropy_rows  one invocation per row (ROWS_WG rows per workgroup, no workgroup memory
//                  and no barriers): for CPU-backed adapters such as lavapipe, where barriers
//                  cost more than the row's arithmetic. Its sweep is the same online loop over
//                  the whole row in increasing j.
//
// The row's max and sum of exponentials are found in one sweep with the online rescaling trick
// (s is the sum of exp(x - m) for the running max m), each invocation over a strided slice,
// then merged by a fixed-shape tree in workgroup memory: the result depends only on V, never on
// timing, so the gradient is bit-identical from run to run. All arithmetic is f32 whatever T is.

struct Params {
    n: u32,
    v: u32,
    ignore_index: u32,
    // Workgroups along x of the dispatch (rows = x + y * groups_x).
    groups_x: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> logits: array<T>;
@group(0) @binding(2) var<storage, read> targets: array<u32>;
@group(0) @binding(3) var<storage, read_write> loss: array<f32>;
@group(0) @binding(4) var<storage, read_write> dlogits: array<T>;
@group(0) @binding(5) var<storage, read> dloss_scale: array<f32>;
@group(0) @binding(6) var<storage, read_write> count: array<u32>;

const WG: u32 = 256u;
override ROWS_WG: u32 = 64u;
// Below any finite logit a caller could mean; -inf is avoided because exp(-inf - -inf) is NaN.
const LOWEST: f32 = -3.0e38;

var<workgroup> red_max: array<f32, WG>;
var<workgroup> red_sum: array<f32, WG>;
var<workgroup> red_count: array<u32, WG>;

@compute @workgroup_size(WG)
fn count_targets(@builtin(local_invocation_index) lid: u32) {
    var c = 0u;
    for (var i = lid; i < params.n; i += WG) {
        if (targets[i] != params.ignore_index) {
            c += 1u;
        }
    }
    red_count[lid] = c;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
        if (lid < k) {
            red_count[lid] += red_count[lid + k];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        count[0] = red_count[0];
    }
}

fn nan() -> f32 {
    // A NaN literal is not a valid WGSL constant expression; a bit pattern is.
    return bitcast<f32>(0x7fc00000u);
}

// The passes over one row, shared by both layouts. An invocation covers logits first,
// first + stride, ...: (lid, WG) when a workgroup shares the row, (0, 1) when it owns it.

// (max, sum of exp(x - max)) over the invocation's logits, by online rescaling.
fn row_max_sum(base: u32, first: u32, stride: u32) -> vec2<f32> {
    var m = LOWEST;
    var s = 0.0;
    for (var j = first; j < params.v; j += stride) {
        let x = f32(logits[base + j]);
        if (x > m) {
            s = s * exp(m - x) + 1.0;
            m = x;
        } else {
            s += exp(x - m);
        }
    }
    return vec2<f32>(m, s);
}

// The row's loss: NaN for an out-of-range target, 0 when ignored.
fn row_loss(base: u32, tgt: u32, m: f32, sum: f32) -> f32 {
    if (tgt != params.ignore_index && tgt >= params.v) {
        return nan();
    }
    if (tgt == params.ignore_index) {
        return 0.0;
    }
    // (max - x_t) first: both are f32 values of similar size, so the difference is exact or
    // nearly so even for logits of 1e4, and the small log(sum) is added last.
    return (m - f32(logits[base + tgt])) + log(sum);
}

fn row_gradient(base: u32, tgt: u32, m: f32, sum: f32, first: u32, stride: u32) {
    let ignored = tgt == params.ignore_index;
    let bad = !ignored && tgt >= params.v;
    // count >= 1 whenever some row is not ignored, and this row's gradient is zero otherwise.
    let coef = dloss_scale[0] / f32(max(count[0], 1u));
    let inv_sum = 1.0 / sum;
    for (var j = first; j < params.v; j += stride) {
        var g = 0.0;
        if (bad) {
            g = nan();
        } else if (!ignored) {
            let p = exp(f32(logits[base + j]) - m) * inv_sum;
            g = (p - select(0.0, 1.0, j == tgt)) * coef;
        }
        dlogits[base + j] = T(g);
    }
}

@compute @workgroup_size(WG)
fn crossentropy(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    // Uniform across the workgroup, so returning here keeps the barriers below uniform.
    let row = wg.x + wg.y * params.groups_x;
    if (row >= params.n) {
        return;
    }
    let base = row * params.v;
    let part = row_max_sum(base, lid, WG);
    red_max[lid] = part.x;
    red_sum[lid] = part.y;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
        if (lid < k) {
            let m1 = red_max[lid];
            let m2 = red_max[lid + k];
            let mm = max(m1, m2);
            red_sum[lid] = red_sum[lid] * exp(m1 - mm) + red_sum[lid + k] * exp(m2 - mm);
            red_max[lid] = mm;
        }
        workgroupBarrier();
    }
    let m = red_max[0];
    let sum = red_sum[0];
    let tgt = targets[row];
    if (lid == 0u) {
        loss[row] = row_loss(base, tgt, m, sum);
    }
    row_gradient(base, tgt, m, sum, lid, WG);
}

@compute @workgroup_size(ROWS_WG)
fn crossentropy_rows(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = (wg.x + wg.y * params.groups_x) * ROWS_WG + lid;
    if (row >= params.n) {
        return;
    }
    let base = row * params.v;
    let ms = row_max_sum(base, 0u, 1u);
    let tgt = targets[row];
    loss[row] = row_loss(base, tgt, ms.x, ms.y);
    row_gradient(base, tgt, ms.x, ms.y, 0u, 1u);
}
