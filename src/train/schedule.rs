//! The learning-rate schedule: linear warm-up, then cosine, linear or constant decay.

use crate::model::{Decay, TrainConfig};

/// Learning rate for optimizer step `step` (counted from 0): a linear ramp to `lr` over
/// `warmup_steps`, `lr·(step+1)/warmup` at step `step`, so the last warm-up step runs at the full
/// rate (nanoGPT's `get_lr` ramps one step slower, `lr·(it+1)/(warmup+1)`); then a decay from
/// `lr` to `min_lr` that ends at `max_steps` (nanoGPT's cosine with `lr_decay_iters =
/// max_steps`), and `min_lr` past it.
pub fn learning_rate(train: &TrainConfig, step: u64) -> f64 {
    let (lr, min_lr) = (train.lr, train.min_lr);
    let warmup = train.warmup_steps as u64;
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let total = train.max_steps as u64;
    if step >= total || total <= warmup {
        return if train.decay == Decay::Constant {
            lr
        } else {
            min_lr
        };
    }
    let progress = (step - warmup) as f64 / (total - warmup) as f64;
    match train.decay {
        Decay::Constant => lr,
        Decay::Linear => lr + (min_lr - lr) * progress,
        Decay::Cosine => {
            min_lr + 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()) * (lr - min_lr)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The warm-up is the formula the documentation gives, not nanoGPT's (which an earlier
    /// comment claimed): lr·(step+1)/warmup, reaching lr at the last warm-up step.
    #[test]
    fn warmup_is_the_documented_ramp() {
        let c = cfg(Decay::Cosine);
        assert_eq!(learning_rate(&c, 0), c.lr / 100.0);
        assert_ne!(learning_rate(&c, 0), c.lr / 101.0);
        assert_eq!(learning_rate(&c, 99), c.lr);
    }

    fn cfg(decay: Decay) -> TrainConfig {
        TrainConfig {
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 100,
            max_steps: 2000,
            decay,
            ..TrainConfig::default()
        }
    }

    #[test]
    fn warmup_ramps_linearly_to_the_peak() {
        let c = cfg(Decay::Cosine);
        assert!((learning_rate(&c, 0) - 1e-5).abs() < 1e-15);
        assert!((learning_rate(&c, 49) - 5e-4).abs() < 1e-15);
        assert!((learning_rate(&c, 99) - 1e-3).abs() < 1e-15);
    }

    #[test]
    fn cosine_falls_to_min_lr_at_the_end() {
        let c = cfg(Decay::Cosine);
        assert!((learning_rate(&c, 100) - 1e-3).abs() < 1e-12);
        // Half way through the decay the cosine is at the mean of the two rates.
        assert!((learning_rate(&c, 1050) - 5.5e-4).abs() < 1e-12);
        assert!((learning_rate(&c, 2000) - 1e-4).abs() < 1e-15);
        assert!((learning_rate(&c, 5000) - 1e-4).abs() < 1e-15);
        let mut prev = f64::INFINITY;
        for s in 100..2000 {
            let lr = learning_rate(&c, s);
            assert!(lr <= prev, "not monotone at {s}");
            prev = lr;
        }
    }

    #[test]
    fn linear_and_constant() {
        let l = cfg(Decay::Linear);
        assert!((learning_rate(&l, 1050) - 5.5e-4).abs() < 1e-12);
        let k = cfg(Decay::Constant);
        assert_eq!(learning_rate(&k, 1500), 1e-3);
        assert_eq!(learning_rate(&k, 9000), 1e-3);
    }
}
