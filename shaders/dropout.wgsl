// Inverted dropout with a counter-based random generator, so that the backward pass reproduces
// the forward's mask from the same counters instead of storing it:
//
//     keep(i)  = bits(key, site, i) >= threshold          threshold = round(p · 2^32)
//     y[i]     = keep(i) ? x[i] · scale : 0                scale = 1 / (1 − p)
//
// The same function is its own backward: dx = dropout(dy) with the same (key, site). `key`
// changes per optimizer step and micro-batch (the host derives it from the run's seed, the step
// and the micro-batch index and stages it beside the batch's tokens); `site` names the place in
// the network (layer, attention probabilities or residual branch). With threshold 0 and scale 1
// (evaluation) every element is kept and multiplied by exactly 1.
//
// bits() chains Chris Wellons' "lowbias32" integer hash, a bijection on u32 with near-ideal
// avalanche: the site and key are hashed into a stream constant, and each element's counter is
// hashed twice with it. src/cpu/dropout.rs computes the same bits.

struct Dims {
    n: u32,
    groups_x: u32,
    site: u32,
    _pad: u32,
}

struct State {
    key: u32,
    threshold: u32,
    scale: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> state: State;
@group(0) @binding(2) var<storage, read> src: array<T>;
@group(0) @binding(3) var<storage, read_write> dst: array<T>;

override WG: u32 = 256u;

fn lowbias32(v: u32) -> u32 {
    var x = v;
    x ^= x >> 16u;
    x *= 0x7feb352du;
    x ^= x >> 15u;
    x *= 0x846ca68bu;
    x ^= x >> 16u;
    return x;
}

fn bits(i: u32, stream: u32) -> u32 {
    return lowbias32(lowbias32(i ^ stream) + stream);
}

fn stream() -> u32 {
    return lowbias32(state.key ^ lowbias32(dims.site + 0x9e3779b9u));
}

fn element(wg: vec3<u32>, lid: u32) -> u32 {
    return (wg.y * dims.groups_x + wg.x) * WG + lid;
}

fn apply(x: T, i: u32, s: u32) -> T {
    if (bits(i, s) >= state.threshold) {
        return T(f32(x) * state.scale);
    }
    return T(0.0);
}

// dst = dropout(dst)
@compute @workgroup_size(WG)
fn dropout_inplace(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = element(wg, lid);
    if (i >= dims.n) {
        return;
    }
    dst[i] = apply(dst[i], i, stream());
}

// dst = dropout(src)
@compute @workgroup_size(WG)
fn dropout_copy(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = element(wg, lid);
    if (i >= dims.n) {
        return;
    }
    dst[i] = apply(src[i], i, stream());
}
