//! Reference dynamic loss-scale update (PyTorch's `GradScaler.update` rule).

use crate::training::LossScaling;

/// After a step whose gradient check raised `flag`: back off and restart the run of clean steps;
/// otherwise count the clean step and grow the scale once `growth_interval` of them are in a row.
/// The scale stays within the settings' bounds.
pub fn loss_scale_update(scale: &mut f32, run: &mut u32, flag: u32, settings: &LossScaling) {
    let bounded = |s: f32| s.clamp(settings.min_scale, settings.max_scale);
    if flag != 0 {
        *scale = bounded(*scale * settings.backoff_factor);
        *run = 0;
        return;
    }
    let clean = *run + 1;
    if clean >= settings.growth_interval {
        *scale = bounded(*scale * settings.growth_factor);
        *run = 0;
    } else {
        *run = clean;
    }
}
