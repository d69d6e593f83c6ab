//! Choosing a trial's parameters: grid, random, or TPE (the `optimizer` crate's samplers).
//!
//! Every choice is a pure function of the spec, the trial number and the finished trials, so a
//! resumed sweep proposes what an uninterrupted one would have. Two details of the crate make
//! that, and correctness, need care:
//! - its samplers derive each draw's seed from (seed, trial id, distribution, a per-instance call
//!   counter), so a fresh sampler is made for each trial and the parameters are drawn in spec
//!   order;
//! - its TPE finds a parameter's past values by *distribution* (it picks the first parameter of
//!   a past trial with an equal distribution), so two parameters with equal ranges, e.g. two
//!   choices of two values, would be modelled from one parameter's values. Each parameter is
//!   therefore sampled against a history holding that parameter alone (independent TPE per
//!   parameter, as Optuna's default univariate TPE).

use super::journal::{TrialRecord, TrialState};
use super::spec::{Method, ParamKind, ParamSpec, SweepSpec};
use optimizer::distribution::{
    CategoricalDistribution, Distribution, FloatDistribution, IntDistribution,
};
use optimizer::param::ParamValue;
use optimizer::parameter::ParamId;
use optimizer::sampler::random::RandomSampler;
use optimizer::sampler::tpe::TpeSampler;
use optimizer::sampler::{CompletedTrial, Sampler};
use rand::{RngExt, SeedableRng};
use std::collections::HashMap;

/// One trial's parameter values, in spec order, as config values.
pub type Point = Vec<toml::Value>;

/// The values a parameter takes on a grid.
fn axis(p: &ParamSpec) -> Vec<toml::Value> {
    match &p.kind {
        ParamKind::Float {
            low, high, step, ..
        } => {
            let step = step.unwrap_or(f64::INFINITY);
            // The small slack keeps `high` when (high - low) / step is a whole number that
            // rounding put a hair below it.
            let n = ((high - low) / step + 1e-9).floor() as usize + 1;
            (0..n)
                .map(|i| toml::Value::Float(tidy(low + i as f64 * step)))
                .collect()
        }
        ParamKind::Int {
            low, high, step, ..
        } => (*low..=*high)
            .step_by(*step as usize)
            .map(toml::Value::Integer)
            .collect(),
        ParamKind::Choice { values } => values.clone(),
    }
}

/// The number of values of [`axis`], without building them.
fn axis_len(p: &ParamSpec) -> usize {
    match &p.kind {
        ParamKind::Float {
            low, high, step, ..
        } => {
            let n = (high - low) / step.unwrap_or(f64::INFINITY) + 1e-9;
            if n < 1e15 {
                n.floor() as usize + 1
            } else {
                usize::MAX
            }
        }
        ParamKind::Int {
            low, high, step, ..
        } => usize::try_from((i128::from(*high) - i128::from(*low)) / i128::from(*step) + 1)
            .unwrap_or(usize::MAX),
        ParamKind::Choice { values } => values.len(),
    }
}

/// The number of grid points, or `None` past `usize`.
pub fn grid_size(params: &[ParamSpec]) -> Option<usize> {
    params
        .iter()
        .try_fold(1usize, |acc, p| acc.checked_mul(axis_len(p)))
}

/// Every point of the grid (the last parameter varying fastest), shuffled with `seed` as Optuna's
/// grid sampler does, so that a budget smaller than the grid is a random subset of it.
pub fn grid(params: &[ParamSpec], seed: u64) -> Vec<Point> {
    let axes: Vec<Vec<toml::Value>> = params.iter().map(axis).collect();
    let mut points: Vec<Point> = vec![Vec::new()];
    for a in &axes {
        points = points
            .into_iter()
            .flat_map(|p| {
                a.iter().map(move |v| {
                    let mut q = p.clone();
                    q.push(v.clone());
                    q
                })
            })
            .collect();
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for i in (1..points.len()).rev() {
        let j = rng.random_range(0..=i);
        points.swap(i, j);
    }
    points
}

/// Rounds to 10 significant digits, so a grid value prints as 0.3 rather than
/// 0.30000000000000004.
fn tidy(x: f64) -> f64 {
    format!("{x:.9e}").parse().unwrap_or(x)
}

/// The crate's description of a parameter's range.
fn distribution(p: &ParamSpec) -> Distribution {
    match &p.kind {
        ParamKind::Float {
            low,
            high,
            log,
            step,
        } => Distribution::Float(FloatDistribution {
            low: *low,
            high: *high,
            log_scale: *log,
            step: *step,
        }),
        ParamKind::Int {
            low,
            high,
            log,
            step,
        } => Distribution::Int(IntDistribution {
            low: *low,
            high: *high,
            log_scale: *log,
            step: Some(*step),
        }),
        ParamKind::Choice { values } => Distribution::Categorical(CategoricalDistribution {
            n_choices: values.len(),
        }),
    }
}

/// A config value as the crate's parameter value (`None`: not a value of this parameter, e.g.
/// a journal edited by hand).
fn to_param_value(p: &ParamSpec, v: &serde_json::Value) -> Option<ParamValue> {
    match &p.kind {
        ParamKind::Float { .. } => v.as_f64().map(ParamValue::Float),
        ParamKind::Int { .. } => v.as_i64().map(ParamValue::Int),
        ParamKind::Choice { values } => values
            .iter()
            .position(|c| to_json(c) == *v)
            .map(ParamValue::Categorical),
    }
}

fn from_param_value(p: &ParamSpec, v: ParamValue) -> toml::Value {
    match (&p.kind, v) {
        (ParamKind::Float { low, high, .. }, ParamValue::Float(x)) => {
            // Four significant digits are all a sweep can tell apart, and they read well in
            // best.toml; clamped so the rounding never leaves the range.
            let x: f64 = format!("{x:.3e}").parse().unwrap_or(x);
            toml::Value::Float(x.clamp(*low, *high))
        }
        (ParamKind::Int { low, high, .. }, ParamValue::Int(x)) => {
            toml::Value::Integer(x.clamp(*low, *high))
        }
        (ParamKind::Choice { values }, ParamValue::Categorical(i)) => {
            values[i.min(values.len() - 1)].clone()
        }
        // The crate answers in the distribution's own kind; anything else is a bug there, and
        // the low end of the range is a valid value to fall back on.
        (ParamKind::Float { low, .. }, _) => toml::Value::Float(*low),
        (ParamKind::Int { low, .. }, _) => toml::Value::Integer(*low),
        (ParamKind::Choice { values }, _) => values[0].clone(),
    }
}

/// A config value as JSON, for the journal.
pub fn to_json(v: &toml::Value) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

/// What the model-based sampler learns from: each finished trial with a value (COMPLETE, and
/// PRUNED with the best loss it reported, which ranks it among the bad ones since it was pruned
/// for being worse than the median), as Optuna's TPE does. FAIL trials carry no value.
fn scored(history: &[TrialRecord]) -> Vec<(&TrialRecord, f64)> {
    history
        .iter()
        .filter(|t| matches!(t.state, TrialState::Complete | TrialState::Pruned))
        .filter_map(|t| t.value.filter(|v| v.is_finite()).map(|v| (t, v)))
        .collect()
}

/// The parameters of trial `number`, given the trials finished so far.
pub fn suggest(spec: &SweepSpec, number: usize, history: &[TrialRecord]) -> Point {
    if spec.method == Method::Grid {
        let points = grid(&spec.params, spec.seed);
        return points[number % points.len()].clone();
    }
    let scored = scored(history);
    // One sampler per trial: the crate's draw seeds include a per-instance call counter (see the
    // module comment).
    let sampler: Box<dyn Sampler> = match spec.method {
        Method::Tpe => match TpeSampler::builder()
            .seed(spec.seed)
            .n_startup_trials(spec.n_startup_trials)
            .build()
        {
            Ok(s) => Box::new(s),
            Err(_) => Box::new(RandomSampler::with_seed(spec.seed)),
        },
        _ => Box::new(RandomSampler::with_seed(spec.seed)),
    };
    spec.params
        .iter()
        .map(|p| {
            let id = ParamId::new();
            let dist = distribution(p);
            let past: Vec<CompletedTrial> = scored
                .iter()
                .filter_map(|(t, value)| {
                    let v = to_param_value(p, t.params.get(&p.key)?)?;
                    Some(CompletedTrial::new(
                        t.number as u64,
                        HashMap::from([(id, v)]),
                        HashMap::from([(id, dist.clone())]),
                        HashMap::new(),
                        *value,
                    ))
                })
                .collect();
            from_param_value(p, sampler.sample(&dist, number as u64, &past))
        })
        .collect()
}
