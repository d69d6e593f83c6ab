//! The median pruner (Optuna's `MedianPruner`): stop a trial whose best validation loss so far is
//! worse than the median of the completed trials' losses at the same step.
//!
//! Written here rather than taken from the `optimizer` crate: its median pruner compares the
//! latest value rather than the best so far and counts trials with a value at the step rather
//! than completed trials, and the rule is a dozen lines.

use super::spec::PrunerSpec;

/// Whether to stop a trial that has reported `reports` ((steps done, loss), in order), given the
/// reports of the completed trials.
pub fn should_prune(
    spec: &PrunerSpec,
    reports: &[(u64, f64)],
    completed: &[&[(u64, f64)]],
) -> bool {
    let Some(&(step, _)) = reports.last() else {
        return false;
    };
    if completed.len() < spec.n_startup_trials || step < spec.n_warmup_steps {
        return false;
    }
    let best = reports.iter().map(|r| r.1).fold(f64::INFINITY, f64::min);
    let mut at_step: Vec<f64> = completed
        .iter()
        .filter_map(|r| r.iter().find(|(s, _)| *s == step).map(|r| r.1))
        .filter(|v| v.is_finite())
        .collect();
    if at_step.is_empty() {
        return false;
    }
    at_step.sort_by(f64::total_cmp);
    let n = at_step.len();
    let median = if n % 2 == 1 {
        at_step[n / 2]
    } else {
        0.5 * (at_step[n / 2 - 1] + at_step[n / 2])
    };
    best > median
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: PrunerSpec = PrunerSpec {
        n_startup_trials: 2,
        n_warmup_steps: 10,
    };

    #[test]
    fn prunes_only_above_the_median_after_start_up_and_warm_up() {
        let a: &[(u64, f64)] = &[(10, 2.0), (20, 1.5)];
        let b: &[(u64, f64)] = &[(10, 2.2), (20, 1.7)];
        let c: &[(u64, f64)] = &[(10, 2.4), (20, 1.9)];
        // Median at step 20 of a, b, c is 1.7.
        assert!(should_prune(&SPEC, &[(10, 3.0), (20, 1.8)], &[a, b, c]));
        assert!(!should_prune(&SPEC, &[(10, 3.0), (20, 1.6)], &[a, b, c]));
        // The best so far counts, not the latest.
        assert!(!should_prune(&SPEC, &[(10, 1.0), (20, 1.8)], &[a, b, c]));
        // Too few completed trials.
        assert!(!should_prune(&SPEC, &[(10, 9.0)], &[a]));
        // Before the warm-up ends.
        let early = PrunerSpec {
            n_warmup_steps: 15,
            ..SPEC
        };
        assert!(!should_prune(&early, &[(10, 9.0)], &[a, b, c]));
        // No completed trial was evaluated at this step.
        assert!(!should_prune(&SPEC, &[(15, 9.0)], &[a, b, c]));
        // Even count: the mean of the two middle values (2.1 at step 10).
        assert!(should_prune(&SPEC, &[(10, 2.15)], &[a, b]));
        assert!(!should_prune(&SPEC, &[(10, 2.05)], &[a, b]));
    }
}
