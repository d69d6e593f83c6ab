// Dynamic loss scaling that stays on the GPU (the rule of PyTorch's GradScaler.update).
//
// f16 gradients underflow: a loss gradient of 1/768 per logit becomes parameter gradients of
// 1e-6 and less, below f16's normal range (6.1e-5), where they lose precision or vanish. So the
// loss gradient is multiplied by `scale` (cross-entropy reads it), AdamW divides it out again, and
// this one-invocation kernel, recorded after AdamW in every step, adapts the scale:
//
//     the step's gradients had an inf/NaN (gradnorm's flag)  →  scale *= backoff, run = 0
//                                                               (AdamW skipped that step)
//     otherwise run += 1, and after growth_interval clean steps in a row  →  scale *= growth, run = 0
//
// The scale is kept within [min_scale, max_scale] so that repeated overflows from a genuinely
// broken step cannot drive it to zero. Nothing here is read by the host during training; the
// state (scale, run) is read back only when a checkpoint is written.

struct Params {
    growth_factor: f32,
    backoff_factor: f32,
    growth_interval: u32,
    min_scale: f32,
    max_scale: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> flag: array<u32>;
@group(0) @binding(2) var<storage, read_write> scale: array<f32>;
@group(0) @binding(3) var<storage, read_write> run: array<u32>;

@compute @workgroup_size(1)
fn loss_scale_update() {
    if (flag[0] != 0u) {
        scale[0] = clamp(scale[0] * params.backoff_factor, params.min_scale, params.max_scale);
        run[0] = 0u;
        return;
    }
    let clean = run[0] + 1u;
    if (clean >= params.growth_interval) {
        scale[0] = clamp(scale[0] * params.growth_factor, params.min_scale, params.max_scale);
        run[0] = 0u;
    } else {
        run[0] = clean;
    }
}
